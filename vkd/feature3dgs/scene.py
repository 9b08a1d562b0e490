"""Scene loaders: COLMAP (text or binary) and nerfstudio / NeRF-synthetic ``transforms*.json``.

Every loader returns a :class:`Scene` whose cameras use gsplat's conventions: ``viewmat`` is world-to-camera in
OpenCV axes (x right, y down, +z forward) and ``K`` is a pinhole matrix in pixels of the (downscaled) image.

* COLMAP stores world-to-camera rotations (wxyz quaternion) and translations in OpenCV axes: used directly.
* ``transforms.json`` stores camera-to-world matrices in OpenGL/Blender axes (y up, -z forward): the y and z
  columns are negated, then the matrix is inverted.

Only pinhole cameras are supported (COLMAP ``SIMPLE_PINHOLE`` / ``PINHOLE``; nerfstudio ``PINHOLE`` or ``OPENCV``
with all-zero distortion): undistort other models first (``colmap image_undistorter``).
"""

from __future__ import annotations

import json
import logging
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from vkd.data.files import image_size, open_image, resolve_inside
from vkd.errors import DataError
from vkd.feature3dgs.ply import read_ply

__all__ = ["Camera", "Scene", "load_scene", "load_colmap", "load_transforms", "read_colmap_model",
           "qvec_to_rotmat", "split_indices", "COLMAP_MODELS"]

log = logging.getLogger(__name__)

# COLMAP camera models: id -> (name, number of parameters) (COLMAP's src/colmap/sensor/models.h).
COLMAP_MODELS: dict[int, tuple[str, int]] = {
    0: ("SIMPLE_PINHOLE", 3), 1: ("PINHOLE", 4), 2: ("SIMPLE_RADIAL", 4), 3: ("RADIAL", 5), 4: ("OPENCV", 8),
    5: ("OPENCV_FISHEYE", 8), 6: ("FULL_OPENCV", 12), 7: ("FOV", 5), 8: ("SIMPLE_RADIAL_FISHEYE", 4),
    9: ("RADIAL_FISHEYE", 5), 10: ("THIN_PRISM_FISHEYE", 12), 11: ("RAD_TAN_THIN_PRISM_FISHEYE", 16),
}
_MODEL_PARAMS = {name: n for name, n in COLMAP_MODELS.values()}
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".PNG", ".JPG", ".JPEG", ".webp", ".bmp", ".tif", ".tiff")


@dataclass
class Camera:
    """One posed image.

    Attributes:
        name: image name relative to the scene's image folder (the sort key of splits).
        image_path: file to load (already the downscaled variant when one exists on disk).
        viewmat: ``[4, 4]`` float32 world-to-camera, OpenCV axes.
        K: ``[3, 3]`` float32 intrinsics for ``width x height``.
        width, height: image size after downscaling.
        label_path: optional per-pixel semantic id map (uint8 PNG), as written by the synthetic generator.
    """

    name: str
    image_path: Path
    viewmat: Tensor
    K: Tensor
    width: int
    height: int
    label_path: Path | None = None

    @property
    def center(self) -> Tensor:
        """Camera centre in world coordinates ``[3]``."""
        R, t = self.viewmat[:3, :3], self.viewmat[:3, 3]
        return -R.T @ t


@dataclass
class Scene:
    """A loaded scene: cameras, splits, optional points and semantic label names.

    Attributes:
        root: the scene directory.
        cameras: all cameras, sorted by name.
        train_ids, test_ids: indices into ``cameras``.
        points: ``[P, 3]`` float32 initial point cloud or ``None``.
        point_colors: ``[P, 3]`` float32 in [0, 1] or ``None``.
        label_names: semantic id -> name for ``label_path`` maps (synthetic scenes) or ``None``.
        background: RGB the images were composited on (RGBA inputs) or the scene's declared background.
        source: "colmap" or "transforms".
    """

    root: Path
    cameras: list[Camera]
    train_ids: list[int]
    test_ids: list[int]
    points: Tensor | None = None
    point_colors: Tensor | None = None
    label_names: list[str] | None = None
    background: tuple[float, float, float] = (0.0, 0.0, 0.0)
    source: str = ""
    _cache: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.cameras)

    def extent(self) -> float:
        """3DGS's ``cameras_extent``: 1.1 x the largest camera distance from the cameras' mean centre."""
        centers = torch.stack([c.center for c in self.cameras])
        return float(1.1 * (centers - centers.mean(0)).norm(dim=-1).max().clamp_min(1e-6))

    def center(self) -> Tensor:
        """Mean camera centre ``[3]``."""
        return torch.stack([c.center for c in self.cameras]).mean(0)

    def load_image(self, index: int, cache: bool = True) -> Tensor:
        """Image ``index`` as ``[3, H, W]`` float32 in [0, 1] at the camera's (downscaled) size."""
        key = ("img", index)
        if key in self._cache:
            return self._cache[key].float().div(255.0)
        cam = self.cameras[index]
        img = _read_rgb(cam.image_path, (cam.width, cam.height), self.background)
        if cache:
            self._cache[key] = img
        return img.float().div(255.0)

    def load_labels(self, index: int) -> Tensor | None:
        """Semantic id map ``[H, W]`` int64 (nearest-resized), or ``None`` when the scene has none."""
        cam = self.cameras[index]
        if cam.label_path is None:
            return None
        if not cam.label_path.is_file():
            raise DataError(f"label map not found: {cam.label_path}")
        with open_image(cam.label_path) as im:
            if im.size != (cam.width, cam.height):
                im = im.resize((cam.width, cam.height), Image.NEAREST)
            return torch.from_numpy(np.array(im, dtype=np.int64))


