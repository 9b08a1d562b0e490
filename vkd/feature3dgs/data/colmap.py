"""COLMAP scenes: ``<root>/sparse/0/{cameras,images,points3D}.{bin,txt}`` and ``<root>/images/``.

COLMAP stores world-to-camera rotations (wxyz quaternion) and translations in OpenCV axes, which gsplat uses
directly. The binary and text layouts follow COLMAP's ``src/colmap/scene/reconstruction_io.cc``. Pinhole cameras
(``SIMPLE_PINHOLE`` / ``PINHOLE``) are read as they are; ``SIMPLE_RADIAL``, ``RADIAL``, ``OPENCV`` and ``FULL_OPENCV``
images are undistorted on load into the vkd cache (:mod:`vkd.feature3dgs.data.undistort`); fisheye and other models
must be undistorted first (``colmap image_undistorter``).
"""

from __future__ import annotations

import logging
import math
import struct
from pathlib import Path

import numpy as np
import torch

from vkd.errors import DataError
from vkd.feature3dgs.data.scene import (
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
from vkd.feature3dgs.data.undistort import lens_from_colmap, undistort_cameras
from vkd.render.cameras import colmap_to_viewmat

__all__ = ["COLMAP_MODELS", "read_colmap_model", "find_sparse_dir", "load_colmap", "FORMAT"]

log = logging.getLogger(__name__)

# COLMAP camera models: id -> (name, number of parameters) (COLMAP's src/colmap/sensor/models.h).
COLMAP_MODELS: dict[int, tuple[str, int]] = {
    0: ("SIMPLE_PINHOLE", 3), 1: ("PINHOLE", 4), 2: ("SIMPLE_RADIAL", 4), 3: ("RADIAL", 5), 4: ("OPENCV", 8),
    5: ("OPENCV_FISHEYE", 8), 6: ("FULL_OPENCV", 12), 7: ("FOV", 5), 8: ("SIMPLE_RADIAL_FISHEYE", 4),
    9: ("RADIAL_FISHEYE", 5), 10: ("THIN_PRISM_FISHEYE", 12), 11: ("RAD_TAN_THIN_PRISM_FISHEYE", 16),
}
_MODEL_PARAMS = {name: n for name, n in COLMAP_MODELS.values()}


def _read(fh, fmt: str):
    size = struct.calcsize("<" + fmt)
    data = fh.read(size)
    if len(data) != size:
        raise EOFError
    return struct.unpack("<" + fmt, data)


def _cameras_bin(path: Path) -> dict[int, dict]:
    cams = {}
    with open(path, "rb") as fh:
        (num,) = _read(fh, "Q")
        for _ in range(num):
            cam_id, model_id, width, height = _read(fh, "iiQQ")
            if model_id not in COLMAP_MODELS:
                raise DataError(f"{path}: unknown COLMAP camera model id {model_id}")
            name, n = COLMAP_MODELS[model_id]
            cams[cam_id] = {"model": name, "width": width, "height": height, "params": list(_read(fh, "d" * n))}
    return cams


def _cameras_txt(path: Path) -> dict[int, dict]:
    cams = {}
    for line in path.read_text().splitlines():
        tok = line.split()
        if not tok or tok[0].startswith("#"):
            continue
        if len(tok) < 5:
            raise DataError(f"{path}: malformed camera line: {line.strip()}")
        model = tok[1]
        if model not in _MODEL_PARAMS:
            raise DataError(f"{path}: unknown COLMAP camera model {model}")
        if len(tok) - 4 != _MODEL_PARAMS[model]:
            raise DataError(f"{path}: a {model} camera has {_MODEL_PARAMS[model]} parameters, got {len(tok) - 4}: "
                            f"{line.strip()}")
        cams[int(tok[0])] = {"model": model, "width": int(tok[2]), "height": int(tok[3]),
                             "params": [float(v) for v in tok[4:]]}
    return cams


def _images_bin(path: Path) -> dict[int, dict]:
    images = {}
    with open(path, "rb") as fh:
        (num,) = _read(fh, "Q")
        for _ in range(num):
            image_id, qw, qx, qy, qz, tx, ty, tz, cam_id = _read(fh, "idddddddi")
            name = bytearray()
            while True:
                c = fh.read(1)
                if not c:
                    raise EOFError
                if c == b"\x00":
                    break
                name += c
            (n2d,) = _read(fh, "Q")
            fh.seek(24 * n2d, 1)  # (x, y, point3D_id) per keypoint: not needed
            images[image_id] = {"qvec": (qw, qx, qy, qz), "tvec": (tx, ty, tz), "camera_id": cam_id,
                                "name": name.decode("utf-8")}
    return images


def _images_txt(path: Path) -> dict[int, dict]:
    images = {}
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("#")]
    i = 0
    while i < len(lines):
        tok = lines[i].split()
        if not tok:  # tolerate blank lines between records
            i += 1
            continue
        if len(tok) < 10:
            raise DataError(f"{path}: malformed image line: {lines[i].strip()}")
        images[int(tok[0])] = {"qvec": tuple(float(v) for v in tok[1:5]), "tvec": tuple(float(v) for v in tok[5:8]),
                               "camera_id": int(tok[8]), "name": " ".join(tok[9:])}
        i += 2  # the next line lists the 2D points (possibly empty)
    return images


