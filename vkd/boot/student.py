"""The BOOT student ``g_θ(ε, t, c)``: reads pure noise ε and predicts the signal y_t at time t.

The student is a copy of the teacher network; its output goes through the teacher's own ``to_x0``
*as if ε were x_t*. Parameterisations (``BootStudent.parameterization``):

- ``teacher_to_x0``: ``to_x0`` at the true (α_t, σ_t), so ``g_θ(ε, t, c) = f_φ(ε, t, c)`` at every t at
  step 0. For ε and v teachers the output weight σ_t/α_t (ε) or σ_t (v) spans 0.01…157 across t, and
  BOOT from that parameterisation does not train (tests/boot/test_boot_gaussian.py).
- ``preconditioned``: ``g = c_skip(t)·ε + c_out(t)·F`` with the teacher's ``to_x0`` coefficients taken at
  a clamped half log-SNR ``λ̃_t = clamp(λ_t, λ_min, λ_max)`` (the c_skip/c_out form of consistency models
  and LCM), so the output weight stays within a factor of 3; exact at step 0 wherever λ_t lies in the band.
  The default for ε and v teachers (``auto``).
- ``sample``: the network output is x0 (exact at step 0 only for x0-prediction teachers).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path
from typing import Any, Literal

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel
from torch import nn

from vkd.boot import pipeline_boot
from vkd.boot.conditioning import LatentDecoder, PromptEncoder, SharedModule, TextUNetDenoiser
from vkd.boot.schedule import NoiseSchedule
from vkd.boot.schedule import as_timesteps as _as_timesteps
from vkd.boot.teacher import DiffusionTeacher, UNetDenoiser, _build_scheduler, to_x0
from vkd.errors import UserError

__all__ = ["BootStudent", "PARAMETERIZATIONS", "DEFAULT_LAMBDA_RANGE", "resolve_parameterization",
           "STUDENT_META_FILE", "STUDENT_EXPORT_DIR", "exported_student", "save_student", "load_student"]

STUDENT_META_FILE = "vkd_student.json"
STUDENT_EXPORT_DIR = "pipeline"  # RUN/pipeline; runs exported before BootPipeline have RUN/student
PARAMETERIZATIONS = ("auto", "preconditioned", "teacher_to_x0", "sample")

# λ band of the preconditioned student per teacher prediction type: |c_out| = e^λ̃ ∈ [0.37, 1] for ε and
# σ̃ ∈ [0.52, 1] for v (v stays exact up to T). Chosen on the Gaussian teacher (N = 1000, δ = 20, 400 steps,
# 3 seeds, one-step error to the BOOT fixed point; x0 head 0.081): ε [-1, 0] 0.094, [-0.5, 0.5] 0.102,
# [0, 0] 0.145, [-1, 1] 0.172; v [-0.5, ∞) 0.073, [0, ∞) 0.080, [-1, ∞) 0.080.
DEFAULT_LAMBDA_RANGE: dict[str, tuple[float, float]] = {"epsilon": (-1.0, 0.0), "v_prediction": (-0.5, math.inf)}


def resolve_parameterization(parameterization: str, prediction_type: str) -> str:
    """``auto`` → ``preconditioned`` for ε/v teachers and ``teacher_to_x0`` (the identity) for x0 teachers."""
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {', '.join(PARAMETERIZATIONS)}, got {parameterization!r}")
    if parameterization == "auto":
        return "preconditioned" if prediction_type in DEFAULT_LAMBDA_RANGE else "teacher_to_x0"
    return parameterization


class BootStudent(nn.Module):
    """``g_θ(ε, t, c) = c_skip(t)·ε + c_out(t)·net_θ(ε, t, c)``, the teacher's ``to_x0`` read with x = ε.

    Args:
        net: ``net(x [B,C,H,W], t [B] float, class_labels [B] | None) -> [B, C, H, W]``.
        schedule: the teacher's :class:`NoiseSchedule` (coefficients of ``to_x0``).
        prediction_type: what ``net`` predicts (the teacher's ``prediction_type``).
        parameterization: ``auto`` | ``preconditioned`` | ``teacher_to_x0`` | ``sample`` (module docstring).
        t_sample: timestep used for one-step sampling (-1 with the clean endpoint, else 0).
        lambda_range: ``(λ_min, λ_max)`` of ``preconditioned`` (``None``: :data:`DEFAULT_LAMBDA_RANGE`).
        decoder: latents → images (a latent teacher's VAE decoder), held by reference: never trained nor saved
            in the student's checkpoints; ``None`` in pixel space.
    """

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, prediction_type: str,
                 parameterization: Literal["auto", "preconditioned", "teacher_to_x0", "sample"] = "auto",
                 t_sample: float = -1.0, lambda_range: tuple[float, float] | None = None,
                 decoder: nn.Module | None = None):
        super().__init__()
        self._decoder = None if decoder is None else SharedModule(decoder)
        parameterization = resolve_parameterization(parameterization, prediction_type)
        if prediction_type == "sample" and parameterization == "preconditioned":
            parameterization = "teacher_to_x0"  # an x0 head has nothing to precondition
        self.net = net
        self.schedule = schedule
        self.prediction_type = prediction_type if parameterization != "sample" else "sample"
        self.parameterization = parameterization
        self.t_sample = float(t_sample)
        if parameterization == "preconditioned":
            lo, hi = lambda_range if lambda_range is not None else DEFAULT_LAMBDA_RANGE[prediction_type]
            if not lo <= hi:
                raise ValueError(f"lambda_range needs lambda_min <= lambda_max, got ({lo}, {hi})")
            self.lambda_range: tuple[float, float] | None = (float(lo), float(hi))
        else:
            self.lambda_range = None

    @classmethod
    def from_teacher(cls, teacher: DiffusionTeacher, parameterization: str = "auto", t_sample: float = -1.0,
                     lambda_range: tuple[float, float] | None = None) -> BootStudent:
        """Copy the teacher's network (architecture and weights) into a trainable fp32 student.

        A half-precision teacher gives a float32 copy (master weights for AdamW and the EMA); build the
        student before casting a teacher to half precision, or its weights start rounded.
        """
        # a text teacher's net copies its UNet only: the frozen text encoder is shared, not trained
        net = teacher.net.student_copy() if hasattr(teacher.net, "student_copy") else copy.deepcopy(teacher.net)
        net.requires_grad_(True).train()
        if any(p.dtype in (torch.float16, torch.bfloat16) for p in net.parameters()):
            net.float()  # float64 stays float64 (exact tests); half precision never holds master weights
        return cls(net, teacher.schedule, teacher.prediction_type, parameterization, t_sample, lambda_range,
                   decoder=getattr(teacher, "decoder", None))

    @property
    def decoder(self) -> nn.Module | None:
        return None if self._decoder is None else self._decoder.module

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(α̃_t, σ̃_t)`` float64 ``[B]`` the output conversion uses at float timesteps ``t [B]``.

        ``t < 0`` (clean endpoint) uses index-0 coefficients, never σ = 0 (where ``to_x0`` ignores the net).
        """
        alpha, sigma = self.schedule.alpha_sigma(t.clamp(min=0.0))
        if self.lambda_range is None:
            return alpha, sigma
        lam = (torch.log(sigma) - torch.log(alpha)).clamp(*self.lambda_range)  # λ̃_t, finite
        return torch.sigmoid(-2.0 * lam).sqrt(), torch.sigmoid(2.0 * lam).sqrt()

    def raw(self, eps: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The network output ``[B, C, H, W]`` before ``to_x0``."""
        return self.net(eps, _as_timesteps(t, eps.shape[0], eps.device, torch.float64), class_labels)

    def signal(self, out: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``to_x0(out, x=ε)`` at :meth:`coefficients` ``(α̃_t, σ̃_t)``, in at least float32. ``[B, C, H, W]``."""
        if self.prediction_type == "sample":
            return out
        t = _as_timesteps(t, eps.shape[0], eps.device, torch.float64)
        alpha, sigma = self.coefficients(t)
        return to_x0(out, eps, alpha, sigma, self.prediction_type)

    def forward(self, eps: torch.Tensor, t: torch.Tensor | float, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Signal ``[B, C, H, W]`` predicted from noise ``eps [B, C, H, W]`` at float timesteps ``t [B]``."""
        t = _as_timesteps(t, eps.shape[0], eps.device, torch.float64)
        return self.signal(self.raw(eps, t, class_labels), eps, t)

    @torch.no_grad()
    def generate(self, eps: torch.Tensor, class_labels: torch.Tensor | None = None, clamp: bool = True) -> torch.Tensor:
        """One-step sample ``x0 = g(ε, t_sample, c)`` ``[B, C, H, W]``.

        ``clamp``: images in [-1, 1] (a latent student's latents decoded first); else the raw output (latents).
        """
        x0 = self(eps, self.t_sample, class_labels)
        if not clamp:
            return x0
        if self.decoder is not None:
            x0 = self.decoder(x0)
        return x0.clamp(-1.0, 1.0)


def save_student(student: BootStudent, path: str | Path, scheduler_config: dict[str, Any],
                 meta: dict[str, Any]) -> Path:
    """Write a UNet student as a diffusers pipeline that vkd also reloads.

    Layout: ``unet/`` and ``scheduler/`` (``save_pretrained``), ``model_index.json`` naming
    ``pipeline_boot.BootPipeline`` (copied next to it, so ``DiffusionPipeline.from_pretrained(path)``
    works without vkd), and ``vkd_student.json`` (parameterisation, λ band, teacher, δ).
    """

    if not isinstance(student.net, (UNetDenoiser, TextUNetDenoiser)):
        raise ValueError("save_student needs a UNet student (net is not a UNetDenoiser or TextUNetDenoiser)")
    path = Path(path)
    (path / "unet").mkdir(parents=True, exist_ok=True)
    student.net.unet.save_pretrained(str(path / "unet"))
    text = isinstance(student.net, TextUNetDenoiser)
    if text:  # the frozen text encoder and tokenizer travel with the student: pipe("a prompt") needs them
        prompts = student.net.prompts
        prompts.text_encoder.save_pretrained(str(path / "text_encoder"))
        prompts.tokenizer.save_pretrained(str(path / "tokenizer"))
        meta = {**meta, "text_to_image": True, "negative_prompt": prompts.negative_prompt,
                "max_length": prompts.max_length, "use_attention_mask": prompts.use_attention_mask}
    if student.decoder is not None:
        student.decoder.vae.save_pretrained(str(path / "vae"))
    cfg = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    if "timesteps" in cfg and "num_train_timesteps" not in cfg:
        cfg["num_train_timesteps"] = cfg.pop("timesteps")
    sched_dir = path / "scheduler"
    sched_dir.mkdir(exist_ok=True)
    # the exact config (class name included) is what the student's to_x0 coefficients come from
    (sched_dir / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": scheduler_config.get("_class_name", DDPMScheduler.__name__), **cfg}, indent=2) + "\n")
    info = {"parameterization": student.parameterization, "prediction_type": student.prediction_type,
            "t_sample": student.t_sample, "interp": student.schedule.interp,
            "lambda_range": _json_range(student.lambda_range), **meta}
    (path / STUDENT_META_FILE).write_text(json.dumps(info, indent=2) + "\n")
    _write_pipeline_index(student, path, str(scheduler_config.get("_class_name", DDPMScheduler.__name__)))
    return path


def _write_pipeline_index(student: BootStudent, path: Path, scheduler_class: str) -> None:
    """``model_index.json`` + ``pipeline_boot.py``: the export loads as a :class:`BootPipeline`."""
    t = torch.tensor([student.t_sample], dtype=torch.float64)
    alpha, sigma = student.coefficients(t)
    shutil.copyfile(Path(pipeline_boot.__file__), path / "pipeline_boot.py")
    index: dict[str, Any] = {
        "_class_name": ["pipeline_boot", "BootPipeline"], "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", type(student.net.unet).__name__], "scheduler": ["diffusers", scheduler_class],
        "text_encoder": [None, None], "tokenizer": [None, None], "vae": [None, None],
        "prediction_type": student.prediction_type, "t_sample": student.t_sample,
        "alpha": float(alpha[0]), "sigma": float(sigma[0])}
    if isinstance(student.net, TextUNetDenoiser):
        prompts = student.net.prompts
        index["text_encoder"] = ["transformers", type(prompts.text_encoder).__name__]
        index["tokenizer"] = ["transformers", type(prompts.tokenizer).__name__]
        index["max_length"], index["use_attention_mask"] = prompts.max_length, prompts.use_attention_mask
    if student.decoder is not None:
        index["vae"] = ["diffusers", type(student.decoder.vae).__name__]
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def load_student(path: str | Path, prompts: tuple[str, ...] = ()) -> tuple[BootStudent, dict[str, Any]]:
    """Inverse of :func:`save_student`: ``(student in eval mode, metadata)``.

    Args:
        path: the export (``RUN/pipeline``).
        prompts: a text-to-image student's prompt table (condition ``i`` is ``prompts[i]``).
    """

    path = Path(path)
    meta_path = path / STUDENT_META_FILE
    if not meta_path.is_file():
        raise UserError(f"{path} is not an exported BOOT student (no {STUDENT_META_FILE})")
    meta = json.loads(meta_path.read_text())
    sched_cfg = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    _, acp = _build_scheduler(sched_cfg, str(path))
    text = bool(meta.get("text_to_image", False))
    try:
        unet = (UNet2DConditionModel if text else UNet2DModel).from_pretrained(str(path / "unet"))
        decoder = LatentDecoder(AutoencoderKL.from_pretrained(str(path / "vae"))) if (path / "vae").is_dir() else None
        if text:
            import transformers  # slow to import (seconds), and only text-to-image students need it

            index = json.loads((path / "model_index.json").read_text())
            encoder = getattr(transformers, index["text_encoder"][1]).from_pretrained(str(path / "text_encoder"))
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    except (OSError, ValueError, KeyError, AttributeError) as err:
        raise UserError(f"cannot load the exported student from {path}: {str(err).splitlines()[0]}") from None
    net = TextUNetDenoiser(unet, PromptEncoder(encoder, tokenizer, prompts, meta.get("negative_prompt", ""))) \
        if text else UNetDenoiser(unet)
    student = BootStudent(net, NoiseSchedule(acp, interp=meta.get("interp", "lambda")),
                          meta["prediction_type"], meta["parameterization"], meta.get("t_sample", -1.0),
                          _range_from_json(meta.get("lambda_range")), decoder=decoder)
    return student.eval().requires_grad_(False), meta


def _json_range(r: tuple[float, float] | None) -> list[float | None] | None:
    """``(λ_min, λ_max)`` for JSON: ±∞ as ``null`` (JSON has no infinity)."""
    return None if r is None else [v if math.isfinite(v) else None for v in r]


def _range_from_json(r: list[float | None] | None) -> tuple[float, float] | None:
    if r is None:
        return None
    lo, hi = r
    return (-math.inf if lo is None else float(lo), math.inf if hi is None else float(hi))


def exported_student(run_dir: str | Path) -> Path | None:
    """The exported student of a BOOT run: ``RUN/pipeline`` (or ``RUN/student`` of older runs), else ``None``."""
    for name in (STUDENT_EXPORT_DIR, "student"):
        if (Path(run_dir) / name / STUDENT_META_FILE).is_file():
            return Path(run_dir) / name
    return None
