"""Conditioning of text-to-image BOOT teachers: prompt tables on a frozen text encoder, and latent decoders.

A text-to-image teacher's condition is an **index into a prompt table**: ``0 … P−1`` are the prompts of the
prompt file, ``P`` is the negative prompt (the empty prompt by default, the ∅ of classifier-free guidance). BOOT's
data-free loop, CFG, per-sample seeding and sample sets then treat prompts exactly as they treat classes, and a
batch's prompt embeddings are computed by the frozen text encoder for the prompts it holds (all of them once, when
the table is small). Tokenisation follows diffusers' ``StableDiffusionPipeline.encode_prompt`` /
``IFPipeline.encode_prompt``: padding to ``max_length``, truncation, ``last_hidden_state``, and the attention mask
when the text encoder is T5 or its config sets ``use_attention_mask``.

The student shares the teacher's frozen text encoder and VAE through :class:`SharedModule`: they are not its
submodules, so they are neither trained, nor checkpointed, nor averaged by the EMA.

Examples:
    >>> encoder = PromptEncoder(text_encoder, tokenizer, ["a handwritten seven"])  # doctest: +SKIP
    >>> encoder(torch.tensor([0, 1])).shape  # prompt 0 and the empty prompt: [2, 77, D]  # doctest: +SKIP
    torch.Size([2, 77, 32])
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from vkd.boot.schedule import as_timesteps

__all__ = ["SharedModule", "PromptEncoder", "TextUNetDenoiser", "LatentDecoder", "prompt_max_length",
           "uses_attention_mask"]

PROMPT_MAX_TOKENS = 77  # SD's CLIP context and the length IF's pipeline pads T5 prompts to


class SharedModule:
    """A module held by reference, not as a submodule: outside ``parameters()``, ``state_dict()`` and ``.to()``
    of the holder; ``deepcopy`` keeps the reference (a copied student still shares the frozen text encoder)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __deepcopy__(self, memo: dict) -> SharedModule:
        return self


def uses_attention_mask(text_encoder: nn.Module) -> bool:
    """Whether the pipelines pass the attention mask: always for T5 (IF), else ``config.use_attention_mask``."""
    cfg = text_encoder.config
    return getattr(cfg, "model_type", "") in ("t5", "umt5") or bool(getattr(cfg, "use_attention_mask", False))


def prompt_max_length(tokenizer) -> int:
    """Tokens per prompt: the tokenizer's ``model_max_length``, at most 77 (IF pads T5 prompts to 77)."""
    n = int(getattr(tokenizer, "model_max_length", PROMPT_MAX_TOKENS) or PROMPT_MAX_TOKENS)
    return min(n, PROMPT_MAX_TOKENS)


