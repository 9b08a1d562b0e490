"""Exponential moving average of a module's floating-point state."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """``ema ← decay·ema + (1−decay)·current`` for every floating tensor of ``module.state_dict()``.

    Non-floating buffers (counters) are copied. The EMA lives on the module's device.

    Args:
        module: the tracked module.
        decay: EMA decay in (0, 1).
        keys: the state-dict keys to track (e.g. a LoRA student's adapters; frozen weights need no
            average); ``None``: all.
    """

    def __init__(self, module: nn.Module, decay: float, keys: list[str] | None = None):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        state = module.state_dict()
        if keys is not None:
            missing = [k for k in keys if k not in state]
            if missing:
                raise KeyError(f"EMA keys not in the module's state dict: {missing[:3]}")
            state = {k: state[k] for k in keys}
        self.partial = keys is not None
        self.shadow = {k: v.detach().clone() for k, v in state.items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        current = module.state_dict()
        floats_ema, floats_cur = [], []
        for key, shadow in self.shadow.items():
            value = current[key]
            if value.dtype.is_floating_point:
                floats_ema.append(shadow)
                floats_cur.append(value.detach().to(shadow.dtype))
            else:
                shadow.copy_(value)
        if floats_ema:
            torch._foreach_lerp_(floats_ema, floats_cur, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            self.shadow[key].copy_(value)

    @contextlib.contextmanager
    def swapped_into(self, module: nn.Module) -> Iterator[None]:
        """Temporarily load the EMA weights into ``module`` (for sampling/evaluation)."""
        backup = {k: v.detach().clone() for k, v in module.state_dict().items() if k in self.shadow}
        module.load_state_dict(self.shadow, strict=not self.partial)
        try:
            yield
        finally:
            module.load_state_dict(backup, strict=not self.partial)
