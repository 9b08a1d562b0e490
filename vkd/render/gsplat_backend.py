"""gsplat backend: thin wrapper around ``gsplat.rasterization`` plus the eligibility rules of spec §4.3.

gsplat is only *eligible* when CUDA is available, every input tensor is on a CUDA device and ``gsplat`` imports.
A successful ``import gsplat`` proves nothing (the wheel ships CUDA sources only and JIT-compiles them at the first
CUDA op), so the first call is the real test: with ``backend="auto"`` a failure there is reported once and the torch
backend is used for the rest of the process. CPU tensors never reach gsplat, so CPU runs never start its JIT.
"""

from __future__ import annotations

import importlib
import warnings

import torch
from torch import Tensor

__all__ = ["gsplat_eligible", "gsplat_rasterize", "gsplat_status", "GSPLAT_BUILD_ERRORS"]

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


def disable_gsplat(err: BaseException) -> None:
    """Disable gsplat for this process after a failed first call, warning once with the original error."""
    reason = f"{type(err).__name__}: {err}".strip().splitlines()[0][:500]
    if _STATE["status"] is None:
        warnings.warn(
            f"vkd.render: gsplat backend failed on its first call ({reason}); "
            "falling back to the torch backend for the rest of this process.",
            RuntimeWarning,
            stacklevel=3,
        )
    _STATE["status"] = reason
