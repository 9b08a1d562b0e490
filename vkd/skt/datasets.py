"""Crowd-counting data: annotation readers, dataset layouts, training crops and evaluation images.

Layouts (``root`` and ``split`` as in the config; the table is :data:`vkd.skt.layouts.LAYOUTS`):

* ``shanghaitech``: ``root/{split}_data/images/IMG_k.jpg`` with ``root/{split}_data/ground_truth/GT_IMG_k.mat``
  (``ground-truth/`` is accepted too) holding the MATLAB struct ``image_info`` with field ``location`` (N×2, x, y).
* ``ucf-qnrf``: ``root/{Train,Test}/img_XXXX.jpg`` with ``img_XXXX_ann.mat`` holding ``annPoints`` (N×2, x, y).
* ``jhu-crowd``: ``root/{train,val,test}/images/NNNN.jpg`` with ``gt/NNNN.txt`` (``x y w h o b`` per head).
* ``nwpu-crowd``: ``root/{train,val}.txt`` ids, ``root/images/NNNN.jpg`` with ``root/jsons/NNNN.json`` (``points``).
* ``ucf-cc-50``: ``root/N.jpg`` with ``N_ann.mat`` (``annPoints``), 5 folds of consecutive images (``data.fold``).
* ``generic`` (also the synthetic default): ``root/{split}/NAME.{jpg,png,...}`` with a side-car ``NAME.json``
  (``[[x, y], ...]``, ``{"points": [...]}`` or ``[{"x":..,"y":..}, ...]``), ``NAME.csv`` (``x,y`` rows, header
  optional), ``NAME.txt`` (``x y`` per line, P2PNet) or ``NAME.npy`` (first two columns, BL/DM-Count).

A split may also be a CSRNet-pytorch JSON image list (``part_A_train.json``). An image whose annotation is a
CSRNet-pytorch ``.h5`` density map (``ground_truth/IMG_k.h5``, dataset ``density``; ``data.annotations=h5`` prefers
them to points) gives a record that carries the map instead of points (:func:`load_density`; needs h5py).

Every point reader returns an ``[N, 2]`` float64 ``(x, y)`` array. Points outside the image are dropped and
counted; grey, palette and RGBA images are converted to RGB; unreadable files, missing keys and images
smaller than the network can handle raise :class:`~vkd.errors.DataError` with one line naming the file.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.io import loadmat
from torch.utils.data import Dataset

from vkd.cache import cache_dir
from vkd.data.files import image_size, open_image, read_image
from vkd.data.splits import carve_validation
from vkd.errors import DataError, UserError
from vkd.skt.config import CrowdDataConfig, SKTConfig, SKTTeacherConfig
from vkd.skt.crowds import CrowdSpec, write_crowd_dataset
from vkd.skt.density import DensityCache, KernelSpec, density_cache_dir, downsample_density
from vkd.skt.layouts import csrnet_density_path, pair_files

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CrowdRecord",
    "read_points",
    "read_density",
    "load_density",
    "load_image",
    "to_tensor",
    "fit_max_side",
    "resize_image",
    "list_records",
    "CrowdTrainDataset",
    "CrowdEvalDataset",
    "pad_collate",
    "synthetic_root",
    "resolve_root",
    "build_train_dataset",
    "build_eval_dataset",
    "build_eval_sets",
    "split_train_records",
]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Crowd photos can be huge (``vkd count`` tiles any size): only PIL's own decompression-bomb limit (~179 MP)
# applies, not the 64 MP default of vkd.data.files.
MAX_IMAGE_PIXELS = 2 * Image.MAX_IMAGE_PIXELS


# ----------------------------------------------------------------------------------------------
# Annotation readers
# ----------------------------------------------------------------------------------------------


def _as_points(value: Any, source: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{source}: head points are not numeric") from None
    if arr.size == 0:
        return np.zeros((0, 2))
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise DataError(f"{source}: head points must be an N×2 array of (x, y), got shape {arr.shape}")
    return np.ascontiguousarray(arr[:, :2])  # BL's .npy adds a third column (neighbour distance)


def _find_mat_field(value: Any, name: str, depth: int = 0) -> Any:
    """Dig ``name`` out of scipy's nested cell/struct arrays (``image_info[0,0][0,0]['location']``)."""
    if depth > 6 or not isinstance(value, np.ndarray):
        return None
    if value.dtype.names:
        if name in value.dtype.names:
            inner = value[name]
            while isinstance(inner, np.ndarray) and inner.dtype == object and inner.size == 1:
                inner = inner.flat[0]
            return inner
        for sub in value.dtype.names:
            found = _find_mat_field(value[sub], name, depth + 1)
            if found is not None:
                return found
        return None
    if value.dtype == object:
        for item in value.flat:
            found = _find_mat_field(item, name, depth + 1)
            if found is not None:
                return found
    return None


