"""Fréchet distance between feature statistics (FID), streaming in float64, across processes.

``FID = ‖μ₁ − μ₂‖² + Tr Σ₁ + Tr Σ₂ − 2·Σᵢ √λᵢ(Σ₁Σ₂)``, with μ, Σ accumulated as float64 sums
(n, S = Σx, Q = Σxxᵀ; torchmetrics' state layout) so batches and processes merge by addition, and the
trace of the matrix square root from the complex eigenvalues of Σ₁Σ₂ (as torchmetrics and
torch-fidelity do; ``scipy.linalg.sqrtm(disp=False)`` is deprecated in SciPy 1.17 and gone in 1.18).

Inputs are images as they would be written to PNG: uint8. Generator outputs in [-1, 1] are mapped
to [0, 1] and quantised (:func:`quantize`). The extractor is any ``nn.Module`` (see
:mod:`vkd.metrics.extractors`); the default of ``vkd fid`` and of
:func:`vkd.metrics.fid_command.fid_command` is Inception (the embedded ``digits`` CNN only by name).

:func:`feature_pass` is the one pass over an image set that every metric reads from: the streamed (n, Σx, Σxxᵀ)
of the features, and only when a metric needs them the feature rows (KID, precision/recall), the class logits
(IS), the spatial statistics (sFID) and the per-image CLIP cosines (CLIP score). It runs with TF32 off
(:func:`no_tf32`). Reference statistics are ``.npz`` files read lazily (:func:`load_reference`).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from vkd.data.files import IMAGE_EXTENSIONS, check_finite_array, read_image
from vkd.errors import DataError
from vkd.metrics.extractors import extract_outputs

__all__ = [
    "FrechetStats",
    "ReferenceStats",
    "FeatureSet",
    "feature_pass",
    "features_from_dir",
    "no_tf32",
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
    """Mean ``[d]`` and covariance ``[d, d]`` (float64) of a feature set, with optional metadata.

    Attributes:
        arrays: the optional arrays that were asked for and present: ``features`` ``[N, d]`` (KID, precision/recall),
            ``mu_s`` ``[s]`` / ``sigma_s`` ``[s, s]`` (sFID).
        available: every array name in the file (for error messages), including those not read.
    """

    mu: np.ndarray
    sigma: np.ndarray
    num: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    available: tuple[str, ...] = ()


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


OPTIONAL_ARRAYS = ("features", "mu_s", "sigma_s")  # what vkd writes besides mu / sigma, and reads on request


def save_reference(ref: ReferenceStats, path: str | Path) -> Path:
    """Write ``mu``, ``sigma`` (float64; EDM / pytorch-fid layout), ``num``, ``ref.arrays`` (``features`` float32,
    ``mu_s`` / ``sigma_s`` float64) and the metadata (strings; other values as JSON strings)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {}
    for k, v in ref.meta.items():
        extra[k] = np.asarray(json.dumps(v)) if not isinstance(v, str) else np.asarray(v)
    for k, v in ref.arrays.items():
        extra[k] = np.asarray(v, dtype=np.float32 if k == "features" else np.float64)
    with open(path, "wb") as fh:  # np.savez would append ".npz" to other names
        np.savez(fh, mu=ref.mu.astype(np.float64), sigma=ref.sigma.astype(np.float64),
                 num=np.asarray(-1 if ref.num is None else ref.num, dtype=np.int64), **extra)
    return path


