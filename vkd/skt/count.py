"""``vkd count``: count people in images of any size with a trained run, write overlays and a CSV."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw

from vkd.data.files import IMAGE_EXTENSIONS, SkipLog
from vkd.errors import DataError, UserError
from vkd.skt.datasets import load_image, to_tensor
from vkd.skt.evaluate import predict
from vkd.skt.runs import load_run

__all__ = ["collect_images", "density_overlay", "count_images"]


def collect_images(inputs: list[str]) -> list[Path]:
    """Expand files and directories (their image files, sorted, not recursive) into a list of images."""
    if not inputs:
        raise UserError("no images given")
    images: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in directory {path}")
            images += found
        elif path.is_file():
            images.append(path)
        else:
            raise DataError(f"image not found: {path}")
    return images


def density_overlay(image: np.ndarray, density: torch.Tensor, count: float, alpha: float = 0.55,
                    cmap: str = "jet") -> Image.Image:
    """A colour-mapped density blended over the image, with the count written in the corner.

    Args:
        image: ``[H, W, 3]`` uint8.
        density: ``[H, W]`` per-pixel density.
        count: the predicted count (printed).
        alpha: maximum opacity of the heat map (opacity grows with density so empty areas stay visible).
        cmap: matplotlib colour map.
    """
    d = density.clamp_min(0).numpy().astype(np.float64)
    peak = float(np.percentile(d, 99.5)) if d.size else 0.0
    norm = np.clip(d / peak, 0.0, 1.0) if peak > 0 else np.zeros_like(d)
    heat = colormaps[cmap](norm)[..., :3] * 255.0  # [H, W, 3]
    a = (alpha * np.sqrt(norm))[..., None]
    blended = (image.astype(np.float64) * (1 - a) + heat * a).clip(0, 255).astype(np.uint8)
    out = Image.fromarray(blended)
    draw = ImageDraw.Draw(out)
    text = f"count: {count:.1f}"
    box = draw.textbbox((4, 4), text)
    draw.rectangle((box[0] - 3, box[1] - 3, box[2] + 3, box[3] + 3), fill=(0, 0, 0))
    draw.text((4, 4), text, fill=(255, 255, 255))
    return out


def count_images(run_dir: Path, inputs: list[str], out: Path | None = None, overlays: bool = True,
                 echo: bool = True) -> dict[str, Any]:
    """Count people in ``inputs`` with the network of ``run_dir``.

    Each image is converted to RGB, ImageNet-normalised like the training data and tiled when larger than
    ``eval.tile_size`` of the run's config. Writes ``<out>/counts.csv`` (image, count, width, height, tiles,
    overlay) and ``<out>/<stem>_density.png`` overlays; ``out`` defaults to ``<run_dir>/count``.

    An unreadable image (truncated, empty, not an image, a decompression bomb) among several is skipped,
    counted and reported on stderr instead of discarding the counts of the others; when no image can be read
    at all, the first reason is raised as :class:`~vkd.errors.DataError`.

    Returns:
        ``{"images": N, "total": Σ counts, "mean": mean count, "skipped": S, "csv": path, "out": dir}``.
    """
    run_dir = Path(run_dir)
    cfg, model = load_run(run_dir)
    images = collect_images(list(inputs))
    out = Path(out) if out is not None else run_dir / "count"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    used_names: set[str] = set()
    skips = SkipLog()
    for path in images:
        try:
            image, _ = load_image(path, min_size=cfg.data.min_size)
        except DataError as err:
            if len(images) == 1:
                raise
            skips.add(path, str(err))
            print(f"vkd: warning: skipping {err}", file=sys.stderr, flush=True)
            continue
        pred = predict(model, to_tensor(image), cfg.eval.tile_size, cfg.eval.tile_overlap)
        overlay_path = ""
        if overlays:
            name = f"{path.stem}_density.png"
            k = 1
            while name in used_names:  # same stem in two input folders
                name = f"{path.stem}_{k}_density.png"
                k += 1
            used_names.add(name)
            density_overlay(image, pred.density, pred.count).save(out / name)
            overlay_path = str(out / name)
        rows.append({"image": str(path), "count": round(pred.count, 3), "width": image.shape[1],
                     "height": image.shape[0], "tiles": pred.tiles, "overlay": overlay_path})
        if echo:
            print(f"{path}\t{pred.count:.1f}", flush=True)
    if not rows:
        raise DataError(f"none of the {len(images)} images could be read; {skips.summary()}")
    csv_path = out / "counts.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    total = float(sum(r["count"] for r in rows))
    # Per-image counts are printed above and written to the CSV; the summary stays one screen long.
    return {"images": len(rows), "total": total, "mean": total / len(rows), "skipped": len(skips),
            "csv": str(csv_path), "out": str(out)}
