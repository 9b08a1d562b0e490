"""The embedded synthetic scene: coloured primitives on a floor, ray-cast analytically in torch.

The generator writes a nerfstudio-style scene directory, so the embedded default goes through the same loader as
real captures (:func:`vkd.feature3dgs.data.load_scene`)::

    <out>/transforms.json        # fl_x, fl_y, cx, cy, w, h, frames[] (OpenGL camera-to-world), splits, names
    <out>/images/frame_XXXXX.png # RGB renders (supersampled)
    <out>/labels/frame_XXXXX.png # uint8 per-pixel semantic ids (0 = background, 1 = floor, 2.. = objects)
    <out>/points3d.ply           # sparse "SfM" cloud: noisy hits of rays through random training pixels

World frame: y up, floor is the plane y = 0. Shading is Lambertian (ambient + one directional light), so appearance
is view-independent; anti-aliasing comes from ``supersample``² rays per pixel.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from vkd.cache import build_once
from vkd.feature3dgs.ply import write_ply

__all__ = ["Primitive", "SCENE_OBJECTS", "LABEL_NAMES", "camera_poses", "cast_rays", "render_view",
           "generate_scene", "ensure_synthetic_scene"]

GENERATOR_VERSION = 1
_LIGHT = (0.45, 1.0, 0.3)
_AMBIENT = 0.35
_FLOOR_COLOR = (0.62, 0.58, 0.52)
_BACKGROUND_COLOR = (0.75, 0.85, 0.95)


@dataclass(frozen=True)
class Primitive:
    """One object: ``kind`` is "sphere", "cylinder" (vertical, capped), "box" or "pyramid" (square base)."""

    name: str
    kind: str
    center: tuple[float, float, float]  # sphere centre, or base centre (y = bottom) for the others
    size: tuple[float, float]  # sphere (r, -); cylinder (r, height); box (half side, half height); pyramid (half base, height)
    color: tuple[float, float, float]
    yaw_deg: float = 0.0


SCENE_OBJECTS: tuple[Primitive, ...] = (
    Primitive("red sphere", "sphere", (0.95, 0.5, 0.35), (0.5, 0.0), (0.86, 0.16, 0.12)),
    Primitive("blue cube", "box", (-0.85, 0.0, 0.65), (0.4, 0.4), (0.14, 0.3, 0.88), yaw_deg=30.0),
    Primitive("green cylinder", "cylinder", (0.2, 0.0, -0.95), (0.35, 1.0), (0.16, 0.72, 0.22)),
    Primitive("yellow pyramid", "pyramid", (-0.75, 0.0, -0.6), (0.45, 0.9), (0.93, 0.8, 0.1), yaw_deg=15.0),
)
# Semantic id i names LABEL_NAMES[i]; 0 is the sky (never visible from the generated views), 1 the floor.
LABEL_NAMES: tuple[str, ...] = ("background", "floor") + tuple(p.name for p in SCENE_OBJECTS)


# ----------------------------------------------------------------------------------------------------------------
# Cameras
# ----------------------------------------------------------------------------------------------------------------


def _look_at_c2w_opengl(eye: Tensor, target: Tensor, up: Tensor) -> Tensor:
    """Camera-to-world [4, 4] in OpenGL/Blender axes (x right, y up, -z forward)."""
    forward = target - eye
    forward = forward / forward.norm()
    right = torch.linalg.cross(forward, up)
    right = right / right.norm()
    true_up = torch.linalg.cross(right, forward)
    c2w = torch.eye(4, dtype=torch.float64)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, true_up, -forward, eye
    return c2w


def camera_poses(num_views: int, seed: int = 0) -> Tensor:
    """Orbit poses around the objects, elevations 40°–65°, so the floor fills every view.

    Returns:
        ``[V, 4, 4]`` float64 camera-to-world matrices (OpenGL axes).
    """
    gen = torch.Generator().manual_seed(seed)
    poses = []
    for k in range(num_views):
        azimuth = 2 * math.pi * k / num_views + 0.15 * (torch.rand((), generator=gen).item() - 0.5)
        elevation = math.radians(52.5 + 12.5 * math.sin(3 * 2 * math.pi * k / num_views))
        radius = 4.4 + 0.3 * math.cos(2 * 2 * math.pi * k / num_views)
        eye = torch.tensor([radius * math.cos(elevation) * math.cos(azimuth), radius * math.sin(elevation),
                            radius * math.cos(elevation) * math.sin(azimuth)], dtype=torch.float64)
        target = torch.tensor([0.0, 0.3, 0.0], dtype=torch.float64) + 0.1 * (torch.rand(3, generator=gen,
                                                                                           dtype=torch.float64) - 0.5)
        poses.append(_look_at_c2w_opengl(eye, target, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)))
    return torch.stack(poses)


def _yaw(deg: float) -> Tensor:
    a = math.radians(deg)
    return torch.tensor([[math.cos(a), 0.0, math.sin(a)], [0.0, 1.0, 0.0], [-math.sin(a), 0.0, math.cos(a)]],
                        dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------------------
# Ray casting
# ----------------------------------------------------------------------------------------------------------------

_INF = float("inf")


def _hit_sphere(o: Tensor, d: Tensor, c: Tensor, r: float) -> tuple[Tensor, Tensor]:
    oc = o - c
    b = (oc * d).sum(-1)
    disc = b * b - ((oc * oc).sum(-1) - r * r)
    sq = disc.clamp_min(0).sqrt()
    t0, t1 = -b - sq, -b + sq
    t = torch.where(t0 > 1e-6, t0, t1)
    t = torch.where((disc >= 0) & (t > 1e-6), t, torch.full_like(t, _INF))
    n = o + t.clamp(max=1e6)[:, None] * d - c
    return t, n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _hit_halfspaces(o: Tensor, d: Tensor, normals: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """Convex polytope {x : n_k·x <= c_k} (Kay–Kajiya slabs): entry distance and the entry face normal."""
    denom = d @ normals.T  # [R, K]
    num = offsets[None] - o @ normals.T  # [R, K]
    parallel = denom.abs() < 1e-12
    t_plane = num / torch.where(parallel, torch.ones_like(denom), denom)
    entering = (denom < 0) & ~parallel
    exiting = (denom > 0) & ~parallel
    t_enter = torch.where(entering, t_plane, torch.full_like(t_plane, -_INF))
    t_exit = torch.where(exiting, t_plane, torch.full_like(t_plane, _INF))
    outside_parallel = (parallel & (num < 0)).any(-1)
    t_in, face = t_enter.max(-1)
    t_out = t_exit.min(-1).values
    hit = (t_in <= t_out) & (t_in > 1e-6) & ~outside_parallel
    return torch.where(hit, t_in, torch.full_like(t_in, _INF)), normals[face]


def _hit_cylinder(o: Tensor, d: Tensor, base: Tensor, r: float, h: float) -> tuple[Tensor, Tensor]:
    ox, oz = o[:, 0] - base[0], o[:, 2] - base[2]
    a = d[:, 0] ** 2 + d[:, 2] ** 2
    b = ox * d[:, 0] + oz * d[:, 2]
    c = ox * ox + oz * oz - r * r
    disc = b * b - a * c
    sq = disc.clamp_min(0).sqrt()
    t_side = (-b - sq) / a.clamp_min(1e-12)
    y_side = o[:, 1] + t_side * d[:, 1]
    side_ok = (disc >= 0) & (a > 1e-12) & (t_side > 1e-6) & (y_side >= base[1]) & (y_side <= base[1] + h)
    t_side = torch.where(side_ok, t_side, torch.full_like(t_side, _INF))
    n_side = torch.stack([ox + t_side.clamp(max=1e6) * d[:, 0], torch.zeros_like(ox),
                          oz + t_side.clamp(max=1e6) * d[:, 2]], -1)
    n_side = n_side / n_side.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    dy = torch.where(d[:, 1].abs() < 1e-12, torch.full_like(d[:, 1], 1e-12), d[:, 1])
    t_cap = (base[1] + h - o[:, 1]) / dy
    px, pz = ox + t_cap * d[:, 0], oz + t_cap * d[:, 2]
    cap_ok = (t_cap > 1e-6) & (px * px + pz * pz <= r * r) & (d[:, 1] < 0)
    t_cap = torch.where(cap_ok, t_cap, torch.full_like(t_cap, _INF))
    use_cap = t_cap < t_side
    n_cap = torch.tensor([0.0, 1.0, 0.0], dtype=o.dtype).expand_as(n_side)
    return torch.minimum(t_side, t_cap), torch.where(use_cap[:, None], n_cap, n_side)


def _primitive_halfspaces(p: Primitive) -> tuple[Tensor, Tensor]:
    rot = _yaw(p.yaw_deg)
    base = torch.tensor(p.center, dtype=torch.float64)
    if p.kind == "box":
        half, hh = p.size
        local_n = torch.tensor([[1, 0, 0], [-1, 0, 0], [0, 0, 1], [0, 0, -1], [0, 1, 0], [0, -1, 0]],
                               dtype=torch.float64)
        local_c = torch.tensor([half, half, half, half, 2 * hh, 0.0], dtype=torch.float64)
    elif p.kind == "pyramid":
        half, height = p.size
        slope = torch.tensor([height, half], dtype=torch.float64)
        slope = slope / slope.norm()
        local_n = torch.tensor([[slope[0], slope[1], 0], [-slope[0], slope[1], 0], [0, slope[1], slope[0]],
                                [0, slope[1], -slope[0]], [0, -1, 0]], dtype=torch.float64)
        # The apex (0, height, 0) lies on every slanted face.
        local_c = torch.cat([torch.full((4,), float(slope[1] * height), dtype=torch.float64),
                             torch.zeros(1, dtype=torch.float64)])
    else:
        raise ValueError(f"not a polytope: {p.kind}")
    normals = local_n @ rot.T
    return normals, local_c + normals @ base


def cast_rays(origins: Tensor, dirs: Tensor, objects: tuple[Primitive, ...] = SCENE_OBJECTS) -> tuple[Tensor, Tensor,
                                                                                                        Tensor]:
    """Nearest hit of each ray with the floor and the objects.

    Args:
        origins: ``[R, 3]`` float64 ray origins.
        dirs: ``[R, 3]`` float64 unit directions.
        objects: the primitives.

    Returns:
        t ``[R]`` (inf on a miss), normals ``[R, 3]``, labels ``[R]`` int64 (0 = miss, 1 = floor, 2+i = object i).
    """
    R = origins.shape[0]
    best_t = torch.full((R,), _INF, dtype=origins.dtype)
    best_n = torch.zeros(R, 3, dtype=origins.dtype)
    labels = torch.zeros(R, dtype=torch.int64)
    # Floor y = 0 (hit from above only).
    t_floor = torch.where(dirs[:, 1] < -1e-9, -origins[:, 1] / dirs[:, 1].clamp(max=-1e-9), torch.full_like(best_t,
                                                                                                          _INF))
    t_floor = torch.where(t_floor > 1e-6, t_floor, torch.full_like(t_floor, _INF))
    upd = t_floor < best_t
    best_t = torch.where(upd, t_floor, best_t)
    best_n[upd] = torch.tensor([0.0, 1.0, 0.0], dtype=origins.dtype)
    labels[upd] = 1
    for i, p in enumerate(objects):
        if p.kind == "sphere":
            t, n = _hit_sphere(origins, dirs, torch.tensor(p.center, dtype=origins.dtype), p.size[0])
        elif p.kind == "cylinder":
            t, n = _hit_cylinder(origins, dirs, torch.tensor(p.center, dtype=origins.dtype), p.size[0], p.size[1])
        else:
            normals, offsets = _primitive_halfspaces(p)
            t, n = _hit_halfspaces(origins, dirs, normals.to(origins.dtype), offsets.to(origins.dtype))
        upd = t < best_t
        best_t = torch.where(upd, t, best_t)
        best_n = torch.where(upd[:, None], n, best_n)
        labels = torch.where(upd, torch.full_like(labels, 2 + i), labels)
    return best_t, best_n, labels


def _shade(normals: Tensor, labels: Tensor, objects: tuple[Primitive, ...]) -> Tensor:
    palette = torch.tensor([_BACKGROUND_COLOR, _FLOOR_COLOR] + [p.color for p in objects], dtype=normals.dtype)
    light = torch.tensor(_LIGHT, dtype=normals.dtype)
    light = light / light.norm()
    diffuse = (normals @ light).clamp_min(0)
    shade = _AMBIENT + (1 - _AMBIENT) * diffuse
    rgb = palette[labels] * shade[:, None]
    return torch.where((labels == 0)[:, None], palette[0].expand_as(rgb), rgb)


def _pixel_rays(c2w: Tensor, K: Tensor, width: int, height: int, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """Rays through pixel positions (col + ox, row + oy) for each offset in ``offsets [S, 2]`` -> [H*W*S, 3]."""
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                                indexing="ij")
    u = cols.reshape(-1, 1) + offsets[None, :, 0]
    v = rows.reshape(-1, 1) + offsets[None, :, 1]
    # OpenCV camera ray, then to the OpenGL camera frame (flip y and z) and to world.
    x = (u - K[0, 2]) / K[0, 0]
    y = (v - K[1, 2]) / K[1, 1]
    d_cam = torch.stack([x, -y, -torch.ones_like(x)], -1).reshape(-1, 3)
    d = d_cam @ c2w[:3, :3].T
    d = d / d.norm(dim=-1, keepdim=True)
    return c2w[:3, 3].expand_as(d).contiguous(), d


def render_view(c2w: Tensor, K: Tensor, width: int, height: int, supersample: int = 3,
                objects: tuple[Primitive, ...] = SCENE_OBJECTS) -> tuple[Tensor, Tensor, Tensor]:
    """Analytic render of the scene.

    Args:
        c2w: ``[4, 4]`` camera-to-world (OpenGL axes).
        K: ``[3, 3]`` pinhole intrinsics in pixels.
        width, height: image size.
        supersample: rays per pixel side (odd, so the centre ray gives the label).

    Returns:
        rgb ``[H, W, 3]`` float in [0, 1], labels ``[H, W]`` int64 (centre ray), depth ``[H, W]`` (centre ray, along
        the optical axis; inf on a miss).
    """
    s = supersample
    grid = (torch.arange(s, dtype=torch.float64) + 0.5) / s
    offsets = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), -1).reshape(-1, 2)
    o, d = _pixel_rays(c2w.double(), K.double(), width, height, offsets)
    t, n, lab = cast_rays(o, d, objects)
    rgb = _shade(n, lab, objects).reshape(height * width, s * s, 3).mean(1).reshape(height, width, 3)
    centre = (s * s) // 2 if s % 2 == 1 else 0
    labels = lab.reshape(height * width, s * s)[:, centre].reshape(height, width)
    forward = -c2w[:3, 2].double()
    depth = (t * (d @ forward)).reshape(height * width, s * s)[:, centre].reshape(height, width)
    return rgb.float().clamp(0, 1), labels, depth.float()


def object_points(c2ws: Tensor, K: Tensor, width: int, height: int, num: int, seed: int,
                  objects: tuple[Primitive, ...] = SCENE_OBJECTS) -> tuple[Tensor, Tensor, Tensor]:
    """A noisy sparse cloud like SfM's: hits of rays through random pixels of the given views.

    Returns:
        xyz ``[P, 3]`` float32, rgb ``[P, 3]`` float32 in [0, 1], labels ``[P]`` int64.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    views = torch.randint(0, c2ws.shape[0], (num,), generator=gen)
    uv = torch.rand(num, 2, generator=gen, dtype=torch.float64) * torch.tensor([width, height], dtype=torch.float64)
    x = (uv[:, 0] - K[0, 2]) / K[0, 0]
    y = (uv[:, 1] - K[1, 2]) / K[1, 1]
    d_cam = torch.stack([x, -y, -torch.ones_like(x)], -1)
    rot = c2ws[views, :3, :3]
    d = torch.einsum("pij,pj->pi", rot, d_cam)
    d = d / d.norm(dim=-1, keepdim=True)
    o = c2ws[views, :3, 3]
    t, n, lab = cast_rays(o, d, objects)
    keep = lab > 0
    xyz = o[keep] + t[keep, None] * d[keep] + 0.004 * torch.randn(int(keep.sum()), 3, generator=gen,
                                                                  dtype=torch.float64)
    rgb = (_shade(n[keep], lab[keep], objects) + 0.02 * torch.randn(int(keep.sum()), 3, generator=gen,
                                                                    dtype=torch.float64)).clamp(0, 1)
    return xyz.float(), rgb.float(), lab[keep]


