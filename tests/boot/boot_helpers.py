"""Tiny diffusers teachers built inside the tests (CPU, offline, seconds)."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_unet(num_class_embeds: int | None = None, out_channels: int = 1, seed: int = 0, sample_size: int = 8):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=sample_size, in_channels=1, out_channels=out_channels, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                       num_class_embeds=num_class_embeds)


def save_tiny_teacher(path: Path, prediction_type: str = "epsilon", num_classes: int | None = None,
                      clip_sample: bool = False, out_channels: int = 1, **sched_kwargs) -> Path:
    """A random tiny UNet2DModel + DDPMScheduler in the ``save_pretrained`` layout (+ vkd metadata)."""
    from diffusers import DDPMScheduler

    from vkd.boot.teacher import save_teacher

    unet = tiny_unet(None if num_classes is None else num_classes + 1, out_channels)
    sched = DDPMScheduler(prediction_type=prediction_type, clip_sample=clip_sample, **sched_kwargs)
    meta = {"dataset": "test", "num_classes": num_classes, "null_class": num_classes} if num_classes else {}
    return save_teacher(unet, sched, path, meta)
