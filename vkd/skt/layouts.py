"""Crowd-counting data set layouts: how the images of a split are found and paired with their annotation files.

:data:`LAYOUTS` is the one table of layouts (``root``, ``split`` and ``fold`` as in the config):

* ``shanghaitech``: ``root/{split}_data/images/IMG_k.jpg`` with ``root/{split}_data/ground_truth/GT_IMG_k.mat``
  (``ground-truth/`` is accepted too; an image without it may have CSRNet-pytorch's ``ground_truth/IMG_k.h5``).
* ``ucf-qnrf``: ``root/{Train,Test}/img_XXXX.jpg`` with ``img_XXXX_ann.mat``.
* ``jhu-crowd`` (JHU-Crowd++ v2.0): ``root/{train,val,test}/images/NNNN.jpg`` with ``gt/NNNN.txt``, one head per
  line as ``x y w h o b`` (centre, box size, occlusion, blur; only ``x y`` are read).
* ``nwpu-crowd``: ``root/{train,val,test}.txt`` list the split (each line begins with the image id) of
  ``root/images/NNNN.jpg`` (or the ``images_part*/`` of the download) with ``root/jsons/NNNN.json`` (``points``;
  ``mats/NNNN.mat`` with ``annPoints`` is read when the JSON is absent). The test labels are not public.
* ``ucf-cc-50``: ``root/N.jpg`` with ``root/N_ann.mat`` (``annPoints``), N = 1..50; 5-fold cross validation on
  consecutive folds in numeric order (images 1-10, 11-20, ...): ``test`` is fold ``fold``, ``train`` the others.
* ``generic`` (also the synthetic default): ``root/{split}/NAME.{jpg,png,...}`` with a side-car ``NAME.json``,
  ``.csv``, ``.txt``, ``.npy`` (or ``.mat``).

A split that names a ``.json`` file is a CSRNet-pytorch image list (``part_A_train.json``: a JSON list of image
paths) in any layout: the listed images, each with the first annotation found by the conventions above
(:func:`annotation_candidates`). Lists name paths on the machine that wrote them, so a path that does not exist is
looked up under the data set root by its trailing components (``.../part_A_final/train_data/images/IMG_1.jpg`` →
``root/train_data/images/IMG_1.jpg``).

``data.dataset`` (:class:`vkd.skt.config.CrowdDataConfig`) accepts ``synthetic`` and the keys of the table, and
:func:`vkd.skt.datasets.list_records` dispatches through it: a new layout is one pairing function and one entry.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from vkd.data.files import IMAGE_EXTENSIONS
from vkd.errors import DataError

__all__ = [
    "POINT_EXTENSIONS",
    "UCF_CC_50_FOLDS",
    "LAYOUTS",
    "layout_names",
    "pair_files",
    "is_image_list",
    "csrnet_density_path",
    "annotation_candidates",
]

# Side-car annotation files of the ``generic`` layout, in the order they are looked for.
POINT_EXTENSIONS = (".json", ".csv", ".txt", ".npy", ".mat")

# UCF_CC_50 is evaluated by 5-fold cross validation
UCF_CC_50_FOLDS = 5

# (dataset root, split name, cross-validation fold) -> [(image file, annotation file)], sorted by image name;
# layouts without folds ignore the fold
PairFiles = Callable[[Path, str, int], list[tuple[Path, Path]]]


def _split_dir(root: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        if (root / name).is_dir():
            return root / name
    return None


def _first_file(candidates: Sequence[Path]) -> Path | None:
    return next((path for path in candidates if path.is_file()), None)


def _images(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def csrnet_density_path(image: Path) -> Path:
    """CSRNet-pytorch's ``.h5`` density map of an image: the last ``images`` directory of its path becomes
    ``ground_truth`` and the suffix ``.h5`` (``train_data/images/IMG_1.jpg`` → ``train_data/ground_truth/IMG_1.h5``)."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "ground_truth"
            break
    return Path(*parts).with_suffix(".h5")


def annotation_candidates(image: Path) -> list[Path]:
    """Where the annotation of an image may be, by the conventions of the layouts, in the order they are tried:
    head points first (ShanghaiTech ``GT_NAME.mat``, ``NAME_ann.mat``, NWPU ``jsons/``, JHU ``gt/``, side-cars),
    CSRNet-pytorch's ``.h5`` density last."""
    up, stem = image.parent.parent, image.stem
    return [*(up / d / f"GT_{stem}.mat" for d in ("ground_truth", "ground-truth")),
            image.with_name(f"{stem}_ann.mat"),
            up / "jsons" / f"{stem}.json",
            up / "gt" / f"{stem}.txt",
            *(image.with_suffix(ext) for ext in POINT_EXTENSIONS),
            csrnet_density_path(image)]


