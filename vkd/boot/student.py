"""The BOOT student ``g_θ(ε, t, c)``: reads pure noise ε and predicts the signal y_t at time t.

The student is a copy of the teacher network; its output goes through the teacher's own ``to_x0``
*as if ε were x_t*. Parameterisations (``BootStudent.parameterization``):

- ``teacher_to_x0``: ``to_x0`` at the true (α_t, σ_t), so ``g_θ(ε, t, c) = f_φ(ε, t, c)`` at every t at
  step 0. For ε and v teachers the output weight σ_t/α_t (ε) or σ_t (v) spans 0.01…157 across t, and
  BOOT from that parameterisation does not train (tests/boot/test_boot_gaussian.py).
- ``preconditioned``: ``g = c_skip(t)·ε + c_out(t)·F`` with the teacher's ``to_x0`` coefficients taken at
  a clamped half log-SNR ``λ̃_t = clamp(λ_t, λ_min, λ_max)`` (the c_skip/c_out form of consistency models
  and LCM), so the output weight stays within a factor of 3; exact at step 0 wherever λ_t lies in the band.
- ``sample``: the network output is x0 (exact at step 0 only for x0-prediction teachers). The default for ε
  and v teachers (``auto``): on the digits benchmark it beat ``preconditioned`` (README, BOOT benchmark),
  because the preconditioned net has to pass ε through itself (``F ≈ (c_skip·ε − y)/c_out``) at every t,
  and the UNet does that only approximately, while an x0 head outputs the signal alone.

LoRA students (:func:`add_lora`, peft): rank-r adapters on the UNet copy's attention, feed-forward and
ResNet layers (:data:`LORA_TARGETS`, the LCM-LoRA set); the copied weights stay frozen, so only the
adapters train, go into checkpoints and the EMA, and are exported (:func:`save_lora`: ``RUN/lora`` in
peft's adapter layout, loadable with ``peft.PeftModel.from_pretrained(teacher_unet, RUN/lora)``).
The adapters' B factors start at zero, so a LoRA student equals the full student at step 0.
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
from safetensors.torch import load_file, save_file
from torch import nn

from vkd.boot import pipeline_boot
from vkd.boot.conditioning import LatentDecoder, PromptEncoder, SharedModule, TextUNetDenoiser
from vkd.boot.config import BootConfig
from vkd.boot.schedule import NoiseSchedule
from vkd.boot.schedule import as_timesteps as _as_timesteps
from vkd.boot.teacher import DiffusionTeacher, UNetDenoiser, _build_scheduler, to_x0
from vkd.errors import UserError

__all__ = ["BootStudent", "PARAMETERIZATIONS", "DEFAULT_LAMBDA_RANGE", "resolve_parameterization",
           "STUDENT_META_FILE", "STUDENT_EXPORT_DIR", "exported_student", "save_student", "load_student",
           "LORA_TARGETS", "LORA_EXPORT_DIR", "lora_target_names", "add_lora", "has_lora", "lora_state_dict",
           "save_lora", "load_lora", "merged_student", "student_from_config"]

STUDENT_META_FILE = "vkd_student.json"
STUDENT_EXPORT_DIR = "pipeline"  # RUN/pipeline; runs exported before BootPipeline have RUN/student
LORA_EXPORT_DIR = "lora"  # RUN/lora: a LoRA student's adapters (peft layout)
LORA_META_FILE = "vkd_lora.json"
# LoRA targets of a diffusers UNet (module-name suffixes, as peft's target_modules): the LCM-LoRA set
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
PARAMETERIZATIONS = ("auto", "preconditioned", "teacher_to_x0", "sample")

# λ band of the preconditioned student per teacher prediction type: |c_out| = e^λ̃ ∈ [0.37, 1] for ε and
# σ̃ ∈ [0.52, 1] for v (v stays exact up to T). Chosen on the Gaussian teacher (N = 1000, δ = 20, 400 steps,
# 3 seeds, one-step error to the BOOT fixed point; x0 head 0.081): ε [-1, 0] 0.094, [-0.5, 0.5] 0.102,
# [0, 0] 0.145, [-1, 1] 0.172; v [-0.5, ∞) 0.073, [0, ∞) 0.080, [-1, ∞) 0.080.
DEFAULT_LAMBDA_RANGE: dict[str, tuple[float, float]] = {"epsilon": (-1.0, 0.0), "v_prediction": (-0.5, math.inf)}


def resolve_parameterization(parameterization: str, prediction_type: str) -> str:
    """``auto`` → ``sample`` (an x0 head) for ε/v teachers and ``teacher_to_x0`` (the identity) for x0 teachers."""
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {', '.join(PARAMETERIZATIONS)}, got {parameterization!r}")
    if parameterization == "auto":
        return "sample" if prediction_type in DEFAULT_LAMBDA_RANGE else "teacher_to_x0"
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
        self.lora_config: dict[str, Any] | None = None  # peft LoraConfig kwargs once add_lora ran
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


def student_from_config(teacher: DiffusionTeacher, cfg: BootConfig) -> BootStudent:
    """The trainable student of a BOOT run: the teacher's fp32 copy in ``cfg.student``'s parameterisation, with
    LoRA adapters when ``cfg.student.lora_rank > 0`` (build it before a half-precision teacher is cast)."""
    student = BootStudent.from_teacher(teacher, cfg.student.parameterization, -1.0 if cfg.loss.clean_endpoint else 0.0,
                                       cfg.student.lambda_range)
    if cfg.student.lora_rank > 0:
        add_lora(student, cfg.student.lora_rank, cfg.student.lora_alpha, cfg.student.lora_targets, cfg.run.seed)
    return student


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
                "max_length": prompts.max_length, "use_attention_mask": prompts.use_attention_mask,
                "clean_caption": prompts.clean_captions}
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
        index["clean_caption"] = prompts.clean_captions
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
    net = TextUNetDenoiser(unet, PromptEncoder(encoder, tokenizer, prompts, meta.get("negative_prompt", ""),
                                               clean_captions=bool(meta.get("clean_caption", False)))) \
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


# ----------------------------------------------------------------------------------------------
# LoRA students (peft)
# ----------------------------------------------------------------------------------------------


def _student_unet(student: BootStudent) -> nn.Module:
    unet = getattr(student.net, "unet", None)
    if unet is None:
        raise UserError(f"student.lora_rank needs a UNet student; this student's network is a "
                        f"{type(student.net).__name__}")
    return unet


def lora_target_names(unet: nn.Module, targets: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Names of the ``Linear``/``Conv2d`` modules of ``unet`` whose name is, or ends with ``.`` + , a target.

    ``targets``: module-name suffixes (peft's ``target_modules`` rule); empty: :data:`LORA_TARGETS`.
    """
    targets = tuple(targets) or LORA_TARGETS
    return [name for name, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
            and any(name == t or name.endswith("." + t) for t in targets)]


