"""The teacher-feature cache: one fp16 ``[C, h, w]`` ``.npy`` file per image, read memory-mapped.

Features are computed once per image and read through ``np.load(mmap_mode="r")``, so a scene's maps are never all
held in RAM. A ``manifest.json`` written last (atomically) marks the cache complete; a build holds a file lock, so
two processes sharing a cache compute it once.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from vkd.cache import atomic_write_text, build_lock, tmp_path
from vkd.errors import DataError
from vkd.feature3dgs.data import Scene

__all__ = ["FeatureCache", "scene_fingerprint"]


class FeatureCache:
    """One fp16 ``[C, h, w]`` ``.npy`` file per image plus ``manifest.json``; reads are memory-mapped.

    Args:
        root: cache directory.
    """

    VERSION = 1

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest: dict = self._read_manifest()

    def _read_manifest(self) -> dict:
        try:
            return json.loads((self.root / "manifest.json").read_text())
        except (OSError, ValueError):  # absent or torn: the cache is incomplete
            return {}

    def file(self, index: int) -> Path:
        return self.root / self.manifest["files"][index]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["shape"])  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.manifest.get("files", []))

    def map_shape(self, index: int) -> tuple[int, int, int]:
        """``(C, h, w)`` of image ``index``'s map (the file header only)."""
        return tuple(np.load(self.file(index), mmap_mode="r").shape)

    def get(self, index: int) -> Tensor:
        """Features of image ``index`` as float32 ``[C, h, w]`` (only this file is read)."""
        arr = np.load(self.file(index), mmap_mode="r")
        return torch.from_numpy(np.asarray(arr, dtype=np.float32))

    def is_complete(self, expected: dict) -> bool:
        m = self.manifest
        if not m or m.get("version") != self.VERSION or m.get("complete") is not True:
            return False
        if any(m.get(k) != v for k, v in expected.items()):
            return False
        return all((self.root / f).is_file() for f in m["files"])

    @torch.no_grad()
    def build(self, teacher: Callable[[Tensor], Tensor], load_image: Callable[[int], Tensor], names: list[str],
              expected: dict, batch_size: int = 4, device: str | torch.device = "cpu", progress: bool = True) -> None:
        """Compute and write the features of every image (skips the work when the cache is already complete).

        Args:
            teacher: ``[B, 3, H, W] -> [B, C, h, w]``.
            load_image: ``index -> [3, H, W]`` in [0, 1].
            names: image names (one per index; they name the files).
            expected: identity of the cache (teacher key, scene, sizes); stored in the manifest.
        """
        self.fill(_teacher_maps(teacher, load_image, len(names), batch_size, device), names, expected, progress)

    def fill(self, maps: Iterable[tuple[int, Tensor]], names: list[str], expected: dict,
             progress: bool = True) -> None:
        """Write ready-made maps (``teacher.kind=files``, or a teacher's via :meth:`build`) as the cache.

        ``maps`` is only consumed when the cache is incomplete. A failure removes what this build wrote.

        Args:
            maps: ``(index, [C, h, w])`` for every index of ``names``, in order.
            names: image names (one per index; they name the files).
            expected: identity of the cache; stored in the manifest.
        """
        if self.is_complete(expected):
            return
        with build_lock(self.root):  # a concurrent process may have filled it while this one waited
            self.manifest = self._read_manifest()
            if not self.is_complete(expected):
                self._write(maps, names, expected, progress)

    def _write(self, maps: Iterable[tuple[int, Tensor]], names: list[str], expected: dict, progress: bool) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        files = [f"{i:05d}_{_safe_stem(n)}.npy" for i, n in enumerate(names)]
        shape = None
        written: list[Path] = []
        bar = tqdm(total=len(names), desc="teacher features", disable=not progress or None, leave=False)
        try:
            for i, f in maps:
                f = f.float().cpu()  # [C, h, w]
                if not torch.isfinite(f).all():
                    raise DataError("teacher produced non-finite features")
                if shape is None:
                    shape = tuple(f.shape)
                elif f.shape[0] != shape[0]:
                    raise DataError(f"teacher feature width changed between images: {shape} vs {tuple(f.shape)}")
                dst = self.root / files[i]
                tmp = tmp_path(dst)
                np.save(tmp, f.numpy().astype(np.float16))
                os.replace(tmp, dst)
                written.append(dst)
                bar.update(1)
        except BaseException:
            for path in written:  # nothing half-written: an incomplete cache holds no maps of this attempt
                path.unlink(missing_ok=True)
            raise
        finally:
            bar.close()
        self.manifest = {"version": self.VERSION, **expected, "files": files, "shape": list(shape or ()),
                         "dtype": "float16", "complete": True}
        atomic_write_text(self.root / "manifest.json", json.dumps(self.manifest, indent=1))


@torch.no_grad()
def _teacher_maps(teacher: Callable[[Tensor], Tensor], load_image: Callable[[int], Tensor], count: int,
                  batch_size: int, device: str | torch.device) -> Iterator[tuple[int, Tensor]]:
    """``(index, [C, h, w])`` of every image, run through the teacher in batches of same-sized images."""
    for start in range(0, count, batch_size):
        chunk = list(range(start, min(start + batch_size, count)))
        imgs = [load_image(i) for i in chunk]
        groups: dict[tuple[int, int], list[int]] = {}
        for j, img in enumerate(imgs):
            groups.setdefault(tuple(img.shape[-2:]), []).append(j)
        for members in groups.values():
            batch = torch.stack([imgs[j] for j in members]).to(device)
            feats = teacher(batch).float().cpu()  # [b, C, h, w]
            for j, f in zip(members, feats, strict=True):
                yield chunk[j], f


def _safe_stem(name: str) -> str:
    stem = Path(name).with_suffix("").as_posix().replace("/", "_")
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:80]


def scene_fingerprint(scene: Scene) -> str:
    """Hash of the scene's images (path, size, mtime) and camera sizes: cache identity."""
    h = hashlib.sha1()
    for cam in scene.cameras:
        try:
            st = cam.image_path.stat()
            h.update(f"{cam.image_path.resolve()}|{st.st_size}|{int(st.st_mtime)}|{cam.width}x{cam.height}".encode())
        except OSError:
            h.update(str(cam.image_path).encode())
    return h.hexdigest()[:12]