def _pairs_shanghaitech(root: Path, split: str, fold: int) -> list[tuple[Path, Path]]:
    base = _split_dir(root, [f"{split}_data", split, split.capitalize() + "_data"])
    if base is None and (root / "images").is_dir():
        base = root  # root already is a split directory
    if base is None or not (base / "images").is_dir():
        raise DataError(f"no ShanghaiTech split '{split}' under {root}: expected {root}/{split}_data/images/")
    gt_dir = _split_dir(base, ["ground_truth", "ground-truth"])
    if gt_dir is None:
        raise DataError(f"{base}: no ground_truth/ (or ground-truth/) directory with GT_IMG_*.mat files")
    pairs = []
    for img in _images(base / "images"):
        ann = gt_dir / f"GT_{img.stem}.mat"
        # CSRNet-pytorch's preprocessing leaves ground_truth/IMG_k.h5 densities next to (or instead of) the points
        found = _first_file([ann, gt_dir / f"{img.stem}.h5"])
        if found is None:
            raise DataError(f"missing annotation {ann} for image {img}")
        pairs.append((img, found))
    return pairs


def _pairs_qnrf(root: Path, split: str, fold: int) -> list[tuple[Path, Path]]:
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


def _pairs_generic(root: Path, split: str, fold: int) -> list[tuple[Path, Path]]:
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


def _pairs_jhu(root: Path, split: str, fold: int) -> list[tuple[Path, Path]]:
    base = _split_dir(root, [split, split.lower()])
    if base is None and (root / "images").is_dir():
        base = root  # root already is a split directory
    if base is None or not (base / "images").is_dir() or not (base / "gt").is_dir():
        raise DataError(f"no JHU-Crowd++ split '{split}' under {root}: expected {root}/{split}/images/ and gt/")
    pairs = []
    for img in _images(base / "images"):
        ann = base / "gt" / f"{img.stem}.txt"
        if not ann.is_file():
            raise DataError(f"missing annotation {ann} for image {img}")
        pairs.append((img, ann))
    return pairs


