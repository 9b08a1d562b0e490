"""scikit-learn's digits (1,797 8×8 grey images, 10 classes), the embedded default dataset.

It ships inside scikit-learn, so every embedded default that needs labelled images (the BOOT
teacher, the FID "digits" extractor, HeLlO) runs offline. The split is fixed (stratified, seed 0) so
that numbers are comparable across runs and modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

__all__ = ["DIGIT_NAMES", "load_digits", "DigitsSplit"]

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass
class DigitsSplit:
    """Images ``[N, C, S, S]`` float32 and labels ``[N]`` int64 of one split."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...] = DIGIT_NAMES

    def dataset(self) -> TensorDataset:
        return TensorDataset(self.images, self.labels)

    def __len__(self) -> int:
        return self.images.shape[0]


def load_digits(split: Literal["train", "test", "all"] = "train", size: int = 16, channels: int = 1,
                value_range: Literal["unit", "symmetric"] = "symmetric", test_fraction: float = 0.2) -> DigitsSplit:
    """Load the digits, upsampled with bilinear interpolation (antialiased) to ``size × size``.

    Args:
        split: ``train`` (80 %), ``test`` (20 %, stratified, fixed seed) or ``all``.
        size: output side in pixels (8 keeps the original resolution).
        channels: 1 (grey) or 3 (grey repeated, for RGB models such as CLIP).
        value_range: ``unit`` → [0, 1]; ``symmetric`` → [-1, 1] (diffusion convention).
        test_fraction: fraction held out for ``test``.

    Returns:
        DigitsSplit with ``images [N, channels, size, size]`` and ``labels [N]``.
    """
    from sklearn.datasets import load_digits as _sk_load  # on use: scikit-learn is slow to import
    from sklearn.model_selection import train_test_split

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    raw = _sk_load()
    images = raw.images.astype(np.float32) / 16.0  # [N, 8, 8] in [0, 1]
    labels = raw.target.astype(np.int64)
    if split != "all":
        idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=test_fraction,
                                               stratify=labels, random_state=0)
        idx = np.sort(idx_train if split == "train" else idx_test)
        images, labels = images[idx], labels[idx]
    x = torch.from_numpy(images)[:, None]  # [N, 1, 8, 8]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        x = x.clamp(0.0, 1.0)
    if channels == 3:
        x = x.repeat(1, 3, 1, 1)
    if value_range == "symmetric":
        x = x * 2.0 - 1.0
    return DigitsSplit(images=x.contiguous(), labels=torch.from_numpy(labels))
