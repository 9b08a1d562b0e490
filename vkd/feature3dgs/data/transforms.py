"""nerfstudio ``transforms.json`` and NeRF-synthetic ``transforms_{train,test}.json`` scenes.

Both store camera-to-world matrices in OpenGL/Blender axes (y up, -z forward); gsplat's ``viewmat`` is their inverse
after flipping the camera y and z axes (:func:`vkd.render.cameras.nerf_synthetic_to_viewmat`). Intrinsics follow
nerfstudio's keys (``fl_x``/``fl_y``/``cx``/``cy``/``w``/``h``, per frame or global) or NeRF-synthetic's
``camera_angle_x``. ``PINHOLE`` cameras are read as they are; ``OPENCV`` cameras with non-zero ``k1, k2, k3, p1, p2``
are undistorted on load into the vkd cache (:mod:`vkd.feature3dgs.data.undistort`). Fisheye models and a non-zero
``k4`` (whose meaning differs between nerfstudio and OpenCV) must be undistorted first.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from vkd.data.files import image_size
from vkd.errors import DataError
from vkd.feature3dgs.data.scene import (
    FRAME_EXTENSIONS,
    Camera,
    Scene,
    SceneFormat,
    SceneOptions,
    check_images,
    check_points,
    inside,
    scaled_size,
    split_indices,
)
from vkd.feature3dgs.data.undistort import LensCamera, undistort_cameras
from vkd.feature3dgs.ply import read_ply
from vkd.render.cameras import nerf_synthetic_to_viewmat

__all__ = ["load_transforms", "FORMAT"]


def _resolve_frame_path(base: Path, file_path: str, where: str = "transforms") -> Path:
    p = inside(base, file_path, where)
    if p.suffix == "" or not p.is_file():
        for ext in FRAME_EXTENSIONS:
            cand = p.with_name(p.name + ext)
            if cand.is_file():
                return cand
    return p


_DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2")
# nerfstudio key -> slot of kornia's (k1, k2, p1, p2, k3, k4, k5, k6); k4 is left out on purpose (see the docstring)
_OPENCV_SLOTS = {"k1": 0, "k2": 1, "p1": 2, "p2": 3, "k3": 4}


def _frame_intrinsics(meta: dict, frame: dict, path: Path, where: str) -> LensCamera:
    """The frame's camera at its full size (distortion coefficients all zero for a pinhole).

    Raises:
        DataError: unsupported model, missing or malformed intrinsics.
    """
    try:
        return _frame_intrinsics_unchecked(meta, frame, path, where)
    except (TypeError, ValueError, ZeroDivisionError) as err:  # "fl_x": "abc", "w": [1], angle 0, ...
        raise DataError(f"{where}: malformed camera intrinsics for {frame.get('file_path')}: "
                        f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def _frame_intrinsics_unchecked(meta: dict, frame: dict, path: Path, where: str) -> LensCamera:
    def get(key):
        return frame.get(key, meta.get(key))

    model = str(get("camera_model") or "PINHOLE").upper()
    if model not in ("PINHOLE", "SIMPLE_PINHOLE", "OPENCV"):
        raise DataError(f"{where}: camera model {model} is not supported (vkd reads PINHOLE and undistorts OPENCV on "
                        "load); undistort the images first, e.g. with `colmap image_undistorter`")
    coeffs = {k: float(get(k) or 0.0) for k in _DISTORTION_KEYS}
    if model != "OPENCV" and any(coeffs.values()):
        raise DataError(f"{where}: distorted {model} cameras are not supported (non-zero k/p coefficients); set "
                        "camera_model to OPENCV or undistort the images first")
    if coeffs["k4"]:
        raise DataError(f"{where}: distorted OPENCV camera with k4={coeffs['k4']:g} is not supported (nerfstudio's k4 "
                        "is not OpenCV's); undistort the images first, e.g. with `colmap image_undistorter`")
    if not all(math.isfinite(v) for v in coeffs.values()):
        raise DataError(f"{where}: distortion coefficients of {frame.get('file_path')} must be finite, got {coeffs}")
    w, h = get("w"), get("h")
    if w is None or h is None:
        w, h = image_size(path)  # header only; DataError for missing, empty, non-image and bomb files
    w, h = int(w), int(h)
    if w < 1 or h < 1:
        raise DataError(f"{where}: image size {w}x{h} of {frame.get('file_path')} is not positive")
    if get("fl_x") is not None:
        fx = float(get("fl_x"))
        fy = float(get("fl_y") if get("fl_y") is not None else fx)
    elif get("camera_angle_x") is not None:
        fx = 0.5 * w / math.tan(0.5 * float(get("camera_angle_x")))
        fy = 0.5 * h / math.tan(0.5 * float(get("camera_angle_y"))) if get("camera_angle_y") is not None else fx
    else:
        raise DataError(f"{where}: no focal length (fl_x or camera_angle_x)")
    cx = float(get("cx")) if get("cx") is not None else w / 2
    cy = float(get("cy")) if get("cy") is not None else h / 2
    if not all(math.isfinite(v) for v in (fx, fy, cx, cy)) or fx <= 0 or fy <= 0:
        raise DataError(f"{where}: focal length / principal point of {frame.get('file_path')} must be finite and "
                        f"positive, got fx={fx}, fy={fy}, cx={cx}, cy={cy}")
    dist = [0.0] * 8
    for key, slot in _OPENCV_SLOTS.items():
        dist[slot] = coeffs[key]
    return LensCamera(model, w, h, fx, fy, cx, cy, tuple(dist), f"{where}: {frame.get('file_path')}")


def _load_json(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path}: {err}") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("frames"), list):
        raise DataError(f"{path} has no 'frames' list")
    return meta


def load_transforms(root: str | Path, downscale: int = 1, test_every: int = 8, test_offset: int = 0,
                    white_background: bool = False) -> Scene:
    """Load a nerfstudio ``transforms.json`` or NeRF-synthetic ``transforms_{train,test}.json`` scene.

    Splits: NeRF-synthetic files define them; a nerfstudio file may list ``train_filenames`` / ``test_filenames``;
    otherwise every ``test_every``-th image is held out. Points come from ``ply_file_path`` when present. vkd's
    synthetic scenes add ``label_path`` per frame and ``vkd_label_names``.

    Raises:
        DataError: missing files or images, unsupported camera models, malformed JSON, empty point cloud.
    """
    root = Path(root)
    if root.is_file():
        root = root.parent
    if not root.is_dir():
        raise DataError(f"scene directory not found: {root}")
    background = (1.0, 1.0, 1.0) if white_background else (0.0, 0.0, 0.0)
    split_files = {s: root / f"transforms_{s}.json" for s in ("train", "test")}
    records: list[tuple[dict, dict, str | None, Path]] = []  # (meta, frame, split, json path)
    meta_main: dict = {}
    if (root / "transforms.json").is_file():
        meta_main = _load_json(root / "transforms.json")
        records = [(meta_main, fr, None, root / "transforms.json") for fr in meta_main["frames"]]
    elif split_files["train"].is_file():
        for split, path in split_files.items():
            if path.is_file():
                meta = _load_json(path)
                meta_main = meta_main or meta
                records += [(meta, fr, split, path) for fr in meta["frames"]]
    else:
        raise DataError(f"no transforms.json or transforms_train.json in {root}")
    if not records:
        raise DataError(f"{root}: transforms file lists no frames")
    if "vkd_background" in meta_main:
        try:
            background = tuple(float(c) for c in meta_main["vkd_background"])  # type: ignore[assignment]
        except (TypeError, ValueError):
            raise DataError(f"{root}: vkd_background must be three numbers") from None

    cameras, splits, lenses = [], [], []
    for meta, frame, split, jpath in records:
        if not isinstance(frame, dict) or "file_path" not in frame or "transform_matrix" not in frame:
            raise DataError(f"{jpath}: every frame needs file_path and transform_matrix")
        rel = str(frame["file_path"])
        path = _resolve_frame_path(root, rel, str(jpath))
        lens = _frame_intrinsics(meta, frame, path, str(jpath))
        lens = lens.scaled(*scaled_size(lens.width, lens.height, downscale))
        if downscale > 1:
            parent = Path(rel).parent
            scaled = _resolve_frame_path(root, str(parent.with_name(parent.name + f"_{downscale}") / Path(rel).name),
                                         str(jpath)) if parent.name else None
            if scaled is not None and scaled.is_file():
                path = scaled
        try:
            c2w = torch.tensor(frame["transform_matrix"], dtype=torch.float64)
        except (TypeError, ValueError):
            raise DataError(f"{jpath}: malformed transform_matrix for {rel}") from None
        if c2w.shape == (3, 4):
            c2w = torch.cat([c2w, torch.tensor([[0, 0, 0, 1]], dtype=torch.float64)])
        if c2w.shape != (4, 4) or not torch.isfinite(c2w).all():
            raise DataError(f"{jpath}: transform_matrix of {rel} must be a finite 4x4 matrix")
        label = inside(root, str(frame["label_path"]), str(jpath)) if frame.get("label_path") else None
        name = rel if Path(rel).suffix else str(Path(rel).with_suffix(path.suffix))
        cameras.append(Camera(name, path, nerf_synthetic_to_viewmat(c2w).float(), lens.K(), lens.width, lens.height,
                              label))
        splits.append(split)
        lenses.append(lens)
    order = sorted(range(len(cameras)), key=lambda i: (splits[i] or "", cameras[i].name))
    cameras = [cameras[i] for i in order]
    splits = [splits[i] for i in order]
    lenses = [lenses[i] for i in order]
    check_images(cameras, root)

    if any(s is not None for s in splits):
        train = [i for i, s in enumerate(splits) if s == "train"]
        test = [i for i, s in enumerate(splits) if s == "test"]
    elif meta_main.get("test_filenames"):
        test_names = {str(Path(n)) for n in meta_main["test_filenames"]}
        train_names = {str(Path(n)) for n in meta_main.get("train_filenames", [])}
        test = [i for i, c in enumerate(cameras) if c.name in test_names]
        train = [i for i, c in enumerate(cameras) if (c.name in train_names if train_names else c.name not in
                                                      test_names)]
    else:
        train, test = split_indices([c.name for c in cameras], test_every, test_offset)
    if not train:
        raise DataError(f"{root}: no training images after splitting")

    points = colors = None
    if meta_main.get("ply_file_path"):
        ply_path = inside(root, str(meta_main["ply_file_path"]), "ply_file_path")
        ply = read_ply(ply_path)
        if not all(k in ply for k in ("x", "y", "z")):
            raise DataError(f"{ply_path} has no x, y, z vertex properties")
        xyz = np.stack([ply["x"], ply["y"], ply["z"]], -1).astype(np.float32)
        check_points(xyz, ply_path)
        points = torch.from_numpy(xyz)
        if all(k in ply for k in ("red", "green", "blue")):
            rgb = np.stack([ply["red"], ply["green"], ply["blue"]], -1).astype(np.float32)
            colors = torch.from_numpy(rgb / (255.0 if rgb.max() > 1.0 else 1.0))
    cameras = undistort_cameras(cameras, lenses, background)  # after the cheap checks; pinholes come back unchanged
    names = meta_main.get("vkd_label_names")
    return Scene(root, cameras, train, test, points, colors, list(names) if names else None,
                 background, source="transforms")


def _detect(root: Path) -> bool:
    return (root / "transforms.json").is_file() or (root / "transforms_train.json").is_file()


def _load(root: Path, opt: SceneOptions) -> Scene:
    return load_transforms(root, opt.downscale, opt.test_every, opt.test_offset, opt.white_background)


FORMAT = SceneFormat(
    name="transforms", description="nerfstudio transforms.json or NeRF-synthetic transforms_{train,test}.json",
    detect=_detect, load=_load,
)
