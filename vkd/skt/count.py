"""``vkd count``: count people in images and videos with a run or a released checkpoint; overlays and a CSV.

Images of any size are tiled like the evaluation; videos are streamed frame by frame (one frame in memory),
counted every ``every``-th frame, and get an overlay video. Each count is written to ``counts.csv`` as soon as it
is computed, so a failure (an undecodable video, a frame of zero size) keeps every count made before it.
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from vkd.data.files import IMAGE_EXTENSIONS, SkipLog
from vkd.errors import DataError, UserError
from vkd.skt.checkpoints import Counter, load_counter
from vkd.skt.datasets import fit_max_side, load_image, resize_image
from vkd.skt.evaluate import Prediction, predict
from vkd.skt.video import VIDEO_EXTENSIONS, VideoReader, VideoWriter, is_video

__all__ = ["CSV_COLUMNS", "collect_inputs", "density_overlay", "count_frame", "count_inputs", "count_images"]

# One row per image or counted video frame; ``frame`` and ``time_s`` are empty for images.
CSV_COLUMNS = ("source", "frame", "time_s", "count", "width", "height", "tiles", "overlay")


def collect_inputs(inputs: list[str]) -> list[Path]:
    """Expand files and directories (their images and videos, sorted, not recursive) into a list of files."""
    if not inputs:
        raise UserError("no images or videos given")
    files: list[Path] = []
    suffixes = tuple(IMAGE_EXTENSIONS) + VIDEO_EXTENSIONS
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
            if not found:
                raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) or videos "
                                f"({', '.join(VIDEO_EXTENSIONS)}) in directory {path}")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{'video' if is_video(path) else 'image'} not found: {path}")
    return files


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


def count_frame(counter: Counter, image: np.ndarray, max_side: int = 0, source: str = "image"
                ) -> tuple[np.ndarray, Prediction]:
    """Count one ``[H, W, 3]`` uint8 image or video frame: the same path for both.

    Args:
        counter: the network and its conventions.
        image: the RGB pixels.
        max_side: downscale (bicubic) so that the longer side is at most this (0: as is).
        source: names the input in errors.

    Returns:
        ``(the image as counted, its prediction)``; the density is ``[H, W]`` at the counted size.

    Raises:
        DataError: a zero-size image, or one smaller than the network's ``min_size`` after resizing.
    """
    h, w = image.shape[:2] if image.ndim >= 2 else (0, 0)
    if image.ndim != 3 or h == 0 or w == 0:
        raise DataError(f"{source} has zero size ({w}x{h})")
    image = resize_image(image, *fit_max_side(w, h, max_side))
    if min(image.shape[:2]) < counter.min_size:
        raise DataError(f"{source} is {image.shape[1]}x{image.shape[0]} pixels to count; the network needs at "
                        f"least {counter.min_size} per side (raise --max-side?)")
    return image, predict(counter.model, counter.to_tensor(image), counter.tile_size, counter.tile_overlap)


class _CountsCSV:
    """``counts.csv``, one row at a time and flushed: what was counted survives a later failure."""

    def __init__(self, handle: TextIO, path: Path):
        self.path = path
        self.rows = 0
        self._handle = handle
        self._writer = csv.DictWriter(handle, fieldnames=list(CSV_COLUMNS))
        self._writer.writeheader()
        handle.flush()

    def write(self, **row: Any) -> None:
        self._writer.writerow(row)
        self._handle.flush()
        self.rows += 1


@contextmanager
def _open_csv(path: Path) -> Iterator[_CountsCSV]:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        yield _CountsCSV(handle, path)


def _unique_name(stem: str, suffix: str, used: set[str]) -> str:
    name, k = f"{stem}_density{suffix}", 1
    while name in used:  # the same stem in two input folders
        name, k = f"{stem}_{k}_density{suffix}", k + 1
    used.add(name)
    return name


def _count_video(counter: Counter, path: Path, table: _CountsCSV, out: Path, used: set[str], every: int,
                 max_side: int, overlays: bool) -> list[float]:
    """Count every ``every``-th frame of one video into ``table`` (and an overlay video); returns the counts."""
    counts: list[float] = []
    try:
        with VideoReader(path) as video:
            writer = VideoWriter(out / _unique_name(path.stem, ".mp4", used), video.fps / every) if overlays else None
            expected = math.ceil(video.frame_estimate / every) if video.frame_estimate else None
            bar = tqdm(total=expected, desc=path.name, unit="frame", disable=None, file=sys.stderr)
            decoded = 0
            try:
                for index, frame in enumerate(video):
                    decoded = index + 1
                    if index % every:
                        continue
                    image, pred = count_frame(counter, frame, max_side, f"{path}: frame {index}")
                    if writer is not None:
                        writer.append(np.asarray(density_overlay(image, pred.density, pred.count)))
                    table.write(source=str(path), frame=index, count=round(pred.count, 5),
                                time_s=round(index / video.fps, 3) if video.fps else "", width=image.shape[1],
                                height=image.shape[0], tiles=pred.tiles, overlay=str(writer.path) if writer else "")
                    counts.append(pred.count)
                    bar.update()
            finally:
                bar.close()
                if writer is not None:
                    writer.close()  # a valid MP4 of the frames counted so far
            if video.frame_estimate and decoded < 0.9 * video.frame_estimate - 1:
                # ffmpeg ends a truncated file quietly: say so rather than return a shorter series
                print(f"vkd: warning: {path}: {decoded} frames decoded, its header announces about "
                      f"{video.frame_estimate} (a truncated file?)", file=sys.stderr, flush=True)
        if not counts:
            raise DataError(f"video {path} has no frames")
    except DataError as err:
        kept = f" ({table.rows} counts computed before it are in {table.path})" if table.rows else ""
        raise DataError(f"{err}{kept}") from None
    return counts


def count_inputs(counter: Counter, inputs: list[str], out: Path, every: int = 1, max_side: int = 0,
                 overlays: bool = True, echo: bool = True) -> dict[str, Any]:
    """Count people in images and videos with ``counter``; write ``<out>/counts.csv`` and overlays.

    Images: one ``path<TAB>count`` line each and a ``<stem>_density.png`` overlay. An unreadable image among
    several inputs is skipped and reported on stderr; when nothing could be counted, its reason is the error.
    Videos: every ``every``-th frame is counted (frames 0, N, 2N, ...), with a progress bar on stderr, one CSV
    row per counted frame and ``<stem>_density.mp4`` (heat map and count, at ``fps / every``). A video that
    cannot be decoded, or fails mid-way, stops the command (a time series with silent holes would mislead);
    the CSV keeps every row written before.

    Args:
        counter: from :func:`vkd.skt.checkpoints.load_counter`.
        inputs: image or video files and directories.
        out: output directory.
        every: count one frame in ``every``.
        max_side: downscale images and frames whose longer side exceeds this (0: never).
        overlays: write the overlay images and videos.
        echo: print the model line and one line per image / video.

    Returns:
        ``{"model", "images", "total", "mean"}`` when images were counted, ``{"videos", "frames",
        "frame_mean", "frame_max"}`` when videos were, plus ``"skipped", "csv", "out"``.

    Raises:
        UserError: bad ``every`` / ``max_side``; DataError: nothing readable, a video that fails.
    """
    if every < 1:
        raise UserError(f"--every must be at least 1, got {every}")
    if max_side < 0:
        raise UserError(f"--max-side must be 0 (no resizing) or positive, got {max_side}")
    files = collect_inputs(list(inputs))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if echo:
        print(f"model: {counter.source}: {counter.describe()}", flush=True)
    image_counts: list[float] = []
    frame_counts: list[float] = []
    videos = 0
    used: set[str] = set()
    skips = SkipLog()
    with _open_csv(out / "counts.csv") as table:
        for path in files:
            if is_video(path):
                counts = _count_video(counter, path, table, out, used, every, max_side, overlays)
                frame_counts += counts
                videos += 1
                if echo:
                    print(f"{path}\t{len(counts)} frames\tmean {np.mean(counts):.1f}\tmax {max(counts):.1f}",
                          flush=True)
                continue
            try:
                image, pred = count_frame(counter, load_image(path, min_size=1)[0], max_side, f"image {path}")
            except DataError as err:
                if len(files) == 1:
                    raise
                skips.add(path, str(err))
                print(f"vkd: warning: skipping {err}", file=sys.stderr, flush=True)
                continue
            overlay = ""
            if overlays:
                overlay = str(out / _unique_name(path.stem, ".png", used))
                density_overlay(image, pred.density, pred.count).save(overlay)
            table.write(source=str(path), frame="", time_s="", count=round(pred.count, 5), width=image.shape[1],
                        height=image.shape[0], tiles=pred.tiles, overlay=overlay)
            image_counts.append(pred.count)
            if echo:
                print(f"{path}\t{pred.count:.1f}", flush=True)
    if not image_counts and not frame_counts:
        raise DataError(f"none of the {len(files)} images could be read; {skips.summary()}")
    # Per-image counts are printed above and written to the CSV; the summary stays one screen long.
    result: dict[str, Any] = {"model": f"{counter.title}, {counter.arch}"}
    if image_counts:
        total = float(sum(image_counts))
        result.update(images=len(image_counts), total=total, mean=total / len(image_counts))
    if frame_counts:
        result.update(videos=videos, frames=len(frame_counts), frame_mean=float(np.mean(frame_counts)),
                      frame_max=float(max(frame_counts)))
    return {**result, "skipped": len(skips), "csv": str(table.path), "out": str(out)}


def count_images(run_dir: Path, inputs: list[str], out: Path | None = None, overlays: bool = True,
                 echo: bool = True) -> dict[str, Any]:
    """Count ``inputs`` with the network of an ``skt`` / ``skt-teacher`` run; ``out`` defaults to ``<run_dir>/count``.

    See :func:`count_inputs` for the outputs.
    """
    run_dir = Path(run_dir)
    counter = load_counter(run_dir)
    return count_inputs(counter, list(inputs), Path(out) if out is not None else run_dir / "count",
                        overlays=overlays, echo=echo)
