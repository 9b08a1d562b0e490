"""Reopen a BOOT run: its config, one-step student and teacher, and the sample sets drawn from it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from vkd.boot.conditioning import TextUNetDenoiser
from vkd.boot.config import BootConfig
from vkd.boot.data import read_prompts
from vkd.boot.sample import (
    ddim_sample,
    noise_batches,
    noise_for_indices,
    save_grid,
    save_images,
    student_sample,
    to_uint8,
)
from vkd.boot.student import (
    LORA_EXPORT_DIR,
    BootStudent,
    exported_student,
    load_lora,
    load_student,
    student_from_config,
)
from vkd.boot.teacher import DiffusionTeacher, build_teacher, cast_teacher
from vkd.engine import latest_checkpoint, load_checkpoint_weights
from vkd.engine.runs import open_run, resolve_device
from vkd.errors import DataError, UserError

__all__ = ["load_run", "sample_shape", "num_classes", "run_image_batches", "sample_run"]


def load_run(run_dir: str | Path, need_teacher: bool = False, device: str | torch.device = "cpu"
             ) -> tuple[BootConfig, BootStudent, DiffusionTeacher | None]:
    """``(cfg, student, teacher | None)`` of a BOOT run: the exported student (``pipeline/``) when present,
    else a LoRA run's adapters (``lora/``) on the teacher's copy, else the newest checkpoint (its EMA weights
    when the run kept an EMA).

    Examples:
        >>> cfg, student, teacher = load_run("runs/boot/digits", need_teacher=True)  # doctest: +SKIP
    """
    run_dir = Path(run_dir)
    cfg = open_run(run_dir, BootConfig, "boot")
    teacher = None
    export = exported_student(run_dir)
    if export is not None:
        prompts = read_prompts(cfg.data.prompts, cfg.data.prompt_column).prompts if cfg.data.prompts else ()
        student, _ = load_student(export, prompts)
        if need_teacher:
            teacher = build_teacher(cfg.teacher, cfg.data)
    else:
        lora_dir = run_dir / LORA_EXPORT_DIR
        lora_export = (lora_dir / "adapter_model.safetensors").is_file()
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None and not lora_export:
            raise DataError(f"{run_dir} has neither an exported student nor a checkpoint")
        teacher = build_teacher(cfg.teacher, cfg.data, cast=False)
        if lora_export:  # a LoRA run's export: the teacher's copy plus the adapters
            student = load_lora(BootStudent.from_teacher(teacher, cfg.student.parameterization,
                                                         -1.0 if cfg.loss.clean_endpoint else 0.0,
                                                         cfg.student.lambda_range), lora_dir)
        else:
            student = student_from_config(teacher, cfg)
            weights = load_checkpoint_weights(ckpt)
            state = {k[len("student."):]: v for k, v in weights.items() if k.startswith("student.")}
            if (ckpt / "ema.safetensors").is_file():
                state = load_checkpoint_weights(ckpt, "ema.safetensors")
            student.load_state_dict(state, strict=False)
        cast_teacher(teacher, cfg.teacher)
        student.eval().requires_grad_(False)
        if not need_teacher:
            teacher = None
    student.to(device)
    if student.decoder is not None:  # held by reference: not moved with the student
        student.decoder.to(device)
    if teacher is not None:
        teacher.to(device)
    return cfg, student, teacher


def num_classes(student: BootStudent, teacher: DiffusionTeacher | None, cfg: BootConfig) -> int | None:
    """The number of classes (or prompts, for text-to-image) samples cycle through (``None``: unconditional)."""
    if teacher is not None:
        return teacher.num_classes
    if isinstance(student.net, TextUNetDenoiser):
        if student.net.prompts.num_prompts == 0:
            raise UserError("this run's student is text-to-image and has no prompts: set data.prompts in the run's "
                            "config.yaml to a prompt file")
        return student.net.prompts.num_prompts
    unet = getattr(student.net, "unet", None)
    if unet is None or getattr(unet, "class_embedding", None) is None:
        return None
    meta_path = Path(cfg.teacher.path) / "vkd_teacher.json"
    if meta_path.is_file():
        return int(json.loads(meta_path.read_text()).get("num_classes", unet.config.num_class_embeds))
    return int(unet.config.num_class_embeds)


def sample_shape(student: BootStudent) -> tuple[int, int, int]:
    """``(C, H, W)`` of the student's samples."""
    unet = getattr(student.net, "unet", None)
    if unet is None:
        raise UserError("the run's student is not a UNet; cannot infer the sample shape")
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(unet.config.in_channels), int(h), int(w)


def run_image_batches(run_dir: str | Path, indices: range | list[int], seed: int = 0, batch_size: int = 64,
                      device: str | torch.device = "cpu") -> tuple[Iterator[torch.Tensor], tuple[int, int]]:
    """One-step student samples of a BOOT run for FID: ``(iterator of uint8 [b, 3, H, W], (H, W))``.

    Sample ``i`` uses noise seeded by ``(seed, i)`` and class ``i % num_classes``.
    """
    cfg, student, _ = load_run(run_dir, device=device)
    shape = sample_shape(student)
    ncls = num_classes(student, None, cfg)
    idx = list(indices)

    def batches() -> Iterator[torch.Tensor]:
        for _, eps, labels in noise_batches(len(idx), seed, shape, ncls, batch_size, device, indices=idx):
            yield to_uint8(student_sample(student, eps, labels)).cpu()

    size = (shape[1], shape[2])
    if student.decoder is not None:  # a latent student: the image size is the VAE's, not the latents'
        probe, _ = noise_for_indices([0], seed, shape)
        size = tuple(student.decoder(probe.to(device)).shape[-2:])
    return batches(), size


def sample_run(run_dir: Path, num: int, out: Path, teacher_steps: int | None = None, seed: int = 0,
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
    dev = resolve_device(device)
    cfg, student, teacher = load_run(run_dir, need_teacher=teacher_steps is not None, device=dev)
    shape = sample_shape(student)
    if teacher is not None and teacher_steps > teacher.schedule.num_train_timesteps:
        raise UserError(f"--teacher-steps must be <= {teacher.schedule.num_train_timesteps}")
    ncls = num_classes(student, teacher, cfg)
    if teacher_steps is None:
        fn, what = (lambda e, c: student_sample(student, e, c)), "student (1 step)"
    else:
        fn, what = (lambda e, c: ddim_sample(teacher, e, c, teacher_steps)), f"teacher (DDIM {teacher_steps} steps)"
    out = Path(out)
    grid: list[torch.Tensor] = []
    elapsed = 0.0
    for start, eps, labels in noise_batches(num, seed, shape, ncls, batch_size, dev):
        t0 = time.perf_counter()
        x = fn(eps, labels)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - t0
        save_images(x, out, start)
        image_shape = tuple(x.shape[1:])  # decoded images (a latent student's shape differs from its latents)
        if sum(len(g) for g in grid) < 100:
            grid.append(x.cpu())
    return {"generator": what, "num": num, "seed": seed, "out": str(out),
            "grid": str(save_grid(torch.cat(grid)[:100], out / "grid" / "grid.png")),
            "image_size": "x".join(str(v) for v in image_shape), "images_per_s": num / max(elapsed, 1e-9)}
