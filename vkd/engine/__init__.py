"""The shared training engine: task contract, accelerate-based loop, checkpoints."""

from vkd.engine.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint_weights,
    load_training_state,
    read_best,
    save_checkpoint,
    selected_checkpoint,
    verify_checkpoint,
    with_final_ema,
)
from vkd.engine.ema import EMA
from vkd.engine.precision import native_bf16, resolve_mixed_precision
from vkd.engine.task import DistillationTask
from vkd.engine.trainer import GlobalBatchSampler, Trainer, build_optimizer, seeded, torch_threads, train_task

__all__ = [
    "DistillationTask",
    "EMA",
    "GlobalBatchSampler",
    "Trainer",
    "build_optimizer",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint_weights",
    "with_final_ema",
    "load_training_state",
    "read_best",
    "selected_checkpoint",
    "native_bf16",
    "resolve_mixed_precision",
    "save_checkpoint",
    "seeded",
    "torch_threads",
    "train_task",
    "verify_checkpoint",
]
