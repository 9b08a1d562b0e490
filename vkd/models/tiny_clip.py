"""A tiny open_clip CLIP, pretrained contrastively by vkd, and one loader for any open_clip model.

Randomly initialised CLIP features collapse (mean pairwise cosine ≈ 0.995 on digits), so the
embedded defaults of HeLlO and Feature 3DGS cannot use a random CLIP. Instead vkd builds a small
open_clip ``CLIP`` from a custom model config (a tiny ViT + a tiny text transformer that uses
open_clip's own BPE tokenizer), pretrains it on (image, caption) pairs with a multi-positive
InfoNCE loss, and saves it in open_clip's ``local-dir:`` layout (``open_clip_config.json`` +
``open_clip_model.safetensors``). It is then loaded through ``open_clip.create_model`` exactly like
a hub model, so real use only swaps the model name and the ``pretrained`` tag::

    path = pretrain_tiny_clip(images, captions, TinyClipConfig())     # cached by content hash
    clip = load_clip(tiny_clip_name(path))                            # "local-dir:<path>"
    clip = load_clip("ViT-B-32", "openai")                            # real use, same API

Trained weights are cached under ``<cache>/tiny_clip/<hash>/`` where the hash covers the training
images, captions, config and this module's recipe version, so a run never retrains needlessly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from vkd.cache import build_lock, build_once, training_mode
from vkd.cache import cache_dir as vkd_cache_dir
from vkd.errors import ConfigError, DataError, UserError

__all__ = [
    "TinyClipConfig",
    "ClipBundle",
    "tiny_clip_model_cfg",
    "build_tiny_clip",
    "pretrain_tiny_clip",
    "tiny_clip_name",
    "load_clip",
    "encode_text",
    "encode_images",
    "multi_positive_clip_loss",
    "default_cache_dir",
    "preprocess_images",
]

# Bump when the pretraining recipe changes so stale caches are not reused.
_RECIPE_VERSION = 1
_CONFIG_FILE = "open_clip_config.json"
_WEIGHTS_FILE = "open_clip_model.safetensors"
_INFO_FILE = "vkd_tiny_clip.json"


@dataclass
class TinyClipConfig:
    """Architecture and pretraining recipe of the tiny CLIP.

    The architecture fields map one-to-one onto open_clip's ``CLIPVisionCfg`` / ``CLIPTextCfg``.
    ``pool_type="tok"`` is the standard CLS pooling (as in OpenAI/LAION ViTs, so MaskCLIP code
    written for them applies unchanged); ``"avg"`` pools the patch tokens, which makes per-patch
    features live in the same space as the global embedding.
    """

    # vision tower (ViT)
    image_size: int = 32
    patch_size: int = 4
    width: int = 64
    layers: int = 3
    heads: int = 2
    mlp_ratio: float = 2.0
    pool_type: Literal["tok", "avg"] = "tok"
    # text tower (open_clip SimpleTokenizer, vocabulary 49408)
    embed_dim: int = 64
    text_width: int = 64
    text_layers: int = 1
    text_heads: int = 2
    context_length: int = 16
    # preprocessing: images are given in [0, 1] and normalised with mean/std inside the bundle
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # pretraining (AdamW + cosine, multi-positive InfoNCE)
    steps: int = 300
    batch_size: int = 128
    lr: float = 5e-4  # higher rates (1e-3+) collapse the text tower on 10 near-identical captions
    weight_decay: float = 0.05
    warmup_steps: int = 30
    crop_scale_min: float = 0.5  # RandomResizedCrop scale range (crop_scale_min, 1); 1 disables crops
    hflip: bool = False
    # The 49408 × text_width token table is most of the model; its AdamW update cost ~30 % of a CPU step
    # (measured). Frozen at its random init, the text transformer on top still separates the prompts.
    train_token_embedding: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "width", "layers", "heads", "embed_dim", "text_width",
                     "text_layers", "text_heads", "context_length", "steps", "batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"TinyClipConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"TinyClipConfig.image_size ({self.image_size}) must be a multiple of "
                              f"patch_size ({self.patch_size})")
        if self.width % self.heads or self.text_width % self.text_heads:
            raise ConfigError("TinyClipConfig: width/text_width must be divisible by heads/text_heads")
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ConfigError(f"TinyClipConfig.crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ConfigError("TinyClipConfig: lr must be > 0, weight_decay and warmup_steps >= 0")
        if self.context_length < 4:
            raise ConfigError(f"TinyClipConfig.context_length must be >= 4, got {self.context_length}")


def tiny_clip_model_cfg(cfg: TinyClipConfig) -> dict[str, Any]:
    """The open_clip model config (the ``model_cfg`` of ``open_clip_config.json``) of ``cfg``."""
    return {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {
            "image_size": cfg.image_size,
            "layers": cfg.layers,
            "width": cfg.width,
            "head_width": cfg.width // cfg.heads,
            "mlp_ratio": cfg.mlp_ratio,
            "patch_size": cfg.patch_size,
            "pool_type": cfg.pool_type,
        },
        "text_cfg": {
            "context_length": cfg.context_length,
            "vocab_size": 49408,
            "width": cfg.text_width,
            "heads": cfg.text_heads,
            "layers": cfg.text_layers,
        },
    }


def _preprocess_cfg(cfg: TinyClipConfig) -> dict[str, Any]:
    return {"size": cfg.image_size, "mean": list(cfg.mean), "std": list(cfg.std),
            "interpolation": "bilinear", "resize_mode": "shortest"}


def build_tiny_clip(cfg: TinyClipConfig) -> nn.Module:
    """A randomly initialised open_clip ``CLIP`` with the tiny config (eval mode, CPU)."""
    import open_clip  # on use: open_clip (with transformers, torchvision) takes seconds to import
    from open_clip.model import set_model_preprocess_cfg

    torch.manual_seed(cfg.seed)
    model = open_clip.CLIP(**tiny_clip_model_cfg(cfg))
    set_model_preprocess_cfg(model, _preprocess_cfg(cfg))
    return model.eval()


def default_cache_dir() -> Path:
    """The vkd cache root (:func:`vkd.cache.cache_dir`)."""
    return vkd_cache_dir()


def tiny_clip_name(path: str | Path) -> str:
    """The open_clip model name of a saved tiny CLIP directory: ``local-dir:<abs path>``."""
    return "local-dir:" + str(Path(path).resolve())


# ----------------------------------------------------------------------------------------------
# Loading any open_clip model
# ----------------------------------------------------------------------------------------------


@dataclass
class ClipBundle:
    """An open_clip model with its tokenizer and preprocessing.

    Attributes:
        model: the open_clip ``CLIP`` (eval mode).
        tokenizer: ``tokenizer(list[str]) -> LongTensor [K, context_length]``.
        mean, std: per-channel normalisation applied to images in [0, 1].
        image_size: (H, W) the image tower expects.
        model_name, pretrained: what was loaded (recorded in artefacts so they can be rebuilt).
    """

    model: nn.Module
    tokenizer: Any
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: tuple[int, int]
    model_name: str
    pretrained: str | None

    @property
    def embed_dim(self) -> int:
        """Dimension D of the joint embedding space."""
        return int(self.encode_text(["a"]).shape[-1])

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize ``[B, 3, H, W]`` images in [0, 1] to ``image_size`` and normalise them."""
        return preprocess_images(images, self.image_size, self.mean, self.std)

    def encode_images(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] → ``[B, D]`` (L2-normalised when ``normalize``)."""
        return encode_images(self.model, images, self.image_size, self.mean, self.std, normalize=normalize)

    def encode_text(self, prompts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        """Prompts → ``[K, D]`` text embeddings (L2-normalised when ``normalize``), no grad."""
        return encode_text(self.model, self.tokenizer, prompts, normalize=normalize)


def preprocess_images(images: torch.Tensor, image_size: tuple[int, int], mean: Sequence[float],
                      std: Sequence[float]) -> torch.Tensor:
    """Differentiable CLIP preprocessing of images in [0, 1].

    Args:
        images: ``[B, 3, H, W]`` in [0, 1].
        image_size: target ``(H', W')``; bilinear (antialiased when shrinking) resize if it differs.
        mean, std: per-channel normalisation.

    Returns:
        ``[B, 3, H', W']`` normalised tensor.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    if tuple(images.shape[-2:]) != tuple(image_size):
        shrink = images.shape[-2] > image_size[0] or images.shape[-1] > image_size[1]
        images = F.interpolate(images, size=tuple(image_size), mode="bilinear", align_corners=False,
                               antialias=shrink)
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def encode_images(model: nn.Module, images: torch.Tensor, image_size: tuple[int, int], mean: Sequence[float],
                  std: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """``model.encode_image`` on images in [0, 1] (``[B, 3, H, W]``) → ``[B, D]``; keeps grad."""
    return model.encode_image(preprocess_images(images, image_size, mean, std), normalize=normalize)


@torch.no_grad()
def encode_text(model: nn.Module, tokenizer: Any, prompts: Sequence[str], normalize: bool = True) -> torch.Tensor:
    """Encode prompts with the model's text tower.

    Args:
        model: an open_clip model.
        tokenizer: its tokenizer (``open_clip.get_tokenizer``).
        prompts: K strings.
        normalize: L2-normalise each embedding.

    Returns:
        ``[K, D]`` float tensor on the model's device.
    """
    if isinstance(prompts, str):
        raise ValueError("prompts must be a sequence of strings, not a single string")
    device = next(model.parameters()).device
    tokens = tokenizer(list(prompts)).to(device)
    return model.encode_text(tokens, normalize=normalize).float()


def load_clip(model_name: str, pretrained: str | None = None, device: str | torch.device = "cpu") -> ClipBundle:
    """Load any open_clip model (hub tag, local file, or a vkd tiny CLIP directory) with its tokenizer.

    Args:
        model_name: an open_clip name (``"ViT-B-32"``, ``"RN50"``), ``"hf-hub:org/repo"``, or
            ``"local-dir:<dir>"`` (what :func:`tiny_clip_name` returns). A bare path to a saved tiny
            CLIP directory is accepted too.
        pretrained: a pretrained tag (``"openai"``, ``"laion2b_s34b_b79k"``) or a weights file; ignored
            for ``local-dir:`` / ``hf-hub:`` names. ``None`` means random weights (with a warning from
            open_clip).
        device: where to put the model.

    Returns:
        :class:`ClipBundle` with the model in eval mode.

    Raises:
        UserError: the model or its weights cannot be loaded (e.g. offline and not cached).
    """
    import open_clip  # on use, as in build_tiny_clip
    from open_clip.model import get_model_preprocess_cfg

    if not model_name.startswith(("local-dir:", "hf-hub:")) and (Path(model_name) / _CONFIG_FILE).is_file():
        model_name = tiny_clip_name(model_name)
    try:
        model = open_clip.create_model(model_name, pretrained=pretrained or None, device=device)
        tokenizer = open_clip.get_tokenizer(model_name)
    except (RuntimeError, FileNotFoundError, ValueError, OSError, EOFError, pickle.UnpicklingError) as err:
        # UnpicklingError: open_clip reads weights with torch.load(weights_only=True), which refuses any pickle
        # beyond tensors and plain containers (a malicious or foreign file)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load open_clip model '{model_name}' (pretrained={pretrained!r}): {first[:300]}; "
                        "weights must be cached locally when offline") from None
    model.eval()
    pp = get_model_preprocess_cfg(model)
    size = pp.get("size", getattr(model.visual, "image_size", 224))
    size = (size, size) if isinstance(size, int) else tuple(size)
    return ClipBundle(model=model, tokenizer=tokenizer, mean=tuple(pp["mean"]), std=tuple(pp["std"]),
                      image_size=(int(size[0]), int(size[1])), model_name=model_name, pretrained=pretrained)