def add_lora(student: BootStudent, rank: int, alpha: float = 0.0, targets: tuple[str, ...] | list[str] = (),
             seed: int = 0) -> dict[str, Any]:
    """Freeze the student's network and inject rank-``rank`` LoRA adapters into its UNet (in place).

    Args:
        student: a UNet student (``student.net.unet``).
        rank: LoRA rank r (> 0).
        alpha: LoRA alpha (scale alpha / r); 0: alpha = r.
        targets: module-name suffixes (empty: :data:`LORA_TARGETS`).
        seed: seed of the A factors' random init (the global RNG is left as it was).

    Returns:
        The ``peft.LoraConfig`` keyword arguments (JSON-serialisable; also ``student.lora_config``).

    Raises:
        UserError: the network has no UNet, or no ``Linear``/``Conv2d`` layer matches ``targets``.

    Examples:
        >>> kwargs = add_lora(student, rank=8)  # doctest: +SKIP
        >>> sum(p.numel() for p in student.parameters() if p.requires_grad)  # adapters only  # doctest: +SKIP
    """
    from peft import LoraConfig, inject_adapter_in_model  # imports transformers (seconds); LoRA runs only

    unet = _student_unet(student)
    if rank < 1:
        raise UserError(f"student.lora_rank must be >= 1 to add adapters, got {rank}")
    names = lora_target_names(unet, targets)
    if not names:
        raise UserError(f"student.lora_rank={rank}: no Linear/Conv2d layer of the {type(unet).__name__} matches "
                        f"student.lora_targets {list(targets or LORA_TARGETS)}")
    kwargs: dict[str, Any] = {"r": int(rank), "lora_alpha": float(alpha or rank), "lora_dropout": 0.0,
                              "bias": "none", "target_modules": names}
    student.net.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):  # a run's adapters start the same however the process got here
        torch.manual_seed(seed)
        inject_adapter_in_model(LoraConfig(**kwargs), unet)
    for name, param in unet.named_parameters():  # peft's injection marks them; made explicit for any peft version
        if ".lora_" in name:
            param.requires_grad_(True)
    student.lora_config = kwargs
    return kwargs