def _read_mat(path: Path) -> np.ndarray:
    try:
        mat = loadmat(str(path))
    except Exception as err:
        raise DataError(f"cannot read annotation {path}: {type(err).__name__}") from None
    if "annPoints" in mat:  # UCF-QNRF
        return _as_points(mat["annPoints"], str(path))
    if "image_info" in mat:  # ShanghaiTech
        loc = _find_mat_field(mat["image_info"], "location")
        if loc is None:
            raise DataError(f"{path}: 'image_info' has no 'location' field")
        return _as_points(loc, str(path))
    for key in ("points", "location", "gt"):
        if key in mat:
            return _as_points(mat[key], str(path))
    keys = sorted(k for k in mat if not k.startswith("__"))
    raise DataError(f"{path}: no head points; expected key 'image_info' (ShanghaiTech) or 'annPoints' "
                    f"(UCF-QNRF), found {keys}")


def _read_json(path: Path) -> np.ndarray:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read annotation {path}: {type(err).__name__}") from None
    if isinstance(data, dict):
        for key in ("points", "heads", "annPoints", "location"):
            if key in data:
                data = data[key]
                break
        else:
            raise DataError(f"{path}: expected a list of [x, y] or a mapping with key 'points', found keys "
                            f"{sorted(data)[:8]}")
    if isinstance(data, list) and data and isinstance(data[0], dict):
        try:
            data = [[float(p["x"]), float(p["y"])] for p in data]
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{path}: point objects must have numeric 'x' and 'y'") from None
    return _as_points(data, str(path))