def _npz_header(data: Any, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one ``.npz`` member from its ``.npy`` header alone (the data is not read)."""
    member = key + ".npy" if key + ".npy" in data.zip.namelist() else key
    with data.zip.open(member) as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
        else:  # 3.0 (utf-8 field names): only the private reader knows it
            shape, _, dtype = np.lib.format._read_array_header(fh, version)
    return tuple(shape), np.dtype(dtype)


def load_reference(path: str | Path, arrays: Collection[str] = ()) -> ReferenceStats:
    """Read a ``.npz`` with ``mu`` and ``sigma`` (vkd, EDM, pytorch-fid or ADM reference batches), lazily.

    Only ``mu``, ``sigma``, ``num``, scalar metadata entries and the optional ``arrays`` asked for (of
    :data:`OPTIONAL_ARRAYS`) are read; every other member is inspected through its ``.npy`` header only, so an ADM
    reference batch that also holds its images (``arr_0``, ≈1.8 GB) costs the size of μ and Σ.

    Args:
        path: the ``.npz``.
        arrays: optional arrays to read when present (``features``, ``mu_s``, ``sigma_s``); see
            ``ReferenceStats.available`` for what the file has.

    Raises:
        DataError: not a readable ``.npz``, no ``mu`` / ``sigma``, wrong shapes, non-finite values, ``num`` < 2.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"reference statistics not found: {path}")
    extra: dict[str, np.ndarray] = {}
    try:
        with np.load(str(path), allow_pickle=False) as data:  # an NpzFile: members are read on access only
            files = tuple(data.files)
            if "mu" not in files or "sigma" not in files:
                raise DataError(f"{path}: a reference .npz needs 'mu' and 'sigma' arrays, found {sorted(files)}")
            mu = np.asarray(data["mu"], dtype=np.float64)
            sigma = np.asarray(data["sigma"], dtype=np.float64)
            num = int(data["num"]) if "num" in files else None
            meta: dict[str, Any] = {}
            for k in files:
                if k in ("mu", "sigma", "num"):
                    continue
                if k in arrays:
                    extra[k] = np.asarray(data[k], dtype=np.float64 if k != "features" else None)
                    continue
                shape, dtype = _npz_header(data, k)
                if shape == () and dtype.kind == "U":  # metadata strings; never a large array
                    text = str(data[k])
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
    if "features" in extra:
        f = extra["features"]
        if f.ndim != 2 or f.shape[1] != mu.shape[0]:
            raise DataError(f"{path}: features {f.shape} are not [N, {mu.shape[0]}]")
    if "mu_s" in extra or "sigma_s" in extra:
        ms, ss = extra.get("mu_s"), extra.get("sigma_s")
        if ms is None or ss is None or ms.ndim != 1 or ss.shape != (ms.shape[0], ms.shape[0]):
            raise DataError(f"{path}: mu_s / sigma_s are not a [s] / [s, s] pair")
    for k, v in extra.items():
        check_finite_array(v, f"{path}: {k}")
    if num is not None and num < 0:
        num = None
    if num is None and "features" in extra:
        num = int(extra["features"].shape[0])
    if num is not None and num < 2:
        raise DataError(f"{path}: reference statistics from {num} image(s); FID needs at least 2")
    return ReferenceStats(mu, sigma, num, meta, extra, files)


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


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """TF32 off for CUDA matmuls and cuDNN convolutions inside the block, the caller's settings restored after it on
    every exit path (PyTorch enables TF32 convolutions by default on Ampere+ GPUs, ≈1e-3 relative error per layer)."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    if hasattr(matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):  # torch >= 2.9: the new API only
        saved = (matmul.fp32_precision, conv.fp32_precision)  # (reading the legacy flags may raise after it is used)
        matmul.fp32_precision, conv.fp32_precision = "ieee", "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision, conv.fp32_precision = saved
    else:  # pragma: no cover - older torch
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@dataclass
class FeatureSet:
    """What one pass over an image set gives (on every process: all samples, in sample order).

    Attributes:
        stats: streamed statistics of the features (``None`` when no extractor ran, e.g. CLIP score only).
        features: ``[N, d]`` float32 rows (kept for KID, precision/recall and ``--save-stats``).
        logits: ``[N, C]`` float32 class logits (Inception Score).
        spatial: streamed statistics of the spatial features (sFID).
        clip_cos: ``[N]`` float64 cosine between each image's and its prompt's CLIP embeddings.
        num: N.
        seconds: wall time of the pass (reading, decoding, networks).
    """

    stats: FrechetStats | None
    features: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    spatial: FrechetStats | None = None
    clip_cos: torch.Tensor | None = None
    num: int = 0
    seconds: float = 0.0


def _gather_rows(rows: torch.Tensor, accelerator: Any) -> torch.Tensor:
    """Concatenate every process's rows ``[n_r, ...]`` in rank order (ranks hold contiguous shares, see
    :func:`rank_share`, so this is sample order)."""
    dev = accelerator.device
    counts = accelerator.gather(torch.tensor([rows.shape[0]], device=dev)).tolist()
    padded = accelerator.gather(accelerator.pad_across_processes(rows.to(dev), dim=0)).cpu()
    width = padded.shape[0] // len(counts)
    return torch.cat([padded[r * width:r * width + c] for r, c in enumerate(counts)])


def feature_pass(batches: Iterable[torch.Tensor | tuple[torch.Tensor, Sequence[str] | None]],
                 extractor: nn.Module | None, device: str | torch.device = "cpu", *,
                 want: Collection[str] = ("features",), keep: Collection[str] = (),
                 clip: Any = None, accelerator: Any = None, sharded: bool = False,
                 progress: str | None = None) -> FeatureSet:
    """One pass of the extractor (and the CLIP scorer) over uint8 image batches, every metric's inputs at once.

    Args:
        batches: uint8 ``[b, 3, H, W]`` batches, or ``(images, prompts)`` pairs (``prompts``: ``b`` strings, needed
            by ``clip``).
        extractor: an extractor of :mod:`vkd.metrics.extractors` (``None``: CLIP score only).
        device: where the networks run.
        want: extractor outputs to compute: ``features`` (always streamed into ``stats``), ``logits``, ``spatial``.
        keep: rows to keep in memory: ``features``, ``logits``.
        clip: a :class:`vkd.metrics.clip_score.ClipScorer` (``None``: no CLIP score).
        accelerator: ``accelerate.Accelerator`` for several processes (``None``: one).
        sharded: the batches come from a loader accelerate sharded, and each is gathered
            (``gather_for_metrics``, which drops the padding duplicates); otherwise each process holds a disjoint
            contiguous share (:func:`rank_share`): sums are reduced and rows gathered at the end.
        progress: progress-bar label.

    Returns:
        :class:`FeatureSet`, identical on every process.
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    want = set(want) | ({"features"} if extractor is not None else set())
    if extractor is not None:
        extractor = extractor.to(device).eval()
    multi = accelerator is not None and accelerator.num_processes > 1
    stats = FrechetStats() if extractor is not None else None
    spatial = FrechetStats() if "spatial" in want else None
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in sorted(keep)}  # one order on every process (collectives)
    if clip is not None:
        rows["clip"] = []
    with no_tf32(), torch.no_grad():
        for item in tqdm(batches, desc=progress, disable=None if progress else True, leave=False):
            images, prompts = item if isinstance(item, (tuple, list)) else (item, None)
            out: dict[str, torch.Tensor] = {}
            if extractor is not None:
                out = extract_outputs(extractor, images.to(device), want)
            if clip is not None:
                if prompts is None:
                    raise DataError("CLIP score needs a prompt for every image; these images came without prompts "
                                    "(a run whose generator gives none): pass --prompts FILE (line i = sample i)")
                out["clip"] = clip.cosines(images, list(prompts))
            if sharded and multi:
                out = accelerator.gather_for_metrics(out)
            if stats is not None:
                stats.update(out["features"])
            if spatial is not None:
                spatial.update(out["spatial"])
            for k, lst in rows.items():
                lst.append(out[k].detach().float().cpu() if k != "clip" else out[k].detach().cpu())
    cat = {k: (torch.cat(v) if v else None) for k, v in rows.items()}
    if multi and not sharded:
        for s in (stats, spatial):
            if s is not None:
                s.reduce(accelerator)
        cat = {k: (_gather_rows(v, accelerator) if v is not None else None) for k, v in cat.items()}
    num = stats.n if stats is not None else (int(cat["clip"].shape[0]) if cat.get("clip") is not None else 0)
    return FeatureSet(stats, cat.get("features"), cat.get("logits"), spatial, cat.get("clip"), num,
                      time.perf_counter() - t0)


