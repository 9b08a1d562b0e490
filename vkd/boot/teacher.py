"""Teachers for BOOT: a diffusers ``UNet2DModel`` (any VP scheduler), a text-to-image pipeline (Stable Diffusion
or DeepFloyd IF layout; latent or pixel space), or the closed-form Gaussian.

A teacher here is an x0 ("signal") predictor on per-sample float timesteps,
``f̃(x_t, t, c) = clip(to_x0(f_uncond + w·(f_cond − f_uncond), x_t, t))``, where the network output
is an ε, v or x0 prediction and ``to_x0`` is the same algebra as ``DDIMScheduler.step``. Classifier-
free guidance is applied to the raw output: ``to_x0`` is affine in it with weights summing to 1, so
guiding ε, v or x0 gives the same x0.

Loading goes through ``UNet2DModel.from_pretrained`` and the scheduler's own ``from_config`` for
local directories and hub ids alike, so the embedded digits teacher (written with
``save_pretrained``) and ``google/ddpm-cifar10-32`` take exactly the same path. ``TEACHER_KINDS`` is the table of
teacher kinds; ``kind: auto`` picks ``text-to-image`` when the pipeline's ``model_index.json`` has a text encoder.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel
from huggingface_hub import hf_hub_download
from torch import nn

from vkd.boot.conditioning import LatentDecoder, PromptEncoder, TextUNetDenoiser
from vkd.boot.config import BootDataConfig, BootTeacherRef
from vkd.boot.data import clean_captions, read_prompts
from vkd.boot.schedule import NoiseSchedule
from vkd.boot.schedule import as_timesteps as _as_timesteps
from vkd.errors import ConfigError, DataError, UserError, first_line

__all__ = [
    "PREDICTION_TYPES",
    "TEACHER_META_FILE",
    "to_x0",
    "UNetDenoiser",
    "DiffusionTeacher",
    "GaussianTeacher",
    "TeacherSource",
    "load_teacher_source",
    "load_diffusers_teacher",
    "save_teacher",
    "save_text_teacher",
    "scheduler_config_of",
    "TEACHER_KINDS",
    "build_teacher",
    "cast_teacher",
    "dynamic_threshold",
    "load_text_to_image_teacher",
    "resolve_teacher_kind",
]

log = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TEACHER_META_FILE = "vkd_teacher.json"  # vkd metadata next to model_index.json (classes, null class)


def _bcast(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B]`` coefficient → ``[B, 1, ..., 1]`` in ``like``'s dtype and device."""
    return coef.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def to_x0(out: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
          prediction_type: str) -> torch.Tensor:
    """Convert a network output into an x0 prediction (the algebra of ``DDIMScheduler.step``).

    Args:
        out: ``[B, C, H, W]`` network output (ε, v or x0).
        x: ``[B, C, H, W]`` the network input x_t.
        alpha: ``[B]`` α_t.
        sigma: ``[B]`` σ_t.
        prediction_type: ``epsilon`` | ``v_prediction`` | ``sample``.

    Returns:
        ``[B, C, H, W]`` x0 in at least float32: a half-precision ``out`` is upcast first, because the ε
        conversion at large t multiplies rounding by σ_t/α_t (157 at t = 999 on the linear schedule).
    """
    if out.shape != x.shape:
        raise ValueError(f"out {tuple(out.shape)} and x {tuple(x.shape)} must have the same shape")
    dtype = torch.promote_types(torch.promote_types(out.dtype, x.dtype), torch.float32)
    out, x = out.to(dtype), x.to(dtype)
    if prediction_type == "sample":
        return out
    a, s = _bcast(alpha, out), _bcast(sigma, out)
    if prediction_type == "epsilon":
        return (x - s * out) / a
    if prediction_type == "v_prediction":
        return a * x - s * out
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


