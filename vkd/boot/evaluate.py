"""Side-by-side comparison of a BOOT student and its teacher: FID and images/s on the same seeded noise.

Used by ``scripts/bench_boot.py`` and the BOOT stage of ``vkd demo`` so both report the same measurement.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from vkd.boot.sample import ddim_sample, load_run, noise_for_indices, save_grid, student_sample, to_uint8

__all__ = ["compare_generators"]


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
    from vkd.boot.distiller import DigitsFID
    from vkd.metrics.fid import frechet_distance, stats_from_batches

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
        for start in range(0, num_samples, batch_size):
            eps, labels = noise_for_indices(range(start, min(num_samples, start + batch_size)), seed, shape, ncls)
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
