"""Validation splits carved from a training set (``data.val_split``, model selection with ``train.select_best``).

A validation split is always taken from the training data, never from the test split: the test split stays the
number a paper reports.

Examples:
    >>> train, val = carve_validation(10, 0.2, seed=0)
    >>> len(train), len(val), sorted(train + val) == list(range(10))
    (8, 2, True)
    >>> carve_validation(10, 3, seed=0)[1] == carve_validation(10, 3, seed=0)[1]  # seeded: the same every run
    True
"""

from __future__ import annotations

import torch

from vkd.errors import ConfigError

__all__ = ["carve_validation", "validation_size"]


def validation_size(num: int, val_split: float, what: str = "data.val_split") -> int:
    """How many of ``num`` training items ``val_split`` takes: a fraction in (0, 1), or a count >= 1.

    Raises:
        ConfigError: a negative value, a fraction that rounds to no item, or a split that leaves no training data.
    """
    if val_split < 0:
        raise ConfigError(f"{what} must be >= 0 (a fraction in (0, 1) or a count), got {val_split}")
    if val_split == 0:
        return 0
    count = round(val_split * num) if val_split < 1 else int(val_split)
    if val_split >= 1 and val_split != int(val_split):
        raise ConfigError(f"{what}={val_split}: use a fraction in (0, 1) or a whole number of items")
    if count < 1:
        raise ConfigError(f"{what}={val_split} of {num} training items is no item; use a larger fraction")
    if count >= num:
        raise ConfigError(f"{what}={val_split:g} takes {count} of the {num} training items and leaves no training "
                          "data")
    return count


def carve_validation(num: int, val_split: float, seed: int, what: str = "data.val_split"
                     ) -> tuple[list[int], list[int]]:
    """Split ``range(num)`` into ``(train, val)`` index lists (sorted), the validation part drawn with ``seed``.

    Args:
        num: number of training items.
        val_split: fraction in (0, 1) or count >= 1 of items for validation; 0 gives no validation items.
        seed: the draw's seed (a function of the data, not of the run, so every run validates on the same items).
        what: the config key, for error messages.
    """
    count = validation_size(num, val_split, what)
    if count == 0:
        return list(range(num)), []
    order = torch.randperm(num, generator=torch.Generator().manual_seed(seed)).tolist()
    val = sorted(order[:count])
    chosen = set(val)
    return [i for i in range(num) if i not in chosen], val
