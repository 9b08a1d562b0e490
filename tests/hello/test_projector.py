"""Projector: Proposition 1 at init, LoRA identity/merge, trainable factors, BatchNorm, adapter reload."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hello_helpers import resnet_bundle, vit_bundle
from torch import nn

from vkd.errors import DataError
from vkd.hello.config import ProjectorConfig
from vkd.hello.projector import (
    adapter_state_dict,
    add_lora,
    build_projector,
    class_prompts,
    image_lora_targets,
    load_adapters,
    lora_config,
    projector_bytes,
    read_adapter_meta,
    save_adapters,
)

NAMES = ["zero", "one", "two", "three", "four"]
TEMPLATE = "a photo of the digit {}."


def _zero_shot(clip, x):
    """CLIP zero-shot logits written independently of the projector (hello.md §2 test)."""
    with torch.no_grad():
        img = F.normalize(clip.model.encode_image(clip.preprocess(x)), dim=-1)
        txt = F.normalize(clip.model.encode_text(clip.tokenizer(class_prompts(TEMPLATE, NAMES))), dim=-1)
        return clip.model.logit_scale.exp() * img @ txt.T


def _perturb_lora_b(model, std=0.2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


@pytest.mark.parametrize("bundle", [vit_bundle, resnet_bundle])
def test_proposition_1_zero_shot_at_init(bundle):
    clip = bundle()
    x = torch.rand(6, 3, *clip.image_size)
    model = add_lora(build_projector(clip, NAMES, TEMPLATE),
                     lora_config(build_projector(clip, NAMES, TEMPLATE), ProjectorConfig(rank_image=4, rank_head=8)))
    model.eval()
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(logits, _zero_shot(clip, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("bundle", [vit_bundle, resnet_bundle])
def test_lora_merge_equivalence(bundle):
    clip = bundle()
    proj = build_projector(clip, NAMES, TEMPLATE)
    model = add_lora(proj, lora_config(proj, ProjectorConfig(rank_image=4, rank_head=8))).eval()
    x = torch.rand(4, 3, *clip.image_size)
    with torch.no_grad():
        before = model(x)
    _perturb_lora_b(model)
    with torch.no_grad():
        adapted = model(x)
        merged = copy.deepcopy(model).merge_and_unload()(x)
    assert (adapted - before).abs().max() > 1e-2  # the factors do change the output
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)


def test_default_targets_and_parameter_counts():
    clip = resnet_bundle()
    proj = build_projector(clip, NAMES, TEMPLATE)
    targets = image_lora_targets(proj)
    convs = {n: m for n, m in proj.named_modules() if isinstance(m, nn.Conv2d)}
    assert set(targets) == set(convs)  # all visual Conv2d, no attnpool linears
    r_img, r_head = 3, 5
    model = add_lora(proj, lora_config(proj, ProjectorConfig(rank_image=r_img, rank_head=r_head)))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    expected = sum(r_img * (m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels)
                   for m in convs.values())
    d, c = proj.head.in_features, proj.head.out_features
    expected += r_head * (d + c)  # head: A (d→r) + B (r→C)
    assert sum(p.numel() for p in trainable.values()) == expected
    state = adapter_state_dict(model)
    assert projector_bytes(state) == {"params": expected, "bytes": 4 * expected}
    assert not any("head.weight" == k.split("base_layer.")[-1] for k in state)  # W is never stored

    vit = build_projector(vit_bundle(), NAMES, TEMPLATE)
    vit_targets = image_lora_targets(vit)
    assert "visual.conv1" in vit_targets and not any("out_proj" in t for t in vit_targets)
    assert any(t.endswith("mlp.c_fc") for t in vit_targets)
    with pytest.raises(DataError):
        lora_config(vit, ProjectorConfig(image_targets=["no_such_layer"]))


def test_fit_step_trains_only_factors_and_keeps_batchnorm_stats():
    clip = resnet_bundle()
    proj = build_projector(clip, NAMES, TEMPLATE)
    model = add_lora(proj, lora_config(proj, ProjectorConfig(rank_image=2, rank_head=4)))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    stats = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train()
    assert all(not m.training for m in bns)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.rand(8, 3, 32, 32) * 3, torch.randint(0, 5, (8,))  # off-distribution batch
    for _ in range(2):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for m, (mean, var) in zip(bns, stats, strict=True):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


@pytest.mark.parametrize("dtype,atol", [("fp32", 1e-6), ("fp16", 2e-2)])
def test_adapter_safetensors_reload(tmp_path, dtype, atol):
    clip = vit_bundle()
    proj = build_projector(clip, NAMES, TEMPLATE)
    kwargs = lora_config(proj, ProjectorConfig(rank_image=2, rank_head=4))
    model = add_lora(proj, kwargs).eval()
    _perturb_lora_b(model, std=0.05)
    meta = {"clip_model": "test-vit", "clip_pretrained": "", "prompt_template": TEMPLATE, "class_names": NAMES,
            "lora": kwargs}
    sizes = save_adapters(model, tmp_path / "a.safetensors", meta, dtype)
    assert sizes["params"] == projector_bytes(adapter_state_dict(model))["params"]
    assert sizes["bytes"] == sizes["params"] * (2 if dtype == "fp16" else 4)
    assert read_adapter_meta(tmp_path / "a.safetensors")["class_names"] == NAMES
    # rebuild on a fresh copy of the same base CLIP: CLIP → regenerate W → LoRA → load factors
    reloaded = load_adapters(tmp_path / "a.safetensors", vit_bundle())
    x = torch.rand(5, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=atol)


def test_adapter_reload_from_saved_tiny_clip(tmp_path):
    """The full path: base CLIP found from the adapter metadata (a saved tiny CLIP directory)."""
    from hello_helpers import SMALL_CLIP

    from vkd.models import TinyClipConfig, load_clip, pretrain_tiny_clip, tiny_clip_name

    path = pretrain_tiny_clip(torch.rand(4, 3, 8, 8), ["a", "b", "a", "b"], TinyClipConfig(**SMALL_CLIP, steps=1),
                              cache_dir=tmp_path, progress=False)
    clip = load_clip(tiny_clip_name(path))
    proj = build_projector(clip, NAMES, TEMPLATE)
    kwargs = lora_config(proj, ProjectorConfig())
    model = add_lora(proj, kwargs).eval()
    _perturb_lora_b(model, std=0.05)
    meta = {"clip_model": clip.model_name, "clip_pretrained": "", "prompt_template": TEMPLATE,
            "class_names": NAMES, "lora": kwargs}
    save_adapters(model, tmp_path / "p.safetensors", meta, "fp32")
    reloaded = load_adapters(tmp_path / "p.safetensors")
    x = torch.rand(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=1e-6)
    with pytest.raises(DataError):
        load_adapters(tmp_path / "missing.safetensors")
