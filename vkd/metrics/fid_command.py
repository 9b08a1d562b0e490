"""``vkd fid``: FID, KID, precision/recall, IS, CLIP score and sFID between two image sets, statistics files or runs,
on one or many processes, with the protocol that makes two numbers comparable.

The statistics live in :mod:`vkd.metrics.fid`, the metrics in :mod:`vkd.metrics.scores`; this module resolves what
the user passed (an image folder, a ``.npz`` of statistics, or a run directory whose generator comes from the method
declarations), checks every input before a network runs, makes one extractor pass over each image set, shares the
sampling over processes and writes the JSON result with its ``protocol``. :func:`compare_command` compares two
results only when their protocols match.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from vkd import __version__, registry
from vkd.engine.runs import run_task_name
from vkd.errors import DataError, UserError
from vkd.metrics.clip_score import CLIP_SCORE_DEFAULT_MODEL, ClipScorer, read_prompts
from vkd.metrics.extractors import build_extractor, extractor_info
from vkd.metrics.fid import (
    REPORT_SAMPLES,
    FeatureSet,
    ImageDirScan,
    ReferenceStats,
    feature_pass,
    features_from_dir,
    frechet_distance,
    load_reference,
    rank_share,
    save_reference,
    scan_image_dir,
)
from vkd.metrics.scores import (
    IS_SPLITS,
    KID_SUBSET_SIZE,
    KID_SUBSETS,
    METRIC_SEED,
    PR_K,
    check_counts,
    clip_score,
    inception_score,
    kid,
    precision_recall,
)

__all__ = ["METRICS", "PROTOCOL_FORMAT", "fid_command", "compare_command", "parse_metrics"]

METRICS = ("fid", "kid", "pr", "is", "clip", "sfid")
PROTOCOL_FORMAT = "vkd-generative-eval-1"
STATS_FORMAT = "vkd-fid-stats-2"
RUN_SAMPLES = 2000  # samples drawn from a run folder when --num-fake is not given
_EXTRACTOR_METRICS = {"fid", "kid", "pr", "is", "sfid"}


def parse_metrics(spec: str | Sequence[str]) -> list[str]:
    """``"fid,kid,pr"`` (or a list) → the metrics in canonical order; unknown names are a ``UserError``."""
    names = [m.strip().lower() for m in (spec.split(",") if isinstance(spec, str) else spec) if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise UserError(f"unknown metric(s) {', '.join(unknown) or '(none)'}: choose from {','.join(METRICS)}")
    return [m for m in METRICS if m in names]


def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.yaml").is_file()


def _run_generator(run_dir: Path, generators: Mapping[str, Callable[..., Any]]) -> Callable[..., Any]:
    task = run_task_name(run_dir)
    if task not in generators:
        raise UserError(f"{run_dir} is a '{task}' run; FID can sample from runs of: {', '.join(generators)}")
    return generators[task]


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for mod in ("torch_fidelity", "torchmetrics", "accelerate", "open_clip"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except Exception:  # pragma: no cover - optional
            pass
    return out


def _files_id(files: Sequence[Path]) -> str:
    """SHA-256 over the names and contents of the image files used (the identity of a reference set)."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def _stats_id(ref: ReferenceStats) -> str:
    """The identity of foreign reference statistics: SHA-256 of their μ and Σ (float64 bytes)."""
    return hashlib.sha256(ref.mu.astype(np.float64).tobytes() + ref.sigma.astype(np.float64).tobytes()).hexdigest()


def _listing(scan: ImageDirScan) -> list[str]:
    return sorted([f.name for f in scan.files] + [name for name, _ in scan.skipped])


def _with_prompts(batches: Iterator[Any], prompts: Sequence[str]) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Attach this process's prompts (in sample order) to run batches of images."""
    pos = 0
    for item in batches:
        images = item[0] if isinstance(item, (tuple, list)) else item
        yield images, list(prompts[pos:pos + images.shape[0]])
        pos += images.shape[0]


