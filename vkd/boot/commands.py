"""CLI entry points of BOOT: ``vkd distill boot-teacher``, ``vkd distill boot``, ``vkd eval boot``,
``vkd sample boot``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vkd.boot.config import BootConfig, BootTeacherConfig
from vkd.engine.runs import check_run_dir
from vkd.errors import DataError, UserError

__all__ = ["run_teacher", "run_boot", "evaluate_boot", "sample", "sample_command"]


def run_teacher(cfg: BootTeacherConfig, resume: str | None = None) -> dict:
    """Train the embedded digits DDPM; the teacher is exported to ``<run_dir>/teacher``."""
    from vkd.boot.distiller import TeacherTrainingTask
    from vkd.data.digits import load_digits
    from vkd.engine import train_task

    data = load_digits("train", size=cfg.data.size, channels=1, value_range="symmetric")
    summary = train_task(cfg, TeacherTrainingTask(cfg, num_classes=len(data.class_names)), data.dataset(),
                         resume=resume)
    summary["teacher"] = str(cfg.run_dir() / "teacher")
    return summary


def _resolve_teacher_path(cfg: BootConfig) -> BootConfig:
    """Make a local teacher path absolute (the run's config.yaml must work from any directory)."""
    p = Path(cfg.teacher.path).expanduser()
    if p.exists():
        cfg.teacher.path = str(p.resolve())
    elif cfg.teacher.path == BootConfig().teacher.path:
        raise UserError(f"teacher not found at {cfg.teacher.path}: train the embedded teacher first with "
                        "`vkd distill boot-teacher --config digits-teacher`, or set teacher.path")
    return cfg


def run_boot(cfg: BootConfig, resume: str | None = None) -> dict:
    """Data-free BOOT distillation; the student is exported to ``<run_dir>/student``."""
    from vkd.boot.distiller import BootTask
    from vkd.engine import train_task

    cfg = _resolve_teacher_path(cfg)
    summary = train_task(cfg, BootTask(cfg), None, resume=resume)
    summary["student"] = str(cfg.run_dir() / "student")
    return summary


def evaluate_boot(run_dir: Path, overrides: list[str], out_dir: Path | None = None) -> dict:
    """FID (digits CNN, not Inception) of the run's one-step student and teacher DDIM-K → ``eval.json``."""
    from vkd.boot.distiller import BootTask
    from vkd.boot.sample import load_run
    from vkd.config import load_config
    from vkd.metrics.extractors import DIGITS_EXTRACTOR_NAME

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise DataError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = load_config(BootConfig, run_dir / "config.yaml", overrides, task="boot")
    _, student, teacher = load_run(run_dir, need_teacher=True)
    task = BootTask(cfg, teacher=teacher, student=student)
    if not task._reference_available():
        raise UserError("vkd eval boot scores against held-out digits, which needs the embedded digits teacher; "
                        "for other teachers use `vkd sample boot` + `vkd fid`")
    if cfg.eval.num_samples == 0:
        raise UserError("eval.num_samples is 0: nothing to evaluate (use --set eval.num_samples=2000)")
    metrics: dict = dict(task.evaluate(0))
    metrics.update(extractor=DIGITS_EXTRACTOR_NAME, num_samples=cfg.eval.num_samples,
                   num_reference=task._fid.num_reference if task._fid else None, seed=cfg.eval.seed)
    out = Path(out_dir or run_dir) / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def sample(run_dir: Path, num: int, out: Path, teacher_steps: int | None = None, seed: int = 0,
           batch_size: int = 64) -> dict:
    """``vkd sample boot --run RUN --num N --out DIR [--teacher-steps K]``: one-step student PNGs (and teacher
    DDIM-K PNGs from the same noise)."""
    from vkd.boot.sample import sample as _sample

    return _sample(Path(run_dir), num, Path(out), teacher_steps, seed, batch_size)


def sample_command(args: argparse.Namespace) -> dict:
    """``vkd sample boot``: the arguments declared in :data:`vkd.boot.METHOD`."""
    if args.num < 1:
        raise UserError("--num must be at least 1")
    return sample(check_run_dir(args.run), args.num, args.out, args.teacher_steps, args.seed, args.batch_size)
