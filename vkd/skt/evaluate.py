"""Counting with tiling, MAE / RMSE evaluation of a network and of a run (``vkd eval skt``), latency (spec §8).

MAE = mean |Ĉ − C| and RMSE = sqrt(mean (Ĉ − C)²), with Ĉ the sum of the predicted density and C the
number of annotated heads. The SKT code, its checkpoints (``mse_best_prec1``) and most crowd-counting
papers call the RMSE "MSE": vkd names it ``rmse``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from vkd.config import load_config
from vkd.engine.runs import write_json
from vkd.skt.checkpoints import load_counter
from vkd.skt.config import SKTTeacherConfig
from vkd.skt.datasets import CrowdEvalDataset, build_eval_dataset
from vkd.skt.models import count_parameters
from vkd.skt.runs import load_run

__all__ = [
    "tile_grid",
    "spread_density",
    "Prediction",
    "predict",
    "count_metrics",
    "evaluate_model",
    "evaluate_run",
    "evaluate_weights",
    "default_out_dir",
    "measure_latency",
]


def tile_grid(height: int, width: int, tile_size: int = 512, overlap: int = 0) -> list[tuple[int, int, int, int]]:
    """Near-equal tiles covering the image: ``(⌊H/t⌋+1) × (⌊W/t⌋+1)`` of them (the reference's UCF-QNRF test).

    An image whose sides are both ≤ ``tile_size`` (or ``tile_size=0``) is one tile. With ``overlap > 0``
    each tile is grown by ``overlap/2`` on every inner side.

    Returns:
        ``(y0, x0, y1, x1)`` boxes.
    """
    if tile_size <= 0 or (height <= tile_size and width <= tile_size):
        return [(0, 0, height, width)]
    ny, nx = height // tile_size + 1, width // tile_size + 1
    ys = np.linspace(0, height, ny + 1).round().astype(int)
    xs = np.linspace(0, width, nx + 1).round().astype(int)
    half = overlap // 2
    boxes = []
    for i in range(ny):
        for j in range(nx):
            y0, y1 = max(0, ys[i] - half), min(height, ys[i + 1] + (overlap - half))
            x0, x1 = max(0, xs[j] - half), min(width, xs[j + 1] + (overlap - half))
            boxes.append((int(y0), int(x0), int(y1), int(x1)))
    return boxes


def spread_density(density: torch.Tensor, height: int, width: int, factor: int = 8) -> torch.Tensor:
    """Spread each cell of a 1/``factor`` density over the pixels it covers; exactly mass-preserving.

    Args:
        density: ``[h, w]`` with ``h = ⌈H/f⌉``, ``w = ⌈W/f⌉``.
        height: ``H``.
        width: ``W``.

    Returns:
        ``[H, W]`` per-pixel density (the last row/column of cells may cover fewer than ``f`` pixels).
    """
    h, w = density.shape
    if h != -(-height // factor) or w != -(-width // factor):
        raise ValueError(f"density [{h}, {w}] does not match an image of {height}x{width} at 1/{factor}")
    rows = torch.clamp(height - factor * torch.arange(h), max=factor).to(density.dtype)  # [h] pixels per cell row
    cols = torch.clamp(width - factor * torch.arange(w), max=factor).to(density.dtype)
    per_pixel = density / (rows[:, None] * cols[None, :])
    full = per_pixel.repeat_interleave(factor, 0).repeat_interleave(factor, 1)
    return full[:height, :width]


@dataclass
class Prediction:
    """A predicted count and its per-pixel density map ``[H, W]`` (sums to ``count``)."""

    count: float
    density: torch.Tensor
    tiles: int = 1


@torch.no_grad()
def predict(model: nn.Module, image: torch.Tensor, tile_size: int = 512, overlap: int = 0) -> Prediction:
    """Count the people in one image, tiling it when it is larger than ``tile_size``.

    Args:
        model: a CSRNet or a :class:`~vkd.skt.models.GridCounter` (``[B, 3, H, W]`` → ``[B, 1, ⌈H/8⌉, ⌈W/8⌉]``),
            already in eval mode.
        image: ``[3, H, W]`` normalised as the model was trained (ImageNet for vkd's, see
            :func:`vkd.skt.datasets.to_tensor`).
        tile_size: tile side (0: whole image at once).
        overlap: tile overlap in pixels; overlapping densities are averaged.

    Returns:
        :class:`Prediction` with the full-resolution density on the CPU.
    """
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be [3, H, W], got shape {tuple(image.shape)}")
    device = next(model.parameters()).device
    H, W = image.shape[-2:]
    boxes = tile_grid(H, W, tile_size, overlap)
    if len(boxes) == 1:
        d = model(image[None].to(device))[0, 0].float().cpu()
        full = spread_density(d, H, W)
        return Prediction(float(d.sum()), full, 1)
    acc = torch.zeros(H, W)
    weight = torch.zeros(H, W)
    for y0, x0, y1, x1 in boxes:
        d = model(image[None, :, y0:y1, x0:x1].to(device))[0, 0].float().cpu()
        acc[y0:y1, x0:x1] += spread_density(d, y1 - y0, x1 - x0)
        weight[y0:y1, x0:x1] += 1.0
    full = acc / weight
    return Prediction(float(full.sum()), full, len(boxes))


def count_metrics(pred: np.ndarray | list[float], gt: np.ndarray | list[float]) -> dict[str, float]:
    """``{"mae", "rmse", "mean_gt", "mean_pred", "num_images"}``; ``rmse`` is what papers call "MSE"."""
    p = np.asarray(pred, dtype=np.float64)
    g = np.asarray(gt, dtype=np.float64)
    if p.shape != g.shape or p.ndim != 1:
        raise ValueError(f"pred {p.shape} and gt {g.shape} must be equal-length vectors")
    err = p - g
    return {"mae": float(np.abs(err).mean()) if len(err) else math.nan,
            "rmse": float(np.sqrt((err**2).mean())) if len(err) else math.nan,
            "mean_gt": float(g.mean()) if len(g) else math.nan,
            "mean_pred": float(p.mean()) if len(p) else math.nan,
            "num_images": int(len(err))}


def evaluate_model(model: nn.Module, dataset: CrowdEvalDataset, tile_size: int = 512, overlap: int = 0,
                   max_images: int = 0, progress: bool = False) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """MAE / RMSE of ``model`` over a :class:`~vkd.skt.datasets.CrowdEvalDataset`.

    Returns:
        ``(metrics, per_image)`` where ``per_image`` lists ``{"image", "gt", "pred"}``.
    """
    was_training = model.training
    model.eval()
    n = len(dataset) if not max_images else min(max_images, len(dataset))
    preds, gts, rows = [], [], []
    iterator: Any = range(n)
    if progress:
        iterator = tqdm(iterator, desc="eval", disable=None)
    try:
        for i in iterator:
            item = dataset[i]
            p = predict(model, item["image"], tile_size, overlap).count
            g = float(item["count"])
            preds.append(p)
            gts.append(g)
            rows.append({"image": str(dataset.records[i].image_path), "gt": g, "pred": p})
    finally:
        model.train(was_training)
    return count_metrics(preds, gts), rows


def evaluate_run(run_dir: Path, overrides: list[str], out_dir: Path | None = None) -> dict[str, Any]:
    """MAE and RMSE (the "MSE" of the papers) of an ``skt`` or ``skt-teacher`` run on its test split.

    Writes ``eval.json`` (metrics and per-image counts) to ``out_dir`` or the run directory.

    Returns:
        The metrics with the split, the kind of ground-truth count, parameters, width divisor and seconds.
    """
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


def default_out_dir(kind: str, weights: Path) -> Path:
    """``runs/<kind>/<name>`` for a checkpoint file (``PartAmodel_best.pth.tar`` → ``PartAmodel_best``)."""
    return Path("runs") / kind / (Path(weights).name.split(".", 1)[0] or "weights")


def evaluate_weights(weights: Path, overrides: list[str], out_dir: Path | None = None,
                     mean: str | None = None, std: str | None = None, log_para: float | None = None
                     ) -> dict[str, Any]:
    """MAE and RMSE of a checkpoint file of any family of :data:`vkd.skt.checkpoints.FAMILIES`.

    The data set and the evaluation protocol are the ``data.*`` and ``eval.*`` keys of the ``skt-teacher``
    config with ``overrides`` applied (``data.dataset=shanghaitech``, ``data.root=...``); images are normalised
    as the checkpoint's family trained (or with ``mean``/``std``). Writes ``eval.json`` to ``out_dir`` (default
    ``runs/eval/<weights name>``).

    Returns:
        The metrics with the split, the family, the architecture, the normalisation and seconds.
    """
    cfg = load_config(SKTTeacherConfig, None, list(overrides), task="skt-teacher")
    counter = load_counter(weights, mean, std, log_para)
    counter.tile_size, counter.tile_overlap = cfg.eval.tile_size, cfg.eval.tile_overlap
    split = cfg.eval.split or cfg.data.test_split
    dataset = build_eval_dataset(cfg.data, split)
    dataset.normalisation = (counter.mean, counter.std)
    t0 = time.perf_counter()
    metrics, rows = evaluate_model(counter.model, dataset, counter.tile_size, counter.tile_overlap,
                                   cfg.eval.max_images, progress=True)
    result = {**metrics, "split": split, "gt_count": cfg.data.effective_gt_count(), "family": counter.title,
              "architecture": counter.arch, "normalisation": counter.input_text(),
              "seconds": round(time.perf_counter() - t0, 2)}
    write_json(Path(out_dir or default_out_dir("eval", weights)) / "eval.json",
               {**result, "weights": str(weights), "note": "rmse is the metric crowd-counting papers call MSE",
                "per_image": rows})
    return result


def measure_latency(models: dict[str, nn.Module], shape: tuple[int, int, int, int] = (1, 3, 576, 864),
                    repeats: int = 3) -> dict[str, list[float]]:
    """Forward wall times in seconds per model, interleaved so machine load affects all models alike.

    Args:
        models: name → network (put in eval mode here).
        shape: input ``[B, 3, H, W]``.
        repeats: timed forwards per model, after one untimed warm-up each.

    Returns:
        name → ``repeats`` wall times.
    """
    x = torch.randn(shape)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up (allocator, oneDNN primitive cache)
            model.eval()(x)
        for _ in range(repeats):
            for name, model in models.items():
                t0 = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - t0)
    return times
