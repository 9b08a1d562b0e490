"""Camera utilities: conventions round-trip, look-at geometry, paths, intrinsics."""

import math

import pytest
import torch

import vkd.render as R

F64 = torch.float64


def _random_c2w(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, 4, generator=g, dtype=F64)
    c2w = torch.eye(4, dtype=F64).repeat(n, 1, 1)
    c2w[:, :3, :3] = R.quat_to_rotmat(q)
    c2w[:, :3, 3] = torch.randn(n, 3, generator=g, dtype=F64) * 3
    return c2w


def test_viewmat_inverse_and_cv_gl_roundtrip():
    c2w = _random_c2w(10)
    vm = R.c2w_to_viewmat(c2w)
    torch.testing.assert_close(vm @ c2w, torch.eye(4, dtype=F64).expand(10, 4, 4))
    torch.testing.assert_close(R.viewmat_to_c2w(vm), c2w)
    gl = R.opencv_to_opengl(c2w)
    torch.testing.assert_close(R.opengl_to_opencv(gl), c2w)
    # OpenGL camera looks down -z: its forward (OpenCV +z) is minus the GL z column.
    torch.testing.assert_close(gl[:, :3, 2], -c2w[:, :3, 2])
    torch.testing.assert_close(gl[:, :3, 1], -c2w[:, :3, 1])


def test_quaternion_roundtrip():
    g = torch.Generator().manual_seed(1)
    q = torch.nn.functional.normalize(torch.randn(500, 4, generator=g, dtype=F64), dim=-1)
    q = torch.where(q[:, :1] < 0, -q, q)
    torch.testing.assert_close(R.rotmat_to_quat(R.quat_to_rotmat(q)), q)
    # 180° rotations (w = 0) and the identity
    special = torch.tensor([[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0]], dtype=F64)
    Rm = R.quat_to_rotmat(special)
    torch.testing.assert_close(R.quat_to_rotmat(R.rotmat_to_quat(Rm)), Rm)


def test_colmap_roundtrip_and_meaning():
    c2w = _random_c2w(8, seed=2)
    q, t = R.c2w_to_colmap(c2w)
    torch.testing.assert_close(R.colmap_to_c2w(q, t), c2w)
    # COLMAP stores world-to-camera: X_cam = R(q) X_world + t.
    X = torch.randn(8, 3, dtype=F64)
    Xc = (R.quat_to_rotmat(q) @ X[..., None])[..., 0] + t
    Xc2 = (R.c2w_to_viewmat(c2w) @ torch.cat([X, torch.ones(8, 1, dtype=F64)], -1)[..., None])[..., :3, 0]
    torch.testing.assert_close(Xc, Xc2)


@pytest.mark.parametrize("world_transform", [True, False])
def test_nerfstudio_roundtrip(world_transform):
    c2w = _random_c2w(6, seed=3)
    q, t = R.c2w_to_colmap(c2w)
    ns = R.colmap_to_nerfstudio(q, t, world_transform=world_transform)
    q2, t2 = R.nerfstudio_to_colmap(ns, world_transform=world_transform)
    torch.testing.assert_close(q2, q)
    torch.testing.assert_close(t2, t)
    # Camera centres: nerfstudio's world is COLMAP's rotated by (x, y, z) -> (x, z, -y).
    cen = c2w[:, :3, 3]
    expect = torch.stack([cen[:, 0], cen[:, 2], -cen[:, 1]], -1) if world_transform else cen
    torch.testing.assert_close(ns[:, :3, 3], expect)


def test_nerf_synthetic_camera_projects_like_blender():
    """A Blender camera (OpenGL, looking down -z) at +z·4 sees the origin at the image centre, +y world up."""
    tm = torch.eye(4, dtype=F64)
    tm[2, 3] = 4.0
    vm = R.nerf_synthetic_to_viewmat(tm)
    K = R.intrinsics_from_camera_angle_x(0.6911112070083618, 800, 800, dtype=F64)
    torch.testing.assert_close(R.viewmat_to_nerf_synthetic(vm), tm)

    def project(p):
        pc = vm[:3, :3] @ p + vm[:3, 3]
        uv = K @ (pc / pc[2])
        return pc[2], uv[:2]

    z, uv = project(torch.zeros(3, dtype=F64))
    assert z > 0
    torch.testing.assert_close(uv, torch.tensor([400.0, 400.0], dtype=F64))
    _, uv_up = project(torch.tensor([0.0, 0.3, 0.0], dtype=F64))
    assert uv_up[1] < 400  # world +y is up in the image (rows grow downward)
    _, uv_right = project(torch.tensor([0.3, 0.0, 0.0], dtype=F64))
    assert uv_right[0] > 400