# ----------------------------------------------------------------------------------------------------------------
# Scene directory
# ----------------------------------------------------------------------------------------------------------------


def _params(num_views: int, resolution: int, supersample: int, num_points: int, seed: int, test_every: int,
            test_offset: int) -> dict:
    return {"version": GENERATOR_VERSION, "num_views": num_views, "resolution": resolution,
            "supersample": supersample, "num_points": num_points, "seed": seed, "test_every": test_every,
            "test_offset": test_offset, "objects": [asdict(p) for p in SCENE_OBJECTS]}


def scene_hash(params: dict) -> str:
    return hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]


def generate_scene(out_dir: str | Path, num_views: int = 48, resolution: int = 64, supersample: int = 3,
                   num_points: int = 4000, seed: int = 0, test_every: int = 8, test_offset: int = 0,
                   fov_deg: float = 50.0) -> Path:
    """Render the synthetic scene and write it as a nerfstudio-style directory (see module docstring).

    Returns:
        the path of ``transforms.json``.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    c2ws = camera_poses(num_views, seed)
    f = 0.5 * resolution / math.tan(0.5 * math.radians(fov_deg))
    K = torch.tensor([[f, 0, resolution / 2], [0, f, resolution / 2], [0, 0, 1]], dtype=torch.float64)
    frames, names = [], []
    test_ids = set(range(test_offset, num_views, test_every))
    for k in range(num_views):
        rgb, labels, _ = render_view(c2ws[k], K, resolution, resolution, supersample)
        name = f"frame_{k:05d}.png"
        Image.fromarray((rgb.numpy() * 255 + 0.5).astype(np.uint8)).save(out / "images" / name)
        Image.fromarray(labels.numpy().astype(np.uint8)).save(out / "labels" / name)
        frames.append({"file_path": f"images/{name}", "label_path": f"labels/{name}",
                       "transform_matrix": c2ws[k].tolist()})
        names.append(f"images/{name}")
    train_views = torch.tensor([k for k in range(num_views) if k not in test_ids])
    xyz, rgb, _ = object_points(c2ws[train_views], K, resolution, resolution, num_points, seed)
    write_ply(out / "points3d.ply", {"x": xyz[:, 0].numpy(), "y": xyz[:, 1].numpy(), "z": xyz[:, 2].numpy(),
                                     "red": (rgb[:, 0].numpy() * 255).round().astype(np.uint8),
                                     "green": (rgb[:, 1].numpy() * 255).round().astype(np.uint8),
                                     "blue": (rgb[:, 2].numpy() * 255).round().astype(np.uint8)})
    params = _params(num_views, resolution, supersample, num_points, seed, test_every, test_offset)
    meta = {
        "camera_model": "PINHOLE", "fl_x": f, "fl_y": f, "cx": resolution / 2, "cy": resolution / 2,
        "w": resolution, "h": resolution, "ply_file_path": "points3d.ply",
        "train_filenames": [n for k, n in enumerate(names) if k not in test_ids],
        "test_filenames": [n for k, n in enumerate(names) if k in test_ids],
        "vkd_label_names": list(LABEL_NAMES), "vkd_background": list(_BACKGROUND_COLOR),
        "vkd_generator": {"name": "vkd.feature3dgs.synthetic", **params},
        "frames": frames,
    }
    path = out / "transforms.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(path)  # written last: its presence marks a complete scene
    return path


def ensure_synthetic_scene(root: str | Path, num_views: int = 48, resolution: int = 64, supersample: int = 3,
                           num_points: int = 4000, seed: int = 0, test_every: int = 8, test_offset: int = 0,
                           exact_dir: bool = False) -> Path:
    """Generate the scene once under ``root/synthetic-<hash>`` (or ``root`` itself with ``exact_dir``).

    Returns:
        the scene directory.
    """
    params = _params(num_views, resolution, supersample, num_points, seed, test_every, test_offset)
    out = Path(root) if exact_dir else Path(root) / f"synthetic-{scene_hash(params)}"
    meta_path = out / "transforms.json"

    def ready() -> bool:
        if not meta_path.is_file():
            return False
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return False
        return {k: v for k, v in meta.get("vkd_generator", {}).items() if k != "name"} == json.loads(
            json.dumps(params))

    # one process renders, a concurrent one waits for it and reuses the scene
    build_once(out, ready, lambda: generate_scene(out, num_views, resolution, supersample, num_points, seed,
                                                   test_every, test_offset))
    return out
