"""RDED selection and the image update (hello.md §5)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vkd.errors import DataError
from vkd.hello.images import auto_factor, image_update, rded_select, stitch, unstitch, update_objective


class MeanColourTeacher(nn.Module):
    """Class c is 'brightness of channel c': a deterministic, monotone classifier."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, x):
        return self.scale * x.mean(dim=(2, 3))  # [B, 3]


def _data(n_per_class=12, size=16):
    gen = torch.Generator().manual_seed(0)
    xs, ys = [], []
    for c in range(3):
        x = torch.rand(n_per_class, 3, size, size, generator=gen) * 0.5
        x[:, c] += torch.linspace(0, 0.5, n_per_class)[:, None, None]  # some images are clearer than others
        xs.append(x)
        ys.append(torch.full((n_per_class,), c))
    return torch.cat(xs).clamp(0, 1), torch.cat(ys)


def test_auto_factor():
    assert auto_factor(32) == 1 and auto_factor(64) == 1 and auto_factor(224) == 2 and auto_factor(32, 2) == 2


def test_stitch_unstitch_roundtrip():
    x = torch.rand(3, 3, 16, 16)
    assert torch.equal(stitch(unstitch(x, 2), 2), x)
    patches = torch.rand(8, 3, 4, 4)
    img = stitch(patches, 2)
    assert img.shape == (2, 3, 8, 8)
    assert torch.equal(img[0, :, :4, 4:], patches[1])  # row-major: patch 1 is top-right


def test_selection_deterministic_lowest_ce_and_labels():
    x, y = _data()
    teacher = MeanColourTeacher().eval()
    sel = rded_select(x, y, teacher, 3, ipc=2, factor=1, mipc=100, num_crop=3, seed=5)
    assert sel.images.shape == (6, 3, 16, 16) and sel.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert sel.images.min() >= 0 and sel.images.max() <= 1
    again = rded_select(x, y, teacher, 3, ipc=2, factor=1, mipc=100, num_crop=3, seed=5)
    assert torch.equal(sel.images, again.images)
    other = rded_select(x, y, teacher, 3, ipc=2, factor=1, mipc=100, num_crop=3, seed=6)
    assert not torch.equal(sel.images, other.images)
    # the kept crops are the lowest-CE ones: their CE is recomputed and is <= every image's best crop
    with torch.no_grad():
        ce = F.cross_entropy(teacher(sel.images), sel.labels, reduction="none")
    torch.testing.assert_close(ce, sel.scores, atol=1e-5, rtol=1e-5)
    for c in range(3):
        kept = sel.scores[sel.labels == c]
        assert torch.all(kept[:-1] <= kept[1:])  # sorted, lowest first
        # with one full-image "crop" per image, the clearest images (highest channel c) are chosen
    full = rded_select(x, y, teacher, 3, ipc=2, factor=1, mipc=100, num_crop=1, crop_scale=(1.0, 1.0), seed=0)
    for c in range(3):
        idx = (y == c).nonzero().flatten()
        with torch.no_grad():
            ce_all = F.cross_entropy(teacher(x[idx]), y[idx], reduction="none")
        best = idx[torch.argsort(ce_all)[:2]]
        assert set(full.source_index[full.labels == c].tolist()) == set(best.tolist())


def test_factor_two_mosaic_shapes_on_32px():
    x, y = _data(n_per_class=10, size=32)
    sel = rded_select(x, y, MeanColourTeacher().eval(), 3, ipc=2, factor=2, mipc=10, num_crop=2, seed=0)
    assert sel.images.shape == (6, 3, 32, 32)
    assert sel.patches.shape == (24, 3, 16, 16) and sel.sources.shape == (24, 3, 32, 32)
    assert torch.equal(stitch(sel.patches, 2), sel.images)
    assert len(set(sel.source_index.tolist())) == 24  # every patch from a distinct real image


def test_ipc_larger_than_class_is_a_data_error():
    x, y = _data(n_per_class=3)
    with pytest.raises(DataError, match="needs"):
        rded_select(x, y, MeanColourTeacher().eval(), 3, ipc=4, factor=1)
    with pytest.raises(DataError):
        rded_select(x, y, MeanColourTeacher().eval(), 3, ipc=1, factor=2)  # needs 4 distinct images


def test_image_update_lowers_g_keeps_encoder_and_range():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                            nn.Flatten(), nn.Linear(8 * 7 * 7, 16))
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    targets = torch.rand(6, 3, 16, 16)  # p: full-resolution crops
    patches = F.interpolate(targets, size=(8, 8), mode="bilinear", antialias=True)  # z0 = down(p)
    g0 = update_objective(encoder, patches, targets).item()
    out, info = image_update(encoder, patches, targets, steps=30, lr=0.01)
    assert info["g_before"] == pytest.approx(g0, rel=1e-5)
    assert info["g_after"] < 0.9 * info["g_before"]
    assert out.shape == patches.shape and out.min() >= 0 and out.max() <= 1
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in encoder.parameters())
    # factor 1: nothing to recover, G starts at 0
    _, info1 = image_update(encoder, targets, targets, steps=2)
    assert info1["g_before"] == 0.0