class UNetDenoiser(nn.Module):
    """A diffusers ``UNet2DModel`` as a plain ``net(x [B,C,H,W], t [B] float, class_labels [B] | None)``.

    Timesteps are passed as a float tensor (fractional and ``-1`` timesteps reach the sinusoidal
    embedding unchanged). Outputs with twice the input channels (a learned variance, as in
    DeepFloyd IF or improved DDPM) are cut to their first half.
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    @property
    def class_conditional(self) -> bool:
        return getattr(self.unet, "class_embedding", None) is not None

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        t = _as_timesteps(t, x.shape[0], x.device)
        if not self.class_conditional:
            class_labels = None
        elif class_labels is None:
            raise ValueError("class_labels [B] are required: the UNet is class-conditional")
        dtype = self.unet.dtype  # a half-precision teacher still reads/returns the caller's dtype
        out = self.unet(x.to(dtype), t, class_labels=class_labels).sample
        if out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]
        return out.to(x.dtype)


class DiffusionTeacher(nn.Module):
    """x0 predictor ``f̃(x_t, t, c)`` of a VP diffusion model with CFG and optional clipping folded in.

    Args:
        net: ``net(x, t, class_labels) -> [B, C, H, W]`` raw prediction (ε, v or x0).
        schedule: the teacher's :class:`NoiseSchedule`.
        prediction_type: ``epsilon`` | ``v_prediction`` | ``sample``.
        clip_x0: clip the (guided) x0 to ``[-clip_range, clip_range]``.
        clip_range: clipping bound.
        guidance_scale: CFG scale w (1 = no guidance, one forward).
        num_classes: number of real classes (``None``: unconditional).
        null_class: class index used as ∅ for guidance (``None``: guidance unavailable).
        sample_shape: ``(C, H, W)`` of what the network denoises (images, or latents with a ``decoder``).
        decoder: latents → images in [-1, 1] (a :class:`~vkd.boot.conditioning.LatentDecoder`); ``None``: pixels.
        threshold: ``(ratio, max_value)`` of dynamic thresholding (Imagen/IF; diffusers' ``thresholding=True``),
            applied to the guided x0 instead of ``clip_x0``.
    """

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, prediction_type: str, clip_x0: bool = False,
                 clip_range: float = 1.0, guidance_scale: float = 1.0, num_classes: int | None = None,
                 null_class: int | None = None, sample_shape: tuple[int, int, int] = (1, 16, 16),
                 decoder: nn.Module | None = None, threshold: tuple[float, float] | None = None):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise UserError(f"unknown teacher prediction_type '{prediction_type}'; supported: "
                            + ", ".join(PREDICTION_TYPES))
        if schedule.zero_terminal_snr and prediction_type == "epsilon":
            raise UserError("teacher has a zero-terminal-SNR schedule (alpha_T = 0): x0 from an epsilon "
                            "prediction is undefined at T; use a v_prediction or sample teacher")
        if guidance_scale != 1.0 and (num_classes is None or null_class is None):
            raise UserError(f"guidance_scale={guidance_scale} needs a class-conditional teacher with a null "
                            "class (set teacher.null_class)")
        self.net = net
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.clip_x0 = bool(clip_x0)
        self.clip_range = float(clip_range)
        self.guidance_scale = float(guidance_scale)
        self.num_classes = num_classes
        self.null_class = null_class
        self.sample_shape = tuple(int(v) for v in sample_shape)
        self.decoder = decoder
        self.threshold = None if threshold is None else (float(threshold[0]), float(threshold[1]))

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

    @property
    def latent(self) -> bool:
        return self.decoder is not None

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """What the network denoises → images ``[B, C', H', W']`` in about [-1, 1] (identity in pixel space)."""
        return x if self.decoder is None else self.decoder(x)

    def to_x0(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``to_x0`` at float timesteps ``t [B]``; ``t < 0`` uses the coefficients of index 0 (never σ = 0)."""
        alpha, sigma = self.schedule.alpha_sigma(t.clamp(min=0.0))
        return to_x0(out, x, alpha, sigma, self.prediction_type)

    def raw(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Guided raw output ``out_∅ + w·(out_c − out_∅)`` ``[B, C, H, W]`` (one batched forward under CFG).

        The teacher runs in its own dtype (``teacher.dtype``), never under the caller's autocast: a
        training run's ``mixed_precision`` is the student's, and the frozen teacher stays separate.
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            if self.guidance_scale == 1.0 or class_labels is None:
                return self.net(x, t, class_labels)
            null = torch.full_like(class_labels, int(self.null_class))
            both = self.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([class_labels, null]))
            cond, uncond = both.chunk(2)
            return uncond + self.guidance_scale * (cond - uncond)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """x0 prediction ``[B, C, H, W]`` from ``x [B, C, H, W]`` at float timesteps ``t [B]``."""
        t = _as_timesteps(t, x.shape[0], x.device, torch.float64)  # float64 for the coefficients
        x0 = self.to_x0(self.raw(x, t, class_labels), x, t)
        if self.threshold is not None:
            x0 = dynamic_threshold(x0, *self.threshold)
        elif self.clip_x0:
            x0 = x0.clamp(-self.clip_range, self.clip_range)
        return x0


def dynamic_threshold(x0: torch.Tensor, ratio: float = 0.995, max_value: float = 1.0) -> torch.Tensor:
    """Dynamic thresholding (Imagen; ``DDPMScheduler._threshold_sample``): per sample, s = the ``ratio`` quantile of
    |x0| clamped to ``[1, max_value]``, then ``clamp(x0, −s, s) / s``. ``[B, ...]``."""
    flat = x0.flatten(1)
    s = torch.quantile(flat.abs().float(), ratio, dim=1).clamp(1.0, max_value).to(x0.dtype)  # [B]
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


class _GaussianNet(nn.Module):
    """Exact predictor of data ~ N(μ, c²I): x0 = ``μ + α_t c²/(α_t²c² + σ_t²)·(x_t − α_t μ)``, returned as
    x0, ε = (x_t − α_t x0)/σ_t or v = α_t ε − σ_t x0."""

    def __init__(self, schedule: NoiseSchedule, mu: float, c: float, prediction_type: str = "sample"):
        super().__init__()
        self.schedule, self.mu, self.c = schedule, float(mu), float(c)
        self.prediction_type = prediction_type

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        a, s = self.schedule.alpha_sigma(t)
        gain = a * self.c ** 2 / (a ** 2 * self.c ** 2 + s ** 2)
        x0 = self.mu + _bcast(gain, x) * (x - _bcast(a, x) * self.mu)
        if self.prediction_type == "sample":
            return x0
        eps = (x - _bcast(a, x) * x0) / _bcast(s, x)
        return eps if self.prediction_type == "epsilon" else _bcast(a, x) * eps - _bcast(s, x) * x0


class GaussianTeacher(DiffusionTeacher):
    """Closed-form teacher for data ~ N(μ, c²I): parameter-free, no clipping.

    Args:
        schedule: the VP schedule.
        mu: data mean μ.
        c: data standard deviation c.
        sample_shape: ``(C, H, W)`` (any shape works, pixels are independent).
        prediction_type: what its network returns (``sample``, ``epsilon`` or ``v_prediction``); the x0
            predictor is the same exact posterior mean for all three, up to float64 rounding.
    """

    def __init__(self, schedule: NoiseSchedule, mu: float = 0.3, c: float = 0.5,
                 sample_shape: tuple[int, int, int] = (1, 4, 4), prediction_type: str = "sample"):
        super().__init__(_GaussianNet(schedule, mu, c, prediction_type), schedule, prediction_type,
                         sample_shape=sample_shape)
        self.mu, self.c = float(mu), float(c)

    def _z(self, eps: torch.Tensor) -> torch.Tensor:
        T = torch.full((eps.shape[0],), float(self.schedule.T), dtype=torch.float64)
        a_T, s_T = self.schedule.alpha_sigma(T)
        sT = torch.sqrt(a_T ** 2 * self.c ** 2 + s_T ** 2)
        return (eps - _bcast(a_T, eps) * self.mu) / _bcast(sT, eps)

    def exact_map(self, eps: torch.Tensor) -> torch.Tensor:
        """The exact PF-ODE map ε = x_T ↦ x0*: ``μ + c·(ε − α_T μ)/√(α_T²c² + σ_T²)``. ``[B, ...]``."""
        return self.mu + self.c * self._z(eps)

    def exact_signal(self, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The exact signal ``y_t*(ε) = (α_t μ + s_t z − σ_t ε)/α_t`` on the PF-ODE path from ε. ``[B, ...]``."""
        a, s = self.schedule.alpha_sigma(t)
        st = torch.sqrt(a ** 2 * self.c ** 2 + s ** 2)
        z = self._z(eps)
        return (_bcast(a, eps) * self.mu + _bcast(st, eps) * z - _bcast(s, eps) * eps) / _bcast(a, eps)


# ----------------------------------------------------------------------------------------------
# diffusers loading
# ----------------------------------------------------------------------------------------------


@dataclass
class TeacherSource:
    """What :func:`load_teacher_source` read: the UNet, the scheduler and their configs."""

    unet: nn.Module
    scheduler: Any
    scheduler_config: dict[str, Any]
    prediction_type: str
    alphas_cumprod: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""


def _is_local(source: str) -> bool:
    return Path(source).expanduser().exists() or source.startswith((".", "/", "~")) or source.count("/") > 1


def _load_unet(source: str, local: bool) -> nn.Module:
    if local:
        root = Path(source).expanduser()
        if not root.is_dir():
            raise UserError(f"teacher directory not found: {source}")
        for sub in ("unet", ""):
            cfg_path = root / sub / "config.json" if sub else root / "config.json"
            if cfg_path.is_file():
                break
        else:
            raise UserError(f"{source} is not a diffusers UNet2DModel directory (no unet/config.json or config.json)")
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read {cfg_path}: {first_line(err)}") from None
        cls_name = cfg.get("_class_name", "UNet2DModel")
        if cls_name not in ("UNet2DModel", "UNetModel"):
            raise UserError(f"{cfg_path}: only UNet2DModel teachers are supported, got {cls_name}")
        try:
            return UNet2DModel.from_pretrained(str(root), subfolder=sub or None)
        except (OSError, ValueError, RuntimeError, KeyError) as err:
            raise UserError(f"cannot load the UNet from {cfg_path.parent}: {first_line(err)}") from None
    last: BaseException | None = None
    for sub in ("unet", None):
        try:
            return UNet2DModel.from_pretrained(source, subfolder=sub)
        except (OSError, ValueError) as err:  # hub: not found, offline and not cached, ...
            last = err
    raise UserError(f"cannot load teacher '{source}': not a local directory, and the hub/cache lookup failed "
                    f"({first_line(last)}); with HF_HUB_OFFLINE=1 it must already be in the HF cache")


def _load_scheduler_config(source: str, local: bool) -> dict[str, Any]:
    if local:
        root = Path(source).expanduser()
        if not root.is_dir():
            raise UserError(f"teacher directory not found: {source}")
        for cand in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json"):
            if cand.is_file():
                try:
                    data = json.loads(cand.read_text())
                except (OSError, ValueError) as err:
                    raise UserError(f"cannot read {cand}: {first_line(err)}") from None
                if not isinstance(data, dict):
                    raise UserError(f"{cand}: expected a JSON object")
                return data
        raise UserError(f"{source} has no scheduler config (scheduler/scheduler_config.json or scheduler_config.json)")
    last: BaseException | None = None
    for sub in ("scheduler", None):
        try:
            return dict(DDPMScheduler.load_config(source, subfolder=sub))
        except (OSError, ValueError) as err:
            last = err
    raise UserError(f"cannot load the scheduler config of '{source}' ({first_line(last)})")


def _build_scheduler(config: dict[str, Any], where: str) -> tuple[Any, torch.Tensor]:
    """Instantiate the scheduler class named in ``config``; refuse schedulers without ``alphas_cumprod``."""
    config = dict(config)
    if "timesteps" in config and "num_train_timesteps" not in config:  # legacy GaussianDDPMScheduler key
        config["num_train_timesteps"] = config.pop("timesteps")
    name = config.get("_class_name", "DDPMScheduler")
    cls = getattr(diffusers, name, None)
    if cls is None and name == "GaussianDDPMScheduler":  # google/ddpm-* legacy configs
        cls = diffusers.DDPMScheduler
    if cls is None or not hasattr(cls, "from_config"):
        raise UserError(f"{where}: unknown scheduler class '{name}'")
    try:
        scheduler = cls.from_config(config)
    except (ValueError, TypeError, NotImplementedError) as err:
        raise UserError(f"{where}: cannot build {name}: {first_line(err)}") from None
    acp = getattr(scheduler, "alphas_cumprod", None)
    kind = "flow-matching" if "FlowMatch" in name else "variance-exploding" if "Ve" in name else None
    if kind is not None and not isinstance(acp, torch.Tensor):
        raise UserError(f"{where}: {name} is a {kind} scheduler; not supported yet (vkd's BOOT distils "
                        "variance-preserving DDPM/DDIM-type teachers)")
    if not isinstance(acp, torch.Tensor):
        raise UserError(f"{where}: scheduler {name} has no alphas_cumprod; BOOT needs a variance-preserving "
                        "(DDPM/DDIM-type) teacher")
    acp = acp.detach().to(torch.float64)
    if acp.ndim != 1 or acp.numel() < 2 or not torch.isfinite(acp).all() or (acp > 1).any() or (acp < 0).any() \
            or (acp[1:] > acp[:-1]).any():
        raise UserError(f"{where}: scheduler {name} alphas_cumprod is not a decreasing table in [0, 1] "
                        "(not a variance-preserving schedule)")
    return scheduler, acp


def load_teacher_source(source: str) -> TeacherSource:
    """Read a diffusers UNet2DModel + scheduler from a local directory or a hub id.

    Accepts the ``DDPMPipeline.save_pretrained`` layout (``unet/``, ``scheduler/``) and the legacy
    flat layout (``config.json`` + ``scheduler_config.json`` at the root, e.g. google/ddpm-cifar10-32).

    Raises:
        UserError: missing/malformed directory, non-UNet2DModel, scheduler without ``alphas_cumprod``,
            non-VP schedule, unknown prediction type, time embedding that expects VE sigmas.
    """
    source = str(source)
    local = _is_local(source)
    sched_cfg = _load_scheduler_config(source, local)
    scheduler, acp = _build_scheduler(sched_cfg, source)
    prediction_type = sched_cfg.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise UserError(f"{source}: unknown prediction_type '{prediction_type}'; supported: "
                        + ", ".join(PREDICTION_TYPES))
    unet = _load_unet(source, local)
    if getattr(unet.config, "time_embedding_type", "positional") == "fourier":
        raise UserError(f"{source}: Fourier time embedding expects VE noise levels (score-SDE VE); "
                        "BOOT needs a variance-preserving teacher")
    meta: dict[str, Any] = {}
    if local:
        meta_path = Path(source).expanduser() / TEACHER_META_FILE
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError) as err:
                raise UserError(f"cannot read {meta_path}: {first_line(err)}") from None
    return TeacherSource(unet=unet, scheduler=scheduler, scheduler_config=dict(sched_cfg),
                         prediction_type=prediction_type, alphas_cumprod=acp, meta=meta, source=source)


def _class_info(unet: nn.Module, meta: dict[str, Any], null_class: int | None) -> tuple[int | None, int | None]:
    """(num_classes, null_class) from the vkd metadata, else from ``num_class_embeds``."""
    if getattr(unet, "class_embedding", None) is None:
        return None, None
    n_embeds = getattr(unet.config, "num_class_embeds", None)
    num_classes = meta.get("num_classes", n_embeds)
    if null_class is None:
        null_class = meta.get("null_class")
    if num_classes is None:
        raise UserError("class-conditional teacher without num_class_embeds: set the number of classes in "
                        f"{TEACHER_META_FILE}")
    return int(num_classes), (None if null_class is None else int(null_class))


def load_diffusers_teacher(source: str | TeacherSource, guidance_scale: float = 1.0,
                           clip_x0: Literal["scheduler"] | bool = "scheduler", interp: str = "lambda",
                           null_class: int | None = None) -> DiffusionTeacher:
    """Build a frozen :class:`DiffusionTeacher` from a diffusers directory or hub id.

    Args:
        source: path / hub id, or an already loaded :class:`TeacherSource`.
        guidance_scale: CFG scale w folded into the teacher (needs a null class).
        clip_x0: ``"scheduler"`` follows the scheduler's ``clip_sample`` / ``clip_sample_range``.
        interp: fractional-timestep interpolation of the schedule (``lambda`` | ``index``).
        null_class: class index used as ∅ (default: from ``vkd_teacher.json``).
    """
    src = source if isinstance(source, TeacherSource) else load_teacher_source(source)
    cfg = src.scheduler_config
    if clip_x0 == "scheduler":
        clip = bool(cfg.get("clip_sample", True))
    else:
        clip = bool(clip_x0)
    clip_range = float(cfg.get("clip_sample_range", 1.0))
    num_classes, null = _class_info(src.unet, src.meta, null_class)
    unet_cfg = src.unet.config
    size = unet_cfg.sample_size
    size = tuple(size) if isinstance(size, (list, tuple)) else (int(size), int(size))
    teacher = DiffusionTeacher(UNetDenoiser(src.unet), NoiseSchedule(src.alphas_cumprod, interp=interp),
                               src.prediction_type, clip_x0=clip, clip_range=clip_range,
                               guidance_scale=guidance_scale, num_classes=num_classes, null_class=null,
                               sample_shape=(int(unet_cfg.in_channels), *size))
    teacher.eval().requires_grad_(False)
    teacher.source = src.source  # type: ignore[attr-defined]
    return teacher


def save_teacher(unet: nn.Module, scheduler: Any, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write a UNet + scheduler in the ``DDPMPipeline.save_pretrained`` layout, plus ``vkd_teacher.json``
    (``DDPMPipeline.from_pretrained(path)`` loads it too).

    The result loads with :func:`load_diffusers_teacher` exactly like a hub checkpoint.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(str(path / "unet"))
    scheduler.save_pretrained(str(path / "scheduler"))
    # the model_index.json DDPMPipeline.save_pretrained writes (importing the pipeline costs seconds)
    index = {"_class_name": "DDPMPipeline", "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", type(scheduler).__name__], "unet": ["diffusers", type(unet).__name__]}
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    if meta:
        (path / TEACHER_META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def save_text_teacher(unet: nn.Module, text_encoder: nn.Module, tokenizer: Any, scheduler: Any, path: str | Path,
                      meta: dict[str, Any] | None = None) -> Path:
    """Write a pixel-space text-to-image teacher in the ``StableDiffusionPipeline.save_pretrained`` layout
    (``vae``, ``safety_checker``, ``feature_extractor``, ``image_encoder`` null), plus ``vkd_teacher.json``;
    :func:`load_text_to_image_teacher` reads it as it reads a hub pipeline.

    Every component is written with its own ``save_pretrained``. Not through the pipeline's constructor: that
    rewrites the scheduler's config (``clip_sample`` → false, ``steps_offset`` → 1), which would change the
    teacher's sampler.

    Args:
        unet: a ``UNet2DConditionModel``.
        text_encoder: a transformers text encoder (``CLIPTextModel``).
        tokenizer: its tokenizer.
        scheduler: a diffusers scheduler.
        path: the pipeline directory (written to a temporary sibling, then renamed).
        meta: vkd metadata (``dataset``, ...).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    components = {"unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}
    for name, component in components.items():
        component.save_pretrained(str(tmp / name))
    index: dict[str, Any] = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
                             "requires_safety_checker": False}
    for name in ("feature_extractor", "image_encoder", "safety_checker", "vae"):
        index[name] = [None, None]
    for name, component in components.items():
        library = "diffusers" if type(component).__module__.startswith("diffusers") else "transformers"
        index[name] = [library, type(component).__name__]
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if meta:
        (tmp / TEACHER_META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def schedule_summary(schedule: NoiseSchedule) -> dict[str, float]:
    """α_T, λ_0, λ_T of a schedule (for logs and reports)."""
    t = torch.tensor([0.0, float(schedule.T)], dtype=torch.float64)
    a, _ = schedule.alpha_sigma(t)
    lam = schedule.lam(t)
    return {"alpha_T": float(a[1]), "lambda_0": float(lam[0]),
            "lambda_T": float(lam[1]) if math.isfinite(float(lam[1])) else float("inf")}


def scheduler_config_of(source: str) -> dict[str, Any]:
    """The scheduler config of a teacher directory or hub id (as the exported student records it)."""
    return _load_scheduler_config(source, _is_local(source))


def _diffusers_teacher(ref: BootTeacherRef) -> DiffusionTeacher:
    clip: bool | str = "scheduler" if ref.clip_x0 == "scheduler" else (ref.clip_x0 == "true")
    return load_diffusers_teacher(ref.path, guidance_scale=ref.guidance_scale, clip_x0=clip, interp=ref.interp,
                                  null_class=ref.null_class)


def cast_teacher(teacher: DiffusionTeacher, ref: BootTeacherRef) -> DiffusionTeacher:
    """Cast the frozen teacher's network to ``teacher.dtype`` (after the fp32 student was copied from it)."""
    if ref.dtype != "float32":
        teacher.net.to(getattr(torch, ref.dtype))
    return teacher


# ----------------------------------------------------------------------------------------------
# text-to-image pipelines (StableDiffusionPipeline / IFPipeline layouts)
# ----------------------------------------------------------------------------------------------

TEXT_PIPELINE_COMPONENTS = ("unet", "text_encoder", "tokenizer", "scheduler")  # + optional vae


def read_model_index(source: str) -> dict[str, Any] | None:
    """``model_index.json`` of a pipeline directory or hub id (``None`` when there is none)."""
    if _is_local(source):
        path = Path(source).expanduser() / "model_index.json"
        if not path.is_file():
            return None
        text = path.read_text()
    else:
        try:
            text = Path(hf_hub_download(source, "model_index.json")).read_text()
        except Exception:  # noqa: BLE001 - not on the hub / offline and not cached: not a pipeline we can read
            return None
    try:
        index = json.loads(text)
    except ValueError as err:
        raise UserError(f"{source}/model_index.json is not valid JSON: {first_line(err)}") from None
    if not isinstance(index, dict):
        raise UserError(f"{source}/model_index.json: expected a JSON object")
    return index


def _component(index: dict[str, Any], name: str) -> tuple[str, str] | None:
    """``(library, class)`` of a pipeline component, ``None`` when absent or ``[null, null]``."""
    entry = index.get(name)
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[1] is None:
        return None
    return str(entry[0]), str(entry[1])


def _load_component(source: str, name: str, cls: Any) -> Any:
    if _is_local(source) and not (Path(source).expanduser() / name).is_dir():
        raise UserError(f"{source}: model_index.json lists {name}, but the pipeline has no {name}/ directory")
    try:
        return cls.from_pretrained(source, subfolder=name)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        raise UserError(f"cannot load {name}/ of {source}: {first_line(err)}") from None


def _text_width(text_encoder: nn.Module) -> int:
    cfg = text_encoder.config
    return int(getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", 0))


def load_text_to_image_teacher(source: str, prompts: Sequence[str], negative_prompt: str = "",
                               guidance_scale: float = 1.0, clip_x0: Literal["scheduler"] | bool = "scheduler",
                               interp: str = "lambda", prompt_cache_mb: float = 256.0,
                               clean_captions: bool = False) -> DiffusionTeacher:
    """A frozen text-to-image :class:`DiffusionTeacher` from a diffusers pipeline (directory or hub id).

    Reads the ``StableDiffusionPipeline`` layout (``model_index.json``, ``unet/`` = ``UNet2DConditionModel``,
    ``text_encoder/`` + ``tokenizer/`` from transformers, ``scheduler/``, optional ``vae/``): **latent** when a VAE is
    present (the student generates latents; the VAE decodes them for samples and evaluation), pixel-space otherwise
    (the DeepFloyd IF stage-I layout: T5 encoder, ``learned_range`` outputs cut to their first channels, dynamic
    thresholding when the scheduler sets ``thresholding``). The condition is an index into ``prompts`` (index
    ``len(prompts)`` is ``negative_prompt``, the ∅ of guidance). ``clean_captions`` records that the prompts were
    cleaned as IF's pipeline does (:func:`vkd.boot.data.clean_captions`), so the exported student cleans its
    prompts the same way.

    Raises:
        UserError: a missing component or directory, a UNet that is not ``UNet2DConditionModel``, SDXL-style added
            conditions, a tokenizer/text-encoder or text-encoder/UNet mismatch, VAE/UNet channel mismatch, no prompts.
    """
    import transformers  # slow to import (seconds), and only text-to-image teachers need it

    source = str(source)
    index = read_model_index(source)
    if index is None:
        raise UserError(f"{source} is not a diffusers pipeline (no model_index.json)")
    missing = [name for name in TEXT_PIPELINE_COMPONENTS if _component(index, name) is None]
    if missing:
        raise UserError(f"{source}: the pipeline has no {', '.join(missing)} (model_index.json); a text-to-image "
                        "teacher needs unet, text_encoder, tokenizer and scheduler (vae optional)")
    if _component(index, "text_encoder_2") is not None:
        raise UserError(f"{source}: SDXL-style pipelines (two text encoders, added time ids) are not supported yet")
    if not prompts:
        raise UserError("a text-to-image teacher needs prompts: --set data.prompts=PROMPTS.txt")
    unet_cls = _component(index, "unet")[1]
    if unet_cls != "UNet2DConditionModel":
        raise UserError(f"{source}: the text-to-image teacher's unet must be a UNet2DConditionModel, got {unet_cls}")
    sched_cfg = _load_scheduler_config(source, _is_local(source))
    scheduler, acp = _build_scheduler(sched_cfg, source)
    prediction_type = sched_cfg.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise UserError(f"{source}: unknown prediction_type '{prediction_type}'; supported: " + ", ".join(PREDICTION_TYPES))
    unet = _load_component(source, "unet", UNet2DConditionModel)
    added = getattr(unet.config, "addition_embed_type", None)
    if added not in (None, "text"):  # "text": IF's pooled text embedding, computed inside the UNet from the states
        raise UserError(f"{source}: UNets with added conditions (addition_embed_type={added}, e.g. SDXL's "
                        "text_time) are not supported yet")
    enc_name = _component(index, "text_encoder")[1]
    enc_cls = getattr(transformers, enc_name, None)
    if enc_cls is None or not hasattr(enc_cls, "from_pretrained"):
        raise UserError(f"{source}: unknown text encoder class {enc_name} (not in transformers)")
    text_encoder = _load_component(source, "text_encoder", enc_cls)
    tokenizer = _load_component(source, "tokenizer", transformers.AutoTokenizer)
    vocab = int(getattr(text_encoder.config, "vocab_size", 0) or 0)
    if vocab and len(tokenizer) > vocab:
        raise UserError(f"{source}: the tokenizer has {len(tokenizer)} tokens but the text encoder's vocabulary has "
                        f"{vocab} (a tokenizer/text-encoder mismatch)")
    want = getattr(unet.config, "encoder_hid_dim", None) or unet.config.cross_attention_dim
    if isinstance(want, (list, tuple)):
        want = want[0]
    if _text_width(text_encoder) != int(want):
        raise UserError(f"{source}: the text encoder's width is {_text_width(text_encoder)} but the UNet expects "
                        f"{int(want)} (text_encoder/ and unet/ do not belong together)")
    decoder = None
    if _component(index, "vae") is not None:
        vae_cls = _component(index, "vae")[1]
        if vae_cls != "AutoencoderKL":
            raise UserError(f"{source}: only AutoencoderKL VAEs are supported, got {vae_cls}")
        decoder = LatentDecoder(_load_component(source, "vae", AutoencoderKL))
        if decoder.latent_channels != int(unet.config.in_channels):
            raise UserError(f"{source}: the VAE has {decoder.latent_channels} latent channels but the UNet reads "
                            f"{unet.config.in_channels}")
    prompt_encoder = PromptEncoder(text_encoder, tokenizer, prompts, negative_prompt, prompt_cache_mb,
                                   clean_captions=clean_captions)
    clip = bool(sched_cfg.get("clip_sample", True)) if clip_x0 == "scheduler" else bool(clip_x0)
    threshold = None
    if sched_cfg.get("thresholding", False):
        threshold = (float(sched_cfg.get("dynamic_thresholding_ratio", 0.995)),
                     float(sched_cfg.get("sample_max_value", 1.0)))
    size = unet.config.sample_size
    size = tuple(size) if isinstance(size, (list, tuple)) else (int(size), int(size))
    teacher = DiffusionTeacher(TextUNetDenoiser(unet, prompt_encoder), NoiseSchedule(acp, interp=interp),
                               prediction_type, clip_x0=clip, clip_range=float(sched_cfg.get("clip_sample_range", 1.0)),
                               guidance_scale=guidance_scale, num_classes=len(prompts),
                               null_class=prompt_encoder.null_index, sample_shape=(int(unet.config.in_channels), *size),
                               decoder=decoder, threshold=threshold)
    teacher.eval().requires_grad_(False)
    teacher.source = source  # type: ignore[attr-defined]
    return teacher


def _text_to_image_teacher(ref: BootTeacherRef, data: BootDataConfig) -> DiffusionTeacher:
    if not data.prompts:
        raise UserError(f"{ref.path} is a text-to-image teacher: it needs prompts (--set data.prompts=PROMPTS.txt, one "
                        "prompt per line or a JSON/CSV column)")
    prompts = read_prompts(data.prompts, data.prompt_column)
    clip: bool | str = "scheduler" if ref.clip_x0 == "scheduler" else (ref.clip_x0 == "true")
    texts, negative, changed, emptied = list(prompts.prompts), ref.negative_prompt, 0, 0
    clean = ref.clean_captions == "true" or (ref.clean_captions == "auto" and is_if_pipeline(read_model_index(ref.path)))
    if clean:
        cleaned = clean_captions(texts)
        changed = sum(a != b for a, b in zip(texts, cleaned, strict=True))
        emptied = sum(not c for c in cleaned)
        texts = [c for c in cleaned if c]
        if not texts:
            raise DataError(f"{data.prompts}: every prompt is empty after IF's caption cleaning "
                            "(teacher.clean_captions=false keeps them as they are)")
        negative = clean_captions([negative])[0] if negative else negative
    teacher = load_text_to_image_teacher(ref.path, texts, negative, ref.guidance_scale, clip,
                                         ref.interp, ref.prompt_cache_mb, clean_captions=clean)
    enc = teacher.net.prompts
    log.info("prompts: %d from %s (%d empty lines skipped, %d longer than %d tokens truncated)", len(texts),
             data.prompts, prompts.skipped_empty, enc.truncated, enc.max_length)
    if clean:
        log.info("IF caption cleaning (teacher.clean_captions=%s): %d prompts changed, %d emptied and skipped",
                 ref.clean_captions, changed, emptied)
    teacher.prompt_info = {"num_prompts": len(texts), "skipped_empty": prompts.skipped_empty,  # type: ignore[attr-defined]
                           "truncated": enc.truncated, "max_tokens": enc.max_length, "clean_captions": clean,
                           "changed_by_cleaning": changed, "emptied_by_cleaning": emptied}
    return teacher


def is_if_pipeline(index: dict[str, Any] | None) -> bool:
    """A DeepFloyd-IF-style pipeline: ``IFPipeline`` in ``model_index.json``, or a T5 text encoder without a VAE."""
    if not index:
        return False
    name = index.get("_class_name")
    name = name[-1] if isinstance(name, (list, tuple)) else name
    if str(name).startswith("IF"):
        return True
    enc = _component(index, "text_encoder")
    return enc is not None and enc[1].startswith("T5") and _component(index, "vae") is None


def _unet2d_teacher(ref: BootTeacherRef, data: BootDataConfig) -> DiffusionTeacher:
    if data.prompts:
        raise ConfigError(f"data.prompts is set, but {ref.path} is not a text-to-image pipeline (no text_encoder); "
                          "prompts apply to text-to-image teachers only")
    return _diffusers_teacher(ref)


def resolve_teacher_kind(ref: BootTeacherRef) -> str:
    """``auto`` → ``text-to-image`` when the pipeline's ``model_index.json`` has a text encoder, else ``unet2d``."""
    if ref.kind != "auto":
        return ref.kind
    index = read_model_index(ref.path)
    return "text-to-image" if index is not None and _component(index, "text_encoder") is not None else "unet2d"


# teacher.kind -> builder of the frozen teacher; a new kind of teacher is one entry here.
TEACHER_KINDS: dict[str, Callable[[BootTeacherRef, BootDataConfig], DiffusionTeacher]] = {
    "unet2d": _unet2d_teacher,  # UNet2DModel + scheduler (unconditional or class-conditional; DDPMPipeline layout)
    "diffusers": _unet2d_teacher,  # the name of unet2d in runs written before text-to-image teachers
    "text-to-image": _text_to_image_teacher,  # UNet2DConditionModel + text encoder (SD / IF layouts), prompts
}


def build_teacher(ref: BootTeacherRef, data: BootDataConfig | None = None, cast: bool = True) -> DiffusionTeacher:
    """The frozen teacher named by a config's ``teacher`` section (and its prompts, for text-to-image teachers).

    Args:
        ref: the ``teacher`` section (``kind: auto`` reads the pipeline's ``model_index.json``).
        data: the ``data`` section (``data.prompts`` for text-to-image teachers).
        cast: cast to ``ref.dtype`` (:func:`cast_teacher`); ``False`` keeps the loaded float32 weights,
            to copy a student from before casting.

    Examples:
        >>> teacher = build_teacher(BootTeacherRef(path="google/ddpm-cifar10-32"))  # doctest: +SKIP
        >>> teacher.sample_shape  # doctest: +SKIP
        (3, 32, 32)
    """
    kind = resolve_teacher_kind(ref)
    if kind not in TEACHER_KINDS:
        raise ConfigError(f"teacher.kind must be auto or one of {', '.join(TEACHER_KINDS)}, got '{ref.kind}'")
    teacher = TEACHER_KINDS[kind](ref, data if data is not None else BootDataConfig())
    return cast_teacher(teacher, ref) if cast else teacher
