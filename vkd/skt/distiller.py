"""The SKT training tasks: CSRNet on ground truth (teacher or no-transfer baseline) and SKT distillation.

Both are :class:`vkd.engine.DistillationTask` modules that the shared engine trains; batches are the dicts
of :class:`vkd.skt.datasets.CrowdTrainDataset` collated by :func:`vkd.skt.datasets.pad_collate`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from vkd.engine import DistillationTask, resolve_mixed_precision
from vkd.skt.checkpoints import is_vgg_state_file, load_reference_checkpoint, load_vgg16_imagenet
from vkd.skt.config import CSRNetConfig, SKTConfig, SKTTeacherConfig
from vkd.skt.datasets import CrowdEvalDataset
from vkd.skt.evaluate import evaluate_model
from vkd.skt.losses import SKTLoss, density_loss
from vkd.skt.models import CSRNet, count_parameters, make_adapters
from vkd.skt.runs import RUN_EXPORT

__all__ = ["build_csrnet", "CSRNetTask", "SKTTask", "export_model"]

log = logging.getLogger(__name__)


def build_csrnet(cfg: CSRNetConfig) -> CSRNet:
    """A CSRNet initialised as ``cfg`` says (random, ImageNet VGG-16 frontend, or a full checkpoint)."""
    weights = cfg.weights.strip()
    full_checkpoint = False
    if weights not in ("", "none", "imagenet"):
        # A local file: a VGG-16 state dict (features.*) or a whole CSRNet / SKT checkpoint.
        full_checkpoint = not is_vgg_state_file(Path(weights).expanduser())
    init = cfg.init
    if init == "auto":
        init = "reference" if weights == "imagenet" or (weights not in ("", "none") and not full_checkpoint) else "kaiming"
    model = CSRNet(cfg.width_div, cfg.ceil_mode, init=init)
    if weights in ("", "none"):
        return model
    if full_checkpoint:
        load_reference_checkpoint(model, weights)
    else:
        load_vgg16_imagenet(model, weights)
    return model


def export_model(model: CSRNet, run_dir: Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the deployable network: ``export/model.safetensors`` + ``export/model.json`` (no adapters)."""
    path = Path(run_dir) / RUN_EXPORT
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    info = {"arch": "csrnet", "width_div": model.width_div, "ceil_mode": model.ceil_mode,
            "parameters": count_parameters(model), "normalisation": "imagenet", "output_stride": 8, **(extra or {})}
    path.with_suffix(".json").write_text(json.dumps(info, indent=2))
    return path


class _EvalMixin:
    """End-of-training (and every ``eval_every``) MAE / RMSE on the test and optional validation split."""

    eval_sets: dict[str, CrowdEvalDataset]

    def _evaluate_network(self, model: nn.Module, prefix: str = "") -> dict[str, float]:
        cfg = self.cfg  # type: ignore[attr-defined]
        out: dict[str, float] = {}
        for name, dataset in self.eval_sets.items():
            metrics, _ = evaluate_model(model, dataset, cfg.eval.tile_size, cfg.eval.tile_overlap, cfg.eval.max_images)
            tag = "" if name == "test" else f"{name}_"
            out[f"{prefix}{tag}mae"] = metrics["mae"]
            out[f"{prefix}{tag}rmse"] = metrics["rmse"]
        return out

    @property
    def validation_metrics(self) -> tuple[str, ...]:
        """``val_mae`` / ``val_rmse`` when there is a validation set (``train.select_best`` may use them)."""
        return ("val_mae", "val_rmse") if "val" in self.eval_sets else ()

    def validate(self, step: int) -> dict[str, float]:
        cfg = self.cfg  # type: ignore[attr-defined]
        model = self.student_module()  # type: ignore[attr-defined]
        metrics, _ = evaluate_model(model, self.eval_sets["val"], cfg.eval.tile_size, cfg.eval.tile_overlap,
                                    cfg.eval.max_images)
        return {"val_mae": metrics["mae"], "val_rmse": metrics["rmse"]}


