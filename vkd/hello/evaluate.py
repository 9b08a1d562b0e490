"""Student evaluation of a distilled set and the label-storage arithmetic.

A fresh student trains on the distilled images; every step its batch is augmented (ShufflePatches
when stitched → RandomResizedCrop → flip → optional CutMix, kornia) and labelled **online** on exactly
that augmented batch (hello.md §6):

``loss = MSE(s(A(x)), y*) + β·CE(s(A(x)), y)`` with ``y* = f(A(x))`` (``label_loss="mse_ce"``), or
RDED's ``KL(softmax(y*/T) ‖ softmax(s/T))·T²`` (``"kl"``).

Four label sources are compared side by side: ``hard`` (CE only), ``teacher`` (the original soft-label
generator online), ``projector`` (HeLlO) and ``random`` — the DD-Ranking control: the same number of
*randomly chosen real images* per class, labelled by the same online generator, which tells how much
of the accuracy comes from the labels rather than from the selected images.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from vkd.engine.runs import open_run, write_json
from vkd.hello.config import HelloConfig, StudentConfig
from vkd.hello.data import class_subset
from vkd.hello.images import stitch, unstitch
from vkd.hello.losses import soft_label_loss
from vkd.hello.model import Classifier, build_classifier
from vkd.hello.projector import projector_bytes
from vkd.hello.runs import load_run

__all__ = ["label_bytes", "storage_report", "augment_batch", "train_student", "accuracy",
           "evaluate_label_sources", "LabelFn"]

LabelFn = Callable[[torch.Tensor], torch.Tensor]
_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}


def label_bytes(epochs: int, images: int, classes: int, dtype: str = "fp16", crops: int = 1) -> int:
    """Bytes of SRe2L/FKD-style stored soft labels: ``epochs × images × crops × classes × bytes(dtype)``.

    ``label_bytes(300, 1000, 1000)`` is 6.0e8 B = 572 MiB (ImageNet-1K IPC1, hello.md §1).
    """
    if min(epochs, images, classes, crops) < 0:
        raise ValueError("epochs, images, classes and crops must be >= 0")
    if dtype not in _BYTES:
        raise ValueError(f"dtype must be one of {sorted(_BYTES)}, got {dtype!r}")
    return int(epochs) * int(images) * int(crops) * int(classes) * _BYTES[dtype]


def storage_report(adapter: dict[str, int], num_images: int, num_classes: int, epochs: int = 300,
                   crops: int = 1, dtype: str = "fp16") -> dict[str, float]:
    """Projector adapter bytes vs the stored-soft-label equivalent, as bytes and as a ratio."""
    labels = label_bytes(epochs, num_images, num_classes, dtype, crops)
    return {"adapter_params": float(adapter["params"]), "adapter_bytes": float(adapter["bytes"]),
            "soft_label_bytes": float(labels), "storage_ratio": adapter["bytes"] / labels if labels else math.inf}


# ----------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------


def _tiles(x: torch.Tensor, factor: int) -> torch.Tensor:
    """``[B, 3, S, S]`` mosaics → their tiles ``[B, f², 3, S/f, S/f]`` (row-major, as :func:`stitch` lays them)."""
    b, c, size, _ = x.shape
    return unstitch(x, factor).view(b, factor * factor, c, size // factor, size // factor)


def _shuffle_patches(x: torch.Tensor, factor: int) -> torch.Tensor:
    """RDED's ShufflePatches: permute the f×f stitched patches of each image (same permutation per batch)."""
    if factor <= 1:
        return x
    p = _tiles(x, factor)[:, torch.randperm(factor * factor)]
    return stitch(p.reshape(-1, *p.shape[2:]), factor)


