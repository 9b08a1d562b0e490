"""The scene of a Feature 3DGS config: ``data.path`` loaded, the embedded synthetic scene generated first."""

from __future__ import annotations

from pathlib import Path

from vkd.errors import DataError
from vkd.feature3dgs.config import Feature3DGSConfig, cache_root
from vkd.feature3dgs.data import Scene, load_scene
from vkd.feature3dgs.synthetic import ensure_synthetic_scene

__all__ = ["prepare_scene"]


def prepare_scene(cfg: Feature3DGSConfig) -> Scene:
    """Load ``data.path`` (generating the embedded synthetic scene first when it is ``"synthetic"``).

    Raises:
        DataError: the scene cannot be read, or ``model.init=points`` and it has no point cloud.
    """
    d = cfg.data
    path: str | Path = d.path
    if d.path == "synthetic":
        s = d.synthetic
        root = Path(s.out_dir) if s.out_dir else cache_root(cfg) / "scenes"
        path = ensure_synthetic_scene(root, s.num_views, s.resolution, s.supersample, s.num_points, s.seed,
                                      d.test_every, d.test_offset, exact_dir=s.out_dir is not None)
    require_points = cfg.model.init != "random" and not cfg.model.init_ply  # a trained PLY brings its Gaussians
    scene = load_scene(path, d.format, d.downscale, d.test_every, d.test_offset, d.white_background,
                       require_points=require_points)
    if cfg.model.init == "points" and scene.points is None:
        raise DataError(f"model.init=points but the scene {scene.root} has no point cloud; use model.init=random")
    return scene
