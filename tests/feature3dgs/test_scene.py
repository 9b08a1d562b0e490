"""Scene loaders on small fixtures written in the test: COLMAP text/binary, nerfstudio and NeRF-synthetic JSON."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vkd.errors import DataError
from vkd.feature3dgs.data import load_colmap, load_scene, load_transforms, split_indices
from vkd.feature3dgs.synthetic import LABEL_NAMES, ensure_synthetic_scene
from vkd.render import quat_to_rotmat

# Two cameras, three images; quaternions wxyz (world-to-camera, OpenCV axes as COLMAP stores them).
CAMERAS = {1: ("PINHOLE", 40, 30, [50.0, 52.0, 20.0, 15.0]), 2: ("SIMPLE_PINHOLE", 40, 30, [45.0, 19.5, 14.5])}
IMAGES = [
    (1, (1.0, 0.0, 0.0, 0.0), (0.0, 0.0, 4.0), 1, "b.png"),
    (2, (math.cos(0.3), 0.0, math.sin(0.3), 0.0), (0.1, -0.2, 4.5), 1, "a.png"),
    (3, (math.cos(0.6), math.sin(0.6), 0.0, 0.0), (0.0, 0.3, 5.0), 2, "c.png"),
]
POINTS = [(1, (0.1, 0.2, 0.3), (255, 0, 0)), (2, (-0.5, 0.0, 1.0), (0, 128, 255)), (3, (0.0, 1.0, -1.0), (9, 9, 9))]
MODEL_IDS = {"SIMPLE_PINHOLE": 0, "PINHOLE": 1, "SIMPLE_RADIAL": 2, "OPENCV": 4}


def _write_images(root: Path, names, size=(40, 30), folder="images"):
    (root / folder).mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        arr = np.full((size[1], size[0], 3), 40 * k, dtype=np.uint8)
        Image.fromarray(arr).save(root / folder / name)


def write_colmap_txt(root: Path, cameras=CAMERAS, images=IMAGES, points=POINTS):
    sparse = root / "sparse" / "0"
    sparse.mkdir(parents=True, exist_ok=True)
    lines = ["# Camera list", "# CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]"]
    lines += [f"{cid} {m} {w} {h} " + " ".join(map(str, p)) for cid, (m, w, h, p) in cameras.items()]
    (sparse / "cameras.txt").write_text("\n".join(lines) + "\n")
    lines = ["# Image list with two lines of data per image:"]
    for iid, q, t, cid, name in images:
        lines.append(f"{iid} {' '.join(map(str, q))} {' '.join(map(str, t))} {cid} {name}")
        lines.append("" if iid % 2 else "10.0 12.0 1 20.5 3.0 -1")  # empty keypoint lines must not break parsing
    (sparse / "images.txt").write_text("\n".join(lines) + "\n")
    lines = ["# 3D point list"]
    lines += [f"{pid} {' '.join(map(str, xyz))} {' '.join(map(str, rgb))} 0.5 1 0 2 1" for pid, xyz, rgb in points]
    (sparse / "points3D.txt").write_text("\n".join(lines) + "\n")


def write_colmap_bin(root: Path, cameras=CAMERAS, images=IMAGES, points=POINTS):
    sparse = root / "sparse" / "0"
    sparse.mkdir(parents=True, exist_ok=True)
    with open(sparse / "cameras.bin", "wb") as fh:
        fh.write(struct.pack("<Q", len(cameras)))
        for cid, (m, w, h, p) in cameras.items():
            fh.write(struct.pack("<iiQQ", cid, MODEL_IDS[m], w, h) + struct.pack("<" + "d" * len(p), *p))
    with open(sparse / "images.bin", "wb") as fh:
        fh.write(struct.pack("<Q", len(images)))
        for iid, q, t, cid, name in images:
            fh.write(struct.pack("<idddddddi", iid, *q, *t, cid) + name.encode() + b"\x00")
            fh.write(struct.pack("<Q", 1) + struct.pack("<ddq", 1.0, 2.0, -1))
    with open(sparse / "points3D.bin", "wb") as fh:
        fh.write(struct.pack("<Q", len(points)))
        for pid, xyz, rgb in points:
            fh.write(struct.pack("<QdddBBBdQ", pid, *xyz, *rgb, 0.5, 2) + struct.pack("<iiii", 1, 0, 2, 1))


@pytest.mark.parametrize("fmt", ["txt", "bin"])
def test_colmap_loader(tmp_path, fmt):
    (write_colmap_txt if fmt == "txt" else write_colmap_bin)(tmp_path)
    _write_images(tmp_path, ["a.png", "b.png", "c.png"])
    scene = load_colmap(tmp_path, test_every=2)
    assert [c.name for c in scene.cameras] == ["a.png", "b.png", "c.png"]  # sorted by name
    assert scene.test_ids == [0, 2] and scene.train_ids == [1]
    a = scene.cameras[0]  # image id 2: rotation about y by 0.6 rad
    R = quat_to_rotmat(torch.tensor(IMAGES[1][1], dtype=torch.float64)).float()
    torch.testing.assert_close(a.viewmat[:3, :3], R)
    torch.testing.assert_close(a.viewmat[:3, 3], torch.tensor([0.1, -0.2, 4.5]))
    torch.testing.assert_close(a.K, torch.tensor([[50.0, 0, 20.0], [0, 52.0, 15.0], [0, 0, 1]]))
    torch.testing.assert_close(scene.cameras[2].K, torch.tensor([[45.0, 0, 19.5], [0, 45.0, 14.5], [0, 0, 1]]))
    torch.testing.assert_close(scene.points, torch.tensor([p[1] for p in POINTS], dtype=torch.float32))
    torch.testing.assert_close(scene.point_colors[0], torch.tensor([1.0, 0.0, 0.0]))
    # A world point maps to camera z = depth through the viewmat (OpenCV, +z forward).
    b = scene.cameras[1]  # identity rotation, t = (0, 0, 4)
    assert float((b.viewmat @ torch.tensor([0.0, 0.0, 0.0, 1.0]))[2]) == pytest.approx(4.0)
    torch.testing.assert_close(b.center, torch.tensor([0.0, 0.0, -4.0]))
    img = scene.load_image(1)
    assert img.shape == (3, 30, 40) and img.dtype == torch.float32 and float(img.max()) <= 1.0


def test_colmap_txt_and_bin_agree(tmp_path):
    write_colmap_txt(tmp_path / "t")
    write_colmap_bin(tmp_path / "b")
    for d in ("t", "b"):
        _write_images(tmp_path / d, ["a.png", "b.png", "c.png"])
    st, sb = load_colmap(tmp_path / "t"), load_colmap(tmp_path / "b")
    for ct, cb in zip(st.cameras, sb.cameras, strict=True):
        torch.testing.assert_close(ct.viewmat, cb.viewmat)
        torch.testing.assert_close(ct.K, cb.K)
    torch.testing.assert_close(st.points, sb.points)


def test_colmap_downscale_prefers_images_k(tmp_path):
    write_colmap_txt(tmp_path)
    _write_images(tmp_path, ["a.png", "b.png", "c.png"])
    _write_images(tmp_path, ["a.png", "b.png", "c.png"], size=(20, 15), folder="images_2")
    scene = load_colmap(tmp_path, downscale=2)
    cam = scene.cameras[0]
    assert (cam.width, cam.height) == (20, 15) and cam.image_path.parent.name == "images_2"
    torch.testing.assert_close(cam.K, torch.tensor([[25.0, 0, 10.0], [0, 26.0, 7.5], [0, 0, 1]]))
    assert scene.load_image(0).shape == (3, 15, 20)
    # Without images_2/ the full-size files are resized on load.
    other = tmp_path / "other"
    write_colmap_txt(other)
    _write_images(other, ["a.png", "b.png", "c.png"])
    assert load_colmap(other, downscale=2).load_image(0).shape == (3, 15, 20)


def test_colmap_bad_input(tmp_path):
    write_colmap_txt(tmp_path / "missing")
    _write_images(tmp_path / "missing", ["a.png", "b.png"])  # c.png absent
    with pytest.raises(DataError, match="missing"):
        load_colmap(tmp_path / "missing")

    cams = dict(CAMERAS)
    cams[2] = ("SIMPLE_RADIAL_FISHEYE", 40, 30, [45.0, 19.5, 14.5, 0.01])  # SIMPLE_RADIAL: test_undistort.py
    write_colmap_txt(tmp_path / "model", cameras=cams)
    _write_images(tmp_path / "model", ["a.png", "b.png", "c.png"])
    with pytest.raises(DataError, match="SIMPLE_RADIAL_FISHEYE is not supported"):
        load_colmap(tmp_path / "model")

    write_colmap_bin(tmp_path / "empty", points=[])
    _write_images(tmp_path / "empty", ["a.png", "b.png", "c.png"])
    with pytest.raises(DataError, match="empty"):
        load_colmap(tmp_path / "empty")
    assert load_colmap(tmp_path / "empty", require_points=False).points is None

    (tmp_path / "trunc" / "sparse" / "0").mkdir(parents=True)
    write_colmap_bin(tmp_path / "trunc")
    data = (tmp_path / "trunc" / "sparse" / "0" / "images.bin").read_bytes()
    (tmp_path / "trunc" / "sparse" / "0" / "images.bin").write_bytes(data[:30])
    with pytest.raises(DataError, match="truncated"):
        load_colmap(tmp_path / "trunc")
    with pytest.raises(DataError, match="neither"):
        load_scene(tmp_path / "missing" / "images")
    with pytest.raises(DataError, match="not found"):
        load_scene(tmp_path / "nope")


def _c2w_opengl(eye, target):
    f = torch.tensor(target, dtype=torch.float64) - torch.tensor(eye, dtype=torch.float64)
    f = f / f.norm()
    r = torch.linalg.cross(f, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    r = r / r.norm()
    u = torch.linalg.cross(r, f)
    m = torch.eye(4, dtype=torch.float64)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = r, u, -f, torch.tensor(eye, dtype=torch.float64)
    return m


def test_nerfstudio_transforms(tmp_path):
    names = [f"images/f{k}.png" for k in range(4)]
    _write_images(tmp_path, [Path(n).name for n in names], size=(32, 24))
    frames = [{"file_path": n, "transform_matrix": _c2w_opengl((3.0 * math.cos(k), 1.0, 3.0 * math.sin(k)),
                                                              (0.0, 0.0, 0.0)).tolist()} for k, n in enumerate(names)]
    meta = {"camera_model": "OPENCV", "fl_x": 30.0, "fl_y": 31.0, "cx": 16.0, "cy": 12.0, "w": 32, "h": 24,
            "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0, "frames": frames, "test_filenames": [names[1]]}
    (tmp_path / "transforms.json").write_text(json.dumps(meta))
    scene = load_scene(tmp_path)
    assert scene.source == "transforms" and scene.test_ids == [1] and scene.train_ids == [0, 2, 3]
    cam = scene.cameras[0]
    # The look-at target (origin) projects to the principal point, in front of the camera (z > 0).
    p = cam.viewmat @ torch.tensor([0.0, 0.0, 0.0, 1.0])
    assert float(p[2]) > 0
    uv = cam.K @ (p[:3] / p[2])
    torch.testing.assert_close(uv[:2], torch.tensor([16.0, 12.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(cam.center, torch.tensor([3.0, 1.0, 0.0]), atol=1e-5, rtol=0)
    # A world point above the target appears above the centre (smaller v).
    q = cam.viewmat @ torch.tensor([0.0, 0.5, 0.0, 1.0])
    assert float((cam.K @ (q[:3] / q[2]))[1]) < 12.0
    # Ambiguous k4 distortion and fisheye are rejected with one line (OPENCV k1..p2: test_undistort.py).
    meta["k4"] = 0.1
    (tmp_path / "transforms.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="k4"):
        load_scene(tmp_path)
    meta["k4"], meta["camera_model"] = 0.0, "OPENCV_FISHEYE"
    (tmp_path / "transforms.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="not supported"):
        load_scene(tmp_path)
    meta["camera_model"] = "PINHOLE"
    meta["frames"][2]["file_path"] = "images/gone.png"
    (tmp_path / "transforms.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="missing"):
        load_scene(tmp_path)
    (tmp_path / "transforms.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_scene(tmp_path)


def test_nerf_synthetic_rgba(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        (tmp_path / split).mkdir()
        frames = []
        for k in range(n):
            rgba = np.zeros((16, 16, 4), dtype=np.uint8)
            rgba[4:12, 4:12] = (255, 0, 0, 255)  # opaque red square on a transparent background
            Image.fromarray(rgba, "RGBA").save(tmp_path / split / f"r_{k}.png")
            frames.append({"file_path": f"./{split}/r_{k}", "transform_matrix": _c2w_opengl(
                (0.0, 0.0, 4.0 + k), (0.0, 0.0, 0.0)).tolist()})
        (tmp_path / f"transforms_{split}.json").write_text(json.dumps({"camera_angle_x": 0.6, "frames": frames}))
    scene = load_transforms(tmp_path, white_background=True, downscale=2)
    assert len(scene.train_ids) == 3 and len(scene.test_ids) == 2
    cam = scene.cameras[scene.train_ids[0]]
    assert (cam.width, cam.height) == (8, 8)
    assert float(cam.K[0, 0]) == pytest.approx(0.5 * 8 / math.tan(0.3))
    img = scene.load_image(scene.train_ids[0])
    torch.testing.assert_close(img[:, 0, 0], torch.ones(3))  # transparent -> white background
    assert float(img[0, 4, 4]) > 0.9 and float(img[1, 4, 4]) < 0.1


def test_split_indices():
    assert split_indices(list("abcdefghij"), 4) == ([1, 2, 3, 5, 6, 7, 9], [0, 4, 8])
    assert split_indices(list("abcdefghij"), 8, 2)[1] == [2]
    assert split_indices(["a"], 1) == ([], [0])


def test_synthetic_scene_roundtrip(tmp_path):
    root = ensure_synthetic_scene(tmp_path, num_views=8, resolution=20, supersample=1, num_points=300,
                                  test_every=4)
    again = ensure_synthetic_scene(tmp_path, num_views=8, resolution=20, supersample=1, num_points=300,
                                   test_every=4)
    assert again == root
    scene = load_scene(root)
    assert len(scene.cameras) == 8 and scene.test_ids == [0, 4]
    assert scene.label_names == list(LABEL_NAMES)
    assert scene.points is not None and 200 < scene.points.shape[0] <= 300
    labels = torch.stack([scene.load_labels(i) for i in range(8)])
    assert labels.shape == (8, 20, 20)
    frac = torch.bincount(labels.flatten(), minlength=len(LABEL_NAMES)).float() / labels.numel()
    assert frac[0] < 0.01  # the floor fills every view: no sky
    assert (frac[2:] > 0.02).all()  # every object is seen
    # Points lie on visible surfaces: near the floor or inside the objects' bounding box.
    assert float(scene.points[:, 1].min()) > -0.05 and float(scene.points[:, 1].max()) < 1.1
