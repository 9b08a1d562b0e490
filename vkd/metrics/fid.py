"""Fréchet distance between feature statistics (FID), streaming in float64, across processes.

``FID = ‖μ₁ − μ₂‖² + Tr Σ₁ + Tr Σ₂ − 2·Σᵢ √λᵢ(Σ₁Σ₂)``, with μ, Σ accumulated as float64 sums
(n, S = Σx, Q = Σxxᵀ; torchmetrics' state layout) so batches and processes merge by addition, and the
trace of the matrix square root from the complex eigenvalues of Σ₁Σ₂ (as torchmetrics and
torch-fidelity do; ``scipy.linalg.sqrtm(disp=False)`` is deprecated in SciPy 1.17 and gone in 1.18).

Inputs are images as they would be written to PNG: uint8. Generator outputs in [-1, 1] are mapped
to [0, 1] and quantised (:func:`quantize`). The extractor is any ``nn.Module`` (see
:mod:`vkd.metrics.extractors`); the default of ``vkd fid`` (:func:`vkd.metrics.fid_command.fid_command`)
is the embedded ``digits`` CNN, which is *not* Inception and is named so in every output.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from vkd.data.files import IMAGE_EXTENSIONS, check_finite_array, read_image
from vkd.errors import DataError

__all__ = [
    "FrechetStats",
    "ReferenceStats",
    "frechet_distance",
    "quantize",
    "scan_image_dir",
    "ImageFileDataset",
    "stats_from_batches",
    "stats_from_images",
    "stats_from_dir",
    "save_reference",
    "load_reference",
    "rank_share",
    "REPORT_SAMPLES",
]

REPORT_SAMPLES = 50_000  # the count behind published numbers; fewer is a smoke test



# ----------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------


@dataclass
class ReferenceStats:
    """Mean ``[d]`` and covariance ``[d, d]`` (float64) of a feature set, with optional metadata."""

    mu: np.ndarray
    sigma: np.ndarray
    num: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class FrechetStats:
    """Float64 streaming accumulator of (n, S = Σx, Q = Σxxᵀ).

    Args:
        dim: feature dimension d (inferred from the first update when ``None``).
    """

    def __init__(self, dim: int | None = None):
        self.dim = dim
        self.n = 0
        self.s: torch.Tensor | None = None  # [d] float64
        self.q: torch.Tensor | None = None  # [d, d] float64
        if dim is not None:
            self._init(dim, torch.device("cpu"))

    def _init(self, dim: int, device: torch.device) -> None:
        self.dim = dim
        self.s = torch.zeros(dim, dtype=torch.float64, device=device)
        self.q = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: torch.Tensor) -> FrechetStats:
        """Add features ``[N, d]`` (cast to float64 *before* accumulating)."""
        if features.ndim != 2:
            raise ValueError(f"features must be [N, d], got shape {tuple(features.shape)}")
        x = features.detach().to(torch.float64)
        if self.s is None:
            self._init(x.shape[1], x.device)
        if x.shape[1] != self.dim:
            raise ValueError(f"features have d={x.shape[1]}, the accumulator d={self.dim}")
        x = x.to(self.s.device)
        self.n += x.shape[0]
        self.s += x.sum(0)
        self.q += x.T @ x
        return self

    def merge(self, other: FrechetStats) -> FrechetStats:
        """Add another accumulator's sums (batches or processes merge by addition)."""
        if other.s is None:
            return self
        if self.s is None:
            self._init(other.dim, other.s.device)
        if other.dim != self.dim:
            raise ValueError(f"cannot merge d={other.dim} into d={self.dim}")
        self.n += other.n
        self.s += other.s.to(self.s.device)
        self.q += other.q.to(self.q.device)
        return self

    def reduce(self, accelerator: Any) -> FrechetStats:
        """Sum-reduce (n, S, Q) over processes (each rank holds a disjoint share of the samples)."""
        if accelerator is None or accelerator.num_processes == 1:
            return self
        if self.s is None:
            raise ValueError("reduce() needs at least one update on every process")
        dev = accelerator.device
        n = accelerator.reduce(torch.tensor([float(self.n)], dtype=torch.float64, device=dev), "sum")
        self.s = accelerator.reduce(self.s.to(dev), "sum")
        self.q = accelerator.reduce(self.q.to(dev), "sum")
        self.n = int(round(float(n.item())))
        return self

    @property
    def mu(self) -> np.ndarray:
        """Mean ``[d]`` float64."""
        if self.n < 1:
            raise DataError("no features accumulated")
        return (self.s / self.n).cpu().numpy()

    @property
    def sigma(self) -> np.ndarray:
        """Unbiased covariance ``(Q − n μμᵀ)/(n − 1)`` ``[d, d]`` float64."""
        if self.n < 2:
            raise DataError(f"FID needs at least 2 images, got {self.n}")
        mu = self.s / self.n
        cov = (self.q - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return cov.cpu().numpy()

    def to_reference(self, **meta: Any) -> ReferenceStats:
        return ReferenceStats(self.mu, self.sigma, self.n, dict(meta))

    def save_npz(self, path: str | Path, **meta: Any) -> Path:
        """Write ``mu``, ``sigma`` (float64; EDM / pytorch-fid layout), ``num`` and string/number metadata."""
        return save_reference(self.to_reference(**meta), path)


def save_reference(ref: ReferenceStats, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {}
    for k, v in ref.meta.items():
        extra[k] = np.asarray(json.dumps(v)) if not isinstance(v, str) else np.asarray(v)
    with open(path, "wb") as fh:  # np.savez would append ".npz" to other names
        np.savez(fh, mu=ref.mu.astype(np.float64), sigma=ref.sigma.astype(np.float64),
                 num=np.asarray(-1 if ref.num is None else ref.num, dtype=np.int64), **extra)
    return path


def load_reference(path: str | Path) -> ReferenceStats:
    """Read a ``.npz`` with ``mu`` and ``sigma`` (vkd, EDM or pytorch-fid files); other keys are metadata."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"reference statistics not found: {path}")
    try:
        with np.load(str(path), allow_pickle=False) as data:
            if "mu" not in data or "sigma" not in data:
                raise DataError(f"{path}: a reference .npz needs 'mu' and 'sigma' arrays, found {sorted(data.files)}")
            mu = np.asarray(data["mu"], dtype=np.float64)
            sigma = np.asarray(data["sigma"], dtype=np.float64)
            num = int(data["num"]) if "num" in data else None
            meta: dict[str, Any] = {}
            for k in data.files:
                if k in ("mu", "sigma", "num"):
                    continue
                raw = data[k]
                if raw.dtype.kind == "U":
                    text = str(raw)
                    try:
                        meta[k] = json.loads(text)
                    except ValueError:
                        meta[k] = text
    except DataError:
        raise
    except Exception as err:  # empty or truncated file (EOFError, BadZipFile), pickled arrays, bad shapes, ...
        text = str(err).strip()
        raise DataError(f"cannot read reference statistics {path}: "
                        f"{text.splitlines()[0] if text else type(err).__name__}") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise DataError(f"{path}: mu {mu.shape} / sigma {sigma.shape} are not [d] / [d, d]")
    check_finite_array(mu, f"{path}: mu")
    check_finite_array(sigma, f"{path}: sigma")
    if num is not None and num < 0:
        num = None
    if num is not None and num < 2:
        raise DataError(f"{path}: reference statistics from {num} image(s); FID needs at least 2")
    return ReferenceStats(mu, sigma, num, meta)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """FID between two Gaussians, in float64, trace of the square root from ``eigvals(Σ₁Σ₂)``.

    Args:
        mu1, mu2: ``[d]`` means.
        sigma1, sigma2: ``[d, d]`` covariances.

    Returns:
        Python float.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"shape mismatch: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {sigma1.shape}, "
                         f"sigma2 {sigma2.shape}")
    diff = mu1 - mu2
    # eigenvalues of Σ₁Σ₂ are real ≥ 0 in exact arithmetic (similar to Σ₁^½Σ₂Σ₁^½); numerically take the
    # complex square root and keep the real part, like torchmetrics / torch-fidelity
    eig = np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128)
    tr_sqrt = np.sqrt(eig).real.sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_sqrt)


