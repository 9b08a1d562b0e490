"""Tiny open_clip CLIP: config, contrastive loss, pretraining + cache, loading through open_clip."""

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

from vkd.errors import DataError, UserError
from vkd.models import (
    TinyClipConfig,
    build_tiny_clip,
    load_clip,
    multi_positive_clip_loss,
    pretrain_tiny_clip,
    tiny_clip_model_cfg,
    tiny_clip_name,
)

# smallest useful model: 8 px images, 2×2 patches, 1 layer each tower
SMALL = dict(image_size=8, patch_size=2, width=32, layers=1, heads=2, embed_dim=16, text_width=32, text_layers=1,
             text_heads=2, context_length=8, batch_size=32, warmup_steps=5)


def _toy_pairs(n_per_class: int = 24):
    """Three visually distinct classes (bright top / bright bottom / dark) with one caption each."""
    gen = torch.Generator().manual_seed(0)
    imgs, caps = [], []
    for c, name in enumerate(["top", "bottom", "dark"]):
        x = 0.1 * torch.rand(n_per_class, 3, 8, 8, generator=gen)
        if c == 0:
            x[:, :, :4] += 0.8
        elif c == 1:
            x[:, :, 4:] += 0.8
        imgs.append(x)
        caps += [f"{name} pattern"] * n_per_class
    return torch.cat(imgs).clamp(0, 1), caps


def test_config_validation():
    with pytest.raises(UserError):
        TinyClipConfig(image_size=30, patch_size=4)
    cfg = tiny_clip_model_cfg(TinyClipConfig())
    assert cfg["vision_cfg"]["patch_size"] == 4 and cfg["text_cfg"]["context_length"] == 16


def test_build_is_open_clip_vit_with_mha():
    model = build_tiny_clip(TinyClipConfig(**SMALL))
    assert isinstance(model, open_clip.CLIP)
    attn = model.visual.transformer.resblocks[0].attn
    assert isinstance(attn, torch.nn.MultiheadAttention) and attn.batch_first
    tok = open_clip.get_tokenizer("", context_length=8)
    with torch.no_grad():
        img = model.encode_image(torch.randn(2, 3, 8, 8))
        txt = model.encode_text(tok(["a", "b"]))
    assert img.shape == (2, 16) and txt.shape == (2, 16)


def test_multi_positive_loss_equals_clip_loss_for_unique_captions():
    from open_clip.loss import ClipLoss

    gen = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=gen, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(6, 8, generator=gen, dtype=torch.float64), dim=-1)
    scale = torch.tensor(2.0, dtype=torch.float64)
    ours = multi_positive_clip_loss(img, txt, torch.arange(6), scale)
    ref = ClipLoss()(img, txt, scale.exp())
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_multi_positive_loss_gradcheck():
    gen = torch.Generator().manual_seed(1)
    img = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 1, 0, 0, 1])
    scale = torch.tensor(1.0, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b: multi_positive_clip_loss(F.normalize(a, dim=-1), F.normalize(b, dim=-1), ids, scale), (img, txt))


def test_pretrain_learns_caches_and_loads_through_open_clip(tmp_path):
    images, captions = _toy_pairs()
    cfg = TinyClipConfig(**SMALL, steps=60, lr=1e-3)
    path = pretrain_tiny_clip(images, captions, cfg, cache_dir=tmp_path, progress=False)
    info = json.loads((path / "vkd_tiny_clip.json").read_text())
    assert info["train_zero_shot_accuracy"] > 0.9, info
    # second call with identical inputs is a cache hit (no retraining: weights file untouched)
    mtime = (path / "open_clip_model.safetensors").stat().st_mtime_ns
    again = pretrain_tiny_clip(images, captions, cfg, cache_dir=tmp_path, progress=False)
    assert again == path and (path / "open_clip_model.safetensors").stat().st_mtime_ns == mtime
    # different captions → different cache entry
    other = pretrain_tiny_clip(images, captions[::-1], TinyClipConfig(**SMALL, steps=1), cache_dir=tmp_path,
                               progress=False)
    assert other != path

    clip = load_clip(tiny_clip_name(path))
    assert clip.image_size == (8, 8) and clip.mean == (0.5, 0.5, 0.5)
    prompts = sorted(set(captions))
    txt = clip.encode_text(prompts)
    assert txt.shape == (3, 16)
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    with torch.no_grad():
        pred = (clip.encode_images(images) @ txt.T).argmax(-1)
    truth = torch.tensor([prompts.index(c) for c in captions])
    assert (pred == truth).float().mean() > 0.9
    # the same weights through open_clip's own API (registered name + pretrained file)
    model = open_clip.create_model(tiny_clip_name(path))
    for (k, a), (_, b) in zip(model.state_dict().items(), clip.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    # a bare directory path works too
    assert load_clip(str(path)).image_size == (8, 8)


def test_bad_inputs():
    images, captions = _toy_pairs(2)
    with pytest.raises(DataError):
        pretrain_tiny_clip(images, captions[:-1], TinyClipConfig(**SMALL, steps=1), progress=False)
    with pytest.raises(ValueError):
        pretrain_tiny_clip(images[:, :1], captions, TinyClipConfig(**SMALL, steps=1), progress=False)
    with pytest.raises(UserError):
        load_clip("no-such-model-xyz")
