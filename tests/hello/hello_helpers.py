"""Tiny CLIP bundles for HeLlO tests (random weights unless pretrained in the test)."""

import open_clip
import torch

from vkd.models import ClipBundle, TinyClipConfig, build_tiny_clip

SMALL_CLIP = dict(image_size=8, patch_size=2, width=32, layers=2, heads=2, embed_dim=16, text_width=32,
                  text_layers=1, text_heads=2, context_length=12)


def vit_bundle(seed: int = 0) -> ClipBundle:
    cfg = TinyClipConfig(**SMALL_CLIP, seed=seed)
    model = build_tiny_clip(cfg)
    tok = open_clip.get_tokenizer("", context_length=cfg.context_length)
    return ClipBundle(model, tok, cfg.mean, cfg.std, (8, 8), "test-vit", None)


def resnet_bundle(seed: int = 0) -> ClipBundle:
    """A ModifiedResNet CLIP (same conv/BatchNorm/AttentionPool2d types as RN50), 32 px."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(embed_dim=16, vision_cfg=dict(layers=(1, 1, 1, 1), width=16, image_size=32),
                           text_cfg=dict(context_length=12, vocab_size=49408, width=32, heads=2, layers=1)).eval()
    tok = open_clip.get_tokenizer("", context_length=12)
    return ClipBundle(model, tok, (0.5,) * 3, (0.5,) * 3, (32, 32), "test-rn", None)