# ----------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------


def quantize(images: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Float images ``[N, C, H, W]`` in ``value_range`` → uint8, as written to PNG (round half up)."""
    lo, hi = value_range
    x = (images.detach().float() - lo) / (hi - lo)
    return (x.clamp(0.0, 1.0) * 255.0 + 0.5).floor().to(torch.uint8)


@dataclass
class ImageDirScan:
    files: list[Path]
    size: tuple[int, int] | None  # (H, W)
    skipped: list[tuple[str, str]]  # (file name, reason)


def scan_image_dir(path: str | Path) -> ImageDirScan:
    """List the readable images directly in a folder (not its subfolders), checking that they share one size.

    Every file is decoded once (:func:`vkd.data.files.read_image`: truncated files, non-images and
    decompression bombs are caught); unreadable files are skipped and reported, never silently; mixed
    sizes raise ``DataError``.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"image directory not found: {path}")
    files, skipped, sizes = [], [], {}
    for f in sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS):
        try:
            size = read_image(f, "RGB").shape[:2]
        except DataError as err:
            skipped.append((f.name, str(err).replace(str(f), f.name)))
            continue
        sizes.setdefault(tuple(size), []).append(f)
        files.append(f)
    if len(sizes) > 1:
        desc = ", ".join(f"{w}x{h} ({len(v)} files, e.g. {v[0].name})" for (h, w), v in sizes.items())
        raise DataError(f"{path}: images have different sizes: {desc}")
    return ImageDirScan(files, next(iter(sizes)) if sizes else None, skipped)


