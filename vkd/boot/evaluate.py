"""Metrics of BOOT runs: FID against held-out digits (digits-CNN extractor, not Inception), ``vkd eval boot``, and
the side-by-side comparison of a student and its teacher (FID and images/s on the same seeded noise) that
``scripts/bench_boot.py`` and the BOOT stage of ``vkd demo`` both report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch

from vkd.boot.config import BootConfig, EvalConfig
from vkd.boot.runs import load_run
from vkd.boot.sample import ddim_sample, noise_batches, save_grid, student_sample, to_uint8
from vkd.boot.student import BootStudent
from vkd.boot.teacher import DiffusionTeacher
from vkd.data.digits import load_digits
from vkd.engine.runs import open_run, write_json
from vkd.errors import UserError
from vkd.metrics.extractors import DIGITS_EXTRACTOR_NAME, build_extractor, extractor_info
from vkd.metrics.fid import frechet_distance, stats_from_batches, stats_from_images

__all__ = ["DigitsFID", "digits_reference_available", "uint8_batches", "digits_fid_scores", "evaluate_run", "compare_generators"]


class DigitsFID:
    """FID against held-out digits (test split) with an extractor (default: digits CNN, not Inception)."""

    def __init__(self, size: int, extractor: str = "digits", inception_weights: str | None = None):
        self.extractor = build_extractor(extractor, inception_weights)
        self.info = extractor_info(self.extractor)
        real = load_digits("test", size=size, channels=1, value_range="symmetric")
        self.real = stats_from_images(to_uint8(real.images), self.extractor)
        self.num_reference = self.real.n

    def __call__(self, batches: Iterable[torch.Tensor]) -> tuple[float, int]:
        fake = stats_from_batches(batches, self.extractor)
        return frechet_distance(fake.mu, fake.sigma, self.real.mu, self.real.sigma), fake.n


def digits_reference_available(teacher_path: str) -> bool:
    """Whether the teacher is vkd's embedded digits teacher (the held-out digits are its reference set)."""
    meta_path = Path(teacher_path) / "vkd_teacher.json"
    if not meta_path.is_file():
        return False
    return json.loads(meta_path.read_text()).get("dataset") == "digits"


