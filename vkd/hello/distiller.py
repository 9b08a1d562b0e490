"""The two trainable HeLlO stages as :class:`vkd.engine.DistillationTask` modules.

* :class:`HelloTeacherTask` trains the soft-label teacher and saves weak-teacher snapshots at evenly
  spaced steps (the trajectory the multi-weak-teacher fit samples from, hello.md §4).
* :class:`ProjectorFitTask` fits the projector's LoRA factors with
  ``MSE(f(X), Y′) + λ·CE(f(X), Y)`` on the original training set, half of each batch clean and half
  through the student augmentation; at the end (``export``) it selects and updates the synthetic
  images and writes the distilled set + the adapter file.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import set_peft_model_state_dict
from torch import nn

from vkd.engine import DistillationTask, seeded
from vkd.errors import DataError
from vkd.hello.config import HelloConfig, HelloTeacherConfig, StudentConfig
from vkd.hello.data import LabelledImages, as_unit, load_splits, prompt_names, write_distilled_set
from vkd.hello.evaluate import accuracy, augment_batch, make_augmenter, student_configs
from vkd.hello.images import auto_factor, image_update, rded_select, stitch
from vkd.hello.losses import projector_fit_loss
from vkd.hello.model import Classifier, build_classifier, resolve_arch
from vkd.hello.projector import (
    ZeroShot,
    adapter_state_dict,
    add_lora,
    build_clip_with_info,
    build_projector,
    clip_family,
    lora_config,
    save_adapters,
)
from vkd.hello.teacher import resolve_teachers, save_teacher
from vkd.models.tiny_clip import ClipBundle

__all__ = ["HelloTeacherTask", "ProjectorFitTask", "snapshot_steps", "prepare_fit"]

log = logging.getLogger(__name__)


def snapshot_steps(total: int, count: int) -> list[int]:
    """``count`` evenly spaced steps in ``(0, total]`` ending at ``total`` (duplicates removed)."""
    return sorted({max(1, round(total * (k + 1) / count)) for k in range(count)})


class HelloTeacherTask(DistillationTask):
    """Cross-entropy training of the teacher classifier on augmented real images."""

    frozen_modules = ()

    def __init__(self, cfg: HelloTeacherConfig, train: LabelledImages, test: LabelledImages, run_dir: Path):
        super().__init__()
        self.cfg = cfg
        self.model = build_classifier(cfg.model, train.num_classes, cfg.data.image_size)
        self.class_names = train.class_names
        self.test = test
        self.run_dir = Path(run_dir)
        self.snapshots = snapshot_steps(cfg.train.steps, cfg.extra.num_snapshots)
        self.snapshot_acc: dict[int, float] = {}
        self.train_data = train

        aug_cfg = StudentConfig(crop_scale_min=cfg.extra.crop_scale_min, hflip=cfg.extra.hflip)
        self.augmenter = make_augmenter(aug_cfg, cfg.data.image_size)

    def student_module(self) -> nn.Module:
        return self.model

    def train_skipped(self) -> int:
        """Training files that failed to decode so far (flags shared with the engine's DataLoader workers)."""
        return self.train_data.skipped

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        x, y = batch  # [B, 3, S, S] float in [0, 1] (in RAM) or uint8 (streamed), [B]
        x = as_unit(x)
        if self.augmenter is not None:
            x = self.augmenter(x)
        logits = self.model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.extra.label_smoothing)
        return {"loss": loss, "train_acc": (logits.argmax(-1) == y).float().mean()}

    def on_step_end(self, step: int, outputs: dict[str, torch.Tensor], optimizers: dict[str, Any]) -> None:
        if step in self.snapshots:
            was = self.model.training
            self.model.eval()
            save_teacher(self.model, self.run_dir / "teachers" / f"teacher-step{step}.safetensors", {})
            self.snapshot_acc[step] = accuracy(self.model, self.test, device=next(self.model.parameters()).device)
            self.model.train(was)

    def extra_state_dict(self) -> dict[str, Any]:
        # the snapshots' accuracies end up in teacher.json: a resumed run must not forget the earlier ones
        return {"snapshot_acc": {int(k): float(v) for k, v in self.snapshot_acc.items()}}

    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        self.snapshot_acc = {int(k): float(v) for k, v in state.get("snapshot_acc", {}).items()}

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        was = self.model.training
        self.model.eval()
        acc = accuracy(self.model, self.test, device=next(self.model.parameters()).device)
        self.model.train(was)
        return {"test_acc": acc}

    def export(self, run_dir: Path) -> None:
        self.model.eval()
        acc = self.evaluate(self.cfg.train.steps)["test_acc"]
        meta = {
            "num_classes": len(self.class_names),
            "class_names": list(self.class_names),
            "image_size": self.cfg.data.image_size,
            "model": asdict(self.cfg.model),
            "data": asdict(self.cfg.data),
            "recipe": asdict(self.cfg.train),
            "test_acc": acc,
            "snapshot_test_acc": {str(k): v for k, v in sorted(self.snapshot_acc.items())},
            "skipped_images": self.test.skipped + self.train_skipped(),
        }
        save_teacher(self.model, Path(run_dir) / "teacher.safetensors", meta)
        (Path(run_dir) / "class_names.txt").write_text("\n".join(self.class_names) + "\n")


