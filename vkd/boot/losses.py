"""BOOT losses: signal-space DDIM step, bootstrapping loss L_BS and boundary loss L_BC.

Functional forms take tensors; :class:`BootLoss` composes them with a teacher and a student into one
training objective ``L = L_BS + β_BC·L_BC`` (spec boot.md §4-§6, §11):

- bootstrapping target ``SG[y_t + Δ(t,s)·(f̃(α_t y_t + σ_t ε, t, c) − y_t)]`` with ``y_t = SG[g(ε,t,c)]``,
  i.e. one teacher DDIM step t → s written in signal space (no EMA target: the online student);
- gradients flow only through ``g(ε, s, c)`` (and ``g(ε, T, c)`` in the boundary loss);
- boundary target ``f̃(ε, T, c)`` (``teacher``) or the exact DDIM-from-ε signal ``α_T/(1+σ_T)·ε``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from vkd.boot.schedule import NoiseSchedule
from vkd.boot.teacher import DiffusionTeacher, _bcast

__all__ = [
    "ddim_step",
    "signal_ddim_step",
    "exact_boundary_target",
    "bootstrap_weights",
    "x0_gain",
    "x0_gain_weight",
    "resolve_time_weight",
    "bootstrap_loss",
    "boundary_loss",
    "BootstrapLoss",
    "BoundaryLoss",
    "BootLoss",
    "forward_diffuse",
    "denoising_loss",
]


def forward_diffuse(x0: torch.Tensor, alphas_cumprod: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """DDPM's forward process for teacher training: ``x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε`` at uniform integer ``t``.

    Draws ``ε`` then ``t`` from the global RNG (in that order: resumed runs replay it).

    Args:
        x0: ``[B, C, H, W]`` clean samples.
        alphas_cumprod: ``[N]`` ᾱ of the training schedule.

    Returns:
        ``(x_t, t [B], ε, ᾱ_t [B, 1, 1, 1])``.
    """
    B = x0.shape[0]
    noise = torch.randn_like(x0)
    t = torch.randint(0, alphas_cumprod.numel(), (B,), device=x0.device)
    acp = alphas_cumprod[t].view(B, 1, 1, 1)
    return acp.sqrt() * x0 + (1 - acp).sqrt() * noise, t, noise, acp


def denoising_loss(out: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, acp: torch.Tensor,
                   prediction_type: str, snr_gamma: float = 0.0) -> torch.Tensor:
    """The diffusion training loss: mean squared error to the ``prediction_type`` target (``epsilon`` → ε,
    ``sample`` → x0, ``v_prediction`` → √ᾱ·ε − √(1−ᾱ)·x0), min-SNR-γ weighted when ``snr_gamma > 0``.

    Args:
        out: ``[B, C, H, W]`` network output; ``x0``, ``noise``: the same shape; ``acp``: ``[B, 1, 1, 1]`` ᾱ_t.
    """
    a, s = acp.sqrt(), (1 - acp).sqrt()
    target = {"epsilon": noise, "sample": x0, "v_prediction": a * noise - s * x0}[prediction_type]
    per = (out - target).pow(2).flatten(1).mean(1)  # [B]
    if snr_gamma > 0:
        snr = (acp / (1 - acp)).flatten()
        # min-SNR-γ weights expressed for each prediction target
        w = {"epsilon": torch.clamp(snr_gamma / snr, max=1.0), "sample": torch.clamp(snr, max=snr_gamma),
             "v_prediction": torch.clamp(snr, max=snr_gamma) / (snr + 1)}[prediction_type]
        per = per * w
    return per.mean()


def ddim_step(x_t: torch.Tensor, x0: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor,
              alpha_s: torch.Tensor, sigma_s: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM step t → s in x-space: ``α_s·x0 + σ_s·(x_t − α_t·x0)/σ_t``.

    Args:
        x_t: ``[B, C, H, W]`` state at t.
        x0: ``[B, C, H, W]`` x0 prediction at (x_t, t) (ε is recomputed from it, i.e. diffusers'
            ``use_clipped_model_output=True`` when x0 was clipped).
        alpha_t, sigma_t, alpha_s, sigma_s: ``[B]`` schedule coefficients.

    Returns:
        ``[B, C, H, W]`` x_s.
    """
    eps = (x_t - _bcast(alpha_t, x_t) * x0) / _bcast(sigma_t, x_t)
    return _bcast(alpha_s, x_t) * x0 + _bcast(sigma_s, x_t) * eps


