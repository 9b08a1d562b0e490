"""The toy task: a small MLP student distilled from a fixed, randomly initialised MLP teacher.

It exercises the whole engine (config, data order, checkpoints, resume, distributed) in seconds and is
the template for a real task: config dataclass, task ``nn.Module`` returning a dict of losses, a
``run`` function and an ``evaluate`` function declared in :mod:`vkd.toy`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset, TensorDataset

from vkd.config import TaskConfig, TrainConfig, load_config
from vkd.data.splits import carve_validation
from vkd.engine.checkpoint import load_checkpoint_weights, selected_checkpoint
from vkd.engine.task import DistillationTask
from vkd.engine.trainer import train_task
from vkd.errors import ConfigError, DataError

__all__ = ["ToyConfig", "ToyTask", "make_toy_data"]


@dataclass
class ToyModelConfig:
    in_dim: int = 8
    out_dim: int = 4
    teacher_hidden: int = 64
    student_hidden: int = 16
    teacher_seed: int = 1234


@dataclass
class ToyDataConfig:
    num_train: int = 512
    num_test: int = 256
    data_seed: int = 7
    val_split: float = 0.0  # fraction (or count) of the training inputs held out for train.select_best ("val_mse")


@dataclass
class ToyLossConfig:
    mse_weight: float = 1.0
    kd_weight: float = 0.5  # KL between softmax(teacher) and softmax(student) at temperature
    temperature: float = 2.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"loss.temperature must be > 0, got {self.temperature}")


@dataclass
class ToyConfig(TaskConfig):
    task: str = "toy"
    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    data: ToyDataConfig = field(default_factory=ToyDataConfig)
    loss: ToyLossConfig = field(default_factory=ToyLossConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=200, batch_size=32, lr=3e-3,
                                                                   log_every=10, checkpoint_every=100))


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, out_dim))


def make_toy_data(cfg: ToyConfig, split: str = "train") -> TensorDataset:
    """Gaussian inputs ``[N, in_dim]`` (labels unused) from a seed that depends on the split."""
    n = cfg.data.num_train if split == "train" else cfg.data.num_test
    gen = torch.Generator().manual_seed(cfg.data.data_seed + (0 if split == "train" else 1))
    return TensorDataset(torch.randn(n, cfg.model.in_dim, generator=gen))


def make_teacher(cfg: ToyConfig) -> nn.Module:
    state = torch.random.get_rng_state()
    torch.manual_seed(cfg.model.teacher_seed)
    teacher = _mlp(cfg.model.in_dim, cfg.model.teacher_hidden, cfg.model.out_dim)
    torch.random.set_rng_state(state)
    return teacher.requires_grad_(False).eval()


class ToyTask(DistillationTask):
    """MSE on logits + temperature-scaled KL, student ← frozen teacher."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        self.teacher = make_teacher(cfg)
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(cfg.run.seed)
        self.student = _mlp(cfg.model.in_dim, cfg.model.student_hidden, cfg.model.out_dim)
        torch.random.set_rng_state(gen_state)
        self.test_inputs = make_toy_data(cfg, "test").tensors[0]
        _, val = carve_validation(cfg.data.num_train, cfg.data.val_split, cfg.data.data_seed)
        self.val_inputs = make_toy_data(cfg, "train").tensors[0][val]  # [V, in_dim]
        self.validation_metrics = ("val_mse",) if val else ()

    def forward(self, batch: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch[0]  # [B, in_dim]
        with torch.no_grad():
            target = self.teacher(x)  # [B, out_dim]
        pred = self.student(x)
        mse = F.mse_loss(pred, target)
        tau = self.cfg.loss.temperature
        kd = F.kl_div(F.log_softmax(pred / tau, -1), F.log_softmax(target / tau, -1), log_target=True,
                      reduction="batchmean") * tau**2
        loss = self.cfg.loss.mse_weight * mse + self.cfg.loss.kd_weight * kd
        return {"loss": loss, "mse": mse, "kd": kd}

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        x = self.test_inputs.to(next(self.student.parameters()).device)
        return {"test_mse": float(F.mse_loss(self.student(x), self.teacher(x)))}

    @torch.no_grad()
    def validate(self, step: int) -> dict[str, float]:
        x = self.val_inputs.to(next(self.student.parameters()).device)
        return {"val_mse": float(F.mse_loss(self.student(x), self.teacher(x)))} if len(x) else {}


def train_split(cfg: ToyConfig) -> Subset:
    """The training inputs minus the validation ones (``data.val_split``)."""
    train, _ = carve_validation(cfg.data.num_train, cfg.data.val_split, cfg.data.data_seed)
    return Subset(make_toy_data(cfg, "train"), train)


def run(cfg: ToyConfig, resume: str | None = None) -> dict:
    return train_task(cfg, ToyTask(cfg), train_split(cfg), resume=resume)


def evaluate(run_dir: Path, overrides: list[str], out_dir: Path | None = None) -> dict:
    cfg = load_config(ToyConfig, run_dir / "config.yaml", overrides, task="toy")
    ckpt = selected_checkpoint(run_dir)  # best/ when the run selected one
    if ckpt is None:
        raise DataError(f"{run_dir} has no checkpoint to evaluate")
    task = ToyTask(cfg)
    task.load_checkpoint_state_dict(load_checkpoint_weights(ckpt))
    metrics = {**task.evaluate(0), "checkpoint": ckpt.name}
    out = (out_dir or run_dir) / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2))
    return metrics
