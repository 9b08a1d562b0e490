"""Run-directory helpers shared by every method's ``runs.py`` and ``evaluate.py``: open a run, pick a device,
write a JSON result atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml

from vkd.cache import atomic_write_text
from vkd.config import load_config
from vkd.errors import UserError

__all__ = ["check_run_dir", "open_run", "run_task_name", "resolve_device", "write_json", "close_process_group"]

C = TypeVar("C")


def check_run_dir(run_dir: str | Path) -> Path:
    """``run_dir`` as a ``Path``; a user error when it is not a directory."""
    path = Path(run_dir)
    if not path.is_dir():
        raise UserError(f"run directory not found: {path}")
    return path


def run_task_name(run_dir: str | Path) -> str | None:
    """The ``task`` recorded in ``run_dir/config.yaml``.

    Raises:
        UserError: not a run directory (no ``config.yaml``) or an unreadable one.
    """
    cfg_path = Path(run_dir) / "config.yaml"
    if not cfg_path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml)")
    try:
        return (yaml.safe_load(cfg_path.read_text()) or {}).get("task")
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"cannot read {cfg_path}: {str(err).splitlines()[0]}") from None


def open_run(run_dir: str | Path, config_cls: type[C], task: str, overrides: list[str] | tuple[str, ...] = ()
             ) -> C:
    """The resolved config of a run directory (its ``config.yaml`` plus ``overrides``).

    Args:
        run_dir: a run directory written by ``vkd distill``.
        config_cls: the task's config dataclass.
        task: the task name the config is loaded as.
        overrides: ``key=value`` strings, as ``--set`` takes them.

    Raises:
        UserError: not a run directory, or its config does not load.

    Examples:
        >>> cfg = open_run("runs/skt/synthetic", SKTConfig, "skt", ["eval.tile_size=256"])  # doctest: +SKIP
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml)")
    return load_config(config_cls, run_dir / "config.yaml", list(overrides), task=task)


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without CUDA is a user error."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested but CUDA is not available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'") from None


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON to a temporary name, then rename (a reader never sees half a file)."""
    path = Path(path)
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")
    return path


def close_process_group() -> None:
    """Under torchrun: wait for every rank, then tear the process group down before the interpreter exits.

    Left to interpreter shutdown, a gloo group whose peer has already exited can abort the process ("terminate
    called without an active exception", exit code -6) after the command itself succeeded. No-op without one.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
