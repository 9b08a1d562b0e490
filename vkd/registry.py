"""The registration table: which methods vkd has. Adding a method is one line here (or an entry point).

Each entry names a :class:`~vkd.method.MethodSpec` as ``"module:attribute"``. Installed packages can add their own
through the ``vkd.methods`` entry-point group, e.g. in their ``pyproject.toml``::

    [project.entry-points."vkd.methods"]
    mymethod = "mypkg:METHOD"

Everything else (CLI subcommands and task lists, ``vkd config list``, ``vkd demo`` stages, ``vkd fid`` run
generators) is derived from the declarations by the functions below.
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points

from vkd.errors import UserError
from vkd.method import FidGenerator, MethodSpec, Ref, TaskSpec, VerbSpec

__all__ = ["METHODS", "ENTRY_POINT_GROUP", "methods", "tasks", "task_names", "get_task", "verbs",
           "demo_methods", "fid_generators"]

# name -> "module:attribute" of its MethodSpec, in the order of `vkd --help` and of the demo.
METHODS: dict[str, str] = {
    "toy": "vkd.toy:METHOD",
    "boot": "vkd.boot:METHOD",
    "feature3dgs": "vkd.feature3dgs:METHOD",
    "hello": "vkd.hello:METHOD",
    "skt": "vkd.skt:METHOD",
}
ENTRY_POINT_GROUP = "vkd.methods"


@functools.cache
def methods() -> dict[str, MethodSpec]:
    """Every registered method: the table, then installed entry points (a name clash is an error)."""
    found: dict[str, MethodSpec] = {}
    targets = dict(METHODS)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in targets:
            raise UserError(f"entry point '{ep.name}' ({ep.value}) clashes with a built-in method")
        targets[ep.name] = ep.value
    for name, target in targets.items():
        spec = Ref[MethodSpec](target).resolve()
        if not isinstance(spec, MethodSpec) or spec.name != name:
            raise UserError(f"{target} is not the MethodSpec of '{name}'")
        found[name] = spec
    seen: dict[str, str] = {}
    for spec in found.values():
        for task in spec.tasks:
            if task.name in seen:
                raise UserError(f"task '{task.name}' is declared by both {seen[task.name]} and {spec.name}")
            seen[task.name] = spec.name
    return found


def tasks() -> dict[str, TaskSpec]:
    """``task name -> TaskSpec`` over all methods."""
    return {t.name: t for spec in methods().values() for t in spec.tasks}


def task_names() -> list[str]:
    return list(tasks())


def get_task(name: str) -> TaskSpec:
    found = tasks()
    if name not in found:
        raise UserError(f"unknown task '{name}'; tasks: {', '.join(found)}")
    return found[name]


def verbs() -> dict[str, VerbSpec]:
    """``subcommand -> VerbSpec`` (one method per verb)."""
    out: dict[str, VerbSpec] = {}
    owner: dict[str, str] = {}
    for spec in methods().values():
        for verb in spec.verbs:
            if verb.name in out:
                raise UserError(f"verb '{verb.name}' is declared by both {owner[verb.name]} and {spec.name}")
            out[verb.name], owner[verb.name] = verb, spec.name
    return out


def demo_methods() -> list[MethodSpec]:
    """The methods with a demo stage, in table order."""
    return [spec for spec in methods().values() if spec.demo is not None]


def fid_generators() -> dict[str, Ref[FidGenerator]]:
    """``task name -> image generator`` for ``vkd fid --fake RUN``."""
    return {task: gen for spec in methods().values() for task, gen in spec.fid_generators.items()}