def signal_ddim_step(y_t: torch.Tensor, x0: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The same DDIM step in signal space: ``y_s = y_t + Δ(t,s)·(f − y_t)``.

    Args:
        y_t: ``[B, C, H, W]`` signal ``(x_t − σ_t ε)/α_t``.
        x0: ``[B, C, H, W]`` teacher x0 prediction f at (x_t, t).
        delta: ``[B]`` coefficient Δ(t, s) (:meth:`NoiseSchedule.delta`).
    """
    return y_t + _bcast(delta, y_t) * (x0 - y_t)


def exact_boundary_target(eps: torch.Tensor, alpha_T: torch.Tensor, sigma_T: torch.Tensor) -> torch.Tensor:
    """Exact DDIM-from-ε signal at T, ``(1 − σ_T)/α_T·ε = α_T/(1 + σ_T)·ε`` (stable as α_T → 0). ``[B, ...]``."""
    return _bcast(alpha_T / (1.0 + sigma_T), eps) * eps


def x0_gain(schedule: NoiseSchedule, prediction_type: str, t: torch.Tensor) -> torch.Tensor:
    """Gain ``k_t = |∂x0/∂out|`` of a teacher's x0 on an error of its raw output: ``σ_t/α_t`` (ε), ``σ_t`` (v),
    1 (x0), at float timesteps ``t [B]`` (``t < 0``: index 0). ``[B]`` float64."""
    a, s = schedule.alpha_sigma(t.clamp(min=0.0))
    if prediction_type == "epsilon":
        return s / a
    if prediction_type == "v_prediction":
        return s
    return torch.ones_like(a)


def x0_gain_weight(schedule: NoiseSchedule, prediction_type: str, t: torch.Tensor, cutoff: float = 2.0
                   ) -> torch.Tensor:
    """``w_t = 1 / (1 + (k_t / e^λc)²)`` with ``k_t`` = :func:`x0_gain`, ``λc`` = ``cutoff``. ``[B]`` float64.

    Why: an ε teacher's x0 is ``(x − σ·ε̂)/α``, so near T (k_t ≈ 157 on DDPM's linear β) it carries the
    error of ε̂ × 157 (clipped to ±1): bootstrap targets there are mostly noise the student cannot fit, while
    the image hardly depends on them (x_t = α_t·y_t + σ_t·ε sees them × α_t). ``w_t`` lowers those steps,
    and is ≈ 1 wherever ``k_t ≪ e^λc`` (every t of a v or x0 teacher).
    """
    k = x0_gain(schedule, prediction_type, t)
    return 1.0 / (1.0 + (k / math.exp(cutoff)) ** 2)


def resolve_time_weight(time_weight: str, prediction_type: str) -> str:
    """``auto`` → ``inv_x0_gain`` for ε teachers (their x0 gain reaches σ_T/α_T), ``uniform`` otherwise."""
    if time_weight == "auto":
        return "inv_x0_gain" if prediction_type == "epsilon" else "uniform"
    return time_weight


def bootstrap_weights(delta: torch.Tensor, delta_steps: torch.Tensor,
                      weighting: Literal["inv_delta_lambda_sq", "inv_delta_sq", "none"] = "inv_delta_lambda_sq"
                      ) -> torch.Tensor:
    """Per-sample weight w of L_BS. ``[B]`` float64.

    Args:
        delta: ``[B]`` Δ(t, s) used in the target (1/Δ² makes the residual a derivative mismatch).
        delta_steps: ``[B]`` δ = t − s in timestep units.
        weighting: ``inv_delta_lambda_sq`` (1/Δ²) | ``inv_delta_sq`` (1/δ²) | ``none``.
    """
    if weighting == "inv_delta_lambda_sq":
        return 1.0 / delta.to(torch.float64) ** 2
    if weighting == "inv_delta_sq":
        return 1.0 / delta_steps.to(torch.float64) ** 2
    if weighting == "none":
        return torch.ones_like(delta, dtype=torch.float64)
    raise ValueError(f"unknown weighting {weighting!r}")


def bootstrap_loss(pred_s: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``mean_batch(w · mean_pixels((g(ε,s) − target)²))``; the target is detached here as well.

    Args:
        pred_s: ``[B, C, H, W]`` student signal at s (carries the gradient).
        target: ``[B, C, H, W]`` bootstrapped target.
        weight: ``[B]`` per-sample weights or ``None`` (1).

    Returns:
        scalar loss in ``pred_s``'s dtype.
    """
    if pred_s.shape != target.shape:
        raise ValueError(f"pred_s {tuple(pred_s.shape)} and target {tuple(target.shape)} must match")
    per_sample = (pred_s - target.detach()).pow(2).flatten(1).mean(1)  # [B]
    if weight is not None:
        per_sample = per_sample * weight.to(device=pred_s.device, dtype=pred_s.dtype)
    return per_sample.mean()


