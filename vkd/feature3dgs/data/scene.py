"""Scene types shared by every scene format: posed cameras, the loaded scene, splits and file checks.

Cameras use gsplat's conventions: ``viewmat`` is world-to-camera in OpenCV axes (x right, y down, +z forward) and
``K`` is a pinhole matrix in pixels of the (downscaled) image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from vkd.data.files import IMAGE_EXTENSIONS, open_image, read_image, resolve_inside
from vkd.errors import DataError

__all__ = ["Camera", "Scene", "SceneOptions", "SceneFormat", "split_indices", "read_rgb", "scaled_size",
           "scaled_intrinsics", "inside", "check_images", "check_points", "FRAME_EXTENSIONS"]

# Suffixes tried for a frame path written without one (NeRF-synthetic's "./train/r_0"); Linux is case-sensitive.
FRAME_EXTENSIONS = IMAGE_EXTENSIONS + tuple(ext.upper() for ext in IMAGE_EXTENSIONS)


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
        source: the key of :data:`vkd.feature3dgs.data.SCENE_FORMATS` it was read with.
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
        img = read_rgb(cam.image_path, (cam.width, cam.height), self.background)
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


def read_rgb(path: Path, size: tuple[int, int], background: tuple[float, float, float]) -> Tensor:
    """An image as ``[3, H, W]`` uint8 at ``size = (W, H)``, transparent pixels composited onto ``background``.

    Raises:
        DataError: missing, empty, non-image, truncated or too large (vkd's guarded reader).
    """
    im = Image.fromarray(read_image(path, background=background))
    if im.size != size:
        im = im.resize(size, Image.LANCZOS if im.size[0] > size[0] else Image.BICUBIC)
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # [3, H, W] uint8


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


def scaled_size(width: int, height: int, downscale: int) -> tuple[int, int]:
    """Image size after an integer ``downscale`` (rounded, at least one pixel)."""
    return max(1, int(round(width / downscale))), max(1, int(round(height / downscale)))


def scaled_intrinsics(fx: float, fy: float, cx: float, cy: float, sx: float, sy: float) -> Tensor:
    """Pinhole ``K [3, 3]`` float32 of an image resized by ``(sx, sy)``."""
    return torch.tensor([[fx * sx, 0, cx * sx], [0, fy * sy, cy * sy], [0, 0, 1]], dtype=torch.float32)


def inside(root: Path, relative: str, where: str) -> Path:
    """``root / relative`` for a path read from a scene file; ``..`` and absolute paths leaving the scene are
    refused (symlinks inside the scene, e.g. a linked ``images/`` folder, are kept)."""
    try:
        return resolve_inside(root, relative, follow_symlinks=False)
    except DataError as err:
        raise DataError(f"{where}: {err}") from None


def check_images(cameras: list[Camera], root: Path) -> None:
    """Raise a DataError naming the first missing image when any camera's file is absent."""
    missing = [c.image_path for c in cameras if not c.image_path.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"{len(missing)} of {len(cameras)} images referenced by the poses in {root} are missing, "
                        f"e.g. {missing[0]}{more}")


def check_points(xyz: np.ndarray, where: Path) -> None:
    """Raise a DataError for an empty or non-finite point cloud ``[P, 3]``."""
    if xyz.shape[0] == 0:
        raise DataError(f"the point cloud {where} is empty; use model.init=random to start from random points")
    if not np.isfinite(xyz).all():
        raise DataError(f"the point cloud {where} has non-finite coordinates")


@dataclass(frozen=True)
class SceneOptions:
    """How to read a scene, whatever its format (``data.*`` of the Feature 3DGS config).

    Attributes:
        downscale: integer factor; a pre-scaled ``<images>_<k>/`` folder is used when the scene has one.
        test_every, test_offset: hold out every ``test_every``-th image (sorted by name) from ``test_offset``, where
            the format does not define its own split.
        white_background: composite transparent images onto white (else black) unless the scene declares one.
        require_points: raise when the scene's point cloud is empty (the default initialisation needs it).
    """

    downscale: int = 1
    test_every: int = 8
    test_offset: int = 0
    white_background: bool = False
    require_points: bool = True


@dataclass(frozen=True)
class SceneFormat:
    """One on-disk scene format: an entry of :data:`vkd.feature3dgs.data.SCENE_FORMATS`.

    Attributes:
        name: the ``data.format`` value that selects it.
        description: one line for the README and error messages.
        detect: ``scene directory -> bool``, cheap (file names only); ``data.format=auto`` takes the first match.
        load: ``(scene directory, options) -> Scene``; raises :class:`vkd.errors.DataError` on bad input.
    """

    name: str
    description: str
    detect: Callable[[Path], bool]
    load: Callable[[Path, SceneOptions], Scene]

