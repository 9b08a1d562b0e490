"""CLI entry points of SKT: ``vkd distill skt-teacher``, ``vkd distill skt``, ``vkd eval skt``, ``vkd count``,
``vkd export skt``."""

from __future__ import annotations

import argparse
from pathlib import Path

from vkd.engine import seeded, train_task
from vkd.engine.runs import check_run_dir
from vkd.errors import UserError
from vkd.skt.checkpoints import load_counter
from vkd.skt.config import SKTConfig, SKTTeacherConfig
from vkd.skt.count import count_images, count_inputs
from vkd.skt.datasets import build_eval_sets, build_train_dataset, pad_collate
from vkd.skt.distiller import CSRNetTask, SKTTask
from vkd.skt.evaluate import default_out_dir, evaluate_run, evaluate_weights
from vkd.skt.export import FORMATS, export_counter
from vkd.skt.teacher import load_teacher

__all__ = ["run_teacher", "run_skt", "evaluate", "count", "count_command", "export_command"]


def run_teacher(cfg: SKTTeacherConfig, resume: str | None = None) -> dict:
    """Train a CSRNet on ground-truth densities (``vkd distill skt-teacher``)."""
    train_set = build_train_dataset(cfg.data)
    with seeded(cfg.run.seed):  # initial weights from run.seed alone
        task = CSRNetTask(cfg, build_eval_sets(cfg))
    return train_task(cfg, task, train_set, resume=resume, collate_fn=pad_collate)


def run_skt(cfg: SKTConfig, resume: str | None = None) -> dict:
    """Train the student with structured knowledge transfer (``vkd distill skt``)."""
    teacher = load_teacher(cfg) if cfg.loss.uses_teacher else None
    train_set = build_train_dataset(cfg.data)
    with seeded(cfg.run.seed):  # initial weights from run.seed alone
        task = SKTTask(cfg, teacher, build_eval_sets(cfg))
    return train_task(cfg, task, train_set, resume=resume, collate_fn=pad_collate)


def evaluate(run_dir: Path, overrides: list[str], out_dir: Path | None = None) -> dict:
    """``vkd eval skt --run RUN``: MAE and RMSE (the "MSE" of the papers) on the test split.

    Works for ``skt`` and ``skt-teacher`` runs. Writes ``eval.json`` (metrics and per-image counts) to
    ``out_dir`` or the run directory and returns the metrics. A checkpoint *file* in place of the run (any family
    of :data:`vkd.skt.checkpoints.FAMILIES`) is evaluated on the data set of ``overrides`` (``data.*`` and
    ``eval.*`` keys of the ``skt-teacher`` config).
    """
    if Path(run_dir).is_file():
        return evaluate_weights(Path(run_dir), overrides, out_dir)
    return evaluate_run(Path(run_dir), overrides, out_dir)


def count(run_dir: Path, inputs: list[str], out: Path | None = None) -> dict:
    """``vkd count --run RUN IMAGE_OR_DIR...``: prints one ``path<TAB>count`` line per image, writes
    ``counts.csv`` and ``*_density.png`` overlays to ``out`` (default ``RUN/count``)."""
    return count_images(Path(run_dir), inputs, out)


def count_command(args: argparse.Namespace) -> dict:
    """``vkd count``: the arguments declared in :data:`vkd.skt.METHOD`. Exactly one of ``--run`` / ``--weights``;
    ``out`` defaults to ``RUN/count`` or ``runs/count/<weights name>``."""
    if (args.run is None) == (args.weights is None):
        raise UserError("vkd count needs a model: --run RUN_DIR or --weights FILE (one of them)")
    source = check_run_dir(args.run) if args.run is not None else args.weights
    counter = load_counter(source, args.mean, args.std, args.log_para)
    out = args.out or (source / "count" if args.run is not None else default_out_dir("count", source))
    return count_inputs(counter, args.inputs, out, every=args.every, max_side=args.max_side)


def export_command(args: argparse.Namespace) -> dict:
    """``vkd export skt``: the arguments declared in :data:`vkd.skt.METHOD`. Exactly one of ``--run`` /
    ``--weights``; ``out`` defaults to ``RUN/export/<format file>`` or ``runs/export/<weights name>/<format file>``
    (:data:`vkd.skt.export.FORMATS`), or that file inside ``--out`` when it is a directory."""
    if (args.run is None) == (args.weights is None):
        raise UserError("vkd export needs a model: --run RUN_DIR or --weights FILE (one of them)")
    source = check_run_dir(args.run) if args.run is not None else args.weights
    counter = load_counter(source, args.mean, args.std, args.log_para)
    name = FORMATS.get(args.format, "")
    out = args.out or (source / "export" if args.run is not None else default_out_dir("export", source))
    if args.out is None or args.out.is_dir():
        out = out / name
    return export_counter(counter, out, args.format)
