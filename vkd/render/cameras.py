"""Cameras: intrinsics from field of view, look-at / orbit / spiral paths, and pose-convention conversions.

vkd's internal convention is gsplat's: a camera is a **world-to-camera** ``viewmat [4, 4]`` in **OpenCV camera
axes** and a pinhole ``K [3, 3]`` in pixels (pixel centres at +0.5). Paths return camera-to-world matrices
(``c2w``) in OpenCV axes; ``viewmat = c2w_to_viewmat(c2w)``.

================= ============================ ========================================================================
convention        camera axes (x, y, z)        what is stored
================= ============================ ========================================================================
OpenCV / gsplat   right, down, forward         ``viewmat`` = world-to-camera (gsplat); ``c2w`` = its inverse
OpenGL / Blender  right, up, backward          ``c2w`` (camera looks down its -z axis)
COLMAP            right, down, forward         ``images.txt``: world-to-camera as ``qvec`` (w, x, y, z) and ``tvec``
NeRF-synthetic    right, up, backward          ``transforms.json``: ``transform_matrix`` = camera-to-world (OpenGL
                                               axes), ``camera_angle_x`` = horizontal FOV in radians
nerfstudio        right, up, backward          ``transforms.json``: ``transform_matrix`` = camera-to-world (OpenGL
                                               axes). Data converted from COLMAP (``ns-process-data``) is also
                                               rotated in world space: (x, y, z) → (x, z, -y), i.e. COLMAP's usual
                                               -y "up" becomes +z
================= ============================ ========================================================================

Switching OpenCV ↔ OpenGL camera axes is ``c2w @ diag(1, -1, -1, 1)`` (its own inverse).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vkd.render.torch_backend import quat_to_rotmat

__all__ = [
    "CV_TO_GL",
    "c2w_to_viewmat",
    "viewmat_to_c2w",
    "opencv_to_opengl",
    "opengl_to_opencv",
    "rotmat_to_quat",
    "quat_to_rotmat",
    "colmap_to_c2w",
    "colmap_to_viewmat",
    "c2w_to_colmap",
    "nerf_synthetic_to_viewmat",
    "viewmat_to_nerf_synthetic",
    "colmap_to_nerfstudio",
    "nerfstudio_to_colmap",
    "intrinsics_from_fov",
    "fov_from_intrinsics",
    "intrinsics_from_camera_angle_x",
    "look_at",
    "orbit_path",
    "spiral_path",
]

# Flips camera y and z: OpenCV camera axes <-> OpenGL camera axes (right-multiplied onto a c2w).
CV_TO_GL = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))
# nerfstudio's world rotation for COLMAP data: (x, y, z) -> (x, z, -y) (left-multiplied onto a c2w).
_NS_WORLD = torch.tensor(
    [[1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, -1.0, 0, 0], [0, 0, 0, 1.0]], dtype=torch.float64
)


def _check_mat4(name: str, m: Tensor) -> None:
    if not isinstance(m, Tensor) or m.shape[-2:] != (4, 4):
        shape = list(m.shape) if isinstance(m, Tensor) else type(m).__name__
        raise ValueError(f"{name} must be [..., 4, 4], got shape {shape}")


def _const(m: Tensor, c: Tensor) -> Tensor:
    return c.to(dtype=m.dtype, device=m.device)


def c2w_to_viewmat(c2w: Tensor) -> Tensor:
    """Rigid inverse of a camera-to-world matrix: ``[..., 4, 4]`` world-to-camera (``viewmat``)."""
    _check_mat4("c2w", c2w)
    R = c2w[..., :3, :3]
    t = c2w[..., :3, 3:]
    Rt = R.transpose(-1, -2)
    top = torch.cat([Rt, -Rt @ t], dim=-1)
    bottom = torch.zeros_like(c2w[..., 3:, :])
    bottom[..., 0, 3] = 1.0
    return torch.cat([top, bottom], dim=-2)


def viewmat_to_c2w(viewmat: Tensor) -> Tensor:
    """Rigid inverse of a world-to-camera matrix (same formula as :func:`c2w_to_viewmat`)."""
    return c2w_to_viewmat(viewmat)


def opencv_to_opengl(c2w: Tensor) -> Tensor:
    """Camera-to-world with OpenCV camera axes → OpenGL camera axes (flip camera y and z)."""
    _check_mat4("c2w", c2w)
    return c2w @ _const(c2w, CV_TO_GL)


def opengl_to_opencv(c2w: Tensor) -> Tensor:
    """Camera-to-world with OpenGL camera axes → OpenCV camera axes (flip camera y and z)."""
    _check_mat4("c2w", c2w)
    return c2w @ _const(c2w, CV_TO_GL)


def rotmat_to_quat(R: Tensor) -> Tensor:
    """Rotation matrices ``[..., 3, 3]`` → unit wxyz quaternions ``[..., 4]`` with ``w ≥ 0`` (Shepperd's method)."""
    if not isinstance(R, Tensor) or R.shape[-2:] != (3, 3):
        raise ValueError(f"R must be [..., 3, 3], got shape {list(R.shape) if isinstance(R, Tensor) else R}")
    m = R
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    # Four candidate solutions; pick the numerically best (largest denominator) per matrix.
    cands = torch.stack(
        [
            torch.stack(
                [
                    1 + m00 + m11 + m22,
                    m[..., 2, 1] - m[..., 1, 2],
                    m[..., 0, 2] - m[..., 2, 0],
                    m[..., 1, 0] - m[..., 0, 1],
                ],
                -1,
            ),
            torch.stack(
                [
                    m[..., 2, 1] - m[..., 1, 2],
                    1 + m00 - m11 - m22,
                    m[..., 0, 1] + m[..., 1, 0],
                    m[..., 0, 2] + m[..., 2, 0],
                ],
                -1,
            ),
            torch.stack(
                [
                    m[..., 0, 2] - m[..., 2, 0],
                    m[..., 0, 1] + m[..., 1, 0],
                    1 - m00 + m11 - m22,
                    m[..., 1, 2] + m[..., 2, 1],
                ],
                -1,
            ),
            torch.stack(
                [
                    m[..., 1, 0] - m[..., 0, 1],
                    m[..., 0, 2] + m[..., 2, 0],
                    m[..., 1, 2] + m[..., 2, 1],
                    1 - m00 - m11 + m22,
                ],
                -1,
            ),
        ],
        dim=-2,
    )  # [..., 4, 4]
    diag = torch.stack(
        [1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1
    )
    best = diag.argmax(-1)
    q = torch.gather(cands, -2, best[..., None, None].expand(best.shape + (1, 4))).squeeze(-2)
    q = q / q.norm(dim=-1, keepdim=True)
    return torch.where(q[..., :1] < 0, -q, q)


def colmap_to_c2w(qvec: Tensor, tvec: Tensor) -> Tensor:
    """COLMAP image pose (world-to-camera ``qvec [..., 4]`` wxyz, ``tvec [..., 3]``) → OpenCV ``c2w [..., 4, 4]``."""
    return viewmat_to_c2w(colmap_to_viewmat(qvec, tvec))


def colmap_to_viewmat(qvec: Tensor, tvec: Tensor) -> Tensor:
    """COLMAP image pose (``qvec [..., 4]`` wxyz, normalised here; ``tvec [..., 3]``) → gsplat ``viewmat [..., 4, 4]``.

    COLMAP stores world-to-camera in OpenCV axes, so this only assembles ``[R | t]``.
    """
    if qvec.shape[-1] != 4 or tvec.shape[-1] != 3 or qvec.shape[:-1] != tvec.shape[:-1]:
        raise ValueError(
            f"qvec must be [..., 4] and tvec [..., 3], got {list(qvec.shape)} and {list(tvec.shape)}"
        )
    R = quat_to_rotmat(qvec)
    top = torch.cat([R, tvec[..., :, None]], dim=-1)
    bottom = torch.zeros(qvec.shape[:-1] + (1, 4), dtype=R.dtype, device=R.device)
    bottom[..., 0, 3] = 1.0
    return torch.cat([top, bottom], dim=-2)


def c2w_to_colmap(c2w: Tensor) -> tuple[Tensor, Tensor]:
    """OpenCV ``c2w [..., 4, 4]`` → COLMAP ``(qvec [..., 4] wxyz with w ≥ 0, tvec [..., 3])`` (world-to-camera)."""
    vm = c2w_to_viewmat(c2w)
    return rotmat_to_quat(vm[..., :3, :3]), vm[..., :3, 3]


def nerf_synthetic_to_viewmat(transform_matrix: Tensor) -> Tensor:
    """NeRF-synthetic / Blender ``transform_matrix`` (c2w, OpenGL axes) → gsplat ``viewmat`` (w2c, OpenCV axes)."""
    return c2w_to_viewmat(opengl_to_opencv(transform_matrix))


def viewmat_to_nerf_synthetic(viewmat: Tensor) -> Tensor:
    """gsplat ``viewmat`` → NeRF-synthetic ``transform_matrix`` (inverse of :func:`nerf_synthetic_to_viewmat`)."""
    return opencv_to_opengl(viewmat_to_c2w(viewmat))


def colmap_to_nerfstudio(qvec: Tensor, tvec: Tensor, world_transform: bool = True) -> Tensor:
    """COLMAP pose → nerfstudio ``transform_matrix`` (c2w, OpenGL axes), as ``ns-process-data`` writes it.

    Args:
        qvec: ``[..., 4]`` wxyz world-to-camera rotation.
        tvec: ``[..., 3]`` world-to-camera translation.
        world_transform: also rotate the world (x, y, z) → (x, z, -y) (nerfstudio's default for COLMAP data;
            False matches ``keep_original_world_coordinate=True``).

    Returns:
        ``[..., 4, 4]``.
    """
    c2w = opencv_to_opengl(colmap_to_c2w(qvec, tvec))
    return _const(c2w, _NS_WORLD) @ c2w if world_transform else c2w


def nerfstudio_to_colmap(transform_matrix: Tensor, world_transform: bool = True) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`colmap_to_nerfstudio`: ``(qvec [..., 4], tvec [..., 3])``."""
    _check_mat4("transform_matrix", transform_matrix)
    c2w = transform_matrix
    if world_transform:
        c2w = _const(c2w, _NS_WORLD).transpose(0, 1) @ c2w
    return c2w_to_colmap(opengl_to_opencv(c2w))


def intrinsics_from_fov(
    width: int,
    height: int,
    fov_x: float | None = None,
    fov_y: float | None = None,
    degrees: bool = True,
    cx: float | None = None,
    cy: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Pinhole ``K [3, 3]`` from a horizontal and/or vertical field of view.

    ``fx = (W/2) / tan(fov_x/2)``, ``fy = (H/2) / tan(fov_y/2)``; give one FOV for square pixels (``fx = fy``).
    The principal point defaults to the image centre ``(W/2, H/2)``.
    """
    if fov_x is None and fov_y is None:
        raise ValueError("give fov_x and/or fov_y")
    conv = math.radians if degrees else (lambda v: v)
    fx = 0.5 * width / math.tan(0.5 * conv(fov_x)) if fov_x is not None else None
    fy = 0.5 * height / math.tan(0.5 * conv(fov_y)) if fov_y is not None else None
    fx = fy if fx is None else fx
    fy = fx if fy is None else fy
    cx = width / 2.0 if cx is None else cx
    cy = height / 2.0 if cy is None else cy
    return torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=dtype)


def fov_from_intrinsics(K: Tensor, width: int, height: int, degrees: bool = True) -> tuple[float, float]:
    """``(fov_x, fov_y)`` of a centred pinhole ``K``: ``fov = 2·atan((size/2) / f)``."""
    if K.shape[-2:] != (3, 3):
        raise ValueError(f"K must be [3, 3], got shape {list(K.shape)}")
    fx, fy = float(K[..., 0, 0]), float(K[..., 1, 1])
    fov_x, fov_y = 2 * math.atan(0.5 * width / fx), 2 * math.atan(0.5 * height / fy)
    return (math.degrees(fov_x), math.degrees(fov_y)) if degrees else (fov_x, fov_y)


def intrinsics_from_camera_angle_x(camera_angle_x: float, width: int, height: int, **kw) -> Tensor:
    """``K`` from NeRF-synthetic's ``camera_angle_x`` (horizontal FOV in radians, square pixels)."""
    return intrinsics_from_fov(width, height, fov_x=camera_angle_x, degrees=False, **kw)


def look_at(eye: Tensor, target: Tensor, up: Tensor | tuple = (0.0, 0.0, 1.0)) -> Tensor:
    """Camera-to-world (OpenCV axes) of cameras at ``eye`` looking at ``target``.

    The camera's +z points at the target, +x to the right and +y down, so that ``up`` appears upward in the image.

    Args:
        eye: ``[..., 3]`` camera centres.
        target: ``[..., 3]`` (broadcastable) points looked at.
        up: world up direction ``[3]`` (must not be parallel to the viewing direction).

    Returns:
        ``c2w [..., 4, 4]``.
    """
    eye = torch.as_tensor(eye)
    dtype = eye.dtype if eye.is_floating_point() else torch.float32
    eye = eye.to(dtype)
    target = torch.as_tensor(target, dtype=dtype, device=eye.device)
    up = torch.as_tensor(up, dtype=dtype, device=eye.device)
    eye, target = torch.broadcast_tensors(eye, target)
    f = target - eye
    f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    r = torch.cross(f, up.expand_as(f), dim=-1)
    rn = r.norm(dim=-1, keepdim=True)
    if bool((rn < 1e-9).any()):
        raise ValueError("look_at: the viewing direction is parallel to `up`")
    r = r / rn
    d = torch.cross(f, r, dim=-1)  # camera +y: down in the image
    R = torch.stack([r, d, f], dim=-1)  # columns: camera axes in world coordinates
    top = torch.cat([R, eye[..., :, None]], dim=-1)
    bottom = torch.zeros(eye.shape[:-1] + (1, 4), dtype=dtype, device=eye.device)
    bottom[..., 0, 3] = 1.0
    return torch.cat([top, bottom], dim=-2)


def _basis(up: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    e3 = up / up.norm()
    helper = (
        torch.tensor([1.0, 0.0, 0.0], dtype=up.dtype)
        if abs(float(e3[0])) < 0.9
        else torch.tensor([0.0, 1.0, 0.0], dtype=up.dtype)
    )
    e1 = torch.cross(helper, e3, dim=0)
    e1 = e1 / e1.norm()
    e2 = torch.cross(e3, e1, dim=0)
    return e1, e2, e3


def orbit_path(
    center: Tensor | tuple,
    radius: float,
    n_frames: int,
    elevation: float = 20.0,
    up: Tensor | tuple = (0.0, 0.0, 1.0),
    start_azimuth: float = 0.0,
    degrees: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Cameras on a circle around ``center``, all looking at it.

    Camera ``i`` sits at azimuth ``start + 360°·i/n_frames`` and fixed ``elevation`` above the plane normal to
    ``up``, at distance ``radius`` from ``center``.

    Returns:
        ``c2w [n_frames, 4, 4]`` (OpenCV axes).
    """
    if n_frames < 1 or radius <= 0:
        raise ValueError(f"orbit_path needs n_frames >= 1 and radius > 0, got {n_frames}, {radius}")
    center = torch.as_tensor(center, dtype=torch.float64)
    up_t = torch.as_tensor(up, dtype=torch.float64)
    e1, e2, e3 = _basis(up_t)
    conv = math.radians if degrees else (lambda v: v)
    el = conv(elevation)
    az = conv(start_azimuth) + torch.arange(n_frames, dtype=torch.float64) * (2 * math.pi / n_frames)
    dirs = math.cos(el) * (torch.cos(az)[:, None] * e1 + torch.sin(az)[:, None] * e2) + math.sin(el) * e3
    eye = center + radius * dirs
    return look_at(eye, center.expand_as(eye), up_t).to(dtype)


def _focus_point(c2w: Tensor) -> Tensor:
    """Least-squares point closest to all optical axes (OpenCV: +z forward)."""
    o = c2w[:, :3, 3]
    d = c2w[:, :3, 2] / c2w[:, :3, 2].norm(dim=-1, keepdim=True)
    eye = torch.eye(3, dtype=c2w.dtype)
    A = eye - d[:, :, None] * d[:, None, :]  # projectors orthogonal to each axis
    lhs = A.sum(0)
    rhs = (A @ o[:, :, None]).sum(0)[:, 0]
    if torch.linalg.cond(lhs) > 1e8:
        return o.mean(0) + d.mean(0)
    return torch.linalg.solve(lhs, rhs)


def spiral_path(
    c2ws: Tensor,
    n_frames: int,
    n_rots: int = 2,
    zrate: float = 0.5,
    radius_scale: float = 1.0,
    focus: Tensor | None = None,
) -> Tensor:
    """LLFF-style spiral around the mean of a set of forward-facing cameras.

    The average camera has the mean centre and mean axes of ``c2ws``. Positions follow
    ``r ⊙ (cos θ, -sin θ, -sin(θ·zrate))`` in its frame for ``θ ∈ [0, 2π·n_rots)``, where ``r`` is the 90th percentile
    of the cameras' absolute offsets from the mean (times ``radius_scale``); every frame looks at ``focus`` (default:
    the point closest to all input optical axes).

    Args:
        c2ws: ``[M, 4, 4]`` input cameras (OpenCV axes).
        n_frames: number of output cameras.
        n_rots: turns of the spiral.
        zrate: frequency of the motion along the viewing axis relative to the turns.
        radius_scale: scales the spiral radii.
        focus: optional ``[3]`` point to look at.

    Returns:
        ``c2w [n_frames, 4, 4]`` (OpenCV axes).
    """
    _check_mat4("c2ws", c2ws)
    if c2ws.ndim != 3 or c2ws.shape[0] < 1:
        raise ValueError(f"c2ws must be [M, 4, 4] with M >= 1, got shape {list(c2ws.shape)}")
    dtype = c2ws.dtype
    P = c2ws.double()
    center = P[:, :3, 3].mean(0)
    fwd = P[:, :3, 2].mean(0)
    fwd = fwd / fwd.norm()
    down = P[:, :3, 1].mean(0)
    right = torch.cross(down, fwd, dim=0)
    right = right / right.norm()
    down = torch.cross(fwd, right, dim=0)
    Rm = torch.stack([right, down, fwd], dim=-1)  # average camera axes
    offsets = (P[:, :3, 3] - center) @ Rm  # [M, 3] in the average camera frame
    radii = torch.quantile(offsets.abs(), 0.9, dim=0) * radius_scale
    radii = torch.where(radii > 0, radii, torch.full_like(radii, 1e-3))
    target = _focus_point(P) if focus is None else torch.as_tensor(focus, dtype=torch.float64)
    theta = torch.arange(n_frames, dtype=torch.float64) * (2 * math.pi * n_rots / n_frames)
    local = torch.stack([torch.cos(theta), -torch.sin(theta), -torch.sin(theta * zrate)], -1) * radii
    eye = center + local @ Rm.T
    return look_at(eye, target.expand_as(eye), -down).to(dtype)
