"""CLIP score of text-to-image samples: an open_clip model from local weights, open_clip's own evaluation transform.

Images are scored exactly as open_clip prepares them for its evaluation (``image_transform_v2(preprocess_cfg,
is_train=False)``: bicubic resize of the shorter side, centre crop, mean/std; on PIL images made from the uint8
samples) against their prompts (open_clip's tokenizer). The score itself is :func:`vkd.metrics.scores.clip_score`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from PIL import Image

from vkd.errors import DataError, UserError
from vkd.metrics.extractors import file_sha256

__all__ = ["CLIP_SCORE_DEFAULT_MODEL", "ClipScorer", "read_prompts"]

# OpenAI ViT-L/14 (torchmetrics' CLIPScore default); OpenAI's weights need QuickGELU, which open_clip's config names
CLIP_SCORE_DEFAULT_MODEL = "ViT-L-14-quickgelu"
_OPENAI_VIT_L14 = ("https://openaipublic.azureedge.net/clip/models/"
                   "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt")


class ClipScorer:
    """Per-image cosine between the CLIP embeddings of an image and of its prompt.

    Args:
        model_name: an open_clip architecture (``ViT-L-14-quickgelu`` for OpenAI's ``ViT-L-14.pt``, ``ViT-L-14`` for
            LAION weights, ...), a model-config ``.json`` file (its stem becomes the name), ``local-dir:DIR`` or a
            folder with ``open_clip_config.json`` (weights inside), or ``hf-hub:org/repo`` (Hugging Face cache only).
        weights: the local weights file of an architecture: an OpenAI TorchScript ``.pt`` (its tensors are read
            through ``torch.jit.load``, as torch-fidelity reads them), or an open_clip ``.bin`` / ``.pt`` /
            ``.safetensors`` (read by open_clip with ``weights_only=True``).
        device: where the model runs.
    """

    def __init__(self, model_name: str = CLIP_SCORE_DEFAULT_MODEL, weights: str | None = None,
                 device: str | torch.device = "cpu"):
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2

        from vkd.metrics.extractors import _clip_state_dict
        from vkd.models.tiny_clip import load_clip

        config_file = Path(model_name).expanduser()
        if config_file.suffix == ".json" and config_file.is_file():
            open_clip.add_model_config(config_file)
            model_name = config_file.stem
        is_dir = model_name.startswith(("local-dir:", "hf-hub:")) or Path(model_name).is_dir()
        weights_file = Path(weights).expanduser() if weights else None
        if not is_dir:
            if weights_file is None:
                raise UserError(f"CLIP score with open_clip '{model_name}' needs its weights file: pass "
                                f"--clip-weights PATH (for ViT-L-14-quickgelu the OpenAI file ViT-L-14.pt from "
                                f"{_OPENAI_VIT_L14})")
            if not weights_file.is_file():
                raise UserError(f"CLIP score weights not found: {weights_file}")
        loading: contextlib.AbstractContextManager = contextlib.nullcontext()
        if weights_file is not None and weights_file.suffix not in (".safetensors", ".bin"):
            try:  # OpenAI's files are TorchScript archives, which torch.load(weights_only=True) refuses
                torch.jit.load(str(weights_file), map_location="cpu")
                state = _clip_state_dict(weights_file)
                for key in ("input_resolution", "context_length", "vocab_size"):
                    state.pop(key, None)
                loading = mock.patch("open_clip.factory.load_state_dict", lambda *args, **kwargs: state)
            except (RuntimeError, ValueError):
                pass  # not TorchScript: open_clip reads it
        with loading:
            bundle = load_clip(model_name, str(weights_file) if weights_file else None, device)
        self.model, self.tokenizer = bundle.model.eval(), bundle.tokenizer
        pp = dict(getattr(self.model.visual, "preprocess_cfg", {}) or {})
        pp.setdefault("size", bundle.image_size)
        pp.setdefault("mean", bundle.mean)
        pp.setdefault("std", bundle.std)
        known = set(PreprocessCfg.__dataclass_fields__)
        self.transform = image_transform_v2(PreprocessCfg(**{k: v for k, v in pp.items() if k in known}),
                                            is_train=False)
        self.device = torch.device(device)
        self.name = bundle.model_name
        weights_file = weights_file or _dir_weights(model_name)
        self.info: dict[str, Any] = {"model": model_name, "transform": "open_clip eval (resize, centre crop)"}
        if weights_file is not None and weights_file.is_file():
            self.info["weights_sha256"] = file_sha256(weights_file)

    @torch.no_grad()
    def cosines(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """uint8 images ``[B, 3, H, W]`` and their ``B`` prompts → ``[B]`` float64 cosines."""
        if len(prompts) != images.shape[0]:
            raise DataError(f"{len(prompts)} prompts for {images.shape[0]} images")
        pil = [Image.fromarray(np.ascontiguousarray(im.permute(1, 2, 0).cpu().numpy())) for im in images]
        x = torch.stack([self.transform(p) for p in pil]).to(self.device)
        img = self.model.encode_image(x).double()
        txt = self.model.encode_text(self.tokenizer(list(prompts)).to(self.device)).double()
        return torch.nn.functional.cosine_similarity(img, txt, dim=1)  # on the device: gathered across processes


def _dir_weights(model_name: str) -> Path | None:
    path = Path(model_name.removeprefix("local-dir:"))
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        if (path / name).is_file():
            return path / name
    return None


def read_prompts(path: str | Path, *, listing: Sequence[str] | None = None, used: Sequence[str] | None = None,
                 count: int | None = None) -> list[str]:
    """Prompts of the images, from a file.

    Args:
        path: ``.json`` — a ``{"image file name": prompt}`` object (folders) or a list of prompts; any other file:
            one prompt per line.
        listing: for an image folder, every image file name of it in sorted order (unreadable ones included): a
            list / text file holds one prompt per listed file, so a skipped file does not shift the others.
        used: the names of the images scored (a subset of ``listing``); the result is aligned with it.
        count: for run samples: at least this many prompts (sample ``i`` gets prompt ``i``).

    Returns:
        the prompts, aligned with ``used`` (folders) or the first ``count`` (runs).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"prompts file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read prompts {p}: {err}") from None
    mapping: dict[str, str] | None = None
    items: list[str] = []
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as err:
            raise DataError(f"{p}: not valid JSON ({str(err).splitlines()[0]})") from None
        if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
            mapping = data
        elif isinstance(data, list) and all(isinstance(v, str) for v in data):
            items = data
        else:
            raise DataError(f"{p}: expected a {{file name: prompt}} object or a list of prompts")
    else:
        items = text.splitlines()
    if used is not None:
        if mapping is None:
            listing = list(listing or [])
            if len(items) != len(listing):
                raise DataError(f"{p}: {len(items)} prompts for the {len(listing)} image files of the folder "
                                "(one per file, in name order)")
            mapping = dict(zip(listing, items, strict=True))
        missing = [n for n in used if n not in mapping]
        if missing:
            raise DataError(f"{p}: no prompt for {len(missing)} image(s), e.g. {missing[0]}")
        return [mapping[n] for n in used]
    if mapping is not None:
        raise DataError(f"{p}: a {{file name: prompt}} object needs an image folder as --fake")
    if count is not None and len(items) < count:
        raise DataError(f"{p}: {len(items)} prompts for {count} samples")
    return list(items[:count] if count is not None else items)
