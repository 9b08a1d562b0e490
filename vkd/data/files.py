"""Safe reading of user files: images, paths from manifests, numeric arrays.

Every reader turns a broken input into a one-line :class:`~vkd.errors.DataError` (or a counted skip)
instead of a traceback or a hang: truncated or zero-byte images, files whose content is not what the
extension says, decompression bombs, paths in a manifest that point outside the dataset root, and
arrays with NaN or infinite values.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from vkd.errors import DataError, first_line

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "open_image",
    "image_size",
    "read_image",
    "list_images",
    "read_images",
    "resolve_inside",
    "check_finite_array",
    "SkipLog",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
# 8k × 8k: larger images are refused before they are decoded (decompression-bomb guard).
MAX_IMAGE_PIXELS = 8192 * 8192


@dataclass
class SkipLog:
    """Files skipped while reading a collection, with the reason for each."""

    skipped: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path: str | Path, reason: str) -> None:
        self.skipped.append((str(path), reason))

    def __len__(self) -> int:
        return len(self.skipped)

    def summary(self) -> str:
        if not self.skipped:
            return "no files skipped"
        first = "; ".join(f"{Path(p).name}: {r}" for p, r in self.skipped[:3])
        more = f" (and {len(self.skipped) - 3} more)" if len(self.skipped) > 3 else ""
        return f"skipped {len(self.skipped)} unreadable file(s): {first}{more}"


@contextlib.contextmanager
def open_image(path: str | Path | bytes, max_pixels: int = MAX_IMAGE_PIXELS, name: str | None = None
               ) -> Iterator[Any]:
    """Open an image with PIL, refusing empty files, non-images and decompression bombs before decoding.

    The ``with`` body gets the open ``PIL.Image`` (only its header has been read). Decoding errors raised in
    the body (truncated data, broken chunks, PIL's own bomb guard) become one-line :class:`DataError` s too.

    Args:
        path: an image file, or the encoded bytes of one (a tar member).
        max_pixels: the decompression-bomb limit.
        name: what messages call the image (default: the path).

    Raises:
        DataError: missing, empty, not an image, too large, or broken.
    """
    if isinstance(path, bytes):
        source: Any = io.BytesIO(path)
        path = name or "<bytes>"
        if not source.getbuffer().nbytes:
            raise DataError(f"image file is empty: {path}")
    else:
        path = source = Path(path)
        if not path.is_file():
            raise DataError(f"image not found: {path}")
        if path.stat().st_size == 0:
            raise DataError(f"image file is empty: {path}")
        path = name or path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise DataError(f"image {path} is {width}×{height} pixels, more than the limit of "
                                    f"{max_pixels} (possible decompression bomb)")
                yield img
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"image {path} is too large to decode safely (decompression bomb guard)") from None
    except UnidentifiedImageError:
        raise DataError(f"{path} is not a readable image") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, MemoryError) as err:
        # truncated data, broken headers and chunks (PIL raises all of these depending on the format)
        raise DataError(f"cannot decode image {path}: {first_line(err)}") from None


def image_size(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """``(width, height)`` from the header alone, with the checks of :func:`open_image`."""
    with open_image(path, max_pixels) as img:
        return img.size


def read_image(path: str | Path, mode: str = "RGB", max_pixels: int = MAX_IMAGE_PIXELS,
               background: tuple[float, float, float] | None = None) -> np.ndarray:
    """Decode an image file fully and convert it to ``mode``.

    Args:
        path: the file.
        mode: a PIL mode; ``"RGB"`` converts greyscale, palette and RGBA.
        max_pixels: refuse images with more pixels than this, before decoding them.
        background: RGB in [0, 1] to alpha-composite transparent images (RGBA, LA, palette with transparency) onto
            before the conversion; ``None`` drops the alpha channel as it is.

    Returns:
        ``uint8`` array ``[H, W, 3]`` for RGB (``[H, W]`` for ``"L"``).

    Raises:
        DataError: missing, empty, truncated, not an image, or too large.

    Examples:
        >>> rgb = read_image("scene/images/frame_00000.png", background=(1.0, 1.0, 1.0))  # doctest: +SKIP
        >>> rgb.shape, rgb.dtype  # doctest: +SKIP
        ((64, 64, 3), dtype('uint8'))
    """
    with open_image(path, max_pixels) as img:
        img.load()  # decode now: truncated files fail here, not later in a worker
        if background is not None and has_alpha(img):
            rgba = img.convert("RGBA")
            base = Image.new("RGBA", rgba.size, tuple(int(round(c * 255)) for c in background) + (255,))
            img = Image.alpha_composite(base, rgba)
        return np.asarray(img.convert(mode))


def has_alpha(img: Any) -> bool:
    """Whether a PIL image carries transparency (RGBA, LA, or a palette with a transparent entry)."""
    return img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info)


def list_images(root: str | Path, recursive: bool = True) -> list[Path]:
    """Image files under ``root`` (by extension), sorted; a file path is returned as a one-item list."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DataError(f"image directory not found: {root}")
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in root.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def read_images(paths: Iterable[str | Path], mode: str = "RGB", skips: SkipLog | None = None
                ) -> list[tuple[Path, np.ndarray]]:
    """Read many images; unreadable ones are skipped and recorded in ``skips`` (never silently)."""
    out = []
    for path in paths:
        try:
            out.append((Path(path), read_image(path, mode)))
        except DataError as err:
            if skips is None:
                raise
            skips.add(path, str(err))
    return out


def resolve_inside(root: str | Path, relative: str | Path, follow_symlinks: bool = True) -> Path:
    """Join a path read from a manifest to its dataset root, refusing anything that escapes the root.

    Args:
        root: the dataset root.
        relative: the path as written in the manifest.
        follow_symlinks: ``True`` resolves symlinks and refuses those that lead outside the root; ``False``
            checks the path as written (absolute paths and ``..`` escapes are refused) and keeps symlinks the
            dataset itself contains, e.g. an ``images/`` folder linked to another disk.

    Raises:
        DataError: for absolute paths outside the root, ``..`` escapes and (``follow_symlinks``) symlinks
            that lead outside.
    """
    if follow_symlinks:
        root_abs = Path(root).resolve()
        candidate = (root_abs / relative).resolve()
    else:
        root_abs = Path(os.path.normpath(Path(root).absolute()))
        candidate = Path(os.path.normpath(root_abs / relative))
    if candidate != root_abs and root_abs not in candidate.parents:
        raise DataError(f"path {str(relative)!r} in a manifest points outside the dataset root {root}")
    return candidate


def check_finite_array(array: np.ndarray, what: str) -> np.ndarray:
    """Raise a DataError naming ``what`` if ``array`` holds NaN or infinite values."""
    array = np.asarray(array)
    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise DataError(f"{what} contains {bad} non-finite value(s) (NaN or inf)")
    return array
