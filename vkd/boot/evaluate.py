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

from vkd.boot.conditioning import TextUNetDenoiser
from vkd.boot.config import BootConfig, EvalConfig
from vkd.boot.data import digit_named_in
from vkd.boot.runs import load_run
from vkd.boot.sample import ddim_sample, noise_batches, save_grid, student_sample, to_uint8
from vkd.boot.student import BootStudent
from vkd.boot.teacher import DiffusionTeacher
from vkd.data.digits import load_digits
from vkd.engine.runs import open_run, write_json
from vkd.errors import UserError
from vkd.metrics.extractors import DIGITS_EXTRACTOR_NAME, build_extractor, extractor_info
from vkd.metrics.fid import feature_pass, frechet_distance, stats_from_batches
from vkd.metrics.scores import PR_K, precision_recall

__all__ = ["PromptAccuracy", "DigitsFID", "digits_reference_available", "teacher_prompts", "uint8_batches",
           "digits_fid_scores", "evaluate_run", "compare_generators"]


class PromptAccuracy:
    """Running agreement of the digits classifier with the digit each sample's prompt names.

    Args:
        prompts: the prompt table (condition ``c`` of a sample is ``prompts[c]``).
        classifier: a :class:`~vkd.metrics.extractors.ClassifierExtractor` (its ``classify``).

    Attributes:
        named: ``[P]`` the digit prompt ``p`` names (:func:`~vkd.boot.data.digit_named_in`), ``-1`` for none.
    """

    def __init__(self, prompts: Sequence[str], classifier):
        self.classifier = classifier
        self.named = torch.tensor([-1 if (d := digit_named_in(p)) is None else d for p in prompts])
        self.correct = 0
        self.total = 0

    @property
    def applies(self) -> bool:
        """Whether any prompt names a digit."""
        return bool((self.named >= 0).any())

    def __call__(self, images: torch.Tensor, prompt_index: torch.Tensor) -> None:
        """Add uint8 ``images [B, C, H, W]`` generated for ``prompt_index [B]``."""
        want = self.named[prompt_index.cpu()]
        keep = want >= 0
        if keep.any():
            got = self.classifier.classify(images[keep])
            self.correct += int((got == want[keep]).sum())
            self.total += int(keep.sum())

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)


class DigitsFID:
    """FID against held-out digits (test split) with an extractor (default: digits CNN, not Inception)."""

    def __init__(self, size: int, extractor: str = "digits", inception_weights: str | None = None):
        self.extractor = build_extractor(extractor, inception_weights)
        self.info = extractor_info(self.extractor)
        real = to_uint8(load_digits("test", size=size, channels=1, value_range="symmetric").images)
        ref = feature_pass((real[i:i + 256] for i in range(0, len(real), 256)), self.extractor, keep=("features",))
        self.real, self.real_features = ref.stats, ref.features  # [360, d]: the precision/recall reference
        self.num_reference = self.real.n

    def __call__(self, batches: Iterable[torch.Tensor]) -> tuple[float, int]:
        fake = stats_from_batches(batches, self.extractor)
        return frechet_distance(fake.mu, fake.sigma, self.real.mu, self.real.sigma), fake.n

    def score(self, fn: Callable, ev: EvalConfig, shape: tuple[int, ...], num_classes: int | None, name: str,
              device: torch.device, prompts: Sequence[str] | None = None) -> dict[str, float]:
        """``{name}_fid_digitscnn`` of ``fn(ε, condition)`` on ``ev.num_samples`` seeded samples, and
        ``{name}_prompt_accuracy`` when ``prompts`` (the condition table) name digits."""
        tally = PromptAccuracy(prompts, self.extractor) if prompts else None
        tally = tally if tally is not None and tally.applies and hasattr(self.extractor, "classify") else None
        fid, _ = self(uint8_batches(fn, ev.num_samples, ev.seed, shape, num_classes, ev.batch_size, device, tally))
        out = {f"{name}_fid_digitscnn": fid}
        if tally is not None:
            out[f"{name}_prompt_accuracy"] = tally.accuracy
        return out


def digits_reference_available(teacher_path: str) -> bool:
    """Whether the teacher is one of vkd's embedded digits teachers (the held-out digits are its reference set)."""
    meta_path = Path(teacher_path) / "vkd_teacher.json"
    if not meta_path.is_file():
        return False
    return json.loads(meta_path.read_text()).get("dataset") == "digits"


def teacher_prompts(teacher: DiffusionTeacher) -> tuple[str, ...] | None:
    """The prompt table of a text-to-image teacher (``None`` for class-conditional and unconditional ones)."""
    net = teacher.net
    return net.prompts.prompts if isinstance(net, TextUNetDenoiser) else None


