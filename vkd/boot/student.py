"""The BOOT student ``g_θ(ε, t, c)``: reads pure noise ε and predicts the signal y_t at time t.

With the default ``teacher_to_x0`` parameterisation the student is a copy of the teacher network
whose output goes through the teacher's own ``to_x0`` *as if ε were x_t*, so at initialisation
``g_θ(ε, t, c) = f_φ(ε, t, c)`` exactly and the boundary condition at t = T holds at step 0.
``sample`` uses the network output directly (exact initialisation only for x0-prediction teachers).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import DDPMScheduler, UNet2DModel
from torch import nn

from vkd.boot.schedule import NoiseSchedule
from vkd.boot.teacher import DiffusionTeacher, UNetDenoiser, _as_timesteps, _build_scheduler, to_x0
from vkd.errors import UserError

__all__ = ["BootStudent", "STUDENT_META_FILE", "save_student", "load_student"]

STUDENT_META_FILE = "vkd_student.json"


class BootStudent(nn.Module):
    """``g_θ(ε, t, c) = to_x0(net_θ(ε, t, c), x=ε, t)`` (or ``net_θ`` itself for ``sample``).

    Args:
        net: ``net(x [B,C,H,W], t [B] float, class_labels [B] | None) -> [B, C, H, W]``.
        schedule: the teacher's :class:`NoiseSchedule` (coefficients of ``to_x0``).
        prediction_type: what ``net`` predicts (the teacher's ``prediction_type``).
        parameterization: ``teacher_to_x0`` | ``sample``.
        t_sample: timestep used for one-step sampling (-1 with the clean endpoint, else 0).
    """

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, prediction_type: str,
                 parameterization: Literal["teacher_to_x0", "sample"] = "teacher_to_x0", t_sample: float = -1.0):
        super().__init__()
        if parameterization not in ("teacher_to_x0", "sample"):
            raise ValueError(f"parameterization must be 'teacher_to_x0' or 'sample', got {parameterization!r}")
        self.net = net
        self.schedule = schedule
        self.prediction_type = prediction_type if parameterization == "teacher_to_x0" else "sample"
        self.parameterization = parameterization
        self.t_sample = float(t_sample)

    @classmethod
    def from_teacher(cls, teacher: DiffusionTeacher, parameterization: str = "teacher_to_x0",
                     t_sample: float = -1.0) -> BootStudent:
        """Copy the teacher's network (architecture and weights) into a trainable student."""
        net = copy.deepcopy(teacher.net).requires_grad_(True).train()
        return cls(net, teacher.schedule, teacher.prediction_type, parameterization, t_sample)

    def raw(self, eps: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The network output ``[B, C, H, W]`` before ``to_x0``."""
        return self.net(eps, _as_timesteps(t, eps.shape[0], eps.device, torch.float64), class_labels)

    def signal(self, out: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``to_x0(out, x=ε, t)``; ``t < 0`` (clean endpoint) uses index-0 coefficients, never σ = 0."""
        if self.prediction_type == "sample":
            return out
        t = _as_timesteps(t, eps.shape[0], eps.device, torch.float64)
        alpha, sigma = self.schedule.alpha_sigma(t.clamp(min=0.0))
        return to_x0(out, eps, alpha, sigma, self.prediction_type)

    def forward(self, eps: torch.Tensor, t: torch.Tensor | float, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Signal ``[B, C, H, W]`` predicted from noise ``eps [B, C, H, W]`` at float timesteps ``t [B]``."""
        t = _as_timesteps(t, eps.shape[0], eps.device, torch.float64)
        return self.signal(self.raw(eps, t, class_labels), eps, t)

    @torch.no_grad()
    def generate(self, eps: torch.Tensor, class_labels: torch.Tensor | None = None, clamp: bool = True) -> torch.Tensor:
        """One-step sample ``x0 = g(ε, t_sample, c)`` ``[B, C, H, W]``, clamped to [-1, 1] for export."""
        x0 = self(eps, self.t_sample, class_labels)
        return x0.clamp(-1.0, 1.0) if clamp else x0


def save_student(student: BootStudent, path: str | Path, scheduler_config: dict[str, Any],
                 meta: dict[str, Any]) -> Path:
    """Write a UNet student with ``save_pretrained`` (``unet/``, ``scheduler/``) plus ``vkd_student.json``."""

    if not isinstance(student.net, UNetDenoiser):
        raise ValueError("save_student needs a UNet student (net is not a UNetDenoiser)")
    path = Path(path)
    (path / "unet").mkdir(parents=True, exist_ok=True)
    student.net.unet.save_pretrained(str(path / "unet"))
    cfg = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    if "timesteps" in cfg and "num_train_timesteps" not in cfg:
        cfg["num_train_timesteps"] = cfg.pop("timesteps")
    sched_dir = path / "scheduler"
    sched_dir.mkdir(exist_ok=True)
    # the exact config (class name included) is what the student's to_x0 coefficients come from
    (sched_dir / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": scheduler_config.get("_class_name", DDPMScheduler.__name__), **cfg}, indent=2) + "\n")
    info = {"parameterization": student.parameterization, "prediction_type": student.prediction_type,
            "t_sample": student.t_sample, "interp": student.schedule.interp, **meta}
    (path / STUDENT_META_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return path


def load_student(path: str | Path) -> tuple[BootStudent, dict[str, Any]]:
    """Inverse of :func:`save_student`: ``(student in eval mode, metadata)``."""

    path = Path(path)
    meta_path = path / STUDENT_META_FILE
    if not meta_path.is_file():
        raise UserError(f"{path} is not an exported BOOT student (no {STUDENT_META_FILE})")
    meta = json.loads(meta_path.read_text())
    sched_cfg = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    _, acp = _build_scheduler(sched_cfg, str(path))
    try:
        unet = UNet2DModel.from_pretrained(str(path / "unet"))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the student UNet from {path / 'unet'}: {err}") from None
    student = BootStudent(UNetDenoiser(unet), NoiseSchedule(acp, interp=meta.get("interp", "lambda")),
                          meta["prediction_type"], meta["parameterization"], meta.get("t_sample", -1.0))
    return student.eval().requires_grad_(False), meta
