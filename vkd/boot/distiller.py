"""The two BOOT tasks the engine trains: the embedded digits DDPM teacher and the BOOT distillation.

- :class:`TeacherTrainingTask` trains a class-conditional ``UNet2DModel`` DDPM on scikit-learn digits
  (label dropout to a null class, so classifier-free guidance works) and exports it with
  ``save_pretrained`` so it loads exactly like a hub checkpoint.
- :class:`BootTask` is data-free: the engine passes global sample indices; each sample's ε, t and
  class are drawn from a generator seeded by ``(run seed, index)``, so several processes reproduce
  the single-process run.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel
from torch import nn

from vkd.boot.conditioning import PromptEncoder, TextUNetDenoiser
from vkd.boot.config import BootConfig, BootTeacherConfig, BootTextTeacherConfig, EvalConfig
from vkd.boot.data import DIGIT_CAPTION_TEMPLATES, digit_captions
from vkd.boot.evaluate import DigitsFID, digits_fid_scores, digits_reference_available
from vkd.boot.losses import BootLoss, denoising_loss, forward_diffuse
from vkd.boot.sample import ddim_sample, noise_batches, sample_generator, save_grid, student_sample
from vkd.boot.schedule import NoiseSchedule
from vkd.boot.student import (
    LORA_EXPORT_DIR,
    STUDENT_EXPORT_DIR,
    BootStudent,
    has_lora,
    merged_student,
    save_lora,
    save_student,
    student_from_config,
)
from vkd.boot.teacher import (
    DiffusionTeacher,
    UNetDenoiser,
    build_teacher,
    cast_teacher,
    save_teacher,
    save_text_teacher,
    scheduler_config_of,
)
from vkd.cache import atomic_write_text
from vkd.engine import DistillationTask, with_final_ema
from vkd.errors import ConfigError
from vkd.models.clip_tokenizer import CLIP_BOS_ID, CLIP_EOS_ID, CLIP_VOCAB_SIZE, clip_tokenizer

log = logging.getLogger(__name__)

__all__ = ["build_unet", "build_text_unet", "build_text_encoder", "build_scheduler", "caption_prompts",
           "draw_boot_inputs", "TeacherTrainingTask", "TextTeacherTrainingTask", "BootTask", "DigitsFID"]


def build_unet(cfg: BootTeacherConfig, num_classes: int = 10) -> nn.Module:
    """The embedded teacher's ``UNet2DModel`` (seeded by ``run.seed``)."""
    m = cfg.model
    n = len(m.block_out_channels)
    down = tuple("AttnDownBlock2D" if (m.attention and i == n - 1) else "DownBlock2D" for i in range(n))
    up = tuple("AttnUpBlock2D" if (m.attention and i == 0) else "UpBlock2D" for i in range(n))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        return UNet2DModel(sample_size=cfg.data.size, in_channels=1, out_channels=1,
                           block_out_channels=tuple(m.block_out_channels), layers_per_block=m.layers_per_block,
                           down_block_types=down, up_block_types=up, norm_num_groups=m.norm_num_groups,
                           attention_head_dim=min(8, m.block_out_channels[-1]),
                           num_class_embeds=(num_classes + 1) if m.class_conditional else None)


def build_text_unet(cfg: BootTextTeacherConfig) -> UNet2DConditionModel:
    """The embedded text-to-image teacher's pixel-space ``UNet2DConditionModel`` (seeded by ``run.seed``)."""
    m = cfg.model
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in m.cross_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(m.cross_attention))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        return UNet2DConditionModel(sample_size=cfg.data.size, in_channels=1, out_channels=1,
                                    block_out_channels=tuple(m.block_out_channels), layers_per_block=m.layers_per_block,
                                    down_block_types=down, up_block_types=up, norm_num_groups=m.norm_num_groups,
                                    cross_attention_dim=cfg.text_encoder.hidden_size,
                                    attention_head_dim=m.attention_head_dim)


def build_text_encoder(cfg: BootTextTeacherConfig) -> nn.Module:
    """A small ``transformers.CLIPTextModel`` over CLIP's full vocabulary (seeded by ``run.seed + 1``)."""
    from transformers import CLIPTextConfig, CLIPTextModel  # slow to import; only text teachers need it

    e = cfg.text_encoder
    config = CLIPTextConfig(hidden_size=e.hidden_size, intermediate_size=e.intermediate_size,
                            num_hidden_layers=e.num_layers, num_attention_heads=e.num_heads,
                            vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=e.max_tokens,
                            bos_token_id=CLIP_BOS_ID, eos_token_id=CLIP_EOS_ID, pad_token_id=CLIP_EOS_ID)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed + 1)
        return CLIPTextModel(config)


