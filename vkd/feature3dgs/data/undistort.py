"""Undistort radial/tangential (OpenCV-model) cameras on load, into cached pinhole images.

COLMAP's ``SIMPLE_RADIAL``, ``RADIAL``, ``OPENCV`` and ``FULL_OPENCV`` models and nerfstudio's ``OPENCV`` cameras all
use OpenCV's distortion of the normalised image point ``(x, y) = ((u - cx) / fx, (v - cy) / fy)``::

    r2 = x² + y²
    x_d = x (1 + k1 r2 + k2 r2² + k3 r2³) / (1 + k4 r2 + k5 r2² + k6 r2³) + 2 p1 x y + p2 (r2 + 2 x²)
    y_d = y (1 + k1 r2 + k2 r2² + k3 r2³) / (1 + k4 r2 + k5 r2² + k6 r2³) + p1 (r2 + 2 y²) + 2 p2 x y

(the simpler models set the missing coefficients to zero). The forward map is kornia's
:func:`~kornia.geometry.calibration.distort_points` (same coefficient order ``k1, k2, p1, p2, k3, k4, k5, k6``),
its inverse :func:`~kornia.geometry.calibration.undistort_points`; both checked against COLMAP's equations in
``tests/feature3dgs/test_undistort.py``.

**New intrinsics** (:func:`plan_undistortion`): the focal lengths are kept, so the pixel scale at the image centre
is unchanged, and the image is cropped to the largest rectangle, centred in the valid region, whose every pixel
samples inside the source image (COLMAP ``image_undistorter``'s default of no blank pixels, without its rescaling).
No black border reaches training, where the photometric loss would fit it as scene content; the principal point
moves by the crop offset and the size may shrink (pincushion) or grow (barrel distortion).
All-zero coefficients give back the same size, ``K`` and image.

Pixel convention: COLMAP's and gsplat's, pixel ``(i, j)`` has its centre at ``(i + 0.5, j + 0.5)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from kornia.geometry.calibration import distort_points, undistort_points
from PIL import Image
from torch import Tensor

from vkd.cache import build_once, cache_dir, tmp_path
from vkd.errors import DataError
from vkd.feature3dgs.data.scene import Camera, read_rgb

__all__ = ["LensCamera", "Undistortion", "UNDISTORTED_MODELS", "lens_from_colmap", "plan_undistortion",
           "undistort_cameras", "undistorted_cache_dir"]

log = logging.getLogger(__name__)

# COLMAP model -> (has separate fx/fy, number of parameters, slots of kornia's 8 coefficients they fill).
# kornia's order: k1, k2, p1, p2, k3, k4, k5, k6 (FULL_OPENCV stores exactly this order after fx, fy, cx, cy).
_COLMAP_LAYOUT: dict[str, tuple[bool, int, tuple[int, ...]]] = {
    "SIMPLE_PINHOLE": (False, 3, ()),
    "PINHOLE": (True, 4, ()),
    "SIMPLE_RADIAL": (False, 4, (0,)),
    "RADIAL": (False, 5, (0, 1)),
    "OPENCV": (True, 8, (0, 1, 2, 3)),
    "FULL_OPENCV": (True, 12, (0, 1, 2, 3, 4, 5, 6, 7)),
}
UNDISTORTED_MODELS = tuple(m for m, (_, _, slots) in _COLMAP_LAYOUT.items() if slots)

# Bumped whenever the remap or the crop changes, so old cache entries are not reused.
_CACHE_VERSION = 1
# Fixed-point steps of the inverse distortion: 20 reach float64 rounding for real lenses (5, kornia's default,
# leaves 1e-5 px); the result is checked by distorting it again.
_INVERSE_ITERS = 20
_INVERSE_TOL_PX = 1e-3
# Slack for the in-image check of the remap: the crop is found from border samples one pixel apart (pixels).
_BOUNDS_TOL_PX = 0.05
# Rows of the remap computed at once (bounds the float64 working memory to a few tens of MB).
_ROW_CHUNK = 256


@dataclass(frozen=True)
class LensCamera:
    """A camera with OpenCV-model distortion, at the size its images are read at.

    Attributes:
        model: camera model name, for messages.
        width, height: image size in pixels.
        fx, fy, cx, cy: intrinsics in pixels of that size.
        dist: kornia/OpenCV coefficients ``(k1, k2, p1, p2, k3, k4, k5, k6)``; all zero for a pinhole.
        where: what to name in error messages (not part of equality or the cache key).
    """

    model: str
    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float
    dist: tuple[float, ...] = (0.0,) * 8
    where: str = field(default="", compare=False)

    @property
    def is_pinhole(self) -> bool:
        """True when every distortion coefficient is zero (nothing to undistort)."""
        return not any(self.dist)

    def K(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Pinhole matrix ``[3, 3]`` of the distorted camera."""
        return torch.tensor([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]], dtype=dtype)

    def scaled(self, width: int, height: int) -> LensCamera:
        """The same lens for images resized to ``width x height`` (coefficients act on normalised coordinates)."""
        sx, sy = width / self.width, height / self.height
        return dataclasses.replace(self, width=width, height=height, fx=self.fx * sx, fy=self.fy * sy,
                                   cx=self.cx * sx, cy=self.cy * sy)


