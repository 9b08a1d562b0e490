"""Per-image feature files: what ``teacher.kind=files`` reads and ``vkd features`` writes.

The format, one file per image of the scene:

* **Name:** ``<features_dir>/<stem>.npy`` (or ``.pt``, ``.safetensors``), ``<stem>`` being the image's file name
  without folder and suffix (``images/frame_001.jpg`` -> ``frame_001``, the convention of the Feature 3DGS and
  LangSplat readers). When two images of a scene share a stem (NeRF-synthetic ``train/r_0.png`` and
  ``test/r_0.png``), each of them uses its path without suffix instead (``train/r_0.npy``).
* **Contents:** one floating-point tensor (fp16, bf16, fp32 or fp64), ``[D, h, w]``, ``[h, w, D]`` or a single
  channel ``[h, w]``; any width D (the same in every file) and any grid ``h x w`` (training resamples the maps to
  the render resolution). ``.npy`` is read with ``np.load(allow_pickle=False)``, ``.pt`` with
  ``torch.load(weights_only=True)`` (a tensor, or a dict holding one), ``.safetensors`` with ``safe_open``
  (a single tensor, or the one named ``teacher.features_key``).
* **Layout:** ``teacher.features_layout``: ``chw``, ``hwc``, or ``auto``: the folder's ``features.json`` layout
  when it has one, else the reading whose ``h x w`` grid has the aspect ratio closer to the image's (ties, such as
  ``[6, 6, 6]``, read ``[D, h, w]``).
* **features.json** (written by ``vkd features``, optional to read): ``layout`` ``chw``, ``dtype`` ``float16``,
  ``dim``, ``size`` (``[h, w]``, ``null`` when it varies), the teacher's identity and ``files`` (image name ->
  file).

Examples:
    >>> feature_stems(["images/a.jpg", "train/r_0.png", "test/r_0.png"])
    ['a', 'train/r_0', 'test/r_0']
    >>> files = FeatureFiles("feats/", names, image_sizes)  # doctest: +SKIP
    >>> files.read(0).shape  # [D, h, w] float32  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import shutil
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from vkd.cache import atomic_write_text, tmp_path
from vkd.errors import DataError, UserError, first_line
from vkd.feature3dgs.feature_cache import FeatureCache

__all__ = ["FEATURE_EXTENSIONS", "FEATURES_JSON", "FEATURE_LAYOUTS", "feature_stems", "read_feature_file",
           "to_chw", "FeatureFiles", "export_cache"]

FEATURE_EXTENSIONS = (".npy", ".pt", ".safetensors")
FEATURES_JSON = "features.json"
FEATURE_LAYOUTS = ("auto", "chw", "hwc")
_FORMAT = "vkd.feature3dgs.features"


def feature_stems(names: Sequence[str]) -> list[str]:
    """The feature-file stem of each image name (see the module docstring); raises DataError on a clash."""
    bare = [Path(n).stem for n in names]
    counts = Counter(bare)
    stems = [Path(n).with_suffix("").as_posix() if counts[b] > 1 else b for n, b in zip(names, bare, strict=True)]
    clash = [s for s, c in Counter(stems).items() if c > 1]
    if clash:
        raise DataError(f"several images of the scene map to the feature file stem {clash[0]!r}; rename them")
    return stems


def _pick(tensors: dict[str, Any], path: Path, key: str) -> Any:
    """The tensor of a file holding several: ``key``, or the only one."""
    if key:
        if key not in tensors:
            raise DataError(f"feature file {path} has no tensor {key!r} (teacher.features_key); it holds: "
                            f"{', '.join(map(str, list(tensors)[:8]))}")
        return tensors[key]
    if len(tensors) != 1:
        raise DataError(f"feature file {path} holds {len(tensors)} tensors ({', '.join(map(str, list(tensors)[:8]))})"
                        "; name the features with teacher.features_key")
    return next(iter(tensors.values()))


def read_feature_file(path: Path, key: str = "") -> Tensor:
    """One feature file as a float32 tensor, in the file's own layout (2-D or 3-D).

    Args:
        path: a ``.npy``, ``.pt`` or ``.safetensors`` file.
        key: the tensor's name in a file holding several (``.pt`` dict, ``.safetensors``).

    Raises:
        DataError: unreadable, unknown format, not a single floating-point tensor, not 2-D/3-D, empty or non-finite.
    """
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(path, mmap_mode="r", allow_pickle=False)  # only this file is read
            if not np.issubdtype(arr.dtype, np.floating):
                raise DataError(f"feature file {path} holds {arr.dtype} values; expected floating-point features")
            value: Any = torch.from_numpy(np.array(arr, dtype=np.float32))
        elif suffix == ".pt":
            value = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain containers only
            if isinstance(value, dict):
                value = _pick(value, path, key)
        elif suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                value = f.get_tensor(_pick({n: n for n in f.keys()}, path, key))
        else:
            raise DataError(f"feature file {path}: unknown format {suffix!r}; use {', '.join(FEATURE_EXTENSIONS)}")
    except DataError:
        raise
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as err:
        raise DataError(f"cannot read feature file {path}: {first_line(err, 200)}") from None
    if not isinstance(value, Tensor):
        raise DataError(f"feature file {path} holds a {type(value).__name__}, not a tensor")
    if not value.is_floating_point():
        raise DataError(f"feature file {path} holds {value.dtype} values; expected floating-point features")
    if value.ndim not in (2, 3):
        raise DataError(f"feature file {path} holds a {value.ndim}-D tensor {tuple(value.shape)}; expected "
                        "[D, h, w], [h, w, D] or [h, w]")
    if value.numel() == 0:
        raise DataError(f"feature file {path} holds an empty tensor {tuple(value.shape)}")
    value = value.float()
    if not torch.isfinite(value).all():
        raise DataError(f"feature file {path} has non-finite values")
    return value


def _aspect_gap(h: int, w: int, image_hw: tuple[int, int]) -> float:
    return abs(math.log(w / h) - math.log(image_hw[1] / image_hw[0]))


def to_chw(value: Tensor, layout: str, image_hw: tuple[int, int]) -> Tensor:
    """A file's tensor as ``[D, h, w]``.

    Args:
        value: ``[D, h, w]``, ``[h, w, D]`` or ``[h, w]``.
        layout: ``chw`` | ``hwc`` | ``auto`` (the reading whose grid aspect is closer to the image's; ties: chw).
        image_hw: ``(H, W)`` of the image the features describe.

    Returns:
        ``[D, h, w]`` (``[1, h, w]`` for a 2-D map).
    """
    if value.ndim == 2:
        return value[None]
    if layout == "auto":
        a, b, c = value.shape
        layout = "hwc" if _aspect_gap(a, b, image_hw) < _aspect_gap(b, c, image_hw) - 1e-9 else "chw"
    return value.permute(2, 0, 1).contiguous() if layout == "hwc" else value


def _folder_layout(features_dir: Path) -> str | None:
    """The layout recorded in the folder's features.json, when it has a readable one."""
    try:
        layout = json.loads((features_dir / FEATURES_JSON).read_text()).get("layout")
    except (OSError, ValueError, AttributeError):
        return None
    return layout if layout in ("chw", "hwc") else None


class FeatureFiles(nn.Module):
    """The ``teacher.kind=files`` teacher: each image's maps read from its feature file instead of computed.

    It has no image model: :func:`vkd.feature3dgs.teacher.prepare_teacher` fills the feature cache from
    :meth:`stored_maps`. Text-aligned when given a text encoder ``prompts -> [K, D]``.

    Args:
        features_dir: the folder of feature files.
        names: the scene's image names (camera order).
        image_sizes: ``(H, W)`` of each image (the ``auto`` layout rule).
        layout: ``auto`` | ``chw`` | ``hwc``.
        key: tensor name in files holding several.
        text_encoder: ``prompts -> [K, D]`` L2-normalised, or ``None`` (settable later: the width D is known
            once the first file is read, ``dim``).

    Raises:
        DataError: the folder is missing, or an image has no feature file (or two).
    """

    def __init__(self, features_dir: str | Path, names: Sequence[str], image_sizes: Sequence[tuple[int, int]],
                 layout: str = "auto", key: str = "",
                 text_encoder: Callable[[Sequence[str]], Tensor] | None = None):
        super().__init__()
        self.features_dir = Path(features_dir)
        if not self.features_dir.is_dir():
            raise DataError(f"teacher.features_dir {self.features_dir} is not a directory")
        if layout not in FEATURE_LAYOUTS:
            raise DataError(f"teacher.features_layout must be one of {', '.join(FEATURE_LAYOUTS)}, got {layout!r}")
        self.names, self.image_sizes = list(names), list(image_sizes)
        self.layout = (_folder_layout(self.features_dir) or "auto") if layout == "auto" else layout
        self.tensor_key = key
        self.paths = self._find_files()
        self.text_encoder = text_encoder
        self.random_init = False
        self.dim = int(self.read(0).shape[0])

    def _find_files(self) -> list[Path]:
        paths, missing = [], []
        for name, stem in zip(self.names, feature_stems(self.names), strict=True):
            found = [p for p in (self.features_dir / (stem + ext) for ext in FEATURE_EXTENSIONS) if p.is_file()]
            if len(found) > 1:
                raise DataError(f"image {name} has {len(found)} feature files in {self.features_dir} "
                                f"({', '.join(p.name for p in found)}); keep one")
            if not found:
                missing.append((name, stem))
            else:
                paths.append(found[0])
        if missing:
            (name, stem), more = missing[0], f" (and {len(missing) - 1} more images)" if len(missing) > 1 else ""
            raise DataError(f"no feature file for image {name} in {self.features_dir}: expected {stem}.npy, "
                            f"{stem}.pt or {stem}.safetensors{more}")
        return paths

    @property
    def text_aligned(self) -> bool:
        return self.text_encoder is not None

    @property
    def key(self) -> str:
        """Cache identity: the folder, layout, tensor key, and every file's name, size and mtime."""
        h = hashlib.sha1(f"{self.layout}|{self.tensor_key}".encode())
        for p in self.paths:
            st = p.stat()
            h.update(f"|{p.relative_to(self.features_dir).as_posix()}|{st.st_size}|{st.st_mtime_ns}".encode())
        return f"files:{self.features_dir.resolve()}:{h.hexdigest()[:12]}"

    def read(self, index: int) -> Tensor:
        """Features of image ``index`` as float32 ``[D, h, w]``."""
        return to_chw(read_feature_file(self.paths[index], self.tensor_key), self.layout, self.image_sizes[index])

    def stored_maps(self) -> Iterator[tuple[int, Tensor]]:
        """``(index, [D, h, w])`` for every image; raises DataError when the width D differs between files."""
        for i in range(len(self.paths)):
            f = self.read(i)
            if f.shape[0] != self.dim:
                raise DataError(f"feature widths differ across files: {self.paths[0].name} has D={self.dim}, "
                                f"{self.paths[i].name} has D={f.shape[0]}"
                                + ("; set teacher.features_layout if a file was misread" if self.layout == "auto"
                                   else ""))
            yield i, f

    def forward(self, images: Tensor) -> Tensor:
        raise UserError("teacher.kind=files reads its maps from teacher.features_dir; it computes none from images")

    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """``[K, D]`` L2-normalised text embeddings (``teacher.text_encoder``)."""
        if self.text_encoder is None:
            raise UserError("teacher.kind=files has no teacher.text_encoder: text queries need one")
        return self.text_encoder(prompts)


def export_cache(cache: FeatureCache, names: Sequence[str], teacher_info: dict, out: str | Path) -> dict:
    """Copy a complete feature cache into the documented format: ``<out>/<stem>.npy`` ``[D, h, w]`` float16 and
    ``features.json`` (written last, atomically).

    The cache files are already fp16 ``[D, h, w]`` ``.npy``, so the copy is byte-exact: reading it back with
    ``teacher.kind=files`` gives the same cache.

    Returns:
        the ``features.json`` content.
    """
    out = Path(out)
    stems = feature_stems(names)
    files: dict[str, str] = {}
    sizes = set()
    for i, (name, stem) in enumerate(zip(names, stems, strict=True)):
        sizes.add(tuple(np.load(cache.file(i), mmap_mode="r").shape[1:]))  # header only
        dst = out / f"{stem}.npy"
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_path(dst)
        shutil.copyfile(cache.file(i), tmp)
        os.replace(tmp, dst)  # a reader never sees a torn file
        files[name] = f"{stem}.npy"
    keep = ("kind", "model", "pretrained", "target", "dense", "tiny_clip_dir", "random_init", "text_aligned",
            "features_dir", "text_encoder")
    meta = {"format": _FORMAT, "version": 1, "layout": "chw", "dtype": "float16", "dim": int(cache.shape[0]),
            "size": list(next(iter(sizes))) if len(sizes) == 1 else None, "num_images": len(files),
            "teacher": {k: teacher_info[k] for k in keep if teacher_info.get(k) is not None}
            | {"key": cache.manifest.get("teacher")}, "files": files}
    atomic_write_text(out / FEATURES_JSON, json.dumps(meta, indent=1))
    return meta