class ProjectorFitTask(DistillationTask):
    """LoRA fit of the projector to the (weak) teachers' logits; exports the distilled set at the end.

    Attributes:
        projector: the peft-wrapped :class:`~vkd.hello.projector.Projector` (only LoRA factors train).
        teacher: ``ModuleList`` of frozen teachers used for fitting; the last one is the final teacher.
    """

    frozen_modules = ("teacher",)

    def __init__(self, cfg: HelloConfig, projector: nn.Module, fit_teachers: list[Classifier], final_teacher: Classifier,
                 train: LabelledImages, test: LabelledImages, clip: ClipBundle, lora_kwargs: dict[str, Any],
                 teacher_meta: dict[str, Any] | None = None, public_clip: dict[str, Any] | None = None):
        super().__init__()
        self.cfg = cfg
        self.projector = projector
        self.teacher = nn.ModuleList([*fit_teachers, final_teacher]).requires_grad_(False).eval()
        self.num_fit = len(fit_teachers)
        self.train_data = train
        self.test = test
        self.clip_info = {"clip_model": clip.model_name, "clip_pretrained": clip.pretrained or ""}
        self.lora_kwargs = lora_kwargs
        self.clip_family = clip_family(projector.base_model.model) if hasattr(projector, "base_model") else ""
        self.teacher_meta = teacher_meta or {}
        self.public_clip = public_clip or {}  # size and pretraining data of the base CLIP (hello.json)
        self.augmenter = make_augmenter(cfg.student, cfg.data.image_size)
        self.factor = auto_factor(cfg.data.image_size, cfg.selection.factor)
        # what the fit starts from and is measured against: CLIP zero-shot (the adapters disabled; Proposition 1).
        # Measured in the first evaluation pass, on the training device; it does not change during the fit.
        self.zero_shot: dict[str, float] | None = None

    # ---- training -------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> ProjectorFitTask:
        super().train(mode)
        self.teacher.eval()  # teachers' BatchNorm statistics are never updated
        return self

    def _targets(self, x: torch.Tensor) -> torch.Tensor:
        sampling = self.cfg.teacher.sampling
        if sampling == "final_only" or self.num_fit == 0:
            return self.teacher[-1](x)
        if sampling == "mean_logits":
            return torch.stack([self.teacher[i](x) for i in range(self.num_fit)]).mean(0)
        i = int(torch.randint(self.num_fit, ()))  # uniform per batch (engine seeds the RNG per step)
        return self.teacher[i](x)

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        x, y = batch
        x = as_unit(x)  # streamed batches arrive as uint8
        n_aug = int(round(x.shape[0] * self.cfg.projector.aug_fraction))
        if n_aug > 0:  # a projector fitted on clean images only mislabels augmented views (§4)
            x_aug, _, _, _ = augment_batch(x[:n_aug], y[:n_aug], self.cfg.student, 1, self.augmenter)
            x = torch.cat([x_aug, x[n_aug:]])
        with torch.no_grad():
            target = self._targets(x)
        return projector_fit_loss(self.projector(x), target, y, self.cfg.projector.fit_target,
                                  self.cfg.projector.lambda_ce)

    def student_module(self) -> nn.Module:
        return self.projector

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        return adapter_state_dict(self.projector)  # the CLIP weights are public: only the factors

    def load_checkpoint_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        set_peft_model_state_dict(self.projector, state)

    # ---- evaluation -----------------------------------------------------------------------------
    def _device(self) -> torch.device:
        return next(self.projector.parameters()).device

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """One pass over the (streamed) test set: projector and teacher accuracy, their argmax agreement on clean and
        on augmented views, the fit MSE — next to the zero-shot CLIP figures of the start."""
        was = self.projector.training
        self.projector.eval()
        dev = self._device()
        teacher = self.teacher[-1]
        acc_p = acc_t = agree = agree_aug = mse = 0.0
        zs = {"acc": 0.0, "agree": 0.0, "mse": 0.0}
        n = 0
        zero_shot = ZeroShot(self.projector)  # built per call: as a submodule the projector would be listed twice
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(1234)  # fixed augmented views so the number is comparable across steps
        for x, y, _, _ in self.test.batches(batch_size=512):
            x, y = x.to(dev), y.to(dev)
            p, t = self.projector(x), teacher(x)
            acc_p += float((p.argmax(-1) == y).sum())
            acc_t += float((t.argmax(-1) == y).sum())
            agree += float((p.argmax(-1) == t.argmax(-1)).sum())
            mse += float(projector_fit_loss(p, t, y, self.cfg.projector.fit_target)["mse"]) * x.shape[0]
            if self.zero_shot is None:
                z = zero_shot(x)
                zs["acc"] += float((z.argmax(-1) == y).sum())
                zs["agree"] += float((z.argmax(-1) == t.argmax(-1)).sum())
                zs["mse"] += float(projector_fit_loss(z, t, y, self.cfg.projector.fit_target)["mse"]) * x.shape[0]
            xa, _, _, _ = augment_batch(x, y, self.cfg.student, 1, self.augmenter)
            agree_aug += float((self.projector(xa).argmax(-1) == teacher(xa).argmax(-1)).sum())
            n += x.shape[0]
        torch.random.set_rng_state(gen_state)
        m = max(n, 1)
        if self.zero_shot is None:
            self.zero_shot = {"zero_shot_test_acc": zs["acc"] / m, "zero_shot_teacher_agreement": zs["agree"] / m,
                              "zero_shot_fit_mse": zs["mse"] / m}
        out = {"projector_test_acc": acc_p / m, "teacher_test_acc": acc_t / m, **self.zero_shot,
               "agreement_clean": agree / m, "agreement_augmented": agree_aug / m, "projector_fit_mse": mse / m}
        out["projector_gain_over_zero_shot"] = out["projector_test_acc"] - out["zero_shot_test_acc"]
        self.projector.train(was)
        return out

    # ---- export: selection, image update, files --------------------------------------------------
    def export(self, run_dir: Path) -> None:
        run_dir = Path(run_dir)
        cfg = self.cfg
        dev = self._device()
        self.projector.eval()
        t0 = time.perf_counter()
        crop_scale = tuple(cfg.selection.crop_scale) if cfg.selection.crop_scale else \
            ((1.0, 1.0) if self.factor == 1 else (0.08, 1.0))
        # streams the training images class by class; patches kept as uint8 (what the PNGs store)
        sel = rded_select(self.train_data, None, self.teacher[-1], self.train_data.num_classes, cfg.selection.ipc,
                          self.factor, cfg.selection.mipc, cfg.selection.num_crop, crop_scale, seed=cfg.run.seed,
                          strategy=cfg.selection.strategy,
                          label_model=self.projector if cfg.selection.projector_agreement else None,
                          patch_dtype=torch.uint8)
        t_sel = time.perf_counter() - t0
        update: dict[str, Any] = {"g_before": 0.0, "g_after": 0.0}
        images = sel.images
        if sel.factor == 1:  # no down-sampling: z = p, G ≡ 0, nothing to update (spec §5.2)
            update["skipped"] = "factor 1"
        elif cfg.image_update.enabled and cfg.image_update.steps > 0:
            # "clip": the frozen base encoder (adapters disabled); "projector": the LoRA-adapted one
            context = self.projector.disable_adapter() if cfg.image_update.encoder == "clip" else nullcontext()
            with context:  # the full-resolution targets are cut again per chunk, never all in RAM
                patches, update = image_update(self.projector.base_model.model.encode, sel.patches,
                                               sel.source_crops, cfg.image_update.steps, cfg.image_update.lr,
                                               device=dev)
            images = stitch(patches, sel.factor)
        t_upd = time.perf_counter() - t0 - t_sel
        meta = {**self.clip_info, "prompt_template": cfg.clip.prompt_template,
                "class_names": prompt_names(self.train_data.class_names), "lora": self.lora_kwargs,
                "clip_family": self.clip_family}
        sizes = save_adapters(self.projector, run_dir / "projector_adapters.safetensors", meta,
                              cfg.projector.adapter_dtype)
        write_distilled_set(run_dir / "distilled", images, sel.labels, self.train_data.class_names,
                            extra={"factor": sel.factor, "ipc": cfg.selection.ipc, "crop_scale": list(crop_scale),
                                   "teacher_ce": [float(v) for v in sel.scores],
                                   "source_index": [int(v) for v in sel.source_index], **update})
        (run_dir / "class_names.txt").write_text("\n".join(self.train_data.class_names) + "\n")
        info = {"adapter": sizes, "selection_seconds": t_sel, "image_update_seconds": t_upd,
                "image_update": update, "factor": sel.factor, "num_images": int(images.shape[0]),
                "skipped_images": self.train_data.skipped + self.test.skipped,
                "teacher": {k: self.teacher_meta.get(k) for k in ("test_acc", "snapshot_test_acc", "model")},
                "num_fit_teachers": self.num_fit, "fit_snapshots": self.teacher_meta.get("fit_snapshots", []),
                "min_snapshot_accuracy": cfg.teacher.min_snapshot_accuracy,
                "clip_family": self.clip_family, "lora_targets": list(self.lora_kwargs["target_modules"]),
                "storage": self._storage(sizes), **self.evaluate(cfg.train.steps)}
        (run_dir / "hello.json").write_text(json.dumps(info, indent=2))

    def _storage(self, adapter: dict[str, int]) -> dict[str, Any]:
        """What is public and what is stored. The base CLIP is not counted: a hub model, or vkd's tiny CLIP, which vkd
        ships the recipe of and rebuilds from printed digits alone; pretrained on the task's own training split
        (``clip.tiny_data=train``) it is not public, and ``what`` says so. The LoRA factors are the stored labels."""
        source = self.public_clip.get("pretraining", {}).get("source")
        what = {"printed_digits": "vkd's tiny CLIP, pretrained by vkd on printed digits (no target image): public, "
                                  "not counted",
                "train": "vkd's tiny CLIP, pretrained on this task's labelled training split: NOT a public model, "
                         "not counted"}.get(source, "the base CLIP (public weights): not counted")
        return {"public": {"what": what, **self.public_clip},
                "stored": {"what": "the LoRA factors (projector_adapters.safetensors)", **adapter}}


