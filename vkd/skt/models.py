"""CSRNet and its 1/n-width students (Li et al., CVPR 2018; Liu et al., ACM MM 2020 §1-2 of the spec), the
VGG-19 regression counter of Bayesian Loss / DM-Count (Ma et al., ICCV 2019; Wang et al., NeurIPS 2020), and
:class:`GridCounter`, which puts any of them on vkd's count grid.

One CSRNet class covers the teacher (``width_div=1``) and the students: both have the same ``Sequential``
layout, so the six feature taps sit at the same indices (``frontend[1, 4, 9, 16]``, ``backend[1, 7]``) and a
CSRNet-pytorch checkpoint loads by key. The 1×1 adapters of the distiller are **not** part of the model: an
exported 1/4 student has exactly 1,017,681 parameters. Checkpoint files are read by :mod:`vkd.skt.checkpoints`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CSRNet",
    "VGG19Regressor",
    "GridCounter",
    "VGG19_DEPTHS",
    "VGG19_HEAD",
    "TAP_FRONTEND",
    "TAP_BACKEND",
    "TEACHER_WIDTHS",
    "csrnet_widths",
    "make_adapters",
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


def _vgg_layers(stage_widths: Sequence[int], depths: Sequence[int], in_channels: int,
                ceil_mode: bool) -> list[nn.Module]:
    """VGG stages of ``depths[i]`` 3×3 Conv+ReLU of ``stage_widths[i]`` channels, a 2×2 max-pool between stages.

    Indices match torchvision's ``vgg*.features`` (and CSRNet's ``frontend``): conv ``k`` of a stage is module
    ``2k`` after the stage start, each pool one module.
    """
    layers: list[nn.Module] = []
    cin = in_channels
    for stage, (width, depth) in enumerate(zip(stage_widths, depths, strict=True)):
        if stage:
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=ceil_mode))
        for _ in range(depth):
            layers += [nn.Conv2d(cin, int(width), 3, padding=1), nn.ReLU(inplace=False)]
            cin = int(width)
    return layers


def _frontend_layers(widths: tuple[int, ...], in_channels: int, ceil_mode: bool) -> list[nn.Module]:
    # VGG-16 up to conv4_3 without its 4th pool: 2, 2, 3, 3 convs, 23 modules (indices 0..22)
    return _vgg_layers(widths, (2, 2, 3, 3), in_channels, ceil_mode)


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


# VGG-19 (torchvision configuration "E") stage depths; the counter keeps all 5 stages but not the last pool.
VGG19_DEPTHS = (2, 2, 4, 4, 4)
# Full-width regression head of Bayesian Loss / DM-Count: Conv 512→256, Conv 256→128 (3×3), then 128→1 (1×1).
VGG19_HEAD = (256, 128)


class VGG19Regressor(nn.Module):
    """The Bayesian-Loss / DM-Count counter: VGG-19 features to conv5_4, bilinear ×2, a small regression head.

    ``features`` are torchvision's ``vgg19().features[:36]`` (16 Conv+ReLU, 4 floor-mode max-pools, no 5th pool),
    so their output is at 1/16; a bilinear ×2 (``align_corners=True``, what ``F.upsample_bilinear`` did) brings it
    to 1/8. The head differs between the two projects, and so do the checkpoint keys:

    * ``"dm-count"``: ``reg_layer`` = Conv(c, h1, 3)+ReLU, Conv(h1, h2, 3)+ReLU; ``density_layer`` =
      Conv(h2, 1, 1)+ReLU (DM-Count also returns a normalised copy of the density; only the density is kept).
    * ``"bayesian-loss"``: ``reg_layer`` = the same two convs + ReLU, then Conv(h2, 1, 1); the output is its
      absolute value.

    Args:
        widths: stage widths ``(c0, c1, c2, c3)``; stage 5 has ``c3`` channels like stage 4. Full width is
            ``(64, 128, 256, 512)``; the SKT "1/4-BL" student divides every width, head included, by 4.
        head: ``(h1, h2)`` widths of the regression head (``(256, 128)`` at full width).
        style: ``"dm-count"`` or ``"bayesian-loss"``.

    Forward:
        ``x [B, 3, H, W]`` (ImageNet-normalised) → density ``[B, 1, 2⌊H/16⌋, 2⌊W/16⌋]`` (people per cell).
    """

    def __init__(self, widths: Sequence[int] = (64, 128, 256, 512), head: Sequence[int] = VGG19_HEAD,
                 style: Literal["dm-count", "bayesian-loss"] = "dm-count"):
        super().__init__()
        if style not in ("dm-count", "bayesian-loss"):
            raise ValueError(f"style must be 'dm-count' or 'bayesian-loss', got {style!r}")
        c0, c1, c2, c3 = (int(c) for c in widths)
        h1, h2 = (int(h) for h in head)
        self.style = style
        self.widths = (c0, c1, c2, c3)
        self.head = (h1, h2)
        self.features = nn.Sequential(*_vgg_layers((c0, c1, c2, c3, c3), VGG19_DEPTHS, 3, ceil_mode=False))
        regression: list[nn.Module] = [nn.Conv2d(c3, h1, 3, padding=1), nn.ReLU(inplace=False),
                                       nn.Conv2d(h1, h2, 3, padding=1), nn.ReLU(inplace=False)]
        if style == "bayesian-loss":
            self.reg_layer = nn.Sequential(*regression, nn.Conv2d(h2, 1, 1))
        else:
            self.reg_layer = nn.Sequential(*regression)
            self.density_layer = nn.Sequential(nn.Conv2d(h2, 1, 1), nn.ReLU(inplace=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"x must be [B, C, H, W], got shape {tuple(x.shape)}")
        x = F.interpolate(self.features(x), scale_factor=2, mode="bilinear", align_corners=True)
        if self.style == "bayesian-loss":
            return self.reg_layer(x).abs()
        return self.density_layer(self.reg_layer(x))


class GridCounter(nn.Module):
    """A density network seen as vkd's counter: people per cell on the ``⌈H/8⌉ × ⌈W/8⌉`` grid.

    Community networks differ in output size and scale: floor-mode pooling gives ``⌊H/8⌋`` rows (CSRNet-pytorch)
    or ``2⌊H/16⌋`` (VGG-19 counters), C³-Framework's CSRNet up-samples its map to full resolution and was trained
    on densities multiplied by ``LOG_PARA``. This wrapper sum-pools a full-resolution output back to 1/8 (which
    keeps the count), multiplies by ``gain`` (``1 / LOG_PARA``) and zero-pads the bottom/right cells the network
    did not produce, so :func:`vkd.skt.evaluate.predict` and its tiling work unchanged for every family.

    Args:
        net: ``[B, 3, H, W] → [B, 1, h, w]`` with ``h ≤ ⌈H/stride⌉``.
        gain: factor applied to the output (counts = Σ output × gain).
        out_stride: 8 when the network predicts at 1/8, 1 when at full resolution.

    Forward:
        ``x [B, 3, H, W]`` normalised as the network was trained → ``[B, 1, ⌈H/8⌉, ⌈W/8⌉]``.
    """

    def __init__(self, net: nn.Module, gain: float = 1.0, out_stride: Literal[1, 8] = 8):
        super().__init__()
        if out_stride not in (1, 8):
            raise ValueError(f"out_stride must be 1 or 8, got {out_stride}")
        self.net = net
        self.gain = float(gain)
        self.out_stride = int(out_stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        d = self.net(x)
        if self.out_stride == 1:
            h, w = d.shape[-2:]
            # sum over 8×8 blocks (zero-padded at the border): the count is unchanged
            d = F.avg_pool2d(F.pad(d, (0, (-w) % 8, 0, (-h) % 8)), 8) * 64.0
        if self.gain != 1.0:
            d = d * self.gain
        gh, gw = -(-H // 8), -(-W // 8)
        h, w = d.shape[-2:]
        if h > gh or w > gw:
            raise ValueError(f"density [{h}, {w}] is larger than the 1/8 grid [{gh}, {gw}] of a {H}x{W} input")
        return F.pad(d, (0, gw - w, 0, gh - h)) if (h, w) != (gh, gw) else d


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


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