def boundary_loss(pred_T: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE between the student at T and the boundary target (detached). Scalar."""
    if pred_T.shape != target.shape:
        raise ValueError(f"pred_T {tuple(pred_T.shape)} and target {tuple(target.shape)} must match")
    return (pred_T - target.detach()).pow(2).mean()


class BootstrapLoss(nn.Module):
    """Module form of :func:`bootstrap_loss` with the weighting option."""

    def __init__(self, weighting: str = "inv_delta_lambda_sq"):
        super().__init__()
        self.weighting = weighting

    def forward(self, pred_s: torch.Tensor, target: torch.Tensor, delta: torch.Tensor,
                delta_steps: torch.Tensor) -> torch.Tensor:
        return bootstrap_loss(pred_s, target, bootstrap_weights(delta, delta_steps, self.weighting))


class BoundaryLoss(nn.Module):
    """Module form of :func:`boundary_loss`."""

    def forward(self, pred_T: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return boundary_loss(pred_T, target)


class BootLoss(nn.Module):
    """The full BOOT objective for a teacher and a student (spec §11, step 3-4).

    Args:
        teacher: frozen :class:`DiffusionTeacher` (CFG and clipping inside).
        delta_lambda: ``exact`` | ``first_order`` coefficient Δ.
        weighting: see :func:`bootstrap_weights`.
        time_weight: ``"uniform"``, ``"inv_x0_gain"`` (:func:`x0_gain_weight`), ``"auto"``
            (:func:`resolve_time_weight`) or a callable ``w(t [B]) -> [B]``, multiplying the L_BS weights.
        x0_gain_cutoff: λc of ``inv_x0_gain``.
        boundary_target: ``teacher`` | ``exact``.
        boundary_weight: β_BC.

    Examples:
        >>> teacher = load_diffusers_teacher("runs/boot-teacher/digits/teacher")  # doctest: +SKIP
        >>> student = BootStudent.from_teacher(teacher, "teacher_to_x0", -1.0)  # doctest: +SKIP
        >>> eps = torch.randn(8, *teacher.sample_shape)  # [B, C, H, W]  # doctest: +SKIP
        >>> t = torch.full((8,), 500.0, dtype=torch.float64)  # [B] float timesteps
        >>> losses = BootLoss(teacher)(student, eps, t, t - 20, None)  # doctest: +SKIP
        >>> losses["loss"].backward()  # L_BS + β_BC · L_BC, gradients on the student only  # doctest: +SKIP
    """

    def __init__(self, teacher: DiffusionTeacher, delta_lambda: str = "exact", weighting: str = "inv_delta_lambda_sq",
                 time_weight: str | Callable[[torch.Tensor], torch.Tensor] = "uniform",
                 boundary_target: str = "teacher", boundary_weight: float = 0.1, x0_gain_cutoff: float = 2.0):
        super().__init__()
        if delta_lambda not in ("exact", "first_order"):
            raise ValueError(f"delta_lambda must be 'exact' or 'first_order', got {delta_lambda!r}")
        if boundary_target not in ("teacher", "exact"):
            raise ValueError(f"boundary_target must be 'teacher' or 'exact', got {boundary_target!r}")
        if not (time_weight in ("auto", "uniform", "inv_x0_gain") or callable(time_weight)):
            raise ValueError(f"time_weight must be 'auto', 'uniform', 'inv_x0_gain' or a callable, got {time_weight!r}")
        self.teacher = teacher
        self.delta_lambda = delta_lambda
        self.bootstrap = BootstrapLoss(weighting)
        self.boundary = BoundaryLoss()
        self.time_weight = time_weight if callable(time_weight) else resolve_time_weight(time_weight,
                                                                                         teacher.prediction_type)
        self.x0_gain_cutoff = float(x0_gain_cutoff)
        self.boundary_target = boundary_target
        self.boundary_weight = float(boundary_weight)

    def targets(self, student: nn.Module, eps: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                class_labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """No-grad part: ``y_t``, ``x_hat``, ``f_t``, ``delta``, ``target`` and ``boundary`` (all detached)."""
        sched = self.teacher.schedule
        B = eps.shape[0]
        T = torch.full((B,), float(sched.T), dtype=torch.float64, device=t.device)
        with torch.no_grad():
            y_t = student(eps, t, class_labels)
            a_t, s_t = sched.alpha_sigma(t)
            x_hat = _bcast(a_t, eps) * y_t + _bcast(s_t, eps) * eps
            if self.boundary_target == "teacher":
                # one batched teacher forward over [x̂_t ; ε] at [t ; T]
                c2 = None if class_labels is None else torch.cat([class_labels, class_labels])
                f = self.teacher(torch.cat([x_hat, eps]), torch.cat([t, T]), c2)
                f_t, b = f[:B], f[B:]
            else:
                f_t = self.teacher(x_hat, t, class_labels)
                a_T, s_T = sched.alpha_sigma(T)
                b = exact_boundary_target(eps, a_T, s_T)
            delta = sched.delta(t, s, self.delta_lambda)
            target = signal_ddim_step(y_t, f_t, delta)
        return {"y_t": y_t, "x_hat": x_hat, "f_t": f_t, "delta": delta, "target": target, "boundary": b}

    def forward(self, student: nn.Module, eps: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Losses for one batch.

        Args:
            student: the BOOT student ``g(ε, t, c)`` (a :class:`~vkd.boot.student.BootStudent`).
            eps: ``[B, C, H, W]`` noise.
            t: ``[B]`` float64 timesteps (index units).
            s: ``[B]`` float64 timesteps ``t − δ`` (``-1`` is the clean endpoint).
            class_labels: ``[B]`` int64 or ``None``.

        Returns:
            ``{"loss", "bootstrap", "boundary", "out_rms_s", "out_rms_T", "delta_mean"}`` scalars.
        """
        sched = self.teacher.schedule
        B = eps.shape[0]
        tg = self.targets(student, eps, t, s, class_labels)
        T = torch.full((B,), float(sched.T), dtype=torch.float64, device=t.device)
        # one grad forward of the student over [s ; T]
        c2 = None if class_labels is None else torch.cat([class_labels, class_labels])
        eps2, ts2 = torch.cat([eps, eps]), torch.cat([s, T])
        raw = student.raw(eps2, ts2, c2) if hasattr(student, "raw") else None
        g = student.signal(raw, eps2, ts2) if raw is not None else student(eps2, ts2, c2)
        g_s, g_T = g[:B], g[B:]
        w = bootstrap_weights(tg["delta"], (t - s), self.bootstrap.weighting)
        if self.time_weight == "inv_x0_gain":
            w = w * x0_gain_weight(sched, self.teacher.prediction_type, t, self.x0_gain_cutoff).to(w)
        elif self.time_weight != "uniform":
            w = w * self.time_weight(t).to(w)
        l_bs = bootstrap_loss(g_s, tg["target"], w)
        l_bc = self.boundary(g_T, tg["boundary"])
        out = {"loss": l_bs + self.boundary_weight * l_bc, "bootstrap": l_bs.detach(), "boundary": l_bc.detach(),
               "delta_mean": tg["delta"].mean().to(l_bs.dtype)}
        if raw is not None:
            r = raw.detach().flatten(1).pow(2).mean(1).sqrt()
            out["out_rms_s"], out["out_rms_T"] = r[:B].mean(), r[B:].mean()
        return out
