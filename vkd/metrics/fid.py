"""Fréchet distance between feature statistics (FID), streaming in float64, across processes.

``FID = ‖μ₁ − μ₂‖² + Tr Σ₁ + Tr Σ₂ − 2·Σᵢ √λᵢ(Σ₁Σ₂)``, with μ, Σ accumulated as float64 sums
(n, S = Σx, Q = Σxxᵀ; torchmetrics' state layout) so batches and processes merge by addition, and the
trace of the matrix square root from the complex eigenvalues of Σ₁Σ₂ (as torchmetrics and
torch-fidelity do; ``scipy.linalg.sqrtm(disp=False)`` is deprecated in SciPy 1.17 and gone in 1.18).

Inputs are images as they would be written to PNG: uint8. Generator outputs in [-1, 1] are mapped
to [0, 1] and quantised (:func:`quantize`). The extractor is any ``nn.Module`` (see
:mod:`vkd.metrics.extractors`); the default of :func:`fid_command` is the embedded ``digits`` CNN,
which is *not* Inception and is named so in every output.
"""

from __future__ import annotations

import importlib
import json
import math
import platform
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from vkd import registry
from vkd.data.files import IMAGE_EXTENSIONS, check_finite_array, read_image
from vkd.engine.runs import run_task_name
from vkd.errors import DataError, UserError
from vkd.metrics.extractors import build_extractor, extractor_info

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
    "fid_command",
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


def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.yaml").is_file()