class TwoModeTeacher(nn.Module):
    """Confidence from channel means; its penultimate features also carry which half of the image is lit."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.zero_()
            self.head.weight[:, :3] = 10 * torch.eye(3)

    def forward(self, x):
        half = x.shape[-1] // 2
        side = x[..., :half].mean(dim=(1, 2, 3)) - x[..., half:].mean(dim=(1, 2, 3))  # [B] > 0: left lit
        return self.head(torch.cat([x.mean(dim=(2, 3)), 20 * side[:, None]], dim=1))


class MarkedOnlyLabeller(nn.Module):
    """A label model that is right only on images whose top-right pixel is lit (the mark), wrong elsewhere."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.teacher = teacher

    def forward(self, x):
        logits = self.teacher(x)
        marked = x[:, :, 0, -1].mean(1) > 0.9  # [B]
        return torch.where(marked[:, None], logits, logits.roll(1, dims=1))


def _two_mode_data():
    # each class: 8 bright "left" images (most confident) and 4 dimmer "right" ones, the last of which is marked
    gen = torch.Generator().manual_seed(0)
    xs, ys, modes = [], [], []
    for c in range(3):
        for mode, n, level in (("left", 8, 0.9), ("right", 4, 0.7)):
            x = 0.05 + 0.02 * torch.rand(n, 3, 16, 16, generator=gen)
            cols = slice(0, 8) if mode == "left" else slice(8, 16)
            x[:, c, :, cols] = level + 0.05 * torch.rand(n, 16, 8, generator=gen)
            if mode == "right":
                x[-1, :, 0, -1] = 1.0
            xs.append(x)
            ys.append(torch.full((n,), c))
            modes += [mode] * n
    return torch.cat(xs), torch.cat(ys), modes


def test_cluster_selection_covers_both_modes_of_a_class():
    x, y, modes = _two_mode_data()
    teacher = TwoModeTeacher().eval()
    kwargs = dict(ipc=2, factor=1, mipc=100, num_crop=1, crop_scale=(1.0, 1.0), seed=0)
    plain = rded_select(x, y, teacher, 3, **kwargs)
    clustered = rded_select(x, y, teacher, 3, strategy="cluster", **kwargs)
    again = rded_select(x, y, teacher, 3, strategy="cluster", **kwargs)
    assert torch.equal(clustered.images, again.images) and clustered.labels.tolist() == [0, 0, 1, 1, 2, 2]
    for c in range(3):
        assert {modes[i] for i in plain.source_index[plain.labels == c].tolist()} == {"left"}
        picked = clustered.source_index[clustered.labels == c].tolist()
        assert sorted(modes[i] for i in picked) == ["left", "right"]
    # the picks are scored like RDED's (teacher CE of the kept crop) and listed lowest CE first
    with torch.no_grad():
        ce = F.cross_entropy(teacher(clustered.images), clustered.labels, reduction="none")
    torch.testing.assert_close(ce, clustered.scores, atol=1e-5, rtol=1e-5)
    assert all(clustered.scores[2 * c] <= clustered.scores[2 * c + 1] for c in range(3))
    with pytest.raises(ValueError, match="strategy"):
        rded_select(x, y, teacher, 3, strategy="herding", **kwargs)


def test_cluster_selection_with_a_label_model_keeps_only_images_it_labels_right():
    x, y, modes = _two_mode_data()
    teacher = TwoModeTeacher().eval()
    kwargs = dict(ipc=2, factor=1, mipc=100, num_crop=1, crop_scale=(1.0, 1.0), seed=0, strategy="cluster")
    marked = {i for i in range(len(y)) if x[i, :, 0, -1].mean() > 0.9}
    assert len(marked) == 3
    without = rded_select(x, y, teacher, 3, **kwargs)
    with_labeller = rded_select(x, y, teacher, 3, label_model=MarkedOnlyLabeller(teacher).eval(), **kwargs)
    assert any(i not in marked for i in without.source_index.tolist() if modes[i] == "right")
    for c in range(3):
        right = [i for i in with_labeller.source_index[with_labeller.labels == c].tolist() if modes[i] == "right"]
        assert len(right) == 1 and right[0] in marked  # the only right-mode image the labeller gets right
    # the left clusters hold no image the labeller gets right: their picks fall back to the plain ones
    for sel in (without, with_labeller):
        assert sum(modes[i] == "left" for i in sel.source_index.tolist()) == 3
    left = lambda sel: sorted(i for i in sel.source_index.tolist() if modes[i] == "left")  # noqa: E731
    assert left(without) == left(with_labeller)
