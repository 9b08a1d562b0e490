"""Student view pipeline on stitched sets: ShufflePatches and tile views."""

import pytest
import torch
import torch.nn.functional as F

from vkd.errors import ConfigError
from vkd.hello.config import StudentConfig
from vkd.hello.evaluate import augment_batch
from vkd.hello.images import stitch, unstitch


def _mosaics(m: int = 6, factor: int = 2, s: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    # every tile is a constant image whose value names (mosaic, tile): views can be traced back to their tile
    values = torch.arange(m * factor * factor, dtype=torch.float32) / (m * factor * factor)
    patches = values[:, None, None, None].expand(-1, 3, s, s).clone()
    return stitch(patches, factor), values.view(m, factor * factor)


def test_shuffle_patches_permutes_the_tiles_of_each_mosaic():
    torch.manual_seed(0)
    x, values = _mosaics()
    cfg = StudentConfig(crop_scale_min=1.0, hflip=False, tile_views=0.0)
    views, y_a, y_b, lam = augment_batch(x, torch.arange(6), cfg, factor=2)
    assert views.shape == x.shape and lam == 1.0 and torch.equal(y_a, y_b)
    tile_means = unstitch(views, 2).mean(dim=(1, 2, 3)).view(6, 4)
    # same multiset of tiles per mosaic: nothing leaks between images
    assert torch.allclose(tile_means.sort(dim=1).values, values.sort(dim=1).values)


def test_tile_views_one_gives_single_upsampled_tiles():
    torch.manual_seed(0)
    x, values = _mosaics(m=64)
    cfg = StudentConfig(crop_scale_min=1.0, hflip=False, tile_views=1.0)
    views, _, _, _ = augment_batch(x, torch.zeros(64, dtype=torch.long), cfg, factor=2)
    assert views.shape == x.shape
    # each view is constant (one tile up-sampled) and equals one of its own mosaic's tiles
    flat = views.flatten(1)
    assert torch.allclose(flat, flat[:, :1].expand_as(flat), atol=1e-6)
    picked = flat[:, 0]
    hit = (picked[:, None] - values).abs().min(dim=1)
    assert float(hit.values.max()) < 1e-6
    assert len(set(hit.indices.tolist())) == 4  # all four tile positions get picked


def test_tile_views_zero_and_factor_one_leave_images_whole():
    torch.manual_seed(0)
    x = torch.rand(8, 3, 16, 16)
    cfg = StudentConfig(crop_scale_min=1.0, hflip=False, tile_views=1.0)
    views, _, _, _ = augment_batch(x, torch.zeros(8, dtype=torch.long), cfg, factor=1)
    assert torch.equal(views, x)
    mosaic, _ = _mosaics()
    cfg0 = StudentConfig(crop_scale_min=1.0, hflip=False, tile_views=0.0)
    views0, _, _, _ = augment_batch(mosaic, torch.zeros(6, dtype=torch.long), cfg0, factor=2)
    assert not torch.allclose(views0.flatten(1), views0.flatten(1)[:, :1].expand(-1, 3 * 8 * 8))


def test_tile_view_of_a_lossless_mosaic_restores_the_source_image():
    # digits are 8 px natively: a 16 px up-sampled digit survives the 2x2 mosaic as its 8 px tile
    torch.manual_seed(0)
    native = torch.rand(4, 3, 8, 8)
    full = F.interpolate(native, size=(16, 16), mode="bilinear", align_corners=False)
    mosaic = stitch(native, 2)
    cfg = StudentConfig(crop_scale_min=1.0, hflip=False, tile_views=1.0)
    views, _, _, _ = augment_batch(mosaic, torch.zeros(1, dtype=torch.long), cfg, factor=2)
    assert min(float((views[0] - full[i]).abs().max()) for i in range(4)) < 1e-6


def test_tile_views_outside_unit_interval_is_a_config_error():
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="tile_views"):
            StudentConfig(tile_views=bad)