def lens_from_colmap(model: str, params: list[float], width: int, height: int, where: str) -> LensCamera:
    """A :class:`LensCamera` from a COLMAP camera (``cameras.bin`` / ``cameras.txt`` parameters).

    Raises:
        DataError: a model vkd cannot undistort (fisheye, FOV, thin-prism), or non-finite / non-positive intrinsics.
    """
    if model not in _COLMAP_LAYOUT:
        raise DataError(f"{where}: camera model {model} is not supported (vkd reads SIMPLE_PINHOLE and PINHOLE and "
                        f"undistorts {', '.join(UNDISTORTED_MODELS)} on load); undistort the images first with "
                        "`colmap image_undistorter`")
    two_focals, need, slots = _COLMAP_LAYOUT[model]
    if len(params) < need or not all(math.isfinite(v) for v in params[:need]) or params[0] <= 0 or (
            two_focals and params[1] <= 0):
        raise DataError(f"{where}: {model} camera needs {need} finite parameters with a positive focal length, got "
                        f"{params}")
    if two_focals:
        fx, fy, cx, cy = params[:4]
        rest = params[4:need]
    else:
        fx = fy = params[0]
        cx, cy = params[1:3]
        rest = params[3:need]
    dist = [0.0] * 8
    for slot, value in zip(slots, rest, strict=True):
        dist[slot] = float(value)
    return LensCamera(model, int(width), int(height), float(fx), float(fy), float(cx), float(cy), tuple(dist), where)