def stats_from_batches(batches: Iterable[torch.Tensor], extractor: nn.Module, device: str | torch.device = "cpu",
                       progress: str | None = None) -> FrechetStats:
    """Accumulate extractor features of uint8 image batches ``[b, C, H, W]`` (one process, TF32 off)."""
    return feature_pass(batches, extractor, device, progress=progress).stats


def stats_from_images(images: torch.Tensor, extractor: nn.Module, batch_size: int = 256,
                      device: str | torch.device = "cpu") -> FrechetStats:
    """Statistics of an in-memory uint8 image tensor ``[N, C, H, W]``."""
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (see quantize()), got {images.dtype}")
    return stats_from_batches((images[i:i + batch_size] for i in range(0, len(images), batch_size)),
                              extractor, device)


class _IndexedImages(torch.utils.data.Dataset):
    """``(uint8 [3, H, W], index)`` of a list of image files: the index finds the image's prompt after sharding."""

    def __init__(self, files: list[Path]):
        self.images = ImageFileDataset(files)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], i


def features_from_dir(path: str | Path, extractor: nn.Module | None, batch_size: int = 64, accelerator: Any = None,
                      num: int | None = None, num_workers: int = 0, *, scan: ImageDirScan | None = None,
                      prompts: Sequence[str] | None = None, min_images: int = 2,
                      **pass_kwargs: Any) -> tuple[FeatureSet, ImageDirScan]:
    """:func:`feature_pass` over an image folder (the first ``num`` readable files by name).

    Under several processes the loader is sharded by accelerate and every batch gathered (``gather_for_metrics``),
    so each process ends with all samples in file order.

    Args:
        path: the folder (see :func:`scan_image_dir`).
        extractor, batch_size, accelerator, num_workers: as for :func:`feature_pass` and ``DataLoader``.
        num: use the first ``num`` readable files (``None``: all).
        scan: a scan of ``path`` already made (the folder is not decoded twice).
        prompts: one prompt per used file (CLIP score).
        min_images: fewer readable images is a ``DataError``.
        **pass_kwargs: ``want``, ``keep``, ``clip``, ``progress`` of :func:`feature_pass`.
    """
    scan = scan_image_dir(path) if scan is None else scan
    files = scan.files if num is None else scan.files[:num]
    if len(files) < min_images:
        raise DataError(f"{path}: FID needs at least {min_images} readable images, found {len(files)}"
                        + (f" ({len(scan.skipped)} unreadable skipped)" if scan.skipped else ""))
    if prompts is not None and len(prompts) != len(files):
        raise DataError(f"{path}: {len(prompts)} prompts for {len(files)} images")
    loader = torch.utils.data.DataLoader(_IndexedImages(files), batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers)
    device = torch.device("cpu") if accelerator is None else accelerator.device
    if accelerator is not None:
        loader = accelerator.prepare_data_loader(loader)

    def batches() -> Iterator[tuple[torch.Tensor, list[str] | None]]:
        for images, idx in loader:
            yield images, (None if prompts is None else [prompts[int(i)] for i in idx])

    pass_kwargs.setdefault("progress", f"features {Path(path).name}")
    fs = feature_pass(batches(), extractor, device, accelerator=accelerator, sharded=True, **pass_kwargs)
    return fs, scan


def stats_from_dir(path: str | Path, extractor: nn.Module, batch_size: int = 64, accelerator: Any = None,
                   num: int | None = None, num_workers: int = 0) -> tuple[FrechetStats, ImageDirScan]:
    """Statistics of an image folder; under several processes the loader is sharded by accelerate and the
    features gathered with ``gather_for_metrics`` (which drops the padding duplicates)."""
    fs, scan = features_from_dir(path, extractor, batch_size, accelerator, num, num_workers)
    return fs.stats, scan


def rank_share(num: int, rank: int, world: int) -> range:
    """Global sample indices of ``rank``: ⌊N/W⌋ each, one more for ``rank < N mod W`` (contiguous)."""
    base, extra = divmod(num, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))
