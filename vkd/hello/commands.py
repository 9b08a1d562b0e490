"""CLI entry points of HeLlO: ``vkd distill hello-teacher``, ``vkd distill hello``, ``vkd eval hello``.

Typical embedded run (digits, CPU)::

    vkd distill hello-teacher            # small CNN teacher + 9 weak-teacher snapshots
    vkd distill hello                    # tiny CLIP (cached) → projector fit → selection → image update → export
    vkd eval hello --run runs/hello/default
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import torch

from vkd.config import load_config
from vkd.engine import seeded, train_task
from vkd.errors import ConfigError, DataError
from vkd.hello.config import HelloConfig, HelloTeacherConfig
from vkd.hello.data import LabelledImages, class_subset, load_split, prompt_names
from vkd.hello.distiller import HelloTeacherTask, ProjectorFitTask, build_clip, read_distilled_set
from vkd.hello.evaluate import evaluate_label_sources, label_bytes, storage_report
from vkd.hello.images import auto_factor
from vkd.hello.projector import (
    add_lora,
    build_projector,
    load_adapters,
    lora_config,
    projector_bytes,
    read_adapter_meta,
)
from vkd.hello.teacher import Classifier, load_teacher, load_teacher_run

__all__ = ["run_teacher", "run_hello", "evaluate_hello", "prepare_fit", "evaluate_run",
           "resolve_teachers"]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_teacher(cfg: HelloTeacherConfig, resume: str | None = None) -> dict:
    """Train the teacher (``vkd distill hello-teacher``); writes ``teacher.safetensors`` + snapshots."""
    train = load_split(cfg.data, "train")
    test = load_split(cfg.data, "test")
    with seeded(cfg.run.seed):  # initial weights from run.seed alone
        task = HelloTeacherTask(cfg, train, test, cfg.run_dir())
    summary = train_task(cfg, task, train.dataset(), resume=resume)
    summary["skipped_images"] = train.skipped + test.skipped
    return summary


def resolve_teachers(cfg: HelloConfig, train: LabelledImages) -> tuple[list[Classifier], Classifier, dict[str, Any]]:
    """(teachers used for fitting, final teacher, teacher metadata) as configured in ``cfg.teacher``."""
    size = cfg.data.image_size
    if cfg.teacher.checkpoint:
        final = load_teacher(cfg.teacher.checkpoint, cfg.teacher.model, train.num_classes, size)
        return [], final, {"checkpoint": cfg.teacher.checkpoint}
    run = Path(cfg.teacher.run) if cfg.teacher.run else Path(cfg.run.output_dir) / "hello-teacher" / "default"
    bundle = load_teacher_run(run, train.num_classes, train.class_names, size)
    snaps = bundle.snapshots or [bundle.final]
    if cfg.teacher.snapshots:
        bad = [i for i in cfg.teacher.snapshots if not -len(snaps) <= i < len(snaps)]
        if bad:
            raise ConfigError(f"teacher.snapshots {bad} out of range: {run} has {len(snaps)} snapshots")
        snaps = [snaps[i] for i in cfg.teacher.snapshots]
    fit = [] if cfg.teacher.sampling == "final_only" else snaps
    return fit, bundle.final, bundle.meta


def _check_ipc(cfg: HelloConfig, train: LabelledImages) -> int:
    factor = auto_factor(cfg.data.image_size, cfg.selection.factor)
    need = cfg.selection.ipc * factor * factor
    counts = train.counts()
    small = [(train.class_names[i], int(n)) for i, n in enumerate(counts) if n < need]
    if small:
        name, n = small[0]
        raise DataError(f"selection.ipc={cfg.selection.ipc} (stitch factor {factor}) needs {need} images per class "
                        f"but class '{name}' has {n}")
    return factor


def prepare_fit(cfg: HelloConfig, device: str | torch.device = "cpu", progress: bool = True
                ) -> tuple[ProjectorFitTask, LabelledImages, LabelledImages]:
    """Load data, teachers and CLIP; build the LoRA projector and its fitting task."""
    train = load_split(cfg.data, "train")
    test = load_split(cfg.data, "test")
    _check_ipc(cfg, train)
    fit, final, meta = resolve_teachers(cfg, train)
    clip = build_clip(cfg, train, device=device, progress=progress)
    projector = build_projector(clip, prompt_names(train.class_names), cfg.clip.prompt_template)
    kwargs = lora_config(projector, cfg.projector)
    model = add_lora(projector, kwargs)
    task = ProjectorFitTask(cfg, model, fit, final, train, test, clip, kwargs, meta)
    return task, train, test


def run_hello(cfg: HelloConfig, resume: str | None = None) -> dict:
    """``vkd distill hello``: fit the projector with the engine, then select/update/export the distilled set."""
    task, train, test = prepare_fit(cfg)
    summary = train_task(cfg, task, train.dataset(), resume=resume)
    info_path = cfg.run_dir() / "hello.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        summary["adapter_bytes"] = info["adapter"]["bytes"]
        summary["adapter_params"] = info["adapter"]["params"]
    summary["skipped_images"] = train.skipped + test.skipped
    return summary


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def evaluate_run(cfg: HelloConfig, run_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Students on the exported distilled set for every label source and seed, plus storage.

    Returns:
        A JSON-able dict with ``per_seed``, ``summary`` (flat mean/std metrics) and ``storage``.
    """
    run_dir = Path(run_dir)
    dev = _device(cfg.eval.device)
    adapters = run_dir / "projector_adapters.safetensors"
    if not adapters.is_file():
        raise DataError(f"{run_dir} has no projector_adapters.safetensors; run `vkd distill hello` to completion first")
    train = load_split(cfg.data, "train")
    test = load_split(cfg.data, "test")
    meta = read_adapter_meta(adapters)
    if list(meta["class_names"]) != prompt_names(train.class_names):
        raise DataError(f"projector adapters in {run_dir} were fitted for different classes than the dataset")
    _, final, _ = resolve_teachers(cfg, train)
    final = final.to(dev)
    clip = build_clip(cfg, train, device=dev, progress=progress)
    projector = load_adapters(adapters, clip, device=dev)  # evaluate exactly what is shipped (e.g. fp16 factors)
    images, labels, manifest = read_distilled_set(run_dir / "distilled")
    if list(manifest["class_names"]) != list(train.class_names):
        raise DataError(f"distilled set in {run_dir} has different classes than the dataset")
    factor = int(manifest.get("factor", 1))
    ipc = int(manifest.get("ipc", images.shape[0] // train.num_classes))
    fns = {"teacher": final, "projector": projector}
    per_seed: dict[str, list[float]] = {s: [] for s in cfg.eval.sources}
    for seed in cfg.eval.seeds:
        idx = class_subset(train, ipc, torch.Generator().manual_seed(10_000 + seed))
        res = evaluate_label_sources(images, labels, train.float_images(idx), train.labels[idx], test.images,
                                     test.labels, train.num_classes, cfg.student, list(cfg.eval.sources), fns,
                                     cfg.eval.random_label_source, [seed], factor, dev, progress)
        for k, v in res.items():
            per_seed[k] += v
    from safetensors.torch import load_file

    from vkd.hello.evaluate import accuracy

    adapter = projector_bytes(load_file(str(adapters)))
    storage = storage_report(adapter, images.shape[0], train.num_classes, cfg.eval.storage_epochs,
                             cfg.eval.storage_crops, cfg.eval.storage_dtype)
    # the labels this evaluation's students actually consumed, had they been stored (one per view)
    views = cfg.student.steps * min(cfg.student.batch_size, images.shape[0])
    storage["soft_label_bytes_this_eval"] = float(label_bytes(1, views, train.num_classes, cfg.eval.storage_dtype))
    summary: dict[str, float] = {}
    for src, vals in per_seed.items():
        m, s = _mean_std(vals)
        summary[f"acc_{src}_mean"], summary[f"acc_{src}_std"] = m, s
    summary["teacher_test_acc"] = accuracy(final, test.images, test.labels, device=dev)
    summary["projector_test_acc"] = accuracy(projector, test.images, test.labels, device=dev)
    if "projector" in per_seed and "teacher" in per_seed and summary["acc_teacher_mean"] > 0:
        summary["projector_over_teacher"] = summary["acc_projector_mean"] / summary["acc_teacher_mean"]
    if "projector" in per_seed and "random" in per_seed:
        summary["ior"] = summary["acc_projector_mean"] - summary["acc_random_mean"]  # DD-Ranking IOR
    summary.update({k: v for k, v in storage.items()})
    summary["storage_percent"] = 100.0 * storage["storage_ratio"] if math.isfinite(storage["storage_ratio"]) else math.inf
    summary.update({"ipc": ipc, "num_images": int(images.shape[0]), "num_seeds": len(cfg.eval.seeds),
                    "skipped_images": train.skipped + test.skipped})
    return {"summary": summary, "per_seed": per_seed, "seeds": list(cfg.eval.seeds), "storage": storage,
            "clip_model": meta.get("clip_model"), "student": cfg.student.model.arch}


def evaluate_hello(run_dir: Path, overrides: list[str], out_dir: Path | None = None) -> dict:
    """``vkd eval hello --run RUN``: writes ``eval.json`` and returns the flat metrics."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise DataError(f"{run_dir} is not a hello run directory (config.yaml missing)")
    cfg = load_config(HelloConfig, run_dir / "config.yaml", overrides, task="hello")
    result = evaluate_run(cfg, run_dir)
    out = Path(out_dir or run_dir) / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result["summary"]
