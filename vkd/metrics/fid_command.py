"""``vkd fid``: FID between two image sets, statistics files or runs, on one or many processes.

The statistics live in :mod:`vkd.metrics.fid`; this module resolves what the user passed (an image folder, a
``.npz`` of statistics, or a run directory whose generator comes from the method declarations), shares the
sampling over processes and writes the JSON result.
"""

from __future__ import annotations

import importlib
import json
import math
import platform
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from vkd import registry
from vkd.engine.runs import run_task_name
from vkd.errors import DataError, UserError
from vkd.metrics.extractors import build_extractor, extractor_info
from vkd.metrics.fid import (
    REPORT_SAMPLES,
    ReferenceStats,
    frechet_distance,
    load_reference,
    rank_share,
    save_reference,
    scan_image_dir,
    stats_from_batches,
    stats_from_dir,
)

__all__ = ["fid_command"]


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
