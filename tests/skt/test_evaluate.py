"""Tiling, mass-preserving density spreading, MAE/RMSE, overlays."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from vkd.skt.count import density_overlay
from vkd.skt.evaluate import count_metrics, predict, spread_density, tile_grid


class _SumPoolCounter(nn.Module):
    """A counter whose count is additive over 8-aligned tiles: density = 8×8 sum-pool of channel 0 (+3)."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        h, w = x.shape[-2:]
        x = nn.functional.pad(x[:, :1] + 3.0, (0, (-w) % 8, 0, (-h) % 8))
        return nn.functional.avg_pool2d(x, 8) * 64


@pytest.mark.parametrize("h,w,tile", [(100, 130, 64), (40, 40, 512), (1030, 515, 512)])
def test_tile_grid_covers_image_once(h, w, tile):
    boxes = tile_grid(h, w, tile)
    cover = np.zeros((h, w), int)
    for y0, x0, y1, x1 in boxes:
        cover[y0:y1, x0:x1] += 1
    assert (cover == 1).all()
    if h > tile or w > tile:
        assert len(boxes) == (h // tile + 1) * (w // tile + 1)  # the reference's grid
    else:
        assert boxes == [(0, 0, h, w)]


def test_tile_grid_with_overlap():
    boxes = tile_grid(100, 100, 48, overlap=8)
    cover = np.zeros((100, 100), int)
    for y0, x0, y1, x1 in boxes:
        cover[y0:y1, x0:x1] += 1
    assert cover.min() >= 1 and cover.max() > 1


def test_spread_density_preserves_mass():
    d = torch.rand(5, 6)
    full = spread_density(d, 37, 45)
    assert full.shape == (37, 45)
    assert torch.allclose(full.sum(), d.sum(), rtol=1e-5)
    with pytest.raises(ValueError, match="does not match"):
        spread_density(d, 50, 45)


def test_tiled_prediction_equals_whole_image_for_an_additive_counter():
    torch.manual_seed(0)
    model = _SumPoolCounter()
    image = torch.rand(3, 96, 128)
    whole = predict(model, image, tile_size=0)
    tiled = predict(model, image, tile_size=40)  # 3 x 4 tiles of 32 px: 8-aligned
    assert tiled.tiles == 12 and whole.tiles == 1
    assert tiled.count == pytest.approx(whole.count, rel=1e-5)
    assert whole.count == pytest.approx(float((image[0] + 3).sum()), rel=1e-5)
    assert tiled.density.shape == (96, 128)
    overlapped = predict(model, image, tile_size=40, overlap=8)
    assert overlapped.count == pytest.approx(whole.count, rel=0.05)


def test_count_metrics_rmse_is_papers_mse():
    m = count_metrics([10, 12, 7], [11, 10, 7])
    assert m["mae"] == pytest.approx(1.0)
    assert m["rmse"] == pytest.approx(math.sqrt(5 / 3))
    assert m["num_images"] == 3


def test_density_overlay():
    img = np.zeros((20, 30, 3), np.uint8)
    d = torch.zeros(20, 30)
    d[10, 15] = 1.0
    out = density_overlay(img, d, 1.0)
    arr = np.asarray(out)
    assert out.size == (30, 20) and arr[10, 15].sum() > 0
