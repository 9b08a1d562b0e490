"""The contract between a distillation method and the shared training loop.

A task is an ``nn.Module`` that composes teacher, student and losses (as in timm's
``DistillationTask``): ``forward(batch)`` returns a dict with a scalar ``loss`` and any named
components, which the engine logs. Everything else is an optional hook with a sensible default, so a
method only writes what is specific to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vkd.config import TrainConfig

__all__ = ["DistillationTask"]


class DistillationTask(nn.Module):
    """Base class of every trainable task (teacher + student + losses).

    Attributes:
        frozen_modules: names of child modules that are never trained nor checkpointed (rebuilt from
            the config on resume), typically the teacher.
        find_unused_parameters: passed to DDP when the task runs on several processes.
        manual_gradient_sync: the task replaces its parameters during training (densification), which DDP
            cannot follow: on several processes the engine then does not wrap it in DDP, broadcasts rank 0's
            parameters once and all-reduces (averages) the gradients of ``trainable_parameters()`` after each
            backward instead. The task must keep its parameters identical across ranks.

    Examples:
        A task holds the frozen teacher and the trainable student and returns its losses; ``"loss"`` is what the
        engine back-propagates, the other entries are logged.

        >>> import torch
        >>> from torch import nn
        >>> class Regression(DistillationTask):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.teacher, self.student = nn.Linear(4, 2), nn.Linear(4, 2)
        ...     def forward(self, batch):
        ...         x = batch[0]  # [B, 4]
        ...         with torch.no_grad():
        ...             target = self.teacher(x)  # [B, 2]
        ...         mse = nn.functional.mse_loss(self.student(x), target)
        ...         return {"loss": mse, "mse": mse}
        >>> task = Regression()
        >>> sorted(task([torch.randn(8, 4)])), len(task.trainable_parameters())  # the teacher is frozen
        (['loss', 'mse'], 2)
    """

    frozen_modules: tuple[str, ...] = ("teacher",)
    find_unused_parameters: bool = False
    manual_gradient_sync: bool = False
    # Names of the metrics validate() returns (train.select_best must be one of them); () = no validation split.
    validation_metrics: tuple[str, ...] = ()

    # ---- required -------------------------------------------------------------------------------
    def forward(self, batch: Any) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        """One training step's losses. Must contain ``loss`` (a scalar, mean over the batch).

        With ``Trainer(train_dataset=None)`` (data-free tasks) ``batch`` is a ``LongTensor [B]`` of
        global sample indices, unique per step and process: use them to seed per-sample noise so a
        run on several processes equals the single-process run.
        """
        raise NotImplementedError

    # ---- optimisation ---------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the default optimizer trains: all that require grad outside ``frozen_modules``."""
        params = []
        for name, param in self.named_parameters():
            if name.split(".", 1)[0] in self.frozen_modules or not param.requires_grad:
                continue
            params.append(param)
        return params

    def configure_optimizers(self, cfg: TrainConfig) -> Any:
        """Return ``None`` to let the engine build ``cfg.optimizer`` over ``trainable_parameters()``.

        Override to return an optimizer, a ``dict[str, Optimizer]`` (e.g. one per Gaussian
        attribute for gsplat strategies), or ``(optimizers, schedulers)`` where schedulers mirrors
        the optimizers' structure (``None`` entries allowed).
        """
        return None

    # ---- hooks ----------------------------------------------------------------------------------
    def on_before_optimizer_step(self, step: int) -> None:
        """Called after backward (gradients are available), before the optimizer step."""

    def on_step_end(self, step: int, outputs: dict[str, torch.Tensor], optimizers: dict[str, Any]) -> None:
        """Called after the optimizer step; ``step`` is the number of completed steps."""

    def evaluate(self, step: int) -> dict[str, float]:
        """Periodic/final evaluation on the main process; returned scalars go to metrics and summary."""
        return {}

    def validate(self, step: int) -> dict[str, float]:
        """Metrics on the validation split (carved from the training data) for ``train.select_best``; main
        process. Tasks that have one declare its metric names in ``validation_metrics``."""
        return {}

    def save_samples(self, step: int, out_dir: Path) -> None:
        """Write sample grids / renders for the current state into ``out_dir`` (main process)."""

    def export(self, run_dir: Path) -> None:
        """Write the final deliverable (e.g. a ``save_pretrained`` student) at the end of training."""

    # ---- checkpoint -----------------------------------------------------------------------------
    def student_module(self) -> nn.Module:
        """The module the EMA tracks and exports (default ``self.student``, else the whole task)."""
        return getattr(self, "student", self)

    def ema_state_keys(self) -> list[str] | None:
        """Keys of ``student_module().state_dict()`` the EMA averages (``None``: all; e.g. only LoRA adapters)."""
        return None

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors saved to ``model.safetensors``: the state dict minus ``frozen_modules``."""
        return {k: v for k, v in self.state_dict().items() if k.split(".", 1)[0] not in self.frozen_modules}

    def load_checkpoint_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`checkpoint_state_dict`. Override when parameter shapes change in training."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if k.split(".", 1)[0] not in self.frozen_modules]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint does not match the task: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")

    def extra_state_dict(self) -> dict[str, Any]:
        """Extra training state (tensors, numbers, lists) saved with the optimizer, e.g. densification stats."""
        return {}

    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`extra_state_dict`."""