# ----------------------------------------------------------------------------------------------
# Contrastive pretraining
# ----------------------------------------------------------------------------------------------


def multi_positive_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                             caption_ids: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where every image whose caption matches counts as a positive.

    open_clip's ``ClipLoss`` assumes the i-th image matches only the i-th text. With class-prompt
    captions a batch holds many images per caption, so ``ClipLoss`` would push same-class pairs
    apart; here each unique caption is encoded once and all its images are positives.

    Args:
        image_features: ``[B, D]`` L2-normalised.
        text_features: ``[U, D]`` L2-normalised embeddings of the batch's unique captions.
        caption_ids: ``[B]`` index into ``text_features`` of each image's caption.
        logit_scale: scalar log temperature (``exp`` is applied here).

    Returns:
        scalar loss: mean of image→text CE and text→image multi-positive CE.
    """
    logits = logit_scale.exp() * image_features @ text_features.T  # [B, U]
    loss_i2t = F.cross_entropy(logits, caption_ids)
    pos = F.one_hot(caption_ids, text_features.shape[0]).T.to(logits.dtype)  # [U, B]
    target = pos / pos.sum(dim=1, keepdim=True)
    loss_t2i = -(target * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return 0.5 * (loss_i2t + loss_t2i)


def _cache_key(images: torch.Tensor, captions: Sequence[str], cfg: TinyClipConfig) -> str:
    import open_clip  # on use, as in build_tiny_clip

    h = hashlib.sha256()
    h.update(f"vkd-tiny-clip-v{_RECIPE_VERSION}-open_clip-{open_clip.__version__}".encode())
    h.update(json.dumps(asdict(cfg), sort_keys=True).encode())
    h.update(str(tuple(images.shape)).encode())
    h.update(images.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    h.update("\n".join(captions).encode())
    return h.hexdigest()[:20]


def pretrain_tiny_clip(images: torch.Tensor, captions: Sequence[str], cfg: TinyClipConfig | None = None,
                       cache_dir: str | Path | None = None, force: bool = False, progress: bool = True,
                       device: str | torch.device = "cpu") -> Path:
    """Pretrain (or fetch from cache) a tiny CLIP on image–caption pairs.

    Args:
        images: ``[N, 3, H, W]`` float in [0, 1]; resized to ``cfg.image_size`` if needed.
        captions: N strings (e.g. ``"a photo of the digit three."``); identical captions are treated
            as positives of each other.
        cfg: architecture + recipe (defaults: :class:`TinyClipConfig`).
        cache_dir: cache root (default :func:`default_cache_dir`); weights go to
            ``<cache_dir>/tiny_clip/<hash>/``.
        force: retrain even when the cache has the result.
        progress: show a tqdm bar.
        device: training device.

    Returns:
        The directory holding ``open_clip_config.json``, ``open_clip_model.safetensors`` and
        ``vkd_tiny_clip.json`` (recipe, final loss, zero-shot accuracy on the training captions).
        Load it with ``load_clip(tiny_clip_name(path))``.
    """
    cfg = cfg or TinyClipConfig()
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
    if len(captions) != images.shape[0]:
        raise DataError(f"tiny CLIP pretraining got {images.shape[0]} images but {len(captions)} captions")
    if images.shape[0] < 2:
        raise DataError("tiny CLIP pretraining needs at least 2 images")
    captions = [str(c) for c in captions]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = root / "tiny_clip" / _cache_key(images, captions, cfg)

    def ready() -> bool:
        return (out / _WEIGHTS_FILE).is_file() and (out / _CONFIG_FILE).is_file()

    def build() -> None:
        _pretrain(images, captions, cfg, out, progress, device)

    if force:
        with build_lock(out), training_mode():
            build()
    else:  # trains with gradients even under the caller's no_grad; one process builds, others wait and reuse
        build_once(out, ready, build)
    return out


def _pretrain(images: torch.Tensor, captions: list[str], cfg: TinyClipConfig, out: Path, progress: bool,
              device: str | torch.device) -> None:
    """Train the tiny CLIP and write it to ``out`` (temporary directory, then rename)."""

    gen = torch.Generator().manual_seed(cfg.seed)
    model = build_tiny_clip(cfg).to(device).train()
    import open_clip

    tokenizer = open_clip.get_tokenizer("", context_length=cfg.context_length)
    unique = sorted(set(captions))
    cap_index = {c: i for i, c in enumerate(unique)}
    cap_ids = torch.tensor([cap_index[c] for c in captions])
    all_tokens = tokenizer(unique)  # [U, L]
    x_all = images.detach().float().cpu().clone()  # a clone is a normal tensor even if made in inference mode
    if tuple(x_all.shape[-2:]) != (cfg.image_size, cfg.image_size):
        x_all = F.interpolate(x_all, size=(cfg.image_size, cfg.image_size), mode="bilinear",
                              align_corners=False, antialias=x_all.shape[-1] > cfg.image_size).clamp(0, 1)

    if not cfg.train_token_embedding:
        model.token_embedding.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    n = x_all.shape[0]
    bs = min(cfg.batch_size, n)
    t0 = time.perf_counter()
    losses: list[float] = []
    perm = torch.randperm(n, generator=gen)
    cursor = 0
    bar = tqdm(range(cfg.steps), desc="tiny CLIP pretrain", disable=not progress or None, leave=False)
    for _ in bar:
        if cursor + bs > n:
            perm, cursor = torch.randperm(n, generator=gen), 0
        idx = perm[cursor:cursor + bs]
        cursor += bs
        x = _random_resized_crop(x_all[idx], cfg.crop_scale_min, cfg.hflip, gen).to(device)
        ids = cap_ids[idx]
        present, local = torch.unique(ids, return_inverse=True)
        img = model.encode_image(preprocess_images(x, (cfg.image_size, cfg.image_size), cfg.mean, cfg.std),
                                 normalize=True)
        txt = model.encode_text(all_tokens[present].to(device), normalize=True)
        loss = multi_positive_clip_loss(img, txt, local.to(device), model.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():  # as in CLIP: clamp the temperature to at most 100
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if progress:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()

    # zero-shot accuracy on the (clean) training pairs, as a sanity number recorded with the weights
    with torch.no_grad():
        txt = model.encode_text(all_tokens.to(device), normalize=True)
        correct = 0
        for s in range(0, n, 512):
            img = model.encode_image(preprocess_images(x_all[s:s + 512].to(device), (cfg.image_size,) * 2,
                                                       cfg.mean, cfg.std), normalize=True)
            correct += int(((img @ txt.T).argmax(1).cpu() == cap_ids[s:s + 512]).sum())
    info = {
        "recipe_version": _RECIPE_VERSION,
        "config": asdict(cfg),
        "num_images": n,
        "num_unique_captions": len(unique),
        "final_loss": sum(losses[-10:]) / len(losses[-10:]),
        "train_zero_shot_accuracy": correct / n,
        "train_seconds": time.perf_counter() - t0,
        "logit_scale": model.logit_scale.detach().exp().item(),
    }
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / _WEIGHTS_FILE))
    (tmp / _CONFIG_FILE).write_text(json.dumps({"model_cfg": tiny_clip_model_cfg(cfg),
                                                "preprocess_cfg": _preprocess_cfg(cfg)}, indent=2))
    (tmp / _INFO_FILE).write_text(json.dumps(info, indent=2))
    if out.exists():  # forced retrain (the build lock is held): replace the old result
        shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _random_resized_crop(x: torch.Tensor, scale_min: float, hflip: bool, gen: torch.Generator) -> torch.Tensor:
    """Per-sample square RandomResizedCrop (scale in [scale_min, 1]) + optional flip, via affine grids."""
    if scale_min >= 1.0 and not hflip:
        return x
    b = x.shape[0]
    scale = scale_min + (1 - scale_min) * torch.rand(b, generator=gen)
    side = scale.sqrt()  # crop side relative to the image
    cx = (torch.rand(b, generator=gen) * 2 - 1) * (1 - side)
    cy = (torch.rand(b, generator=gen) * 2 - 1) * (1 - side)
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0) if hflip else torch.ones(b)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = side * flip
    theta[:, 1, 1] = side
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
