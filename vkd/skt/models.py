"""CSRNet and its 1/n-width students (Li et al., CVPR 2018; Liu et al., ACM MM 2020 §1-2 of the spec).

One class covers the teacher (``width_div=1``) and the students: both have the same ``Sequential``
layout, so the six feature taps sit at the same indices (``frontend[1, 4, 9, 16]``,
``backend[1, 7]``) and a CSRNet-pytorch checkpoint loads by key. The 1×1 adapters of the distiller
are **not** part of the model: an exported 1/4 student has exactly 1,017,681 parameters.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from vkd.errors import UserError

__all__ = [
    "CSRNet",
    "TAP_FRONTEND",
    "TAP_BACKEND",
    "TEACHER_WIDTHS",
    "csrnet_widths",
    "make_adapters",
    "load_vgg16_imagenet",
    "is_vgg_state_file",
    "load_reference_checkpoint",
    "count_parameters",
    "count_macs",
]

# VGG-16 stage widths of the teacher; a 1/n student divides them by n and rounds (1/3 → 21, 43, 85, 171).
TEACHER_WIDTHS = (64, 128, 256, 512)
# Indices of the tapped modules: ReLU after the first conv, pool1, pool2, pool3 / ReLU after dilated conv 1 and 4.
TAP_FRONTEND = (1, 4, 9, 16)
TAP_BACKEND = (1, 7)


def csrnet_widths(width_div: int) -> tuple[int, int, int, int]:
    """Stage widths ``[c0, c1, c2, c3]`` of a 1/``width_div`` CSRNet (spec §1.2 table)."""
    if width_div < 1:
        raise ValueError(f"width_div must be >= 1, got {width_div}")
    # math.floor(x + 0.5) instead of round(): no banker's rounding surprises.
    return tuple(int(math.floor(c / width_div + 0.5)) for c in TEACHER_WIDTHS)  # type: ignore[return-value]


def _frontend_layers(widths: tuple[int, ...], in_channels: int, ceil_mode: bool) -> list[nn.Module]:
    c0, c1, c2, c3 = widths
    cfg: list[int | str] = [c0, c0, "M", c1, c1, "M", c2, c2, c2, "M", c3, c3, c3]
    layers: list[nn.Module] = []
    cin = in_channels
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=ceil_mode))
        else:
            layers += [nn.Conv2d(cin, int(item), 3, padding=1), nn.ReLU(inplace=False)]
            cin = int(item)
    return layers


def _backend_layers(widths: tuple[int, ...]) -> list[nn.Module]:
    c0, c1, c2, c3 = widths
    layers: list[nn.Module] = []
    cin = c3
    for cout in (c3, c3, c3, c2, c1, c0):
        layers += [nn.Conv2d(cin, cout, 3, padding=2, dilation=2), nn.ReLU(inplace=False)]
        cin = cout
    return layers


class CSRNet(nn.Module):
    """CSRNet: VGG-16 frontend (10 convs, 3 pools), dilated backend, 1×1 output at 1/8 resolution.

    Args:
        width_div: 1 for the teacher (16,263,489 parameters), 4 for the SKT student (1,017,681).
        ceil_mode: max-pool rounding. SKT uses ``True`` (output ⌈H/8⌉×⌈W/8⌉); CSRNet-pytorch floors.
            Weights are interchangeable, only output sizes differ for inputs not divisible by 8.
        init: ``"kaiming"`` (Kaiming-normal fan_out for every 3×3 conv, zero bias: the SKT student and any
            randomly initialised teacher) or ``"reference"`` (CSRNet-pytorch: N(0, 0.01) for all convs; meant
            to be followed by loading ImageNet weights into the frontend). The 1×1 output layer is N(0, 0.01)
            in both (the reference student uses Kaiming there too; see :meth:`reset_parameters`).
        in_channels: input channels (3 for RGB).

    Forward:
        ``x [B, 3, H, W]`` (ImageNet-normalised) → density ``[B, 1, ⌈H/8⌉, ⌈W/8⌉]``; with
        ``return_features=True`` a list of the 6 taps of spec §2 followed by the density (7 items).
    """

    def __init__(self, width_div: int = 1, ceil_mode: bool = True, init: str = "kaiming", in_channels: int = 3):
        super().__init__()
        self.width_div = int(width_div)
        self.ceil_mode = bool(ceil_mode)
        self.widths = csrnet_widths(width_div)
        self.frontend = nn.Sequential(*_frontend_layers(self.widths, in_channels, ceil_mode))
        self.backend = nn.Sequential(*_backend_layers(self.widths))
        self.output_layer = nn.Conv2d(self.widths[0], 1, kernel_size=1)
        self.reset_parameters(init)

    @property
    def tap_channels(self) -> tuple[int, ...]:
        """Channels of the 6 feature taps: ``c0, c0, c1, c2, c3, c2``."""
        c0, c1, c2, c3 = self.widths
        return (c0, c0, c1, c2, c3, c2)

    def reset_parameters(self, init: str = "kaiming") -> None:
        if init not in ("kaiming", "reference"):
            raise ValueError(f"init must be 'kaiming' or 'reference', got {init!r}")
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                if init == "kaiming" and module is not self.output_layer:
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                else:
                    # The 1×1 output layer always gets N(0, 0.01) (CSRNet's init): a Kaiming fan_out init of a
                    # 1-channel layer (std √2) starts at counts of ±hundreds and costs the first steps to undo.
                    nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor | list[torch.Tensor]:
        if x.ndim != 4:
            raise ValueError(f"x must be [B, C, H, W], got shape {tuple(x.shape)}")
        if not return_features:
            return self.output_layer(self.backend(self.frontend(x)))
        feats: list[torch.Tensor] = []
        for i, layer in enumerate(self.frontend):
            x = layer(x)
            if i in TAP_FRONTEND:
                feats.append(x)
        for i, layer in enumerate(self.backend):
            x = layer(x)
            if i in TAP_BACKEND:
                feats.append(x)
        feats.append(self.output_layer(x))
        return feats


def make_adapters(student_channels: tuple[int, ...], teacher_channels: tuple[int, ...]) -> nn.ModuleList:
    """The training-only 1×1 Conv(C_s→C_t, bias) + ReLU adapters (105,728 parameters for 1/4 → 1)."""
    if len(student_channels) != len(teacher_channels):
        raise ValueError(f"student_channels {student_channels} and teacher_channels {teacher_channels} differ in length")
    adapters = nn.ModuleList()
    for cs, ct in zip(student_channels, teacher_channels, strict=True):
        conv = nn.Conv2d(cs, ct, kernel_size=1)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        adapters.append(nn.Sequential(conv, nn.ReLU(inplace=False)))
    return adapters


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------
# ImageNet weights and reference checkpoints
# ----------------------------------------------------------------------------------------------

_VGG_HINT = ("put vgg16-397923af.pth in the torch hub cache ($TORCH_HOME/hub/checkpoints/, default "
             "~/.cache/torch/hub/checkpoints/) or set model.weights to its local path")


def _copy_vgg_features(model: CSRNet, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``features.{i}`` of a torchvision VGG-16 state dict into ``frontend.{i}`` (same indices)."""
    if model.width_div != 1:
        raise UserError(f"ImageNet VGG-16 weights only fit the full-width teacher (width_div=1), not 1/{model.width_div}")
    copied = 0
    with torch.no_grad():
        for i, layer in enumerate(model.frontend):
            if not isinstance(layer, nn.Conv2d):
                continue
            for name in ("weight", "bias"):
                key = f"features.{i}.{name}"
                if key not in state:
                    raise UserError(f"{source} is not a torchvision VGG-16 state dict: key '{key}' is missing")
                value = state[key]
                target = getattr(layer, name)
                if tuple(value.shape) != tuple(target.shape):
                    raise UserError(f"{source}: '{key}' has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
                target.copy_(value.to(target.dtype))
                copied += 1
    if copied != 20:
        raise RuntimeError(f"copied {copied} VGG tensors, expected 20")


def load_vgg16_imagenet(model: CSRNet, weights: str = "imagenet") -> None:
    """Initialise the frontend of a full-width CSRNet from VGG-16 ImageNet weights.

    Args:
        model: a ``CSRNet(width_div=1)``.
        weights: ``"imagenet"`` loads ``torchvision.models.VGG16_Weights.IMAGENET1K_V1`` through torchvision
            (torch hub cache, downloaded if the network allows); otherwise a local path to a torchvision
            VGG-16 state dict (``vgg16-397923af.pth``) or to a full ``vgg16`` pickled state dict.

    Raises:
        UserError: the weights cannot be found or loaded (offline without a cached file, bad file).
    """
    if weights == "imagenet":
        from torchvision.models import VGG16_Weights  # start-up time: torchvision.models is slow to import

        try:
            state = VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        except Exception as err:  # network errors come as URLError/OSError/RuntimeError depending on the stack
            raise UserError(f"cannot load torchvision VGG-16 ImageNet weights ({type(err).__name__}); {_VGG_HINT}") from None
        _copy_vgg_features(model, state, "torchvision VGG16_Weights.IMAGENET1K_V1")
        return
    path = Path(weights).expanduser()
    if not path.is_file():
        raise UserError(f"VGG-16 weights file not found: {path}; {_VGG_HINT}")
    state = _torch_load(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{path} does not hold a state dict")
    _copy_vgg_features(model, state, str(path))


def is_vgg_state_file(path: Path) -> bool:
    """Whether ``path`` is a VGG-16 state dict (``features.*`` keys) rather than a whole CSRNet / SKT checkpoint."""
    state = _torch_load(path) if path.is_file() else {}
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return isinstance(state, dict) and any(str(k).startswith("features.") for k in state)


def _torch_load(path: Path) -> Any:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"cannot read checkpoint {path}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None


# Reference SKT student keys: conv{stage}_{k}.0.weight → our Sequential indices.
def _student_key_map() -> dict[str, str]:
    mapping: dict[str, str] = {}
    frontend_convs = [i for i, n in enumerate([2, 2, 3, 3]) for _ in range(n)]
    index = 0
    seen: dict[int, int] = {}
    for stage in frontend_convs:
        k = seen.get(stage, 0)
        seen[stage] = k + 1
        mapping[f"conv{stage}_{k}.0"] = f"frontend.{index}"
        index += 2
        if k == [2, 2, 3, 3][stage] - 1 and stage < 3:
            index += 1  # the pool after the stage
    for k in range(6):
        mapping[f"conv4_{k}.0"] = f"backend.{2 * k}"
    mapping["conv5_0"] = "output_layer"
    return mapping


def load_reference_checkpoint(model: CSRNet, path: str | Path) -> dict[str, Any]:
    """Load a CSRNet-pytorch teacher or an official SKT student checkpoint (``.pth.tar``), or a vkd ``.safetensors``.

    Teacher dicts carry ``state_dict`` with ``frontend.N.*``, ``backend.N.*``, ``output_layer.*`` keys;
    SKT student dicts carry ``conv0_0.0.weight`` … ``conv5_0.weight`` plus ``transform*`` adapter keys, which
    are dropped (they are training-only).

    Returns:
        The non-tensor metadata of the checkpoint (``epoch``, ``arch``, ``mae_best_prec1``, ...).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    raw = _torch_load(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path} does not hold a state dict")
    meta = {k: v for k, v in raw.items() if not isinstance(v, (dict, torch.Tensor))}
    state = raw.get("state_dict", raw)
    if not isinstance(state, dict):
        raise UserError(f"{path}: 'state_dict' is not a mapping")
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith("conv0_0.") for k in state):
        key_map = _student_key_map()
        converted = {}
        for key, value in state.items():
            if key.startswith("transform"):
                continue
            prefix, _, leaf = key.rpartition(".")
            if prefix not in key_map:
                raise UserError(f"{path}: unexpected key '{key}' in an SKT student checkpoint")
            converted[f"{key_map[prefix]}.{leaf}"] = value
        state = converted
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise UserError(f"{path} does not match a 1/{model.width_div} CSRNet: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise UserError(f"{path}: '{key}' has shape {tuple(value.shape)}, a 1/{model.width_div} CSRNet expects "
                            f"{tuple(own[key].shape)} (wrong width_div?)")
    model.load_state_dict(state)
    return meta


# ----------------------------------------------------------------------------------------------
# MACs
# ----------------------------------------------------------------------------------------------


def count_macs(model: nn.Module, input_shape: tuple[int, int, int, int]) -> int:
    """Multiply-accumulates of the convolutions (and linears) of one forward pass, counted with hooks.

    A conv layer costs ``H_out·W_out·C_out·(C_in/groups)·k_h·k_w`` MACs per sample; biases, ReLU and
    pooling are not counted (the convention of thop/ptflops, which the SKT README's "FLOPs" follow).
    Runs the forward on the meta device, so 2032×2912 costs no memory or time.

    Args:
        model: any module; it is deep-copied to the meta device.
        input_shape: ``(B, C, H, W)``.
    """
    meta_model = copy.deepcopy(model).to("meta")
    total = [0]

    def conv_hook(module: nn.Conv2d, inputs: Any, output: torch.Tensor) -> None:
        kh, kw = module.kernel_size
        total[0] += output.numel() * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module: nn.Linear, inputs: Any, output: torch.Tensor) -> None:
        total[0] += output.numel() * module.in_features

    handles = []
    for module in meta_model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    with torch.no_grad():
        meta_model(torch.empty(input_shape, device="meta"))
    for handle in handles:
        handle.remove()
    return total[0]
