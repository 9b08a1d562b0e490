"""Build-once caches: one cache root, a cross-process lock, a training-safe autograd mode and atomic writes.

Every artefact vkd builds on first use and then reuses (the digits CNN of ``vkd fid``, tiny CLIPs, synthetic
scenes and crowds, teacher-feature and density caches) goes through :func:`build_once`, so it works from an
empty cache whatever the caller's state:

* **autograd**: a builder that trains runs under ``torch.enable_grad()`` and outside ``inference_mode``, even
  when the first use comes from a ``@torch.no_grad()`` evaluation (the cold-start bug of the last review);
* **concurrency**: two processes that build the same artefact at once (two test workers, two ranks of
  ``torchrun``) serialise on a ``filelock`` lock next to it; the second finds it complete and reuses it;
* **interruption**: results are written to a temporary name and renamed, so a reader never sees half a file.

Examples:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "weights.pt"
    >>> def train() -> None:  # called at most once, with gradients on
    ...     w = torch.zeros(3, requires_grad=True)
    ...     (w - 1).square().sum().backward()
    ...     atomic_torch_save({"w": w.grad}, path)
    >>> with torch.no_grad():
    ...     build_once(path, path.is_file, train)
    >>> torch.load(path)["w"].tolist()
    [-2.0, -2.0, -2.0]
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from filelock import FileLock

__all__ = ["cache_dir", "build_lock", "training_mode", "build_once", "atomic_torch_save", "atomic_write_text",
           "tmp_path"]

T = TypeVar("T")

# A build that holds the lock longer than this is treated as dead by the waiting process (seconds).
_LOCK_TIMEOUT = 3600.0


def cache_dir() -> Path:
    """The cache root: ``$VKD_CACHE_DIR``, else ``$XDG_CACHE_HOME/vkd``, else ``~/.cache/vkd``."""
    if os.environ.get("VKD_CACHE_DIR"):
        return Path(os.environ["VKD_CACHE_DIR"]).expanduser().absolute()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser().absolute() / "vkd"


def tmp_path(path: Path) -> Path:
    """A per-process temporary sibling of ``path`` (same suffix, so ``np.save`` keeps the name)."""
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


@contextlib.contextmanager
def build_lock(path: str | Path, timeout: float = _LOCK_TIMEOUT) -> Iterator[None]:
    """Hold the cross-process lock ``<path>.lock`` (the parent directory is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_name(path.name + ".lock")), timeout=timeout):
        yield


@contextlib.contextmanager
def training_mode() -> Iterator[None]:
    """Gradients on and inference mode off, whatever the caller set: for builders that train.

    Usable as a context manager or as a decorator (``@training_mode()``)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def build_once(path: str | Path, is_ready: Callable[[], bool], build: Callable[[], T]) -> T | None:
    """Run ``build`` unless ``is_ready()``; safe under ``no_grad``/``inference_mode`` and across processes.

    Args:
        path: the artefact (file or directory); the lock is ``<path>.lock``.
        is_ready: whether a complete artefact is already there (checked again once the lock is held).
        build: writes the artefact atomically; runs under :func:`training_mode`.

    Returns:
        what ``build`` returned, or ``None`` when the artefact was already there.
    """
    if is_ready():
        return None
    with build_lock(path):
        if is_ready():  # another process built it while this one waited
            return None
        with training_mode():
            return build()


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary name, then rename: readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        torch.save(obj, str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or an interrupt leaves no temporary file behind
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary name, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