def _run_generator(run_dir: Path, generators: Mapping[str, Callable[..., Any]]) -> Callable[..., Any]:
    task = run_task_name(run_dir)
    if task not in generators:
        raise UserError(f"{run_dir} is a '{task}' run; FID can sample from runs of: {', '.join(generators)}")
    return generators[task]


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for mod in ("torch_fidelity", "torchmetrics", "accelerate"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except Exception:  # pragma: no cover - optional
            pass
    return out


def fid_command(real: str, fake: str, extractor: str = "digits", inception_weights: str | None = None,
                batch_size: int = 64, num: int | None = None, out_json: str | None = None, device: str = "auto",
                seed: int = 0, save_real_stats: str | None = None,
                run_generators: Mapping[str, Callable[..., Any]] | None = None) -> dict:
    """``vkd fid``: FID between a real set and a fake set.

    Args:
        real: an image folder or a reference ``.npz`` (``mu``, ``sigma``).
        fake: an image folder, a ``.npz`` of statistics, or a run folder (e.g. a BOOT run: ``num`` samples are drawn from its student
            with per-sample noise seeded by ``(seed, index)``, so the set does not depend on the process count).
        extractor: ``digits`` (default, embedded, *not* Inception) | ``inception`` | a TorchScript /
            vkd classifier checkpoint path.
        inception_weights: local Inception weights file (offline use of ``inception``).
        batch_size: images per extractor batch (per process).
        num: number of fake images drawn from a run (default 2,000); for folders, at most ``num`` files of
            each set (sorted by name).
        out_json: where to write the JSON result (main process only).
        device: ``auto`` | ``cpu`` | ``cuda``.
        seed: sampling seed for run folders.
        save_real_stats: also write the real-set statistics to this ``.npz`` (when ``real`` is a folder).
        run_generators: ``task -> image generator`` for run folders (default: the methods' declarations,
            :func:`vkd.registry.fid_generators`).

    Returns:
        dict with ``fid``, ``extractor``, ``num_samples``, ``num_reference``, ``skipped_*``, ``line``, ...
    """
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"device must be auto, cpu or cuda, got '{device}'")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but CUDA is not available")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    if num is not None and num < 2:
        raise UserError(f"num must be >= 2 (FID needs at least 2 images), got {num}")
    real_p, fake_p = Path(real).expanduser(), Path(fake).expanduser()
    for flag, p in (("--real", real_p), ("--fake", fake_p)):
        if not p.exists():
            raise DataError(f"{flag} not found: {p}")
        if p.is_file() and p.suffix != ".npz":
            raise DataError(f"{flag} must be an image folder, a .npz of statistics or a run folder, got {p}")
    if real_p.is_dir() and _is_run_dir(real_p):
        raise DataError(f"--real is a run folder ({real_p}); it must hold real images or statistics")

    accelerator = Accelerator(cpu=(device == "cpu"))
    ext = build_extractor(extractor, inception_weights)
    info = extractor_info(ext)
    result: dict[str, Any] = {"extractor": info["extractor"], "resize": info["resize"],
                              "antialias": "antialias=False" not in info["resize"] and "antialias" in info["resize"]}
    if "extractor_sha256" in info:
        result["extractor_sha256"] = info["extractor_sha256"]

    def from_npz(p: Path, flag: str) -> tuple[ReferenceStats, tuple[int, int] | None]:
        ref = load_reference(p)
        ref_ext = ref.meta.get("extractor")
        if ref_ext is not None and ref_ext != info["extractor"]:
            raise DataError(f"{p}: {flag} statistics were computed with extractor '{ref_ext}', "
                            f"not '{info['extractor']}'")
        size = tuple(int(v) for v in ref.meta["image_size"]) if "image_size" in ref.meta else None
        return ref, size

    # ---- real
    if real_p.is_file():
        ref, real_size = from_npz(real_p, "--real")
        result.update(reference_stats=real_p.name, num_reference=ref.num, skipped_real=0)
    else:
        real_stats, scan = stats_from_dir(real_p, ext, batch_size, accelerator, num=num)
        real_size = scan.size
        ref = real_stats.to_reference(extractor=info["extractor"], resize=info["resize"], image_size=list(scan.size))
        result.update(reference_stats=str(real_p), num_reference=real_stats.n, skipped_real=len(scan.skipped))
        if scan.skipped:
            result["skipped_real_files"] = [f"{n} ({why})" for n, why in scan.skipped[:20]]
        if save_real_stats and accelerator.is_main_process:
            save_reference(ref, save_real_stats)
    if getattr(ext, "num_features", None) and ref.mu.shape[0] != ext.num_features:
        raise DataError(f"{real}: reference features have d={ref.mu.shape[0]}, the extractor gives {ext.num_features}")

    def check_size(fake_size: tuple[int, int] | None, what: str) -> None:
        if real_size is not None and fake_size is not None and tuple(fake_size) != tuple(real_size):
            raise DataError(f"image size mismatch: real {real_size[1]}x{real_size[0]}, "
                            f"{what} {fake_size[1]}x{fake_size[0]}")

    # ---- fake
    if fake_p.is_file():
        fake_ref, fake_size = from_npz(fake_p, "--fake")
        check_size(fake_size, f"fake ({fake_p.name})")
        fake_mu, fake_sigma, n_fake = fake_ref.mu, fake_ref.sigma, fake_ref.num
        result.update(fake=str(fake_p), fake_source="npz", skipped_fake=0)
    elif _is_run_dir(fake_p):
        gen = _run_generator(fake_p, registry.fid_generators() if run_generators is None else run_generators)
        n_req = 2000 if num is None else num
        share = rank_share(n_req, accelerator.process_index, accelerator.num_processes)
        batches, fake_size = gen(fake_p, indices=share, seed=seed, batch_size=batch_size, device=accelerator.device)
        check_size(fake_size, "fake (run samples)")
        fake_stats = stats_from_batches(batches, ext, accelerator.device, progress="sampling").reduce(accelerator)
        fake_mu, fake_sigma, n_fake = fake_stats.mu, fake_stats.sigma, fake_stats.n
        result.update(fake=str(fake_p), fake_source="run", seed=seed, skipped_fake=0,
                      input_range="[-1, 1] -> uint8 (round half up)")
    else:
        scan = scan_image_dir(fake_p)
        check_size(scan.size, f"fake ({fake_p})")
        fake_stats, scan = stats_from_dir(fake_p, ext, batch_size, accelerator, num=num)
        fake_mu, fake_sigma, n_fake = fake_stats.mu, fake_stats.sigma, fake_stats.n
        result.update(fake=str(fake_p), fake_source="folder", skipped_fake=len(scan.skipped))
        if scan.skipped:
            result["skipped_fake_files"] = [f"{n} ({why})" for n, why in scan.skipped[:20]]
    if fake_mu.shape[0] != ref.mu.shape[0]:
        raise DataError(f"feature sizes differ: real {ref.mu.shape[0]}, fake {fake_mu.shape[0]}")

    fid = frechet_distance(fake_mu, fake_sigma, ref.mu, ref.sigma)
    if not math.isfinite(fid):
        raise DataError(f"FID is not finite ({fid}); check the inputs and extractor")
    small = n_fake is not None and n_fake < REPORT_SAMPLES
    result.update(fid=fid, num_samples=n_fake, num_processes=accelerator.num_processes, smoke_test=small,
                  versions=_versions())
    skipped = result.get("skipped_real", 0) + result.get("skipped_fake", 0)
    note = " [smoke-test sample count]" if small else ""
    result["line"] = (f"FID {fid:.4f}  extractor={info['extractor']}  fake={n_fake}  "
                      f"real={result['num_reference'] if result['num_reference'] is not None else '?'}"
                      + (f"  skipped={skipped} unreadable" if skipped else "") + note)
    if out_json and accelerator.is_main_process:
        out = Path(out_json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        result["json"] = str(out)
    accelerator.wait_for_everyone()
    return result