def _points_bin(path: Path) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    xyz, rgb, tracks = [], [], []
    size = path.stat().st_size
    with open(path, "rb") as fh:
        (num,) = _read(fh, "Q")
        for _ in range(num):
            _pid, x, y, z, r, g, b, _err, track = _read(fh, "QdddBBBdQ")
            if 8 * track > size - fh.tell():  # a corrupt length must not allocate gigabytes
                raise EOFError
            # (image_id int32, point2D_idx int32) per observation
            tracks.append(np.frombuffer(fh.read(8 * track), dtype="<i4")[0::2])
            xyz.append((x, y, z))
            rgb.append((r, g, b))
    return (np.asarray(xyz, dtype=np.float32).reshape(-1, 3), np.asarray(rgb, dtype=np.uint8).reshape(-1, 3),
            tracks)


def _points_txt(path: Path) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    xyz, rgb, tracks = [], [], []
    for line in path.read_text().splitlines():
        tok = line.split()
        if not tok or tok[0].startswith("#"):
            continue
        if len(tok) < 8:
            raise DataError(f"{path}: malformed point line: {line.strip()}")
        xyz.append([float(v) for v in tok[1:4]])
        rgb.append([int(v) for v in tok[4:7]])
        tracks.append(np.asarray([int(v) for v in tok[8::2]], dtype=np.int64))  # (IMAGE_ID, POINT2D_IDX) pairs
    return (np.asarray(xyz, dtype=np.float32).reshape(-1, 3), np.asarray(rgb, dtype=np.uint8).reshape(-1, 3),
            tracks)


def read_colmap_model(sparse_dir: str | Path) -> tuple[dict[int, dict], dict[int, dict], np.ndarray, np.ndarray]:
    """Read ``cameras``, ``images`` and ``points3D`` (``.bin`` preferred, else ``.txt``) from a sparse model dir.

    Points whose track refers to an image id that ``images`` does not hold (an inconsistent model) are dropped,
    counted and logged.

    Returns:
        (cameras by id, images by id, points xyz ``[P, 3]`` float32, colours ``[P, 3]`` uint8).
    """
    d = Path(sparse_dir)
    out = []
    for stem, readers in (("cameras", (_cameras_bin, _cameras_txt)), ("images", (_images_bin, _images_txt)),
                          ("points3D", (_points_bin, _points_txt))):
        for ext, reader in zip((".bin", ".txt"), readers, strict=True):
            path = d / f"{stem}{ext}"
            if path.is_file():
                try:
                    out.append(reader(path))
                except (EOFError, struct.error):
                    raise DataError(f"{path} is truncated or not a COLMAP {ext[1:]} file") from None
                except (ValueError, UnicodeDecodeError) as err:
                    raise DataError(f"{path}: cannot parse ({err})") from None
                break
        else:
            raise DataError(f"COLMAP model in {d} has no {stem}.bin or {stem}.txt")
    images = out[1]
    xyz, rgb, tracks = out[2]
    if tracks:
        lengths = np.fromiter((len(t) for t in tracks), dtype=np.int64, count=len(tracks))
        observed = np.concatenate(tracks).astype(np.int64)
        unknown = ~np.isin(observed, np.asarray(sorted(images), dtype=np.int64))
        bad = np.zeros(len(tracks), dtype=bool)
        bad[np.repeat(np.arange(len(tracks)), lengths)[unknown]] = True
        if bad.any():
            log.warning("%s: dropped %d of %d points3D entries whose tracks refer to image ids missing from "
                        "images.%s", d, int(bad.sum()), len(bad), "bin" if (d / "images.bin").is_file() else "txt")
            xyz, rgb = xyz[~bad], rgb[~bad]
    return out[0], images, xyz, rgb


