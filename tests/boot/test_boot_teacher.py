"""Teacher wrapper: x0 conversions, loading (save_pretrained and legacy layouts), refusals, CFG, clipping."""

from __future__ import annotations

import json

import pytest
import torch
from boot_helpers import save_tiny_teacher, tiny_unet
from diffusers import DDIMScheduler, DDPMScheduler

from vkd.boot.schedule import NoiseSchedule
from vkd.boot.teacher import load_diffusers_teacher, to_x0
from vkd.errors import UserError


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_to_x0_matches_diffusers_ddim(prediction_type):
    sched = DDIMScheduler(prediction_type=prediction_type, clip_sample=False)
    sched.set_timesteps(50)
    ns = NoiseSchedule(sched.alphas_cumprod)
    gen = torch.Generator().manual_seed(0)
    for t in (999, 500, 21, 0):
        x = torch.randn(3, 1, 4, 4, generator=gen, dtype=torch.float64)
        out = torch.randn(3, 1, 4, 4, generator=gen, dtype=torch.float64)
        ref = sched.step(out, t, x).pred_original_sample
        a, s = ns.alpha_sigma(torch.full((3,), float(t)))
        # diffusers takes √ᾱ of a float32 0-dim tensor: float32-level coefficients, amplified by 1/α_999 ≈ 157
        torch.testing.assert_close(to_x0(out, x, a, s, prediction_type), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_save_pretrained_roundtrip(tmp_path, prediction_type):
    path = save_tiny_teacher(tmp_path / "t", prediction_type)
    teacher = load_diffusers_teacher(str(path), clip_x0=False)
    assert teacher.prediction_type == prediction_type and not teacher.conditional
    assert teacher.sample_shape == (1, 8, 8)
    unet = tiny_unet()
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([999.0, 250.0])
    with torch.no_grad():
        out = unet(x, t).sample
    a, s = teacher.schedule.alpha_sigma(t)
    torch.testing.assert_close(teacher(x, t), to_x0(out, x, a, s, prediction_type), rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_legacy_flat_layout_google_ddpm_style(tmp_path):
    # google/ddpm-cifar10-32 keeps config.json + scheduler_config.json at the root, with the legacy
    # GaussianDDPMScheduler class name and a "timesteps" key
    tiny_unet().save_pretrained(str(tmp_path))
    (tmp_path / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "GaussianDDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
        "timesteps": 1000, "variance_type": "fixed_large"}))
    teacher = load_diffusers_teacher(str(tmp_path))
    assert teacher.prediction_type == "epsilon"
    assert teacher.clip_x0  # DDPMScheduler default clip_sample=True, as the scheduler config implies
    ref = DDPMScheduler().alphas_cumprod.double()
    torch.testing.assert_close(teacher.schedule.alphas_cumprod, ref)


def test_float_timesteps_are_not_truncated(tmp_path):
    teacher = load_diffusers_teacher(str(save_tiny_teacher(tmp_path / "t", "sample")), clip_x0=False)
    x = torch.randn(1, 1, 8, 8)
    f = {t: teacher(x, torch.tensor([t])) for t in (500.0, 500.5, 501.0)}
    assert not torch.allclose(f[500.0], f[500.5]) and not torch.allclose(f[500.5], f[501.0])


def test_refuses_non_vp_scheduler(tmp_path):
    path = save_tiny_teacher(tmp_path / "t")
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "ScoreSdeVeScheduler"}))
    with pytest.raises(UserError, match="variance-exploding scheduler; not supported yet"):
        load_diffusers_teacher(str(path))
    # a flow-matching teacher (SD3, FLUX) is named as such
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}))
    with pytest.raises(UserError, match="FlowMatchEulerDiscreteScheduler is a flow-matching scheduler; not supported"):
        load_diffusers_teacher(str(path))