def _read_rgb(path: Path, size: tuple[int, int], background: tuple[float, float, float]) -> Tensor:
    # vkd's guarded opener: missing, empty, non-image, truncated and decompression-bomb files are DataErrors
    with open_image(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, tuple(int(round(c * 255)) for c in background) + (255,))
            im = Image.alpha_composite(bg, im)
        im = im.convert("RGB")
        if im.size != size:
            im = im.resize(size, Image.LANCZOS if im.size[0] > size[0] else Image.BICUBIC)
        arr = np.array(im, dtype=np.uint8)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # [3, H, W] uint8


def split_indices(names: list[str], test_every: int, test_offset: int = 0) -> tuple[list[int], list[int]]:
    """Hold out every ``test_every``-th image (sorted order) starting at ``test_offset``.

    Returns:
        (train indices, test indices) into ``names``.
    """
    test = [i for i in range(len(names)) if i >= test_offset and (i - test_offset) % test_every == 0]
    if len(names) > 1 and len(test) == len(names):
        test = test[:1]
    test_set = set(test)
    return [i for i in range(len(names)) if i not in test_set], test


def qvec_to_rotmat(q: Tensor) -> Tensor:
    """Unit quaternion ``[..., 4]`` (w, x, y, z) -> rotation matrix ``[..., 3, 3]``."""
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], -1).reshape(q.shape[:-1] + (3, 3))


# ----------------------------------------------------------------------------------------------------------------
# COLMAP
# ----------------------------------------------------------------------------------------------------------------


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


def _pinhole_K(model: str, params: list[float], where: str) -> tuple[float, float, float, float]:
    if model in ("SIMPLE_PINHOLE", "PINHOLE"):
        need = _MODEL_PARAMS[model]
        if len(params) < need or not all(math.isfinite(v) for v in params[:need]) or params[0] <= 0:
            raise DataError(f"{where}: {model} camera needs {need} finite parameters with a positive focal "
                            f"length, got {params}")
        if model == "SIMPLE_PINHOLE":
            f, cx, cy = params[:3]
            return f, f, cx, cy
        return tuple(params[:4])  # type: ignore[return-value]
    raise DataError(f"{where}: camera model {model} is not supported (only PINHOLE and SIMPLE_PINHOLE); "
                    "undistort the images first, e.g. `colmap image_undistorter`")


def _find_sparse_dir(root: Path) -> Path | None:
    for cand in (root / "sparse" / "0", root / "sparse", root):
        if (cand / "cameras.bin").is_file() or (cand / "cameras.txt").is_file():
            return cand
    return None


def _image_dir(root: Path, base: str, downscale: int) -> tuple[Path, bool]:
    """(folder, already_downscaled): prefer ``<base>_<k>/`` when downscaling and it exists."""
    if downscale > 1 and (root / f"{base}_{downscale}").is_dir():
        return root / f"{base}_{downscale}", True
    return root / base, False


def _check_images(cameras: list[Camera], root: Path) -> None:
    missing = [c.image_path for c in cameras if not c.image_path.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"{len(missing)} of {len(cameras)} images referenced by the poses in {root} are missing, "
                        f"e.g. {missing[0]}{more}")


def _scaled_size(width: int, height: int, downscale: int) -> tuple[int, int]:
    return max(1, int(round(width / downscale))), max(1, int(round(height / downscale)))


