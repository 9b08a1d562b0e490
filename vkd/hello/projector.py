"""The HeLlO label projector: CLIP image encoder + text-initialised linear head + LoRA (peft).

``f(x) = s · normalize(E_I(x)) · W`` where ``W = [v_T(0), …, v_T(C−1)]`` are the L2-normalised text
embeddings of the class prompts and ``s = exp(logit_scale)`` of the checkpoint (hello.md §2). At
initialisation LoRA's B factors are zero, so the projector *is* CLIP zero-shot classification
(Proposition 1). LoRA (peft) adapts the encoder's Conv2d/Linear layers and the head with separate
ranks; only the low-rank factors train and are shipped — ``W`` is regenerated from the prompt template,
the class names and the frozen text encoder (hello.md §3).

We use peft (the maintained LoRA library, already a vkd dependency) rather than hand-rolled LoRA
layers: it provides Conv2d/Linear/MultiheadAttention LoRA, merge/unmerge and adapter state dicts.
peft does not manage BatchNorm, so :class:`Projector` keeps every ``_BatchNorm`` in eval mode.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from pathlib import Path
from typing import Any

import peft
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from vkd.data.digits import DIGIT_NAMES
from vkd.errors import ConfigError, DataError
from vkd.hello.config import HelloConfig, ProjectorConfig
from vkd.hello.data import LabelledImages, prompt_names, resize_images
from vkd.hello.printed_digits import render_printed_digits
from vkd.models.tiny_clip import ClipBundle, load_clip, preprocess_images, pretrain_tiny_clip, tiny_clip_name

__all__ = ["Projector", "build_projector", "clip_family", "image_lora_targets", "ZeroShot", "lora_config", "add_lora",
           "save_adapters", "load_adapters", "adapter_state_dict", "projector_bytes", "class_prompts", "build_clip",
           "build_clip_with_info", "tiny_clip_data", "tiny_clip_pretraining_set", "count_shared_images",
           "clip_report"]

_META_KEY = "vkd_hello_projector"
_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def class_prompts(template: str, class_names: tuple[str, ...] | list[str]) -> list[str]:
    """``template.format(name)`` for every class, in class-index order."""
    return [template.format(n) for n in class_names]


class Projector(nn.Module):
    """``forward(images [B, 3, H, W] in [0, 1]) -> logits [B, C]``.

    Attributes:
        visual: the CLIP image tower (frozen; LoRA is injected into it by :func:`add_lora`).
        head: ``nn.Linear(D, C, bias=False)`` whose weight rows are the normalised text embeddings.
        logit_scale: ``exp(logit_scale)`` of the CLIP checkpoint (buffer, frozen).
    """

    def __init__(self, visual: nn.Module, text_embeddings: torch.Tensor, logit_scale: float,
                 image_size: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        if text_embeddings.ndim != 2:
            raise ValueError(f"text_embeddings must be [C, D], got {tuple(text_embeddings.shape)}")
        self.visual = visual
        c, d = text_embeddings.shape
        self.head = nn.Linear(d, c, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(F.normalize(text_embeddings.float(), dim=-1))
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)), persistent=False)
        self.image_size = tuple(image_size)
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.requires_grad_(False)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings ``[B, D]`` of images in [0, 1]."""
        return F.normalize(self.encode(images), dim=-1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Raw (unnormalised) image embeddings ``E_I(x)`` ``[B, D]``."""
        return self.visual(preprocess_images(images, self.image_size, self.mean, self.std))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * self.head(self.features(images))

    def train(self, mode: bool = True) -> Projector:
        """Switch mode but keep BatchNorm (ResNet CLIPs) in eval: its statistics belong to CLIP."""
        super().train(mode)
        for m in self.modules():
            if isinstance(m, _BatchNorm):
                m.eval()
        return self

    @property
    def num_classes(self) -> int:
        return int(self.head.out_features)


class ZeroShot(nn.Module):
    """CLIP zero-shot classification through a LoRA-wrapped projector with its adapters disabled:
    ``s · normalize(E_I(x)) · W`` with the frozen encoder and the text-initialised head (Proposition 1).

    ``forward(images [B, 3, H, W] in [0, 1]) -> logits [B, C]``; shares the projector's weights (no copy).
    """

    def __init__(self, projector: nn.Module):
        super().__init__()
        self.projector = projector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.projector.disable_adapter():
            return self.projector(x)


def build_projector(clip: ClipBundle, class_names: tuple[str, ...] | list[str], template: str) -> Projector:
    """A projector on a private copy of ``clip``'s image tower, with ``W`` from the class prompts."""
    text = clip.encode_text(class_prompts(template, class_names), normalize=True)  # [C, D]
    visual = copy.deepcopy(clip.model.visual).eval()
    scale = float(clip.model.logit_scale.detach().exp())
    return Projector(visual, text.cpu(), scale, clip.image_size, clip.mean, clip.std).to(text.device)


def clip_family(projector: Projector) -> str:
    """The CLIP image tower's family, which decides the default LoRA targets: ``vit`` (open_clip
    ``VisionTransformer``: ``nn.MultiheadAttention`` blocks), ``resnet`` (``ModifiedResNet``), ``timm`` (a timm trunk,
    ``TimmModel``) or ``other``."""
    name = type(projector.visual).__name__
    return {"VisionTransformer": "vit", "ModifiedResNet": "resnet", "TimmModel": "timm"}.get(name, "other")


def image_lora_targets(projector: Projector, patterns: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Full module names (``visual.…``) of the encoder layers that get LoRA.

    Default (no patterns), per CLIP architecture (:func:`clip_family`):

    * ``vit``: the patch-embedding conv, every attention block (``nn.MultiheadAttention``: peft adapts its packed
      q/k/v input projection and its output projection) and every MLP ``Linear``;
    * ``resnet``: every ``Conv2d`` outside the attention pool (its projections stay frozen);
    * ``timm`` / ``other``: every ``Conv2d`` and ``Linear`` except those inside ``nn.MultiheadAttention`` (a lone
      ``out_proj`` would be bypassed by the attention's fused forward) and the attention pool.

    With patterns: modules whose name (relative to ``visual``) matches any regex (``re.search``);
    ``nn.MultiheadAttention`` modules may be matched explicitly.
    """
    mha = {name for name, m in projector.visual.named_modules() if isinstance(m, nn.MultiheadAttention)}
    mha_children = {f"{name}.{child}" for name in mha
                    for child, _ in projector.visual.get_submodule(name).named_children()}
    family = clip_family(projector)
    names = []
    for name, m in projector.visual.named_modules():
        if not name or name in mha_children:
            continue
        if patterns:
            ok = isinstance(m, (nn.Conv2d, nn.Linear, nn.MultiheadAttention)) and any(re.search(p, name) for p in patterns)
        elif family == "vit":
            ok = name in mha or (isinstance(m, nn.Linear) and ".mlp." in f".{name}") or \
                (isinstance(m, nn.Conv2d) and name == "conv1")
        elif family == "resnet":
            ok = isinstance(m, nn.Conv2d) and "attnpool" not in name
        else:
            ok = isinstance(m, (nn.Conv2d, nn.Linear)) and "attnpool" not in name
        if ok:
            names.append(f"visual.{name}")
    return names


def lora_config(projector: Projector, cfg: ProjectorConfig) -> dict[str, Any]:
    """The ``peft.LoraConfig`` keyword arguments for ``cfg`` (JSON-serialisable, stored with the adapters)."""
    image = image_lora_targets(projector, cfg.image_targets) if cfg.rank_image > 0 else []
    if cfg.rank_image > 0 and not image:
        raise DataError(f"projector.image_targets {cfg.image_targets} match no Conv2d/Linear of the image encoder")
    targets = image + (["head"] if cfg.rank_head > 0 else [])
    alpha_image = cfg.lora_alpha_image or cfg.rank_image
    alpha_head = cfg.lora_alpha_head or cfg.rank_head
    base_r = cfg.rank_image if cfg.rank_image > 0 else cfg.rank_head
    base_alpha = alpha_image if cfg.rank_image > 0 else alpha_head
    kwargs: dict[str, Any] = {"r": base_r, "lora_alpha": base_alpha, "lora_dropout": cfg.lora_dropout,
                              "target_modules": targets, "bias": "none"}
    if cfg.rank_head > 0 and cfg.rank_image > 0:
        kwargs["rank_pattern"] = {"head": cfg.rank_head}
        kwargs["alpha_pattern"] = {"head": alpha_head}
    return kwargs


def add_lora(projector: Projector, kwargs: dict[str, Any]) -> nn.Module:
    """Wrap ``projector`` with peft LoRA (``kwargs`` from :func:`lora_config`); only the factors train."""

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that a plain nn.Module has no HF config
        model = get_peft_model(projector, LoraConfig(**kwargs))
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA factors only (``peft.get_peft_model_state_dict``), on CPU."""

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def projector_bytes(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Parameter count and bytes (at the tensors' dtype) of an adapter state dict."""
    params = sum(int(v.numel()) for v in state.values())
    return {"params": params, "bytes": sum(int(v.numel()) * v.element_size() for v in state.values())}


def save_adapters(model: nn.Module, path: str | Path, meta: dict[str, Any], dtype: str = "fp16") -> dict[str, int]:
    """Write the LoRA factors as one safetensors file with everything needed to rebuild the projector.

    Args:
        model: the peft-wrapped projector.
        path: output ``.safetensors``.
        meta: ``clip_model``, ``clip_pretrained``, ``prompt_template``, ``class_names``, ``lora`` (the
            :func:`lora_config` kwargs); ``peft_version`` and ``dtype`` are added.
        dtype: ``fp16`` or ``fp32`` storage.

    Returns:
        ``{"params", "bytes"}`` of the stored tensors (the file adds a small JSON header).
    """

    state = {k: v.to(_DTYPES[dtype]) for k, v in adapter_state_dict(model).items()}
    full = {**meta, "peft_version": peft.__version__, "dtype": dtype}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={_META_KEY: json.dumps(full)})
    return projector_bytes(state)


def read_adapter_meta(path: str | Path) -> dict[str, Any]:
    """The JSON metadata stored in an adapter file."""

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get(_META_KEY)
    except Exception as err:
        raise DataError(f"cannot read projector adapters {path}: {type(err).__name__}") from None
    if meta is None:
        raise DataError(f"{path} is not a vkd HeLlO projector adapter file (no '{_META_KEY}' metadata)")
    return json.loads(meta)


def load_adapters(path: str | Path, clip: ClipBundle | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the projector from an adapter file: CLIP → regenerate W → peft LoRA → load the factors.

    Args:
        path: the ``.safetensors`` written by :func:`save_adapters`.
        clip: the base CLIP (default: ``load_clip(meta["clip_model"], meta["clip_pretrained"])``).
        device: where to put the projector.

    Returns:
        The peft-wrapped projector in eval mode, factors in float32.
    """

    path = Path(path)
    if not path.is_file():
        raise DataError(f"projector adapter file not found: {path}")
    meta = read_adapter_meta(path)
    if clip is None:
        clip = load_clip(meta["clip_model"], meta.get("clip_pretrained") or None, device=device)
    projector = build_projector(clip, meta["class_names"], meta["prompt_template"])
    model = add_lora(projector, meta["lora"])
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise DataError(f"{path} does not match the rebuilt projector (unexpected keys {unexpected[:3]})")
    return model.to(device).eval()


def tiny_clip_data(cfg: HelloConfig, train: LabelledImages) -> str:
    """What the tiny CLIP is pretrained on: ``clip.tiny_data`` with ``auto`` resolved (``printed_digits`` on the
    embedded digits, ``train`` otherwise).

    Raises:
        ConfigError: ``printed_digits`` for a dataset whose classes are not the ten digits ``zero`` … ``nine``.
    """
    choice = cfg.clip.tiny_data
    if choice == "auto":
        choice = "printed_digits" if cfg.data.source == "digits" else "train"
    if choice == "printed_digits" and prompt_names(train.class_names) != list(DIGIT_NAMES):
        raise ConfigError("clip.tiny_data=printed_digits renders the digits zero … nine, but the dataset's classes are "
                          f"{prompt_names(train.class_names)[:4]}...; use clip.tiny_data=train")
    return choice


def tiny_clip_pretraining_set(cfg: HelloConfig, train: LabelledImages) -> tuple[torch.Tensor, list[str], dict[str, Any]]:
    """The tiny CLIP's image–caption pairs and a description of them (recorded in ``hello.json``).

    Returns:
        ``(images [N, 3, t, t] float in [0, 1], N captions, info)``; ``t = clip.tiny.image_size``, captions
        ``clip.prompt_template`` with the class name of each image; ``info``: ``source``, ``num_images``, the
        fonts of ``printed_digits``, and ``target_train_images_seen`` (how many of the task's training images are
        among the pretraining images, compared after 8-bit quantisation).
    """
    tiny = cfg.clip.tiny
    source = tiny_clip_data(cfg, train)
    info: dict[str, Any] = {"source": source}
    if source == "printed_digits":
        printed = render_printed_digits(per_font=cfg.clip.printed_per_font, size=tiny.image_size, seed=tiny.seed)
        images, labels, names = printed.images, printed.labels, list(DIGIT_NAMES)
        info["fonts"] = list(printed.font_names)
        info["copies_per_font"] = cfg.clip.printed_per_font
    else:
        names = prompt_names(train.class_names)
        if train.streamed:  # decoded per batch and shrunk at once: the tiny CLIP's 3·t² floats per image stay in RAM
            images, labels = train.resized(tiny.image_size)
        else:
            images, labels = resize_images(train.float_images(), tiny.image_size), train.labels
    captions = [cfg.clip.prompt_template.format(names[int(c)]) for c in labels]
    info["num_images"] = int(images.shape[0])
    if source == "train":
        info["target_train_images_seen"] = int(images.shape[0])
    else:  # measured, not assumed: the task's training images at the CLIP's resolution against the pretraining set
        target = train.resized(tiny.image_size)[0] if train.streamed else \
            resize_images(train.float_images(), tiny.image_size)
        info["target_train_images_seen"] = count_shared_images(target, images)
    return images, captions, info


def count_shared_images(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many images of ``a`` (``[N, 3, H, W]`` in [0, 1]) also occur in ``b`` (``[M, 3, H, W]``), compared after
    quantisation to 8 bits; 0 when their shapes differ."""
    if a.shape[1:] != b.shape[1:]:
        return 0

    def keys(x: torch.Tensor) -> list[bytes]:
        q = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).flatten(1).cpu().numpy()
        return [row.tobytes() for row in q]

    seen = set(keys(b))
    return sum(k in seen for k in keys(a))


def build_clip(cfg: HelloConfig, train: LabelledImages, device: str | torch.device = "cpu",
               progress: bool = True) -> ClipBundle:
    """The CLIP of the projector: vkd's tiny CLIP, pretrained once and cached, or any open_clip model.

    The tiny CLIP plays the public foundation model of the toy setting. On the embedded digits it is pretrained on
    printed digits rendered from fonts (``clip.tiny_data``, :func:`tiny_clip_pretraining_set`), never on the target
    task's images; on other data, on the training split with the class prompts as captions (never on the test split).
    """
    return build_clip_with_info(cfg, train, device, progress)[0]


def build_clip_with_info(cfg: HelloConfig, train: LabelledImages, device: str | torch.device = "cpu",
                         progress: bool = True) -> tuple[ClipBundle, dict[str, Any]]:
    """:func:`build_clip` and what the CLIP is: :func:`clip_report` plus, for the tiny CLIP, ``pretraining`` (the
    :func:`tiny_clip_pretraining_set` description, its cache directory and the recipe's own record)."""
    if cfg.clip.model_name != "tiny":
        clip = load_clip(cfg.clip.model_name, cfg.clip.pretrained or None, device=device)
        return clip, clip_report(clip)
    images, captions, info = tiny_clip_pretraining_set(cfg, train)
    path = pretrain_tiny_clip(images, captions, cfg.clip.tiny, cache_dir=cfg.clip.cache_dir or None,
                              progress=progress)
    clip = load_clip(tiny_clip_name(path), device=device)
    record = path / "vkd_tiny_clip.json"
    if record.is_file():
        saved = json.loads(record.read_text())
        # zero-shot accuracy on its own pretraining pairs (printed digits: not the target task), and its training time
        info.update({"pretraining_zero_shot_accuracy": saved.get("train_zero_shot_accuracy"),
                     "train_seconds": saved.get("train_seconds")})
    return clip, {**clip_report(clip), "pretraining": {**info, "cache_dir": str(path)}}


def clip_report(clip: ClipBundle) -> dict[str, Any]:
    """The base CLIP's size, which is public (shipped or downloadable) and not part of the stored labels:
    parameters of the image tower and in all, and their bytes at the checkpoint's dtypes."""
    visual = sum(int(p.numel()) for p in clip.model.visual.parameters())
    params = sum(int(p.numel()) for p in clip.model.parameters())
    size = sum(int(p.numel()) * p.element_size() for p in clip.model.parameters())
    return {"model": clip.model_name, "pretrained": clip.pretrained or "", "image_params": visual, "params": params,
            "bytes": size}
