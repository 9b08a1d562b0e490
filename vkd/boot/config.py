"""Configs of the two BOOT tasks: ``boot-teacher`` (embedded DDPM on digits) and ``boot`` (distillation).

Every option of the BOOT spec (boot.md §12) is a field of :class:`BootLossConfig` /
:class:`BootTeacherRef` with the spec's default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from vkd.config import TaskConfig, TrainConfig
from vkd.errors import ConfigError

__all__ = [
    "UNetConfig",
    "SchedulerConfig",
    "DigitsDataConfig",
    "TeacherTrainLossConfig",
    "SampleConfig",
    "EvalConfig",
    "BootTeacherConfig",
    "TextUNetConfig",
    "TextEncoderConfig",
    "BootTextTeacherConfig",
    "BootTeacherRef",
    "BootDataConfig",
    "BootStudentConfig",
    "BootLossConfig",
    "BootConfig",
]


@dataclass
class UNetConfig:
    """A diffusers ``UNet2DModel`` (only the fields the embedded teacher needs)."""

    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention: bool = False  # AttnDownBlock2D / AttnUpBlock2D at the lowest resolution
    norm_num_groups: int = 8
    class_conditional: bool = True  # num_class_embeds = num_classes + 1 (last = null class for CFG)

    def __post_init__(self) -> None:
        if not self.block_out_channels or any(c <= 0 for c in self.block_out_channels):
            raise ConfigError(f"model.block_out_channels must be positive, got {self.block_out_channels}")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ConfigError(f"model.norm_num_groups={self.norm_num_groups} must divide every block_out_channels "
                              f"{self.block_out_channels}")
        if self.layers_per_block < 1:
            raise ConfigError(f"model.layers_per_block must be >= 1, got {self.layers_per_block}")


@dataclass
class SchedulerConfig:
    """A diffusers ``DDPMScheduler`` (saved with the teacher, read back by ``from_pretrained``)."""

    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"] = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    clip_sample: bool = True
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 2:
            raise ConfigError(f"scheduler.num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ConfigError(f"scheduler needs 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")


@dataclass
class DigitsDataConfig:
    """scikit-learn digits, upsampled (vkd.data.digits)."""

    size: int = 16

    def __post_init__(self) -> None:
        if self.size < 8 or self.size % 4:
            raise ConfigError(f"data.size must be a multiple of 4 and >= 8, got {self.size}")


@dataclass
class TeacherTrainLossConfig:
    """Denoising loss of the teacher: MSE on the scheduler's prediction type."""

    cond_drop_prob: float = 0.1  # label dropout to the null class: enables classifier-free guidance
    snr_gamma: float = 0.0  # min-SNR-γ weighting (0 = off)

    def __post_init__(self) -> None:
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise ConfigError(f"loss.cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")
        if self.snr_gamma < 0:
            raise ConfigError(f"loss.snr_gamma must be >= 0, got {self.snr_gamma}")


@dataclass
class SampleConfig:
    """Sample grids written at every checkpoint (fixed seed)."""

    num: int = 64
    seed: int = 1234
    teacher_steps: int = 20  # DDIM steps for teacher grids

    def __post_init__(self) -> None:
        if self.num < 1 or self.teacher_steps < 1:
            raise ConfigError("sample.num and sample.teacher_steps must be >= 1")


@dataclass
class EvalConfig:
    """FID with the embedded digits extractor (not Inception) against held-out digits."""

    num_samples: int = 1000  # 0 disables the FID evaluation
    seed: int = 2024
    teacher_steps: tuple[int, ...] = ()  # also score the teacher with DDIM-K (boot task only)
    batch_size: int = 250

    def __post_init__(self) -> None:
        if self.num_samples < 0 or self.num_samples == 1:
            raise ConfigError(f"eval.num_samples must be 0 or >= 2, got {self.num_samples}")
        if any(k < 1 for k in self.teacher_steps):
            raise ConfigError(f"eval.teacher_steps must be >= 1, got {self.teacher_steps}")


