"""The method contract: one :class:`MethodSpec` per method declares everything the shared layers use.

A method package ``vkd/<name>/`` exports ``METHOD = MethodSpec(...)`` from its ``__init__.py``, and one line in
``vkd.registry.METHODS`` (or an entry point in the ``vkd.methods`` group) registers it. From these declarations
the CLI builds ``vkd distill``/``eval``/``config`` and the method verbs (``vkd sample``, ``render``, ``count``),
``vkd demo`` its stages and ``vkd fid --fake RUN`` its image generators; no shared module names a method package.

Callables and config classes are :class:`Ref` s (``"module:attribute"``, imported on first use) so that building
the command line imports no torch: ``vkd --help`` stays instant. ``tests/test_method_contract.py`` resolves every
reference of every registered method.

Examples:
    >>> from vkd.method import MethodSpec, TaskSpec, Ref
    >>> METHOD = MethodSpec(
    ...     name="mymethod",
    ...     tasks=(TaskSpec(name="mymethod", description="my distillation",
    ...                     config=Ref("mypkg.config:MyConfig"), run=Ref("mypkg.commands:run")),),
    ... )
    >>> [t.name for t in METHOD.tasks]
    ['mymethod']
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from vkd.errors import UserError

__all__ = ["Ref", "Arg", "TaskSpec", "VerbSpec", "MethodSpec", "RunFn", "EvaluateFn", "DemoFn", "FidGenerator"]

T = TypeVar("T")

# run(cfg, resume) -> summary; evaluate(run_dir, overrides, out_dir) -> metrics; demo(stage_dir, quick) -> Section;
# fid generator(run_dir, indices=, seed=, batch_size=, device=) -> (uint8 [B, 3, H, W] batches, (H, W)).
RunFn = Callable[[Any, str | None], dict]
EvaluateFn = Callable[[Path, list[str], Path | None], dict]
DemoFn = Callable[[Path, bool], Any]
FidGenerator = Callable[..., tuple[Iterator[Any], tuple[int, int]]]


@dataclass(frozen=True)
class Ref(Generic[T]):
    """A lazily imported ``"module:attribute"``; calling it calls the target.

    A module that is not installed (a method that has not landed, an optional dependency) is a ``UserError``
    ("... is not implemented yet"), not a traceback.
    """

    target: str

    def resolve(self) -> T:
        module_name, _, attr = self.target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and (err.name == module_name or module_name.startswith(err.name + ".")):
                raise UserError(f"'{self.target}' is not implemented yet") from None
            raise
        if not hasattr(module, attr):
            raise UserError(f"'{self.target}' is not implemented yet")
        return getattr(module, attr)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)  # type: ignore[operator]


@dataclass(frozen=True)
class Arg:
    """One ``argparse`` argument of a method verb: ``Arg("--run", type=Path, required=True, help=...)``.

    ``group="name"`` puts the arguments that share it in one mutually exclusive group."""

    flags: tuple[str, ...]
    options: Mapping[str, Any]

    def __init__(self, *flags: str, **options: Any):
        object.__setattr__(self, "flags", flags)
        object.__setattr__(self, "options", options)


@dataclass(frozen=True)
class TaskSpec:
    """A trainable task (``vkd distill <name>``).

    Attributes:
        name: the CLI name.
        description: one line for ``--help`` and ``vkd config list``.
        config: the task's config dataclass (a ``vkd.config.TaskConfig`` subclass).
        run: ``run(cfg, resume) -> summary`` trains and returns the summary dict.
        evaluate: ``evaluate(run_dir, overrides, out_dir) -> metrics`` for ``vkd eval``, or ``None``.
        preset_dir: folder under ``configs/`` holding the YAML presets.
        default_preset: the preset used when ``--config`` is not given (``None``: dataclass defaults).
        evaluates_weights: ``evaluate`` also takes a weights *file* in place of the run directory
            (``vkd eval TASK --weights FILE --set data...``: a released checkpoint on the user's data).
    """

    name: str
    description: str
    config: Ref[type]
    run: Ref[RunFn]
    evaluate: Ref[EvaluateFn] | None = None
    preset_dir: str = ""
    default_preset: str | None = None
    evaluates_weights: bool = False

    @property
    def config_cls(self) -> type:
        return self.config.resolve()


@dataclass(frozen=True)
class VerbSpec:
    """A method's own subcommand (``vkd sample``, ``vkd render``, ``vkd count``).

    Attributes:
        name: the subcommand.
        help: one line for ``--help``.
        args: its arguments.
        run: ``run(args: argparse.Namespace) -> dict`` (printed as a table), a thin adapter in ``commands.py``.
        examples: the epilog of ``vkd <name> --help``.
    """

    name: str
    help: str
    args: tuple[Arg, ...]
    run: Ref[Callable[[argparse.Namespace], dict]]
    examples: str = ""


@dataclass(frozen=True)
class MethodSpec:
    """Everything the shared layers know of a method.

    Attributes:
        name: the package name (``boot``); also its demo stage's name.
        tasks: its trainable tasks, in ``--help`` order.
        title: the heading of its demo stage and report section.
        demo: ``demo(stage_dir, quick) -> vkd.report.Section``, or ``None`` (no demo stage).
        verbs: its own subcommands.
        fid_generators: ``task name -> generator`` for ``vkd fid --fake RUN`` on runs of that task.
    """

    name: str
    tasks: tuple[TaskSpec, ...]
    title: str = ""
    demo: Ref[DemoFn] | None = None
    verbs: tuple[VerbSpec, ...] = ()
    fid_generators: Mapping[str, Ref[FidGenerator]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"method {self.name}: duplicate task names {names}")
        unknown = set(self.fid_generators) - set(names)
        if unknown:
            raise ValueError(f"method {self.name}: FID generators for tasks it does not declare: {sorted(unknown)}")