def find_sparse_dir(root: Path) -> Path | None:
    """The folder holding ``cameras.{bin,txt}``: ``sparse/0``, ``sparse`` or the root itself (``None``: none)."""
    for cand in (root / "sparse" / "0", root / "sparse", root):
        if (cand / "cameras.bin").is_file() or (cand / "cameras.txt").is_file():
            return cand
    return None


def _image_dir(root: Path, base: str, downscale: int) -> tuple[Path, bool]:
    """(folder, already_downscaled): prefer ``<base>_<k>/`` when downscaling and it exists."""
    if downscale > 1 and (root / f"{base}_{downscale}").is_dir():
        return root / f"{base}_{downscale}", True
    return root / base, False


def load_colmap(root: str | Path, downscale: int = 1, test_every: int = 8, test_offset: int = 0,
                images_dir: str = "images", require_points: bool = True) -> Scene:
    """Load a COLMAP scene: ``<root>/sparse/0/{cameras,images,points3D}.{bin,txt}`` + ``<root>/images/``.

    Args:
        root: scene directory.
        downscale: integer factor; ``<root>/images_<k>/`` is used when it exists, otherwise images are resized.
        test_every, test_offset: hold-out split over images sorted by name.
        images_dir: image folder name under ``root``.
        require_points: raise when ``points3D`` is empty (the default initialisation needs it).

    Raises:
        DataError: missing files or images, unsupported camera model or distortion too strong to undistort, empty
            point cloud.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"scene directory not found: {root}")
    sparse = find_sparse_dir(root)
    if sparse is None:
        raise DataError(f"no COLMAP model in {root} (expected sparse/0/cameras.bin or cameras.txt)")
    cams, images, xyz, rgb = read_colmap_model(sparse)
    if not images:
        raise DataError(f"COLMAP model {sparse} has no registered images")
    img_dir, prescaled = _image_dir(root, images_dir, downscale)
    cameras, lenses = [], []
    for im in sorted(images.values(), key=lambda r: r["name"]):
        if im["camera_id"] not in cams:
            raise DataError(f"{sparse}: image {im['name']} refers to unknown camera {im['camera_id']}")
        cam = cams[im["camera_id"]]
        if not all(math.isfinite(v) for v in (*im["qvec"], *im["tvec"])) or not any(im["qvec"]):
            raise DataError(f"{sparse}: image {im['name']} has a non-finite or zero pose (qvec {im['qvec']}, "
                            f"tvec {im['tvec']})")
        if cam["width"] < 1 or cam["height"] < 1:
            raise DataError(f"{sparse}: camera {im['camera_id']} has size {cam['width']}x{cam['height']}")
        lens = lens_from_colmap(cam["model"], cam["params"], cam["width"], cam["height"],
                                f"{sparse}: camera {im['camera_id']}")
        lens = lens.scaled(*scaled_size(cam["width"], cam["height"], downscale))
        viewmat = colmap_to_viewmat(torch.tensor(im["qvec"], dtype=torch.float64),
                                    torch.tensor(im["tvec"], dtype=torch.float64))
        path = inside(img_dir, im["name"], f"{sparse}/images")
        if prescaled and not path.is_file():
            path = inside(root / images_dir, im["name"], f"{sparse}/images")
        cameras.append(Camera(im["name"], path, viewmat.float(), lens.K(), lens.width, lens.height))
        lenses.append(lens)
    check_images(cameras, root)
    if require_points:
        check_points(xyz, sparse / "points3D")
    cameras = undistort_cameras(cameras, lenses)  # after the cheap checks; pinhole cameras come back unchanged
    train, test = split_indices([c.name for c in cameras], test_every, test_offset)
    points = torch.from_numpy(xyz) if len(xyz) else None
    colors = torch.from_numpy(rgb).float() / 255.0 if len(xyz) else None
    return Scene(root, cameras, train, test, points, colors, source="colmap")


def _load(root: Path, opt: SceneOptions) -> Scene:
    return load_colmap(root, opt.downscale, opt.test_every, opt.test_offset, require_points=opt.require_points)


FORMAT = SceneFormat(
    name="colmap", description="COLMAP sparse model (sparse/0/cameras.bin|txt, images.*, points3D.*) + images/",
    detect=lambda root: find_sparse_dir(root) is not None, load=_load,
)