def uint8_batches(fn: Callable, num: int, seed: int, shape: tuple[int, ...], num_classes: int | None,
                  batch_size: int, device: torch.device,
                  on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> Iterator[torch.Tensor]:
    """``fn(ε, classes)`` on the seeded noise of samples ``0..num-1``, as uint8 ``[b, 3, H, W]`` batches
    (each also passed to ``on_batch(images, classes)`` when given)."""
    for _, eps, labels in noise_batches(num, seed, shape, num_classes, batch_size, device):
        images = to_uint8(fn(eps, labels)).cpu()
        if on_batch is not None and labels is not None:
            on_batch(images, labels)
        yield images


@torch.no_grad()
def digits_fid_scores(student: BootStudent, teacher: DiffusionTeacher, ev: EvalConfig, fid: DigitsFID,
                      teacher_scores: dict[int, dict[str, float]] | None = None) -> dict[str, float]:
    """FID of the one-step student and of teacher DDIM-K (``ev.teacher_steps``) on ``ev.num_samples`` samples, and
    each one's prompt accuracy when the teacher's prompts name digits (the embedded text teacher).

    Args:
        teacher_scores: a cache ``K -> metrics`` filled and reused across calls (the teacher does not change).
    """
    dev = next(student.parameters()).device
    shape, ncls, prompts = teacher.sample_shape, teacher.num_classes, teacher_prompts(teacher)
    teacher_scores = {} if teacher_scores is None else teacher_scores
    out = fid.score(lambda e, c: student_sample(student, e, c), ev, shape, ncls, "student", dev, prompts)
    for k in ev.teacher_steps:
        if k not in teacher_scores:
            teacher_scores[k] = fid.score(lambda e, c, k=k: ddim_sample(teacher, e, c, k), ev, shape, ncls,
                                          f"teacher_ddim{k}", dev, prompts)
        out.update(teacher_scores[k])
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
    """FID (digits CNN extractor, not Inception), throughput and same-noise distance of the one-step student and
    teacher DDIM-K; prompt accuracy too for the embedded text-to-image teacher.

    Every generator reads the same noise ``ε_i`` (seeded by ``(seed, i)``) and condition ``i % C`` (class or
    prompt); FID is against the held-out digits test split. Generation time excludes feature extraction. The
    same-noise distance of a generator is the root-mean-square pixel difference (images in [-1, 1]) to the teacher's
    DDIM chain with the most steps, sample by sample, averaged.

    Args:
        run_dir: a finished ``vkd distill boot`` run on an embedded digits teacher.
        num_samples: samples per generator.
        ddim_steps: teacher DDIM step counts to compare against.
        seed: noise seed.
        batch_size: generation batch.
        grid_dir: when given, ``<grid_dir>/<generator>.png`` grids of the first ``grid_num`` samples.
        grid_num: images per grid.
        progress: called with one line per finished generator.

    Returns:
        ``{"extractor", "extractor_sha256", "num_reference", "num_samples", "seed", "reference_chain",
        "generators": {name: {"nfe", "fid", "precision", "recall" (k = 3, against the held-out digits),
        "images_per_s", "gen_s", "rms_to_reference"[, "prompt_accuracy"]}},
        "grids": {name: path}}``.
    """
    _, student, teacher = load_run(run_dir, need_teacher=True)
    fid = DigitsFID(teacher.sample_shape[-1])
    shape, ncls, prompts = teacher.sample_shape, teacher.num_classes, teacher_prompts(teacher)
    steps = sorted({int(k) for k in ddim_steps}, reverse=True)  # the reference chain first
    generators: dict[str, tuple[int, Callable]] = {
        f"teacher_ddim{k}": (k, lambda e, c, k=k: ddim_sample(teacher, e, c, k)) for k in steps}
    generators = {"boot_student_1step": (1, lambda e, c: student_sample(student, e, c)), **generators}
    reference_name = f"teacher_ddim{steps[0]}" if steps else None
    reference: torch.Tensor | None = None  # [N, C, H, W] the reference chain's samples
    rows, grids = {}, {}
    for name in ([reference_name] if reference_name else []) + [n for n in generators if n != reference_name]:
        nfe, fn = generators[name]
        gen_time, batches, images = 0.0, [], []
        tally = PromptAccuracy(prompts, fid.extractor) if prompts else None
        for start, eps, labels in noise_batches(num_samples, seed, shape, ncls, batch_size):
            t0 = time.perf_counter()
            x = fn(eps, labels)
            gen_time += time.perf_counter() - t0
            if grid_dir is not None and start == 0:
                grids[name] = str(save_grid(x[:grid_num], Path(grid_dir) / f"{name}.png", nrow=10))
            images.append(x.float().clamp(-1, 1))
            batches.append(to_uint8(x))
            if tally is not None and tally.applies:
                tally(batches[-1], labels)
        fake = feature_pass(batches, fid.extractor, keep=("features",))
        score = frechet_distance(fake.stats.mu, fake.stats.sigma, fid.real.mu, fid.real.sigma)
        precision, recall = precision_recall(fake=fake.features, real=fid.real_features, k=PR_K)
        row = {"nfe": nfe, "fid": score, "precision": precision, "recall": recall,
               "images_per_s": num_samples / gen_time, "gen_s": gen_time}
        if name == reference_name:
            reference = torch.cat(images)
        if reference is not None:
            row["rms_to_reference"] = float((torch.cat(images) - reference).pow(2).flatten(1).mean(1).sqrt().mean())
        if tally is not None and tally.applies:
            row["prompt_accuracy"] = tally.accuracy
        rows[name] = row
        if progress is not None:
            acc = f"   prompt acc {row['prompt_accuracy']:.3f}" if "prompt_accuracy" in row else ""
            progress(f"{name:<20s} FID {score:8.3f}   P {precision:.3f} R {recall:.3f}   "
                     f"{num_samples / gen_time:10.1f} img/s   "
                     f"RMS to {reference_name} {row.get('rms_to_reference', float('nan')):.3f}{acc}")
    rows = {name: rows[name] for name in generators}  # student first, then DDIM by decreasing steps
    return {"extractor": fid.info["extractor"], "extractor_sha256": fid.info.get("extractor_sha256"),
            "num_reference": fid.num_reference, "num_samples": num_samples, "seed": seed,
            "reference_chain": reference_name, "generators": rows, "grids": grids}
