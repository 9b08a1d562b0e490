"""Variance-preserving noise schedule on float timesteps, gathered from a diffusers ``alphas_cumprod``.

BOOT needs per-sample (t, s) pairs, fractional timesteps and a virtual clean index ``-1``
(α = 1, σ = 0), none of which ``DDIMScheduler.step`` supports (one scalar timestep per batch, fixed
``prev = t - N/n``). So the coefficients are gathered here, in float64, from the scheduler's own
``alphas_cumprod`` table (the approach of diffusers' LCM distillation scripts).

Timesteps are in index units: ``t ∈ [-1, N-1]`` where ``N = num_train_timesteps`` and ``-1`` is the
clean endpoint (the ``set_alpha_to_one=True`` / ``final_alpha_cumprod`` of diffusers' DDIM).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

__all__ = ["NoiseSchedule", "ddim_timesteps", "as_timesteps"]


def as_timesteps(t: torch.Tensor | float | int, batch: int, device: torch.device,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-sample float timesteps ``[B]``: UNet2DModel truncates Python scalars to ``long``."""
    t = torch.as_tensor(t, device=device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
    return t.to(dtype)


class NoiseSchedule(nn.Module):
    """α_t, σ_t, λ_t = log(σ_t/α_t) of a VP process on per-sample float timesteps.

    Args:
        alphas_cumprod: ``[N]`` the scheduler's ᾱ table (any float dtype; cast to float64).
        interp: how fractional timesteps are interpolated between neighbouring indices:
            ``"lambda"`` (λ linear, then α² = sigmoid(-2λ)) or ``"index"`` (ᾱ linear).
    """

    def __init__(self, alphas_cumprod: torch.Tensor, interp: Literal["lambda", "index"] = "lambda"):
        super().__init__()
        if alphas_cumprod.ndim != 1 or alphas_cumprod.numel() < 2:
            raise ValueError(f"alphas_cumprod must be 1-D with >= 2 entries, got shape {tuple(alphas_cumprod.shape)}")
        if interp not in ("lambda", "index"):
            raise ValueError(f"interp must be 'lambda' or 'index', got {interp!r}")
        acp = alphas_cumprod.detach().to(torch.float64).cpu()
        # non-persistent: rebuilt from the teacher's scheduler config, never checkpointed
        self.register_buffer("alphas_cumprod", acp, persistent=False)
        self.interp = interp

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.numel())

    @property
    def T(self) -> int:
        """Index of the pure-noise end, ``N - 1``."""
        return self.num_train_timesteps - 1

    @property
    def zero_terminal_snr(self) -> bool:
        return bool(self.alphas_cumprod[-1] <= 0)

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ at float timesteps ``t [B]`` (index units; ``t < 0`` → 1, the clean endpoint). Float64 ``[B]``."""
        t = t.to(device=self.alphas_cumprod.device, dtype=torch.float64)
        acp = self.alphas_cumprod
        tc = t.clamp(0.0, float(self.T))
        lo = tc.floor().long()
        hi = (lo + 1).clamp(max=self.T)
        frac = tc - lo.to(torch.float64)
        a_lo, a_hi = acp[lo], acp[hi]
        linear = a_lo + frac * (a_hi - a_lo)
        if self.interp == "lambda":
            # λ-linear interpolation; where an end has ᾱ = 0 (zero terminal SNR) λ = ∞, fall back to ᾱ-linear
            finite = (a_lo > 0) & (a_hi > 0) & (a_lo < 1) & (a_hi < 1)
            safe_lo = torch.where(finite, a_lo, torch.full_like(a_lo, 0.5))
            safe_hi = torch.where(finite, a_hi, torch.full_like(a_hi, 0.5))
            lam = (1 - frac) * _half_log_snr_inv(safe_lo) + frac * _half_log_snr_inv(safe_hi)
            interp = torch.sigmoid(-2.0 * lam)
            abar = torch.where(finite & (frac > 0), interp, linear)
        else:
            abar = linear
        return torch.where(t < 0, torch.ones_like(abar), abar)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(α_t, σ_t)`` float64 ``[B]`` at float timesteps ``t [B]``; ``t < 0`` gives (1, 0)."""
        abar = self.alpha_bar(t)
        return abar.sqrt(), (1.0 - abar).clamp(min=0.0).sqrt()

    def lam(self, t: torch.Tensor) -> torch.Tensor:
        """Half log-SNR-inverse λ_t = log(σ_t/α_t), increasing in t; -inf at the clean endpoint. ``[B]``."""
        abar = self.alpha_bar(t)
        return 0.5 * (torch.log1p(-abar) - torch.log(abar))

    def delta(self, t: torch.Tensor, s: torch.Tensor, mode: Literal["exact", "first_order"] = "exact") -> torch.Tensor:
        """The signal-space DDIM coefficient Δ(t, s) for a step t → s < t. Float64 ``[B]``.

        ``exact``: ``1 - (σ_s·α_t)/(α_s·σ_t)``, computed from the ratio so that α_t = 0 (zero terminal
        SNR) and σ_s = 0 (clean endpoint) both give exactly 1. ``first_order``: ``λ_t - λ_s``, with the
        same two limits set to 1.
        """
        a_t, s_t = self.alpha_sigma(t)
        a_s, s_s = self.alpha_sigma(s)
        if mode == "exact":
            out = 1.0 - (s_s * a_t) / (a_s * s_t)
        elif mode == "first_order":
            out = self.lam(t) - self.lam(s)
        else:
            raise ValueError(f"mode must be 'exact' or 'first_order', got {mode!r}")
        return torch.where((s_s <= 0) | (a_t <= 0), torch.ones_like(out), out)

    def extra_repr(self) -> str:
        return f"num_train_timesteps={self.num_train_timesteps}, interp={self.interp!r}"


def _half_log_snr_inv(abar: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.log1p(-abar) - torch.log(abar))


def ddim_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """DDIM timesteps with diffusers' ``"trailing"`` spacing, followed by the clean endpoint ``-1``.

    ``trailing`` starts at the pure-noise end ``N-1`` for every ``steps`` (``leading`` would start
    DDIM-1 at t = 0), so DDIM-K and the BOOT student read the same ε at the same time T. With
    N = 1000 and δ = 20, DDIM-50 visits 999, 979, ..., 19, -1: the BOOT fixed-point chain.

    Returns:
        ``steps + 1`` integers, strictly decreasing, ending with ``-1``.
    """
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    ratio = num_train_timesteps / steps
    ts = [int(round(num_train_timesteps - i * ratio)) - 1 for i in range(steps)]
    return ts + [-1]
