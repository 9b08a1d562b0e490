"""CLI entry points of Feature 3DGS: ``vkd distill feature3dgs``, ``vkd eval feature3dgs``, ``vkd render``,
``vkd features``."""

from __future__ import annotations

import argparse
from pathlib import Path

from vkd.config import find_preset, load_config
from vkd.engine.runs import check_run_dir
from vkd.errors import UserError
from vkd.feature3dgs.config import Feature3DGSConfig
from vkd.feature3dgs.distiller import distill
from vkd.feature3dgs.evaluate import evaluate_run
from vkd.feature3dgs.render import render_run
from vkd.feature3dgs.teacher import export_teacher_features

__all__ = ["run", "evaluate", "render", "render_command", "features_command", "lift_command"]


def run(cfg: Feature3DGSConfig, resume: str | None = None) -> dict:
    """``vkd distill feature3dgs``: scene, teacher cache and Gaussian field, trained with the shared engine."""
    return distill(cfg, resume)


def evaluate(run_dir: Path, overrides: list[str], out_dir: Path | None) -> dict:
    """``vkd eval feature3dgs --run RUN``: held-out metrics of the run's latest checkpoint (writes ``eval.json``)."""
    return evaluate_run(Path(run_dir), list(overrides), out_dir)


def render(run_dir: Path, views: str = "test", frames: int = 0, query: str | None = None, edit: str | None = None,
           threshold: float | None = None, out: Path | None = None, fmt: str = "mp4",
           point: tuple[str, str, str] | None = None) -> dict:
    """``vkd render --run RUN``: RGB, depth, PCA features and relevancy (or point similarity) frames (+ MP4/GIF).

    Args:
        run_dir: a Feature 3DGS run directory.
        views: ``test`` | ``train`` | ``orbit`` | ``spiral``.
        frames: path length for orbit/spiral; cap on the number of views for test/train (0 = all).
        query: text query (``"red sphere"``) or a label set whose first item is the target (``"red sphere, floor"``).
        edit: ``None`` | ``"extract"`` | ``"delete"`` (needs ``query`` or ``point``).
        threshold: cosine threshold for one query or a point, summed-probability threshold for a label set.
        out: output directory (default ``<run>/renders/<views>[-<edit>]``).
        fmt: ``mp4`` | ``gif`` | ``png`` (frames only).
        point: ``(VIEW, X, Y)`` point prompt instead of ``query`` (:func:`vkd.feature3dgs.render.point_prompt`).
    """
    return render_run(Path(run_dir), views, frames, query, edit, threshold, out, fmt, point=point)


def render_command(args: argparse.Namespace) -> dict:
    """``vkd render``: the arguments declared in :data:`vkd.feature3dgs.METHOD`."""
    point = getattr(args, "point", None)
    if args.edit and not args.query and not point:
        raise UserError("--extract/--delete need --query or --point")
    return render(check_run_dir(args.run), args.views, args.frames, args.query, args.edit, args.threshold, args.out,
                  args.fmt, point=tuple(point) if point else None)


def features_command(args: argparse.Namespace) -> dict:
    """``vkd features --scene DIR --teacher KIND --out DIR``: a teacher's maps as per-image feature files."""
    path = find_preset("feature3dgs", args.config) if args.config else None
    overrides = [*args.overrides, f"data.path={args.scene}", f"teacher.kind={args.teacher}"]
    cfg = load_config(Feature3DGSConfig, path, overrides, task="feature3dgs")
    return export_teacher_features(cfg, args.out)


def lift_command(args: argparse.Namespace) -> dict:
    """``vkd lift --scene DIR --ply PLY (--features DIR | --teacher KIND) --out RUN``: training-free lifting."""
    from vkd.feature3dgs.lift import lift  # on use: keeps `vkd --help` light

    if not args.features and not args.teacher:
        raise UserError("vkd lift needs the features: --features DIR (feature files) or --teacher KIND")
    path = find_preset("feature3dgs", args.config) if args.config else None
    teacher = ["teacher.kind=files", f"teacher.features_dir={args.features}"] if args.features else \
        [f"teacher.kind={args.teacher}"]
    overrides = [f"data.path={args.scene}", f"model.init_ply={args.ply}", "train.freeze_geometry=true", *teacher,
                 *args.overrides]
    cfg = load_config(Feature3DGSConfig, path, overrides, task="feature3dgs")
    return lift(cfg, args.out)
