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


def image_tree(root, classes=("a", "b", "c"), n=8, size=(40, 30), seed=0, ext="jpg"):
    """An ImageFolder tree of smooth colour images (each class its own hue), ``n`` per class; returns the paths
    per class in sorted order."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = {}
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        paths[c] = []
        for i in range(n):
            h, w = size
            yy, xx = np.mgrid[0:h, 0:w]
            base = np.zeros((h, w, 3))
            base[..., ci % 3] = 120 + 100 * np.sin(xx / (3 + i) + rng.uniform(0, 6))
            base[..., (ci + 1) % 3] = 60 + 50 * np.cos(yy / (2 + i))
            img = np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)
            p = root / c / f"{i:03d}.{ext}"
            Image.fromarray(img).save(p, quality=92) if ext == "jpg" else Image.fromarray(img).save(p)
            paths[c].append(p)
    return paths


def write_shard(path, samples):
    """A webdataset-style tar: ``samples`` is ``[(key, image bytes or None, class text or None)]``."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for key, data, cls in samples:
            for ext, payload in (("jpg", data), ("cls", None if cls is None else str(cls).encode())):
                if payload is None:
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