def caption_prompts() -> tuple[str, ...]:
    """Every caption of the embedded text teacher, template-major: prompt ``p`` names digit ``p % 10``."""
    per_digit = [digit_captions(d) for d in range(10)]
    return tuple(per_digit[d][k] for k in range(len(DIGIT_CAPTION_TEMPLATES)) for d in range(10))


def build_scheduler(cfg: BootTeacherConfig | BootTextTeacherConfig):
    s = cfg.scheduler
    return DDPMScheduler(num_train_timesteps=s.num_train_timesteps, beta_schedule=s.beta_schedule,
                         beta_start=s.beta_start, beta_end=s.beta_end, prediction_type=s.prediction_type,
                         clip_sample=s.clip_sample, rescale_betas_zero_snr=s.rescale_betas_zero_snr,
                         timestep_spacing="trailing")


def draw_boot_inputs(indices: torch.Tensor, seed: int, shape: tuple[int, ...], num_train_timesteps: int,
                     delta: int, clean_endpoint: bool = True, time_sampling: str = "discrete",
                     num_classes: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-sample ε ``[B, *shape]``, t ``[B]``, s = t − δ ``[B]`` (float64) and classes ``[B]`` from ``(seed, index)``.

    ``discrete``: t ~ U{t_lo, …, N−1}; ``continuous``: t ~ U[t_lo, N−1] and s < 0 maps to the clean
    endpoint ``-1``. ``t_lo = δ − 1`` with the clean endpoint (so s reaches −1), else δ.
    """
    N = num_train_timesteps
    t_lo = delta - 1 if clean_endpoint else delta
    if t_lo > N - 1:
        raise ConfigError(f"loss.delta={delta} is too large for {N} timesteps")
    eps, ts, cls = [], [], []
    for i in indices.tolist():
        g = sample_generator(seed, int(i))
        eps.append(torch.randn(shape, generator=g))
        if time_sampling == "discrete":
            ts.append(float(torch.randint(t_lo, N, (1,), generator=g)))
        else:
            ts.append(t_lo + float(torch.rand((1,), generator=g, dtype=torch.float64)) * (N - 1 - t_lo))
        if num_classes is not None:
            cls.append(int(torch.randint(0, num_classes, (1,), generator=g)))
    t = torch.tensor(ts, dtype=torch.float64)
    s = t - delta
    if clean_endpoint:
        s = torch.where(s < 0, torch.full_like(s, -1.0), s)
    labels = torch.tensor(cls, dtype=torch.long) if num_classes is not None else None
    return torch.stack(eps), t, s, labels


# ----------------------------------------------------------------------------------------------
# teacher training
# ----------------------------------------------------------------------------------------------


class _DiffusionTrainingTask(DistillationTask):
    """What the embedded teachers' DDPM training shares: the scheduler's ᾱ buffer and the trained ``model`` (the
    module the EMA tracks and the export writes)."""

    frozen_modules: tuple[str, ...] = ()
    model: nn.Module
    prompts: Sequence[str] | None = None  # a text teacher's caption table (scored by prompt accuracy)

    def _init_schedule(self, cfg: BootTeacherConfig | BootTextTeacherConfig) -> None:
        self.noise_scheduler = build_scheduler(cfg)
        acp = self.noise_scheduler.alphas_cumprod.to(torch.float32)
        self.register_buffer("alphas_cumprod", acp, persistent=False)
        self._fid: DigitsFID | None = None

    def student_module(self) -> nn.Module:
        return self.model

    def _diffusion_teacher(self, net: nn.Module, num_classes: int | None, null_class: int | None) -> DiffusionTeacher:
        """``net`` (a denoiser over this task's schedule) as a :class:`DiffusionTeacher` (shares weights)."""
        sched = NoiseSchedule(self.alphas_cumprod)
        return DiffusionTeacher(net, sched.to(self.alphas_cumprod.device), self.cfg.scheduler.prediction_type,
                                clip_x0=self.cfg.scheduler.clip_sample, num_classes=num_classes,
                                null_class=null_class, sample_shape=(1, self.cfg.data.size, self.cfg.data.size))

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Digits-CNN FID of teacher DDIM-K (``eval.teacher_steps``, default 50) and, for a text teacher, its prompt
        accuracy on the captions."""
        ev: EvalConfig = self.cfg.eval
        if ev.num_samples == 0:
            return {}
        if self._fid is None:
            self._fid = DigitsFID(self.cfg.data.size)
        teacher = self.as_teacher()
        out: dict[str, float] = {}
        for k in ev.teacher_steps or (50,):
            out.update(self._fid.score(lambda e, c, k=k: ddim_sample(teacher, e, c, k), ev, teacher.sample_shape,
                                       teacher.num_classes, f"teacher_ddim{k}", self.alphas_cumprod.device,
                                       self.prompts))
        return out

    def _save_teacher_grid(self, step: int, out_dir: Path, nrow: int | None = None) -> None:
        """A grid of the model's DDIM samples on the fixed sample noise (one column per condition)."""
        sc = self.cfg.sample
        teacher = self.as_teacher()
        _, eps, labels = next(noise_batches(sc.num, sc.seed, teacher.sample_shape, teacher.num_classes, sc.num,
                                            self.alphas_cumprod.device))
        kwargs = {} if nrow is None else {"nrow": nrow}
        save_grid(ddim_sample(teacher, eps, labels, sc.teacher_steps),
                  Path(out_dir) / f"teacher_ddim{sc.teacher_steps}_step{step:06d}.png", **kwargs)


class TeacherTrainingTask(_DiffusionTrainingTask):
    """DDPM training of the embedded class-conditional ``UNet2DModel`` on digits (batch = (images, labels))."""

    def __init__(self, cfg: BootTeacherConfig, num_classes: int = 10):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes if cfg.model.class_conditional else None
        self.null_class = num_classes if cfg.model.class_conditional else None
        self.model = build_unet(cfg, num_classes)
        self._init_schedule(cfg)

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        x0, labels = batch  # [B, 1, S, S] in [-1, 1], [B]
        x_t, t, noise, acp = forward_diffuse(x0, self.alphas_cumprod)
        if self.null_class is not None:
            drop = torch.rand(x0.shape[0], device=x0.device) < self.cfg.loss.cond_drop_prob
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        else:
            labels = None
        out = self.model(x_t, t, class_labels=labels).sample
        return {"loss": denoising_loss(out, x0, noise, acp, self.cfg.scheduler.prediction_type,
                                       self.cfg.loss.snr_gamma)}

    def as_teacher(self, model: nn.Module | None = None) -> DiffusionTeacher:
        """The model being trained as a :class:`DiffusionTeacher` (shares weights)."""
        model = model if model is not None else self.model
        return self._diffusion_teacher(UNetDenoiser(model), self.num_classes, self.null_class)

    @torch.no_grad()
    def save_samples(self, step: int, out_dir: Path) -> None:
        self._save_teacher_grid(step, out_dir)


    def export(self, run_dir: Path) -> None:
        """``run_dir/teacher``: ``save_pretrained`` UNet (EMA weights when kept) + scheduler + vkd metadata."""
        model = with_final_ema(self.model, run_dir)
        meta = {"dataset": "digits", "image_size": self.cfg.data.size, "value_range": [-1, 1],
                "num_classes": self.num_classes, "null_class": self.null_class,
                "class_names": [str(i) for i in range(self.num_classes or 0)],
                "ema": model is not self.model, "trained_steps": self.cfg.train.steps}
        save_teacher(model, self.noise_scheduler, Path(run_dir) / "teacher", meta)


class TextConditionedUNet(nn.Module):
    """The trainable pair of the embedded text teacher: ``unet`` (``UNet2DConditionModel``) + ``text_encoder``."""

    def __init__(self, unet: UNet2DConditionModel, text_encoder: nn.Module):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(self, x: torch.Tensor, t: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """``x [B, 1, S, S]``, ``t [B]``, token ids ``[B, L]`` → the prediction ``[B, 1, S, S]``."""
        states = self.text_encoder(input_ids)[0]  # [B, L, D] last_hidden_state, as the SD pipeline reads it
        return self.unet(x, t, encoder_hidden_states=states).sample


class TextTeacherTrainingTask(_DiffusionTrainingTask):
    """DDPM training of the embedded text-to-image teacher on captioned digits (batch = (images, labels)).

    Each sample's caption is drawn from :data:`~vkd.boot.data.DIGIT_CAPTION_TEMPLATES` for its label, and replaced by
    the empty prompt with probability ``loss.cond_drop_prob`` (the ∅ of classifier-free guidance, as SD trains).
    The text encoder trains with the UNet unless ``text_encoder.trainable`` is off. Export: ``RUN/teacher`` in the
    ``StableDiffusionPipeline`` layout (no VAE: pixel space) and ``RUN/prompts.txt``, so BOOT loads it through the
    same path as a hub pipeline.
    """

    def __init__(self, cfg: BootTextTeacherConfig):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = clip_tokenizer(cfg.text_encoder.max_tokens)
        self.model = TextConditionedUNet(build_text_unet(cfg), build_text_encoder(cfg))
        if not cfg.text_encoder.trainable:
            self.model.text_encoder.requires_grad_(False)
        self.prompts = caption_prompts()
        tok = self.tokenizer([*self.prompts, ""], padding="max_length", max_length=cfg.text_encoder.max_tokens,
                             truncation=True, return_tensors="pt")
        self.register_buffer("input_ids", tok["input_ids"], persistent=False)  # [P + 1, L]; row P: ""
        self._init_schedule(cfg)

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        x0, labels = batch  # [B, 1, S, S] in [-1, 1], [B]
        B, dev = x0.shape[0], x0.device
        x_t, t, noise, acp = forward_diffuse(x0, self.alphas_cumprod)
        template = torch.randint(0, len(DIGIT_CAPTION_TEMPLATES), (B,), device=dev)
        prompt = template * 10 + labels  # template-major table (caption_prompts)
        drop = torch.rand(B, device=dev) < self.cfg.loss.cond_drop_prob
        prompt = torch.where(drop, torch.full_like(prompt, len(self.prompts)), prompt)
        out = self.model(x_t, t, self.input_ids[prompt])
        return {"loss": denoising_loss(out, x0, noise, acp, self.cfg.scheduler.prediction_type,
                                       self.cfg.loss.snr_gamma)}

    def as_teacher(self, model: TextConditionedUNet | None = None) -> DiffusionTeacher:
        """A frozen :class:`DiffusionTeacher` over the captions, from a copy of the text encoder (the training one
        keeps its grad flags); the UNet is shared."""
        model = model if model is not None else self.model
        encoder = PromptEncoder(copy.deepcopy(model.text_encoder), self.tokenizer, self.prompts)
        return self._diffusion_teacher(TextUNetDenoiser(model.unet, encoder), len(self.prompts), encoder.null_index)

    @torch.no_grad()
    def save_samples(self, step: int, out_dir: Path) -> None:
        """A grid of DDIM samples: row ``k`` = caption template ``k``, column = digit."""
        self._save_teacher_grid(step, out_dir, nrow=10)


    def export(self, run_dir: Path) -> None:
        """``RUN/teacher`` (pipeline layout; EMA weights when kept) and ``RUN/prompts.txt``."""
        model = with_final_ema(self.model, run_dir)
        meta = {"dataset": "digits", "image_size": self.cfg.data.size, "value_range": [-1, 1],
                "conditioning": "text", "prompts": "../prompts.txt", "num_caption_templates":
                len(DIGIT_CAPTION_TEMPLATES), "ema": model is not self.model, "trained_steps": self.cfg.train.steps}
        save_text_teacher(model.unet, model.text_encoder, self.tokenizer, self.noise_scheduler,
                          Path(run_dir) / "teacher", meta)
        atomic_write_text(Path(run_dir) / "prompts.txt", "\n".join(self.prompts) + "\n")


# ----------------------------------------------------------------------------------------------
# BOOT
# ----------------------------------------------------------------------------------------------


class BootTask(DistillationTask):
    """BOOT distillation: student (a copy of the teacher) + frozen teacher + :class:`BootLoss`.

    Args:
        cfg: the BOOT config.
        teacher: a teacher to use instead of loading ``cfg.teacher`` (tests).
        student: a student to use instead of copying the teacher (tests, e.g. an MLP).
    """

    frozen_modules: tuple[str, ...] = ("teacher", "objective")

    def __init__(self, cfg: BootConfig, teacher: DiffusionTeacher | None = None, student: BootStudent | None = None):
        super().__init__()
        self.cfg = cfg
        self.teacher = teacher if teacher is not None else build_teacher(cfg.teacher, cfg.data, cast=False)
        self.teacher.eval().requires_grad_(False)
        L = cfg.loss
        # the student is an fp32 copy of the fp32 teacher (master weights); only then is the teacher cast
        self.student = student if student is not None else student_from_config(self.teacher, cfg)
        cast_teacher(self.teacher, cfg.teacher)
        if cfg.student.gradient_checkpointing and hasattr(getattr(self.student.net, "unet", None),
                                                          "enable_gradient_checkpointing"):
            self.student.net.unet.enable_gradient_checkpointing()
        self.objective = BootLoss(self.teacher, L.delta_lambda, L.weighting, L.time_weight, L.boundary_target,
                                  L.boundary_weight, L.x0_gain_cutoff)
        if L.delta > self.teacher.schedule.num_train_timesteps - 1:
            raise ConfigError(f"loss.delta={L.delta} must be < num_train_timesteps="
                              f"{self.teacher.schedule.num_train_timesteps}")
        self._fid: DigitsFID | None = None
        self._teacher_scores: dict[int, dict[str, float]] = {}
        if cfg.eval.num_samples > 0 and not self._reference_available():
            log.info("eval: the digits-CNN FID needs the embedded digits teacher, so it is off for %s "
                     "(score samples with `vkd sample boot` + `vkd fid`)", cfg.teacher.path)

    def train(self, mode: bool = True) -> BootTask:
        super().train(mode)
        self.teacher.eval()  # frozen teacher stays in eval mode
        return self

    def forward(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """``batch``: LongTensor ``[B]`` of global sample indices (data-free)."""
        L = self.cfg.loss
        dev = next(self.student.parameters()).device
        eps, t, s, labels = draw_boot_inputs(batch.cpu(), self.cfg.run.seed, self.teacher.sample_shape,
                                             self.teacher.schedule.num_train_timesteps, L.delta, L.clean_endpoint,
                                             L.time_sampling, self.teacher.num_classes)
        eps, t, s = eps.to(dev), t.to(dev), s.to(dev)
        labels = None if labels is None else labels.to(dev)
        return self.objective(self.student, eps, t, s, labels)

    # ---- samples / eval -----------------------------------------------------------------------
    def _device(self) -> torch.device:
        return next(self.student.parameters()).device

    @torch.no_grad()
    def save_samples(self, step: int, out_dir: Path) -> None:
        sc = self.cfg.sample
        dev = self._device()
        _, eps, labels = next(noise_batches(sc.num, sc.seed, self.teacher.sample_shape, self.teacher.num_classes,
                                            sc.num, dev))
        save_grid(student_sample(self.student, eps, labels), Path(out_dir) / f"student_step{step:06d}.png")
        ref = Path(out_dir) / f"teacher_ddim{sc.teacher_steps}.png"
        if not ref.exists():  # same ε: the teacher reference grid, written once
            save_grid(ddim_sample(self.teacher, eps, labels, sc.teacher_steps), ref)

    def _reference_available(self) -> bool:
        return digits_reference_available(self.cfg.teacher.path)

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """FID (digits CNN, not Inception) of the one-step student and of teacher DDIM-K vs held-out digits."""
        if self.cfg.eval.num_samples == 0 or not self._reference_available():
            return {}
        if self._fid is None:
            self._fid = DigitsFID(self.teacher.sample_shape[-1])
        return digits_fid_scores(self.student, self.teacher, self.cfg.eval, self._fid, self._teacher_scores)

    # ---- LoRA students: only the adapters are averaged, checkpointed and exported --------------
    def _lora_keys(self, prefix: str = "") -> list[str]:
        return [prefix + k for k in self.student.state_dict() if ".lora_" in k]

    def ema_state_keys(self) -> list[str] | None:
        return self._lora_keys() if has_lora(self.student) else None

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        state = super().checkpoint_state_dict()
        if has_lora(self.student):  # the frozen weights are the teacher's, rebuilt from it on resume
            state = {k: v for k, v in state.items() if not k.startswith("student.") or ".lora_" in k}
        return state

    def load_checkpoint_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if not has_lora(self.student):
            return super().load_checkpoint_state_dict(state)
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if k.startswith("student.") and ".lora_" in k]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint does not match the LoRA student: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")

    def export(self, run_dir: Path) -> None:
        """``run_dir/pipeline``: the one-step student as a diffusers ``BootPipeline`` (EMA weights when kept).

        A LoRA student writes ``run_dir/lora`` (its adapters, peft layout) and, with
        ``student.lora_merged_export``, also ``run_dir/pipeline`` with the adapters merged.
        """
        if not isinstance(self.student.net, (UNetDenoiser, TextUNetDenoiser)):
            return
        student = with_final_ema(self.student, run_dir, strict=False)
        src = getattr(self.teacher, "source", self.cfg.teacher.path)
        text = isinstance(self.student.net, TextUNetDenoiser)
        meta = {"teacher": str(src), "num_classes": None if text else self.teacher.num_classes,
                "num_prompts": self.teacher.num_classes if text else None, "prompts": self.cfg.data.prompts,
                "delta": self.cfg.loss.delta, "guidance_scale": self.teacher.guidance_scale}
        if has_lora(student):
            save_lora(student, Path(run_dir) / LORA_EXPORT_DIR, meta)
            if not self.cfg.student.lora_merged_export:
                return
            student = merged_student(student)
        save_student(student, Path(run_dir) / STUDENT_EXPORT_DIR, scheduler_config_of(self.cfg.teacher.path), meta)
