"""Crowd-counting data set layouts: how the images of a split are found and paired with their annotation files.

:data:`LAYOUTS` is the one table of layouts (``root`` and ``split`` as in the config):

* ``shanghaitech``: ``root/{split}_data/images/IMG_k.jpg`` with ``root/{split}_data/ground_truth/GT_IMG_k.mat``
  (``ground-truth/`` is accepted too).
* ``ucf-qnrf``: ``root/{Train,Test}/img_XXXX.jpg`` with ``img_XXXX_ann.mat``.
* ``generic`` (also the synthetic default): ``root/{split}/NAME.{jpg,png,...}`` with a side-car ``NAME.json``,
  ``.csv``, ``.txt``, ``.npy`` (or ``.mat``).

``data.dataset`` (:class:`vkd.skt.config.CrowdDataConfig`) accepts ``synthetic`` and the keys of the table, and
:func:`vkd.skt.datasets.list_records` dispatches through it: a new layout is one pairing function and one entry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from vkd.data.files import IMAGE_EXTENSIONS
from vkd.errors import DataError

__all__ = ["POINT_EXTENSIONS", "LAYOUTS", "layout_names", "pair_files"]

# Side-car annotation files of the ``generic`` layout, in the order they are looked for.
POINT_EXTENSIONS = (".json", ".csv", ".txt", ".npy", ".mat")

# (dataset root, split name) -> [(image file, annotation file)], sorted by image name
PairFiles = Callable[[Path, str], list[tuple[Path, Path]]]


def _split_dir(root: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        if (root / name).is_dir():
            return root / name
    return None


def _pairs_shanghaitech(root: Path, split: str) -> list[tuple[Path, Path]]:
    base = _split_dir(root, [f"{split}_data", split, split.capitalize() + "_data"])
    if base is None and (root / "images").is_dir():
        base = root  # root already is a split directory
    if base is None or not (base / "images").is_dir():
        raise DataError(f"no ShanghaiTech split '{split}' under {root}: expected {root}/{split}_data/images/")
    gt_dir = _split_dir(base, ["ground_truth", "ground-truth"])
    if gt_dir is None:
        raise DataError(f"{base}: no ground_truth/ (or ground-truth/) directory with GT_IMG_*.mat files")
    pairs = []
    for img in sorted(p for p in (base / "images").iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
        ann = gt_dir / f"GT_{img.stem}.mat"
        if not ann.is_file():
            raise DataError(f"missing annotation {ann} for image {img}")
        pairs.append((img, ann))
    return pairs


def _pairs_qnrf(root: Path, split: str) -> list[tuple[Path, Path]]:
    base = _split_dir(root, [split.capitalize(), split, split.lower()])
    if base is None:
        if any(root.glob("*_ann.mat")):
            base = root
        else:
            raise DataError(f"no UCF-QNRF split '{split}' under {root}: expected {root}/{split.capitalize()}/")
    pairs = []
    for img in sorted(p for p in base.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
        ann = base / f"{img.stem}_ann.mat"
        if not ann.is_file():
            raise DataError(f"missing annotation {ann} for image {img}")
        pairs.append((img, ann))
    return pairs


def _pairs_generic(root: Path, split: str) -> list[tuple[Path, Path]]:
    base = _split_dir(root, [split]) if split else None
    if base is None:
        if split and any(p.is_dir() for p in root.iterdir()):
            raise DataError(f"no split '{split}' under {root}")
        base = root
    pairs = []
    for img in sorted(p for p in base.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
        for ext in POINT_EXTENSIONS:
            ann = img.with_suffix(ext)
            if ann.is_file():
                pairs.append((img, ann))
                break
        else:
            raise DataError(f"no annotation for {img}: expected {img.stem}.json, .csv, .txt or .npy next to it")
    return pairs


# layout name -> pairing function; ``data.dataset`` and :func:`pair_files` are derived from it
LAYOUTS: dict[str, PairFiles] = {
    "shanghaitech": _pairs_shanghaitech,  # {split}_data/images + ground_truth/GT_*.mat (image_info)
    "ucf-qnrf": _pairs_qnrf,  # {Train,Test}/img_*.jpg + img_*_ann.mat (annPoints)
    "generic": _pairs_generic,  # {split}/NAME.* + a side-car NAME.{json,csv,txt,npy}
}


def layout_names() -> str:
    """``"shanghaitech, ucf-qnrf or generic"``: the layouts, for messages."""
    names = list(LAYOUTS)
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def pair_files(root: Path, layout: str, split: str) -> list[tuple[Path, Path]]:
    """The ``(image, annotation)`` files of one split of a data set in ``layout``.

    Raises:
        DataError: an unknown layout, a missing split directory or a missing annotation file.
    """
    finder = LAYOUTS.get(layout)
    if finder is None:
        raise DataError(f"unknown dataset layout '{layout}'; use {layout_names()}")
    return finder(root, split)