def uint8_batches(fn: Callable, num: int, seed: int, shape: tuple[int, ...], num_classes: int | None,
                  batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """``fn(ε, classes)`` on the seeded noise of samples ``0..num-1``, as uint8 ``[b, 3, H, W]`` batches."""
    for _, eps, labels in noise_batches(num, seed, shape, num_classes, batch_size, device):
        yield to_uint8(fn(eps, labels)).cpu()


@torch.no_grad()
def digits_fid_scores(student: BootStudent, teacher: DiffusionTeacher, ev: EvalConfig, fid: DigitsFID,
                      teacher_fids: dict[int, float] | None = None) -> dict[str, float]:
    """FID of the one-step student and of teacher DDIM-K (``ev.teacher_steps``) on ``ev.num_samples`` samples.

    Args:
        teacher_fids: a cache ``K -> FID`` filled and reused across calls (the teacher does not change).
    """
    dev = next(student.parameters()).device
    shape, ncls = teacher.sample_shape, teacher.num_classes
    teacher_fids = {} if teacher_fids is None else teacher_fids
    out = {"student_fid_digitscnn": fid(uint8_batches(lambda e, c: student_sample(student, e, c), ev.num_samples,
                                                       ev.seed, shape, ncls, ev.batch_size, dev))[0]}
    for k in ev.teacher_steps:
        if k not in teacher_fids:
            teacher_fids[k], _ = fid(uint8_batches(lambda e, c, k=k: ddim_sample(teacher, e, c, k), ev.num_samples,
                                                    ev.seed, shape, ncls, ev.batch_size, dev))
        out[f"teacher_ddim{k}_fid_digitscnn"] = teacher_fids[k]
    return out


def evaluate_run(run_dir: Path, overrides: list[str], out_dir: Path | None = None) -> dict:
    """``vkd eval boot``: FID (digits CNN, not Inception) of the run's one-step student and teacher DDIM-K, written
    to ``eval.json``."""
    cfg = open_run(run_dir, BootConfig, "boot", overrides)
    _, student, teacher = load_run(run_dir, need_teacher=True)
    teacher.eval().requires_grad_(False)
    if not digits_reference_available(cfg.teacher.path):
        raise UserError("vkd eval boot scores against held-out digits, which needs the embedded digits teacher; "
                        "for other teachers use `vkd sample boot` + `vkd fid`")
    if cfg.eval.num_samples == 0:
        raise UserError("eval.num_samples is 0: nothing to evaluate (use --set eval.num_samples=2000)")
    fid = DigitsFID(teacher.sample_shape[-1])
    metrics: dict = digits_fid_scores(student, teacher, cfg.eval, fid)
    metrics.update(extractor=DIGITS_EXTRACTOR_NAME, num_samples=cfg.eval.num_samples,
                   num_reference=fid.num_reference, seed=cfg.eval.seed)
    write_json(Path(out_dir or run_dir) / "eval.json", metrics)
    return metrics


@torch.no_grad()
def compare_generators(run_dir: str | Path, num_samples: int = 2000, ddim_steps: Sequence[int] = (1, 4, 10, 50),
                       seed: int = 2024, batch_size: int = 250, grid_dir: Path | None = None, grid_num: int = 50,
                       progress: Callable[[str], None] | None = None) -> dict:
    """FID (digits CNN extractor, not Inception) and throughput of the one-step student and teacher DDIM-K.

    Every generator reads the same noise ``ε_i`` (seeded by ``(seed, i)``) and class ``i % 10``; FID is
    against the held-out digits test split. Generation time excludes feature extraction.

    Args:
        run_dir: a finished ``vkd distill boot`` run on the embedded digits teacher.
        num_samples: samples per generator.
        ddim_steps: teacher DDIM step counts to compare against.
        seed: noise seed.
        batch_size: generation batch.
        grid_dir: when given, ``<grid_dir>/<generator>.png`` grids of the first ``grid_num`` samples.
        grid_num: images per grid.
        progress: called with one line per finished generator.

    Returns:
        ``{"extractor", "extractor_sha256", "num_reference", "num_samples", "seed",
        "generators": {name: {"nfe", "fid", "images_per_s", "gen_s"}}, "grids": {name: path}}``.
    """
    _, student, teacher = load_run(run_dir, need_teacher=True)
    fid = DigitsFID(teacher.sample_shape[-1])
    shape, ncls = teacher.sample_shape, teacher.num_classes
    generators: dict[str, tuple[int, Callable]] = {
        "boot_student_1step": (1, lambda e, c: student_sample(student, e, c))}
    for k in ddim_steps:
        generators[f"teacher_ddim{int(k)}"] = (int(k), lambda e, c, k=int(k): ddim_sample(teacher, e, c, k))
    rows, grids = {}, {}
    for name, (nfe, fn) in generators.items():
        gen_time, batches = 0.0, []
        for start, eps, labels in noise_batches(num_samples, seed, shape, ncls, batch_size):
            t0 = time.perf_counter()
            x = fn(eps, labels)
            gen_time += time.perf_counter() - t0
            if grid_dir is not None and start == 0:
                grids[name] = str(save_grid(x[:grid_num], Path(grid_dir) / f"{name}.png", nrow=10))
            batches.append(to_uint8(x))
        stats = stats_from_batches(batches, fid.extractor)
        score = frechet_distance(stats.mu, stats.sigma, fid.real.mu, fid.real.sigma)
        rows[name] = {"nfe": nfe, "fid": score, "images_per_s": num_samples / gen_time, "gen_s": gen_time}
        if progress is not None:
            progress(f"{name:<20s} FID {score:8.3f}   {num_samples / gen_time:10.1f} img/s")
    return {"extractor": fid.info["extractor"], "extractor_sha256": fid.info.get("extractor_sha256"),
            "num_reference": fid.num_reference, "num_samples": num_samples, "seed": seed,
            "generators": rows, "grids": grids}