def _check_points(xyz: np.ndarray, where: Path) -> None:
    if xyz.shape[0] == 0:
        raise DataError(f"the point cloud {where} is empty; use model.init=random to start from random points")
    if not np.isfinite(xyz).all():
        raise DataError(f"the point cloud {where} has non-finite coordinates")


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
        DataError: missing files or images, unsupported camera model, empty point cloud.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"scene directory not found: {root}")
    sparse = _find_sparse_dir(root)
    if sparse is None:
        raise DataError(f"no COLMAP model in {root} (expected sparse/0/cameras.bin or cameras.txt)")
    cams, images, xyz, rgb = read_colmap_model(sparse)
    if not images:
        raise DataError(f"COLMAP model {sparse} has no registered images")
    img_dir, prescaled = _image_dir(root, images_dir, downscale)
    cameras = []
    for im in sorted(images.values(), key=lambda r: r["name"]):
        if im["camera_id"] not in cams:
            raise DataError(f"{sparse}: image {im['name']} refers to unknown camera {im['camera_id']}")
        cam = cams[im["camera_id"]]
        if not all(math.isfinite(v) for v in (*im["qvec"], *im["tvec"])) or not any(im["qvec"]):
            raise DataError(f"{sparse}: image {im['name']} has a non-finite or zero pose (qvec {im['qvec']}, "
                            f"tvec {im['tvec']})")
        if cam["width"] < 1 or cam["height"] < 1:
            raise DataError(f"{sparse}: camera {im['camera_id']} has size {cam['width']}x{cam['height']}")
        fx, fy, cx, cy = _pinhole_K(cam["model"], cam["params"], str(sparse))
        w, h = _scaled_size(cam["width"], cam["height"], downscale)
        sx, sy = w / cam["width"], h / cam["height"]
        K = torch.tensor([[fx * sx, 0, cx * sx], [0, fy * sy, cy * sy], [0, 0, 1]], dtype=torch.float32)
        viewmat = torch.eye(4, dtype=torch.float64)
        viewmat[:3, :3] = qvec_to_rotmat(torch.tensor(im["qvec"], dtype=torch.float64))
        viewmat[:3, 3] = torch.tensor(im["tvec"], dtype=torch.float64)
        path = _inside(img_dir, im["name"], f"{sparse}/images")
        if prescaled and not path.is_file():
            path = _inside(root / images_dir, im["name"], f"{sparse}/images")
        cameras.append(Camera(im["name"], path, viewmat.float(), K, w, h))
    _check_images(cameras, root)
    if require_points:
        _check_points(xyz, sparse / "points3D")
    train, test = split_indices([c.name for c in cameras], test_every, test_offset)
    points = torch.from_numpy(xyz) if len(xyz) else None
    colors = torch.from_numpy(rgb).float() / 255.0 if len(xyz) else None
    return Scene(root, cameras, train, test, points, colors, source="colmap")


# ----------------------------------------------------------------------------------------------------------------
# transforms.json (nerfstudio and NeRF-synthetic)
# ----------------------------------------------------------------------------------------------------------------


def _c2w_opengl_to_viewmat(c2w: Tensor) -> Tensor:
    """OpenGL camera-to-world ``[4, 4]`` -> OpenCV world-to-camera ``[4, 4]``."""
    c2w = c2w.clone().double()
    c2w[:3, 1:3] *= -1
    return torch.linalg.inv(c2w)


def _inside(root: Path, relative: str, where: str) -> Path:
    """``root / relative`` for a path read from a scene file; ``..`` and absolute paths leaving the scene are
    refused (symlinks inside the scene, e.g. a linked ``images/`` folder, are kept)."""
    try:
        return resolve_inside(root, relative, follow_symlinks=False)
    except DataError as err:
        raise DataError(f"{where}: {err}") from None


def _resolve_frame_path(base: Path, file_path: str, where: str = "transforms") -> Path:
    p = _inside(base, file_path, where)
    if p.suffix == "" or not p.is_file():
        for ext in _IMAGE_EXTS:
            cand = p.with_name(p.name + ext)
            if cand.is_file():
                return cand
    return p


_DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2")


