"""Checkpoints: safetensors weights + a weights-only training state, written atomically.

Layout of ``checkpoints/checkpoint-{step}/``::

    model.safetensors      # task.checkpoint_state_dict() (the student and other trained tensors)
    ema.safetensors        # EMA of the student (only when train.ema_decay > 0)
    training_state.pt      # optimizers, schedulers, RNG states, task extra state: loaded weights_only=True
    meta.json              # step, sha256 of every file above; written last, so its presence marks completeness

With ``train.select_best`` the run also keeps ``best/`` (the same layout, without optimizer state, plus ``metric``,
``value`` and ``mode`` in ``meta.json``): the weights of the step whose validation metric was best so far
(:func:`save_best`, :func:`read_best`; :func:`selected_checkpoint` is what evaluation and export should read).

A checkpoint is assembled in a hidden temporary directory and renamed into place, so a crash or a full
disk never leaves a half-written ``checkpoint-{step}`` and never touches the previous one. Old
checkpoints are likewise renamed to a hidden name before they are deleted, so a process killed while
pruning never leaves a ``checkpoint-{step}`` with some of its files gone; :func:`remove_stale` deletes
such hidden leftovers. Nothing is ever unpickled beyond tensors and plain containers
(``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vkd.errors import DataError

__all__ = [
    "CHECKPOINT_RE",
    "list_checkpoints",
    "latest_checkpoint",
    "latest_valid_checkpoint",
    "remove_stale",
    "save_checkpoint",
    "load_checkpoint_weights",
    "with_final_ema",
    "load_training_state",
    "verify_checkpoint",
    "rng_state",
    "set_rng_state",
    "CheckpointWriteError",
    "BEST_DIR",
    "save_best",
    "read_best",
    "selected_checkpoint",
]

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
BEST_DIR = "best"  # <run>/best: the selected weights (train.select_best)


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (disk full, read-only target); the previous one is intact."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _plain_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage; copies are cheap next to the write.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states as tensors and plain containers (weights_only-safe)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(checkpoint_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (with ``meta.json``) under ``checkpoint_dir``, sorted by step."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for child in checkpoint_dir.iterdir():
        match = CHECKPOINT_RE.match(child.name)
        if match and (child / "meta.json").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory (or of a ``checkpoints/`` directory)."""
    run_dir = Path(run_dir)
    base = run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else run_dir
    found = list_checkpoints(base)
    return found[-1][1] if found else None