class PromptEncoder(nn.Module):
    """Prompt table ``[P + 1]`` → text-encoder embeddings ``[B, L, D]`` (frozen, no grad, autocast off).

    Args:
        text_encoder: a frozen transformers text encoder (``CLIPTextModel``, ``T5EncoderModel``, ...).
        tokenizer: its tokenizer.
        prompts: the ``P`` prompts (indices ``0 … P−1``).
        negative_prompt: index ``P``: the ∅ of guidance (``""``: the empty prompt).
        cache_mb: precompute every embedding once when the table takes at most this many MB.
        clean_captions: the prompts were cleaned as DeepFloyd IF's pipeline does (recorded for the export, whose
            pipeline then cleans the prompts it is given; the prompts here are used as they are).

    Attributes:
        truncated: how many prompts were longer than ``max_length`` tokens and were cut.
    """

    def __init__(self, text_encoder: nn.Module, tokenizer, prompts: Sequence[str], negative_prompt: str = "",
                 cache_mb: float = 256.0, clean_captions: bool = False):
        super().__init__()
        self.clean_captions = bool(clean_captions)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.prompts = tuple(prompts)
        self.negative_prompt = str(negative_prompt)
        self.max_length = prompt_max_length(tokenizer)
        self.use_attention_mask = uses_attention_mask(text_encoder)
        texts = [*self.prompts, self.negative_prompt]
        full = tokenizer(texts, truncation=False, add_special_tokens=True)["input_ids"]
        self.truncated = sum(len(ids) > self.max_length for ids in full[:-1])
        tok = tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True,
                        return_tensors="pt")
        self.register_buffer("input_ids", tok["input_ids"], persistent=False)  # [P+1, L]
        self.register_buffer("attention_mask", tok["attention_mask"], persistent=False)  # [P+1, L]
        self.cache_mb = float(cache_mb)
        self._cache: torch.Tensor | None = None  # [P+1, L, D] when small enough

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    @property
    def null_index(self) -> int:
        return len(self.prompts)

    def _encode(self, idx: torch.Tensor) -> torch.Tensor:
        ids = self.input_ids[idx]
        mask = self.attention_mask[idx] if self.use_attention_mask else None
        return self.text_encoder(ids, attention_mask=mask)[0]

    def _cache_fits(self) -> bool:
        cfg = self.text_encoder.config
        dim = int(getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", 0))
        item = next(self.text_encoder.parameters()).element_size()
        return self.input_ids.numel() * dim * item <= self.cache_mb * 2 ** 20

    @torch.no_grad()
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[B, L, D]`` of prompt indices ``idx [B]`` (``P``: the negative prompt)."""
        idx = idx.to(device=self.input_ids.device, dtype=torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) > self.null_index):
            raise ValueError(f"prompt index out of range [0, {self.null_index}]: {idx.tolist()}")
        with torch.autocast(device_type=idx.device.type, enabled=False):
            if self._cache is None and self._cache_fits():
                every = torch.arange(self.null_index + 1, device=idx.device)
                self._cache = torch.cat([self._encode(chunk) for chunk in every.split(64)])
            if self._cache is not None:
                if self._cache.device != idx.device:
                    self._cache = self._cache.to(idx.device)
                return self._cache[idx]
            unique, inverse = idx.unique(return_inverse=True)  # each prompt of the batch encoded once
            return self._encode(unique)[inverse]

    def _apply(self, fn, recurse: bool = True):
        self._cache = None  # dtype/device changes: recompute on the next call
        return super()._apply(fn, recurse)


class TextUNetDenoiser(nn.Module):
    """A diffusers ``UNet2DConditionModel`` as ``net(x [B,C,H,W], t [B] float, prompt_index [B])``.

    Outputs with twice the input channels (IF's ``variance_type=learned_range``) are cut to their first half.

    Args:
        unet: the UNet.
        prompts: the :class:`PromptEncoder` (a submodule here; shared by reference with ``share_prompts``).
        share_prompts: hold ``prompts`` through :class:`SharedModule` (a student copied from a teacher).
    """

    class_conditional = True  # the condition is a prompt index; BOOT's loop draws it like a class

    def __init__(self, unet: nn.Module, prompts: PromptEncoder, share_prompts: bool = False):
        super().__init__()
        self.unet = unet
        if share_prompts:
            self._shared_prompts: SharedModule | None = SharedModule(prompts)
        else:
            self._shared_prompts = None
            self.prompt_encoder = prompts

    @property
    def prompts(self) -> PromptEncoder:
        return self._shared_prompts.module if self._shared_prompts is not None else self.prompt_encoder

    def student_copy(self) -> TextUNetDenoiser:
        """A trainable copy of the UNet that shares this frozen prompt encoder."""
        return TextUNetDenoiser(copy.deepcopy(self.unet), self.prompts, share_prompts=True)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if class_labels is None:
            raise ValueError("prompt indices [B] are required: the UNet is text-conditional")
        t = as_timesteps(t, x.shape[0], x.device)
        dtype = self.unet.dtype
        emb = self.prompts(class_labels).to(device=x.device, dtype=dtype)
        out = self.unet(x.to(dtype), t, encoder_hidden_states=emb).sample
        if out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]
        return out.to(x.dtype)


class LatentDecoder(nn.Module):
    """Latents ``[B, c, h, w]`` → images ``[B, 3, H, W]`` in about [-1, 1] with a diffusers ``AutoencoderKL``.

    ``vae.decode(z / scaling_factor + shift_factor)``, as the SD pipelines decode; float32, no grad, in chunks.
    """

    def __init__(self, vae: nn.Module, chunk: int = 16):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.chunk = int(chunk)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @torch.no_grad()
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        param = next(self.vae.parameters())
        with torch.autocast(device_type=param.device.type, enabled=False):
            out = [self.vae.decode((c / self.scaling_factor + self.shift_factor).to(param)).sample.float().to(z.device)
                   for c in z.split(self.chunk)]
        return torch.cat(out) if out else z.new_zeros(0, 3, *z.shape[2:])
