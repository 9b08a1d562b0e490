"""CLI entry points of SKT: ``vkd distill skt-teacher``, ``vkd distill skt``, ``vkd eval skt``, ``vkd count``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from vkd.engine.runs import check_run_dir
from vkd.errors import UserError
from vkd.skt.config import SKTConfig, SKTTeacherConfig
from vkd.skt.models import CSRNet

__all__ = ["run_teacher", "run_skt", "evaluate", "count", "count_command", "load_teacher"]


def _eval_sets(cfg: Any) -> dict[str, Any]:
    from vkd.skt.datasets import build_eval_dataset

    sets = {"test": build_eval_dataset(cfg.data, cfg.eval.split)}
    if cfg.data.val_split:
        sets["val"] = build_eval_dataset(cfg.data, cfg.data.val_split)
    return sets


def run_teacher(cfg: SKTTeacherConfig, resume: str | None = None) -> dict:
    """Train a CSRNet on ground-truth densities (``vkd distill skt-teacher``)."""
    from vkd.engine import seeded, train_task
    from vkd.skt.datasets import build_train_dataset, pad_collate
    from vkd.skt.distiller import CSRNetTask

    train_set = build_train_dataset(cfg.data)
    with seeded(cfg.run.seed):  # initial weights from run.seed alone
        task = CSRNetTask(cfg, _eval_sets(cfg))
    return train_task(cfg, task, train_set, resume=resume, collate_fn=pad_collate)


def load_teacher(cfg: SKTConfig) -> CSRNet:
    """The frozen teacher named by ``cfg.teacher.run``: a ``skt-teacher`` run directory or a checkpoint file."""
    from vkd.skt.evaluate import load_run
    from vkd.skt.models import load_reference_checkpoint

    ref = cfg.teacher.run or str(Path(cfg.run.output_dir) / "skt-teacher" / cfg.run.name)
    path = Path(ref).expanduser()
    if path.is_dir():
        _, model = load_run(path)
        return model
    if path.is_file():
        model = CSRNet(cfg.teacher.width_div)
        load_reference_checkpoint(model, path)
        return model.eval()
    raise UserError(f"no teacher at {path}: train one with `vkd distill skt-teacher` (same --set run.name) or set "
                    f"teacher.run=RUN_DIR_OR_CHECKPOINT")


def run_skt(cfg: SKTConfig, resume: str | None = None) -> dict:
    """Train the student with structured knowledge transfer (``vkd distill skt``)."""
    from vkd.engine import seeded, train_task
    from vkd.skt.datasets import build_train_dataset, pad_collate
    from vkd.skt.distiller import SKTTask

    teacher = load_teacher(cfg) if cfg.loss.uses_teacher else None
    train_set = build_train_dataset(cfg.data)
    with seeded(cfg.run.seed):  # initial weights from run.seed alone
        task = SKTTask(cfg, teacher, _eval_sets(cfg))
    return train_task(cfg, task, train_set, resume=resume, collate_fn=pad_collate)


def evaluate(run_dir: Path, overrides: list[str], out_dir: Path | None = None) -> dict:
    """``vkd eval skt --run RUN``: MAE and RMSE (the "MSE" of the papers) on the test split.

    Works for ``skt`` and ``skt-teacher`` runs. Writes ``eval.json`` (metrics and per-image counts) to
    ``out_dir`` or the run directory and returns the metrics.
    """
    from vkd.skt.datasets import build_eval_dataset
    from vkd.skt.evaluate import evaluate_model, load_run, write_json
    from vkd.skt.models import count_parameters

    run_dir = Path(run_dir)
    cfg, model = load_run(run_dir, overrides)
    split = cfg.eval.split or cfg.data.test_split
    dataset = build_eval_dataset(cfg.data, split)
    t0 = time.perf_counter()
    metrics, rows = evaluate_model(model, dataset, cfg.eval.tile_size, cfg.eval.tile_overlap, cfg.eval.max_images,
                                   progress=True)
    result = {**metrics, "split": split, "gt_count": cfg.data.effective_gt_count(),
              "parameters": count_parameters(model), "width_div": model.width_div,
              "seconds": round(time.perf_counter() - t0, 2)}
    write_json(Path(out_dir or run_dir) / "eval.json",
               {**result, "note": "rmse is the metric crowd-counting papers (and the SKT code) call MSE",
                "per_image": rows})
    return result


def count(run_dir: Path, inputs: list[str], out: Path | None = None) -> dict:
    """``vkd count --run RUN IMAGE_OR_DIR...``: prints one ``path<TAB>count`` line per image, writes
    ``counts.csv`` and ``*_density.png`` overlays to ``out`` (default ``RUN/count``)."""
    from vkd.skt.count import count_images

    return count_images(Path(run_dir), inputs, out)


def count_command(args: argparse.Namespace) -> dict:
    """``vkd count``: the arguments declared in :data:`vkd.skt.METHOD`."""
    return count(check_run_dir(args.run), args.inputs, args.out)
