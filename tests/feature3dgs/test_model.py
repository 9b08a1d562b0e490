"""Gaussian feature field: joint RGB+feature rendering, decoder folding, losses, export, densification."""

from __future__ import annotations

import math

import pytest
import torch

from vkd.feature3dgs.export import export_field, load_exported_field
from vkd.feature3dgs.losses import Feature3DGSLoss, feature_loss, resize_features, rgb_loss
from vkd.feature3dgs.model import GaussianField, knn_scales
from vkd.feature3dgs.ply import read_ply
from vkd.render import look_at, rasterization
from vkd.render.sh import sh_to_color


def _camera(size=24):
    c2w = look_at(torch.tensor([0.0, 0.0, -4.0]), torch.zeros(3), (0.0, -1.0, 0.0))
    viewmat = torch.linalg.inv(c2w)[None]
    f = 0.5 * size / math.tan(math.radians(20))
    K = torch.tensor([[[f, 0, size / 2], [0, f, size / 2], [0, 0, 1]]])
    return viewmat, K


def _field(num=60, render_dim=5, teacher_dim=7, sh_degree=1, decoder=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    pts = (torch.rand(num, 3, generator=g) - 0.5) * torch.tensor([1.6, 1.6, 0.4])
    field = GaussianField.from_points(pts, torch.rand(num, 3, generator=g), render_dim, teacher_dim, sh_degree,
                                      decoder, init_opacity=0.9, init_scale=1.5)
    with torch.no_grad():
        field.params["features"].normal_(generator=g)
        if "shN" in field.params:
            field.params["shN"].normal_(0, 0.3, generator=g)
        if field.decoder is not None:
            field.decoder.bias.normal_(generator=g)
    return field


def test_knn_scales():
    pts = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [0, 2.0, 0], [0, 0, 3.0]])
    s = knn_scales(pts, k=1)
    torch.testing.assert_close(s, torch.tensor([1.0, 1.0, 2.0, 3.0]))


def test_render_concatenates_rgb_and_features():
    field = _field(decoder=False, teacher_dim=5)
    field.active_sh_degree = 1  # starts at 0 and is raised during training
    vm, K = _camera()
    bg = torch.tensor([0.2, 0.4, 0.6])
    out = field.render(vm, K, 24, 24, background=bg, features=True, depth=True, backend="torch")
    assert out["rgb"].shape == (1, 24, 24, 3) and out["features"].shape == (1, 24, 24, 5)
    assert out["depth"].shape == (1, 24, 24, 1)
    # Reference: the rasterizer called directly with SH evaluated the same way, features zero background.
    means, quats, scales, opac = field.activated()
    cam_center = torch.linalg.inv(vm[0])[:3, 3]
    rgb = sh_to_color(1, field.params["means"] - cam_center, field.sh_coeffs())
    ref, alpha, _ = rasterization(means, quats, scales, opac, torch.cat([rgb, field.params["features"]], -1), vm, K,
                                  24, 24, backgrounds=torch.cat([bg, torch.zeros(5)])[None], backend="torch")
    torch.testing.assert_close(out["rgb"], ref[..., :3])
    torch.testing.assert_close(out["features"], ref[..., 3:])
    # Background only on RGB: at a pixel with little coverage features vanish, RGB tends to bg.
    a = alpha[0, ..., 0]
    corner = a.argmin()
    assert float(a.flatten()[corner].detach()) < 0.05
    assert float(out["features"][0].reshape(-1, 5)[corner].detach().abs().max()) < 0.2
    # Degree 0 colours are view independent: [G, 3].
    field.active_sh_degree = 0
    assert field.colors(vm).shape == (60, 3)
    field.active_sh_degree = 1
    assert field.colors(vm).shape == (1, 60, 3)


