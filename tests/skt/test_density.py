"""Ground-truth density maps: scipy per-head parity, count preservation, kernels, downsampling, the 1/8 float16 cache
(crops equal to the full-resolution path, float16 count error, location outside a read-only data set)."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter
from scipy.spatial import KDTree

from vkd.skt.config import CrowdDataConfig
from vkd.skt.crowds import CrowdSpec, generate_crowd
from vkd.skt.datasets import (
    CrowdTrainDataset,
    build_eval_dataset,
    build_train_dataset,
    list_records,
    to_tensor,
)
from vkd.skt.density import (
    DensityCache,
    KernelSpec,
    adaptive_sigmas,
    bicubic_x64,
    dataset_fingerprint,
    density_cache_dir,
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


# ----------------------------------------------------------------------------------------------
# The 1/8 float16 cache
# ----------------------------------------------------------------------------------------------

FP16_HALF_ULP = 2.0 ** -11  # float16 rounding: relative error of a normal value
FP16_SUBNORMAL_STEP = 2.0 ** -24  # absolute step below float16's smallest normal (6.1e-5)


def _generic_set(root, h, w, n, seed, name="img"):
    """One image + side-car JSON in the generic layout (``root/train/NAME.png`` + ``NAME.json``)."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "train" / f"{name}.png")
    pts = _heads(n, h, w, seed)
    (root / "train" / f"{name}.json").write_text(json.dumps(pts.tolist()))
    return pts


