"""gsplat backend: thin wrapper around ``gsplat.rasterization`` plus the eligibility rules of spec §4.3.

gsplat is only *eligible* when CUDA is available, every input tensor is on a CUDA device and ``gsplat`` imports.
A successful ``import gsplat`` proves nothing (the wheel ships CUDA sources only and JIT-compiles them at the first
CUDA op), so the first call is the real test. With ``backend="auto"`` on CUDA inputs, a failure there (or gsplat not
importing) raises :class:`GsplatUnavailable` with the cause and the way out (``backend="torch"``): the torch
rasterizer is 10-100x slower on a GPU, so a silent fallback would turn a training run into days. CUDA out-of-memory
is re-raised as it is (never a reason to disable gsplat). CPU tensors never reach gsplat, so CPU runs never start its
JIT, and ``auto`` on CPU is the torch backend.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from vkd.errors import UserError

__all__ = ["gsplat_eligible", "gsplat_rasterize", "gsplat_status", "GSPLAT_BUILD_ERRORS", "GsplatUnavailable",
           "cuda_inputs", "unavailable_message"]

# Errors seen when the extension cannot be built or loaded (spec §4.2).
GSPLAT_BUILD_ERRORS = (AttributeError, IndexError, RuntimeError, ImportError, OSError)

# None: not tried yet; True: one call succeeded; str: disabled for this process, with the reason.
_STATE: dict[str, object] = {"status": None}


def gsplat_status() -> object:
    """``None`` (untested), ``True`` (worked) or the reason string it was disabled with."""
    return _STATE["status"]


def _reset_gsplat_status() -> None:
    """Forget the outcome of earlier calls (tests)."""
    _STATE["status"] = None


def gsplat_eligible(tensors: list[Tensor | None]) -> tuple[bool, str]:
    """Whether gsplat may be tried for these inputs, and why not.

    Args:
        tensors: every tensor input of the call (None entries are ignored).

    Returns:
        ``(eligible, reason)``; ``reason`` is empty when eligible.
    """
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False"
    devs = {str(t.device) for t in tensors if t is not None}
    if not all(t.is_cuda for t in tensors if t is not None):
        return False, f"inputs are not all on CUDA (devices: {sorted(devs)})"
    try:
        importlib.import_module("gsplat")
    except Exception as e:  # noqa: BLE001 - any import failure makes gsplat ineligible
        return False, f"import gsplat failed: {type(e).__name__}: {e}"
    if _STATE["status"] not in (None, True):
        return False, f"gsplat disabled earlier in this process: {_STATE['status']}"
    return True, ""


def gsplat_rasterize(**kwargs):
    """Call ``gsplat.rasterization`` (unpacked) and record that it worked.

    Raises whatever gsplat raises; the caller decides whether to fall back.
    """
    import gsplat  # on use: the optional CUDA backend; its import takes seconds

    out = gsplat.rasterization(packed=False, **kwargs)
    _STATE["status"] = True
    return out


class GsplatUnavailable(UserError, RuntimeError):
    """``backend="auto"`` got CUDA inputs but gsplat cannot render them (the message names the cause; the CLI
    prints it as one line, exit code 2)."""


def cuda_inputs(tensors: list[Tensor | None]) -> bool:
    """Whether every given tensor is on a CUDA device."""
    present = [t for t in tensors if t is not None]
    return bool(present) and all(t.is_cuda for t in present)


def _reason(err: BaseException | str) -> str:
    text = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    lines = text.strip().splitlines()
    return (lines[0] if lines else type(err).__name__)[:500]


def unavailable_message(err: BaseException | str) -> str:
    """One line: why gsplat cannot render on this GPU, and how to use the torch rasterizer instead."""
    return (f"gsplat cannot rasterize on this GPU ({_reason(err)}); fix the gsplat install (scripts/gpu_wheels.sh) "
            "or set backend='torch' (model.backend=torch) to use vkd's torch rasterizer, 10-100x slower")


def disable_gsplat(err: BaseException) -> None:
    """Remember for this process that gsplat's first call failed, with the original error."""
    _STATE["status"] = _reason(err)