def test_decoder_folding_equals_decode_after_render():
    field = _field(num=80, render_dim=4, teacher_dim=9, sh_degree=0)
    vm, K = _camera()
    out = field.render(vm, K, 24, 24, features=True, backend="torch")
    decoded = field.decode(out["features"].permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # decode(render(f))
    folded = field.render(vm, K, 24, 24, features=field.folded_features(), backend="torch")  # render(W f + b)
    A = out["alpha"]
    b = field.decoder.bias
    # render(W f + b) = W·Σwf + A·b and decode(render f) = W·Σwf + b: they differ by exactly (1 - A)·b ...
    torch.testing.assert_close(decoded - folded["features"], (1 - A) * b, atol=1e-5, rtol=1e-4)
    # ... so they agree wherever the accumulated alpha is 1 (compositing stops once T <= 1e-4, so A < 1 - 1e-4).
    full = A[..., 0] > 0.999
    assert int(full.sum()) > 10
    atol = 1.1e-3 * float(b.detach().abs().max())
    torch.testing.assert_close(decoded[full], folded["features"][full], atol=atol, rtol=1e-4)
    # Without a decoder, folding is the identity.
    plain = _field(decoder=False, teacher_dim=5)
    torch.testing.assert_close(plain.folded_features(), plain.params["features"])


def test_losses_values_and_gradcheck():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(1, 3, 12, 12, dtype=torch.float64, generator=g)
    b = torch.rand(1, 3, 12, 12, dtype=torch.float64, generator=g)
    assert float(rgb_loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(rgb_loss(a, b, ssim_lambda=0.0)) == pytest.approx(float((a - b).abs().mean()))
    fa = torch.randn(2, 4, 5, 5, dtype=torch.float64, generator=g, requires_grad=True)
    fb = torch.randn(2, 4, 5, 5, dtype=torch.float64, generator=g)
    assert float(feature_loss(fb, fb, "cosine")) == pytest.approx(0.0, abs=1e-9)
    torch.autograd.gradcheck(lambda x: feature_loss(x, fb, "l1"), (fa,), fast_mode=True)
    torch.autograd.gradcheck(lambda x: feature_loss(x, fb, "cosine"), (fa,), fast_mode=True)
    ra = a[..., :7, :7].clone().requires_grad_(True)
    torch.autograd.gradcheck(lambda x: rgb_loss(x, b[..., :7, :7], 0.2, 3), (ra,), fast_mode=True)
    out = Feature3DGSLoss(0.2, 2.0)(a.float(), b.float(), fa.float(), fb.float())
    assert float(out["loss"].detach()) == pytest.approx(float(out["rgb"] + 2.0 * out["feature"]), rel=1e-5)
    # Resizing to the teacher grid uses align_corners=True: corners are preserved exactly.
    up = resize_features(fb, (9, 9))
    torch.testing.assert_close(up[..., 0, 0], fb[..., 0, 0])
    torch.testing.assert_close(up[..., -1, -1], fb[..., -1, -1])
    with pytest.raises(ValueError, match="same shape"):
        feature_loss(fa, fb[:, :2])


def test_export_roundtrip(tmp_path):
    field = _field(num=30, render_dim=4, teacher_dim=6, sh_degree=2)
    paths = export_field(field, tmp_path)
    ply = read_ply(paths["ply"])
    assert len(ply["x"]) == 30
    assert not [k for k in ply if k.startswith("f_sem_")]  # features live in features.safetensors
    assert len([k for k in ply if k.startswith("f_rest_")]) == 3 * 8
    from safetensors.torch import load_file

    torch.testing.assert_close(load_file(paths["features"])["features"][:, 2], field.params["features"][:, 2].detach())
    torch.testing.assert_close(torch.from_numpy(ply["opacity"]), field.params["opacities"].detach())
    back = load_exported_field(paths["safetensors"])
    for k, v in field.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v)
    torch.testing.assert_close(load_file(paths["safetensors"])["folded_features"], field.folded_features().detach())


def test_densification_with_default_strategy():
    from gsplat.strategy import DefaultStrategy

    field = _field(num=40, render_dim=3, teacher_dim=3, decoder=False, sh_degree=1)
    opts = {k: torch.optim.Adam([p], lr=1e-3, eps=1e-15) for k, p in field.params.items()}
    strategy = DefaultStrategy(refine_start_iter=0, refine_every=2, grow_grad2d=1e-9, grow_scale3d=0.05,
                               reset_every=10000)
    strategy.check_sanity(field.params, opts)
    state = strategy.initialize_state(scene_scale=1.0)
    vm, K = _camera()
    n0 = field.num_gaussians
    for step in range(3):
        out = field.render(vm, K, 24, 24, features=True, backend="torch")
        strategy.step_pre_backward(field.params, opts, state, step, out["meta"])
        (out["rgb"].mean() + out["features"].pow(2).mean()).backward()
        for o in opts.values():
            o.step()
            o.zero_grad()
        strategy.step_post_backward(field.params, opts, state, step, out["meta"], packed=False)
    assert field.num_gaussians > n0
    strategy.check_sanity(field.params, opts)
    for k, p in field.params.items():
        assert p.shape[0] == field.num_gaussians and opts[k].param_groups[0]["params"][0] is p
    assert field.render(vm, K, 24, 24, features=True, backend="torch")["features"].shape == (1, 24, 24, 3)


def test_task_checkpoint_with_changed_gaussian_count():
    from vkd.feature3dgs.config import Feature3DGSConfig
    from vkd.feature3dgs.distiller import Feature3DGSTask

    cfg = Feature3DGSConfig()
    trained = Feature3DGSTask(cfg, _field(num=50, render_dim=4, teacher_dim=6), scene_extent=2.0)
    trained.student.active_sh_degree = 1
    fresh = Feature3DGSTask(cfg, _field(num=20, render_dim=4, teacher_dim=6, seed=3), scene_extent=2.0)
    fresh.load_checkpoint_state_dict(trained.checkpoint_state_dict())
    fresh.load_extra_state_dict(trained.extra_state_dict())
    assert fresh.student.num_gaussians == 50 and fresh.student.active_sh_degree == 1
    for k, v in trained.student.state_dict().items():
        torch.testing.assert_close(fresh.student.state_dict()[k], v)
    opts, scheds = fresh.configure_optimizers(cfg.train)
    assert set(opts) == {"means", "scales", "quats", "opacities", "sh0", "shN", "features", "decoder"}
    assert opts["means"].param_groups[0]["params"][0] is fresh.student.params["means"]
    assert opts["means"].param_groups[0]["lr"] == pytest.approx(cfg.optim.means_lr * 2.0)
    assert set(scheds) == {"means"}
