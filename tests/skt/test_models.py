"""CSRNet family: exact parameter counts, MACs, feature taps, checkpoint and ImageNet-weight loading."""

from __future__ import annotations

import pytest
import torch

from vkd.errors import UserError
from vkd.skt.checkpoints import load_reference_checkpoint, load_vgg16_imagenet
from vkd.skt.models import CSRNet, count_macs, count_parameters, csrnet_widths, make_adapters


def test_exact_parameter_counts():
    teacher, student = CSRNet(1), CSRNet(4)
    assert count_parameters(teacher) == 16_263_489
    assert count_parameters(student) == 1_017_681
    adapters = make_adapters(student.tap_channels, teacher.tap_channels)
    assert count_parameters(adapters) == 105_728
    assert [count_parameters(a) for a in adapters] == [1088, 1088, 4224, 16640, 66048, 16640]


@pytest.mark.parametrize("div,widths", [(1, (64, 128, 256, 512)), (2, (32, 64, 128, 256)), (3, (21, 43, 85, 171)),
                                        (4, (16, 32, 64, 128)), (5, (13, 26, 51, 102))])
def test_width_table(div, widths):
    assert csrnet_widths(div) == widths


def test_macs_match_spec():
    # Spec §1: 205.53 G and 13.01 G MACs at 576x864 (counted with forward hooks on the meta device).
    assert count_macs(CSRNet(1), (1, 3, 576, 864)) / 1e9 == pytest.approx(205.53, abs=0.01)
    assert count_macs(CSRNet(4), (1, 3, 576, 864)) / 1e9 == pytest.approx(13.01, abs=0.01)


@pytest.mark.parametrize("div", [1, 4])
def test_feature_taps_shapes_and_ceil_mode(div):
    torch.manual_seed(0)
    model = CSRNet(div).eval()
    x = torch.randn(2, 3, 37, 45)  # not a multiple of 8: ceil_mode pools give ⌈H/8⌉
    with torch.no_grad():
        items = model(x, return_features=True)
        density = model(x)
    c0, c1, c2, c3 = model.widths
    expected = [(c0, 37, 45), (c0, 19, 23), (c1, 10, 12), (c2, 5, 6), (c3, 5, 6), (c2, 5, 6), (1, 5, 6)]
    assert [tuple(t.shape[1:]) for t in items] == expected
    assert torch.equal(items[-1], density)
    assert all((t >= 0).all() for t in items[:-1])  # taps are post-ReLU
    assert density.shape == (2, 1, 5, 6)


def test_student_returns_density_in_train_mode_too():
    model = CSRNet(4).train()
    out = model(torch.randn(1, 3, 16, 16))
    assert torch.is_tensor(out) and out.shape == (1, 1, 2, 2)


def test_reference_student_checkpoint_roundtrip(tmp_path):
    """An official SKT student dict (conv0_0.0.weight..., transform*) loads; adapters are dropped."""
    torch.manual_seed(0)
    src = CSRNet(4)
    names = (["conv0_0", "conv0_1", "conv1_0", "conv1_1", "conv2_0", "conv2_1", "conv2_2", "conv3_0", "conv3_1",
              "conv3_2"], ["conv4_0", "conv4_1", "conv4_2", "conv4_3", "conv4_4", "conv4_5"])
    convs = [m for m in src.frontend if isinstance(m, torch.nn.Conv2d)]
    back = [m for m in src.backend if isinstance(m, torch.nn.Conv2d)]
    state = {}
    for name, conv in zip(names[0] + names[1], convs + back, strict=True):
        state[f"{name}.0.weight"], state[f"{name}.0.bias"] = conv.weight, conv.bias
    state["conv5_0.weight"], state["conv5_0.bias"] = src.output_layer.weight, src.output_layer.bias
    state["transform0_0.0.weight"] = torch.zeros(64, 16, 1, 1)
    path = tmp_path / "student.pth.tar"
    torch.save({"epoch": 3, "arch": "x", "state_dict": state, "mae_best_prec1": 71.5, "mse_best_prec1": 114.4}, path)
    dst = CSRNet(4)
    meta = load_reference_checkpoint(dst, path)
    assert meta["epoch"] == 3
    x = torch.randn(1, 3, 24, 24)
    assert torch.equal(dst(x), src(x))


def test_teacher_checkpoint_and_wrong_width(tmp_path):
    src = CSRNet(1)
    path = tmp_path / "PartAmodel_best.pth.tar"
    torch.save({"epoch": 1, "state_dict": src.state_dict()}, path)
    dst = CSRNet(1)
    load_reference_checkpoint(dst, path)
    assert torch.equal(dst.output_layer.weight, src.output_layer.weight)
    with pytest.raises(UserError, match="width_div"):
        load_reference_checkpoint(CSRNet(4), path)


def test_vgg_weights_from_local_file(tmp_path):
    model = CSRNet(1)
    # A torchvision-layout VGG-16 state dict: features.{i} at the same Sequential indices.
    state = {f"features.{i}.{n}": torch.full_like(getattr(m, n), float(i))
             for i, m in enumerate(model.frontend) if isinstance(m, torch.nn.Conv2d) for n in ("weight", "bias")}
    state["classifier.0.weight"] = torch.zeros(2, 2)
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(state, path)
    load_vgg16_imagenet(model, str(path))
    assert float(model.frontend[21].weight.detach().mean()) == 21.0
    with pytest.raises(UserError, match="only fit the full-width"):
        load_vgg16_imagenet(CSRNet(4), str(path))
    with pytest.raises(UserError, match="not found"):
        load_vgg16_imagenet(CSRNet(1), str(tmp_path / "missing.pth"))


def test_imagenet_offline_gives_clear_error(monkeypatch):
    from torchvision.models import VGG16_Weights

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(type(VGG16_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(UserError, match="torch hub cache"):
        load_vgg16_imagenet(CSRNet(1), "imagenet")
