"""The method contract and the import graph: every method declared once, the same file roles in every method, no
import cycles (function-level imports included), and shared layers that never name a method package."""

from __future__ import annotations

import ast
import inspect
import sys
from pathlib import Path

import pytest

from vkd import registry
from vkd.method import MethodSpec, Ref

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vkd"
METHOD_PACKAGES = ["boot", "feature3dgs", "hello", "skt"]
# Shared layers: they take tensors, modules and declarations, and never name a method package.
SHARED = ["cli.py", "demo.py", "report.py", "config.py", "cache.py", "method.py", "errors.py", "engine", "render",
          "metrics", "data", "models"]
# The file roles of every method package (README, "How vkd is laid out"): role -> the file names that fill it.
ROLES = {"config": ["config.py"], "teacher": ["teacher.py"], "model": ["model.py", "student.py", "models.py"],
         "losses": ["losses.py"], "distiller": ["distiller.py"], "data": ["data.py", "data", "datasets.py"],
         "runs": ["runs.py"], "evaluate": ["evaluate.py"], "commands": ["commands.py"], "demo": ["demo.py"]}
DATA_FREE: set[str] = set()  # BOOT is data-free, but its data role reads prompt files


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(path: Path, module: str) -> list[tuple[str, int]]:
    """``(imported vkd module, line)`` for every import in the file, at any depth (function-level too)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            # "from vkd.x import y": the submodule vkd.x.y when there is one, else vkd.x
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name.startswith("vkd") and name != module:
                found.append((name, node.lineno))
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        # an import of a submodule implicitly runs its packages' __init__ first; that is not an edge of the graph
        graph[module] = {m for m, _ in _imports(path, module) if not module.startswith(m + ".")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_function_level_imports_included():
    assert _cycles(_graph()) == []


def test_shared_layers_never_name_a_method_package():
    offenders = []
    for module, path in MODULES.items():
        rel = path.relative_to(PACKAGE).as_posix()
        if not any(rel == s or rel.startswith(s + "/") for s in SHARED):
            continue
        for imported, line in _imports(path, module):
            if imported.count(".") and imported.split(".")[1] in METHOD_PACKAGES + ["toy"]:
                offenders.append(f"{rel}:{line} imports {imported}")
        text = path.read_text()
        for name in METHOD_PACKAGES:
            if f'"vkd.{name}' in text or f"'vkd.{name}" in text:
                offenders.append(f"{rel} names vkd.{name} in a string")
    assert not offenders, offenders


def test_a_method_never_imports_another_method():
    offenders = []
    for module, path in MODULES.items():
        parts = module.split(".")
        if len(parts) < 2 or parts[1] not in METHOD_PACKAGES:
            continue
        for imported, line in _imports(path, module):
            other = imported.split(".")[1] if "." in imported else ""
            if other in METHOD_PACKAGES and other != parts[1]:
                offenders.append(f"{path.relative_to(ROOT)}:{line} imports {imported}")
    assert not offenders, offenders


@pytest.mark.parametrize("name", METHOD_PACKAGES)
def test_every_method_has_the_same_file_roles(name):
    missing = [role for role, files in ROLES.items()
               if not (role == "data" and name in DATA_FREE) and not any((PACKAGE / name / f).exists() for f in files)]
    assert not missing, f"vkd/{name} lacks the roles {missing}"


def test_every_declaration_resolves():
    """Each registered method's references (configs, run/evaluate functions, demo stage, verbs, FID generators)
    import and are callable: a typo in a declaration fails here, not in a user's command."""
    methods = registry.methods()
    assert list(methods)[:5] == ["toy", *METHOD_PACKAGES]
    for spec in methods.values():
        assert isinstance(spec, MethodSpec)
        refs: list[Ref] = [spec.demo] if spec.demo else []
        for task in spec.tasks:
            assert inspect.isclass(task.config_cls) and task.config_cls.__dataclass_fields__
            assert (ROOT / "configs" / task.preset_dir).is_dir(), task.preset_dir
            refs += [task.run] + ([task.evaluate] if task.evaluate else [])
        refs += [verb.run for verb in spec.verbs] + list(spec.fid_generators.values())
        for ref in refs:
            assert callable(ref.resolve()), ref.target


def test_commands_are_thin_adapters():
    """``commands.py`` holds adapters of at most 15 lines (docstrings excluded); the work lives elsewhere."""
    long = []
    for name in METHOD_PACKAGES:
        path = PACKAGE / name / "commands.py"
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef):
                body = node.body[1:] if ast.get_docstring(node) else node.body
                lines = body[-1].end_lineno - body[0].lineno + 1
                if lines > 15:
                    long.append(f"{name}/commands.py:{node.name} ({lines} lines)")
    assert not long, long