class CSRNetTask(_EvalMixin, DistillationTask):
    """``skt-teacher``: a CSRNet trained on ground-truth densities only (``‖D − D_GT‖²`` summed over pixels).

    With ``model.width_div=4`` this is the "student trained from scratch, no transfer" baseline.

    Args:
        cfg: the task config.
        eval_sets: ``{"test": CrowdEvalDataset, "val": ...}`` evaluated by :meth:`evaluate`.
    """

    frozen_modules: tuple[str, ...] = ()

    def __init__(self, cfg: SKTTeacherConfig, eval_sets: dict[str, CrowdEvalDataset] | None = None):
        super().__init__()
        self.cfg = cfg
        self.model = build_csrnet(cfg.model)
        self.eval_sets = dict(eval_sets or {})

    def student_module(self) -> nn.Module:
        return self.model

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pred = self.model(batch["image"])  # [B, 1, h, w]
        # Per-sample pixel sums averaged over the batch: the reference's sum at batch 1.
        loss = density_loss(pred, batch["density"], "none").mean()
        count_err = (pred.detach().flatten(1).sum(1) - batch["count"]).abs().mean()
        return {"loss": loss, "loss_gt": loss.detach(), "count_abs_err": count_err}

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        return self._evaluate_network(self.model)

    def export(self, run_dir: Path) -> None:
        export_model(self.model, run_dir, {"task": self.cfg.task})


class SKTTask(_EvalMixin, DistillationTask):
    """``skt``: a 1/n CSRNet student distilled from a frozen CSRNet teacher (spec §2-5).

    The student's six taps go through training-only 1×1 Conv+ReLU adapters (``self.adapters``, not exported)
    to the teacher's widths (only built when a term of :data:`~vkd.skt.losses.SKT_LOSS_TERMS` that reads them has
    a weight); the loss is :class:`~vkd.skt.losses.SKTLoss`. With all teacher-dependent weights at 0 the teacher is
    not needed (``teacher=None``): the no-transfer baseline.

    Args:
        cfg: the task config.
        teacher: the frozen teacher CSRNet (or ``None`` when no loss uses it).
        eval_sets: evaluation data sets.
    """

    frozen_modules: tuple[str, ...] = ("teacher",)

    def __init__(self, cfg: SKTConfig, teacher: CSRNet | None, eval_sets: dict[str, CrowdEvalDataset] | None = None):
        super().__init__()
        self.cfg = cfg
        if cfg.loss.uses_teacher and teacher is None:
            raise ValueError("the SKT loss uses the teacher (a weight of a teacher term > 0) but teacher is None")
        self.teacher = teacher.requires_grad_(False).eval() if teacher is not None else None
        self.student = build_csrnet(cfg.student)
        if teacher is not None and cfg.loss.needs_adapters:
            self.adapters = make_adapters(self.student.tap_channels, teacher.tap_channels)
        else:
            self.adapters = nn.ModuleList()
        self.criterion = SKTLoss.from_weights(cfg.loss.weights(), cfg.loss.reduction,
                                              per_sample_fsp=cfg.loss.fsp == "per_sample")
        self.eval_sets = dict(eval_sets or {})
        self._teacher_metrics: dict[str, float] | None = None
        self._teacher_bf16: bool | None = None  # teacher.precision resolved on the first step's device

    def train(self, mode: bool = True) -> SKTTask:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher is frozen: always eval mode (reference: teacher.eval())
        return self

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch["image"]  # [B, 3, H, W]
        s_items = self.student(x, return_features=True)  # 6 taps + density [B, 1, h, w]
        t_items = None
        if self.teacher is not None and self.cfg.loss.uses_teacher:
            with torch.no_grad(), self._teacher_autocast(x.device):
                t_items = [t.detach().float() for t in self.teacher(x, return_features=True)]
        if len(self.adapters):
            s_items = [a(f) for a, f in zip(self.adapters, s_items[:-1], strict=True)] + [s_items[-1]]
        out = self.criterion(s_items, t_items, batch["density"])
        out["count_abs_err"] = (s_items[-1].detach().flatten(1).sum(1) - batch["count"]).abs().mean()
        return out

    def _teacher_autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self._teacher_bf16 is None:
            precision = self.cfg.teacher.precision
            self._teacher_bf16 = resolve_mixed_precision(precision, device) == "bf16"
            log.info("SKT: frozen teacher forward in %s (teacher.precision=%s)",
                     "bf16" if self._teacher_bf16 else "fp32", precision)
        if not self._teacher_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        metrics = self._evaluate_network(self.student)
        if self.teacher is not None:
            if self._teacher_metrics is None:  # the teacher is frozen: evaluate it once
                self._teacher_metrics = self._evaluate_network(self.teacher, prefix="teacher_")
            metrics.update(self._teacher_metrics)
            if self._teacher_metrics.get("teacher_mae"):
                metrics["mae_ratio_to_teacher"] = metrics["mae"] / self._teacher_metrics["teacher_mae"]
        return metrics

    def export(self, run_dir: Path) -> None:
        export_model(self.student, run_dir, {"task": self.cfg.task})