def test_intrinsics_fov_roundtrip():
    K = R.intrinsics_from_fov(640, 480, fov_x=60.0, dtype=F64)
    fx, fy = R.fov_from_intrinsics(K, 640, 480)
    assert abs(fx - 60.0) < 1e-9 and K[0, 0] == K[1, 1]
    assert abs(fy - math.degrees(2 * math.atan(240 / K[1, 1].item()))) < 1e-9
    K2 = R.intrinsics_from_fov(640, 480, fov_x=60.0, fov_y=50.0, dtype=F64)
    fx2, fy2 = R.fov_from_intrinsics(K2, 640, 480)
    assert abs(fx2 - 60) < 1e-9 and abs(fy2 - 50) < 1e-9
    assert K2[0, 2] == 320 and K2[1, 2] == 240
    with pytest.raises(ValueError):
        R.intrinsics_from_fov(640, 480)


def test_look_at_geometry():
    eye = torch.tensor([[3.0, 1.0, 2.0], [-2.0, -2.0, 0.5]], dtype=F64)
    target = torch.tensor([0.2, -0.1, 0.3], dtype=F64)
    c2w = R.look_at(eye, target.expand(2, 3))
    Rm = c2w[:, :3, :3]
    torch.testing.assert_close(Rm @ Rm.transpose(1, 2), torch.eye(3, dtype=F64).expand(2, 3, 3))
    assert torch.allclose(torch.det(Rm), torch.ones(2, dtype=F64))
    vm = R.c2w_to_viewmat(c2w)
    tc = (vm[:, :3, :3] @ target) + vm[:, :3, 3]
    torch.testing.assert_close(tc[:, :2], torch.zeros(2, 2, dtype=F64))  # target on the optical axis
    assert (tc[:, 2] > 0).all()
    above = (vm[:, :3, :3] @ (target + torch.tensor([0, 0, 0.5], dtype=F64))) + vm[:, :3, 3]
    assert (above[:, 1] < 0).all()  # world up (+z) is image up (-y in OpenCV)
    with pytest.raises(ValueError, match="parallel"):
        R.look_at(torch.tensor([0.0, 0.0, 3.0]), torch.zeros(3))


def test_orbit_and_spiral_paths_render_the_target():
    orbit = R.orbit_path((0.1, 0.2, 0.0), radius=2.5, n_frames=12, elevation=30.0, dtype=F64)
    assert orbit.shape == (12, 4, 4)
    d = (orbit[:, :3, 3] - torch.tensor([0.1, 0.2, 0.0], dtype=F64)).norm(dim=-1)
    torch.testing.assert_close(d, torch.full((12,), 2.5, dtype=F64))
    heights = orbit[:, 2, 3]
    torch.testing.assert_close(heights, torch.full((12,), 2.5 * math.sin(math.radians(30)), dtype=F64))

    spiral = R.spiral_path(orbit[:4], n_frames=30, n_rots=2)
    assert spiral.shape == (30, 4, 4) and torch.isfinite(spiral).all()
    # The forward-facing cameras all look near the orbit centre, so the spiral's focus is there too.
    vm = R.c2w_to_viewmat(spiral)
    tc = vm[:, :3, :3] @ torch.tensor([0.1, 0.2, 0.0], dtype=F64) + vm[:, :3, 3]
    assert (tc[:, :2].abs() < 1e-6).all() and (tc[:, 2] > 0).all()

    # A Gaussian at the orbit centre renders at the image centre from every orbit camera.
    vms = R.c2w_to_viewmat(orbit).float()
    K = R.intrinsics_from_fov(32, 24, fov_x=50.0).expand(12, 3, 3)
    means = torch.tensor([[0.1, 0.2, 0.0]])
    img, alpha, meta = R.rasterization(
        means,
        torch.tensor([[1.0, 0, 0, 0]]),
        torch.full((1, 3), 0.05),
        torch.tensor([0.9]),
        torch.ones(1, 1),
        vms,
        K,
        32,
        24,
        backend="torch",
    )
    torch.testing.assert_close(
        meta["means2d"][:, 0], torch.tensor([16.0, 12.0]).expand(12, 2), atol=1e-4, rtol=0
    )
    assert (alpha[:, 11:13, 15:17] > 0.5).all()