def _tile_views(x: torch.Tensor, factor: int, prob: float) -> torch.Tensor:
    """With probability ``prob`` per image, replace it by one random tile of its f×f mosaic, up-sampled to full
    size: a view the teacher can read on low-resolution data, where it is at chance on whole mosaics."""
    if factor <= 1 or prob <= 0:
        return x
    b, size = x.shape[0], x.shape[-1]
    pick = _tiles(x, factor)[torch.arange(b), torch.randint(factor * factor, (b,))]  # [B, 3, s, s]
    up = F.interpolate(pick, size=(size, size), mode="bilinear", align_corners=False)
    use = (torch.rand(b) < prob).to(x.device)[:, None, None, None]
    return torch.where(use, up, x)


def augment_batch(x: torch.Tensor, y: torch.Tensor, cfg: StudentConfig, factor: int = 1,
                  augmenter: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """The student pipeline on a batch (global torch RNG).

    Args:
        x: ``[B, 3, S, S]`` in [0, 1].
        y: ``[B]`` hard labels.
        cfg: crop scale, flip, CutMix probability.
        factor: stitch factor (ShufflePatches, and tile views with probability ``cfg.tile_views``, when > 1).
        augmenter: a cached kornia pipeline (built when ``None``).

    Returns:
        ``(views [B, 3, S, S], y_a [B], y_b [B], lam)``: for CutMix the hard-label CE is
        ``lam·CE(y_a) + (1−lam)·CE(y_b)``; without CutMix ``y_b = y_a`` and ``lam = 1``.
    """
    x = _tile_views(_shuffle_patches(x, factor), factor, cfg.tile_views)
    aug = augmenter or make_augmenter(cfg, x.shape[-1])
    if aug is not None:
        x = aug(x)
    y_b, lam = y, 1.0
    if cfg.cutmix > 0 and torch.rand(()) < cfg.cutmix:
        lam = float(torch.distributions.Beta(1.0, 1.0).sample())
        perm = torch.randperm(x.shape[0])
        s = x.shape[-1]
        cut = int(round(s * math.sqrt(1 - lam)))
        cy, cx = int(torch.randint(s, ())), int(torch.randint(s, ()))
        y1, y2 = max(cy - cut // 2, 0), min(cy + cut // 2, s)
        x1, x2 = max(cx - cut // 2, 0), min(cx + cut // 2, s)
        x = x.clone()
        x[:, :, y1:y2, x1:x2] = x[perm][:, :, y1:y2, x1:x2]
        lam = 1 - (y2 - y1) * (x2 - x1) / (s * s)
        y_b = y[perm]
    return x, y, y_b, lam


def make_augmenter(cfg: StudentConfig, size: int) -> nn.Module | None:
    """kornia RandomResizedCrop(scale=(crop_scale_min, 1)) + optional horizontal flip (per sample)."""

    ops: list[nn.Module] = []
    if cfg.crop_scale_min < 1.0:
        ops.append(K.RandomResizedCrop((size, size), scale=(cfg.crop_scale_min, 1.0)))
    if cfg.hflip:
        ops.append(K.RandomHorizontalFlip())
    return K.AugmentationSequential(*ops) if ops else None


# ----------------------------------------------------------------------------------------------
# Student training
# ----------------------------------------------------------------------------------------------


def train_student(images: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: StudentConfig,
                  label_fn: LabelFn | None = None, factor: int = 1, seed: int = 0,
                  device: str | torch.device = "cpu") -> Classifier:
    """Train a fresh ``cfg.model`` student on ``(images, labels)`` with online labels.

    Args:
        images: ``[N, 3, S, S]`` in [0, 1] (the distilled set).
        labels: ``[N]`` hard labels.
        num_classes: C.
        cfg: student recipe.
        label_fn: ``views [B, 3, S, S] -> logits [B, C]`` run under no_grad on each augmented batch;
            ``None`` trains on hard labels only (CE).
        factor: stitch factor of the images (ShufflePatches).
        seed: initialisation, batch order and augmentation seed.
        device: training device.

    Returns:
        The trained student (eval mode).
    """
    torch.manual_seed(seed)
    size = images.shape[-1]
    student = build_classifier(cfg.model, num_classes, size).to(device)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    augmenter = make_augmenter(cfg, size)
    n = images.shape[0]
    bs = min(cfg.batch_size, n)
    x_all, y_all = images.to(device).float(), labels.to(device)
    perm, cursor = torch.randperm(n, device=device), 0
    student.train()
    for _ in range(cfg.steps):
        if cursor + bs > n:
            perm, cursor = torch.randperm(n, device=device), 0
        idx = perm[cursor:cursor + bs]
        cursor += bs
        x, y_a, y_b, lam = augment_batch(x_all[idx], y_all[idx], cfg, factor, augmenter)
        logits = student(x)
        ce = lam * F.cross_entropy(logits, y_a) + (1 - lam) * F.cross_entropy(logits, y_b)
        if label_fn is None:
            loss = ce
        else:
            with torch.no_grad():
                target = label_fn(x)
            loss = soft_label_loss(logits, target, cfg.label_loss, cfg.temperature) + cfg.beta_ce * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return student.eval()


@torch.no_grad()
def accuracy(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 512, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of ``model`` on ``images [N, 3, S, S]`` (float in [0, 1] or uint8)."""
    correct = 0
    for s in range(0, images.shape[0], batch_size):
        x = images[s:s + batch_size].to(device)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        correct += int((model(x).argmax(-1).cpu() == labels[s:s + batch_size]).sum())
    return correct / max(1, images.shape[0])


def evaluate_label_sources(distilled: torch.Tensor, distilled_labels: torch.Tensor, random_images: torch.Tensor,
                           random_labels: torch.Tensor, test_images: torch.Tensor, test_labels: torch.Tensor,
                           num_classes: int, cfg: StudentConfig, sources: list[str], label_fns: dict[str, LabelFn],
                           random_label_source: str = "projector", seeds: list[int] | tuple[int, ...] = (0,),
                           factor: int = 1, device: str | torch.device = "cpu",
                           progress: bool = True) -> dict[str, list[float]]:
    """Student test accuracy per label source and seed.

    Args:
        distilled, distilled_labels: the distilled set ``[N, 3, S, S]``, ``[N]``.
        random_images, random_labels: the DD-Ranking control, same size and class balance.
        test_images, test_labels: held-out real data.
        num_classes: C.
        cfg: student recipe.
        sources: subset of ``hard``, ``teacher``, ``projector``, ``random``.
        label_fns: ``{"teacher": fn, "projector": fn}`` online label generators.
        random_label_source: generator used for the ``random`` control (``hard`` for CE only).
        seeds: student seeds.
        factor: stitch factor of the distilled images.

    Returns:
        ``{source: [accuracy per seed]}``.
    """

    results: dict[str, list[float]] = {s: [] for s in sources}
    jobs = [(src, seed) for seed in seeds for src in sources]
    for src, seed in tqdm(jobs, desc="students", disable=not progress or None, leave=False):
        if src == "random":
            fn = None if random_label_source == "hard" else label_fns[random_label_source]
            x, y, f = random_images, random_labels, 1
        else:
            fn = None if src == "hard" else label_fns[src]
            x, y, f = distilled, distilled_labels, factor
        student = train_student(x, y, num_classes, copy.deepcopy(cfg), fn, f, seed, device)
        results[src].append(accuracy(student, test_images, test_labels, device=device))
    return results


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def evaluate_run(cfg: HelloConfig, run_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Students on the exported distilled set for every label source and seed, plus storage.

    Returns:
        A JSON-able dict with ``per_seed``, ``summary`` (flat mean/std metrics) and ``storage``.
    """
    run = load_run(run_dir, cfg, progress=progress)
    dev, train, test, final, projector = run.device, run.train, run.test, run.teacher, run.projector
    images, labels, manifest, meta, adapters = run.images, run.labels, run.manifest, run.adapter_meta, run.adapters
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
    cfg = open_run(run_dir, HelloConfig, "hello", overrides)
    result = evaluate_run(cfg, Path(run_dir))
    write_json(Path(out_dir or run_dir) / "eval.json", result)
    return result["summary"]