def _frame_intrinsics(meta: dict, frame: dict, path: Path, where: str) -> tuple[float, float, float, float, int, int]:
    try:
        return _frame_intrinsics_unchecked(meta, frame, path, where)
    except (TypeError, ValueError, ZeroDivisionError) as err:  # "fl_x": "abc", "w": [1], angle 0, ...
        raise DataError(f"{where}: malformed camera intrinsics for {frame.get('file_path')}: "
                        f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def _frame_intrinsics_unchecked(meta: dict, frame: dict, path: Path, where: str
                                ) -> tuple[float, float, float, float, int, int]:
    def get(key):
        return frame.get(key, meta.get(key))

    model = str(get("camera_model") or "PINHOLE").upper()
    if model not in ("PINHOLE", "SIMPLE_PINHOLE", "OPENCV"):
        raise DataError(f"{where}: camera model {model} is not supported (only pinhole); undistort the images first")
    if any(abs(float(get(k) or 0.0)) > 0 for k in _DISTORTION_KEYS):
        raise DataError(f"{where}: distorted {model} cameras are not supported (non-zero k/p coefficients); "
                        "undistort the images first")
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
    return fx, fy, cx, cy, w, h


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

    cameras, splits = [], []
    for meta, frame, split, jpath in records:
        if not isinstance(frame, dict) or "file_path" not in frame or "transform_matrix" not in frame:
            raise DataError(f"{jpath}: every frame needs file_path and transform_matrix")
        rel = str(frame["file_path"])
        path = _resolve_frame_path(root, rel, str(jpath))
        fx, fy, cx, cy, w0, h0 = _frame_intrinsics(meta, frame, path, str(jpath))
        w, h = _scaled_size(w0, h0, downscale)
        if downscale > 1:
            parent = Path(rel).parent
            scaled = _resolve_frame_path(root, str(parent.with_name(parent.name + f"_{downscale}") / Path(rel).name),
                                         str(jpath)) if parent.name else None
            if scaled is not None and scaled.is_file():
                path = scaled
        sx, sy = w / w0, h / h0
        K = torch.tensor([[fx * sx, 0, cx * sx], [0, fy * sy, cy * sy], [0, 0, 1]], dtype=torch.float32)
        try:
            c2w = torch.tensor(frame["transform_matrix"], dtype=torch.float64)
        except (TypeError, ValueError):
            raise DataError(f"{jpath}: malformed transform_matrix for {rel}") from None
        if c2w.shape == (3, 4):
            c2w = torch.cat([c2w, torch.tensor([[0, 0, 0, 1]], dtype=torch.float64)])
        if c2w.shape != (4, 4) or not torch.isfinite(c2w).all():
            raise DataError(f"{jpath}: transform_matrix of {rel} must be a finite 4x4 matrix")
        label = _inside(root, str(frame["label_path"]), str(jpath)) if frame.get("label_path") else None
        name = rel if Path(rel).suffix else str(Path(rel).with_suffix(path.suffix))
        cameras.append(Camera(name, path, _c2w_opengl_to_viewmat(c2w).float(), K, w, h, label))
        splits.append(split)
    order = sorted(range(len(cameras)), key=lambda i: (splits[i] or "", cameras[i].name))
    cameras = [cameras[i] for i in order]
    splits = [splits[i] for i in order]
    _check_images(cameras, root)

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
        ply_path = _inside(root, str(meta_main["ply_file_path"]), "ply_file_path")
        ply = read_ply(ply_path)
        if not all(k in ply for k in ("x", "y", "z")):
            raise DataError(f"{ply_path} has no x, y, z vertex properties")
        xyz = np.stack([ply["x"], ply["y"], ply["z"]], -1).astype(np.float32)
        _check_points(xyz, ply_path)
        points = torch.from_numpy(xyz)
        if all(k in ply for k in ("red", "green", "blue")):
            rgb = np.stack([ply["red"], ply["green"], ply["blue"]], -1).astype(np.float32)
            colors = torch.from_numpy(rgb / (255.0 if rgb.max() > 1.0 else 1.0))
    names = meta_main.get("vkd_label_names")
    return Scene(root, cameras, train, test, points, colors, list(names) if names else None,
                 background, source="transforms")


def load_scene(path: str | Path, format: str = "auto", downscale: int = 1, test_every: int = 8,
               test_offset: int = 0, white_background: bool = False, require_points: bool = True) -> Scene:
    """Load a COLMAP or transforms.json scene (``format="auto"`` detects which).

    Raises:
        DataError: the directory is missing or holds neither format.
    """
    root = Path(path)
    if not root.exists():
        raise DataError(f"scene directory not found: {root}")
    if root.is_file():
        root = root.parent
    if format == "auto":
        if (root / "transforms.json").is_file() or (root / "transforms_train.json").is_file():
            format = "transforms"
        elif _find_sparse_dir(root) is not None:
            format = "colmap"
        else:
            raise DataError(f"{root} is neither a COLMAP scene (sparse/0/cameras.bin|txt) nor a transforms.json "
                            "scene")
    if format == "colmap":
        return load_colmap(root, downscale, test_every, test_offset, require_points=require_points)
    if format == "transforms":
        return load_transforms(root, downscale, test_every, test_offset, white_background)
    raise DataError(f"unknown scene format {format!r}; use auto, colmap or transforms")
