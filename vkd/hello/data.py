"""Labelled image data for HeLlO: the embedded digits and ``torchvision.datasets.ImageFolder`` trees.

Both give a :class:`LabelledImages` held in RAM: images ``[N, 3, S, S]`` (float32 in [0, 1] for the
digits, uint8 for ImageFolder to save memory), labels ``[N]`` and the class names in class-index
order. The class names feed the CLIP prompts, so their order is the contract between teacher,
projector and student; it is written next to every artefact.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.transforms.functional import center_crop, resize

from vkd.data.digits import load_digits
from vkd.data.files import SkipLog, read_image, resolve_inside
from vkd.errors import DataError
from vkd.hello.config import HelloDataConfig

__all__ = ["LabelledImages", "ImageTensorDataset", "load_split", "load_imagefolder", "prompt_names",
           "class_subset", "write_distilled_set", "read_distilled_set"]

log = logging.getLogger(__name__)


@dataclass
class LabelledImages:
    """Images ``[N, 3, S, S]`` (float32 in [0, 1] or uint8), labels ``[N]`` int64, class names.

    Attributes:
        skipped: number of files that failed to decode and were skipped (ImageFolder).
        skipped_files: up to 20 of their paths, for the log.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]
    skipped: int = 0
    skipped_files: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def float_images(self, index: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Images (optionally a subset) as float32 in [0, 1]."""
        x = self.images if index is None else self.images[index]
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()

    def counts(self) -> torch.Tensor:
        """``[C]`` images per class."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    def dataset(self) -> ImageTensorDataset:
        return ImageTensorDataset(self.images, self.labels)


class ImageTensorDataset(Dataset):
    """``(image float [3, S, S] in [0, 1], label)`` pairs from in-memory tensors (uint8 or float)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x
        return x, self.labels[i]


def prompt_names(class_names: tuple[str, ...] | list[str]) -> list[str]:
    """Folder names → prompt text: ``n01440764_tench`` stays as is, ``golden_retriever`` → ``golden retriever``."""
    return [str(n).replace("_", " ").strip() for n in class_names]


def load_split(cfg: HelloDataConfig, split: str) -> LabelledImages:
    """Load ``split`` (``"train"`` or ``"test"``) of the configured data.

    Raises:
        DataError: missing folders, empty classes, nothing decodable, or train/val class mismatch.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if cfg.source == "digits":

        d = load_digits(split, size=cfg.image_size, channels=3, value_range="unit")
        data = LabelledImages(d.images, d.labels, tuple(d.class_names))
    else:
        root = cfg.train_dir if split == "train" else (cfg.val_dir or "")
        if not root:
            raise DataError("data.val_dir must be set to evaluate on an ImageFolder dataset")
        data = load_imagefolder(root, cfg.image_size, cfg.max_per_class)
        if split == "test" and cfg.val_dir:
            train_classes = _folder_classes(Path(cfg.train_dir))
            if list(data.class_names) != train_classes:
                raise DataError(f"class folders of {cfg.val_dir} ({len(data.class_names)}) differ from those of "
                                f"{cfg.train_dir} ({len(train_classes)}); both need the same class sub-folders")
    if cfg.class_names:
        if len(cfg.class_names) != data.num_classes:
            raise DataError(f"data.class_names has {len(cfg.class_names)} names but the data has "
                            f"{data.num_classes} classes")
        data.class_names = tuple(cfg.class_names)
    return data


def _folder_classes(root: Path) -> list[str]:

    try:
        classes, _ = find_classes(str(root))
    except FileNotFoundError:
        raise DataError(f"{root} has no class sub-folders (expected an ImageFolder tree: root/<class>/<image>)") \
            from None
    return classes


def load_imagefolder(root: str | Path, image_size: int, max_per_class: int = 0) -> LabelledImages:
    """Read an ImageFolder tree into RAM as uint8 ``[N, 3, S, S]`` (shorter side resized, centre crop).

    Files that fail to decode are skipped and counted (``skipped``); a class that ends up empty, or a
    tree without any class folder, raises :class:`DataError`.

    Args:
        root: ``root/<class>/<image>``; classes sorted by name as in ``torchvision.datasets.ImageFolder``.
        image_size: output side S.
        max_per_class: keep the first (sorted) ``max_per_class`` files per class (0: all).
    """

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    classes = _folder_classes(root)
    class_to_idx = {c: i for i, c in enumerate(classes)}
    samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    per_class: dict[int, list[str]] = {i: [] for i in range(len(classes))}
    for path, label in samples:
        per_class[label].append(path)
    empty = [classes[i] for i, paths in per_class.items() if not paths]
    if empty:
        raise DataError(f"{len(empty)} class folder(s) of {root} contain no images: {', '.join(empty[:5])}")
    images, labels, skips = [], [], SkipLog()
    for label, paths in per_class.items():
        if max_per_class:
            paths = paths[:max_per_class]
        kept = 0
        for path in paths:
            try:  # vkd's safe reader: truncated/garbage files and decompression bombs become DataError
                x = torch.from_numpy(read_image(path, "RGB").copy()).permute(2, 0, 1)  # [3, H, W] uint8
            except DataError as err:
                skips.add(path, str(err))
                continue
            x = center_crop(resize(x, image_size, antialias=True), [image_size, image_size])
            images.append(x)
            labels.append(label)
            kept += 1
        if kept == 0:
            raise DataError(f"no image of class '{classes[label]}' in {root} could be decoded "
                            f"({len(paths)} file(s) failed)")
    if len(skips):
        log.warning("%s under %s", skips.summary(), root)
    return LabelledImages(torch.stack(images), torch.tensor(labels, dtype=torch.long), tuple(classes),
                          skipped=len(skips), skipped_files=[p for p, _ in skips.skipped[:20]])


def class_subset(data: LabelledImages, per_class: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of ``per_class`` random images of every class, in class order, ``[C · per_class]``.

    Raises:
        DataError: a class has fewer than ``per_class`` images.
    """
    out = []
    for c in range(data.num_classes):
        idx = (data.labels == c).nonzero().flatten()
        if idx.numel() < per_class:
            raise DataError(f"class '{data.class_names[c]}' has {idx.numel()} images, fewer than the "
                            f"{per_class} requested per class")
        out.append(idx[torch.randperm(idx.numel(), generator=generator)[:per_class]])
    return torch.cat(out)


def resize_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear (antialiased when shrinking) resize of ``[B, C, H, W]`` float images to ``size × size``."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=x.shape[-1] > size).clamp(0, 1)


def write_distilled_set(out_dir: Path, images: torch.Tensor, labels: torch.Tensor, class_names: tuple[str, ...],
                        extra: dict[str, Any] | None = None) -> Path:
    """Write ``images [N, 3, S, S]`` in [0, 1] as 8-bit PNGs under ``out_dir/images/`` + ``manifest.json``.

    Manifest paths are relative to ``out_dir`` (``images/<cc>_<class>/<i>.png``).
    """

    out_dir = Path(out_dir)
    entries = []
    counters: dict[int, int] = {}
    x8 = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for img, label in zip(x8, labels.tolist(), strict=True):
        k = counters.get(label, 0)
        counters[label] = k + 1
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(class_names[label]))[:40]
        rel = f"images/{label:03d}_{safe}/{k:04d}.png"
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(out_dir / rel)
        entries.append({"path": rel, "label": int(label)})
    manifest = {"format": "vkd-hello-distilled-v1", "class_names": list(class_names),
                "image_size": int(images.shape[-1]), "entries": entries, **(extra or {})}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out_dir / "manifest.json"


def read_distilled_set(root: str | Path) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Read a distilled set written by :func:`write_distilled_set`.

    Returns:
        ``(images [N, 3, S, S] float in [0, 1], labels [N], manifest)``.

    Raises:
        DataError: missing/invalid manifest, a path that escapes ``root``, a missing or undecodable PNG.
    """

    root = Path(root)
    path = root / "manifest.json" if root.is_dir() else root
    root = path.parent.resolve()
    try:
        manifest = json.loads(path.read_text())
        entries = manifest["entries"]
        num_classes = len(manifest["class_names"])
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"cannot read distilled-set manifest {path}") from None
    images, labels = [], []
    for e in entries:
        rel = str(e.get("path", ""))
        full = resolve_inside(root, rel)  # DataError for absolute paths outside, '..' and symlink escapes
        label = e.get("label")
        if not isinstance(label, int) or not 0 <= label < num_classes:
            raise DataError(f"manifest {path} entry '{rel}' has label {label!r} outside [0, {num_classes})")
        arr = torch.from_numpy(read_image(full, "RGB").copy()).permute(2, 0, 1)  # DataError if unreadable
        images.append(arr.float() / 255.0)
        labels.append(label)
    if not images:
        raise DataError(f"manifest {path} lists no images")
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), manifest
