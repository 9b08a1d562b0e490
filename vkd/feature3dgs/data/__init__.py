"""Feature 3DGS scenes: one file per on-disk format, registered in :data:`SCENE_FORMATS`.

Every format returns a :class:`Scene` whose cameras use gsplat's conventions (``viewmat`` world-to-camera in OpenCV
axes, pinhole ``K`` in pixels of the downscaled image). ``data.format`` accepts ``auto`` or a key of the table, and
``auto`` picks the first format whose ``detect`` matches, in table order. A new format is one module that defines a
:class:`SceneFormat` plus one entry here.

Examples:
    >>> from vkd.feature3dgs.data import load_scene
    >>> scene = load_scene("data/garden", downscale=4)  # doctest: +SKIP
    >>> scene.source, len(scene.train_ids), scene.cameras[0].viewmat.shape  # doctest: +SKIP
    ('colmap', 161, torch.Size([4, 4]))
"""

from __future__ import annotations

from pathlib import Path

from vkd.errors import DataError
from vkd.feature3dgs.data import colmap, transforms
from vkd.feature3dgs.data.colmap import load_colmap, read_colmap_model
from vkd.feature3dgs.data.scene import Camera, Scene, SceneFormat, SceneOptions, split_indices
from vkd.feature3dgs.data.transforms import load_transforms

__all__ = ["SCENE_FORMATS", "Camera", "Scene", "SceneFormat", "SceneOptions", "load_scene", "detect_format",
           "load_colmap", "load_transforms", "read_colmap_model", "split_indices"]

# data.format -> reader; ``auto`` tries them in this order (a transforms.json beside a COLMAP model wins, as in
# nerfstudio's processed data).
SCENE_FORMATS: dict[str, SceneFormat] = {f.name: f for f in (transforms.FORMAT, colmap.FORMAT)}


def detect_format(root: Path) -> str:
    """The first format of :data:`SCENE_FORMATS` that recognises ``root``.

    Raises:
        DataError: no format does.
    """
    for name, fmt in SCENE_FORMATS.items():
        if fmt.detect(root):
            return name
    raise DataError(f"{root} is neither " + " nor ".join(f"a {n} scene ({f.description})"
                                                      for n, f in SCENE_FORMATS.items()))


def load_scene(path: str | Path, format: str = "auto", downscale: int = 1, test_every: int = 8,
               test_offset: int = 0, white_background: bool = False, require_points: bool = True) -> Scene:
    """Load a scene directory (or a file inside it) in any format of :data:`SCENE_FORMATS`.

    Args:
        path: the scene directory, or a file in it (e.g. its ``transforms.json``).
        format: ``"auto"`` (detect) or a key of :data:`SCENE_FORMATS`.
        downscale, test_every, test_offset, white_background, require_points: see :class:`SceneOptions`.

    Returns:
        the :class:`Scene`, cameras sorted by name.

    Raises:
        DataError: the directory is missing, holds no known format, or its files are malformed.
    """
    root = Path(path)
    if not root.exists():
        raise DataError(f"scene directory not found: {root}")
    if root.is_file():
        root = root.parent
    name = detect_format(root) if format == "auto" else format
    if name not in SCENE_FORMATS:
        raise DataError(f"unknown scene format {format!r}; use auto or one of: {', '.join(SCENE_FORMATS)}")
    options = SceneOptions(downscale, test_every, test_offset, white_background, require_points)
    return SCENE_FORMATS[name].load(root, options)
