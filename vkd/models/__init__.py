"""Models shared by several methods: the tiny open_clip CLIP (HeLlO, Feature 3DGS) and a loader for any open_clip model."""

from vkd.models.tiny_clip import (
    ClipBundle,
    TinyClipConfig,
    build_tiny_clip,
    default_cache_dir,
    encode_images,
    encode_text,
    load_clip,
    multi_positive_clip_loss,
    preprocess_images,
    pretrain_tiny_clip,
    tiny_clip_model_cfg,
    tiny_clip_name,
)

__all__ = [
    "ClipBundle",
    "TinyClipConfig",
    "build_tiny_clip",
    "default_cache_dir",
    "encode_images",
    "encode_text",
    "load_clip",
    "multi_positive_clip_loss",
    "preprocess_images",
    "pretrain_tiny_clip",
    "tiny_clip_model_cfg",
    "tiny_clip_name",
]