def _check_ipc(cfg: HelloConfig, train: LabelledImages) -> int:
    factor = auto_factor(cfg.data.image_size, cfg.selection.factor)
    need = cfg.selection.ipc * factor * factor
    counts = train.counts()
    small = [(train.class_names[i], int(n)) for i, n in enumerate(counts) if n < need]
    if small:
        name, n = small[0]
        raise DataError(f"selection.ipc={cfg.selection.ipc} (stitch factor {factor}) needs {need} images per class "
                        f"but class '{name}' has {n}")
    return factor


def prepare_fit(cfg: HelloConfig, device: str | torch.device = "cpu", progress: bool = True
                ) -> tuple[ProjectorFitTask, LabelledImages, LabelledImages]:
    """Index the data, load teachers and CLIP; build the LoRA projector and its fitting task."""
    resolve_arch(cfg.teacher.model.arch)
    student_configs(cfg.student, cfg.eval.students)  # unknown student names fail now, not after the fit
    train, test = load_splits(cfg.data)
    _check_ipc(cfg, train)
    fit, final, meta = resolve_teachers(cfg, train)
    clip, clip_info = build_clip_with_info(cfg, train, device=device, progress=progress)
    projector = build_projector(clip, prompt_names(train.class_names), cfg.clip.prompt_template)
    kwargs = lora_config(projector, cfg.projector)
    with seeded(cfg.run.seed):  # LoRA's A factors are drawn at random: from run.seed alone, not from what ran before
        model = add_lora(projector, kwargs)
    task = ProjectorFitTask(cfg, model, fit, final, train, test, clip, kwargs, meta, clip_info)
    return task, train, test