def fid_command(real: str, fake: str, extractor: str = "inception", weights: str | None = None,
                batch_size: int = 64, num: int | None = None, out_json: str | None = None, device: str = "auto",
                seed: int = 0, save_stats: str | None = None,
                run_generators: Mapping[str, Callable[..., Any]] | None = None, *,
                metrics: str | Sequence[str] = "fid", num_real: int | None = None,
                kid_subsets: int = KID_SUBSETS, kid_subset_size: int = KID_SUBSET_SIZE, pr_k: int = PR_K,
                is_splits: int = IS_SPLITS, metric_seed: int = METRIC_SEED, prompts: str | None = None,
                clip_model: str = CLIP_SCORE_DEFAULT_MODEL, clip_weights: str | None = None,
                num_workers: int = 0) -> dict:
    """``vkd fid``: generative metrics of a fake set against a real set, one extractor pass over each.

    Args:
        real: an image folder or a reference ``.npz`` (``mu``, ``sigma``; ``features`` for KID / PR, ``mu_s`` /
            ``sigma_s`` for sFID).
        fake: an image folder, a ``.npz`` of statistics, or a run folder (e.g. a BOOT run: ``num`` samples are drawn
            from its student with per-sample noise seeded by ``(seed, index)``, so the set does not depend on the
            process count).
        extractor: ``inception`` (default) | ``dinov2`` | ``clip`` | ``digits`` (embedded, *not* Inception) | a
            TorchScript / vkd classifier checkpoint path.
        weights: the extractor's local weights (see :func:`vkd.metrics.extractors.build_extractor`).
        batch_size: images per extractor batch (per process).
        num: fake images: drawn from a run (default 2,000), or the first ``num`` files of a fake folder (by name).
        out_json: where to write the JSON result (main process only).
        device: ``auto`` | ``cpu`` | ``cuda``.
        seed: sampling seed for run folders.
        save_stats: write the real-set statistics to this ``.npz`` (``real`` must be a folder): ``mu``, ``sigma``,
            ``num``, ``features`` when KID / PR are asked, ``mu_s`` / ``sigma_s`` for sFID, and the metadata.
        run_generators: ``task -> image generator`` for run folders (default: the methods' declarations,
            :func:`vkd.registry.fid_generators`). A generator may yield ``(images, prompts)`` pairs (CLIP score).
        metrics: any of ``fid, kid, pr, is, clip, sfid`` (a comma-separated string or a list).
        num_real: use the first ``num_real`` real files (default: all).
        kid_subsets, kid_subset_size: KID subsets (torch-fidelity's 100 × 1000).
        pr_k: precision/recall neighbourhood (3).
        is_splits: Inception Score splits (10).
        metric_seed: seed of the KID subsets and the IS shuffle (torch-fidelity's 2020).
        prompts: prompts file for the CLIP score (see :func:`vkd.metrics.clip_score.read_prompts`).
        clip_model, clip_weights: the open_clip model of the CLIP score and its local weights file.
        num_workers: DataLoader workers reading image folders.

    Returns:
        dict with one key per score (``fid``, ``kid`` / ``kid_std``, ``precision`` / ``recall``, ``is`` / ``is_std``,
        ``clip_score``, ``sfid``), ``protocol``, ``line``, ``num_samples``, ``num_reference``, ``skipped_*``,
        ``timing_s``, ...
    """
    t_start = time.perf_counter()
    mets = parse_metrics(metrics)
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"device must be auto, cpu or cuda, got '{device}'")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but CUDA is not available")
    for name, value, low in (("batch_size", batch_size, 1), ("num-fake", num, 2), ("num-real", num_real, 2),
                             ("kid-subsets", kid_subsets, 1), ("kid-subset-size", kid_subset_size, 2),
                             ("pr-k", pr_k, 1), ("is-splits", is_splits, 1), ("workers", num_workers, 0)):
        if value is not None and value < low:
            raise UserError(f"{name} must be >= {low}, got {value}")
    real_p, fake_p = Path(real).expanduser(), Path(fake).expanduser()
    for flag, p in (("--real", real_p), ("--fake", fake_p)):
        if not p.exists():
            raise DataError(f"{flag} not found: {p}")
        if p.is_file() and p.suffix != ".npz":
            raise DataError(f"{flag} must be an image folder, a .npz of statistics or a run folder, got {p}")
    if real_p.is_dir() and _is_run_dir(real_p):
        raise DataError(f"--real is a run folder ({real_p}); it must hold real images or statistics")
    if real_p.is_file() and save_stats:
        raise UserError(f"--save-stats writes the statistics of real images; --real {real_p.name} already is "
                        "statistics")
    if real_p.is_file() and num_real is not None:
        raise UserError(f"--num-real selects files of an image folder; --real {real_p.name} is statistics")
    if save_stats and not _EXTRACTOR_METRICS & set(mets):
        raise UserError(f"--save-stats writes extractor statistics; --metrics {','.join(mets)} uses no extractor")
    keep_rows = "kid" in mets or "pr" in mets
    sfid = "sfid" in mets
    if fake_p.is_file() and ({"is", "clip"} & set(mets)):
        raise UserError(f"{', '.join(m.upper() for m in mets if m in ('is', 'clip'))} needs the fake images; "
                        f"--fake {fake_p.name} holds statistics only")

    # ---- the networks (no image read yet): extractor and CLIP scorer
    accelerator = Accelerator(cpu=(device == "cpu"))
    ext = build_extractor(extractor, weights) if _EXTRACTOR_METRICS & set(mets) else None
    info = extractor_info(ext) if ext is not None else {"extractor": None, "resize": None}
    provides = getattr(ext, "provides", None) if ext is not None else None
    for metric, output in (("is", "logits"), ("sfid", "spatial")):
        if metric in mets and provides is not None and output not in provides:
            raise UserError(f"{'IS' if metric == 'is' else 'sFID'} needs the extractor's "
                            f"{'class logits' if metric == 'is' else 'spatial features'}; '{info['extractor']}' has "
                            f"none: use --extractor inception" + (" (or digits)" if metric == "is" else ""))
    scorer = ClipScorer(clip_model, clip_weights, accelerator.device) if "clip" in mets else None
    result: dict[str, Any] = {"metrics": mets, "extractor": info["extractor"], "resize": info["resize"],
                              "antialias": bool(info["resize"]) and "antialias=False" not in info["resize"]
                              and "antialias" in info["resize"]}
    if "extractor_sha256" in info:
        result["extractor_sha256"] = info["extractor_sha256"]
    need = (["features"] if keep_rows else []) + (["mu_s", "sigma_s"] if sfid else [])

    def from_npz(p: Path, flag: str) -> tuple[ReferenceStats, tuple[int, int] | None]:
        ref = load_reference(p, need)
        ref_ext = ref.meta.get("extractor")
        if ext is not None and ref_ext is not None and ref_ext != info["extractor"]:
            raise DataError(f"{p}: {flag} statistics were computed with extractor '{ref_ext}', "
                            f"not '{info['extractor']}'")
        ref_sha = ref.meta.get("extractor_sha256")
        if ext is not None and ref_sha and info.get("extractor_sha256") and ref_sha != info["extractor_sha256"]:
            raise DataError(f"{p}: {flag} statistics were computed with other weights (sha256 {ref_sha[:12]}…, "
                            f"not {info['extractor_sha256'][:12]}…)")
        if keep_rows and "features" not in ref.arrays:
            raise DataError(f"{p}: {'KID' if 'kid' in mets else 'precision/recall'} needs the {flag[2:]} features; "
                            f"the file holds {', '.join(ref.available)} (write them with --save-stats and --metrics "
                            "kid or pr)")
        if sfid and "mu_s" not in ref.arrays:
            raise DataError(f"{p}: sFID needs 'mu_s' and 'sigma_s'; the file holds {', '.join(ref.available)}")
        if ext is not None and getattr(ext, "num_features", None) and ref.mu.shape[0] != ext.num_features:
            raise DataError(f"{p}: {flag} features have d={ref.mu.shape[0]}, the extractor gives {ext.num_features}")
        size = tuple(int(v) for v in ref.meta["image_size"]) if "image_size" in ref.meta else None
        return ref, size

    def check_size(real_size: tuple[int, int] | None, fake_size: tuple[int, int] | None, what: str) -> None:
        if real_size is not None and fake_size is not None and tuple(fake_size) != tuple(real_size):
            raise DataError(f"image size mismatch: real {real_size[1]}x{real_size[0]}, "
                            f"{what} {fake_size[1]}x{fake_size[0]}")

    # ---- resolve both sets and check every count before any image goes through a network
    t_scan = time.perf_counter()
    real_ref: ReferenceStats | None = None
    real_scan: ImageDirScan | None = None
    if real_p.is_file():
        real_ref, real_size = from_npz(real_p, "--real")
        n_real = int(real_ref.arrays["features"].shape[0]) if keep_rows else real_ref.num
        reference_id = real_ref.meta.get("reference_id") or _stats_id(real_ref)
        result.update(reference_stats=real_p.name, skipped_real=0)
    else:
        real_scan = scan_image_dir(real_p)
        real_size = real_scan.size
        real_files = real_scan.files if num_real is None else real_scan.files[:num_real]
        n_real = len(real_files)
        if n_real < 2:
            raise DataError(f"{real_p}: FID needs at least 2 readable images, found {n_real}"
                            + (f" ({len(real_scan.skipped)} unreadable skipped)" if real_scan.skipped else ""))
        reference_id = _files_id(real_files)
        result.update(reference_stats=str(real_p), skipped_real=len(real_scan.skipped))
        if real_scan.skipped:
            result["skipped_real_files"] = [f"{n} ({why})" for n, why in real_scan.skipped[:20]]

    fake_scan: ImageDirScan | None = None
    fake_prompts: list[str] | None = None
    fake_size: tuple[int, int] | None = None
    if fake_p.is_file():
        fake_source = "npz"
        fake_ref, fake_size = from_npz(fake_p, "--fake")
        check_size(real_size, fake_size, f"fake ({fake_p.name})")
        n_fake = int(fake_ref.arrays["features"].shape[0]) if keep_rows else fake_ref.num
        result.update(fake=str(fake_p), fake_source="npz", skipped_fake=0)
    elif _is_run_dir(fake_p):
        fake_source = "run"
        gen = _run_generator(fake_p, registry.fid_generators() if run_generators is None else run_generators)
        n_fake = RUN_SAMPLES if num is None else num
        if "clip" in mets and prompts is not None:
            fake_prompts = read_prompts(prompts, count=n_fake)
        result.update(fake=str(fake_p), fake_source="run", seed=seed, skipped_fake=0,
                      input_range="[-1, 1] -> uint8 (round half up)")
    else:
        fake_source = "folder"
        fake_scan = scan_image_dir(fake_p)
        check_size(real_size, fake_scan.size, f"fake ({fake_p})")
        fake_files = fake_scan.files if num is None else fake_scan.files[:num]
        n_fake = len(fake_files)
        if n_fake < 2:
            raise DataError(f"{fake_p}: FID needs at least 2 readable images, found {n_fake}"
                            + (f" ({len(fake_scan.skipped)} unreadable skipped)" if fake_scan.skipped else ""))
        if "clip" in mets:
            if prompts is None:
                raise UserError("CLIP score needs the prompt of every image: --prompts FILE (one line per image file "
                                "in name order, or a JSON {file name: prompt} object)")
            fake_prompts = read_prompts(prompts, listing=_listing(fake_scan), used=[f.name for f in fake_files])
        result.update(fake=str(fake_p), fake_source="folder", skipped_fake=len(fake_scan.skipped))
        if fake_scan.skipped:
            result["skipped_fake_files"] = [f"{n} ({why})" for n, why in fake_scan.skipped[:20]]
    check_counts(set(mets), n_real, n_fake, kid_subset_size, pr_k, is_splits)

    # ---- one pass over each image set
    want = {"features"} | ({"logits"} if "is" in mets else set()) | ({"spatial"} if sfid else set())
    keep = ({"features"} if keep_rows else set()) | ({"logits"} if "is" in mets else set())
    timing: dict[str, float] = {"setup": t_scan - t_start, "scan": time.perf_counter() - t_scan}
    fake_fs: FeatureSet | None = None
    if fake_source == "run":
        share = rank_share(n_fake, accelerator.process_index, accelerator.num_processes)
        batches, gen_size = gen(fake_p, indices=share, seed=seed, batch_size=batch_size, device=accelerator.device)
        check_size(real_size, gen_size, "fake (run samples)")
        fake_size = gen_size
        if fake_prompts is not None:
            batches = _with_prompts(batches, [fake_prompts[i] for i in share])
        fake_fs = feature_pass(batches, ext, accelerator.device, want=want, keep=keep, clip=scorer,
                               accelerator=accelerator, sharded=False, progress="sampling")
    elif fake_source == "folder":
        fake_size = fake_scan.size
        fake_fs, _ = features_from_dir(fake_p, ext, batch_size, accelerator, num, num_workers, scan=fake_scan,
                                       prompts=fake_prompts, want=want, keep=keep, clip=scorer)
    if fake_fs is not None:
        timing["fake_pass"] = fake_fs.seconds
        n_fake = fake_fs.num
        if fake_fs.stats is not None:
            fake_ref = ReferenceStats(fake_fs.stats.mu, fake_fs.stats.sigma, fake_fs.stats.n)
    if real_scan is not None and ext is not None and ({"fid", "kid", "pr", "sfid"} & set(mets) or save_stats):
        real_fs, _ = features_from_dir(real_p, ext, batch_size, accelerator, num_real, num_workers, scan=real_scan,
                                       want=want - {"logits"}, keep=keep - {"logits"})
        timing["real_pass"] = real_fs.seconds
        arrays: dict[str, np.ndarray] = {}
        if real_fs.features is not None:
            arrays["features"] = real_fs.features.numpy()
        if real_fs.spatial is not None:
            arrays["mu_s"], arrays["sigma_s"] = real_fs.spatial.mu, real_fs.spatial.sigma
        meta = {"format": STATS_FORMAT, "extractor": info["extractor"], "resize": info["resize"],
                "image_size": list(real_size), "reference_id": reference_id, "vkd_version": __version__}
        if "extractor_sha256" in info:
            meta["extractor_sha256"] = info["extractor_sha256"]
        if real_fs.stats is not None:
            real_ref = ReferenceStats(real_fs.stats.mu, real_fs.stats.sigma, real_fs.stats.n, meta, arrays)
            if save_stats and accelerator.is_main_process:
                save_reference(real_ref, save_stats)
                result["saved_stats"] = str(save_stats)
        n_real = real_fs.num

    # ---- the metrics
    t0 = time.perf_counter()
    scores: dict[str, float] = {}
    if "fid" in mets or "sfid" in mets:
        if fake_ref.mu.shape[0] != real_ref.mu.shape[0]:
            raise DataError(f"feature sizes differ: real {real_ref.mu.shape[0]}, fake {fake_ref.mu.shape[0]}")
    if "fid" in mets:
        scores["fid"] = frechet_distance(fake_ref.mu, fake_ref.sigma, real_ref.mu, real_ref.sigma)
    fake_rows = fake_fs.features if fake_fs is not None else (
        torch.from_numpy(fake_ref.arrays["features"]) if keep_rows else None)
    real_rows = torch.from_numpy(real_ref.arrays["features"]) if keep_rows else None
    if "kid" in mets:
        scores["kid"], scores["kid_std"] = kid(fake_rows, real_rows, kid_subsets, kid_subset_size, metric_seed)
        timing["kid"] = time.perf_counter() - t0
    if "pr" in mets:
        t1 = time.perf_counter()
        scores["precision"], scores["recall"] = precision_recall(fake=fake_rows.to(accelerator.device),
                                                                 real=real_rows.to(accelerator.device), k=pr_k)
        timing["pr"] = time.perf_counter() - t1
    if "is" in mets:
        scores["is"], scores["is_std"] = inception_score(fake_fs.logits, is_splits, metric_seed)
    if "clip" in mets:
        scores["clip_score"] = clip_score(fake_fs.clip_cos)
    if sfid:
        fake_s = fake_fs.spatial if fake_fs is not None else None
        mu_s, sigma_s = (fake_s.mu, fake_s.sigma) if fake_s is not None else (fake_ref.arrays["mu_s"],
                                                                                fake_ref.arrays["sigma_s"])
        if mu_s.shape != real_ref.arrays["mu_s"].shape:
            raise DataError(f"spatial feature sizes differ: real {real_ref.arrays['mu_s'].shape[0]}, "
                            f"fake {mu_s.shape[0]}")
        scores["sfid"] = frechet_distance(mu_s, sigma_s, real_ref.arrays["mu_s"], real_ref.arrays["sigma_s"])
    for k, v in scores.items():
        if not math.isfinite(v):
            raise DataError(f"{k} is not finite ({v}); check the inputs and extractor")
    timing["metrics"] = time.perf_counter() - t0
    timing["total"] = time.perf_counter() - t_start

    # ---- the protocol: what must be equal for two results to be compared
    params: dict[str, dict[str, Any]] = {
        "fid": {}, "kid": {"subsets": kid_subsets, "subset_size": kid_subset_size, "seed": metric_seed,
                           "kernel": "polynomial (x.y/d + 1)^3", "estimator": "unbiased"},
        "pr": {"k": pr_k}, "is": {"splits": is_splits, "seed": metric_seed, "logits": "extractor logits"},
        "sfid": {"spatial": "Inception mixed_6/conv[..., :7]"},
    }
    if scorer is not None:
        params["clip"] = {**scorer.info, "formula": "mean(100 * max(cos, 0))"}
    image_size = list(real_size or fake_size or []) or None
    protocol = {
        "format": PROTOCOL_FORMAT, "vkd_version": __version__, "extractor": info["extractor"],
        "extractor_sha256": info.get("extractor_sha256"), "resize": info["resize"], "image_size": image_size,
        "reference": reference_id, "n_real": n_real, "n_fake": n_fake,
        "seeds": {"sampling": seed if fake_source == "run" else None},
        "metrics": {m: params[m] for m in mets},
    }
    small = n_fake is not None and n_fake < REPORT_SAMPLES
    result.update(scores)
    result.update(num_samples=n_fake, num_reference=n_real, num_processes=accelerator.num_processes,
                  smoke_test=small, protocol=protocol, timing_s=timing, vkd_version=__version__, versions=_versions())
    skipped = result.get("skipped_real", 0) + result.get("skipped_fake", 0)
    what = info["extractor"] if ext is not None else f"clip-score model {clip_model}"
    result["line"] = (score_line(scores) + f"  extractor={what}  fake={n_fake}  "
                      f"real={n_real if n_real is not None else '?'}"
                      + (f"  skipped={skipped} unreadable" if skipped else "")
                      + (" [smoke-test sample count]" if small else ""))
    if out_json and accelerator.is_main_process:
        out = Path(out_json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        result["json"] = str(out)
    accelerator.wait_for_everyone()
    return result


def score_line(scores: Mapping[str, float]) -> str:
    """Every score on one line, in the order of :data:`METRICS`."""
    parts = []
    if "fid" in scores:
        parts.append(f"FID {scores['fid']:.4f}")
    if "kid" in scores:
        parts.append(f"KID {scores['kid']:.6f} ± {scores['kid_std']:.6f}")
    if "precision" in scores:
        parts.append(f"precision {scores['precision']:.4f}  recall {scores['recall']:.4f}")
    if "is" in scores:
        parts.append(f"IS {scores['is']:.4f} ± {scores['is_std']:.4f}")
    if "clip_score" in scores:
        parts.append(f"CLIP {scores['clip_score']:.4f}")
    if "sfid" in scores:
        parts.append(f"sFID {scores['sfid']:.4f}")
    return "  ".join(parts)


_SCORE_KEYS = {"fid": ("fid",), "kid": ("kid",), "pr": ("precision", "recall"), "is": ("is",),
               "clip": ("clip_score",), "sfid": ("sfid",)}


def _read_result(path: str | Path) -> dict[str, Any]:
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise DataError(f"result not found: {p}") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"cannot read {p}: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("protocol"), dict):
        raise DataError(f"{p} has no protocol (not a `vkd fid --out` result of this version)")
    return data


def compare_command(a: str | Path, b: str | Path) -> dict[str, Any]:
    """``vkd fid --compare A.json B.json``: the shared scores of two results side by side, refused (``DataError``, one
    line naming what differs) unless their protocols match.

    Everything in the protocol must be equal (vkd version, extractor and its weights' SHA-256, resize, image size,
    the reference set's identity, n_real, n_fake, the sampling seed) and so must the parameters of every metric both
    results hold; metrics only one of them holds are left out.
    """
    ra, rb = _read_result(a), _read_result(b)
    pa, pb = ra["protocol"], rb["protocol"]
    diffs = []
    for key in sorted((set(pa) | set(pb)) - {"metrics"}):
        if pa.get(key) != pb.get(key):
            diffs.append(f"{key} ({_short(pa.get(key))} vs {_short(pb.get(key))})")
    shared = [m for m in METRICS if m in pa.get("metrics", {}) and m in pb.get("metrics", {})]
    for m in shared:
        if pa["metrics"][m] != pb["metrics"][m]:
            diffs.append(f"metrics.{m} ({_short(pa['metrics'][m])} vs {_short(pb['metrics'][m])})")
    name_a, name_b = Path(a).name, Path(b).name
    if diffs:
        raise DataError(f"cannot compare {name_a} and {name_b}: protocols differ in " + "; ".join(diffs))
    if not shared:
        raise DataError(f"cannot compare {name_a} and {name_b}: no metric in common")
    parts = []
    for m in shared:
        for key in _SCORE_KEYS[m]:
            va, vb = ra.get(key), rb.get(key)
            if isinstance(va, (int, float)) and isinstance(vb, (int, float)):
                label = {"clip_score": "CLIP", "precision": "precision", "recall": "recall"}.get(key, key.upper())
                parts.append(f"{label} {va:.6g} vs {vb:.6g} ({vb - va:+.4g})")
    line = (f"{name_a} vs {name_b}: " + "  ".join(parts)
            + f"  [same protocol: extractor={pa.get('extractor')}, n_real={pa.get('n_real')}, "
              f"n_fake={pa.get('n_fake')}]")
    return {"a": str(a), "b": str(b), "metrics": shared, "line": line}


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."
