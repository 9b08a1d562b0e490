"""Dense CLIP teacher: pos-embed interpolation, MaskCLIP shapes and value path, token path, fp16 cache, tiny config."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vkd.config import apply_overrides
from vkd.errors import ConfigError, DataError, UserError
from vkd.feature3dgs.config import Feature3DGSConfig, TeacherConfig, TinyTeacherConfig
from vkd.feature3dgs.feature_cache import FeatureCache
from vkd.feature3dgs.maskclip import (
    MaskCLIPTeacher,
    interpolate_pos_embed,
    maskclip_dense_features,
    token_dense_features,
)
from vkd.feature3dgs.teacher import RANDOM_INIT_WARNING, CallableTeacher, build_teacher, load_text_encoder
from vkd.models.tiny_clip import ClipBundle, TinyClipConfig, build_tiny_clip


def _tiny_clip(pool_type="tok"):
    cfg = TinyClipConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2, embed_dim=24, text_width=32,
                         pool_type=pool_type)
    return build_tiny_clip(cfg)


def test_interpolate_pos_embed():
    pos = torch.randn(1 + 4 * 4, 8)
    assert interpolate_pos_embed(pos, (4, 4), (4, 4)) is pos
    out = interpolate_pos_embed(pos, (4, 4), (6, 10))
    assert out.shape == (1 + 60, 8)
    torch.testing.assert_close(out[0], pos[0])  # CLS row untouched
    const = torch.cat([torch.randn(1, 8), torch.ones(16, 8) * 3.0])
    torch.testing.assert_close(interpolate_pos_embed(const, (4, 4), (7, 5))[1:], torch.full((35, 8), 3.0))
    # Each output row is a bicubic resize of the patch grid, channel by channel.
    grid = pos[1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(6, 10), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(60, 8)
    torch.testing.assert_close(out[1:], ref)
    with pytest.raises(ValueError, match="pos_embed"):
        interpolate_pos_embed(pos, (3, 3), (4, 4))


def test_maskclip_shape_and_value_path():
    model = _tiny_clip("tok")
    visual = model.visual
    x = torch.randn(2, 3, 48, 72)  # not the native 32x32: positional embeddings are interpolated
    with torch.no_grad():
        f = maskclip_dense_features(visual, x)
    assert f.shape == (2, 24, 6, 9)
    torch.testing.assert_close(f.norm(dim=1), torch.ones(2, 6, 9))

    # Oracle: nn.MultiheadAttention with a diagonal mask (each token attends only to itself) returns exactly the
    # value path out_proj(v); everything else follows open_clip's own modules.
    with torch.no_grad():
        t = visual.conv1(x).flatten(2).transpose(1, 2)
        t = torch.cat([visual.class_embedding.expand(2, 1, -1), t], 1)
        t = t + interpolate_pos_embed(visual.positional_embedding, visual.grid_size, (6, 9))
        t = visual.ln_pre(t)
        for blk in visual.transformer.resblocks[:-1]:
            t = blk(t)
        last = visual.transformer.resblocks[-1]
        y = last.ln_1(t)
        L = y.shape[1]
        mask = torch.full((L, L), float("-inf"))
        mask.fill_diagonal_(0.0)
        z = last.ls_1(last.attn(y, y, y, attn_mask=mask, need_weights=False)[0])[:, 1:]
        ref = F.normalize(visual.ln_post(z) @ visual.proj, dim=-1).transpose(1, 2).reshape(2, 24, 6, 9)
    torch.testing.assert_close(f, ref, atol=1e-5, rtol=1e-5)

    with pytest.raises(ValueError, match="multiples of the patch"):
        maskclip_dense_features(visual, torch.randn(1, 3, 30, 32))


def test_token_path_matches_avg_pooled_embedding():
    model = _tiny_clip("avg")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        dense = token_dense_features(model.visual, x, normalize=False)  # native grid: no interpolation
        pooled = model.encode_image(x, normalize=False)
    torch.testing.assert_close(dense.mean(dim=(2, 3)), pooled, atol=1e-5, rtol=1e-5)


def test_maskclip_teacher_module():
    model = _tiny_clip("tok")
    import open_clip

    bundle = ClipBundle(model=model, tokenizer=open_clip.get_tokenizer("", context_length=16), mean=(0.5,) * 3,
                        std=(0.5,) * 3, image_size=(32, 32), model_name="tiny", pretrained=None)
    teacher = MaskCLIPTeacher(bundle, input_size=40)
    assert teacher.input_hw(30, 60) == (40, 80)  # short side 40, multiples of the patch (8)
    feats = teacher(torch.rand(2, 3, 30, 60))
    assert feats.shape == (2, 24, 5, 10) and teacher.dim == 24
    text = teacher.encode_text(["a red ball", "the floor"])
    assert text.shape == (2, 24)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))


def test_callable_teacher_and_cache(tmp_path):
    calls = []

    def fn(images):
        calls.append(images.shape[0])
        return F.avg_pool2d(torch.cat([images, 1 - images], 1), 4)  # [B, 6, H/4, W/4]

    teacher = CallableTeacher(fn, key="stub")
    assert not teacher.text_aligned
    with pytest.raises(UserError, match="no text encoder"):
        teacher.encode_text(["x"])
    images = [torch.rand(3, 16, 24) for _ in range(5)]
    cache = FeatureCache(tmp_path / "cache")
    expected = {"teacher": "stub", "scene": "s"}
    cache.build(teacher, lambda i: images[i], [f"img/{i}.png" for i in range(5)], expected, batch_size=2,
                progress=False)
    assert calls == [2, 2, 1] and len(cache) == 5 and cache.shape == (6, 4, 6)
    files = sorted((tmp_path / "cache").glob("*.npy"))
    assert len(files) == 5 and np.load(files[0], mmap_mode="r").dtype == np.float16
    got = cache.get(3)
    assert got.dtype == torch.float32
    ref = F.avg_pool2d(torch.cat([images[3], 1 - images[3]], 0)[None], 4)[0]
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=0)  # fp16 storage
    # Complete cache: reopened and reused without calling the teacher.
    again = FeatureCache(tmp_path / "cache")
    again.build(teacher, lambda i: images[i], [f"img/{i}.png" for i in range(5)], expected, progress=False)
    assert calls == [2, 2, 1]
    # A different teacher key invalidates it.
    again.build(teacher, lambda i: images[i], [f"img/{i}.png" for i in range(5)], {"teacher": "other", "scene": "s"},
                batch_size=5, progress=False)
    assert calls == [2, 2, 1, 5]

    bad = CallableTeacher(lambda im: im.mean(1), key="bad")
    with pytest.raises(DataError, match=r"\[B, D, h, w\]"):
        bad(torch.rand(1, 3, 8, 8))


def test_random_init_needs_flag(tmp_path, caplog):
    cfg = TeacherConfig(kind="maskclip", model="ViT-S-32", pretrained="no-such-tag")
    with pytest.raises(UserError, match="allow_random_init"):
        build_teacher(cfg, scene=None, cache_root=tmp_path, progress=False)
    cfg = TeacherConfig(kind="maskclip", model="ViT-S-32", pretrained="no-such-tag", allow_random_init=True,
                        input_size=64)
    with caplog.at_level(logging.WARNING):
        teacher, info = build_teacher(cfg, scene=None, cache_root=tmp_path, progress=False)
    assert info["random_init"] is True and "RANDOMLY INITIALISED" in info["warning"]
    assert any("RANDOMLY INITIALISED" in r.getMessage() for r in caplog.records)
    assert teacher(torch.rand(1, 3, 64, 96)).shape == (1, teacher.dim, 2, 3)


def test_text_encoder_of_untexted_run(tmp_path):
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "teacher.json").write_text(json.dumps({"kind": "callable", "target": "m:f",
                                                                   "text_aligned": False}))
    with pytest.raises(UserError, match="text-aligned"):
        load_text_encoder(tmp_path, TeacherConfig())
    assert RANDOM_INIT_WARNING.startswith("!!!")


def test_tiny_teacher_config_is_a_tiny_clip_config():
    """teacher.tiny is a TinyClipConfig with scene defaults; its CLIP part ties text_width to embed_dim."""
    tiny = TinyTeacherConfig()
    clip = tiny.clip_config()
    assert type(clip) is TinyClipConfig and not hasattr(clip, "crops_per_view")
    # the values the synthetic preset has always pretrained with
    assert (clip.patch_size, clip.pool_type, clip.steps, clip.batch_size, clip.lr) == (8, "avg", 200, 64, 2e-3)
    assert clip.text_width == clip.embed_dim == 64
    assert clip.mlp_ratio == TinyClipConfig().mlp_ratio and clip.warmup_steps == TinyClipConfig().warmup_steps
    # an embed_dim override after the config was built still moves the text width with it
    cfg = apply_overrides(Feature3DGSConfig(), ["teacher.tiny.embed_dim=32"])
    assert cfg.teacher.tiny.clip_config().text_width == 32
    assert apply_overrides(cfg, ["teacher.tiny.text_width=48"]).teacher.tiny.clip_config().text_width == 48
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        TinyTeacherConfig(image_size=30)
    with pytest.raises(ConfigError, match="crops_per_view"):
        TinyTeacherConfig(crops_per_view=0)


def test_teacher_runs_on_the_training_device(monkeypatch):
    """teacher.device=auto follows train.device; on CUDA it is this process's GPU (LOCAL_RANK under torchrun)."""
    from vkd.config import load_config
    from vkd.feature3dgs.teacher import teacher_device

    def cfg(*sets):
        return load_config(Feature3DGSConfig, None, list(sets), task="feature3dgs")

    assert teacher_device(cfg("train.device=cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert teacher_device(cfg("train.device=auto")) == torch.device("cpu")
    with pytest.raises(UserError, match="CUDA is not available"):
        teacher_device(cfg("train.device=cpu", "teacher.device=cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert teacher_device(cfg("train.device=auto")) == torch.device("cuda", 1)
    assert teacher_device(cfg("train.device=cpu", "teacher.device=cuda:0")) == torch.device("cuda", 0)
    assert teacher_device(cfg("train.device=cuda", "teacher.device=cpu")) == torch.device("cpu")