def _pairs_nwpu(root: Path, split: str, fold: int) -> list[tuple[Path, Path]]:
    listing = root / f"{split}.txt"
    if not listing.is_file():
        raise DataError(f"no NWPU-Crowd split '{split}' under {root}: expected {listing} (train.txt, val.txt or "
                        f"test.txt)")
    try:
        ids = [line.split()[0] for line in listing.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {listing}: {type(err).__name__}") from None
    # the download ships images_part1..5/; merged into images/ by most code bases
    image_dirs = [root / "images", *sorted(root.glob("images_part*"))]
    pairs, no_image, no_labels = [], [], []
    for image_id in ids:
        img = _first_file([d / f"{image_id}.jpg" for d in image_dirs])
        ann = _first_file([root / "jsons" / f"{image_id}.json", root / "mats" / f"{image_id}.mat"])
        if img is None:
            no_image.append(image_id)
        elif ann is None:
            no_labels.append(image_id)
        else:
            pairs.append((img, ann))
    if no_image:
        raise DataError(f"{listing}: {len(no_image)} of {len(ids)} images not found (first: {no_image[0]}.jpg under "
                        f"{root}/images/ or images_part*/)")
    if no_labels and not pairs and split == "test":
        raise DataError("NWPU-Crowd's test labels are not public (test results are submitted to the benchmark "
                        "server); evaluate on the validation split: data.test_split=val")
    if no_labels:
        raise DataError(f"{listing}: {len(no_labels)} of {len(ids)} images have no annotation (first: "
                        f"{root}/jsons/{no_labels[0]}.json)")
    return pairs


def _pairs_ucf_cc_50(root: Path, split: str, fold: int) -> list[tuple[Path, Path]]:
    if not 0 <= fold < UCF_CC_50_FOLDS:
        raise DataError(f"UCF_CC_50 has folds 0..{UCF_CC_50_FOLDS - 1}, got data.fold={fold}")
    images = sorted((p for p in _images(root) if p.stem.isdigit()), key=lambda p: int(p.stem))
    if len(images) < UCF_CC_50_FOLDS:
        raise DataError(f"no UCF_CC_50 images under {root}: expected {root}/1.jpg ... 50.jpg with 1_ann.mat ...")
    pairs = []
    for img in images:
        ann = img.with_name(f"{img.stem}_ann.mat")
        if not ann.is_file():
            raise DataError(f"missing annotation {ann} for image {img}")
        pairs.append((img, ann))
    # consecutive folds in numeric order (1-10, 11-20, ... of the 50 images)
    lo, hi = (round(k * len(pairs) / UCF_CC_50_FOLDS) for k in (fold, fold + 1))
    if split == "test":
        return pairs[lo:hi]
    if split == "train":
        return pairs[:lo] + pairs[hi:]
    raise DataError(f"UCF_CC_50 splits are 'train' (the other four folds) and 'test' (fold data.fold), got '{split}'")


# layout name -> pairing function; ``data.dataset`` and :func:`pair_files` are derived from it
LAYOUTS: dict[str, PairFiles] = {
    "shanghaitech": _pairs_shanghaitech,  # {split}_data/images + ground_truth/GT_*.mat (image_info)
    "ucf-qnrf": _pairs_qnrf,  # {Train,Test}/img_*.jpg + img_*_ann.mat (annPoints)
    "jhu-crowd": _pairs_jhu,  # {split}/images/NNNN.jpg + {split}/gt/NNNN.txt (x y w h o b)
    "nwpu-crowd": _pairs_nwpu,  # {split}.txt ids, images/NNNN.jpg + jsons/NNNN.json (points)
    "ucf-cc-50": _pairs_ucf_cc_50,  # N.jpg + N_ann.mat (annPoints), 5 folds of consecutive images
    "generic": _pairs_generic,  # {split}/NAME.* + a side-car NAME.{json,csv,txt,npy}
}


def layout_names() -> str:
    """``"shanghaitech, ucf-qnrf, ... or generic"``: the layouts, for messages."""
    names = list(LAYOUTS)
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def is_image_list(split: str) -> bool:
    """A split that names a CSRNet-pytorch JSON image list (``part_A_train.json``) rather than a split directory."""
    return split.lower().endswith(".json")


def _list_file(root: Path, split: str) -> Path:
    path = Path(split).expanduser()
    for candidate in (path,) if path.is_absolute() else (path, root / path):
        if candidate.is_file():
            return candidate
    raise DataError(f"image list {split} not found (a relative path is read from the working directory or {root})")


def _find_listed(entry: str, bases: Sequence[Path]) -> Path | None:
    path = Path(entry).expanduser()
    if path.is_file():
        return path
    parts = path.parts[1:] if path.is_absolute() else path.parts
    for base in bases:  # the longest trailing part of the path that exists under a base
        for i in range(len(parts)):
            candidate = base / Path(*parts[i:])
            if candidate.is_file():
                return candidate
    return None


def _pairs_listed(root: Path, split: str) -> list[tuple[Path, Path]]:
    list_path = _list_file(root, split)
    try:
        entries = json.loads(list_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read image list {list_path}: {type(err).__name__}") from None
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise DataError(f"{list_path}: expected a JSON list of image paths, as CSRNet-pytorch's part_A_train.json")
    bases = list(dict.fromkeys([root, list_path.parent]))
    images, missing = [], []
    for entry in entries:
        found = _find_listed(entry, bases)
        if found is None:
            missing.append(entry)
        else:
            images.append(found)
    if missing:
        raise DataError(f"{list_path}: {len(missing)} of {len(entries)} listed images not found (first: {missing[0]}; "
                        f"looked there and under {root} by its trailing path)")
    pairs, unannotated = [], []
    for img in images:
        ann = _first_file(annotation_candidates(img))
        if ann is None:
            unannotated.append(img)
        else:
            pairs.append((img, ann))
    if unannotated:
        raise DataError(f"{list_path}: {len(unannotated)} of {len(images)} listed images have no annotation (first: "
                        f"{unannotated[0]}; looked for GT_NAME.mat, NAME_ann.mat, jsons/, gt/, side-cars and "
                        f"ground_truth/NAME.h5)")
    return pairs


def pair_files(root: Path, layout: str, split: str, fold: int = 0) -> list[tuple[Path, Path]]:
    """The ``(image, annotation)`` files of one split of a data set in ``layout``.

    Args:
        root: the data set root.
        layout: a key of :data:`LAYOUTS`.
        split: a split name of the layout, or a CSRNet-pytorch ``.json`` image list (then in list order).
        fold: cross-validation fold (``ucf-cc-50``).

    Raises:
        DataError: an unknown layout, a missing split directory or list, listed images that do not exist, or a
            missing annotation file.
    """
    finder = LAYOUTS.get(layout)
    if finder is None:
        raise DataError(f"unknown dataset layout '{layout}'; use {layout_names()}")
    if is_image_list(split):
        return _pairs_listed(root, split)
    return finder(root, split, fold)
