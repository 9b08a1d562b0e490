"""Sampling: one-step BOOT student, teacher DDIM with K steps, per-sample seeded noise, PNG grids.

Every sample's noise (and class) is drawn from its own ``torch.Generator`` seeded by
``(seed, global index)``, so a sample set is the same whatever the batch size or number of processes,
and student and teacher can be compared on the same ε.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid, save_image

from vkd.boot.losses import ddim_step, exact_boundary_target, signal_ddim_step
from vkd.boot.schedule import ddim_timesteps
from vkd.boot.student import BootStudent
from vkd.boot.teacher import DiffusionTeacher

__all__ = [
    "sample_seed",
    "sample_generator",
    "noise_for_indices",
    "ddim_sample",
    "student_sample",
    "save_grid",
    "save_images",
    "noise_batches",
    "boot_reference_chain",
]


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed that depends on ``(seed, index)`` only."""
    digest = hashlib.blake2b(f"boot/{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample_generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(sample_seed(seed, index))


def noise_for_indices(indices: torch.Tensor | list[int] | range, seed: int, shape: tuple[int, ...],
                      num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-sample noise ``[B, *shape]`` and balanced classes ``index % num_classes`` ``[B]`` (or ``None``)."""
    idx = [int(i) for i in indices]
    eps = torch.stack([torch.randn(shape, generator=sample_generator(seed, i)) for i in idx]) if idx \
        else torch.empty(0, *shape)
    labels = None if num_classes is None else torch.tensor([i % num_classes for i in idx], dtype=torch.long)
    return eps, labels


def noise_batches(num: int, seed: int, shape: tuple[int, ...], num_classes: int | None, batch_size: int,
                  device: str | torch.device = "cpu", indices: list[int] | range | None = None
                  ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """Batches of :func:`noise_for_indices` on ``device``: ``(start, ε [b, *shape], classes [b] | None)``.

    Sample ``indices[k]`` (default ``k``, for ``k < num``) always gets the same noise and class, whatever the
    batch size: every generator of a comparison (student, teacher DDIM-K, FID, image folders) reads the same ε.
    """
    idx = list(range(num)) if indices is None else list(indices)
    for start in range(0, len(idx), batch_size):
        eps, labels = noise_for_indices(idx[start:start + batch_size], seed, shape, num_classes)
        yield start, eps.to(device), None if labels is None else labels.to(device)


@torch.no_grad()
def ddim_sample(teacher: DiffusionTeacher, eps: torch.Tensor, class_labels: torch.Tensor | None = None,
                steps: int = 50, clamp: bool = True) -> torch.Tensor:
    """Deterministic DDIM (η = 0) with ``steps`` teacher evaluations from ``x_T = ε``.

    Uses diffusers' ``trailing`` spacing ending at the clean endpoint (``set_alpha_to_one``), and the
    teacher's (guided, optionally clipped) x0 with ε recomputed from it.

    Args:
        teacher: the x0 predictor.
        eps: ``[B, C, H, W]`` initial noise.
        class_labels: ``[B]`` or ``None``.
        steps: number of teacher evaluations K.
        clamp: images clamped to [-1, 1] (a latent teacher's latents decoded first); else the raw final state.

    Returns:
        ``[B, C, H, W]`` samples.
    """
    sched = teacher.schedule
    ts = ddim_timesteps(sched.num_train_timesteps, steps)
    x = eps
    B = eps.shape[0]
    for t, s in zip(ts[:-1], ts[1:], strict=True):
        tt = torch.full((B,), float(t), dtype=torch.float64, device=eps.device)
        ss = torch.full((B,), float(s), dtype=torch.float64, device=eps.device)
        x0 = teacher(x, tt, class_labels)
        a_t, s_t = sched.alpha_sigma(tt)
        a_s, s_s = sched.alpha_sigma(ss)
        x = ddim_step(x, x0, a_t, s_t, a_s, s_s)
    return teacher.decode(x).clamp(-1.0, 1.0) if clamp else x


@torch.no_grad()
def student_sample(student: BootStudent, eps: torch.Tensor, class_labels: torch.Tensor | None = None,
                   clamp: bool = True) -> torch.Tensor:
    """One-step sample ``g(ε, t_sample, c)`` ``[B, C, H, W]``."""
    return student.generate(eps, class_labels, clamp=clamp)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float ``[B, C, H, W]`` → uint8 RGB ``[B, 3, H, W]`` (round half up, as in PNG export)."""
    x = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5 + 0.5).floor().clamp(0, 255).to(torch.uint8)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 10, scale: int = 2) -> Path:
    """Write ``[B, C, H, W]`` images in [-1, 1] as one PNG grid (nearest upscaling by ``scale``)."""

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = (images.detach().float().cpu().clamp(-1, 1) + 1.0) / 2.0
    if scale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    save_image(make_grid(x, nrow=nrow, padding=2, pad_value=1.0), str(path))
    return path


def save_images(images: torch.Tensor, out_dir: Path, start: int, prefix: str = "") -> None:
    """One PNG per image (``{prefix}{index:06d}.png``), grey for one channel."""

    out_dir.mkdir(parents=True, exist_ok=True)
    u8 = ((images.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5 + 0.5).floor().clamp(0, 255).to(torch.uint8)
    for k, img in enumerate(u8):
        arr = img.permute(1, 2, 0).numpy()
        pil = Image.fromarray(arr[..., 0], mode="L") if arr.shape[2] == 1 else Image.fromarray(arr)
        pil.save(out_dir / f"{prefix}{start + k:06d}.png")


@torch.no_grad()
def boot_reference_chain(teacher: DiffusionTeacher, eps: torch.Tensor, class_labels: torch.Tensor | None = None,
                         delta: int = 20, delta_lambda: str = "exact", boundary_target: str = "teacher",
                         clean_endpoint: bool = True) -> torch.Tensor:
    """The BOOT fixed point for step δ: the signal recursion ``y_s = y_t + Δ(t,s)(f̃(x̂_t, t) − y_t)`` from
    ``y_T = b(ε)`` down the chain ``T, T−δ, …`` to the clean endpoint (or the last t ≥ 0).

    With ``boundary_target="exact"`` and ``exact`` Δ this is the teacher's DDIM chain with step δ.

    Returns:
        ``[B, C, H, W]`` the signal at the chain's end (what the one-step student converges to).
    """
    sched = teacher.schedule
    B = eps.shape[0]
    T = float(sched.T)
    full = lambda v: torch.full((B,), float(v), dtype=torch.float64, device=eps.device)  # noqa: E731
    if boundary_target == "teacher":
        y = teacher(eps, full(T), class_labels)
    else:
        a_T, s_T = sched.alpha_sigma(full(T))
        y = exact_boundary_target(eps, a_T, s_T)
    t = T
    stop = -1.0 if clean_endpoint else 0.0
    while t > stop:
        s = t - delta
        if s < 0:
            if not clean_endpoint:
                break
            s = -1.0
        a_t, s_t = sched.alpha_sigma(full(t))
        x_hat = a_t.to(y).view(-1, *[1] * (y.ndim - 1)) * y + s_t.to(y).view(-1, *[1] * (y.ndim - 1)) * eps
        f = teacher(x_hat, full(t), class_labels)
        y = signal_ddim_step(y, f, sched.delta(full(t), full(s), delta_lambda))
        t = s
    return y
