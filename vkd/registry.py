"""Where the CLI finds each task. Entries are imported lazily so ``vkd --help`` stays fast and a
module that has not landed yet is reported as "not implemented yet" instead of crashing."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vkd.errors import UserError

__all__ = ["TaskEntry", "DISTILL_TASKS", "EVAL_TASKS", "get_task", "resolve"]


@dataclass(frozen=True)
class TaskEntry:
    """A trainable task as the CLI sees it.

    Attributes:
        name: the CLI name (``vkd distill <name>``).
        config_cls: the task's config dataclass (a ``vkd.config.TaskConfig`` subclass).
        preset_dir: folder under ``configs/`` holding its YAML presets.
        run: ``run(cfg, resume) -> summary`` trains and returns the summary dict.
        evaluate: ``evaluate(run_dir, overrides, out_dir) -> metrics`` or ``None``.
        description: one line for ``--help``.
        default_preset: preset used when ``--config`` is not given (``None``: dataclass defaults).
    """

    name: str
    config_cls: type
    preset_dir: str
    run: Callable[[Any, str | None], dict]
    evaluate: Callable[[Path, list[str], Path | None], dict] | None = None
    description: str = ""
    default_preset: str | None = None


# name -> "module:attribute" of its TaskEntry.
DISTILL_TASKS: dict[str, str] = {
    "toy": "vkd.engine.toy:TOY",
    "boot-teacher": "vkd.boot.commands:BOOT_TEACHER",
    "boot": "vkd.boot.commands:BOOT",
    "feature3dgs": "vkd.feature3dgs.commands:FEATURE3DGS",
    "hello-teacher": "vkd.hello.commands:HELLO_TEACHER",
    "hello": "vkd.hello.commands:HELLO",
    "skt-teacher": "vkd.skt.commands:SKT_TEACHER",
    "skt": "vkd.skt.commands:SKT",
}

DESCRIPTIONS: dict[str, str] = {
    "toy": "tiny MLP student distilled from a fixed MLP teacher (engine smoke test)",
    "boot-teacher": "train the embedded DDPM teacher on scikit-learn digits (diffusers UNet2DModel)",
    "boot": "BOOT: data-free one-step distillation of a diffusers teacher",
    "feature3dgs": "Feature 3DGS: distil dense CLIP features into a 3D Gaussian feature field",
    "hello-teacher": "train the HeLlO soft-label teacher (small CNN or ResNet-18) with weak-teacher snapshots",
    "hello": "HeLlO: dataset distillation with a CLIP + LoRA label projector",
    "skt-teacher": "train the CSRNet crowd-counting teacher",
    "skt": "SKT: CSRNet -> 1/4-CSRNet with intra- and inter-layer knowledge transfer",
}

EVAL_TASKS: dict[str, str] = {
    "toy": "toy",
    "boot": "boot",
    "feature3dgs": "feature3dgs",
    "hello": "hello",
    "skt": "skt",
}


def resolve(target: str, what: str) -> Any:
    """Import ``module:attribute``; a missing module means the feature has not landed yet."""
    module_name, attr = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (err.name == module_name or module_name.startswith(err.name + ".")):
            raise UserError(f"{what} is not implemented yet") from None
        raise
    if not hasattr(module, attr):
        raise UserError(f"{what} is not implemented yet")
    return getattr(module, attr)


def get_task(name: str) -> TaskEntry:
    if name not in DISTILL_TASKS:
        raise UserError(f"unknown task '{name}'; tasks: {', '.join(DISTILL_TASKS)}")
    return resolve(DISTILL_TASKS[name], f"task '{name}'")
