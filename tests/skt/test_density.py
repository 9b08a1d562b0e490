"""Ground-truth density maps: scipy per-head parity, count preservation, kernels, downsampling, cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from scipy.spatial import KDTree

from vkd.skt.density import (
    DensityCache,
    KernelSpec,
    adaptive_sigmas,
    bicubic_x64,
    density_map,
    kernel_sigmas,
    nn_capped_sigmas,
    sum_pool,
)


def _heads(n: int, h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pts = np.stack([rng.uniform(0, w, n), rng.uniform(0, h, n)], -1)
    pts[:3] = [[0.2, 0.7], [w - 0.5, h - 0.1], [w / 2, 0.3]]  # heads on the border lose mass under `constant`
    return pts


def _reference_adaptive(points: np.ndarray, shape: tuple[int, int], mode: str) -> np.ndarray:
    """CSRNet-pytorch's make_dataset: one gaussian_filter per head, σ = 0.1·(d1+d2+d3) from KDTree(k=4)."""
    dens = np.zeros(shape, np.float64)
    dist, _ = KDTree(points.copy(), leafsize=2048).query(points, k=4)
    for i, (x, y) in enumerate(points):
        delta = np.zeros(shape, np.float64)
        delta[int(y), int(x)] = 1.0
        sigma = (dist[i, 1] + dist[i, 2] + dist[i, 3]) * 0.1
        dens += gaussian_filter(delta, sigma, mode=mode)
    return dens


@pytest.mark.parametrize("mode", ["constant", "reflect"])
def test_matches_scipy_per_head_reference(mode):
    h, w = 40, 52
    pts = _heads(25, h, w, seed=0)
    ours = density_map(pts, h, w, KernelSpec("adaptive", border=mode)).double().numpy()
    ref = _reference_adaptive(pts, (h, w), mode)
    assert np.abs(ours - ref).max() <= 1e-6
    if mode == "constant":
        assert ours.sum() < len(pts) - 0.1  # the reference loses border mass
    else:
        assert ours.sum() == pytest.approx(len(pts), abs=1e-4)


def test_fixed_sigma_matches_single_filter_reflect():
    # ShanghaiTech B: one gaussian_filter(σ=15, reflect) over the dot map.
    h, w = 48, 64
    pts = _heads(30, h, w, seed=1)
    dots = np.zeros((h, w))
    for x, y in pts:
        dots[int(y), int(x)] += 1
    ref = gaussian_filter(dots, 15.0, mode="reflect")
    ours = density_map(pts, h, w, KernelSpec("fixed", sigma=15.0, border="reflect")).double().numpy()
    assert np.abs(ours - ref).max() <= 1e-6


@pytest.mark.parametrize("kind", ["adaptive", "nn_capped", "fixed"])
def test_renormalize_sums_to_count(kind):
    h, w = 33, 47
    pts = _heads(40, h, w, seed=2)
    d = density_map(pts, h, w, KernelSpec(kind, border="renormalize"))
    assert d.shape == (h, w)
    assert float(d.double().sum()) == pytest.approx(len(pts), abs=1e-3)
    assert float(d.min()) >= 0


def test_adaptive_sigmas_reference_formula_and_edge_cases():
    pts = _heads(30, 50, 60, seed=3)
    dist, _ = KDTree(pts).query(pts, k=4)
    assert np.allclose(adaptive_sigmas(pts, (50, 60)), 0.1 * dist[:, 1:].sum(1))
    assert adaptive_sigmas(pts[:1], (40, 80)).tolist() == [15.0]  # mean(H, W) / 4
    two = adaptive_sigmas(pts[:2], (50, 60))  # fewer than k neighbours: the available one
    d = np.linalg.norm(pts[0] - pts[1])
    assert np.allclose(two, 0.3 * d)
    assert adaptive_sigmas(np.zeros((0, 2)), (5, 5)).shape == (0,)


def test_nn_capped_sigmas():
    pts = np.array([[0.0, 0.0], [3.0, 4.0], [100.0, 0.0]])
    assert np.allclose(nn_capped_sigmas(pts, (200, 200), cap=30.0), [5.0, 5.0, 30.0])
    assert np.allclose(kernel_sigmas(pts, (10, 10), KernelSpec("fixed", sigma=4.0)), 4.0)


def test_sum_pool_preserves_count_exactly():
    torch.manual_seed(0)
    d = torch.rand(2, 37, 45, dtype=torch.float64)
    pooled = sum_pool(d, 8)
    assert pooled.shape == (2, 5, 6)
    assert torch.allclose(pooled.sum((-2, -1)), d.sum((-2, -1)))
    assert torch.allclose(pooled[0, 0, 0], d[0, :8, :8].sum())


def test_bicubic_reference_is_not_count_preserving():
    h, w = 60, 70
    pts = _heads(40, h, w, seed=4)
    d = density_map(pts, h, w, KernelSpec(border="renormalize"))
    b = bicubic_x64(d)
    assert b.shape == (8, 9)
    assert abs(float(b.sum()) - len(pts)) > 1e-3


def test_cache_roundtrip_and_key(tmp_path):
    pts = _heads(10, 30, 30, seed=5)
    cache = DensityCache(tmp_path / "cache")
    a = cache.get(pts, 30, 30, KernelSpec(), name="img")
    files = list((tmp_path / "cache").glob("img-*.npy"))
    assert len(files) == 1
    b = cache.get(pts, 30, 30, KernelSpec(), name="img")
    assert np.array_equal(np.asarray(a), np.asarray(b))
    cache.get(pts, 30, 30, KernelSpec(beta=0.2), name="img")  # another parameter: another file
    assert len(list((tmp_path / "cache").glob("img-*.npy"))) == 2
    assert np.allclose(DensityCache(None).get(pts, 30, 30, KernelSpec()), a)
