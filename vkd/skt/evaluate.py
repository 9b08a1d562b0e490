"""Counting with tiling, MAE / RMSE / NAE / GAME evaluation of a network and of a run (``vkd eval skt``), latency
(spec §8).

MAE = mean |Ĉ − C| and RMSE = sqrt(mean (Ĉ − C)²), with Ĉ the sum of the predicted density and C the
number of annotated heads. The SKT code, its checkpoints (``mse_best_prec1``) and most crowd-counting
papers call the RMSE "MSE": vkd names it ``rmse``. NAE = mean |Ĉ − C| / C over the images with C > 0 (images
without people are left out, as in NWPU-Crowd's evaluation). GAME(L) (Guerrero-Gómez-Olmedo et al., 2015) cuts
each image into a 2^L × 2^L grid and sums the per-cell count errors, averaged over images; GAME(0) = MAE.
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
from vkd.skt.datasets import CrowdEvalDataset, build_eval_dataset, load_density
from vkd.skt.models import count_parameters
from vkd.skt.runs import load_run

__all__ = [
    "tile_grid",
    "spread_density",
    "Prediction",
    "predict",
    "GAME_LEVELS",
    "grid_counts",
    "game_errors",
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


# GAME(0) .. GAME(3)
GAME_LEVELS = 4


def _grid_edges(size: int, cells: int) -> list[int]:
    return [(i * size) // cells for i in range(cells + 1)]


def grid_counts(height: int, width: int, level: int, points: np.ndarray | None = None,
                density: torch.Tensor | np.ndarray | None = None) -> np.ndarray:
    """People per cell of the 2^L × 2^L grid of GAME(L), from head points or from a per-pixel density.

    Cell edges are at pixel ``⌊i·H/2^L⌋`` (rows) and ``⌊j·W/2^L⌋`` (columns), so the cells of level L are unions of
    the cells of level L+1. A head at ``(x, y)`` belongs to the cell of pixel ``(⌊x⌋, ⌊y⌋)``.

    Args:
        height: image height ``H``.
        width: image width ``W``.
        level: ``L``.
        points: ``[N, 2]`` (x, y) inside the image; or
        density: ``[H, W]`` per-pixel density.

    Returns:
        ``[2^L, 2^L]`` float64 counts (rows top to bottom).
    """
    cells = 2**level
    ys, xs = _grid_edges(height, cells), _grid_edges(width, cells)
    if density is not None:
        d = density.detach().cpu().numpy() if isinstance(density, torch.Tensor) else np.asarray(density)
        if d.shape != (height, width):
            raise ValueError(f"density {d.shape} does not match an image of {height}x{width}")
        return np.array([[d[ys[i]:ys[i + 1], xs[j]:xs[j + 1]].sum(dtype=np.float64) for j in range(cells)]
                         for i in range(cells)])
    pts = np.asarray(points if points is not None else np.zeros((0, 2)), dtype=np.float64).reshape(-1, 2)
    # the last edge at or below the pixel: skips the empty cells of images smaller than the grid
    rows = np.clip(np.searchsorted(ys, np.floor(pts[:, 1]), side="right") - 1, 0, cells - 1)
    cols = np.clip(np.searchsorted(xs, np.floor(pts[:, 0]), side="right") - 1, 0, cells - 1)
    out = np.zeros((cells, cells))
    np.add.at(out, (rows, cols), 1.0)
    return out


def game_errors(pred: torch.Tensor | np.ndarray, points: np.ndarray | None = None,
                density: torch.Tensor | np.ndarray | None = None, levels: int = GAME_LEVELS) -> np.ndarray:
    """Per-image GAME(0..levels−1): ``Σ_cells |pred_cell − gt_cell|`` for each grid level.

    Args:
        pred: ``[H, W]`` predicted per-pixel density (:attr:`Prediction.density`).
        points: ``[N, 2]`` ground-truth heads; or
        density: ``[H, W]`` ground-truth density.
        levels: number of levels (GAME(0) .. GAME(levels − 1)).

    Returns:
        ``[levels]`` float64 errors; entry 0 is ``|Σ pred − Σ gt|``.
    """
    height, width = pred.shape[-2:]
    finest = levels - 1
    diff = grid_counts(height, width, finest, density=pred) - grid_counts(height, width, finest, points, density)
    errors = []
    for level in range(levels):
        cells, block = 2**level, 2 ** (finest - level)
        errors.append(np.abs(diff.reshape(cells, block, cells, block).sum(axis=(1, 3))).sum())
    return np.array(errors)


def count_metrics(pred: np.ndarray | list[float], gt: np.ndarray | list[float],
                  game: np.ndarray | list[list[float]] | None = None) -> dict[str, float]:
    """``{"mae", "rmse", "nae", "nae_images", "mean_gt", "mean_pred", "num_images"}`` and, with ``game``, ``game0`` ..

    ``rmse`` is what papers call "MSE". ``nae`` is the mean of ``|pred − gt| / gt`` over the ``nae_images`` images
    with ``gt > 0`` (images without people are left out, as NWPU-Crowd's evaluation does; NaN when none has people).

    Args:
        pred: ``[N]`` predicted counts.
        gt: ``[N]`` ground-truth counts.
        game: ``[N, L]`` per-image GAME errors (:func:`game_errors`); ``gameL`` is the mean of column L.
    """
    p = np.asarray(pred, dtype=np.float64)
    g = np.asarray(gt, dtype=np.float64)
    if p.shape != g.shape or p.ndim != 1:
        raise ValueError(f"pred {p.shape} and gt {g.shape} must be equal-length vectors")
    err = p - g
    positive = g > 0
    out = {"mae": float(np.abs(err).mean()) if len(err) else math.nan,
           "rmse": float(np.sqrt((err**2).mean())) if len(err) else math.nan,
           "nae": float((np.abs(err[positive]) / g[positive]).mean()) if positive.any() else math.nan,
           "nae_images": int(positive.sum()),
           "mean_gt": float(g.mean()) if len(g) else math.nan,
           "mean_pred": float(p.mean()) if len(p) else math.nan,
           "num_images": int(len(err))}
    if game is not None:
        table = np.asarray(game, dtype=np.float64).reshape(len(p), -1)
        for level in range(table.shape[1]):
            out[f"game{level}"] = float(table[:, level].mean()) if len(table) else math.nan
    return out


def _ground_truth(dataset: CrowdEvalDataset, index: int) -> dict[str, Any]:
    """What GAME compares with, summing to the image's ground-truth count: ``{"points": [N, 2]}`` or
    ``{"density": [H, W]}``."""
    rec = dataset.records[index]
    if dataset.gt_count == "density_sum":  # the count is the sum of the 1/8 map: spread back over its pixels
        return {"density": spread_density(dataset.target_map(index), rec.height, rec.width)}
    if rec.density_path is not None:
        return {"density": load_density(rec)}
    return {"points": rec.points}


def evaluate_model(model: nn.Module, dataset: CrowdEvalDataset, tile_size: int = 512, overlap: int = 0,
                   max_images: int = 0, progress: bool = False) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """MAE / RMSE / NAE / GAME(0-3) of ``model`` over a :class:`~vkd.skt.datasets.CrowdEvalDataset`.

    GAME compares the full-resolution predicted density (:func:`predict`) with the head points (or the ``.h5``
    density; with ``gt_count="density_sum"`` the 1/8 map spread over its pixels), so GAME(0) is the MAE.

    Returns:
        ``(metrics, per_image)`` where ``per_image`` lists ``{"image", "gt", "pred", "game": [GAME(0..3)]}``.
    """
    was_training = model.training
    model.eval()
    n = len(dataset) if not max_images else min(max_images, len(dataset))
    preds, gts, games, rows = [], [], [], []
    iterator: Any = range(n)
    if progress:
        iterator = tqdm(iterator, desc="eval", disable=None)
    try:
        for i in iterator:
            item = dataset[i]
            prediction = predict(model, item["image"], tile_size, overlap)
            p = prediction.count
            g = float(item["count"])
            game = game_errors(prediction.density, **_ground_truth(dataset, i))
            preds.append(p)
            gts.append(g)
            games.append(game)
            rows.append({"image": str(dataset.records[i].image_path), "gt": g, "pred": p,
                         "game": [round(float(e), 6) for e in game]})
    finally:
        model.train(was_training)
    return count_metrics(preds, gts, games), rows


# the parts of eval.json that its numbers alone do not say
_EVAL_NOTE = ("nae averages |pred - gt| / gt over the nae_images images with gt > 0; gameL sums the count errors of "
              "the 2^L x 2^L cells; max_side 0 = full resolution")


def evaluate_run(run_dir: Path, overrides: list[str], out_dir: Path | None = None) -> dict[str, Any]:
    """MAE, RMSE (the "MSE" of the papers), NAE and GAME(0-3) of an ``skt`` or ``skt-teacher`` run on its test split,
    at full resolution unless ``eval.max_side``.

    Writes ``eval.json`` (metrics and per-image counts) to ``out_dir`` or the run directory.

    Returns:
        The metrics with the split, the kind of ground-truth count, the resolution, parameters, width divisor and
        seconds.
    """
    run_dir = Path(run_dir)
    cfg, model = load_run(run_dir, overrides)
    split = cfg.eval.split or cfg.data.test_split
    dataset = build_eval_dataset(cfg.data, split, max_side=cfg.eval.max_side)
    t0 = time.perf_counter()
    metrics, rows = evaluate_model(model, dataset, cfg.eval.tile_size, cfg.eval.tile_overlap, cfg.eval.max_images,
                                   progress=True)
    result = {**metrics, "split": split, "gt_count": cfg.data.effective_gt_count(), "max_side": cfg.eval.max_side,
              "parameters": count_parameters(model), "width_div": model.width_div,
              "seconds": round(time.perf_counter() - t0, 2)}
    write_json(Path(out_dir or run_dir) / "eval.json",
               {**result, "note": "rmse is the metric crowd-counting papers (and the SKT code) call MSE; " + _EVAL_NOTE,
                "per_image": rows})
    return result


def default_out_dir(kind: str, weights: Path) -> Path:
    """``runs/<kind>/<name>`` for a checkpoint file (``PartAmodel_best.pth.tar`` → ``PartAmodel_best``)."""
    return Path("runs") / kind / (Path(weights).name.split(".", 1)[0] or "weights")


def evaluate_weights(weights: Path, overrides: list[str], out_dir: Path | None = None,
                     mean: str | None = None, std: str | None = None, log_para: float | None = None
                     ) -> dict[str, Any]:
    """MAE, RMSE, NAE and GAME(0-3) of a checkpoint file of any family of :data:`vkd.skt.checkpoints.FAMILIES`.

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
    dataset = build_eval_dataset(cfg.data, split, max_side=cfg.eval.max_side)
    dataset.normalisation = (counter.mean, counter.std)
    t0 = time.perf_counter()
    metrics, rows = evaluate_model(counter.model, dataset, counter.tile_size, counter.tile_overlap,
                                   cfg.eval.max_images, progress=True)
    result = {**metrics, "split": split, "gt_count": cfg.data.effective_gt_count(), "max_side": cfg.eval.max_side,
              "family": counter.title,
              "architecture": counter.arch, "normalisation": counter.input_text(),
              "seconds": round(time.perf_counter() - t0, 2)}
    write_json(Path(out_dir or default_out_dir("eval", weights)) / "eval.json",
               {**result, "weights": str(weights), "note": "rmse is the metric crowd-counting papers call MSE; " + _EVAL_NOTE,
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