def has_lora(student: nn.Module) -> bool:
    return getattr(student, "lora_config", None) is not None


def lora_state_dict(student: BootStudent) -> dict[str, torch.Tensor]:
    """The adapters only, in peft's saved-key form (``<module>.lora_A.weight``), on CPU."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(_student_unet(student))
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


_PEFT_PREFIX = "base_model.model."  # how peft's PeftModel.save_pretrained names the wrapped model's keys


def save_lora(student: BootStudent, path: str | Path, meta: dict[str, Any]) -> Path:
    """Write a LoRA student's adapters in peft's layout (``adapter_config.json``, ``adapter_model.safetensors``)
    plus ``vkd_lora.json`` (parameterisation, λ band, ``t_sample``, teacher; what rebuilds the student).

    ``peft.PeftModel.from_pretrained(unet, path)`` loads them onto the teacher's UNet (any framework).
    """
    from peft import LoraConfig

    if not has_lora(student):
        raise ValueError("save_lora needs a student with LoRA adapters (add_lora)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    LoraConfig(**student.lora_config, base_model_name_or_path=str(meta.get("teacher", ""))).save_pretrained(str(path))
    state = {_PEFT_PREFIX + k: v for k, v in lora_state_dict(student).items()}
    tmp = path / "adapter_model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(path / "adapter_model.safetensors")
    info = {"parameterization": student.parameterization, "prediction_type": student.prediction_type,
            "t_sample": student.t_sample, "lambda_range": _json_range(student.lambda_range),
            "lora": student.lora_config, "adapter_params": sum(int(v.numel()) for v in state.values()), **meta}
    (path / LORA_META_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return path


def load_lora(student: BootStudent, path: str | Path) -> BootStudent:
    """Inject the adapters saved by :func:`save_lora` into ``student`` (a copy of the same teacher) and load them."""
    from peft import set_peft_model_state_dict

    path = Path(path)
    try:
        kwargs = json.loads((path / "adapter_config.json").read_text())
        state = load_file(str(path / "adapter_model.safetensors"))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the LoRA adapters in {path}: {str(err).splitlines()[0]}") from None
    targets = kwargs.get("target_modules") or []
    add_lora(student, int(kwargs["r"]), float(kwargs.get("lora_alpha") or kwargs["r"]),
             sorted(targets) if isinstance(targets, list) else [targets])
    unet = _student_unet(student)
    state = {k[len(_PEFT_PREFIX):] if k.startswith(_PEFT_PREFIX) else k: v for k, v in state.items()}
    result = set_peft_model_state_dict(unet, state)
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"the LoRA adapters in {path} do not fit this teacher's UNet "
                        f"(unexpected {list(result.unexpected_keys)[:3]})")
    return student


def merged_student(student: BootStudent) -> BootStudent:
    """A copy of a LoRA student with the adapters merged into plain diffusers UNet weights (for ``save_student``)."""
    from peft.tuners.lora import LoraLayer

    out = copy.deepcopy(student)
    unet = _student_unet(out)
    for module in unet.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    state = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if ".lora_" not in k}
    plain = type(unet).from_config(unet.config)
    plain.load_state_dict(state)
    out.net.unet = plain.to(dtype=next(iter(state.values())).dtype)
    out.lora_config = None
    return out
