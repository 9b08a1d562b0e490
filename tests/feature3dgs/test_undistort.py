"""Undistortion of COLMAP / nerfstudio lens cameras on load, against COLMAP's equations written here in numpy.

Each scene is drawn analytically: a smooth pattern plus a Gaussian blob at the projection of a 3D point are defined
on the ideal pinhole image plane, and every pixel of the *distorted* file takes the pattern's value at its own
undistorted position (the forward model inverted by a fixed-point iteration checked against the forward model).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vkd.errors import DataError
from vkd.feature3dgs.data import load_colmap, load_transforms
from vkd.feature3dgs.data.undistort import (
    LensCamera,
    Undistortion,
    lens_from_colmap,
    plan_undistortion,
    undistorted_cache_dir,
)

W, H = 64, 48
COLMAP_IDS = {"SIMPLE_PINHOLE": 0, "PINHOLE": 1, "SIMPLE_RADIAL": 2, "RADIAL": 3, "OPENCV": 4, "FULL_OPENCV": 6,
              "SIMPLE_RADIAL_FISHEYE": 8}
CASES = {  # model -> COLMAP parameters (barrel, pincushion, tangential and rational variants)
    "SIMPLE_RADIAL": [40.0, 31.3, 24.6, -0.08],
    "RADIAL": [41.0, 32.4, 23.1, 0.06, 0.02],
    "OPENCV": [40.0, 41.5, 31.7, 24.2, -0.07, 0.01, 0.004, -0.003],
    "FULL_OPENCV": [41.0, 40.0, 32.2, 23.8, -0.06, 0.01, -0.002, 0.003, 0.004, 0.05, 0.01, 0.0],
}
# 3D point whose projection carries the blob; two poses (world-to-camera, qvec wxyz, tvec).
POINT = np.array([-0.95, -0.68, 0.2])
POSES = {"a.png": ((1.0, 0.0, 0.0, 0.0), (0.0, 0.0, 1.6)),
         "b.png": ((math.cos(0.05), 0.0, math.sin(0.05), 0.0), (0.05, 0.02, 1.7))}
SIGMA = 1.2  # blob radius (pixels)
PERIODS = (17.0, 19.0, 23.0)  # pattern periods (pixels): smooth, so bilinear resampling stays accurate
AMP = 90.0


# ---- COLMAP's camera models (src/colmap/sensor/models.h), independent of vkd and kornia -------------------------

def intrinsics(model: str, p: list[float]) -> tuple[float, float, float, float]:
    return (p[0], p[0], p[1], p[2]) if model in ("SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL") else tuple(p[:4])


def distort(model: str, p: list[float], x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalised ideal (x, y) -> normalised distorted (x_d, y_d)."""
    r2 = x * x + y * y
    if model == "SIMPLE_RADIAL":
        return x * (1 + p[3] * r2), y * (1 + p[3] * r2)
    if model == "RADIAL":
        radial = 1 + p[3] * r2 + p[4] * r2 ** 2
        return x * radial, y * radial
    k1, k2, p1, p2 = p[4:8]
    if model == "OPENCV":
        radial = 1 + k1 * r2 + k2 * r2 ** 2
    elif model == "FULL_OPENCV":
        k3, k4, k5, k6 = p[8:12]
        radial = (1 + k1 * r2 + k2 * r2 ** 2 + k3 * r2 ** 3) / (1 + k4 * r2 + k5 * r2 ** 2 + k6 * r2 ** 3)
    else:
        raise AssertionError(model)
    return (x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x),
            y * radial + 2 * p2 * x * y + p1 * (r2 + 2 * y * y))


