"""splat_points_2d vs per-point scipy.ndimage.gaussian_filter for each border mode."""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from vkd.render import gaussian_kernel_1d, geometry_adaptive_sigmas, splat_points_2d


def _reference(points, sigmas, H, W, mode, truncate):
    """Per-head scipy pipeline: a float64 delta per point, filtered, summed."""
    out = np.zeros((H, W))
    for (x, y), s in zip(points, sigmas, strict=True):
        d = np.zeros((H, W))
        d[min(max(int(np.floor(y)), 0), H - 1), min(max(int(np.floor(x)), 0), W - 1)] = 1.0
        g = gaussian_filter(d, s, mode="constant" if mode == "renormalize" else mode, truncate=truncate)
        if mode == "renormalize":
            g = g / g.sum()
        out += g
    return out


@pytest.mark.parametrize("mode", ["constant", "reflect", "mirror", "wrap", "renormalize"])
@pytest.mark.parametrize("hw", [(1, 1), (1, 6), (2, 3), (9, 7), (33, 48)])
def test_matches_scipy_per_point(mode, hw):
    H, W = hw
    rng = np.random.default_rng(hash((mode, hw)) % 2**32)
    for _ in range(12):
        x, y = rng.uniform(-3, W + 3), rng.uniform(-3, H + 3)
        s = float(rng.choice([0.0, 0.4, 1.0, 2.6, 9.0, 60.0]))  # includes kernels longer than the image
        tr = float(rng.choice([4.0, 2.5, 1.0]))
        ref = _reference([(x, y)], [s], H, W, mode, tr)
        out = splat_points_2d(torch.tensor([[x, y]]), s, H, W, truncate=tr, border=mode, dtype=torch.float64)
        np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-12)
        out32 = splat_points_2d(torch.tensor([[x, y]]), s, H, W, truncate=tr, border=mode)
        assert out32.dtype == torch.float32
        np.testing.assert_allclose(out32.numpy(), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["constant", "reflect", "mirror", "renormalize"])
def test_many_points_adaptive_sigmas(mode):
    H, W = 48, 64
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(40, 2, generator=g, dtype=torch.float64) * torch.tensor([W, H], dtype=torch.float64)
    sig = geometry_adaptive_sigmas(pts)
    assert sig.shape == (40,) and (sig > 0).all()
    out = splat_points_2d(pts, sig, H, W, border=mode)
    ref = _reference(pts.numpy(), sig.numpy(), H, W, mode, 4.0)
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-6)
    if mode in ("reflect", "renormalize"):  # 'mirror' does not preserve mass near the border (as in scipy)
        assert abs(float(out.double().sum()) - 40.0) < 1e-4  # mass preserved inside the image


def test_weights_and_float32_scipy_pipeline():
    # CSRNet-style reference: float32 delta image, int() truncation for in-image heads.
    H, W = 20, 30
    pts = torch.tensor([[3.7, 4.2], [29.9, 19.99], [0.0, 0.0], [15.5, 10.5]])
    w = torch.tensor([1.0, 2.0, 0.5, 1.5])
    ref = np.zeros((H, W), np.float32)
    for (x, y), wi in zip(pts.tolist(), w.tolist(), strict=True):
        d = np.zeros((H, W), np.float32)
        d[int(y), int(x)] = 1.0
        ref += wi * gaussian_filter(d, 2.0, mode="constant")
    out = splat_points_2d(pts, 2.0, H, W, weights=w)
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-6)


def test_kernel_matches_scipy():
    from scipy.ndimage._filters import _gaussian_kernel1d  # test-only oracle

    for s, tr in [(1.0, 4.0), (2.3, 3.0), (0.2, 4.0)]:
        r = int(tr * s + 0.5)
        np.testing.assert_allclose(gaussian_kernel_1d(s, tr).numpy(), _gaussian_kernel1d(s, 0, r), atol=1e-15)
    assert torch.equal(gaussian_kernel_1d(0.0), torch.ones(1, dtype=torch.float64))


def test_empty_and_bad_inputs():
    assert torch.equal(splat_points_2d(torch.zeros(0, 2), 1.0, 4, 5), torch.zeros(4, 5))
    with pytest.raises(ValueError, match=r"points"):
        splat_points_2d(torch.zeros(3, 3), 1.0, 4, 5)
    with pytest.raises(ValueError, match=r"sigmas"):
        splat_points_2d(torch.zeros(3, 2), torch.ones(2), 4, 5)
    with pytest.raises(ValueError, match=r"height and width"):
        splat_points_2d(torch.zeros(3, 2), 1.0, 0, 5)
    with pytest.raises(ValueError, match=r"non-finite"):
        splat_points_2d(torch.tensor([[float("nan"), 1.0]]), 1.0, 4, 5)
    with pytest.raises(ValueError, match=r"border"):
        splat_points_2d(torch.zeros(1, 2), 1.0, 4, 5, border="nearest")
    with pytest.raises(ValueError, match=r"sigmas"):
        splat_points_2d(torch.zeros(1, 2), -1.0, 4, 5)


def test_array_like_inputs():
    import numpy as np

    pts = np.array([[3.2, 4.5], [1.0, 1.0]])
    ref = splat_points_2d(torch.tensor(pts), torch.tensor([1.0, 2.0]), 8, 9, weights=torch.tensor([1.0, 0.5]))
    out = splat_points_2d(pts, np.array([1.0, 2.0]), 8, 9, weights=[1.0, 0.5])
    torch.testing.assert_close(out, ref)
    assert splat_points_2d(np.zeros((0, 2)), 1.0, 4, 5).shape == (4, 5)


def test_geometry_adaptive_sigmas_brute_force():
    g = torch.Generator().manual_seed(3)
    pts = torch.rand(200, 2, generator=g, dtype=torch.float64) * 300
    d = torch.cdist(pts, pts)
    ref = 0.3 * d.topk(4, largest=False).values[:, 1:].mean(-1)  # 3 nearest others
    torch.testing.assert_close(geometry_adaptive_sigmas(pts, k=3, beta=0.3), ref)
    two = geometry_adaptive_sigmas(pts[:2], k=3)  # fewer neighbours than k
    torch.testing.assert_close(two, 0.3 * d[0, 1].expand(2))
    assert geometry_adaptive_sigmas(pts[:1], image_size=(40, 80)).item() == 15.0  # CSRNet: mean(H, W) / 4
