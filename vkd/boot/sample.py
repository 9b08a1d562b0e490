"""Sampling: one-step BOOT student, teacher DDIM with K steps, per-sample seeded noise, PNG grids.

Every sample's noise (and class) is drawn from its own ``torch.Generator`` seeded by
``(seed, global index)``, so a sample set is the same whatever the batch size or number of processes,
and student and teacher can be compared on the same ε.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from vkd.boot.losses import ddim_step
from vkd.boot.schedule import ddim_timesteps
from vkd.boot.student import BootStudent
from vkd.boot.teacher import DiffusionTeacher
from vkd.errors import DataError, UserError

__all__ = [
    "sample_seed",
    "sample_generator",
    "noise_for_indices",
    "ddim_sample",
    "student_sample",
    "save_grid",
    "save_images",
    "run_image_batches",
    "load_run",
    "sample",
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
        clamp: clamp the result to [-1, 1].

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
    return x.clamp(-1.0, 1.0) if clamp else x


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
    from torchvision.utils import make_grid, save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = (images.detach().float().cpu().clamp(-1, 1) + 1.0) / 2.0
    if scale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    save_image(make_grid(x, nrow=nrow, padding=2, pad_value=1.0), str(path))
    return path


def save_images(images: torch.Tensor, out_dir: Path, start: int, prefix: str = "") -> None:
    """One PNG per image (``{prefix}{index:06d}.png``), grey for one channel."""
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    u8 = ((images.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5 + 0.5).floor().clamp(0, 255).to(torch.uint8)
    for k, img in enumerate(u8):
        arr = img.permute(1, 2, 0).numpy()
        pil = Image.fromarray(arr[..., 0], mode="L") if arr.shape[2] == 1 else Image.fromarray(arr)
        pil.save(out_dir / f"{prefix}{start + k:06d}.png")


# ----------------------------------------------------------------------------------------------
# runs
# ----------------------------------------------------------------------------------------------


def load_run(run_dir: str | Path, need_teacher: bool = False, device: str | torch.device = "cpu"
             ) -> tuple[Any, BootStudent, DiffusionTeacher | None]:
    """``(cfg, student, teacher | None)`` of a BOOT run: the exported student (``student/``) when present,
    else the newest checkpoint (its EMA weights when the run kept an EMA)."""
    from vkd.boot.config import BootConfig
    from vkd.boot.distiller import build_teacher
    from vkd.boot.student import load_student
    from vkd.config import load_config
    from vkd.engine import latest_checkpoint, load_checkpoint_weights

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = load_config(BootConfig, run_dir / "config.yaml", task="boot")
    teacher = None
    if (run_dir / "student" / "vkd_student.json").is_file():
        student, _ = load_student(run_dir / "student")
        if need_teacher:
            teacher = build_teacher(cfg)
    else:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise DataError(f"{run_dir} has neither an exported student nor a checkpoint")
        teacher = build_teacher(cfg)
        student = BootStudent.from_teacher(teacher, cfg.student.parameterization,
                                           -1.0 if cfg.loss.clean_endpoint else 0.0)
        weights = load_checkpoint_weights(ckpt)
        state = {k[len("student."):]: v for k, v in weights.items() if k.startswith("student.")}
        if (ckpt / "ema.safetensors").is_file():
            state = load_checkpoint_weights(ckpt, "ema.safetensors")
        student.load_state_dict(state, strict=False)
        student.eval().requires_grad_(False)
    student.to(device)
    if teacher is not None:
        teacher.to(device)
    return cfg, student, teacher


def _num_classes(student: BootStudent, teacher: DiffusionTeacher | None, cfg: Any) -> int | None:
    if teacher is not None:
        return teacher.num_classes
    net = student.net
    unet = getattr(net, "unet", None)
    if unet is None or getattr(unet, "class_embedding", None) is None:
        return None
    meta_path = Path(cfg.teacher.path) / "vkd_teacher.json"
    if meta_path.is_file():
        return int(json.loads(meta_path.read_text()).get("num_classes", unet.config.num_class_embeds))
    return int(unet.config.num_class_embeds)


def run_image_batches(run_dir: str | Path, indices: range | list[int], seed: int = 0, batch_size: int = 64,
                      device: str | torch.device = "cpu") -> tuple[Iterator[torch.Tensor], tuple[int, int]]:
    """One-step student samples of a BOOT run for FID: ``(iterator of uint8 [b, 3, H, W], (H, W))``.

    Sample ``i`` uses noise seeded by ``(seed, i)`` and class ``i % num_classes``.
    """
    cfg, student, _ = load_run(run_dir, device=device)
    shape = _sample_shape(student)
    ncls = _num_classes(student, None, cfg)
    idx = list(indices)

    def batches() -> Iterator[torch.Tensor]:
        for i in range(0, len(idx), batch_size):
            eps, labels = noise_for_indices(idx[i:i + batch_size], seed, shape, ncls)
            eps = eps.to(device)
            labels = None if labels is None else labels.to(device)
            yield to_uint8(student_sample(student, eps, labels)).cpu()

    return batches(), (shape[1], shape[2])


def _sample_shape(student: BootStudent) -> tuple[int, int, int]:
    unet = getattr(student.net, "unet", None)
    if unet is None:
        raise UserError("the run's student is not a UNet; cannot infer the sample shape")
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(unet.config.in_channels), int(h), int(w)


def sample(run_dir: Path, num: int, out: Path, teacher_steps: int | None = None, seed: int = 0,
           batch_size: int = 64, device: str = "auto") -> dict:
    """``vkd sample boot``: ``num`` one-step student samples, or teacher DDIM-K samples with ``teacher_steps``.

    Sample ``i`` reads the noise seeded by ``(seed, i)`` and class ``i % num_classes`` in both modes, so a
    student folder and a teacher folder written with the same seed are compared on the same ε.
    Writes ``out/NNNNNN.png`` and ``out/grid/grid.png`` (first 100 samples; in a subfolder so that
    ``vkd fid --fake out`` only sees the samples).

    Returns:
        dict with the generator, counts, paths and the measured images/s.
    """
    if num < 1:
        raise UserError(f"--num must be >= 1, got {num}")
    if teacher_steps is not None and teacher_steps < 1:
        raise UserError(f"--teacher-steps must be >= 1, got {teacher_steps}")
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    cfg, student, teacher = load_run(run_dir, need_teacher=teacher_steps is not None, device=dev)
    shape = _sample_shape(student)
    if teacher is not None and teacher_steps > teacher.schedule.num_train_timesteps:
        raise UserError(f"--teacher-steps must be <= {teacher.schedule.num_train_timesteps}")
    ncls = _num_classes(student, teacher, cfg)
    if teacher_steps is None:
        fn, what = (lambda e, c: student_sample(student, e, c)), "student (1 step)"
    else:
        fn, what = (lambda e, c: ddim_sample(teacher, e, c, teacher_steps)), f"teacher (DDIM {teacher_steps} steps)"
    out = Path(out)
    grid: list[torch.Tensor] = []
    elapsed = 0.0
    for start in range(0, num, batch_size):
        eps, labels = noise_for_indices(range(start, min(num, start + batch_size)), seed, shape, ncls)
        eps = eps.to(dev)
        labels = None if labels is None else labels.to(dev)
        t0 = time.perf_counter()
        x = fn(eps, labels)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - t0
        save_images(x, out, start)
        if sum(len(g) for g in grid) < 100:
            grid.append(x.cpu())
    return {"generator": what, "num": num, "seed": seed, "out": str(out),
            "grid": str(save_grid(torch.cat(grid)[:100], out / "grid" / "grid.png")),
            "image_size": "x".join(str(v) for v in shape), "images_per_s": num / max(elapsed, 1e-9)}


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
    from vkd.boot.losses import exact_boundary_target, signal_ddim_step

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
