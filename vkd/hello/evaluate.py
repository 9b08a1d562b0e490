"""Student evaluation of a distilled set and the label-storage arithmetic.

A fresh student trains on the distilled images; every step its batch is augmented (ShufflePatches
when stitched → RandomResizedCrop → flip → optional CutMix, kornia) and labelled **online** on exactly
that augmented batch (hello.md §6):

``loss = MSE(s(A(x)), y*) + β·CE(s(A(x)), y)`` with ``y* = f(A(x))`` (``label_loss="mse_ce"``), or
RDED's ``KL(softmax(y*/T) ‖ softmax(s/T))·T²`` (``"kl"``). Its length is ``student.steps``, or
``student.epochs`` passes over the set (:func:`student_steps`).

Five label sources are compared side by side: ``hard`` (CE only), ``teacher`` (the original soft-label
generator online), ``projector`` (HeLlO), ``zero_shot`` (the CLIP zero-shot classifier the projector starts
from: what the LoRA fit adds) and ``random`` — the DD-Ranking control: the same number of *randomly chosen
real images* per class, labelled by the same online generator, which tells how much of the accuracy comes
from the labels rather than from the selected images. With ``eval.students`` every source is evaluated for
each student architecture (one row each). Test sets stream: each pass decodes them per batch once for all the
models it scores.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
from collections.abc import Callable, Mapping
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
from vkd.hello.data import LabelledImages, as_unit, class_subset
from vkd.hello.images import stitch, unstitch
from vkd.hello.losses import projector_fit_loss, soft_label_loss
from vkd.hello.model import Classifier, build_classifier, resolve_arch
from vkd.hello.projector import ZeroShot, projector_bytes
from vkd.hello.runs import load_run

__all__ = ["label_bytes", "storage_report", "augment_batch", "train_student", "student_steps", "student_views",
           "student_configs", "accuracy", "accuracies", "fit_report", "evaluate_label_sources", "LabelFn"]

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


def student_steps(cfg: StudentConfig, num_images: int) -> int:
    """Optimisation steps of a student on ``num_images`` distilled images.

    ``cfg.steps`` when ``cfg.epochs`` is 0; else ``epochs × ceil(N / B)`` with the batch ``B = min(batch_size, N)``
    (the last batch of each epoch holds the remainder), so that 300 epochs are 300 passes over the set whatever
    its size.

    Examples:
        >>> student_steps(StudentConfig(epochs=300, batch_size=100), 1000)   # ImageNet-1K IPC 1
        3000
        >>> student_steps(StudentConfig(epochs=300, batch_size=100), 250)
        900
    """
    if cfg.epochs <= 0:
        return cfg.steps
    batch = min(cfg.batch_size, num_images)
    return cfg.epochs * math.ceil(num_images / batch)


def student_views(cfg: StudentConfig, num_images: int) -> int:
    """Augmented views (one online label each) a student consumes: ``epochs × N`` in epoch mode."""
    batch = min(cfg.batch_size, num_images)
    per_epoch = math.ceil(num_images / batch)
    full, rest = divmod(student_steps(cfg, num_images), per_epoch)
    return full * num_images + rest * batch  # rest < per_epoch: only full batches before an epoch's end


def student_configs(cfg: StudentConfig, students: list[str] | tuple[str, ...] = ()) -> dict[str, StudentConfig]:
    """``{architecture: recipe}`` of the students to evaluate: ``cfg`` itself when ``students`` is empty, else one
    copy per name with ``model.arch`` replaced (``model.pretrained`` kept only for ``cfg.model.arch`` itself: other
    architectures start from random weights).

    Raises:
        ConfigError: an unknown architecture name (with close matches).
    """
    names = list(students) or [cfg.model.arch]
    out = {}
    for name in names:
        resolve_arch(name)  # all names checked before any student trains
        model = dataclasses.replace(cfg.model, arch=name,
                                    pretrained=cfg.model.pretrained if name == cfg.model.arch else "")
        out[name] = dataclasses.replace(cfg, model=model)
    return out


def train_student(images: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: StudentConfig,
                  label_fn: LabelFn | None = None, factor: int = 1, seed: int = 0,
                  device: str | torch.device = "cpu") -> Classifier:
    """Train a fresh ``cfg.model`` student on ``(images, labels)`` with online labels.

    Args:
        images: ``[N, 3, S, S]`` float in [0, 1] or uint8 (the distilled set; converted per batch).
        labels: ``[N]`` hard labels.
        num_classes: C.
        cfg: student recipe; its length is :func:`student_steps`.
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
    n = images.shape[0]
    steps = student_steps(cfg, n)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    augmenter = make_augmenter(cfg, size)
    bs = min(cfg.batch_size, n)
    per_epoch = math.ceil(n / bs)
    x_all, y_all = images.to(device), labels.to(device)  # uint8 stays uint8: a quarter of the memory
    perm = torch.randperm(n, device=device)
    student.train()
    for step in range(steps):
        k = step % per_epoch
        if k == 0 and step > 0:
            perm = torch.randperm(n, device=device)
        idx = perm[k * bs:(k + 1) * bs]
        x, y_a, y_b, lam = augment_batch(as_unit(x_all[idx]), y_all[idx], cfg, factor, augmenter)
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
def accuracies(models: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
               images: torch.Tensor | LabelledImages, labels: torch.Tensor | None = None, batch_size: int = 512,
               device: str | torch.device = "cpu") -> dict[str, float]:
    """Top-1 accuracy of every model in one pass over the data (a streamed set is decoded once for all of them).

    Args:
        models: ``{name: images [B, 3, S, S] in [0, 1] -> logits [B, C]}``.
        images: ``[N, 3, S, S]`` (float in [0, 1] or uint8) with ``labels [N]``, or a :class:`LabelledImages`;
            undecodable files are left out of the denominator.
    """
    correct = dict.fromkeys(models, 0)
    total = 0
    for x, y in _chunks(images, labels, batch_size):
        x = x.to(device)
        for name, model in models.items():
            correct[name] += int((model(x).argmax(-1).cpu() == y).sum())
        total += int(y.numel())
    return {name: c / max(1, total) for name, c in correct.items()}


