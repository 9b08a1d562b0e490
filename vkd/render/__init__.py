"""vkd.render: the shared Gaussian rasterizer (torch and gsplat backends), 2D splats and cameras.

* :func:`rasterization` — gsplat-compatible 3D Gaussian rasterization (``backend="auto" | "torch" | "gsplat"``).
* :func:`rasterization_adjoint` — its transpose for plain colours, ``Σ_p w_i(p)·g(p)`` per Gaussian (torch backend;
  feature lifting).
* :func:`splat_points_2d` — additive 2D Gaussian splats (density maps) matching ``scipy.ndimage.gaussian_filter``.
* :mod:`vkd.render.cameras` — look-at / orbit / spiral paths, intrinsics from FOV, pose conventions.
* :mod:`vkd.render.sh` — spherical harmonics in gsplat's convention.
"""

from vkd.render.cameras import (
    c2w_to_colmap,
    c2w_to_viewmat,
    colmap_to_c2w,
    colmap_to_nerfstudio,
    colmap_to_viewmat,
    fov_from_intrinsics,
    intrinsics_from_camera_angle_x,
    intrinsics_from_fov,
    look_at,
    nerf_synthetic_to_viewmat,
    nerfstudio_to_colmap,
    opencv_to_opengl,
    opengl_to_opencv,
    orbit_path,
    rotmat_to_quat,
    spiral_path,
    viewmat_to_c2w,
    viewmat_to_nerf_synthetic,
)
from vkd.render.rendering import rasterization, rasterization_adjoint
from vkd.render.sh import eval_sh, rgb_to_sh, sh_to_color, sh_to_rgb
from vkd.render.splat2d import (
    gaussian_kernel_1d,
    geometry_adaptive_sigmas,
    splat_points_2d,
    splat_profiles_1d,
)
from vkd.render.torch_backend import project_gaussians, quat_to_rotmat

__all__ = [
    "rasterization_adjoint",
    "rasterization",
    "project_gaussians",
    "quat_to_rotmat",
    "rotmat_to_quat",
    "eval_sh",
    "sh_to_color",
    "rgb_to_sh",
    "sh_to_rgb",
    "splat_points_2d",
    "splat_profiles_1d",
    "gaussian_kernel_1d",
    "geometry_adaptive_sigmas",
    "look_at",
    "orbit_path",
    "spiral_path",
    "intrinsics_from_fov",
    "intrinsics_from_camera_angle_x",
    "fov_from_intrinsics",
    "c2w_to_viewmat",
    "viewmat_to_c2w",
    "opencv_to_opengl",
    "opengl_to_opencv",
    "colmap_to_c2w",
    "colmap_to_viewmat",
    "c2w_to_colmap",
    "colmap_to_nerfstudio",
    "nerfstudio_to_colmap",
    "nerf_synthetic_to_viewmat",
    "viewmat_to_nerf_synthetic",
]