@dataclass
class BootTeacherConfig(TaskConfig):
    """``vkd distill boot-teacher``: train the embedded class-conditional DDPM on digits."""

    task: str = "boot-teacher"
    model: UNetConfig = field(default_factory=UNetConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    data: DigitsDataConfig = field(default_factory=DigitsDataConfig)
    loss: TeacherTrainLossConfig = field(default_factory=TeacherTrainLossConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(num_samples=0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=3000, batch_size=64, lr=2e-3, scheduler="cosine", warmup_steps=100, grad_clip=1.0,
        ema_decay=0.995, log_every=50, checkpoint_every=1000))


@dataclass
class TextUNetConfig:
    """The embedded text-to-image teacher's pixel-space ``UNet2DConditionModel``."""

    block_out_channels: tuple[int, ...] = (16, 32)
    layers_per_block: int = 1
    # per level, from the highest resolution: CrossAttnDownBlock2D / CrossAttnUpBlock2D (else Down/UpBlock2D);
    # the mid block (UNetMidBlock2DCrossAttn) always cross-attends
    cross_attention: tuple[bool, ...] = (False, False)
    attention_head_dim: int = 8
    norm_num_groups: int = 8

    def __post_init__(self) -> None:
        UNetConfig(tuple(self.block_out_channels), self.layers_per_block, False, self.norm_num_groups)
        if len(self.cross_attention) != len(self.block_out_channels):
            raise ConfigError(f"model.cross_attention needs one entry per level ({len(self.block_out_channels)}), "
                              f"got {list(self.cross_attention)}")
        if self.attention_head_dim < 1:
            raise ConfigError(f"model.attention_head_dim must be >= 1, got {self.attention_head_dim}")


@dataclass
class TextEncoderConfig:
    """The embedded teacher's ``transformers.CLIPTextModel`` (CLIP's real BPE tokenizer, built offline)."""

    hidden_size: int = 64  # = the UNet's cross_attention_dim
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 128
    max_tokens: int = 16  # tokenizer model_max_length = position embeddings (every caption fits)
    trainable: bool = True  # trained with the UNet (else a frozen random encoder)

    def __post_init__(self) -> None:
        if self.hidden_size < 1 or self.num_layers < 1 or self.num_heads < 1 or self.hidden_size % self.num_heads:
            raise ConfigError(f"text_encoder: hidden_size={self.hidden_size} must be a positive multiple of "
                              f"num_heads={self.num_heads}, and num_layers >= 1")
        if not 4 <= self.max_tokens <= 77:
            raise ConfigError(f"text_encoder.max_tokens must be in [4, 77], got {self.max_tokens}")


@dataclass
class BootTextTeacherConfig(TaskConfig):
    """``vkd distill boot-text-teacher``: train the embedded text-to-image DDPM on captioned digits.

    The run exports ``RUN/teacher`` (a ``StableDiffusionPipeline``-layout directory without a VAE: ``unet/``,
    ``text_encoder/``, ``tokenizer/``, ``scheduler/``, ``model_index.json``) and ``RUN/prompts.txt`` (every caption).
    """

    task: str = "boot-text-teacher"
    model: TextUNetConfig = field(default_factory=TextUNetConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    data: DigitsDataConfig = field(default_factory=DigitsDataConfig)
    loss: TeacherTrainLossConfig = field(default_factory=TeacherTrainLossConfig)  # cond_drop: caption -> ""
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(num_samples=0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=3000, batch_size=64, lr=2e-3, scheduler="cosine", warmup_steps=100, grad_clip=1.0,
        ema_decay=0.995, log_every=50, checkpoint_every=1000))


@dataclass
class BootTeacherRef:
    """Which teacher to distil, and how its x0 predictor is formed (boot.md §7, §9)."""

    # a key of vkd.boot.teacher.TEACHER_KINDS (checked when the teacher is built); auto: text-to-image when the
    # pipeline has a text_encoder, else unet2d
    kind: str = "auto"
    path: str = "runs/boot-teacher/digits/teacher"  # local save_pretrained dir or a hub id
    guidance_scale: float = 1.0  # CFG scale w folded into the teacher
    clip_x0: Literal["scheduler", "true", "false"] = "scheduler"
    null_class: int | None = None  # ∅ class for CFG (default: from vkd_teacher.json)
    interp: Literal["lambda", "index"] = "lambda"  # fractional timesteps (continuous time sampling)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # teacher forward precision (GPU)
    negative_prompt: str = ""  # text-to-image: the ∅ prompt of guidance (empty prompt by default)
    prompt_cache_mb: float = 256.0  # text-to-image: embed every prompt once when the table fits in this many MB
    # text-to-image: DeepFloyd IF's caption cleaning of the prompts and the negative prompt (diffusers' IFPipeline,
    # clean_caption=True); auto: on for IF pipelines (model_index IFPipeline, or a T5 encoder without a VAE)
    clean_captions: Literal["auto", "true", "false"] = "auto"

    def __post_init__(self) -> None:
        if self.prompt_cache_mb < 0:
            raise ConfigError(f"teacher.prompt_cache_mb must be >= 0, got {self.prompt_cache_mb}")
        if not self.path:
            raise ConfigError("teacher.path must name a teacher directory or hub id")
        if self.guidance_scale < 0:
            raise ConfigError(f"teacher.guidance_scale must be >= 0, got {self.guidance_scale}")


@dataclass
class BootDataConfig:
    """BOOT's only data: the prompts of a text-to-image teacher (data-free otherwise)."""

    prompts: str | None = None  # one prompt per line (.txt), or a JSON/JSONL/CSV/TSV column (vkd.boot.data)
    prompt_column: str | None = None  # JSON key / CSV column (default: prompt, caption or text)


@dataclass
class BootStudentConfig:
    """The one-step student (a copy of the teacher network; vkd.boot.student)."""

    # auto: sample (an x0 head) for ε/v teachers, teacher_to_x0 (the identity) for x0 teachers
    parameterization: Literal["auto", "preconditioned", "teacher_to_x0", "sample"] = "auto"
    # (λ_min, λ_max) band of the preconditioned output coefficients (parameterization: preconditioned); null: per
    # prediction type
    # (ε [-1, 0], v [-0.5, inf)); λ = log(σ/α)
    lambda_range: tuple[float, float] | None = None
    gradient_checkpointing: bool = False  # diffusers UNet gradient checkpointing (memory for compute)
    # LoRA student (peft): > 0 trains rank-r adapters on the UNet copy and freezes its weights; only the
    # adapters are checkpointed and exported (RUN/lora, peft's adapter layout)
    lora_rank: int = 0
    lora_alpha: float = 0.0  # LoRA scale alpha/r; 0: alpha = rank
    # module-name suffixes that get adapters (peft target_modules); empty: LORA_TARGETS of vkd.boot.student
    # (attention, feed-forward and ResNet layers, the LCM-LoRA set)
    lora_targets: tuple[str, ...] = ()
    lora_merged_export: bool = False  # also write RUN/pipeline with the adapters merged into the UNet

    def __post_init__(self) -> None:
        if self.lora_rank < 0 or self.lora_alpha < 0:
            raise ConfigError(f"student.lora_rank and student.lora_alpha must be >= 0, got {self.lora_rank}, "
                              f"{self.lora_alpha}")
        if self.lora_rank == 0 and (self.lora_targets or self.lora_merged_export):
            raise ConfigError("student.lora_targets / student.lora_merged_export need student.lora_rank > 0")
        if self.lambda_range is not None:
            if len(self.lambda_range) != 2 or not self.lambda_range[0] <= self.lambda_range[1]:
                raise ConfigError(f"student.lambda_range must be [lambda_min, lambda_max] with min <= max, "
                                  f"got {self.lambda_range}")
            if self.parameterization != "preconditioned":
                raise ConfigError("student.lambda_range only applies to student.parameterization=preconditioned")


@dataclass
class BootLossConfig:
    """The BOOT objective (boot.md §3-§8, §12), with the spec's defaults (``time_weight=auto`` adds vkd's
    ``inv_x0_gain`` for ε teachers; ``uniform`` is the spec's)."""

    delta: int = 20  # δ in index steps (recommended 10-50)
    delta_lambda: Literal["exact", "first_order"] = "exact"
    weighting: Literal["inv_delta_lambda_sq", "inv_delta_sq", "none"] = "inv_delta_lambda_sq"
    # extra L_BS weight per t: inv_x0_gain = 1/(1 + (k_t/e^λc)²), k_t the gain of the teacher's x0 on an error of
    # its output (σ/α for ε: 157 at T on DDPM's linear β); auto: inv_x0_gain for ε teachers, uniform otherwise
    time_weight: Literal["auto", "uniform", "inv_x0_gain"] = "auto"
    x0_gain_cutoff: float = 2.0  # λc of inv_x0_gain (weight 1/2 where k_t = e^λc)
    boundary_target: Literal["teacher", "exact"] = "teacher"
    boundary_weight: float = 0.1
    clean_endpoint: bool = True
    time_sampling: Literal["discrete", "continuous"] = "discrete"

    def __post_init__(self) -> None:
        if self.delta < 1:
            raise ConfigError(f"loss.delta must be >= 1, got {self.delta}")
        if self.boundary_weight < 0:
            raise ConfigError(f"loss.boundary_weight must be >= 0, got {self.boundary_weight}")
        if not math.isfinite(self.x0_gain_cutoff):
            raise ConfigError(f"loss.x0_gain_cutoff must be finite, got {self.x0_gain_cutoff}")


@dataclass
class BootConfig(TaskConfig):
    """``vkd distill boot``: data-free one-step distillation of a diffusers teacher."""

    task: str = "boot"
    teacher: BootTeacherRef = field(default_factory=BootTeacherRef)
    data: BootDataConfig = field(default_factory=BootDataConfig)
    student: BootStudentConfig = field(default_factory=BootStudentConfig)
    loss: BootLossConfig = field(default_factory=BootLossConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=2000, batch_size=64, lr=1e-4, grad_clip=1.0, log_every=50, checkpoint_every=500))
