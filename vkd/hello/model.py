"""Classifiers used as HeLlO teachers and students (small ConvNet, torchvision ResNet-18).

Every classifier takes images in [0, 1] and normalises them itself, so teacher, projector and student see the same
tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from vkd.errors import DataError, UserError
from vkd.hello.config import ClassifierConfig

__all__ = ["Classifier", "SmallCNN", "build_classifier", "load_state_file"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.GroupNorm(channels, channels)  # instance norm with affine params, works at batch 1
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.Identity()


class SmallCNN(nn.Module):
    """ConvNet of the dataset-distillation literature: ``depth`` × (conv3×3 → norm → ReLU → avgpool 2)."""

    def __init__(self, num_classes: int, width: int = 32, depth: int = 3, norm: str = "batch"):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i in range(depth):
            c_out = width * 2 ** min(i, 2)
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=norm == "none"), _norm(norm, c_out),
                       nn.ReLU(inplace=True), nn.AvgPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` normalised → logits ``[B, C]``."""
        return self.fc(self.features(x).mean(dim=(2, 3)))


class Classifier(nn.Module):
    """Wraps a network with its input normalisation: ``forward(images in [0, 1]) -> logits [B, C]``."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)

    @property
    def num_classes(self) -> int:
        last = [m for m in self.net.modules() if isinstance(m, nn.Linear)][-1]
        return int(last.out_features)


def build_classifier(cfg: ClassifierConfig, num_classes: int, image_size: int) -> Classifier:
    """A randomly initialised (or ``cfg.init``-initialised) classifier for ``num_classes`` classes.

    ``resnet18`` is torchvision's; at ≤ 64 px (or ``low_res_stem=True``) its stem becomes a 3×3
    stride-1 conv without max-pool, the usual CIFAR adaptation. ``init="imagenet"`` loads
    torchvision's IMAGENET1K_V1 weights from the local torch hub cache (no download offline) and
    replaces ``fc`` when ``num_classes != 1000``.
    """
    if cfg.arch == "small_cnn":
        net: nn.Module = SmallCNN(num_classes, cfg.width, cfg.depth, cfg.norm)
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    else:
        net = resnet18(num_classes=1000 if cfg.init == "imagenet" else num_classes)
        if cfg.init == "imagenet":
            net.load_state_dict(_imagenet_resnet18_state())
            if num_classes != 1000:
                net.fc = nn.Linear(net.fc.in_features, num_classes)
        low_res = cfg.low_res_stem if cfg.low_res_stem is not None else image_size <= 64
        if low_res:
            net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        mean, std = _IMAGENET_MEAN, _IMAGENET_STD
    model = Classifier(net, mean, std)
    if cfg.init_checkpoint:
        state = load_state_file(cfg.init_checkpoint)
        target = model.net if not any(k.startswith("net.") for k in state) else model
        missing, unexpected = target.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise DataError(f"{cfg.init_checkpoint} does not fit a {cfg.arch} with {num_classes} classes "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def _imagenet_resnet18_state() -> dict[str, torch.Tensor]:
    try:
        return ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=False, check_hash=False)
    except Exception as err:  # offline and not cached: URLError, RuntimeError, ...
        raise UserError("torchvision ResNet-18 ImageNet weights are not in the torch hub cache and cannot be "
                        f"downloaded ({type(err).__name__}); place resnet18-f37072fd.pth in "
                        f"{torch.hub.get_dir()}/checkpoints or set model.init=random / init_checkpoint") from None


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (``{"state_dict": ...}`` or a plain dict)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DataError(f"cannot read checkpoint {path}: {type(err).__name__}") from None
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise DataError(f"{path} does not contain a state dict")
    return {k.removeprefix("module."): v for k, v in obj.items() if torch.is_tensor(v)}