class ImageFileDataset(torch.utils.data.Dataset):
    """uint8 ``[3, H, W]`` RGB tensors of a list of image files (grey is replicated)."""

    def __init__(self, files: list[Path]):
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(read_image(self.files[i], "RGB"))).permute(2, 0, 1)


def _features(extractor: nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    with torch.no_grad():
        return extractor(images.to(device)).to(torch.float64)


def stats_from_batches(batches: Iterable[torch.Tensor], extractor: nn.Module, device: str | torch.device = "cpu",
                       progress: str | None = None) -> FrechetStats:
    """Accumulate extractor features of uint8 image batches ``[b, C, H, W]`` (one process)."""
    device = torch.device(device)
    extractor = extractor.to(device).eval()
    stats = FrechetStats()
    for batch in tqdm(batches, desc=progress, disable=None if progress else True, leave=False):
        stats.update(_features(extractor, batch, device))
    return stats


def stats_from_images(images: torch.Tensor, extractor: nn.Module, batch_size: int = 256,
                      device: str | torch.device = "cpu") -> FrechetStats:
    """Statistics of an in-memory uint8 image tensor ``[N, C, H, W]``."""
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (see quantize()), got {images.dtype}")
    return stats_from_batches((images[i:i + batch_size] for i in range(0, len(images), batch_size)),
                              extractor, device)


def stats_from_dir(path: str | Path, extractor: nn.Module, batch_size: int = 64, accelerator: Any = None,
                   num: int | None = None, num_workers: int = 0) -> tuple[FrechetStats, ImageDirScan]:
    """Statistics of an image folder; under several processes the loader is sharded by accelerate and the
    features gathered with ``gather_for_metrics`` (which drops the padding duplicates)."""
    scan = scan_image_dir(path)
    files = scan.files if num is None else scan.files[:num]
    if len(files) < 2:
        raise DataError(f"{path}: FID needs at least 2 readable images, found {len(files)}"
                        + (f" ({len(scan.skipped)} unreadable skipped)" if scan.skipped else ""))
    loader = torch.utils.data.DataLoader(ImageFileDataset(files), batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers)
    device = torch.device("cpu") if accelerator is None else accelerator.device
    if accelerator is not None:
        loader = accelerator.prepare_data_loader(loader)
    stats = FrechetStats()
    extractor = extractor.to(device).eval()
    for batch in tqdm(loader, desc=f"features {Path(path).name}", disable=None, leave=False):
        feats = _features(extractor, batch, device)
        if accelerator is not None and accelerator.num_processes > 1:
            feats = accelerator.gather_for_metrics(feats)
        stats.update(feats)
    return stats, scan


def rank_share(num: int, rank: int, world: int) -> range:
    """Global sample indices of ``rank``: ⌊N/W⌋ each, one more for ``rank < N mod W`` (contiguous)."""
    base, extra = divmod(num, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))