def latest_valid_checkpoint(run_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that passes :func:`verify_checkpoint`, and the newer ones that did not.

    Returns:
        ``(path or None, [(corrupt checkpoint, reason), ...])``.
    """
    run_dir = Path(run_dir)
    base = run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else run_dir
    corrupt: list[tuple[Path, str]] = []
    for _, path in reversed(list_checkpoints(base)):
        try:
            verify_checkpoint(path)
        except DataError as err:
            corrupt.append((path, str(err)))
            continue
        return path, corrupt
    return None, corrupt


def _discard(path: Path) -> None:
    """Delete a checkpoint directory: renamed to a hidden name first (atomic), then removed."""
    hidden = path.with_name(f".old-{path.name}-{os.getpid()}")
    try:
        path.rename(hidden)
    except OSError:
        hidden = path
    shutil.rmtree(hidden, ignore_errors=True)


def remove_stale(checkpoint_dir: str | Path) -> None:
    """Remove what a killed process left behind: half-written ``.tmp-checkpoint-*`` and half-deleted
    ``.old-checkpoint-*`` directories. Complete ``checkpoint-{step}`` directories are never touched."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return
    for stale in list(checkpoint_dir.glob(".tmp-checkpoint-*")) + list(checkpoint_dir.glob(".old-checkpoint-*")):
        shutil.rmtree(stale, ignore_errors=True)


def _seal_and_publish(tmp: Path, final: Path, names: list[str], step: int, extra_meta: dict[str, Any]) -> None:
    """fsync and hash the files of ``tmp``, write ``meta.json`` last, then rename ``tmp`` to ``final``.

    An existing ``final`` (the same step written again, e.g. an interrupt right after a periodic save, or the
    previous ``best/``) is renamed to a hidden ``.old-*`` name first and deleted after the swap.
    """
    files = {}
    for name in names:
        _fsync(tmp / name)
        files[name] = _sha256(tmp / name)
    meta = {"step": step, "time": time.time(), "files": files, **extra_meta}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    _fsync(tmp / "meta.json")
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync(final.parent)


def save_checkpoint(checkpoint_dir: str | Path, step: int, model_state: dict[str, torch.Tensor],
                    training_state: dict[str, Any], ema_state: dict[str, torch.Tensor] | None = None,
                    keep_last: int = 0, extra_meta: dict[str, Any] | None = None) -> Path:
    """Write ``checkpoint-{step}`` atomically and prune old checkpoints.

    Args:
        checkpoint_dir: the run's ``checkpoints/`` directory.
        step: number of completed optimizer steps.
        model_state: tensors for ``model.safetensors``.
        training_state: optimizer/scheduler/RNG/extra state for ``training_state.pt``.
        ema_state: tensors for ``ema.safetensors`` or ``None``.
        keep_last: keep only the newest ``keep_last`` checkpoints (0 keeps all).
        extra_meta: JSON-serialisable fields added to ``meta.json``.

    Returns:
        The final checkpoint path.

    Raises:
        CheckpointWriteError: if anything could not be written; the previous checkpoints are intact.
    """
    checkpoint_dir = Path(checkpoint_dir)
    final = checkpoint_dir / f"checkpoint-{step}"
    tmp = checkpoint_dir / f".tmp-checkpoint-{step}-{os.getpid()}"
    try:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        names = ["model.safetensors", "training_state.pt"]
        save_file(_plain_tensors(model_state), str(tmp / "model.safetensors"), metadata={"step": str(step)})
        if ema_state is not None:
            save_file(_plain_tensors(ema_state), str(tmp / "ema.safetensors"), metadata={"step": str(step)})
            names.append("ema.safetensors")
        torch.save(training_state, tmp / "training_state.pt")
        _seal_and_publish(tmp, final, names, step, extra_meta or {})
    except (OSError, RuntimeError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"could not write checkpoint-{step} in {checkpoint_dir}: {err}") from err
    if keep_last > 0:
        for _, path in list_checkpoints(checkpoint_dir)[:-keep_last]:
            _discard(path)
    return final


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check that every file listed in ``meta.json`` exists with its recorded sha256.

    Returns:
        The parsed ``meta.json``.

    Raises:
        DataError: if the checkpoint is incomplete or corrupt.
    """
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{path} is not a complete checkpoint (no meta.json)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        files = meta["files"]
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{meta_path} is corrupt") from None
    for name, digest in files.items():
        if not (path / name).is_file():
            raise DataError(f"checkpoint {path} is missing {name}")
        if _sha256(path / name) != digest:
            raise DataError(f"checkpoint file {path / name} is corrupt (sha256 mismatch)")
    return meta


def load_checkpoint_weights(path: str | Path, filename: str = "model.safetensors") -> dict[str, torch.Tensor]:
    """Load the weights of a checkpoint directory (or a ``.safetensors`` file) on CPU."""
    path = Path(path)
    file = path / filename if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"no weights at {file}")
    try:
        return load_file(str(file))
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise DataError(f"cannot read {file}: {err}") from None


def with_final_ema(module: nn.Module, run_dir: str | Path, strict: bool = True) -> nn.Module:
    """``module`` with the EMA weights of the run's newest checkpoint (a copy), or ``module`` itself when the run
    kept no EMA: what an export writes.

    Args:
        module: the tracked module (``task.student_module()``).
        run_dir: the run directory.
        strict: ``load_state_dict`` strictness (``False`` when the EMA covers only some tensors, e.g. LoRA adapters).
    """
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None or not (ckpt / "ema.safetensors").is_file():
        return module
    averaged = copy.deepcopy(module)
    averaged.load_state_dict(load_checkpoint_weights(ckpt, "ema.safetensors"), strict=strict)
    return averaged


def load_training_state(path: str | Path) -> dict[str, Any]:
    """Load ``training_state.pt`` with ``weights_only=True`` (no arbitrary unpickling)."""
    file = Path(path) / "training_state.pt"
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"checkpoint {path} has no training_state.pt") from None
    except Exception as err:  # UnpicklingError for anything beyond tensors and containers
        raise DataError(f"refusing to load {file}: {str(err).splitlines()[0]}") from None


def save_best(run_dir: str | Path, step: int, model_state: dict[str, torch.Tensor], extra: dict[str, Any],
              metric: str, value: float, mode: str) -> Path:
    """Write ``<run_dir>/best`` atomically (weights, ``training_state.pt`` with the task's extra state only,
    ``meta.json`` with the metric), replacing the previous best only once the new one is complete.

    Raises:
        CheckpointWriteError: if it could not be written; the previous ``best/`` is intact.
    """
    run_dir = Path(run_dir)
    final = run_dir / BEST_DIR
    tmp = run_dir / f".tmp-{BEST_DIR}-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_file(_plain_tensors(model_state), str(tmp / "model.safetensors"), metadata={"step": str(step)})
        torch.save({"step": step, "extra": extra}, tmp / "training_state.pt")
        _seal_and_publish(tmp, final, ["model.safetensors", "training_state.pt"], step,
                          {"metric": metric, "value": float(value), "mode": mode})
    except (OSError, RuntimeError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"could not write {final}: {err}") from err
    return final


def read_best(run_dir: str | Path) -> dict[str, Any] | None:
    """``best/meta.json`` of a run (step, metric, value, mode), or ``None`` when it keeps no best."""
    path = Path(run_dir) / BEST_DIR / "meta.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise DataError(f"{path} is corrupt") from None


def selected_checkpoint(run_dir: str | Path) -> Path | None:
    """The weights a run's evaluation and export use: ``best/`` when the run selects one, else the latest."""
    run_dir = Path(run_dir)
    if read_best(run_dir) is not None:
        return run_dir / BEST_DIR
    return latest_checkpoint(run_dir)
