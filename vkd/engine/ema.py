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
    """

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        current = module.state_dict()
        floats_ema, floats_cur = [], []
        for key, value in current.items():
            shadow = self.shadow[key]
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
        backup = {k: v.detach().clone() for k, v in module.state_dict().items()}
        module.load_state_dict(self.shadow)
        try:
            yield
        finally:
            module.load_state_dict(backup)
