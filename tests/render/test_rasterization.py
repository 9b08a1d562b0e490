"""vkd.render.rasterization (torch backend) vs a literal per-pixel float64 reference, gradients, modes, errors."""

from __future__ import annotations

import math
import sys

import pytest
import torch

import vkd.render.gsplat_backend as gsb
import vkd.render.torch_backend as tb
from vkd.render import rasterization, rasterization_adjoint
from vkd.render.sh import eval_sh

F64 = torch.float64


# ----------------------------------------------------------------------------------------------------------------
# Reference: gsplat's rules (spec render.md §6) written literally, in python floats (float64), one pixel at a time.
# ----------------------------------------------------------------------------------------------------------------
def _ref_project(
    means, quats, scales, opac, viewmat, K, W, H, near=0.01, far=1e10, eps2d=0.3, antialiased=False
):
    out = []
    for i in range(means.shape[0]):
        w, x, y, z = (quats[i] / quats[i].norm()).tolist()
        R = torch.tensor(
            [
                [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
            ],
            dtype=F64,
        )
        S = torch.diag(scales[i].double())
        cov = R @ S @ S @ R.T
        Rv, tv = viewmat[:3, :3].double(), viewmat[:3, 3].double()
        X, Y, Z = (Rv @ means[i].double() + tv).tolist()
        if Z < near or Z > far:
            continue
        cc = Rv @ cov @ Rv.T
        fx, fy, cx, cy = K[0, 0].item(), K[1, 1].item(), K[0, 2].item(), K[1, 2].item()
        u, v = fx * X / Z + cx, fy * Y / Z + cy
        tanx, tany = 0.5 * W / fx, 0.5 * H / fy
        tx = Z * min((W - cx) / fx + 0.3 * tanx, max(-(cx / fx + 0.3 * tanx), X / Z))
        ty = Z * min((H - cy) / fy + 0.3 * tany, max(-(cy / fy + 0.3 * tany), Y / Z))
        J = torch.tensor([[fx / Z, 0.0, -fx * tx / Z**2], [0.0, fy / Z, -fy * ty / Z**2]], dtype=F64)
        c2 = J @ cc @ J.T
        det0 = float(torch.det(c2))
        c2 = c2 + eps2d * torch.eye(2, dtype=F64)
        det = float(torch.det(c2))
        if det <= 0:
            continue
        o = float(opac[i])
        if antialiased:
            o *= math.sqrt(max(0.0, det0 / det))
        if o < 1 / 255:
            continue
        a, b, c = c2[1, 1].item() / det, -c2[0, 1].item() / det, c2[0, 0].item() / det
        out.append((Z, i, u, v, a, b, c, o))
    out.sort(key=lambda g: g[0])  # front to back (ties: index order, like a stable sort)
    return out


def reference_render(means, quats, scales, opac, feats, viewmat, K, W, H, bg=None, **kw):
    """``[H, W, D]`` image and ``[H, W]`` alpha, per pixel, with an explicit ``break`` at T ≤ 1e-4."""
    gs = _ref_project(means, quats, scales, opac, viewmat, K, W, H, **kw)
    f = feats.double().tolist()
    D = feats.shape[1]
    img = torch.zeros(H, W, D, dtype=F64)
    alpha = torch.zeros(H, W, dtype=F64)
    for i in range(H):
        for j in range(W):
            px, py = j + 0.5, i + 0.5
            T = 1.0
            acc = [0.0] * D
            for _, g, u, v, a, b, c, o in gs:
                dx, dy = u - px, v - py
                sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
                al = min(0.999, o * math.exp(-sigma))
                if sigma < 0 or al < 1 / 255:
                    continue
                nT = T * (1 - al)
                if nT <= 1e-4:
                    break
                for k in range(D):
                    acc[k] += al * T * f[g][k]
                T = nT
            img[i, j] = torch.tensor(acc, dtype=F64)
            if bg is not None:
                img[i, j] += T * bg.double()
            alpha[i, j] = 1 - T
    return img, alpha


def random_scene(N, D, seed, dtype=F64, omax=0.95, spread=0.6, log_scale=-2.0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(N, 3, generator=g, dtype=dtype) * spread + torch.tensor([0.0, 0.0, 3.0], dtype=dtype)
    quats = torch.randn(N, 4, generator=g, dtype=dtype)
    scales = torch.exp(torch.randn(N, 3, generator=g, dtype=dtype) * 0.5 + log_scale)
    opac = torch.rand(N, generator=g, dtype=dtype) * omax
    feats = torch.rand(N, D, generator=g, dtype=dtype)
    return means, quats, scales, opac, feats


def cameras(C, W, H, dtype=F64, f=30.0):
    vm = torch.eye(4, dtype=dtype).repeat(C, 1, 1)
    for c in range(1, C):  # small rotations about y plus a shift
        ang = 0.15 * c
        vm[c, 0, 0], vm[c, 0, 2], vm[c, 2, 0], vm[c, 2, 2] = (
            math.cos(ang),
            math.sin(ang),
            -math.sin(ang),
            math.cos(ang),
        )
        vm[c, 0, 3] = 0.2 * c
    K = torch.tensor([[f, 0, W / 2 + 0.3], [0, f * 1.1, H / 2 - 0.2], [0, 0, 1]], dtype=dtype).repeat(C, 1, 1)
    return vm, K


# ------------------------------------------------------------------------------------------------ forward vs ref
@pytest.mark.parametrize("D", [1, 3, 16, 65])
def test_matches_reference_several_cameras(D):
    W, H, C = 21, 17, 3
    m, q, s, o, f = random_scene(70, D, seed=D)
    vm, K = cameras(C, W, H)
    bg = torch.rand(C, D, dtype=F64)
    img, alpha, meta = rasterization(m, q, s, o, f, vm, K, W, H, backgrounds=bg, backend="torch")
    assert img.shape == (C, H, W, D) and alpha.shape == (C, H, W, 1)
    assert meta["backend"] == "torch"
    for c in range(C):
        ri, ra = reference_render(m, q, s, o, f, vm[c], K[c], W, H, bg=bg[c])
        torch.testing.assert_close(img[c], ri, rtol=0, atol=1e-12)
        torch.testing.assert_close(alpha[c, ..., 0], ra, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["classic", "antialiased"])
def test_dense_scene_early_stop_and_clamp(mode):
    """Many opaque Gaussians: transmittance reaches 1e-4 and α is clamped at 0.999."""
    W, H = 19, 15
    m, q, s, o, f = random_scene(160, 4, seed=7, spread=0.4, log_scale=-1.6)
    o = torch.where(torch.arange(160) % 3 == 0, torch.full_like(o, 0.9995), o)
    vm, K = cameras(1, W, H)
    img, alpha, _ = rasterization(m, q, s, o, f, vm, K, W, H, backend="torch", rasterize_mode=mode)
    ri, ra = reference_render(m, q, s, o, f, vm[0], K[0], W, H, antialiased=mode == "antialiased")
    assert float((1 - ra).min()) < 2e-4  # the early stop was exercised
    torch.testing.assert_close(img[0], ri, rtol=0, atol=1e-12)
    torch.testing.assert_close(alpha[0, ..., 0], ra, rtol=0, atol=1e-12)


def test_float32_close_to_float64():
    W, H = 40, 30
    m, q, s, o, f = random_scene(300, 16, seed=3)
    vm, K = cameras(2, W, H)
    i64, a64, _ = rasterization(m, q, s, o, f, vm, K, W, H, backend="torch")
    args32 = [t.float() for t in (m, q, s, o, f, vm, K)]
    i32, a32, _ = rasterization(*args32, W, H, backend="torch")
    assert i32.dtype == torch.float32
    assert (i32.double() - i64).abs().max() < 2e-4
    assert (a32.double() - a64).abs().max() < 2e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_region_renders_in_float32(dtype):
    """A training step under bf16/fp16 mixed precision renders exactly the float32 image with float32 gradients
    (the torch compositor used to fail on bf16 accumulators: found by scripts/gpu_check.py's bf16 steps)."""
    W, H = 24, 18
    m, q, s, o, f = (t.float() for t in random_scene(120, 8, seed=5))
    vm, K = (t.float() for t in cameras(2, W, H))
    ref, ref_alpha, _ = rasterization(m, q, s, o, f, vm, K, W, H, backend="torch")
    leaf = f.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        colors = leaf @ torch.eye(8)  # computed under autocast: arrives in the low precision
        assert colors.dtype == dtype
        img, alpha, _ = rasterization(m, q, s, o, colors, vm, K, W, H, backend="torch")
    assert img.dtype == torch.float32
    torch.testing.assert_close(alpha, ref_alpha, rtol=0, atol=0)
    torch.testing.assert_close(img, ref, rtol=0, atol=1e-2)  # the colours themselves were rounded to dtype
    img.sum().backward()
    assert leaf.grad.dtype == torch.float32 and torch.isfinite(leaf.grad).all()


def test_per_camera_colors_and_sh():
    W, H, C = 16, 12, 2
    m, q, s, o, _ = random_scene(40, 3, seed=11)
    vm, K = cameras(C, W, H)
    g = torch.Generator().manual_seed(0)
    fc = torch.rand(C, 40, 5, generator=g, dtype=F64)
    img, _, _ = rasterization(m, q, s, o, fc, vm, K, W, H, backend="torch")
    for c in range(C):
        ri, _ = reference_render(m, q, s, o, fc[c], vm[c], K[c], W, H)
        torch.testing.assert_close(img[c], ri, rtol=0, atol=1e-12)
    # SH: colours are max(SH(dir from camera centre) + 0.5, 0), evaluated per camera.
    sh = torch.randn(40, 9, 3, generator=g, dtype=F64) * 0.3
    img_sh, _, _ = rasterization(m, q, s, o, sh, vm, K, W, H, sh_degree=2, backend="torch")
    campos = torch.linalg.inv(vm)[:, :3, 3]
    for c in range(C):
        rgb = torch.clamp_min(eval_sh(2, m - campos[c], sh) + 0.5, 0.0)
        ri, _ = reference_render(m, q, s, o, rgb, vm[c], K[c], W, H)
        torch.testing.assert_close(img_sh[c], ri, rtol=0, atol=1e-12)


def test_sh_matches_gsplat_torch_reference():
    from gsplat.cuda._torch_impl import _spherical_harmonics  # CPU-safe test oracle only

    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(50, 3, generator=g, dtype=F64)
    for deg in range(5):
        coeffs = torch.randn(50, 25, 3, generator=g, dtype=F64)
        torch.testing.assert_close(eval_sh(deg, dirs, coeffs), _spherical_harmonics(deg, dirs, coeffs))


@pytest.mark.parametrize("antialiased", [False, True])
def test_projection_matches_gsplat_torch_reference(antialiased):
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci

    W, H = 40, 30
    m, q, s, o, _ = random_scene(200, 1, seed=5, spread=1.5)
    vm, K = cameras(2, W, H)
    p = tb.project_gaussians(m, q, s, o, vm, K, W, H, antialiased=antialiased)
    covars, _ = _quat_scale_to_covar_preci(q, s, compute_preci=False)
    radii, means2d, depths, conics, comp = _fully_fused_projection(
        m, covars, vm, K, W, H, calc_compensations=antialiased
    )
    ok = p["valid"]
    assert ok.sum() > 100
    torch.testing.assert_close(p["means2d"][ok], means2d[ok])
    torch.testing.assert_close(p["depths"][ok], depths[ok])
    torch.testing.assert_close(p["conics"][ok], conics[ok])
    expect_o = o[None].expand_as(depths) * (comp if antialiased else 1.0)
    torch.testing.assert_close(p["opacities"][ok], expect_o[ok])
    # The opacity-aware radii (CUDA rule) are never larger than the torch reference's 3.33-sigma radii.
    assert (p["radii"][ok] <= radii[ok]).all()


# ------------------------------------------------------------------------------------------------ gradients
def test_gradcheck_all_parameters():
    W, H = 11, 9
    m, q, s, o, f = random_scene(4, 2, seed=2, omax=0.8, spread=0.15, log_scale=-1.2)
    o = o + 0.1
    vm, K = cameras(1, W, H, f=12.0)
    bg = torch.rand(1, 2, dtype=F64)

    # A few random projections of (image, alpha) keep the number of backward passes small.
    proj = torch.randn(4, H * W * 3, generator=torch.Generator().manual_seed(0), dtype=F64)

    def fn(m_, q_, s_, o_, f_, bg_, vm_):
        img, alpha, _ = rasterization(m_, q_, s_, o_, f_, vm_, K, W, H, backgrounds=bg_, backend="torch")
        return proj @ torch.cat([img.reshape(-1), alpha.reshape(-1)])

    vm = vm.clone()
    vm[0, :3, 3] = torch.tensor([0.02, -0.01, 0.05], dtype=F64)
    inputs = [t.clone().requires_grad_() for t in (m, q, s, o, f, bg, vm)]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradcheck_compositor_means2d_conics_opacities():
    """The 2D stage alone (what meta['means2d'].grad reports) against finite differences."""
    W, H = 13, 10
    g = torch.Generator().manual_seed(4)
    N = 6
    means2d = (torch.rand(1, N, 2, generator=g, dtype=F64) * torch.tensor([W, H], dtype=F64)).requires_grad_()
    A = torch.randn(1, N, 2, 2, generator=g, dtype=F64) * 0.4
    cov = A @ A.transpose(-1, -2) + 2.0 * torch.eye(2, dtype=F64)
    inv = torch.linalg.inv(cov)
    conics = torch.stack([inv[..., 0, 0], inv[..., 0, 1], inv[..., 1, 1]], -1).requires_grad_()
    opac = (torch.rand(1, N, generator=g, dtype=F64) * 0.6 + 0.2).requires_grad_()
    feats = torch.rand(N, 3, generator=g, dtype=F64).requires_grad_()
    depths = torch.rand(1, N, generator=g, dtype=F64) + 1
    radii = torch.full((1, N, 2), 12, dtype=torch.int32)

    proj = torch.randn(4, H * W * 4, generator=torch.Generator().manual_seed(1), dtype=F64)

    def fn(m2, cn, op, ft):
        sched = tb.build_tile_schedule(m2.detach(), radii, depths, W, H, 8)
        img, alpha = tb.composite_tiles(m2, cn, op, ft, sched, W, H)
        return proj @ torch.cat([img.reshape(-1), alpha.reshape(-1)])

    assert torch.autograd.gradcheck(fn, (means2d, conics, opac, feats), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradients_recomputed_path_equals_saved_path(monkeypatch):
    W, H = 24, 18
    m, q, s, o, f = random_scene(120, 6, seed=9, spread=0.4, log_scale=-1.7)
    o = torch.where(torch.arange(120) % 4 == 0, torch.full_like(o, 0.9995), o)  # clamps and early stops
    vm, K = cameras(2, W, H)

    def grads():
        ps = [t.clone().requires_grad_() for t in (m, q, s, o, f)]
        img, alpha, _ = rasterization(*ps, vm, K, W, H, backend="torch")
        w = torch.linspace(-1, 1, img.numel(), dtype=F64).reshape(img.shape)
        ((img * w).sum() + alpha.square().sum()).backward()
        return [p.grad for p in ps]

    g_saved = grads()
    variants = []
    monkeypatch.setattr(tb, "CHUNK", 10**9)  # one chunk per tile
    variants.append(grads())
    monkeypatch.setattr(tb, "CHUNK", 5)  # many chunks: suffix sums and the stop cross chunk borders
    variants.append(grads())
    monkeypatch.setattr(tb, "SAVE_MAX_ELEMENTS", 0)  # recompute in backward
    variants.append(grads())
    monkeypatch.setattr(tb, "CHUNK", 16)
    monkeypatch.setattr(tb, "DEFAULT_BLOCK_ELEMENTS", 600)  # 16·64 > 600: pixel-split items
    variants.append(grads())
    for g_other in variants:
        for a, b in zip(g_saved, g_other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_small_chunks_match_reference(monkeypatch):
    monkeypatch.setattr(tb, "CHUNK", 3)
    W, H = 19, 15
    m, q, s, o, f = random_scene(160, 2, seed=8, spread=0.4, log_scale=-1.6)
    vm, K = cameras(1, W, H)
    img, alpha, _ = rasterization(m, q, s, o, f, vm, K, W, H, backend="torch")
    ri, ra = reference_render(m, q, s, o, f, vm[0], K[0], W, H)
    assert float((1 - ra).min()) < 2e-4
    torch.testing.assert_close(img[0], ri, rtol=0, atol=1e-12)
    torch.testing.assert_close(alpha[0, ..., 0], ra, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------ adjoint
@pytest.mark.parametrize("mode", ["classic", "antialiased"])
def test_adjoint_is_the_colour_gradient_and_the_weighted_sum_of_the_reference(monkeypatch, mode):
    """rasterization_adjoint = ∂(Σ img·grad)/∂colours (autograd, with and without geometry gradients) = Σ_p w_i(p)
    grad(p) with the weights of the literal reference (one-hot colours render w_i), with early stops, clamps and
    chunk borders (CHUNK 5), over two cameras."""
    monkeypatch.setattr(tb, "CHUNK", 5)
    W, H, N, D = 19, 15, 90, 7
    m, q, s, o, _ = random_scene(N, D, seed=21, spread=0.4, log_scale=-1.6)
    o = torch.where(torch.arange(N) % 4 == 0, torch.full_like(o, 0.9995), o)
    vm, K = cameras(2, W, H)
    grad = torch.randn(2, H, W, D, generator=torch.Generator().manual_seed(3), dtype=F64)
    adj = rasterization_adjoint(m, q, s, o, vm, K, grad, rasterize_mode=mode)
    assert adj.shape == (N, D)
    for geometry in (False, True):
        ps = [t.clone().requires_grad_(geometry) for t in (m, q, s, o)]
        colours = torch.zeros(N, D, dtype=F64, requires_grad=True)
        img, _, _ = rasterization(*ps, colours, vm, K, W, H, backend="torch", rasterize_mode=mode)
        (img * grad).sum().backward()
        torch.testing.assert_close(adj, colours.grad, rtol=1e-10, atol=1e-12)
    eye = torch.eye(N, dtype=F64)
    weights = [reference_render(m, q, s, o, eye, vm[c], K[c], W, H, antialiased=mode == "antialiased")[0]
               for c in range(2)]  # [H, W, N] each: w_i(p)
    expected = sum(torch.einsum("hwn,hwd->nd", weights[c], grad[c]) for c in range(2))
    assert float(weights[0].sum(-1).max()) > 0.99  # opaque pixels: the early stop and the clamp matter
    torch.testing.assert_close(adj, expected, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------------ modes
def test_render_modes_and_backgrounds():
    W, H, C = 16, 12, 2
    m, q, s, o, f = random_scene(50, 3, seed=13)
    vm, K = cameras(C, W, H)
    bg = torch.rand(C, 3, dtype=F64)
    rgb, a, meta = rasterization(m, q, s, o, f, vm, K, W, H, backgrounds=bg, backend="torch")
    rgb0, a0, _ = rasterization(m, q, s, o, f, vm, K, W, H, backend="torch")
    torch.testing.assert_close(rgb, rgb0 + (1 - a0) * bg[:, None, None, :])
    torch.testing.assert_close(a, a0)
    d, ad, _ = rasterization(m, q, s, o, f, vm, K, W, H, backgrounds=bg, render_mode="D", backend="torch")
    ed, _, _ = rasterization(m, q, s, o, f, vm, K, W, H, render_mode="ED", backend="torch")
    rgbd, _, _ = rasterization(
        m, q, s, o, f, vm, K, W, H, backgrounds=bg, render_mode="RGB+D", backend="torch"
    )
    rgbed, _, _ = rasterization(m, q, s, o, f, vm, K, W, H, render_mode="RGB+ED", backend="torch")
    assert d.shape == (C, H, W, 1) and rgbd.shape == (C, H, W, 4)
    # Depth: Σ w z composited like a feature, with a zero background.
    for c in range(C):
        zc = (m @ vm[c, :3, :3].T + vm[c, :3, 3])[:, 2:3]
        rd, _ = reference_render(m, q, s, o, zc, vm[c], K[c], W, H)
        torch.testing.assert_close(d[c], rd, rtol=0, atol=1e-12)
    torch.testing.assert_close(rgbd[..., :3], rgb)
    torch.testing.assert_close(rgbd[..., 3:], d)
    torch.testing.assert_close(ed, d / a0.clamp(min=1e-10))
    torch.testing.assert_close(rgbed[..., 3:], ed)
    torch.testing.assert_close(ad, a0)


def test_near_far_and_radius_clip():
    W, H = 16, 12
    m, q, s, o, f = random_scene(60, 2, seed=17)
    vm, K = cameras(1, W, H)
    z = m[:, 2]
    img, _, meta = rasterization(m, q, s, o, f, vm, K, W, H, near_plane=2.8, far_plane=3.3, backend="torch")
    keep = (z >= 2.8) & (z <= 3.3)
    assert (meta["radii"][0][~keep] == 0).all()
    ri, _ = reference_render(m[keep], q[keep], s[keep], o[keep], f[keep], vm[0], K[0], W, H)
    torch.testing.assert_close(img[0], ri, rtol=0, atol=1e-12)
    _, _, meta_c = rasterization(m, q, s, o, f, vm, K, W, H, radius_clip=3.0, backend="torch")
    r = meta_c["radii"][0]
    vis = (r > 0).all(-1)
    assert vis.any() and (r[vis].max(-1).values > 3).all()


# ------------------------------------------------------------------------------------------------ degenerate
def test_no_gaussians_and_all_behind_camera():
    W, H, C, D = 10, 8, 2, 3
    vm, K = cameras(C, W, H)
    bg = torch.rand(C, D, dtype=F64)
    e = torch.zeros(0, 3, dtype=F64)
    img, a, meta = rasterization(
        e,
        torch.zeros(0, 4, dtype=F64),
        e.clone(),
        torch.zeros(0, dtype=F64),
        torch.zeros(0, D, dtype=F64),
        vm,
        K,
        W,
        H,
        backgrounds=bg,
        backend="torch",
    )
    torch.testing.assert_close(img, bg[:, None, None, :].expand(C, H, W, D))
    assert (a == 0).all() and meta["means2d"].shape == (C, 0, 2) and meta["radii"].shape == (C, 0, 2)

    m, q, s, o, f = [t.clone().requires_grad_() for t in random_scene(20, D, seed=1)]
    behind = m * torch.tensor([1.0, 1.0, -1.0], dtype=F64)
    img, a, meta = rasterization(behind, q, s, o, f, vm, K, W, H, backgrounds=bg, backend="torch")
    torch.testing.assert_close(img, bg[:, None, None, :].expand(C, H, W, D))
    assert (meta["radii"] == 0).all()
    meta["means2d"].retain_grad()
    img.sum().backward()
    assert (m.grad == 0).all() and (f.grad == 0).all() and (meta["means2d"].grad == 0).all()


def _good_args(N=5, C=2, D=3):
    m, q, s, o, f = random_scene(N, D, seed=0)
    vm, K = cameras(C, 8, 6)
    return dict(means=m, quats=q, scales=s, opacities=o, colors=f, viewmats=vm, Ks=K, width=8, height=6)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(means=torch.zeros(5, 2, dtype=F64)), r"means must be \[N, 3\].*\[5, 2\]"),
        (dict(quats=torch.zeros(5, 3, dtype=F64)), r"quats must be \[N, 4\]=\[5, 4\].*\[5, 3\]"),
        (dict(scales=torch.ones(4, 3, dtype=F64)), r"scales must be \[N, 3\]=\[5, 3\].*\[4, 3\]"),
        (dict(opacities=torch.ones(5, 1, dtype=F64)), r"opacities must be \[N\]=\[5\].*\[5, 1\]"),
        (dict(colors=torch.ones(6, 3, dtype=F64)), r"colors must be .*\[6, 3\]"),
        (dict(colors=torch.ones(3, 5, 3, dtype=F64)), r"colors must be .*\[3, 5, 3\]"),
        (dict(colors=torch.ones(5, 0, dtype=F64)), r"colors must have D >= 1"),
        (dict(viewmats=torch.eye(4, dtype=F64)), r"viewmats must be \[C, 4, 4\].*\[4, 4\]"),
        (dict(Ks=torch.eye(3, dtype=F64)[None]), r"Ks must be \[C, 3, 3\]=\[2, 3, 3\].*\[1, 3, 3\]"),
        (dict(backgrounds=torch.zeros(2, 4, dtype=F64)), r"backgrounds must be \[C, D\]=\[2, 3\].*\[2, 4\]"),
        (dict(width=0), r"image size must be positive"),
        (dict(height=-3), r"image size must be positive"),
        (dict(render_mode="RGBD"), r"render_mode"),
        (dict(rasterize_mode="aa"), r"rasterize_mode"),
        (dict(backend="cuda"), r"backend"),
        (dict(packed=True), r"packed"),
        (dict(absgrad=True), r"absgrad"),
        (dict(camera_model="fisheye"), r"camera_model"),
        (dict(sh_degree=1), r"SH coefficients"),
        (dict(scales=torch.ones(5, 3, dtype=torch.float32)), r"scales must have the dtype of means"),
    ],
)
def test_bad_inputs_raise_value_error(change, match):
    args = _good_args()
    args.update(change)
    with pytest.raises(ValueError, match=match):
        rasterization(**args)


@pytest.mark.parametrize("name", ["means", "quats", "scales", "opacities", "colors", "viewmats"])
def test_non_finite_inputs_raise(name):
    args = _good_args()
    t = args[name].clone()
    t.view(-1)[1] = float("nan") if name != "scales" else float("inf")
    args[name] = t
    with pytest.raises(ValueError, match=rf"{name} \(shape \[.*\]\) contains non-finite"):
        rasterization(**args)


# ------------------------------------------------------------------------------------------------ memory bound
def test_work_items_respect_block_budget():
    W, H = 64, 48
    m, q, s, o, f = random_scene(400, 3, seed=21, dtype=torch.float32, log_scale=-1.0)
    vm, K = cameras(1, W, H, dtype=torch.float32, f=60.0)
    p = tb.project_gaussians(m, q, s, o, vm, K, W, H)
    budget = 2048  # < CHUNK·64: long tiles are split by pixels
    sched = tb.build_tile_schedule(
        p["means2d"], p["radii"], p["depths"], W, H, 8, budget, conics=p["conics"], opacities=p["opacities"]
    )
    long_tiles = 0
    for tiles, G, p0, p1, _ in sched.items:
        n = tiles.numel() * min(G, tb.CHUNK) * (p1 - p0)  # elements of one [B, P, chunk] block
        assert n <= budget or (tiles.numel() == 1 and p1 - p0 == 1)
        long_tiles += p1 - p0 < 64
    assert long_tiles > 0  # some tiles were split by pixels
    # Every non-empty tile appears exactly once per pixel.
    cover = torch.zeros(sched.n_tiles, 64, dtype=torch.int64)
    for tiles, _, p0, p1, _ in sched.items:
        cover[tiles, p0:p1] += 1
    assert ((cover == 1) | (cover == 0)).all()
    assert (cover.sum(1)[sched.tile_counts > 0] == 64).all()


def test_ellipse_cull_keeps_image_identical(monkeypatch):
    """Dropping (tile, Gaussian) pairs whose α < 1/255 on the whole tile does not change the image."""
    W, H = 48, 40
    m, q, s, o, f = random_scene(150, 3, seed=23, log_scale=-1.5)
    vm, K = cameras(1, W, H, f=45.0)
    img, a, _ = rasterization(m, q, s, o, f, vm, K, W, H, backend="torch")
    orig = tb.build_tile_schedule

    def no_cull(*args, conics=None, opacities=None, **kw):
        return orig(*args, **kw)

    monkeypatch.setattr("vkd.render.rendering.build_tile_schedule", no_cull)
    img2, a2, _ = rasterization(m, q, s, o, f, vm, K, W, H, backend="torch")
    torch.testing.assert_close(img, img2, rtol=0, atol=1e-14)
    torch.testing.assert_close(a, a2, rtol=0, atol=1e-14)


# ------------------------------------------------------------------------------------------------ backend choice
def test_auto_on_cpu_uses_torch_and_never_loads_gsplat_extension():
    args = _good_args()
    loaded_before = "gsplat.cuda._backend" in sys.modules
    _, _, meta = rasterization(**args, backend="auto")
    assert meta["backend"] == "torch"
    assert loaded_before or "gsplat.cuda._backend" not in sys.modules


def test_gsplat_backend_refuses_cpu_tensors():
    with pytest.raises(RuntimeError, match=r"backend='gsplat' is not usable"):
        rasterization(**_good_args(), backend="gsplat")


def test_auto_on_cuda_stops_with_the_cause_instead_of_falling_back(monkeypatch):
    """A GPU run must not crawl on the torch rasterizer unasked: ``auto`` on CUDA inputs whose gsplat call fails
    stops with one line naming the cause and ``backend='torch'``; later calls say so again, explicit ``torch``
    works, explicit ``gsplat`` chains the original error, and a CUDA out-of-memory error passes through unchanged."""
    from vkd.errors import UserError

    gsb._reset_gsplat_status()
    monkeypatch.setattr(gsb, "gsplat_eligible", lambda tensors: (True, ""))
    calls = []

    def broken(**kw):
        calls.append(1)
        raise AttributeError("'NoneType' object has no attribute 'CameraModelType'")

    monkeypatch.setattr(gsb, "gsplat_rasterize", broken)
    try:
        with pytest.raises(gsb.GsplatUnavailable, match=r"CameraModelType.*backend='torch'") as ei:
            rasterization(**_good_args(), backend="auto")
        assert isinstance(ei.value, UserError) and len(calls) == 1 and "\n" not in str(ei.value)
        assert isinstance(gsb.gsplat_status(), str)
        # later calls on "CUDA" inputs: ineligible (disabled), and still refused with the cause
        # (what gsplat_eligible answers on CUDA tensors once disabled; CPU tensors cannot reach that branch here)
        monkeypatch.setattr(gsb, "gsplat_eligible",
                            lambda tensors: (False, f"gsplat disabled earlier in this process: {gsb.gsplat_status()}"))
        monkeypatch.setattr(gsb, "cuda_inputs", lambda tensors: True)
        with pytest.raises(gsb.GsplatUnavailable, match="CameraModelType"):
            rasterization(**_good_args(), backend="auto")
        monkeypatch.undo()
        img, _, meta = rasterization(**_good_args(), backend="torch")
        assert meta["backend"] == "torch"
        monkeypatch.setattr(gsb, "gsplat_eligible", lambda tensors: (True, ""))
        monkeypatch.setattr(gsb, "gsplat_rasterize", broken)
        with pytest.raises(RuntimeError) as ei:  # explicit gsplat chains the original error
            rasterization(**_good_args(), backend="gsplat")
        assert isinstance(ei.value.__cause__, AttributeError)

        gsb._reset_gsplat_status()

        def out_of_memory(**kw):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        monkeypatch.setattr(gsb, "gsplat_rasterize", out_of_memory)
        with pytest.raises(torch.cuda.OutOfMemoryError):
            rasterization(**_good_args(), backend="auto")
        assert gsb.gsplat_status() is None  # not disabled: the next call tries gsplat again
    finally:
        gsb._reset_gsplat_status()


def test_eligibility_requires_cuda_tensors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ok, why = gsb.gsplat_eligible([torch.zeros(1)])
    assert not ok and "CUDA" in why


# ------------------------------------------------------------------------------------------------ GPU parity
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("D", [3, 32, 128])
@pytest.mark.parametrize("mode", ["classic", "antialiased"])
def test_gpu_parity_with_gsplat(D, mode):
    W, H, C = 64, 48, 2
    m, q, s, o, f = random_scene(2000, D, seed=D, dtype=torch.float32, omax=0.98)
    vm, K = cameras(C, W, H, dtype=torch.float32, f=60.0)
    bg = torch.rand(C, D)
    cuda = [t.cuda() for t in (m, q, s, o, f, vm, K)]
    img_g, a_g, meta_g = rasterization(
        *cuda, W, H, backgrounds=bg.cuda(), backend="gsplat", rasterize_mode=mode
    )
    img_t, a_t, meta_t = rasterization(
        *cuda, W, H, backgrounds=bg.cuda(), backend="torch", rasterize_mode=mode
    )
    assert meta_g["backend"] == "gsplat" and meta_t["backend"] == "torch"
    # Radii use fast-math logf/sqrtf on CUDA: allow rare off-by-one pixel differences.
    dr = (meta_t["radii"] - meta_g["radii"]).abs()
    assert dr.max() <= 1 and (dr > 0).float().mean() < 1e-3
    # float32 rounding differs (CUDA fast-math, and the torch backend's tile-local quadratic form), so a pixel whose
    # α sits within ~1e-5 of the 1/255 threshold or whose T sits at the 1e-4 stop can flip: bound those rare pixels
    # loosely and the rest tightly.
    for x, y in ((img_t, img_g), (a_t, a_g)):
        diff = (x - y).abs()
        assert (diff > 1e-4).float().mean() < 1e-3
        assert diff.max() < 1e-2
        assert diff.mean() < 1e-5