def _read_csv(path: Path) -> np.ndarray:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = [r for r in csv.reader(handle) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read annotation {path}: {type(err).__name__}") from None
    if not rows:
        return np.zeros((0, 2))
    cols = (0, 1)
    header = [c.strip().lower() for c in rows[0]]
    try:
        float(header[0])
    except ValueError:  # a header row: use its x/y columns when named so
        if "x" in header and "y" in header:
            cols = (header.index("x"), header.index("y"))
        rows = rows[1:]
    try:
        return _as_points([[float(r[cols[0]]), float(r[cols[1]])] for r in rows], str(path))
    except (IndexError, ValueError):
        raise DataError(f"{path}: every CSV row needs numeric x and y columns") from None


def _read_txt(path: Path) -> np.ndarray:
    try:
        rows = [line.replace(",", " ").split() for line in path.read_text(encoding="utf-8").splitlines()]
        return _as_points([[float(r[0]), float(r[1])] for r in rows if r], str(path))
    except (OSError, UnicodeDecodeError, IndexError, ValueError):
        raise DataError(f"{path}: expected one 'x y' pair per line") from None


def read_points(path: str | Path) -> np.ndarray:
    """Head points of one image from ``.mat`` (``image_info`` / ``annPoints``), ``.json``, ``.csv``, ``.txt`` or ``.npy``.

    Returns:
        ``[N, 2]`` float64 (x, y) in pixels.

    Raises:
        DataError: missing file, unknown format, missing keys or non-numeric points.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".mat":
        return _read_mat(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".txt":
        return _read_txt(path)
    if suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:  # empty, truncated, pickled objects, not an .npy
            raise DataError(f"cannot read annotation {path}: {type(err).__name__}") from None
        return _as_points(arr, str(path))
    raise DataError(f"{path}: unknown annotation format (use .mat, .json, .csv, .txt or .npy)")


def _h5py() -> Any:
    try:
        import h5py
    except ImportError:
        raise UserError("reading CSRNet-pytorch .h5 density maps needs h5py: pip install 'vkd[h5]'") from None
    return h5py


def read_density(path: str | Path) -> np.ndarray:
    """A CSRNet-pytorch density map: the dataset ``density`` of an ``.h5`` file (its sum is the count).

    Returns:
        ``[H, W]`` float32.

    Raises:
        UserError: h5py is not installed. DataError: a missing, unreadable or non-2-D map, or a non-finite value.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"density map not found: {path}")
    h5py = _h5py()
    try:
        with h5py.File(path, "r") as handle:
            if "density" not in handle:
                raise DataError(f"{path}: no dataset 'density' (CSRNet-pytorch ground truth), found {sorted(handle)[:8]}")
            arr = np.asarray(handle["density"], dtype=np.float32)
    except DataError:
        raise
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise DataError(f"cannot read density map {path}: {type(err).__name__}") from None
    if arr.ndim != 2:
        raise DataError(f"{path}: the density map must be 2-D (H×W), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise DataError(f"{path}: the density map has non-finite values")
    return arr


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------


def load_image(path: str | Path, min_size: int = 8) -> tuple[np.ndarray, str | None]:
    """Read an image as ``[H, W, 3]`` uint8 RGB.

    Args:
        path: image file.
        min_size: smallest accepted side (the network's output is ⌈H/8⌉×⌈W/8⌉).

    Returns:
        ``(image, converted_from)`` where ``converted_from`` is the original PIL mode (``"L"``, ``"RGBA"``, …)
        when the image was converted, else ``None``.
    """
    path = Path(path)
    # vkd's guarded opener and reader: empty files, non-images, decompression bombs and truncated data are
    # DataErrors. The header alone gives the original mode.
    with open_image(path, MAX_IMAGE_PIXELS) as img:
        mode = img.mode
    # Transparent images are composited over black rather than keeping arbitrary colours under transparent pixels.
    arr = read_image(path, "RGB", MAX_IMAGE_PIXELS, background=(0.0, 0.0, 0.0))
    h, w = arr.shape[:2]
    if min(h, w) < min_size:
        raise DataError(f"image {path} is {w}x{h} pixels; the counter needs at least {min_size} pixels per side")
    return arr, (mode if mode != "RGB" else None)


def to_tensor(image: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """``[H, W, 3]`` uint8 → ``[3, H, W]`` float32, normalised with ``mean``/``std`` on [0, 1] pixels.

    The default is ImageNet's, vkd's training normalisation; checkpoints of other projects bring their own
    (:class:`vkd.skt.checkpoints.Counter`).
    """
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0  # np.array copies: writable
    m = torch.tensor(tuple(mean), dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(tuple(std), dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


def fit_max_side(width: int, height: int, max_side: int) -> tuple[int, int]:
    """``(width, height)`` scaled so that the longer side is at most ``max_side`` (0: unchanged); sides ≥ 1."""
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, int(round(width * scale))), max(1, int(round(height * scale)))


def resize_image(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """``[H, W, 3]`` uint8 resized (bicubic) to ``[height, width, 3]``; the same array when the size is unchanged."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))


# ----------------------------------------------------------------------------------------------
# Records and layouts
# ----------------------------------------------------------------------------------------------


@dataclass
class CrowdRecord:
    """One annotated image: points inside the image (``[N, 2]`` x, y) and how many were dropped, or (CSRNet-pytorch
    ``.h5`` ground truth) no points and a density map read by :func:`load_density`."""

    image_path: Path
    points: np.ndarray
    height: int
    width: int
    dropped: int = 0
    scale: float = 1.0  # resize factor applied at load (``max_side``)
    meta: dict[str, Any] = field(default_factory=dict)
    density_path: Path | None = None  # a CSRNet-pytorch .h5 density that replaces the points
    density_count: float = 0.0  # the sum of that map

    @property
    def count(self) -> float:
        """The annotated heads, or the sum of the density map of a record that has one."""
        return self.density_count if self.density_path is not None else int(len(self.points))


def load_density(record: CrowdRecord) -> np.ndarray:
    """The ``.h5`` density map of a record at the record's size: ``[height, width]`` float32.

    A map of an image downscaled at load (``max_side``) is area-resampled and rescaled to keep its sum.
    """
    if record.density_path is None:
        raise ValueError(f"{record.image_path} has head points, not a density map")
    arr = read_density(record.density_path)
    if arr.shape == (record.height, record.width):
        return arr
    resized = F.interpolate(torch.from_numpy(arr)[None, None], size=(record.height, record.width), mode="area")[0, 0]
    mass = float(resized.sum())
    if mass > 0:
        resized = resized * (float(arr.sum(dtype=np.float64)) / mass)
    return resized.numpy()


def _density_record(image: Path, path: Path, width: int, height: int, max_side: int) -> CrowdRecord:
    arr = read_density(path)
    if arr.shape != (height, width):
        raise DataError(f"{path}: the density map is {arr.shape[1]}x{arr.shape[0]} but image {image} is {width}x{height}")
    scale = max_side / max(width, height) if max_side and max(width, height) > max_side else 1.0
    new_width, new_height = fit_max_side(width, height, max_side)
    return CrowdRecord(image, np.zeros((0, 2)), new_height, new_width, scale=scale, density_path=path,
                       density_count=float(arr.sum(dtype=np.float64)))


def _prefer_h5(pairs: list[tuple[Path, Path]]) -> list[tuple[Path, Path]]:
    """``data.annotations=h5``: CSRNet-pytorch's ``.h5`` density of every image instead of its point file."""
    dens = [(img, csrnet_density_path(img)) for img, _ in pairs]
    missing = [path for _, path in dens if not path.is_file()]
    if missing:
        raise DataError(f"data.annotations=h5: {len(missing)} of {len(dens)} images have no CSRNet-pytorch density map "
                        f"(first: {missing[0]})")
    return dens


def list_records(root: str | Path, layout: str, split: str, max_side: int = 0, min_size: int = 8,
                 dedupe: bool = False, fold: int = 0,
                 annotations: Literal["auto", "h5"] = "auto") -> list[CrowdRecord]:
    """Read the annotations of one split.

    Args:
        root: dataset root.
        layout: a key of :data:`vkd.skt.layouts.LAYOUTS` (``shanghaitech``, ``ucf-qnrf``, ..., ``generic``).
        split: split name (``train``/``test``; mapped to ``train_data`` or ``Train`` by the layouts), or a
            CSRNet-pytorch ``.json`` image list.
        max_side: if > 0, images whose long side exceeds it are downscaled at load (points scaled too).
        min_size: images with a smaller side raise ``DataError``.
        dedupe: collapse heads that fall on the same pixel (reference behaviour).
        fold: cross-validation fold (``ucf-cc-50``).
        annotations: ``auto`` (the layout's annotation files) or ``h5`` (CSRNet-pytorch's ``.h5`` densities).

    Returns:
        One record per image, sorted by file name (in list order for a list). Dropped out-of-image points are
        logged.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset root not found: {root}")
    pairs = pair_files(root, layout, split, fold)
    if not pairs:
        raise DataError(f"no images found for split '{split}' under {root}")
    if annotations == "h5":
        pairs = _prefer_h5(pairs)
    records = []
    total_dropped = 0
    for img_path, ann_path in pairs:
        width, height = image_size(img_path, MAX_IMAGE_PIXELS)  # header only: truncated data fails at decode
        if min(width, height) < min_size:
            raise DataError(f"image {img_path} is {width}x{height} pixels; the counter needs at least {min_size} "
                            f"pixels per side")
        if ann_path.suffix.lower() == ".h5":
            records.append(_density_record(img_path, ann_path, width, height, max_side))
            continue
        points = read_points(ann_path)
        scale = 1.0
        if max_side and max(width, height) > max_side:
            scale = max_side / max(width, height)
            width, height = fit_max_side(width, height, max_side)
            points = points * scale
        finite = np.isfinite(points).all(axis=1)
        inside = finite & (points[:, 0] >= 0) & (points[:, 0] < width) & (points[:, 1] >= 0) & (points[:, 1] < height)
        dropped = int((~inside).sum())
        points = points[inside]
        if dedupe and len(points):
            _, first = np.unique(np.floor(points).astype(np.int64), axis=0, return_index=True)
            points = points[np.sort(first)]
        total_dropped += dropped
        records.append(CrowdRecord(img_path, points, height, width, dropped, scale))
    if total_dropped:
        n_img = sum(r.dropped > 0 for r in records)
        log.warning("%s/%s: dropped %d head points outside their image (%d images)", root, split, total_dropped, n_img)
    return records


def _load_record_image(record: CrowdRecord, min_size: int) -> np.ndarray:
    image, converted = load_image(record.image_path, min_size=1)
    if converted:
        log.info("%s: converted %s image to RGB", record.image_path, converted)
    if record.scale != 1.0:
        image = resize_image(image, record.width, record.height)
    if image.shape[:2] != (record.height, record.width):
        raise DataError(f"{record.image_path} changed size while reading ({image.shape[1]}x{image.shape[0]})")
    return image


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------


class CrowdTrainDataset(Dataset):
    """Training samples: random crop + horizontal flip of the image and its density map.

    With ``sum_pool`` the crop lies on the 8-pixel grid (offsets and sides multiples of 8; a side may instead end
    at the image's edge), so the crop's 1/8 cells are cells of the whole image's sum-pooled map: the target read
    from a 1/8 cache (``DensityCache(resolution="eighth")``) is exactly the sum-pooled full-resolution crop, which
    keeps exactly the mass inside the crop. A flipped crop whose width is no multiple of 8 (it ends at the right
    edge) is padded on the right with zeros (the ImageNet mean after normalisation, as :func:`pad_collate` pads)
    before the flip, so its cells stay whole. With ``bicubic_x64`` (reference, full-resolution cache) crops are
    anywhere, as in the reference. Randomness comes from torch's global RNG (the engine seeds it every step), so
    runs are reproducible.

    Args:
        records: annotated images.
        kernel: density kernel.
        cache: density cache (``eighth`` needs ``downsample="sum_pool"``).
        crop: ``ratio`` (side × U(ratio_lo, ratio_hi), one ratio for both sides: the reference),
            ``fixed`` (``crop_size`` squares; images smaller than it are used whole) or ``none``.
        crop_ratio: ratio range of ``ratio`` crops.
        crop_size: side of ``fixed`` crops.
        flip_prob: horizontal flip probability (0.2 in the reference).
        repeat: epoch length multiplier (the reference repeats the list ×4).
        downsample: ``sum_pool`` (count-preserving) or ``bicubic_x64`` (reference).
        preload: keep decoded images and maps in memory (small data sets such as the synthetic default).

    Items:
        ``{"image": [3, h, w] float32, "density": [1, ⌈h/8⌉, ⌈w/8⌉] float32, "count": [] float32}``.
    """

    def __init__(self, records: list[CrowdRecord], kernel: KernelSpec, cache: DensityCache,
                 crop: Literal["ratio", "fixed", "none"] = "ratio", crop_ratio: tuple[float, float] = (0.5, 1.0),
                 crop_size: int = 256, flip_prob: float = 0.2, repeat: int = 1,
                 downsample: Literal["sum_pool", "bicubic_x64"] = "sum_pool", preload: bool = False,
                 min_size: int = 8):
        if not records:
            raise DataError("the training split has no images")
        self.records = records
        self.kernel = kernel
        self.cache = cache
        self.crop = crop
        self.crop_ratio = crop_ratio
        self.crop_size = crop_size
        self.flip_prob = flip_prob
        self.repeat = max(1, int(repeat))
        self.downsample = downsample
        self.min_size = min_size
        self._memory: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.preload = preload
        if cache.resolution == "eighth" and downsample != "sum_pool":
            raise ValueError(f"a 1/8 density cache holds sum-pooled maps; downsample={downsample} needs a full one")
        # crops on the output grid whenever the target is sum-pooled (whatever the cache stores: same samples)
        self._grid = cache.factor if downsample == "sum_pool" else 1

    def __len__(self) -> int:
        return len(self.records) * self.repeat

    def _item(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if index in self._memory:
            return self._memory[index]
        rec = self.records[index]
        image = _load_record_image(rec, self.min_size)
        if rec.density_path is not None:  # a CSRNet-pytorch .h5 map is the target as it is: no kernel, no cache
            density = load_density(rec)
        else:
            density = self.cache.get(rec.points, rec.height, rec.width, self.kernel, name=rec.image_path.stem)
        if self.preload:
            self._memory[index] = (image, np.asarray(density))
        return image, density

    def _crop_box(self, h: int, w: int) -> tuple[int, int, int, int]:
        if self.crop == "none":
            return 0, 0, h, w
        if self.crop == "fixed":
            ch, cw = min(self.crop_size, h), min(self.crop_size, w)
        else:
            lo, hi = self.crop_ratio
            ratio = lo + (hi - lo) * float(torch.rand(()))
            ch, cw = max(self.min_size, int(h * ratio)), max(self.min_size, int(w * ratio))
            ch, cw = min(ch, h), min(cw, w)
        g = self._grid
        ch, cw = min(h, -(-ch // g) * g), min(w, -(-cw // g) * g)  # whole cells, or the whole side
        y0 = g * int(torch.randint(0, (h - ch) // g + 1, ()))
        x0 = g * int(torch.randint(0, (w - cw) // g + 1, ()))
        return y0, x0, ch, cw

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, density = self._item(index % len(self.records))
        h, w = image.shape[:2]
        y0, x0, ch, cw = self._crop_box(h, w)
        flip = float(torch.rand(())) < self.flip_prob
        img = to_tensor(image[y0:y0 + ch, x0:x0 + cw])  # [3, ch, cw]
        full_resolution = density.shape[:2] == (h, w)  # a full cache or an .h5 map; else the 1/8 grid
        if full_resolution:
            den = density[y0:y0 + ch, x0:x0 + cw]
        else:  # the crop's cells (the crop is on the grid, see _crop_box)
            f = self.cache.factor
            den = density[y0 // f:-(-(y0 + ch) // f), x0 // f:-(-(x0 + cw) // f)]
        den = torch.from_numpy(np.array(den, dtype=np.float32))[None]  # [1, ch, cw] or [1, ⌈ch/8⌉, ⌈cw/8⌉]
        if flip:
            pad = -cw % self._grid  # a crop ending at the right edge: whole cells before the flip
            if pad:
                img = F.pad(img, (0, pad))
                den = F.pad(den, (0, pad)) if full_resolution else den
            img, den = img.flip(-1), den.flip(-1)
        target = downsample_density(den, self.downsample) if full_resolution else den  # [1, h/8, w/8]
        return {"image": img, "density": target, "count": target.sum()}


class CrowdEvalDataset(Dataset):
    """Whole images for evaluation; the ground-truth count is the number of annotated heads (vkd default; the sum
    of the map for a record with an ``.h5`` density) or, with ``gt_count="density_sum"``, the sum of the downsampled
    map (reference parity).

    Items: ``{"image": [3, H, W] float32, "count": [] float32, "index": int}``.
    """

    def __init__(self, records: list[CrowdRecord], gt_count: Literal["points", "density_sum"] = "points",
                 kernel: KernelSpec | None = None, cache: DensityCache | None = None,
                 downsample: Literal["sum_pool", "bicubic_x64"] = "sum_pool", min_size: int = 8):
        if not records:
            raise DataError("the evaluation split has no images")
        self.records = records
        self.gt_count = gt_count
        self.kernel = kernel or KernelSpec()
        self.cache = cache or DensityCache(None)
        self.downsample = downsample
        self.min_size = min_size
        # (mean, std) of the network under evaluation: ImageNet for vkd's, a checkpoint family's otherwise
        self.normalisation: tuple[Sequence[float], Sequence[float]] = (IMAGENET_MEAN, IMAGENET_STD)

    def __len__(self) -> int:
        return len(self.records)

    def count(self, index: int) -> float:
        rec = self.records[index]
        if self.gt_count == "points":
            return float(rec.count)
        return float(self.target_map(index).sum())

    def target_map(self, index: int) -> torch.Tensor:
        """The ground-truth map on the network's 1/8 grid, ``[⌈H/8⌉, ⌈W/8⌉]``: its sum is the ``density_sum`` count."""
        rec = self.records[index]
        if rec.density_path is not None:
            density = load_density(rec)
        else:
            density = self.cache.get(rec.points, rec.height, rec.width, self.kernel, name=rec.image_path.stem)
            if self.cache.resolution == "eighth":  # already sum-pooled to the 1/8 grid
                return torch.from_numpy(np.asarray(density, dtype=np.float32))
        return downsample_density(torch.from_numpy(np.asarray(density, dtype=np.float32)), self.downsample)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        image = _load_record_image(rec, self.min_size)
        return {"image": to_tensor(image, *self.normalisation),
                "count": torch.tensor(self.count(index), dtype=torch.float32), "index": index}


def pad_collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Batch crops of different sizes: pad bottom/right to the largest (rounded up to a multiple of 8).

    Images are padded with 0 (the ImageNet mean after normalisation) and densities with 0, so padding
    adds no people. With equal sizes this is plain stacking.
    """
    hs = [it["image"].shape[-2] for it in items]
    ws = [it["image"].shape[-1] for it in items]
    H, W = max(hs), max(ws)
    if len(set(hs)) > 1 or len(set(ws)) > 1:
        H, W = 8 * math.ceil(H / 8), 8 * math.ceil(W / 8)
    h8, w8 = -(-H // 8), -(-W // 8)
    images = torch.zeros(len(items), 3, H, W)
    dens = torch.zeros(len(items), 1, h8, w8)
    for i, it in enumerate(items):
        img, den = it["image"], it["density"]
        images[i, :, :img.shape[-2], :img.shape[-1]] = img
        dens[i, :, :den.shape[-2], :den.shape[-1]] = den
    return {"image": images, "density": dens, "count": torch.stack([it["count"] for it in items])}


# ----------------------------------------------------------------------------------------------
# From a config
# ----------------------------------------------------------------------------------------------


def synthetic_root(data_cfg: CrowdDataConfig) -> Path:
    """Where the embedded synthetic crowds live: ``data.root`` or ``<vkd cache>/skt/synthetic-<hash>``."""
    if data_cfg.root:
        return Path(data_cfg.root).expanduser()
    digest = hashlib.sha1(json.dumps(asdict(data_cfg.synthetic), sort_keys=True).encode()).hexdigest()[:10]
    return cache_dir() / "skt" / f"synthetic-{digest}"


def resolve_root(data_cfg: CrowdDataConfig) -> Path:
    """The data set root, generating the synthetic crowds on first use."""
    if data_cfg.dataset != "synthetic":
        return Path(data_cfg.root).expanduser()
    syn = data_cfg.synthetic
    root = synthetic_root(data_cfg)
    spec = CrowdSpec(height=syn.height, width=syn.width, count_min=syn.count_min, count_max=syn.count_max,
                     min_person=syn.min_person)
    if not (root / "meta.json").is_file():
        log.info("generating %d + %d synthetic crowds in %s", syn.num_train, syn.num_test, root)
    return write_crowd_dataset(root, syn.num_train, syn.num_test, spec, seed=syn.seed)


def _cache(data_cfg: CrowdDataConfig, root: Path, split: str) -> DensityCache:
    """The density cache of one split: ``<data.density.cache_dir, default $VKD_CACHE_DIR/skt/density>/<fingerprint>/``
    (:func:`vkd.skt.density.density_cache_dir`), outside the data set, which may be read-only."""
    density = data_cfg.density
    resolution = density.stored_resolution(data_cfg.effective_downsample())
    if not density.cache:
        return DensityCache(None, resolution)
    annotations = [ann for _, ann in pair_files(root, data_cfg.layout, split, data_cfg.fold)]
    split_id = f"{split}-fold{data_cfg.fold}" if data_cfg.fold else split
    return DensityCache(density_cache_dir(root, data_cfg.layout, split_id, annotations, density.cache_dir), resolution)


def split_train_records(data_cfg: CrowdDataConfig, max_side: int | None = None
                        ) -> tuple[Path, list[CrowdRecord], list[CrowdRecord]]:
    """``(root, train records, validation records)`` of the training split: ``data.val_fraction`` of its images
    (seed 0, :func:`vkd.data.splits.carve_validation`) are held out for validation, the rest are trained on.

    ``max_side`` (default ``data.max_side``) only resizes: the same images are held out at any size.
    """
    root = resolve_root(data_cfg)
    records = list_records(root, data_cfg.layout, data_cfg.train_split,
                           data_cfg.max_side if max_side is None else max_side, data_cfg.min_size,
                           dedupe=data_cfg.reference_parity, fold=data_cfg.fold, annotations=data_cfg.annotations)
    train, val = carve_validation(len(records), data_cfg.val_fraction, seed=0, what="data.val_fraction")
    return root, [records[i] for i in train], [records[i] for i in val]


def build_train_dataset(data_cfg: CrowdDataConfig) -> CrowdTrainDataset:
    """The training set of a :class:`vkd.skt.config.CrowdDataConfig` (minus ``data.val_fraction``)."""
    root, records, _ = split_train_records(data_cfg)
    return CrowdTrainDataset(records, data_cfg.density.spec(data_cfg.reference_parity),
                             _cache(data_cfg, root, data_cfg.train_split),
                             data_cfg.crop, tuple(data_cfg.crop_ratio), data_cfg.crop_size, data_cfg.flip_prob,
                             data_cfg.repeat, data_cfg.effective_downsample(),
                             preload=data_cfg.preload or data_cfg.dataset == "synthetic", min_size=data_cfg.min_size)


def build_eval_dataset(data_cfg: CrowdDataConfig, split: str | None = None,
                       records: list[CrowdRecord] | None = None, max_side: int = 0) -> CrowdEvalDataset:
    """The evaluation set (``split`` defaults to ``data.test_split``; ``records`` given: those images), at full
    resolution or downscaled to ``max_side`` (``eval.max_side``; ``data.max_side`` is for training only)."""
    root = resolve_root(data_cfg)
    given = records is not None
    if records is None:
        records = list_records(root, data_cfg.layout, split or data_cfg.test_split, max_side, data_cfg.min_size,
                               dedupe=data_cfg.reference_parity, fold=data_cfg.fold, annotations=data_cfg.annotations)
    # given records are the validation images carved from the training split: the training split's cache
    cache_split = split or (data_cfg.train_split if given else data_cfg.test_split)
    return CrowdEvalDataset(records, data_cfg.effective_gt_count(), data_cfg.density.spec(data_cfg.reference_parity),
                            _cache(data_cfg, root, cache_split), data_cfg.effective_downsample(), data_cfg.min_size)


def build_eval_sets(cfg: SKTTeacherConfig | SKTConfig) -> dict[str, CrowdEvalDataset]:
    """The sets evaluated during and at the end of training: ``{"test": eval.split, "val": ...}`` with ``val``
    from ``data.val_split`` (a named split) or ``data.val_fraction`` (carved from train), when configured."""
    max_side = cfg.eval.max_side  # validation is measured as the test split is
    sets = {"test": build_eval_dataset(cfg.data, cfg.eval.split, max_side=max_side)}
    if cfg.data.val_split:
        sets["val"] = build_eval_dataset(cfg.data, cfg.data.val_split, max_side=max_side)
    elif cfg.data.val_fraction:
        sets["val"] = build_eval_dataset(cfg.data, records=split_train_records(cfg.data, max_side)[2])
    return sets