def undistort(model: str, p: list[float], xd: np.ndarray, yd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Invert :func:`distort` by Newton's method (finite-difference Jacobian), checked to 1e-12."""
    x, y, eps = xd.copy(), yd.copy(), 1e-7
    for _ in range(30):
        fx_, fy_ = distort(model, p, x, y)
        ex, ey = fx_ - xd, fy_ - yd
        (ax, ay), (bx, by) = distort(model, p, x + eps, y), distort(model, p, x, y + eps)
        j11, j21, j12, j22 = (ax - fx_) / eps, (ay - fy_) / eps, (bx - fx_) / eps, (by - fy_) / eps
        det = j11 * j22 - j12 * j21
        x, y = x - (j22 * ex - j12 * ey) / det, y - (j11 * ey - j21 * ex) / det
    fx_, fy_ = distort(model, p, x, y)
    assert max(np.abs(fx_ - xd).max(), np.abs(fy_ - yd).max()) < 1e-12
    return x, y


def source_pixels(model: str, p: list[float], K_new: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where pixels ``(u, v)`` of the pinhole camera ``K_new`` fall in the distorted image ``[..., 2]``."""
    fx, fy, cx, cy = intrinsics(model, p)
    xd, yd = distort(model, p, (u - K_new[0, 2]) / K_new[0, 0], (v - K_new[1, 2]) / K_new[1, 1])
    return np.stack([fx * xd + cx, fy * yd + cy], -1)


def project(qvec, tvec, X: np.ndarray) -> np.ndarray:
    """World point -> normalised camera coordinates (x, y) for a COLMAP pose."""
    w, a, b, c = qvec
    R = np.array([[1 - 2 * (b * b + c * c), 2 * (a * b - w * c), 2 * (a * c + w * b)],
                  [2 * (a * b + w * c), 1 - 2 * (a * a + c * c), 2 * (b * c - w * a)],
                  [2 * (a * c - w * b), 2 * (b * c + w * a), 1 - 2 * (a * a + b * b)]])
    Xc = R @ X + np.asarray(tvec)
    return Xc[:2] / Xc[2]


# ---- the synthetic scene ----------------------------------------------------------------------------------------

def pattern(u: np.ndarray, v: np.ndarray, blob: np.ndarray) -> np.ndarray:
    """RGB ``[..., 3]`` in [0, 255] on the ideal pinhole image plane: two smooth waves and a blob at ``blob``."""
    a, b, c = (2 * np.pi / t for t in PERIODS)
    red = 128 + AMP * np.sin(a * u + 0.3) * np.cos(b * v)
    green = 128 + AMP * np.cos(c * (u + v))
    blue = 230 * np.exp(-((u - blob[0]) ** 2 + (v - blob[1]) ** 2) / (2 * SIGMA ** 2))
    return np.stack([red, green, blue], -1)


def blob_pixel(model: str, p: list[float], name: str) -> np.ndarray:
    """The 3D point's pixel in the ideal pinhole image (same K as the lens)."""
    fx, fy, cx, cy = intrinsics(model, p)
    x, y = project(*POSES[name], POINT)
    return np.array([fx * x + cx, fy * y + cy])


def distorted_image(model: str, p: list[float], name: str) -> np.ndarray:
    fx, fy, cx, cy = intrinsics(model, p)
    v, u = np.mgrid[0:H, 0:W] + 0.5  # pixel centres
    x, y = undistort(model, p, (u - cx) / fx, (v - cy) / fy)
    return np.clip(np.round(pattern(fx * x + cx, fy * y + cy, blob_pixel(model, p, name))), 0, 255).astype(np.uint8)


def write_scene(root: Path, model: str, params: list[float], fmt: str = "txt",
                drawn_with: tuple[str, list[float]] | None = None) -> None:
    """A two-image COLMAP scene; the images are drawn with ``drawn_with`` (default: the camera itself)."""
    (root / "images").mkdir(parents=True)
    for name in POSES:
        Image.fromarray(distorted_image(*(drawn_with or (model, params)), name)).save(root / "images" / name)
    sparse = root / "sparse" / "0"
    sparse.mkdir(parents=True)
    if fmt == "txt":
        (sparse / "cameras.txt").write_text(f"1 {model} {W} {H} {' '.join(map(repr, params))}\n")
        lines = []
        for k, (name, (q, t)) in enumerate(POSES.items(), 1):
            lines += [f"{k} {' '.join(map(str, q))} {' '.join(map(str, t))} 1 {name}", ""]
        (sparse / "images.txt").write_text("\n".join(lines) + "\n")
        (sparse / "points3D.txt").write_text(f"1 {' '.join(map(str, POINT))} 200 100 50 0.5 1 0 2 0\n")
        return
    with open(sparse / "cameras.bin", "wb") as fh:
        fh.write(struct.pack("<QiiQQ", 1, 1, COLMAP_IDS[model], W, H) + struct.pack(f"<{len(params)}d", *params))
    with open(sparse / "images.bin", "wb") as fh:
        fh.write(struct.pack("<Q", len(POSES)))
        for k, (name, (q, t)) in enumerate(POSES.items(), 1):
            fh.write(struct.pack("<idddddddi", k, *q, *t, 1) + name.encode() + b"\x00" + struct.pack("<Q", 0))
    with open(sparse / "points3D.bin", "wb") as fh:
        fh.write(struct.pack("<QQdddBBBdQ", 1, 1, *POINT, 200, 100, 50, 0.5, 1) + struct.pack("<ii", 1, 0))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("VKD_CACHE_DIR", str(tmp_path / "cache"))
    return undistorted_cache_dir()


def _bilinear_tolerance() -> float:
    """Max error of bilinear resampling of the waves, (h²/8)(|f_uu| + |f_vv|) for h = 1 px, x1.5 for the lens'
    local magnification, plus 1 level of uint8 rounding (file and result)."""
    a, b, c = (2 * np.pi / t for t in PERIODS)
    return 1.5 * max(AMP * (a * a + b * b), AMP * 2 * c * c) / 8 + 1.0


def _listing(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


# ---- tests ------------------------------------------------------------------------------------------------------

def test_kornia_matches_colmap_equations():
    """The library vkd relies on uses COLMAP's coefficient order and signs, and its inverse closes the loop."""
    from kornia.geometry.calibration import distort_points, undistort_points

    rng = np.random.default_rng(0)
    uv = rng.uniform([0, 0], [W, H], size=(200, 2))
    for model in ("OPENCV", "FULL_OPENCV"):
        p = CASES[model]
        fx, fy, cx, cy = intrinsics(model, p)
        K = torch.tensor([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], dtype=torch.float64)
        dist = torch.tensor(p[4:], dtype=torch.float64)  # COLMAP's k1, k2, p1, p2[, k3, k4, k5, k6]
        xd, yd = distort(model, p, (uv[:, 0] - cx) / fx, (uv[:, 1] - cy) / fy)
        want = np.stack([fx * xd + cx, fy * yd + cy], -1)
        got = distort_points(torch.from_numpy(uv), K, dist).numpy()
        np.testing.assert_allclose(got, want, atol=1e-9, rtol=0)
        back = undistort_points(torch.from_numpy(want), K, dist, num_iters=20).numpy()
        np.testing.assert_allclose(back, uv, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("model", "fmt"), [("SIMPLE_RADIAL", "txt"), ("SIMPLE_RADIAL", "bin"), ("RADIAL", "bin"),
                                            ("OPENCV", "txt"), ("FULL_OPENCV", "txt")])
def test_colmap_distorted_scene_is_undistorted(tmp_path, cache, model, fmt):
    params = CASES[model]
    write_scene(tmp_path / "scene", model, params, fmt)
    scene = load_colmap(tmp_path / "scene")
    fx, fy, cx, cy = intrinsics(model, params)
    tol = _bilinear_tolerance()
    for k, cam in enumerate(scene.cameras):
        K = cam.K.double().numpy()
        # Focal lengths are kept; the principal point moves with the crop.
        np.testing.assert_allclose([K[0, 0], K[1, 1]], [fx, fy], rtol=1e-6)
        assert cam.image_path.parent == cache and cam.image_path.suffix == ".png"
        v, u = np.mgrid[0:cam.height, 0:cam.width] + 0.5
        src = source_pixels(model, params, K, u, v)  # [H', W', 2]
        # Valid crop: every output pixel samples inside the distorted image (between its outer pixel centres) ...
        assert src[..., 0].min() >= 0.5 - 0.05 and src[..., 0].max() <= W - 0.5 + 0.05
        assert src[..., 1].min() >= 0.5 - 0.05 and src[..., 1].max() <= H - 0.5 + 0.05
        # ... and is maximal: one more column or row on any side would sample outside.
        uu, vv = np.arange(cam.width) + 0.5, np.arange(cam.height) + 0.5
        assert source_pixels(model, params, K, np.full_like(vv, -0.5), vv)[:, 0].min() < 0.5
        assert source_pixels(model, params, K, np.full_like(vv, cam.width + 0.5), vv)[:, 0].max() > W - 0.5
        assert source_pixels(model, params, K, uu, np.full_like(uu, -0.5))[:, 1].min() < 0.5
        assert source_pixels(model, params, K, uu, np.full_like(uu, cam.height + 0.5))[:, 1].max() > H - 0.5
        assert 0.8 * W < cam.width < 1.2 * W and 0.8 * H < cam.height < 1.2 * H
        # vkd's remap is COLMAP's forward model to float64 rounding (coefficient order, signs, pixel centres).
        plan = plan_undistortion(lens_from_colmap(model, params, W, H, "test"))
        assert (plan.width, plan.height) == (cam.width, cam.height)
        torch.testing.assert_close(plan.K.float(), cam.K)
        np.testing.assert_allclose(plan.source_pixels(range(cam.height)).numpy(),
                                   source_pixels(model, params, plan.K.numpy(), u, v), atol=1e-9, rtol=0)
        # The image equals the ideal pinhole image seen through the returned K (waves, within bilinear error).
        got = scene.load_image(k).permute(1, 2, 0).double().numpy() * 255  # [H', W', 3]
        pin_u, pin_v = fx * (u - K[0, 2]) / K[0, 0] + cx, fy * (v - K[1, 2]) / K[1, 1] + cy
        want = pattern(pin_u, pin_v, blob_pixel(model, params, cam.name))
        assert np.abs(got[..., :2] - want[..., :2]).max() <= tol
        # The 3D point projected with vkd's camera lands on the blob's centre in vkd's image.
        Xc = (cam.viewmat.double() @ torch.tensor([*POINT, 1.0], dtype=torch.float64))[:3].numpy()
        uv = (K @ (Xc / Xc[2]))[:2]
        raw = np.asarray(Image.open(tmp_path / "scene" / "images" / cam.name), dtype=np.float64)[..., 2]
        pinhole = blob_pixel(model, params, cam.name)  # where the lens' own K, ignoring distortion, puts it
        assert np.hypot(*(_centroid(raw, pinhole) - pinhole)) > 0.3  # moved by the lens: 3x the tolerance below
        np.testing.assert_allclose(_centroid(got[..., 2], uv), uv, atol=0.1)


def _centroid(channel: np.ndarray, near: np.ndarray, radius: int = 4) -> np.ndarray:
    """Intensity-weighted centre (pixel coordinates, centres at +0.5) of the blob nearest ``near``."""
    i0, j0 = int(near[0]), int(near[1])
    win = channel[j0 - radius:j0 + radius + 1, i0 - radius:i0 + radius + 1]
    v, u = np.mgrid[j0 - radius:j0 + radius + 1, i0 - radius:i0 + radius + 1] + 0.5
    return np.array([(win * u).sum(), (win * v).sum()]) / win.sum()


def test_second_load_reads_the_cache_and_never_writes_the_dataset(tmp_path, cache, monkeypatch):
    write_scene(tmp_path / "scene", "OPENCV", CASES["OPENCV"])
    before = _listing(tmp_path / "scene")
    first = load_colmap(tmp_path / "scene")
    files = sorted(cache.glob("*.png"))
    assert len(files) == 2 and sorted(c.image_path for c in first.cameras) == files
    stamps = {f: f.stat().st_mtime_ns for f in files}
    images = [first.load_image(k) for k in range(2)]

    def fail(self, image):
        raise AssertionError("the cache was not used")

    with monkeypatch.context() as patch:
        patch.setattr(Undistortion, "apply", fail)
        second = load_colmap(tmp_path / "scene")
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    for k in range(2):
        torch.testing.assert_close(second.load_image(k), images[k], atol=0, rtol=0)
        torch.testing.assert_close(second.cameras[k].K, first.cameras[k].K)
    assert _listing(tmp_path / "scene") == before  # nothing written next to the dataset
    # A touched source file is a new cache entry; so is new content, which then shows through (no stale hit).
    src = tmp_path / "scene" / "images" / "a.png"
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10 ** 9))
    load_colmap(tmp_path / "scene")
    assert len(list(cache.glob("*.png"))) == 3
    Image.fromarray(255 - np.asarray(Image.open(src))).save(src)
    third = load_colmap(tmp_path / "scene")
    assert len(list(cache.glob("*.png"))) == 4
    torch.testing.assert_close(third.load_image(0), 1 - images[0], atol=1.5 / 255, rtol=0)


def test_zero_coefficients_give_the_pinhole_camera_and_image_back(tmp_path, cache):
    lens = LensCamera("OPENCV", W, H, 36.0, 37.0, 31.7, 24.2, (0.0,) * 8, "test")
    plan = plan_undistortion(lens)
    assert (plan.width, plan.height) == (W, H)
    torch.testing.assert_close(plan.K, lens.K(torch.float64), atol=1e-12, rtol=0)
    image = torch.randint(0, 256, (3, H, W), dtype=torch.uint8)
    torch.testing.assert_close(plan.apply(image), image, atol=0, rtol=0)
    # The loader skips the copy altogether: the original file and the pinhole K.
    write_scene(tmp_path / "scene", "SIMPLE_RADIAL", [36.0, 31.3, 24.6, 0.0])
    cam = load_colmap(tmp_path / "scene").cameras[0]
    assert cam.image_path == tmp_path / "scene" / "images" / "a.png" and (cam.width, cam.height) == (W, H)
    torch.testing.assert_close(cam.K, torch.tensor([[36.0, 0, 31.3], [0, 36.0, 24.6], [0, 0, 1]]))
    assert not cache.exists()


def test_downscale_undistorts_at_the_reduced_size(tmp_path, cache):
    params = CASES["OPENCV"]
    write_scene(tmp_path / "scene", "OPENCV", params)
    full, half = load_colmap(tmp_path / "scene"), load_colmap(tmp_path / "scene", downscale=2)
    fx, fy = intrinsics("OPENCV", params)[:2]
    cam = half.cameras[0]
    np.testing.assert_allclose([float(cam.K[0, 0]), float(cam.K[1, 1])], [fx / 2, fy / 2], rtol=1e-6)
    assert abs(cam.width - full.cameras[0].width / 2) <= 1 and abs(cam.height - full.cameras[0].height / 2) <= 1
    assert half.load_image(0).shape == (3, cam.height, cam.width)


def test_nerfstudio_opencv_is_undistorted(tmp_path, cache):
    # nerfstudio's OPENCV may carry k3 (OpenCV's r^6 term): COLMAP's FULL_OPENCV equations with k4 = k5 = k6 = 0
    model, p = "FULL_OPENCV", [*CASES["OPENCV"], 0.01, 0.0, 0.0, 0.0]
    root = tmp_path / "ns"
    (root / "images").mkdir(parents=True)
    for name in POSES:
        Image.fromarray(distorted_image(model, p, name)).save(root / "images" / name)
    frames = [{"file_path": f"images/{n}", "transform_matrix": np.eye(4).tolist()} for n in POSES]
    meta = {"camera_model": "OPENCV", "fl_x": p[0], "fl_y": p[1], "cx": p[2], "cy": p[3], "w": W, "h": H,
            "k1": p[4], "k2": p[5], "p1": p[6], "p2": p[7], "k3": p[8], "k4": 0.0, "frames": frames}
    (root / "transforms.json").write_text(json.dumps(meta))
    scene = load_transforms(root, test_every=2)
    for k, cam in enumerate(scene.cameras):
        K = cam.K.double().numpy()
        np.testing.assert_allclose([K[0, 0], K[1, 1]], p[:2], rtol=1e-6)
        assert cam.image_path.parent == cache
        v, u = np.mgrid[0:cam.height, 0:cam.width] + 0.5
        got = scene.load_image(k).permute(1, 2, 0).double().numpy() * 255
        want = pattern(p[0] * (u - K[0, 2]) / K[0, 0] + p[2], p[1] * (v - K[1, 2]) / K[1, 1] + p[3],
                       blob_pixel(model, p, Path(cam.name).name))
        assert np.abs(got[..., :2] - want[..., :2]).max() <= _bilinear_tolerance()


@pytest.mark.parametrize("model", ["SIMPLE_RADIAL_FISHEYE", "RADIAL_FISHEYE", "OPENCV_FISHEYE", "FOV",
                                   "THIN_PRISM_FISHEYE"])
def test_models_vkd_cannot_undistort_stop_with_one_line(tmp_path, cache, model):
    from vkd.feature3dgs.data.colmap import COLMAP_MODELS

    n = {name: count for name, count in COLMAP_MODELS.values()}[model]
    write_scene(tmp_path / "scene", "SIMPLE_RADIAL", CASES["SIMPLE_RADIAL"])
    (tmp_path / "scene" / "sparse" / "0" / "cameras.txt").write_text(
        f"1 {model} {W} {H} 36 31.3 24.6 " + " ".join(["0.01"] * (n - 3)) + "\n")
    with pytest.raises(DataError) as err:
        load_colmap(tmp_path / "scene")
    text = str(err.value)
    assert "\n" not in text and model in text and "colmap image_undistorter" in text


def test_fisheye_and_strong_distortion_errors(tmp_path, cache):
    write_scene(tmp_path / "bin", "SIMPLE_RADIAL_FISHEYE", [36.0, 31.3, 24.6, 0.01], fmt="bin",
                drawn_with=("SIMPLE_RADIAL", CASES["SIMPLE_RADIAL"]))
    with pytest.raises(DataError, match="SIMPLE_RADIAL_FISHEYE .*colmap image_undistorter"):
        load_colmap(tmp_path / "bin")
    # Barrel distortion so strong that the radial function turns back inside the frame.
    write_scene(tmp_path / "strong", "SIMPLE_RADIAL", [36.0, 31.3, 24.6, 0.0])
    (tmp_path / "strong" / "sparse" / "0" / "cameras.txt").write_text(f"1 SIMPLE_RADIAL {W} {H} 36 31.3 24.6 -0.6\n")
    with pytest.raises(DataError, match="too strong.*colmap image_undistorter"):
        load_colmap(tmp_path / "strong")
    # The remap's own guard: a crop reaching past the fold (here the whole frame, same K) is refused too.
    lens = LensCamera("SIMPLE_RADIAL", W, H, 36.0, 36.0, 31.3, 24.6, (-0.6,) + (0.0,) * 7, "strong")
    with pytest.raises(DataError, match="folds the image"):
        Undistortion(lens, lens.K(torch.float64), W, H).grid()
    # nerfstudio fisheye and OPENCV with its ambiguous k4.
    root = tmp_path / "ns"
    (root / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(root / "images" / "a.png")
    base = {"fl_x": 36.0, "cx": 32.0, "cy": 24.0, "w": W, "h": H,
            "frames": [{"file_path": "images/a.png", "transform_matrix": np.eye(4).tolist()}]}
    for extra, match in (({"camera_model": "OPENCV_FISHEYE", "k1": 0.1}, "OPENCV_FISHEYE is not supported"),
                         ({"camera_model": "OPENCV", "k4": 0.1}, "k4")):
        (root / "transforms.json").write_text(json.dumps({**base, **extra}))
        with pytest.raises(DataError, match=match):
            load_transforms(root)
