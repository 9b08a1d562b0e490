"""CLI entry points of HeLlO: ``vkd distill hello-teacher``, ``vkd distill hello``, ``vkd eval hello``.

Typical embedded run (digits, CPU)::

    vkd distill hello-teacher            # small CNN teacher + 9 weak-teacher snapshots
    vkd distill hello                    # tiny CLIP (cached) → projector fit → selection → image update → export
    vkd eval hello --run runs/hello/default
"""

from __future__ import annotations

import json
from pathlib import Path

from vkd.engine import seeded, train_task
from vkd.hello import evaluate
from vkd.hello.config import HelloConfig, HelloTeacherConfig
from vkd.hello.data import load_splits
from vkd.hello.distiller import HelloTeacherTask, prepare_fit
from vkd.hello.model import resolve_arch

__all__ = ["run_teacher", "run_hello", "evaluate_hello"]


def run_teacher(cfg: HelloTeacherConfig, resume: str | None = None) -> dict:
    """Train the teacher (``vkd distill hello-teacher``); writes ``teacher.safetensors`` + snapshots."""
    resolve_arch(cfg.model.arch)  # an unknown name fails before the data is indexed
    train, test = load_splits(cfg.data)
    with seeded(cfg.run.seed):  # initial weights from run.seed alone
        task = HelloTeacherTask(cfg, train, test, cfg.run_dir())
    summary = train_task(cfg, task, train.dataset(), resume=resume)
    summary["skipped_images"] = train.skipped + test.skipped
    train.log_skips()
    test.log_skips()
    return summary


def run_hello(cfg: HelloConfig, resume: str | None = None) -> dict:
    """``vkd distill hello``: fit the projector with the engine, then select/update/export the distilled set."""
    task, train, test = prepare_fit(cfg)
    summary = train_task(cfg, task, train.dataset(), resume=resume)
    info_path = cfg.run_dir() / "hello.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        summary["adapter_bytes"] = info["adapter"]["bytes"]
        summary["adapter_params"] = info["adapter"]["params"]
        summary["lora_targets"] = info.get("lora_targets", [])
    summary["skipped_images"] = train.skipped + test.skipped
    train.log_skips()
    test.log_skips()
    return summary


def evaluate_hello(run_dir: Path, overrides: list[str], out_dir: Path | None = None) -> dict:
    """``vkd eval hello --run RUN``: writes ``eval.json`` and returns the flat metrics."""
    return evaluate.evaluate_hello(Path(run_dir), overrides, out_dir)