@dataclass(frozen=True)
class Undistortion:
    """How one :class:`LensCamera` is undistorted: the pinhole camera of the output and the remap to it.

    Attributes:
        lens: the distorted source camera.
        K: ``[3, 3]`` float64 pinhole intrinsics of the undistorted image.
        width, height: undistorted image size.
    """

    lens: LensCamera
    K: Tensor
    width: int
    height: int

    def source_pixels(self, rows: range) -> Tensor:
        """Where output rows ``rows`` sample the distorted image: ``[len(rows), W', 2]`` float64 (u, v) pixels."""
        u = torch.arange(self.width, dtype=torch.float64) + 0.5  # [W']
        v = torch.tensor(rows, dtype=torch.float64) + 0.5  # [R]
        grid = torch.stack(torch.meshgrid(v, u, indexing="ij")[::-1], -1)  # [R, W', 2] (u, v)
        dist = torch.tensor(self.lens.dist, dtype=torch.float64)  # [8]
        # distort_points: new_K maps the (undistorted) input pixels to rays, K maps the distorted ray to pixels.
        out = distort_points(grid.reshape(-1, 2), self.lens.K(torch.float64), dist, new_K=self.K)  # [R*W', 2]
        return out.reshape(len(rows), self.width, 2)

    def grid(self) -> Tensor:
        """The ``grid_sample`` grid of the remap, after checking it stays inside the source and never folds back.

        Returns:
            ``[1, H', W', 2]`` float32 in ``[-1, 1]`` (``align_corners=False``: -1 / +1 are the outer pixel edges).

        Raises:
            DataError: a lens whose distortion is not monotonic over the frame (too strong to undistort).
        """
        lens = self.lens
        size = torch.tensor([lens.width, lens.height], dtype=torch.float64)
        chunks, prev = [], None
        for start in range(0, self.height, _ROW_CHUNK):
            src = self.source_pixels(range(start, min(start + _ROW_CHUNK, self.height)))  # [R, W', 2]
            rows = src if prev is None else torch.cat([prev, src])  # one row of overlap for the vertical check
            inside = bool(((rows >= 0.5 - _BOUNDS_TOL_PX) & (rows <= size - 0.5 + _BOUNDS_TOL_PX)).all())
            # u must grow along each row and v down each column: otherwise two output pixels see one scene point
            monotonic = bool((rows[:, 1:, 0] > rows[:, :-1, 0]).all()) and bool((rows[1:, :, 1] > rows[:-1, :, 1]).all())
            if not (bool(torch.isfinite(rows).all()) and inside and monotonic):
                raise DataError(f"{lens.where}: the {lens.model} distortion {_coeffs(lens)} folds the image over "
                                "(too strong to invert on this frame); undistort the images first with "
                                "`colmap image_undistorter`")
            chunks.append((2.0 * src / size - 1.0).float())  # g = 2 u / W - 1 for corner-origin pixels u
            prev = src[-1:]
        return torch.cat(chunks)[None]  # [1, H', W', 2]

    def apply(self, image: Tensor, grid: Tensor | None = None) -> Tensor:
        """Undistort one image with bilinear sampling.

        Args:
            image: ``[3, H, W]`` uint8 at the lens' size.
            grid: :meth:`grid`, when the caller reuses it across the images of one camera.

        Returns:
            ``[3, H', W']`` uint8 at :attr:`width` x :attr:`height`.

        Raises:
            DataError: the image is not at the lens' size, or the distortion folds the image (see :meth:`grid`).
        """
        lens = self.lens
        if tuple(image.shape[-2:]) != (lens.height, lens.width):
            raise DataError(f"{lens.where}: image is {image.shape[-1]}x{image.shape[-2]}, the camera "
                            f"{lens.width}x{lens.height}")
        grid = self.grid() if grid is None else grid  # [1, H', W', 2]
        # border padding only absorbs the sub-pixel slack of the crop; grid() guarantees nothing lies further out
        out = F.grid_sample(image[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out[0].round().clamp(0, 255).to(torch.uint8)  # [3, H', W']


def _coeffs(lens: LensCamera) -> str:
    names = ("k1", "k2", "p1", "p2", "k3", "k4", "k5", "k6")
    return "(" + ", ".join(f"{n}={v:g}" for n, v in zip(names, lens.dist, strict=True) if v) + ")"


def plan_undistortion(lens: LensCamera) -> Undistortion:
    """The pinhole camera an image of ``lens`` is undistorted to: same focal lengths, valid-pixel crop.

    The source border (outermost pixel centres) is undistorted; the crop spans, on each side, the innermost of
    those points, centred in that span (whole pixels wide, fractional offset). With zero distortion this is the input
    size and ``K``.

    Raises:
        DataError: the distortion cannot be inverted at the border or leaves no valid pixels (a fold inside the
            frame is found by :meth:`Undistortion.grid`, when an image is first undistorted).
    """
    W, H = lens.width, lens.height
    u = torch.arange(W, dtype=torch.float64) + 0.5  # [W]
    v = torch.arange(H, dtype=torch.float64) + 0.5  # [H]
    border = torch.cat([
        torch.stack([torch.full_like(v, 0.5), v], -1),  # left [H, 2]
        torch.stack([torch.full_like(v, W - 0.5), v], -1),  # right [H, 2]
        torch.stack([u, torch.full_like(u, 0.5)], -1),  # top [W, 2]
        torch.stack([u, torch.full_like(u, H - 0.5)], -1),  # bottom [W, 2]
    ])  # [2H + 2W, 2]
    K = lens.K(torch.float64)
    dist = torch.tensor(lens.dist, dtype=torch.float64)  # [8]
    ideal = undistort_points(border, K, dist, num_iters=_INVERSE_ITERS)  # [2H + 2W, 2] pinhole pixels, same K
    residual = (distort_points(ideal, K, dist) - border).abs()
    if not bool(torch.isfinite(ideal).all()) or float(residual.max()) > _INVERSE_TOL_PX:
        raise DataError(f"{lens.where}: the {lens.model} distortion {_coeffs(lens)} cannot be inverted at the image "
                        "border (too strong); undistort the images first with `colmap image_undistorter`")
    left, right, top, bottom = ideal.split([H, H, W, W])
    lo = torch.stack([left[:, 0].max(), top[:, 1].max()])  # innermost left / top border points
    hi = torch.stack([right[:, 0].min(), bottom[:, 1].min()])  # innermost right / bottom
    # pixel centres one apart fit floor(span) + 1 times; 1e-6 absorbs float rounding of an exact fit
    size = torch.floor(hi - lo + 1e-6) + 1  # [2]
    if bool((size < 2).any()):
        raise DataError(f"{lens.where}: the {lens.model} distortion {_coeffs(lens)} leaves no valid pixels; "
                        "undistort the images first with `colmap image_undistorter`")
    offset = (lo + hi) / 2 - size / 2  # [2] ideal-pixel position of the crop's corner
    offset = torch.where(offset.abs() < 1e-9, torch.zeros_like(offset), offset)  # exact K for zero distortion
    new_K = K.clone()
    new_K[0, 2] -= offset[0]
    new_K[1, 2] -= offset[1]
    return Undistortion(lens, new_K, int(size[0]), int(size[1]))


def undistorted_cache_dir() -> Path:
    """Where undistorted images are cached: ``<vkd cache>/feature3dgs/undistorted/``."""
    return cache_dir() / "feature3dgs" / "undistorted"


def _cache_file(source: Path, lens: LensCamera, background: tuple[float, float, float]) -> Path:
    """Cache entry of ``source`` undistorted for ``lens``: keyed by the file (path, size, mtime) and the camera."""
    st = source.stat()
    key = {"version": _CACHE_VERSION, "file": str(source.resolve()), "bytes": st.st_size,
           "mtime_ns": st.st_mtime_ns, "model": lens.model, "size": [lens.width, lens.height],
           "K": [lens.fx, lens.fy, lens.cx, lens.cy], "dist": list(lens.dist), "background": list(background)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return undistorted_cache_dir() / f"{source.stem}-{digest}.png"


def _write_png(image: Tensor, path: Path) -> None:
    """Save ``[3, H, W]`` uint8 as PNG under a temporary name, then rename (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        # lossless, and fast level 1: the file is a cache, not an archive
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp, format="PNG", compress_level=1)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def undistort_cameras(cameras: list[Camera], lenses: list[LensCamera],
                      background: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> list[Camera]:
    """Replace every distorted camera by its undistorted pinhole twin, whose image lives in the vkd cache.

    Images are undistorted once, eagerly (so broken files fail at load time), and later loads read the cache;
    the dataset directory is never written. Cameras whose coefficients are all zero are returned unchanged.

    Args:
        cameras: cameras with the distorted ``K`` and size; ``image_path`` is the distorted file.
        lenses: the lens of each camera, at that camera's size.
        background: RGB the images' transparent pixels are composited on (part of the cache key).

    Returns:
        cameras in the same order, distorted ones pointing at the cached undistorted PNG with the new ``K`` / size.

    Raises:
        DataError: unreadable images, label maps on a distorted camera, distortion too strong to undistort.
    """
    plans: dict[LensCamera, Undistortion] = {}
    last_grid: list[tuple[Undistortion, Tensor]] = []  # the latest camera's remap: one shared lens is the usual case
    out, built = [], 0
    for cam, lens in zip(cameras, lenses, strict=True):
        if lens.is_pinhole:
            out.append(cam)
            continue
        if cam.label_path is not None:
            raise DataError(f"{lens.where}: label maps of distorted cameras are not supported ({cam.name}); "
                            "undistort the scene first")
        if lens not in plans:
            plans[lens] = plan_undistortion(lens)
        plan = plans[lens]
        target = _cache_file(cam.image_path, lens, background)

        def build(cam: Camera = cam, plan: Undistortion = plan, target: Path = target) -> bool:
            with torch.no_grad():
                if not last_grid or last_grid[0][0] is not plan:
                    last_grid[:] = [(plan, plan.grid())]
                image = read_rgb(cam.image_path, (plan.lens.width, plan.lens.height), background)  # [3, H, W]
                _write_png(plan.apply(image, last_grid[0][1]), target)
            return True

        built += bool(build_once(target, target.is_file, build))
        out.append(dataclasses.replace(cam, image_path=target, K=plan.K.float(), width=plan.width,
                                       height=plan.height))
    if plans:
        distorted = sum(c is not o for c, o in zip(cameras, out, strict=True))
        log.info("undistorted %d %s image(s): %d built, %d read from the cache %s", distorted,
                 "/".join(sorted({lens.model for lens in plans})), built, distorted - built, undistorted_cache_dir())
    return out

