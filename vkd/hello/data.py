"""Labelled image data for HeLlO: the embedded digits, ImageFolder trees, file lists and webdataset-style tar shards.

Every source gives a :class:`LabelledImages`: labels ``[N]`` and the class names in class-index order, plus
either the images themselves in RAM (the digits, ``[N, 3, S, S]`` float in [0, 1]) or an **index** of where
each image lives (file paths, or offsets inside tar shards). File-backed images are never all in RAM: they
are decoded per batch in ``torch.utils.data.DataLoader`` workers (resize of the shorter side to ``S``, centre
crop, uint8) whenever a pass needs them — teacher training, projector fitting, teacher scoring for the
selection, evaluation. At ImageNet-1K scale the index is ~100 MB; the decoded set would be ~193 GB.

Files that fail to decode are skipped and counted. With ``data.verify`` (default) every file is decoded once when
the set is indexed — in the workers, nothing kept — and the undecodable ones leave the index, so ``skipped`` is
exact from the start and a class without a decodable file fails at once, as with the former in-RAM loader. Without
it (a large set: no extra pass), a shared-memory flag per image (``[N]`` uint8, written by the workers) records
every failure a pass meets, so ``skipped`` counts the distinct unreadable files met so far; training passes
substitute the next decodable image of the same class, scoring and evaluation passes drop the image, and a class
none of whose images decodes raises :class:`DataError` when it is met.

The class names feed the CLIP prompts, so their order is the contract between teacher, projector and student;
it is written next to every artefact.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.transforms.functional import center_crop, resize

from vkd.data.digits import load_digits
from vkd.data.files import MAX_IMAGE_PIXELS, open_image, read_image, resolve_inside
from vkd.errors import DataError
from vkd.hello.config import HelloDataConfig

__all__ = ["LabelledImages", "ImageTensorDataset", "ImageSource", "FileSource", "TarSource", "load_split",
           "load_splits", "load_imagefolder", "load_filelist", "load_shards", "expand_shards", "prompt_names",
           "class_subset", "write_distilled_set", "read_distilled_set", "as_unit", "decode_image_bytes"]

log = logging.getLogger(__name__)

_TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff")


def as_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 images → float32 in [0, 1]; float images are returned as float32 unchanged."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def _fit(arr: np.ndarray, size: int) -> torch.Tensor:
    """Decoded ``[H, W, 3]`` uint8 → ``[3, size, size]`` uint8: shorter side resized (antialiased), centre crop."""
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1)  # PIL's buffer is read-only
    return center_crop(resize(x, size, antialias=True), [size, size])


class _Strings:
    """A read-only list of strings packed in one NumPy buffer.

    A Python list of a million path strings is copied page by page into every forked DataLoader worker as the
    workers touch the objects' reference counts; one flat array is shared by all of them.
    """

    def __init__(self, items: list[str]):
        encoded = [s.encode("utf-8", "surrogateescape") for s in items]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self.offsets[1:])
        self.buf = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return bytes(self.buf[self.offsets[i]:self.offsets[i + 1]]).decode("utf-8", "surrogateescape")


class ImageSource:
    """Where the N images of a file-backed set live: ``read(i)`` decodes image ``i`` as uint8 ``[H, W, 3]``."""

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, i: int) -> np.ndarray:
        """Decode image ``i``; :class:`DataError` when it is unreadable."""
        raise NotImplementedError

    def name(self, i: int) -> str:
        """A human-readable location of image ``i`` (for the skip log)."""
        raise NotImplementedError

    def subset(self, keep: np.ndarray) -> ImageSource:
        """The source restricted to the images ``keep`` (in that order)."""
        raise NotImplementedError


class FileSource(ImageSource):
    """One image file per sample (ImageFolder trees, file lists), read with vkd's safe reader."""

    def __init__(self, paths: list[str]):
        self.paths = _Strings(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> np.ndarray:
        # truncated/garbage files and decompression bombs become DataError
        return read_image(self.paths[i], "RGB")

    def name(self, i: int) -> str:
        return self.paths[i]

    def subset(self, keep: np.ndarray) -> FileSource:
        return FileSource([self.paths[int(i)] for i in keep])


def decode_image_bytes(data: bytes, name: str, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode an encoded image held in memory (a tar member) with the checks of ``vkd.data.files.read_image``.

    Returns:
        uint8 ``[H, W, 3]``.

    Raises:
        DataError: empty, not an image, larger than ``max_pixels`` (decompression bomb), truncated or broken.
    """
    with open_image(data, max_pixels, name=name) as img:
        img.load()
        return np.asarray(img.convert("RGB"))


class TarSource(ImageSource):
    """Samples inside uncompressed tar shards, read by offset (random access, so any sampler works).

    Attributes:
        shards: the shard paths.
        where: ``[N, 3]`` int64 ``(shard, data offset, size)`` of each sample's image member.
    """

    def __init__(self, shards: list[str], where: np.ndarray, keys: list[str]):
        self.shards = list(shards)
        self.where = where
        self.keys = _Strings(keys)
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:  # spawned workers open their own handles
        return {**self.__dict__, "_handles": {}}

    def __len__(self) -> int:
        return int(self.where.shape[0])

    def _handle(self, shard: int) -> Any:
        if self._pid != os.getpid():  # a forked worker must not share the parent's file offsets
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            self._handles[shard] = open(self.shards[shard], "rb")  # noqa: SIM115 (kept open for the pass)
        return self._handles[shard]

    def read(self, i: int) -> np.ndarray:
        shard, offset, size = (int(v) for v in self.where[i])
        f = self._handle(shard)
        f.seek(offset)
        return decode_image_bytes(f.read(size), self.name(i))

    def name(self, i: int) -> str:
        return f"{self.shards[int(self.where[i, 0])]}:{self.keys[i]}"

    def subset(self, keep: np.ndarray) -> TarSource:
        return TarSource(self.shards, self.where[keep], [self.keys[int(i)] for i in keep])


@dataclass
class LabelledImages:
    """Labels ``[N]`` int64 and class names, with the images in RAM (``images``) or streamed (``source``).

    Attributes:
        images: ``[N, 3, S, S]`` float32 in [0, 1] or uint8, or ``None`` for a streamed set.
        labels: ``[N]`` class indices.
        class_names: names in class-index order.
        source: the file-backed image index of a streamed set (``None`` in RAM).
        image_size: S, the side the streamed images are resized and centre-cropped to.
        num_workers: DataLoader workers of the streaming passes (0: decode in this process).
        root: where the files are, for the skip log.
    """

    images: torch.Tensor | None
    labels: torch.Tensor
    class_names: tuple[str, ...]
    source: ImageSource | None = None
    image_size: int = 0
    num_workers: int = 0
    root: str = ""
    # files found undecodable by verify() and left out of the index: (name, reason)
    pre_skipped: list[tuple[str, str]] = field(default_factory=list)
    _failed: torch.Tensor = field(init=False, repr=False)
    _by_class: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        if (self.images is None) == (self.source is None):
            raise ValueError("LabelledImages needs exactly one of images (in RAM) and source (streamed)")
        if self.images is not None:
            self.image_size = int(self.images.shape[-1])
        # one flag per image, in shared memory so that DataLoader workers can record what they fail to decode
        self._failed = torch.zeros(len(self), dtype=torch.uint8)
        if self.source is not None:
            self._failed.share_memory_()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def streamed(self) -> bool:
        return self.source is not None

    def counts(self) -> torch.Tensor:
        """``[C]`` images per class (listed images: undecodable files are only known once met)."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    # ---- skipped files ----------------------------------------------------------------------------------------
    @property
    def skipped(self) -> int:
        """Distinct files that failed to decode: in :meth:`verify` and in the passes so far."""
        return len(self.pre_skipped) + int(self._failed.sum())

    @property
    def skipped_files(self) -> list[str]:
        """Up to 20 of the skipped files."""
        names = [n for n, _ in self.pre_skipped[:20]]
        return names + [self._name(int(i)) for i in self._failed.nonzero().flatten()[:20 - len(names)]]

    def _name(self, i: int) -> str:
        return self.source.name(i) if self.source is not None else f"#{i}"

    def skip_summary(self) -> str:
        """``skipped N unreadable file(s): name: reason; ...`` (the reasons of the first three, read again)."""
        bad = self._failed.nonzero().flatten().tolist()
        total = len(self.pre_skipped) + len(bad)
        if not total:
            return "no files skipped"
        parts = [f"{Path(n).name}: {r}" for n, r in self.pre_skipped[:3]]
        for i in bad[:3 - len(parts)]:
            try:
                assert self.source is not None
                self.source.read(i)
                reason = "failed to decode"
            except DataError as err:
                reason = str(err)
            parts.append(f"{Path(self._name(i)).name}: {reason}")
        more = f" (and {total - 3} more)" if total > 3 else ""
        return f"skipped {total} unreadable file(s): {'; '.join(parts)}{more}"

    def log_skips(self) -> None:
        if self.skipped:
            log.warning("%s under %s", self.skip_summary(), self.root or "the data")

    # ---- one image ----------------------------------------------------------------------------------------------
    def load(self, i: int) -> torch.Tensor | None:
        """Image ``i`` (``[3, S, S]``: uint8 when streamed), or ``None`` when its file does not decode."""
        if self.images is not None:
            return self.images[i]
        assert self.source is not None
        try:
            return _fit(self.source.read(i), self.image_size)
        except DataError:
            self._failed[i] = 1
            return None

    def _class_tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # computed in the parent before the workers fork: NumPy arrays are shared, not copied per worker
        if self._by_class is None:
            labels = self.labels.numpy()
            order = np.argsort(labels, kind="stable")
            starts = np.zeros(self.num_classes + 1, dtype=np.int64)
            np.cumsum(np.bincount(labels, minlength=self.num_classes), out=starts[1:])
            rank = np.empty(len(labels), dtype=np.int64)
            rank[order] = np.arange(len(labels)) - starts[labels[order]]
            self._by_class = (order, starts, rank)
        return self._by_class

    def load_or_substitute(self, i: int) -> torch.Tensor:
        """Image ``i``, or when it does not decode the next decodable image of its class (cyclically).

        Raises:
            DataError: no image of the class decodes.
        """
        x = self.load(i)
        if x is not None:
            return x
        order, starts, rank = self._class_tables()
        c = int(self.labels[i])
        lo, n = int(starts[c]), int(starts[c + 1] - starts[c])
        for k in range(1, n):
            j = int(order[lo + (int(rank[i]) + k) % n])
            if not self._failed[j]:
                x = self.load(j)
                if x is not None:
                    return x
        raise DataError(f"no image of class '{self.class_names[c]}' in {self.root or 'the data'} could be decoded "
                        f"({n} file(s) failed)")

    def verify(self, num_workers: int | None = None, batch_size: int = 64) -> LabelledImages:
        """Decode every file once, in DataLoader workers and keeping nothing, and return the set without the
        undecodable ones (counted in ``skipped``, logged). An in-RAM set is returned as is.

        Costs one decoding pass over the set; it makes ``skipped`` exact from the start and fails early.

        Raises:
            DataError: a class none of whose files decodes.
        """
        if self.source is None:
            return self
        workers = self.num_workers if num_workers is None else num_workers
        loader = DataLoader(_Verify(self.source), batch_size=batch_size, shuffle=False, num_workers=workers,
                            collate_fn=list, generator=torch.Generator())
        bad: list[tuple[int, str]] = [(i, r) for batch in loader for i, r in batch if r]
        bad_set = {i for i, _ in bad}
        keep = np.asarray([i for i in range(len(self)) if i not in bad_set], dtype=np.int64)
        labels = self.labels[torch.from_numpy(keep)]
        counts = torch.bincount(labels, minlength=self.num_classes)
        for c in range(self.num_classes):
            if counts[c] == 0:
                n = int((self.labels == c).sum())
                raise DataError(f"no image of class '{self.class_names[c]}' in {self.root or 'the data'} could be "
                                f"decoded ({n} file(s) failed)")
        out = LabelledImages(None, labels, self.class_names, source=self.source.subset(keep),
                             image_size=self.image_size, num_workers=self.num_workers, root=self.root,
                             pre_skipped=self.pre_skipped + [(self._name(i), r) for i, r in bad])
        out.log_skips()
        return out

    # ---- passes -------------------------------------------------------------------------------------------------
    def dataset(self) -> Dataset:
        """Map-style ``(image [3, S, S], label)`` dataset for the training engine (undecodable files substituted)."""
        if self.images is not None:
            return ImageTensorDataset(self.images, self.labels)
        return _TrainItems(self)

    def batches(self, indices: torch.Tensor | None = None, batch_size: int = 256, num_workers: int | None = None,
                keep_failed: bool = False, substitute: bool = False, unit: bool = True
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Stream ``indices`` (default: all) in order, decoded in DataLoader workers.

        Args:
            indices: ``[K]`` image indices.
            batch_size: images per batch.
            num_workers: decoding workers (default ``self.num_workers``; ignored in RAM).
            keep_failed: keep undecodable images in the batch as zeros (``ok`` False) instead of dropping them.
            substitute: replace an undecodable image by the next decodable one of its class.
            unit: convert to float in [0, 1]; ``False`` yields the stored dtype (uint8 when streamed: a quarter of
                the memory for a caller that buffers batches).

        Yields:
            ``(x [B, 3, S, S], y [B], index [B], ok [B] bool)``.
        """
        conv = as_unit if unit else (lambda t: t)
        idx = torch.arange(len(self)) if indices is None else torch.as_tensor(indices, dtype=torch.long).flatten()
        if self.images is not None:
            for s in range(0, idx.numel(), batch_size):
                sub = idx[s:s + batch_size]
                yield conv(self.images[sub]), self.labels[sub], sub, torch.ones(sub.numel(), dtype=torch.bool)
            return
        workers = self.num_workers if num_workers is None else num_workers
        # an own generator: creating the iterator must not draw from the global RNG (students, augmentations)
        loader = DataLoader(_Items(self, idx.numpy(), substitute), batch_size=batch_size, shuffle=False,
                            num_workers=workers, persistent_workers=False, generator=torch.Generator())
        for x, y, index, ok in loader:
            if not bool(ok.all()):
                self._failed[index[~ok]] = 1  # also when the workers' shared flags were not shared (spawn)
                if not keep_failed:
                    x, y, index, ok = x[ok], y[ok], index[ok], ok[ok]
            yield conv(x), y, index, ok

    def fetch(self, indices: torch.Tensor, num_workers: int | None = None) -> torch.Tensor:
        """Images ``indices`` as float ``[K, 3, S, S]`` in [0, 1]; an undecodable one is replaced by the next
        decodable image of its class."""
        idx = torch.as_tensor(indices, dtype=torch.long).flatten()
        if self.images is not None:
            return as_unit(self.images[idx])
        parts = [x for x, _, _, _ in self.batches(idx, num_workers=num_workers, substitute=True)]
        return torch.cat(parts) if parts else torch.zeros(0, 3, self.image_size, self.image_size)

    def float_images(self, index: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Images (optionally a subset) as float32 in [0, 1]. Streamed sets decode them: for small subsets only."""
        if self.images is not None:
            return as_unit(self.images if index is None else self.images[index])
        everything = torch.arange(len(self))
        idx = everything if index is None else everything[index] if isinstance(index, slice) else index
        return self.fetch(idx)

    def resized(self, size: int, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """All decodable images resized to ``size`` px, streamed: ``(images [M, 3, size, size], labels [M])``."""
        xs, ys = [], []
        for x, y, _, _ in self.batches(batch_size=batch_size):
            xs.append(resize_images(x, size))
            ys.append(y)
        return torch.cat(xs), torch.cat(ys)

    def materialize(self) -> LabelledImages:
        """An in-RAM uint8 copy of the decodable images (undecodable files dropped): for small sets and tests."""
        if self.images is not None:
            return self
        xs, ys = [], []
        for x, y, _, _ in self.batches():
            xs.append((x * 255).round_().to(torch.uint8))
            ys.append(y)
        return LabelledImages(torch.cat(xs), torch.cat(ys), self.class_names, root=self.root)


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


class _TrainItems(Dataset):
    """``(uint8 [3, S, S], label)`` of a streamed set; an undecodable file is replaced by one of its class."""

    def __init__(self, data: LabelledImages):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.load_or_substitute(int(i)), self.data.labels[int(i)]


class _Verify(Dataset):
    """``(index, reason)``: the decoding error of file ``index``, or ``""`` when it decodes."""

    def __init__(self, source: ImageSource):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[int, str]:
        try:
            self.source.read(int(i))
            return int(i), ""
        except DataError as err:
            return int(i), str(err) or "failed to decode"


class _Items(Dataset):
    """``(uint8 [3, S, S] (zeros when undecodable), label, index, ok)`` for the listed indices."""

    def __init__(self, data: LabelledImages, indices: np.ndarray, substitute: bool):
        self.data, self.indices, self.substitute = data, indices, substitute

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
        i = int(self.indices[k])
        x = self.data.load_or_substitute(i) if self.substitute else self.data.load(i)
        ok = x is not None
        if x is None:
            s = self.data.image_size
            x = torch.zeros(3, s, s, dtype=torch.uint8)
        return x, self.data.labels[i], i, ok


def prompt_names(class_names: tuple[str, ...] | list[str]) -> list[str]:
    """Folder names → prompt text: ``n01440764_tench`` stays as is, ``golden_retriever`` → ``golden retriever``."""
    return [str(n).replace("_", " ").strip() for n in class_names]


# --------------------------------------------------------------------------------------------------------------------
# Loading the configured splits
# --------------------------------------------------------------------------------------------------------------------


def load_split(cfg: HelloDataConfig, split: str) -> LabelledImages:
    """Load (index, for file-backed sources) ``split`` (``"train"`` or ``"test"``) of the configured data.

    Raises:
        DataError: missing folders / lists / shards or files they name, empty classes, or (ImageFolder)
            train/val class mismatch.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    train = split == "train"
    if cfg.source == "digits":
        d = load_digits(split, size=cfg.image_size, channels=3, value_range="unit")
        data = LabelledImages(d.images, d.labels, tuple(d.class_names))
    elif cfg.source == "imagefolder":
        root = cfg.train_dir if train else cfg.val_dir
        if not root:
            raise DataError("data.val_dir must be set to evaluate on an ImageFolder dataset")
        data = load_imagefolder(root, cfg.image_size, cfg.max_per_class, cfg.num_workers, verify=False)
        if not train:
            train_classes = _folder_classes(Path(cfg.train_dir))
            if list(data.class_names) != train_classes:
                raise DataError(f"class folders of {cfg.val_dir} ({len(data.class_names)}) differ from those of "
                                f"{cfg.train_dir} ({len(train_classes)}); both need the same class sub-folders")
    elif cfg.source == "filelist":
        path = cfg.train_list if train else cfg.val_list
        if not path:
            raise DataError("data.val_list must be set to evaluate on a file-list dataset")
        data = load_filelist(path, cfg.image_size, cfg.max_per_class, cfg.num_workers, cfg.list_root, verify=False)
    else:
        patterns = cfg.train_shards if train else cfg.val_shards
        if not patterns:
            raise DataError("data.val_shards must be set to evaluate on a tar-shard dataset")
        data = load_shards(patterns, cfg.image_size, cfg.max_per_class, cfg.num_workers, verify=False)
    if cfg.verify:
        data = data.verify()
    names = _configured_names(cfg)
    if names:
        if len(names) != data.num_classes:
            raise DataError(f"data.class_names{'_file' if cfg.class_names_file else ''} has {len(names)} names but "
                            f"the data has {data.num_classes} classes")
        data.class_names = tuple(names)
    return data


def load_splits(cfg: HelloDataConfig) -> tuple[LabelledImages, LabelledImages]:
    """``(train, test)``, checked to have the same classes in the same order.

    Raises:
        DataError: as :func:`load_split`, or the two splits' classes differ.
    """
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    if train.class_names != test.class_names:
        raise DataError(f"the training data has {train.num_classes} classes and the evaluation data "
                        f"{test.num_classes}, or their names/order differ; both splits need the same classes")
    return train, test


def _configured_names(cfg: HelloDataConfig) -> list[str]:
    if cfg.class_names:
        return list(cfg.class_names)
    if cfg.class_names_file:
        path = Path(cfg.class_names_file)
        if not path.is_file():
            raise DataError(f"data.class_names_file not found: {path}")
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return []


def _folder_classes(root: Path) -> list[str]:
    try:
        classes, _ = find_classes(str(root))
    except FileNotFoundError:
        raise DataError(f"{root} has no class sub-folders (expected an ImageFolder tree: root/<class>/<image>)") \
            from None
    return classes


def _streamed(paths_or_source: ImageSource, labels: list[int], classes: list[str], image_size: int,
              num_workers: int, root: str) -> LabelledImages:
    return LabelledImages(None, torch.tensor(labels, dtype=torch.long), tuple(classes), source=paths_or_source,
                          image_size=image_size, num_workers=num_workers, root=root)


def _cap(per_class: dict[int, list[Any]], max_per_class: int) -> dict[int, list[Any]]:
    return {c: (v[:max_per_class] if max_per_class else v) for c, v in per_class.items()}


def load_imagefolder(root: str | Path, image_size: int, max_per_class: int = 0, num_workers: int = 0,
                     verify: bool = True) -> LabelledImages:
    """Index an ImageFolder tree; images are decoded per batch when a pass needs them (shorter side resized to
    ``image_size``, centre crop, uint8).

    Args:
        root: ``root/<class>/<image>``; classes sorted by name as in ``torchvision.datasets.ImageFolder``.
        image_size: output side S.
        max_per_class: keep the first (sorted) ``max_per_class`` files per class (0: all).
        num_workers: DataLoader workers of the streaming passes.
        verify: decode every file once now (:meth:`LabelledImages.verify`, nothing kept): undecodable files are left
            out and counted at once, and a class without a decodable file fails here. ``False``: they are skipped
            and counted when a pass meets them.

    Raises:
        DataError: no such folder, no class sub-folder, a class folder without image files (with ``verify``:
            without a decodable one).
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
    per_class = _cap(per_class, max_per_class)
    paths = [p for c in range(len(classes)) for p in per_class[c]]
    labels = [c for c in range(len(classes)) for _ in per_class[c]]
    data = _streamed(FileSource(paths), labels, classes, image_size, num_workers, str(root))
    return data.verify() if verify else data


def _parse_labels(raw: list[str], where: str) -> tuple[list[int], list[str]]:
    """Label column → (class indices, class names): all integers (indices, names ``"0"`` … ``"K-1"``) or all names
    (sorted, as ImageFolder sorts folders)."""
    if all(re.fullmatch(r"\d+", r) for r in raw):
        labels = [int(r) for r in raw]
        k = max(labels) + 1
        counts = np.bincount(labels, minlength=k)
        if (counts == 0).any():
            missing = np.flatnonzero(counts == 0)[:5].tolist()
            raise DataError(f"{where}: class indices run to {k - 1} but classes {missing} have no image")
        return labels, [str(i) for i in range(k)]
    if any(re.fullmatch(r"\d+", r) for r in raw):
        raise DataError(f"{where}: labels mix class indices and class names")
    classes = sorted(set(raw))
    index = {c: i for i, c in enumerate(classes)}
    return [index[r] for r in raw], classes


def load_filelist(path: str | Path, image_size: int, max_per_class: int = 0, num_workers: int = 0,
                  root: str | Path = "", verify: bool = True) -> LabelledImages:
    """Index a file list: one ``<image path> <label>`` per line (split at the last whitespace, ``#`` comments).

    Labels are all class indices (0 … K−1) or all class names (sorted into indices). Relative paths are resolved
    against ``root`` (default: the list's folder). ``verify`` as in :func:`load_imagefolder`.

    Raises:
        DataError: the list is missing, empty or malformed, or names files that do not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file list not found: {path}")
    base = Path(root) if root else path.parent
    files, raw = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise DataError(f"{path}:{n}: expected '<image path> <label>', got {line[:80]!r}")
        files.append(str(base / parts[0]))  # an absolute path stays absolute
        raw.append(parts[1])
    if not files:
        raise DataError(f"file list {path} lists no images")
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise DataError(f"file list {path} names {len(missing)} missing file(s): {', '.join(missing[:3])}")
    labels, classes = _parse_labels(raw, str(path))
    per_class: dict[int, list[str]] = {i: [] for i in range(len(classes))}
    for f, c in zip(files, labels, strict=True):
        per_class[c].append(f)
    per_class = _cap(per_class, max_per_class)
    files = [f for c in range(len(classes)) for f in per_class[c]]
    labels = [c for c in range(len(classes)) for _ in per_class[c]]
    data = _streamed(FileSource(files), labels, classes, image_size, num_workers, str(path))
    return data.verify() if verify else data


def expand_shards(patterns: list[str] | tuple[str, ...]) -> list[str]:
    """Shard paths from paths, globs and webdataset brace ranges (``train-{000000..000146}.tar``), in order.

    Raises:
        DataError: a pattern matches no file.
    """
    out: list[str] = []
    for pattern in patterns:
        m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
        if m:
            width = len(m.group(1))
            names = [pattern[:m.start()] + str(i).zfill(width) + pattern[m.end():]
                     for i in range(int(m.group(1)), int(m.group(2)) + 1)]
            missing = [n for n in names if not os.path.isfile(n)]
            if missing:
                raise DataError(f"data shard not found: {missing[0]} ({len(missing)} of the {len(names)} shards of "
                                f"{pattern} are missing)")
            out += names
        elif any(ch in pattern for ch in "*?["):
            found = sorted(glob.glob(pattern))
            if not found:
                raise DataError(f"no data shard matches {pattern}")
            out += found
        else:
            if not os.path.isfile(pattern):
                raise DataError(f"data shard not found: {pattern}")
            out.append(pattern)
    return out


def _split_key(member: str) -> tuple[str, str]:
    """webdataset naming: ``dir/abc.def.jpg`` → key ``dir/abc``, extension ``def.jpg`` (from the basename's first dot)."""
    head, _, base = member.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def load_shards(patterns: list[str] | tuple[str, ...], image_size: int, max_per_class: int = 0,
                num_workers: int = 0, verify: bool = True) -> LabelledImages:
    """Index webdataset-style tar shards: each sample is ``<key>.jpg`` (or png/webp/...) + ``<key>.cls`` (its class
    index as text) in the same uncompressed shard. Images are read by offset and decoded per batch. ``verify`` as
    in :func:`load_imagefolder`.

    Raises:
        DataError: a pattern matches nothing, a shard is not an uncompressed tar, a sample lacks its image or its
            ``.cls``, or a ``.cls`` is not a non-negative integer.
    """
    shards = expand_shards(patterns)
    where, keys, raw = [], [], []
    for s, shard in enumerate(shards):
        images: dict[str, tuple[int, int]] = {}
        classes: dict[str, str] = {}
        try:
            with tarfile.open(shard, mode="r:") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, ext = _split_key(m.name)
                    if ext == "cls":
                        f = tar.extractfile(m)
                        classes[key] = (f.read() if f else b"").decode("utf-8", "replace").strip()
                    elif ext in _TAR_IMAGE_EXTS and key not in images:
                        images[key] = (m.offset_data, m.size)
        except (tarfile.TarError, OSError) as err:
            raise DataError(f"cannot read data shard {shard} as an uncompressed tar: "
                            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
        no_cls = [k for k in images if k not in classes]
        if no_cls:
            raise DataError(f"shard {shard}: {len(no_cls)} sample(s) have an image but no .cls (webdataset naming "
                            f"<key>.jpg + <key>.cls), e.g. '{no_cls[0]}'")
        no_img = [k for k in classes if k not in images]
        if no_img:
            raise DataError(f"shard {shard}: {len(no_img)} sample(s) have a .cls but no image file, e.g. "
                            f"'{no_img[0]}'")
        for key, (offset, size) in images.items():
            if not re.fullmatch(r"\d+", classes[key]):
                raise DataError(f"shard {shard}: '{key}.cls' holds {classes[key][:20]!r}, not a class index")
            where.append((s, offset, size))
            keys.append(key)
            raw.append(classes[key])
    if not where:
        raise DataError(f"the data shards {', '.join(patterns)} hold no samples")
    labels, class_names = _parse_labels(raw, ", ".join(patterns))
    order: dict[int, list[int]] = {i: [] for i in range(len(class_names))}
    for i, c in enumerate(labels):
        order[c].append(i)
    order = _cap(order, max_per_class)
    keep = [i for c in range(len(class_names)) for i in order[c]]
    source = TarSource(shards, np.asarray([where[i] for i in keep], dtype=np.int64).reshape(-1, 3),
                       [keys[i] for i in keep])
    data = _streamed(source, [labels[i] for i in keep], class_names, image_size, num_workers,
                     shards[0] if len(shards) == 1 else f"{len(shards)} shards ({shards[0]} …)")
    return data.verify() if verify else data


# --------------------------------------------------------------------------------------------------------------------
# Subsets, resizing, the distilled set on disk
# --------------------------------------------------------------------------------------------------------------------


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
    """Write ``images [N, 3, S, S]`` (float in [0, 1] or uint8) as 8-bit PNGs under ``out_dir/images/`` +
    ``manifest.json``.

    Manifest paths are relative to ``out_dir`` (``images/<cc>_<class>/<i>.png``).
    """

    out_dir = Path(out_dir)
    entries = []
    counters: dict[int, int] = {}
    x8 = images if images.dtype == torch.uint8 else (images.clamp(0, 1) * 255).round().to(torch.uint8)
    x8 = x8.permute(0, 2, 3, 1).cpu().numpy()
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


def read_distilled_set(root: str | Path, dtype: torch.dtype = torch.float32
                       ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Read a distilled set written by :func:`write_distilled_set`.

    Args:
        root: the set's folder (or its ``manifest.json``).
        dtype: ``torch.float32`` (in [0, 1]) or ``torch.uint8`` (a quarter of the memory; what the PNGs hold).

    Returns:
        ``(images [N, 3, S, S], labels [N], manifest)``.

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
        images.append(arr if dtype == torch.uint8 else arr.float() / 255.0)
        labels.append(label)
    if not images:
        raise DataError(f"manifest {path} lists no images")
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), manifest
