"""Ground-truth density maps (spec §7): kernel widths, splatting, 1/8 downsampling and the disk cache.

The splatting itself is :func:`vkd.render.splat_points_2d` (one matrix product per image, milliseconds
where the per-head ``scipy.ndimage.gaussian_filter`` reference takes seconds to minutes). This module
adds what is specific to crowd counting:

* kernel widths: geometry-adaptive (``σ_i = β · mean distance to the k nearest heads``, ShanghaiTech A),
  nearest-neighbour capped (``σ_i = min(d_1, cap)``, UCF-QNRF) or fixed (``σ = 15``, ShanghaiTech B),
  computed with ``scipy.spatial.cKDTree`` (O(P log P); a dense ``cdist`` would need 1 GB at 12k heads);
* count-preserving downsampling to the network's 1/8 output grid (zero-pad + 8×8 sum-pool), and the
  reference's non-preserving ``bicubic × 64`` for parity;
* an on-disk cache keyed by the points and every kernel parameter, outside the data set
  (``$VKD_CACHE_DIR/skt/density/<data set fingerprint>/``): by default the maps sum-pooled to the 1/8 grid in
  float16 (1/128 of the full-resolution float32 bytes), or full-resolution float32 for ``bicubic_x64``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree

from vkd.cache import cache_dir, tmp_path
from vkd.render import geometry_adaptive_sigmas, splat_points_2d

__all__ = [
    "KernelSpec",
    "adaptive_sigmas",
    "nn_capped_sigmas",
    "kernel_sigmas",
    "density_map",
    "sum_pool",
    "bicubic_x64",
    "downsample_density",
    "CacheResolution",
    "DensityCache",
    "dataset_fingerprint",
    "density_cache_dir",
]

KernelKind = Literal["adaptive", "nn_capped", "fixed"]
BorderMode = Literal["constant", "reflect", "mirror", "renormalize"]
# What a DensityCache stores: the sum-pooled 1/8 grid in float16, or the full-resolution float32 map.
CacheResolution = Literal["eighth", "full"]


@dataclass(frozen=True)
class KernelSpec:
    """How one image's heads become a density map.

    Attributes:
        kind: ``adaptive`` (k-NN, β), ``nn_capped`` (nearest neighbour, capped) or ``fixed``.
        k: neighbours averaged by ``adaptive``.
        beta: scale of ``adaptive`` (0.3: σ = 0.1·(d1+d2+d3) for k=3).
        cap: upper bound of ``nn_capped`` σ.
        sigma: the ``fixed`` σ.
        border: ``renormalize`` (vkd default, count-preserving), ``constant`` (SHA/QNRF reference, loses
            border mass), ``reflect`` (SHB reference, scipy's edge-repeating reflect) or ``mirror``.
        truncate: kernel radius in σ (scipy's 4.0).
    """

    kind: KernelKind = "adaptive"
    k: int = 3
    beta: float = 0.3
    cap: float = 30.0
    sigma: float = 15.0
    border: BorderMode = "renormalize"
    truncate: float = 4.0


def _single_point_sigma(image_size: tuple[int, int]) -> float:
    # The reference's fallback for an image with one head: mean(H, W) / 4.
    return float(np.mean(image_size)) / 4.0


def adaptive_sigmas(points: np.ndarray, image_size: tuple[int, int], k: int = 3, beta: float = 0.3) -> np.ndarray:
    """Geometry-adaptive σ (MCNN/CSRNet): ``σ_i = β · mean of the distances to the k nearest other heads``.

    With ``k=3, β=0.3`` this equals the reference's ``0.1·(d1+d2+d3)`` (its KDTree query of k+1 returns the
    point itself first). With fewer than ``k`` other heads the available ones are averaged (the reference
    would produce an infinite σ); a single head gets ``mean(H, W)/4`` as in the reference.

    Args:
        points: ``[P, 2]`` (x, y).
        image_size: ``(H, W)``.
        k: neighbours.
        beta: scale.

    Returns:
        ``[P]`` float64 σ.
    """
    points = torch.from_numpy(np.asarray(points, dtype=np.float64).reshape(-1, 2))
    return geometry_adaptive_sigmas(points, k=k, beta=beta, image_size=tuple(image_size)).numpy()


def nn_capped_sigmas(points: np.ndarray, image_size: tuple[int, int], cap: float = 30.0) -> np.ndarray:
    """UCF-QNRF reference σ: ``min(distance to the nearest other head, cap)``; one head gets ``mean(H, W)/4``."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    n = len(points)
    if n == 0:
        return np.zeros(0)
    if n == 1:
        return np.array([_single_point_sigma(image_size)])
    dist, _ = cKDTree(points, leafsize=2048).query(points, k=2)
    return np.minimum(dist[:, 1], cap)


def kernel_sigmas(points: np.ndarray, image_size: tuple[int, int], spec: KernelSpec) -> np.ndarray:
    """``[P]`` σ of each head under ``spec``."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if spec.kind == "adaptive":
        return adaptive_sigmas(points, image_size, spec.k, spec.beta)
    if spec.kind == "nn_capped":
        return nn_capped_sigmas(points, image_size, spec.cap)
    if spec.kind == "fixed":
        return np.full(len(points), float(spec.sigma))
    raise ValueError(f"unknown kernel kind {spec.kind!r}")


def density_map(points: np.ndarray, height: int, width: int, spec: KernelSpec = KernelSpec()) -> torch.Tensor:
    """Full-resolution density map of one image.

    Each head is a unit delta at ``(⌊y⌋, ⌊x⌋)`` blurred by its σ (scipy's truncated kernel) with ``spec.border``
    handling. Points must already be inside the image (the datasets drop and count the others).

    Args:
        points: ``[P, 2]`` (x, y) pixel coordinates.
        height: ``H``.
        width: ``W``.
        spec: kernel and border.

    Returns:
        ``[H, W]`` float32; sums to ``P`` under ``renormalize`` and ``reflect``.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    sigmas = kernel_sigmas(points, (height, width), spec)
    return splat_points_2d(torch.from_numpy(points), torch.from_numpy(sigmas), height, width,
                           truncate=spec.truncate, border=spec.border, dtype=torch.float32)


def sum_pool(density: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """Count-preserving downsampling: zero-pad bottom/right to a multiple of ``factor``, then sum ``factor²`` blocks.

    Args:
        density: ``[..., H, W]``.
        factor: the network stride (8 for CSRNet).

    Returns:
        ``[..., ⌈H/f⌉, ⌈W/f⌉]`` with the same sum.
    """
    if density.ndim < 2:
        raise ValueError(f"density must be [..., H, W], got shape {tuple(density.shape)}")
    *lead, h, w = density.shape
    x = density.reshape(-1, 1, h, w)
    x = F.pad(x, (0, (-w) % factor, 0, (-h) % factor))
    x = F.avg_pool2d(x, factor) * (factor * factor)
    return x.reshape(*lead, x.shape[-2], x.shape[-1])


def bicubic_x64(density: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """Reference downsampling (``cv2.resize(INTER_CUBIC) × 64`` to ``⌈H/8⌉×⌈W/8⌉``): NOT count-preserving.

    torch's bicubic (a = -0.75, half-pixel centres, no antialiasing) is the same kernel as OpenCV's.
    """
    *lead, h, w = density.shape
    out_h, out_w = -(-h // factor), -(-w // factor)
    x = density.reshape(-1, 1, h, w).float()
    x = F.interpolate(x, size=(out_h, out_w), mode="bicubic", align_corners=False) * (factor * factor)
    return x.reshape(*lead, out_h, out_w)


def downsample_density(density: torch.Tensor, mode: Literal["sum_pool", "bicubic_x64"] = "sum_pool",
                       factor: int = 8) -> torch.Tensor:
    """Density on the network output grid (``[..., H, W]`` → ``[..., ⌈H/8⌉, ⌈W/8⌉]``)."""
    if mode == "sum_pool":
        return sum_pool(density, factor)
    if mode == "bicubic_x64":
        return bicubic_x64(density, factor)
    raise ValueError(f"unknown downsample mode {mode!r}")


def dataset_fingerprint(root: str | Path, layout: str, split: str, annotations: Sequence[str | Path]) -> str:
    """A cheap identity of one split of a data set, the name of its density-cache directory.

    sha256 over the resolved root, the layout, the split and, for every annotation file (sorted), its path
    relative to the root, size and modification time: one ``stat`` per file, nothing is read. Editing,
    adding or removing an annotation gives a new fingerprint (and a new directory); the maps themselves are
    also keyed by their points (:meth:`DensityCache.key`), so a stale map is never read either way.

    Returns:
        ``<root name>-<split>-<16 hex digits>`` (the readable prefix says which data set a directory holds).
    """
    root = Path(root).expanduser()
    resolved = root.resolve()
    digest = hashlib.sha256(json.dumps([str(resolved), layout, split]).encode())
    for ann in sorted(str(a) for a in annotations):
        stat = os.stat(ann)
        rel = os.path.relpath(os.path.abspath(ann), os.path.abspath(root))
        digest.update(json.dumps([rel, stat.st_size, stat.st_mtime_ns]).encode())
    prefix = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{resolved.name or 'root'}-{split}")
    return f"{prefix}-{digest.hexdigest()[:16]}"


def density_cache_dir(root: str | Path, layout: str, split: str, annotations: Sequence[str | Path],
                      base: str | Path | None = None) -> Path:
    """``<base>/<dataset_fingerprint(...)>``; ``base`` defaults to ``$VKD_CACHE_DIR/skt/density``.

    The cache lives outside the data set, so a read-only data set directory works and nothing is written
    under it.
    """
    base = Path(base).expanduser() if base else cache_dir() / "skt" / "density"
    return base / dataset_fingerprint(root, layout, split, annotations)


class DensityCache:
    """Ground-truth density maps cached as ``.npy`` files (memory-mapped on read).

    ``resolution="eighth"`` stores each map sum-pooled to the network's 1/8 grid (:func:`sum_pool`, computed in
    float64) in float16: ``2·⌈H/8⌉·⌈W/8⌉`` bytes instead of ``4·H·W``. Per-cell sums of 64 pixels sit far above
    float16's smallest normal (6.1e-5) for any realistic σ and far below its maximum (65504); the count error this
    rounding introduces is measured in ``tests/skt/test_density.py`` (a few thousandths of a person per
    UCF-QNRF-sized image). A training crop on the 8-pixel grid reads its cells directly, which equals sum-pooling
    the full-resolution crop (:class:`vkd.skt.datasets.CrowdTrainDataset`). ``resolution="full"`` (the default of
    this class, kept for callers that read pixels) stores the ``[H, W]`` float32 map that ``bicubic_x64`` needs.

    The key hashes the points, the image size, every kernel parameter and the resolution, so changing any of them
    makes a new map instead of reading a stale one. ``directory=None`` disables caching (maps are computed on each
    call).

    Args:
        directory: where the files go (see :func:`density_cache_dir`), or ``None``.
        resolution: ``eighth`` or ``full``.
        factor: the network stride of the ``eighth`` grid.
    """

    def __init__(self, directory: str | Path | None, resolution: CacheResolution = "full", factor: int = 8):
        if resolution not in ("eighth", "full"):
            raise ValueError(f"resolution must be 'eighth' or 'full', got {resolution!r}")
        self.directory = Path(directory) if directory is not None else None
        self.resolution = resolution
        self.factor = int(factor)

    @property
    def dtype(self) -> np.dtype:
        """float16 for ``eighth``, float32 for ``full``."""
        return np.dtype(np.float16 if self.resolution == "eighth" else np.float32)

    def shape(self, height: int, width: int) -> tuple[int, int]:
        """The stored map's shape: ``(⌈H/8⌉, ⌈W/8⌉)`` for ``eighth``, ``(H, W)`` for ``full``."""
        if self.resolution == "eighth":
            return -(-height // self.factor), -(-width // self.factor)
        return height, width

    def key(self, points: np.ndarray, height: int, width: int, spec: KernelSpec) -> str:
        digest = hashlib.sha1()
        digest.update(np.ascontiguousarray(points, dtype=np.float64).tobytes())
        # The full-resolution key is the one of the previous format (same files for the same inputs).
        extra = [] if self.resolution == "full" else [self.resolution, self.factor, "float16"]
        digest.update(json.dumps([height, width, spec.__dict__, *extra], sort_keys=True).encode())
        return digest.hexdigest()[:20]

    def build(self, points: np.ndarray, height: int, width: int, spec: KernelSpec) -> np.ndarray:
        """The map at this cache's resolution, computed (no disk)."""
        full = density_map(points, height, width, spec)  # [H, W] float32
        if self.resolution == "full":
            return full.numpy()
        # pooled in float64, then one rounding to float16
        return sum_pool(full.double(), self.factor).to(torch.float16).numpy()

    def get(self, points: np.ndarray, height: int, width: int, spec: KernelSpec, name: str = "map") -> np.ndarray:
        """The stored map (:meth:`shape`, :attr:`dtype`; a read-only memory map when cached)."""
        if self.directory is None:
            return self.build(points, height, width, spec)
        path = self.directory / f"{name}-{self.key(points, height, width, spec)}.npy"
        if path.is_file():
            try:
                arr = np.load(path, mmap_mode="r")
                if arr.shape == self.shape(height, width) and arr.dtype == self.dtype:
                    return arr
            except (OSError, ValueError):
                pass  # a torn file from an interrupted run: rebuild it
        arr = self.build(points, height, width, spec)
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = tmp_path(path)
        try:
            np.save(tmp, arr)
            os.replace(tmp, path)  # atomic: concurrent workers never see half a file
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return arr
