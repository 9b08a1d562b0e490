"""CLI entry points of BOOT: ``vkd distill boot-teacher``, ``vkd distill boot``, ``vkd eval boot``,
``vkd sample boot``."""

from __future__ import annotations

import argparse
from pathlib import Path

from vkd.boot.config import BootConfig, BootTeacherConfig, BootTextTeacherConfig
from vkd.boot.distiller import BootTask, TeacherTrainingTask, TextTeacherTrainingTask
from vkd.boot.evaluate import evaluate_run
from vkd.boot.runs import sample_run
from vkd.boot.student import STUDENT_EXPORT_DIR
from vkd.data.digits import load_digits
from vkd.engine import train_task
from vkd.engine.runs import check_run_dir
from vkd.errors import UserError

__all__ = ["run_teacher", "run_text_teacher", "run_boot", "evaluate_boot", "sample", "sample_command"]


def run_teacher(cfg: BootTeacherConfig, resume: str | None = None) -> dict:
    """Train the embedded digits DDPM; the teacher is exported to ``<run_dir>/teacher``."""
    data = load_digits("train", size=cfg.data.size, channels=1, value_range="symmetric")
    summary = train_task(cfg, TeacherTrainingTask(cfg, num_classes=len(data.class_names)), data.dataset(),
                         resume=resume)
    summary["teacher"] = str(cfg.run_dir() / "teacher")
    return summary


def run_text_teacher(cfg: BootTextTeacherConfig, resume: str | None = None) -> dict:
    """Train the embedded text-to-image DDPM on captioned digits; exports ``<run_dir>/teacher`` (pipeline layout)
    and ``<run_dir>/prompts.txt``."""
    data = load_digits("train", size=cfg.data.size, channels=1, value_range="symmetric")
    summary = train_task(cfg, TextTeacherTrainingTask(cfg), data.dataset(), resume=resume)
    summary["teacher"] = str(cfg.run_dir() / "teacher")
    summary["prompts"] = str(cfg.run_dir() / "prompts.txt")
    return summary


# the embedded teachers' default paths (presets digits, digits-text) -> how to make them
_EMBEDDED_TEACHERS = {"runs/boot-teacher/digits/teacher": "vkd distill boot-teacher --config digits-teacher",
                      "runs/boot-text-teacher/digits/teacher": "vkd distill boot-text-teacher --config digits-text-teacher"}


def _resolve_teacher_path(cfg: BootConfig) -> BootConfig:
    """Make a local teacher path and prompt file absolute (the run's config.yaml must work from any directory)."""
    p = Path(cfg.teacher.path).expanduser()
    if p.exists():
        cfg.teacher.path = str(p.resolve())
    elif cfg.teacher.path in _EMBEDDED_TEACHERS:
        raise UserError(f"teacher not found at {cfg.teacher.path}: train the embedded teacher first with "
                        f"`{_EMBEDDED_TEACHERS[cfg.teacher.path]}`, or set teacher.path")
    if cfg.data.prompts and Path(cfg.data.prompts).expanduser().exists():
        cfg.data.prompts = str(Path(cfg.data.prompts).expanduser().resolve())
    return cfg


def run_boot(cfg: BootConfig, resume: str | None = None) -> dict:
    """Data-free BOOT distillation; the student is exported to ``<run_dir>/pipeline`` (a diffusers pipeline)."""
    cfg = _resolve_teacher_path(cfg)
    summary = train_task(cfg, BootTask(cfg), None, resume=resume)
    summary["student"] = str(cfg.run_dir() / STUDENT_EXPORT_DIR)
    return summary


def evaluate_boot(run_dir: Path, overrides: list[str], out_dir: Path | None = None) -> dict:
    """``vkd eval boot``: FID of the run's one-step student and teacher DDIM-K → ``eval.json``."""
    return evaluate_run(Path(run_dir), overrides, out_dir)


def sample(run_dir: Path, num: int, out: Path, teacher_steps: int | None = None, seed: int = 0,
           batch_size: int = 64) -> dict:
    """``vkd sample boot --run RUN --num N --out DIR [--teacher-steps K]``: one-step student PNGs (and teacher
    DDIM-K PNGs from the same noise)."""
    return sample_run(Path(run_dir), num, Path(out), teacher_steps, seed, batch_size)


def sample_command(args: argparse.Namespace) -> dict:
    """``vkd sample boot``: the arguments declared in :data:`vkd.boot.METHOD`."""
    if args.num < 1:
        raise UserError("--num must be at least 1")
    return sample(check_run_dir(args.run), args.num, args.out, args.teacher_steps, args.seed, args.batch_size)
