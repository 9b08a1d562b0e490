"""CLI entry points of Feature 3DGS: ``vkd distill feature3dgs``, ``vkd eval feature3dgs``, ``vkd render``."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from vkd.engine.runs import check_run_dir
from vkd.errors import UserError
from vkd.feature3dgs.config import Feature3DGSConfig

__all__ = ["run", "evaluate", "render", "render_command"]

log = logging.getLogger(__name__)


def run(cfg: Feature3DGSConfig, resume: str | None = None) -> dict:
    """Build scene, teacher cache and Gaussian field, train with the shared engine, return the summary.

    The summary adds ``teacher`` (kind, model, whether it is randomly initialised), ``timings_s`` (scene, teacher,
    training) and, for a random teacher, a loud ``warning``.
    """
    from vkd.engine import torch_threads, train_task
    from vkd.feature3dgs.distiller import build_task
    from vkd.feature3dgs.teacher import RANDOM_INIT_WARNING, save_teacher_for_queries

    with torch_threads(cfg.compute.cpu_threads):  # restored afterwards: the setting is process-wide
        t0 = time.perf_counter()
        task, dataset, prep = build_task(cfg)
        t_prep = time.perf_counter() - t0
        run_dir = cfg.run_dir()
        run_dir.mkdir(parents=True, exist_ok=True)
        info = save_teacher_for_queries(prep.teacher_info, run_dir)
        if info.get("random_init"):
            log.warning(RANDOM_INIT_WARNING)
        t1 = time.perf_counter()
        summary = train_task(cfg, task, dataset, resume=resume)
        summary["teacher"] = {k: info.get(k) for k in ("kind", "model", "pretrained", "random_init", "feature_shape",
                                                       "tiny_clip_zero_shot")}
        summary["timings_s"] = {"scene_and_teacher": t_prep, "training": time.perf_counter() - t1}
        summary["num_gaussians"] = task.student.num_gaussians
        if info.get("random_init"):
            summary["warning"] = RANDOM_INIT_WARNING
            log.warning(RANDOM_INIT_WARNING)
        path = run_dir / "summary.json"
        if path.is_file():
            path.write_text(json.dumps(summary, indent=2, default=str))
        return summary


def evaluate(run_dir: Path, overrides: list[str], out_dir: Path | None) -> dict:
    """``vkd eval feature3dgs --run RUN``: held-out metrics of the run's latest checkpoint (writes ``eval.json``)."""
    from vkd.feature3dgs.evaluate import evaluate_run

    return evaluate_run(Path(run_dir), list(overrides), out_dir)


def render(run_dir: Path, views: str = "test", frames: int = 0, query: str | None = None, edit: str | None = None,
           threshold: float | None = None, out: Path | None = None, fmt: str = "mp4") -> dict:
    """``vkd render --run RUN``: RGB, depth, PCA features and relevancy frames (+ MP4/GIF).

    Args:
        run_dir: a Feature 3DGS run directory.
        views: ``test`` | ``train`` | ``orbit`` | ``spiral``.
        frames: path length for orbit/spiral; cap on the number of views for test/train (0 = all).
        query: text query (``"red sphere"``) or a label set whose first item is the target (``"red sphere, floor"``).
        edit: ``None`` | ``"extract"`` | ``"delete"`` (needs ``query``).
        threshold: cosine threshold for one query, summed-probability threshold for a label set.
        out: output directory (default ``<run>/renders/<views>[-<edit>]``).
        fmt: ``mp4`` | ``gif`` | ``png`` (frames only).
    """
    from vkd.feature3dgs.render import render_run

    return render_run(Path(run_dir), views, frames, query, edit, threshold, out, fmt)


def render_command(args: argparse.Namespace) -> dict:
    """``vkd render``: the arguments declared in :data:`vkd.feature3dgs.METHOD`."""
    if args.edit and not args.query:
        raise UserError("--extract/--delete need --query")
    return render(check_run_dir(args.run), args.views, args.frames, args.query, args.edit, args.threshold, args.out,
                  args.fmt)