def _fp16_close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` is ``b`` rounded to float16 (one rounding, or none)."""
    return bool(((a.double() - b.double()).abs() <= FP16_HALF_ULP * b.double().abs() + FP16_SUBNORMAL_STEP).all())


def test_eighth_cache_crops_equal_full_resolution_crops_then_pool(tmp_path):
    """A training sample read from the 1/8 float16 cache equals the full-resolution path (crop the [H, W] map, pad
    a flipped edge crop to whole cells, flip, sum-pool) to float16 rounding, for ratio crops, fixed crops and whole
    images, flipped or not, on an image whose sides are no multiple of 8."""
    h, w = 75, 101
    _generic_set(tmp_path / "data", h, w, 60, seed=7)
    recs = list_records(tmp_path / "data", "generic", "train")
    spec = KernelSpec()
    full_map = density_map(recs[0].points, h, w, spec)  # [H, W] float32, computed here, no cache
    image = np.asarray(Image.open(recs[0].image_path).convert("RGB"))
    seen = {"flip": 0, "edge_flip_padded": 0, "inner": 0}
    for kwargs in ({"crop": "ratio", "crop_ratio": (0.3, 1.0), "flip_prob": 0.5},
                   {"crop": "fixed", "crop_size": 37, "flip_prob": 0.5}, {"crop": "none", "flip_prob": 1.0}):
        eighth = CrowdTrainDataset(recs, spec, DensityCache(tmp_path / "c8", "eighth"), **kwargs)
        full = CrowdTrainDataset(recs, spec, DensityCache(tmp_path / "c32", "full"), **kwargs)
        for seed in range(40 if kwargs["crop"] != "none" else 1):
            torch.manual_seed(seed)
            y0, x0, ch, cw = eighth._crop_box(h, w)  # the draws __getitem__ makes, in its order
            flip = float(torch.rand(())) < eighth.flip_prob
            torch.manual_seed(seed)
            item = eighth[0]
            torch.manual_seed(seed)
            item_full = full[0]
            # the reference: full-resolution crop, zero-padded to whole cells when flipped, flipped, sum-pooled
            den = full_map[y0:y0 + ch, x0:x0 + cw]
            img = to_tensor(image[y0:y0 + ch, x0:x0 + cw])
            if flip:
                pad = -cw % 8
                den, img = torch.nn.functional.pad(den, (0, pad)).flip(-1), torch.nn.functional.pad(img, (0, pad)).flip(-1)
                seen["flip"] += 1
                seen["edge_flip_padded"] += pad > 0
            seen["inner"] += y0 > 0 and x0 > 0 and y0 + ch < h and x0 + cw < w
            reference = sum_pool(den.double())[None]
            assert y0 % 8 == 0 and x0 % 8 == 0 and (ch % 8 == 0 or y0 + ch == h) and (cw % 8 == 0 or x0 + cw == w)
            assert item["density"].shape == reference.shape == (1, -(-img.shape[-2] // 8), -(-img.shape[-1] // 8))
            assert torch.equal(item["image"], img) and torch.equal(item_full["image"], img)
            assert _fp16_close(item["density"], reference)
            assert torch.allclose(item_full["density"].double(), reference, rtol=1e-5, atol=1e-7)
            assert float(item["count"]) == pytest.approx(float(den.double().sum()), rel=1e-3, abs=1e-4)
    assert min(seen.values()) > 0, seen  # every case was exercised


def test_float16_count_error_and_bytes_on_a_ucf_qnrf_sized_crowd(tmp_path):
    """A UCF-QNRF-sized synthetic crowd (2013×2902 px, 815 heads): the 1/8 float16 map is ≤ 1/100 of the
    full-resolution float32 bytes, and float16 moves the count by less than 0.01 person and no cell by more
    than its rounding (subnormal cells included)."""
    _, pts = generate_crowd(np.random.default_rng(0), CrowdSpec(height=2013, width=2902, count_min=1000,
                                                                 count_max=1000, supersample=1))
    assert len(pts) == 815
    h, w = 2013, 2902
    for spec in (KernelSpec("nn_capped", cap=30.0), KernelSpec("adaptive"), KernelSpec("fixed", sigma=15.0)):
        cache = DensityCache(tmp_path / spec.kind, "eighth")
        stored = cache.get(pts, h, w, spec, name="qnrf")
        assert stored.dtype == np.float16 and stored.shape == (252, 363)
        exact = sum_pool(density_map(pts, h, w, spec).double())  # float64 pooling of the float32 map
        assert _fp16_close(torch.from_numpy(np.asarray(stored)), exact)
        count_error = abs(float(np.asarray(stored, dtype=np.float64).sum()) - float(exact.sum()))
        assert count_error < 0.01, (spec.kind, count_error)
        assert abs(float(exact.sum()) - len(pts)) < 1e-3  # renormalize keeps every head's mass
        file = next((tmp_path / spec.kind).glob("qnrf-*.npy"))
        assert file.stat().st_size <= 4 * h * w / 100  # the old format: full-resolution float32


def test_eighth_cache_roundtrip_torn_file_and_key(tmp_path):
    pts = _heads(12, 30, 41, seed=8)
    cache = DensityCache(tmp_path, "eighth")
    a = cache.get(pts, 30, 41, KernelSpec(), name="img")
    assert a.dtype == np.float16 and a.shape == (4, 6) == cache.shape(30, 41)
    (path,) = tmp_path.glob("img-*.npy")
    b = cache.get(pts, 30, 41, KernelSpec(), name="img")
    assert isinstance(b, np.memmap) and np.array_equal(a, b)
    assert np.array_equal(DensityCache(None, "eighth").get(pts, 30, 41, KernelSpec()), a)
    DensityCache(tmp_path, "full").get(pts, 30, 41, KernelSpec(), name="img")  # another file, not overwritten
    assert len(list(tmp_path.glob("img-*.npy"))) == 2
    path.write_bytes(path.read_bytes()[:40])  # torn by an interrupted run: rebuilt
    assert np.array_equal(cache.get(pts, 30, 41, KernelSpec(), name="img"), a)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def _files(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_cache_lives_in_vkd_cache_dir_and_a_read_only_data_set_works(tmp_path, monkeypatch):
    """Training and density-sum evaluation write the 1/8 maps under $VKD_CACHE_DIR/skt/density/<fingerprint>/ and
    nothing under the data set root (made read-only for a non-root user; root ignores permissions, so there the
    check is the root's file listing before and after)."""
    monkeypatch.setenv("VKD_CACHE_DIR", str(tmp_path / "vkd"))
    data = tmp_path / "data"
    pts = _generic_set(data, 43, 58, 30, seed=9, name="a")
    _generic_set(data, 40, 40, 12, seed=10, name="b")
    before = _files(data)
    read_only = os.geteuid() != 0
    if read_only:
        for p in [data, *data.rglob("*")]:
            p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        cfg = CrowdDataConfig(dataset="generic", root=str(data), gt_count="density_sum", crop="ratio")
        train = build_train_dataset(cfg)
        for i in range(len(train)):
            train[i]
        evals = build_eval_dataset(cfg, "train")
        counts = sorted(evals.count(i) for i in range(len(evals)))
        assert counts == pytest.approx([12, 30], abs=0.01)  # density sums of the 1/8 maps = the heads
        assert evals.target_map(0).shape == (6, 8)  # 43x58 -> the 1/8 grid, not pooled twice
        assert evals.cache.directory == train.cache.directory
    finally:
        if read_only:
            for p in [data, *data.rglob("*")]:
                p.chmod(p.stat().st_mode | stat.S_IWUSR)
    assert _files(data) == before
    (directory,) = (tmp_path / "vkd" / "skt" / "density").iterdir()
    assert directory.name.startswith("data-train-")
    maps = {p.name.split("-")[0]: np.load(p) for p in directory.glob("*.npy")}
    assert sorted(maps) == ["a", "b"] and maps["a"].dtype == np.float16 and maps["a"].shape == (6, 8)
    assert float(maps["a"].astype(np.float64).sum()) == pytest.approx(len(pts), abs=0.01)


def test_dataset_fingerprint_follows_the_annotations(tmp_path):
    data = tmp_path / "data"
    _generic_set(data, 20, 20, 5, seed=1, name="a")
    ann = [data / "train" / "a.json"]
    first = dataset_fingerprint(data, "generic", "train", ann)
    assert first == dataset_fingerprint(data, "generic", "train", ann)  # stable
    assert first != dataset_fingerprint(data, "generic", "test", ann)
    assert first != dataset_fingerprint(data, "shanghaitech", "train", ann)
    ann[0].write_text(json.dumps([[1.0, 2.0]]))  # an edited annotation: another directory
    assert first != dataset_fingerprint(data, "generic", "train", ann)
    assert density_cache_dir(data, "generic", "train", ann, base=tmp_path / "c").parent == tmp_path / "c"


def test_cache_resolution_config():
    from vkd.errors import ConfigError
    from vkd.skt.config import DensityConfig

    assert CrowdDataConfig().density.stored_resolution("sum_pool") == "eighth"
    assert CrowdDataConfig().density.stored_resolution("bicubic_x64") == "full"  # bicubic needs pixels
    assert DensityConfig(cache_resolution="full").stored_resolution("sum_pool") == "full"
    with pytest.raises(ConfigError, match="cache_resolution=eighth"):
        CrowdDataConfig(reference_parity=True, density=DensityConfig(cache_resolution="eighth"))
    with pytest.raises(ValueError, match="1/8 density cache"):
        CrowdTrainDataset([object()], KernelSpec(), DensityCache(None, "eighth"), downsample="bicubic_x64")