def _chunks(images: torch.Tensor | LabelledImages, labels: torch.Tensor | None, batch_size: int):
    """``(x float [B, 3, S, S], y [B])`` batches of a tensor pair or a (streamed) :class:`LabelledImages`."""
    if isinstance(images, LabelledImages):
        for x, y, _, _ in images.batches(batch_size=batch_size):
            yield x, y
        return
    assert labels is not None
    for s in range(0, images.shape[0], batch_size):
        yield as_unit(images[s:s + batch_size]), labels[s:s + batch_size]


def accuracy(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor | LabelledImages,
             labels: torch.Tensor | None = None, batch_size: int = 512, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of ``model`` on ``images [N, 3, S, S]`` (float in [0, 1] or uint8) or a :class:`LabelledImages`."""
    return accuracies({"m": model}, images, labels, batch_size, device)["m"]


@torch.no_grad()
def fit_report(teacher: nn.Module, projector: nn.Module | None, zero_shot: nn.Module, data: LabelledImages,
               fit_target: str = "logits", device: str | torch.device = "cpu", batch_size: int = 512
               ) -> dict[str, float]:
    """How well the projector fits the teacher, next to the zero-shot CLIP it started from, in one test pass.

    Returns:
        ``{teacher,projector,zero_shot}_test_acc``, ``{projector,zero_shot}_teacher_agreement`` (argmax equal to the
        teacher's), ``{projector,zero_shot}_fit_mse`` (the fit objective's MSE term to the teacher's outputs, on
        ``fit_target``) and ``projector_gain_over_zero_shot`` (test accuracy difference); without a ``projector``
        only the teacher and zero-shot figures.
    """
    models = {"zero_shot": zero_shot} if projector is None else {"projector": projector, "zero_shot": zero_shot}
    sums = dict.fromkeys(("teacher_acc", "projector_acc", "zero_shot_acc", "projector_agree", "zero_shot_agree",
                          "projector_mse", "zero_shot_mse"), 0.0)
    n = 0
    for x, y, _, _ in data.batches(batch_size=batch_size):
        x, y = x.to(device), y.to(device)
        t = teacher(x)
        sums["teacher_acc"] += float((t.argmax(-1) == y).sum())
        for name, model in models.items():
            z = model(x)
            sums[f"{name}_acc"] += float((z.argmax(-1) == y).sum())
            sums[f"{name}_agree"] += float((z.argmax(-1) == t.argmax(-1)).sum())
            sums[f"{name}_mse"] += float(projector_fit_loss(z, t, y, fit_target)["mse"]) * x.shape[0]
        n += x.shape[0]
    m = max(n, 1)
    out = {"teacher_test_acc": sums["teacher_acc"] / m}
    for name in models:
        out[f"{name}_test_acc"] = sums[f"{name}_acc"] / m
        out[f"{name}_teacher_agreement"] = sums[f"{name}_agree"] / m
        out[f"{name}_fit_mse"] = sums[f"{name}_mse"] / m
    if projector is not None:
        out["projector_gain_over_zero_shot"] = out["projector_test_acc"] - out["zero_shot_test_acc"]
    return out


def evaluate_label_sources(distilled: torch.Tensor, distilled_labels: torch.Tensor, random_images: torch.Tensor,
                           random_labels: torch.Tensor, test_images: torch.Tensor | LabelledImages,
                           test_labels: torch.Tensor | None, num_classes: int, cfg: StudentConfig, sources: list[str],
                           label_fns: dict[str, LabelFn], random_label_source: str = "projector",
                           seeds: list[int] | tuple[int, ...] = (0,), factor: int = 1,
                           device: str | torch.device = "cpu", progress: bool = True) -> dict[str, list[float]]:
    """Student test accuracy per label source and seed.

    Args:
        distilled, distilled_labels: the distilled set ``[N, 3, S, S]`` (float or uint8), ``[N]``.
        random_images, random_labels: the DD-Ranking control, same size and class balance.
        test_images, test_labels: held-out real data (tensors, or a streamed :class:`LabelledImages` and ``None``);
            all students of the call are scored in one pass over it.
        num_classes: C.
        cfg: student recipe.
        sources: subset of ``hard``, ``teacher``, ``projector``, ``zero_shot``, ``random``.
        label_fns: ``{"teacher": fn, "projector": fn, "zero_shot": fn}`` online label generators.
        random_label_source: generator used for the ``random`` control (``hard`` for CE only).
        seeds: student seeds.
        factor: stitch factor of the distilled images.

    Returns:
        ``{source: [accuracy per seed]}``.
    """

    students: dict[str, Classifier] = {}
    jobs = [(src, seed) for seed in seeds for src in sources]
    for src, seed in tqdm(jobs, desc="students", disable=not progress or None, leave=False):
        if src == "random":
            fn = None if random_label_source == "hard" else label_fns[random_label_source]
            x, y, f = random_images, random_labels, 1
        else:
            fn = None if src == "hard" else label_fns[src]
            x, y, f = distilled, distilled_labels, factor
        students[f"{src}/{seed}"] = train_student(x, y, num_classes, copy.deepcopy(cfg), fn, f, seed, device)
    acc = accuracies(students, test_images, test_labels, device=device)
    results: dict[str, list[float]] = {s: [] for s in sources}
    for src, seed in jobs:
        results[src].append(acc[f"{src}/{seed}"])
    return results


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def evaluate_run(cfg: HelloConfig, run_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Students on the exported distilled set for every student architecture, label source and seed, plus the
    projector's fit against zero-shot CLIP and the storage comparison.

    Returns:
        A JSON-able dict with ``summary`` (flat metrics; ``acc_*`` are the first student's), ``per_seed`` (first
        student), ``students`` (one row per architecture), ``per_student`` and ``storage``.
    """
    students = student_configs(cfg.student, cfg.eval.students)  # unknown names fail before anything loads
    run = load_run(run_dir, cfg, progress=progress)
    dev, train, test, final, projector = run.device, run.train, run.test, run.teacher, run.projector
    images, labels, manifest, meta, adapters = run.images, run.labels, run.manifest, run.adapter_meta, run.adapters
    factor = int(manifest.get("factor", 1))
    ipc = int(manifest.get("ipc", images.shape[0] // train.num_classes))
    zero_shot = ZeroShot(projector)
    fns = {"teacher": final, "projector": projector, "zero_shot": zero_shot}
    per_student: dict[str, dict[str, list[float]]] = {a: {s: [] for s in cfg.eval.sources} for a in students}
    for seed in cfg.eval.seeds:
        idx = class_subset(train, ipc, torch.Generator().manual_seed(10_000 + seed))
        # only these IPC·C real images are decoded, and only for the control
        rand_x = train.fetch(idx) if "random" in cfg.eval.sources else images[:0]
        for arch, scfg in students.items():
            res = evaluate_label_sources(images, labels, rand_x, train.labels[idx], test, None, train.num_classes,
                                         scfg, list(cfg.eval.sources), fns, cfg.eval.random_label_source, [seed],
                                         factor, dev, progress)
            for k, v in res.items():
                per_student[arch][k] += v
    adapter = projector_bytes(load_file(str(adapters)))
    storage = storage_report(adapter, images.shape[0], train.num_classes, cfg.eval.storage_epochs,
                             cfg.eval.storage_crops, cfg.eval.storage_dtype)
    # the labels this evaluation's students actually consumed, had they been stored (one per view)
    views = student_views(cfg.student, images.shape[0])
    storage["soft_label_bytes_this_eval"] = float(label_bytes(1, views, train.num_classes, cfg.eval.storage_dtype))
    rows = []
    for arch, per in per_student.items():
        row: dict[str, Any] = {"student": arch}
        for src, vals in per.items():
            row[f"acc_{src}_mean"], row[f"acc_{src}_std"] = _mean_std(vals)
        _ratios(row)
        rows.append(row)
    first = rows[0]
    summary: dict[str, Any] = {k: v for k, v in first.items() if k != "student"}
    fit = fit_report(final, projector, zero_shot, test, cfg.projector.fit_target, dev)
    summary.update(fit)
    summary.update({k: v for k, v in storage.items()})
    summary["storage_percent"] = 100.0 * storage["storage_ratio"] if math.isfinite(storage["storage_ratio"]) else math.inf
    summary.update({"ipc": ipc, "num_images": int(images.shape[0]), "num_seeds": len(cfg.eval.seeds),
                    "student_steps": student_steps(cfg.student, images.shape[0]),
                    "skipped_images": train.skipped + test.skipped})
    if len(rows) > 1:  # one line per student in the CLI table
        for row in rows:
            summary[f"student {row['student']}"] = {src: round(row[f"acc_{src}_mean"], 4) for src in cfg.eval.sources}
    train.log_skips()
    test.log_skips()
    return {"summary": summary, "per_seed": per_student[first["student"]], "seeds": list(cfg.eval.seeds),
            "storage": storage, "clip_model": meta.get("clip_model"), "student": first["student"],
            "students": rows, "per_student": per_student, "fit": fit, "lora_targets": meta.get("lora", {}).get(
                "target_modules", [])}


def _ratios(row: dict[str, Any]) -> None:
    """Add projector/teacher, IOR (projector − random) and projector − zero-shot to a row of mean accuracies."""
    if "acc_projector_mean" in row and "acc_teacher_mean" in row and row["acc_teacher_mean"] > 0:
        row["projector_over_teacher"] = row["acc_projector_mean"] / row["acc_teacher_mean"]
    if "acc_projector_mean" in row and "acc_random_mean" in row:
        row["ior"] = row["acc_projector_mean"] - row["acc_random_mean"]  # DD-Ranking IOR
    if "acc_projector_mean" in row and "acc_zero_shot_mean" in row:
        row["projector_minus_zero_shot"] = row["acc_projector_mean"] - row["acc_zero_shot_mean"]


def cross_architecture_table(rows: list[dict[str, Any]], sources: list[str]) -> str:
    """Markdown table: one row per student architecture, mean ± std test accuracy per label source."""
    head = "| student | " + " | ".join(sources) + " |"
    lines = [head, "|" + "---|" * (len(sources) + 1)]
    for row in rows:
        cells = [f"{row[f'acc_{s}_mean']:.3f} ± {row[f'acc_{s}_std']:.3f}" for s in sources]
        lines.append(f"| {row['student']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def evaluate_hello(run_dir: Path, overrides: list[str], out_dir: Path | None = None) -> dict:
    """``vkd eval hello --run RUN``: writes ``eval.json`` and returns the flat metrics."""
    cfg = open_run(run_dir, HelloConfig, "hello", overrides)
    result = evaluate_run(cfg, Path(run_dir))
    out = Path(out_dir or run_dir)
    write_json(out / "eval.json", result)
    (out / "eval_students.md").write_text(cross_architecture_table(result["students"], list(cfg.eval.sources)))
    return result["summary"]