def test_refuses_unknown_prediction_type(tmp_path):
    path = save_tiny_teacher(tmp_path / "t")
    cfg_path = path / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["prediction_type"] = "flow"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="prediction_type 'flow'"):
        load_diffusers_teacher(str(path))


def test_refuses_zero_terminal_snr_epsilon_but_accepts_v(tmp_path):
    with pytest.raises(UserError, match="zero-terminal-SNR"):
        load_diffusers_teacher(str(save_tiny_teacher(tmp_path / "e", "epsilon", rescale_betas_zero_snr=True)))
    teacher = load_diffusers_teacher(str(save_tiny_teacher(tmp_path / "v", "v_prediction",
                                                           rescale_betas_zero_snr=True)))
    T = torch.tensor([999.0])
    assert float(teacher.schedule.delta(T, torch.tensor([979.0]))) == 1.0  # α_T = 0: Δ(T, s) = 1, no inf − inf
    assert torch.isfinite(teacher(torch.randn(1, 1, 8, 8), T)).all()


def test_bad_directories(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_diffusers_teacher(str(tmp_path / "missing" / "dir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="scheduler config"):
        load_diffusers_teacher(str(tmp_path / "empty"))
    path = save_tiny_teacher(tmp_path / "t")
    cfg = json.loads((path / "unet" / "config.json").read_text())
    cfg["_class_name"] = "UNet2DConditionModel"
    (path / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="only UNet2DModel"):
        load_diffusers_teacher(str(path))
    path2 = save_tiny_teacher(tmp_path / "t2")
    for f in (path2 / "unet").glob("diffusion_pytorch_model*"):
        f.unlink()
    with pytest.raises(UserError, match="cannot load the UNet"):
        load_diffusers_teacher(str(path2))


def test_hub_id_offline_not_cached(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot"):
        load_diffusers_teacher("vkd-nonexistent-org/no-such-ddpm")


def test_classifier_free_guidance_folded(tmp_path):
    path = save_tiny_teacher(tmp_path / "c", "epsilon", num_classes=3)
    plain = load_diffusers_teacher(str(path), clip_x0=False)
    guided = load_diffusers_teacher(str(path), clip_x0=False, guidance_scale=3.0)
    assert plain.num_classes == 3 and plain.null_class == 3
    x = torch.randn(4, 1, 8, 8)
    t = torch.tensor([900.0, 500.0, 100.0, 20.0])
    c = torch.tensor([0, 1, 2, 0])
    cond, uncond = plain(x, t, c), plain(x, t, torch.full_like(c, 3))
    # to_x0 is affine with weights summing to 1: guiding the raw output = guiding x0
    torch.testing.assert_close(guided(x, t, c), uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-4)


def test_guidance_needs_null_class(tmp_path):
    path = save_tiny_teacher(tmp_path / "u", "epsilon")
    with pytest.raises(UserError, match="null"):
        load_diffusers_teacher(str(path), guidance_scale=2.0)


def test_clipping_follows_scheduler(tmp_path):
    path = save_tiny_teacher(tmp_path / "c", "epsilon", clip_sample=True)
    x = 3 * torch.randn(8, 1, 8, 8)
    t = torch.full((8,), 999.0)  # ε → x0 divides by α_999 ≈ 0.006: far outside [-1, 1] unclipped
    clipped = load_diffusers_teacher(str(path))(x, t)
    raw = load_diffusers_teacher(str(path), clip_x0=False)(x, t)
    assert clipped.abs().max() <= 1.0 and raw.abs().max() > 1.0
    torch.testing.assert_close(clipped, raw.clamp(-1, 1))


def test_learned_variance_output_is_split(tmp_path):
    path = save_tiny_teacher(tmp_path / "lv", "epsilon", out_channels=2)
    teacher = load_diffusers_teacher(str(path), clip_x0=False)
    assert teacher(torch.randn(2, 1, 8, 8), torch.tensor([10.0, 20.0])).shape == (2, 1, 8, 8)
