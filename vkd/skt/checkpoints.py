"""Counting networks from files: vkd runs and exports, and the checkpoints the crowd-counting projects release.

:data:`KEY_LAYOUTS` lists the state-dict layouts vkd can rebuild (which keys, which architecture) and
:data:`FAMILIES` the projects that write them (how a file is recognised, the input normalisation the project
trained with, the pooling rounding, the output scale). :func:`load_counter` reads a file or a run directory,
finds its family and returns a :class:`Counter`: the network on vkd's 1/8 count grid plus those conventions.

Every ``torch.load`` uses ``weights_only=True``; legacy (non-zip) pickles that hold numpy scalars (a
``best_prec1`` saved as ``numpy.float64``) load through an allowlist of exactly those numpy types.

A new family is one :class:`Family` entry (and, for a new architecture, one :class:`KeyLayout`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from vkd.errors import UserError, first_line
from vkd.skt.datasets import IMAGENET_MEAN, IMAGENET_STD, to_tensor
from vkd.skt.export import exported_counter_fields, is_exported_file
from vkd.skt.models import VGG19_HEAD, CSRNet, GridCounter, VGG19Regressor, count_parameters, csrnet_widths
from vkd.skt.runs import load_run

__all__ = [
    "C3_SHHA_MEAN",
    "C3_SHHA_STD",
    "KeyLayout",
    "KEY_LAYOUTS",
    "Family",
    "FAMILIES",
    "Counter",
    "read_checkpoint",
    "OpenedCheckpoint",
    "inspect_checkpoint",
    "load_counter",
    "load_reference_checkpoint",
    "load_vgg16_imagenet",
    "is_vgg_state_file",
]

# C³-Framework's datasets/SHHA/setting.py MEAN_STD: the default for its checkpoints (its CSRNet results are on
# SHHA); other C³ data sets have their own values (README), given with --mean/--std.
C3_SHHA_MEAN = (0.410824894905, 0.370634973049, 0.359682112932)
C3_SHHA_STD = (0.278580576181, 0.26925137639, 0.27156367898)

# Containers that wrap the state dict: CSRNet-pytorch / SKT ``state_dict``, Bayesian-Loss / DM-Count
# ``{epoch}_ckpt.tar`` ``model_state_dict``, C³ ``latest_state.pth`` ``net``.
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "net", "model")
# Wrapper prefixes: C³'s ``CrowdCounter.CCN`` and ``nn.DataParallel``'s ``module.`` (in any nesting).
_PREFIXES = ("CCN.", "module.")


# ----------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------


def _numpy_safe_globals() -> list[Any]:
    """The numpy types a pickled numpy scalar needs: ``multiarray.scalar`` (under its numpy 2 and numpy 1 names)
    and the dtype classes. Nothing else is allowed."""
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    dtype_classes = sorted({type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"}, key=lambda t: t.__name__)
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *dtype_classes]


def read_checkpoint(path: str | Path) -> Any:
    """The object in a ``.safetensors`` file or a ``torch.save`` file (zip or legacy pickle), on the CPU.

    Raises:
        UserError: not found, unreadable, or a pickle that needs classes beyond tensors, containers and numpy
            scalars (it is never unpickled with ``weights_only=False``).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        text = str(err)
        unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if unsupported:
            raise UserError(f"cannot read checkpoint {path}: it pickles a '{unsupported.group(1)}' object, and vkd "
                            f"loads checkpoints with weights_only=True; save its state dict alone "
                            f"(torch.save(model.state_dict(), ...))") from None
        raise UserError(f"cannot read checkpoint {path}: {type(err).__name__}: {first_line(err)}") from None


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _unwrap(raw: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state dict, metadata)`` of a checkpoint object: a plain state dict or one of :data:`_CONTAINER_KEYS`."""
    if not isinstance(raw, dict):
        raise UserError(f"{path} does not hold a state dict (it holds a {type(raw).__name__})")
    meta = {str(k): _plain(v) for k, v in raw.items() if isinstance(v, (str, int, float, bool, np.generic))
            or v is None}
    if any(isinstance(v, torch.Tensor) for v in raw.values()):
        state = raw
    else:
        inner = next((raw[k] for k in _CONTAINER_KEYS if isinstance(raw.get(k), dict)), None)
        if inner is None:
            raise UserError(f"{path} holds no tensors: neither a state dict nor a dict with "
                            f"{', '.join(repr(k) for k in _CONTAINER_KEYS)}")
        state = inner
    return {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}, meta


def _strip_prefixes(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Remove the wrapper prefixes every key shares (``CCN.``, ``module.``, nested); returns them too."""
    stripped = ""
    while state:
        prefix = next((p for p in _PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        stripped += prefix
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state, stripped


# ----------------------------------------------------------------------------------------------
# Key layouts: which keys, which architecture
# ----------------------------------------------------------------------------------------------


def _student_key_map() -> dict[str, str]:
    """Official SKT student modules ``conv{stage}_{k}.0`` → vkd CSRNet modules (``frontend.N``, ``backend.N``)."""
    mapping: dict[str, str] = {}
    index = 0
    for stage, depth in enumerate((2, 2, 3, 3)):
        for k in range(depth):
            mapping[f"conv{stage}_{k}.0"] = f"frontend.{index}"
            index += 2
        index += 1  # the pool after the stage (none after the last, which is never used)
    for k in range(6):
        mapping[f"conv4_{k}.0"] = f"backend.{2 * k}"
    mapping["conv5_0"] = "output_layer"
    return mapping


def _from_student_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    key_map = _student_key_map()
    out = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in key_map:
            out[f"{key_map[prefix]}.{leaf}"] = value
    return out


def _check_shapes(model: nn.Module, state: dict[str, torch.Tensor], source: str, what: str) -> None:
    for key, target in model.state_dict().items():
        if key not in state:
            raise UserError(f"{source}: key '{key}' of {what} is missing")
        if tuple(state[key].shape) != tuple(target.shape):
            raise UserError(f"{source}: '{key}' has shape {tuple(state[key].shape)}, {what} expects "
                            f"{tuple(target.shape)}")


def _width_div(widths: tuple[int, ...], source: str, arch: str) -> int:
    div = next((d for d in range(1, 65) if csrnet_widths(d) == widths), None)
    if div is None:
        raise UserError(f"{source}: stage widths {widths} are not those of a 1/n {arch} (64, 128, 256, 512 / n)")
    return div


def _build_csrnet(state: dict[str, torch.Tensor], ceil_mode: bool, source: str) -> tuple[nn.Module, str]:
    # conv1_1, conv2_1, conv3_1 and conv4_1 of the VGG-16 frontend give the four stage widths
    widths = tuple(int(state[f"frontend.{i}.weight"].shape[0]) for i in (0, 5, 10, 17))
    div = _width_div(widths, source, "CSRNet")
    model = CSRNet(div, ceil_mode=ceil_mode)
    _check_shapes(model, state, source, f"a 1/{div} CSRNet")
    model.load_state_dict(state)
    return model, f"CSRNet 1/{div} ({count_parameters(model):,} parameters, {'ceil' if ceil_mode else 'floor'} pooling)"


def _build_vgg19(style: str) -> Callable[[dict[str, torch.Tensor], bool, str], tuple[nn.Module, str]]:
    def build(state: dict[str, torch.Tensor], ceil_mode: bool, source: str) -> tuple[nn.Module, str]:
        # conv1_1, conv2_1, conv3_1, conv4_1 of VGG-19 (torchvision indices) and the two head convs
        widths = tuple(int(state[f"features.{i}.weight"].shape[0]) for i in (0, 5, 10, 19))
        head = (int(state["reg_layer.0.weight"].shape[0]), int(state["reg_layer.2.weight"].shape[0]))
        div = _width_div(widths, source, "VGG-19")
        model = VGG19Regressor(widths, head, style)  # type: ignore[arg-type]
        _check_shapes(model, state, source, f"a {style} VGG-19 regressor with widths {widths} and head {head}")
        model.load_state_dict(state)
        expected_head = tuple(int(np.floor(h / div + 0.5)) for h in VGG19_HEAD)
        width = f"1/{div}" if head == expected_head else f"widths {widths}, head {head}"
        return model, f"VGG-19 regressor {width} ({count_parameters(model):,} parameters)"

    return build


@dataclass(frozen=True)
class KeyLayout:
    """One state-dict layout.

    Attributes:
        title: how messages name it.
        keys: every key of the layout, in module order (they do not depend on the width).
        ignore: key prefixes that may be present and are dropped (training-only modules).
        convert: the layout's keys → the keys of the module :attr:`build` makes.
        build: ``(state, ceil_mode, source) → (module with the weights, architecture description)``.
    """

    title: str
    keys: tuple[str, ...]
    build: Callable[[dict[str, torch.Tensor], bool, str], tuple[nn.Module, str]]
    ignore: tuple[str, ...] = ()
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = lambda state: state


def _keys(module: nn.Module) -> tuple[str, ...]:
    return tuple(module.state_dict())


# the smallest widths build the key lists in microseconds; keys do not depend on widths
_TINY = (4, 8, 16, 32)
KEY_LAYOUTS: dict[str, KeyLayout] = {
    # CSRNet-pytorch, the SKT teacher, C³-Framework (after its CCN. prefix) and vkd exports
    "csrnet": KeyLayout("CSRNet (frontend.*, backend.*, output_layer.*)", _keys(CSRNet(16)), _build_csrnet),
    # the official SKT student: conv{stage}_{k}.0.*, conv5_0.*, plus training-only transform* adapters
    "skt-student": KeyLayout("SKT student (conv0_0.0.* ... conv5_0.*)",
                             tuple(f"{m}.{leaf}" for m in _student_key_map() for leaf in ("weight", "bias")),
                             _build_csrnet, ignore=("transform",), convert=_from_student_keys),
    "dm-count": KeyLayout("DM-Count VGG-19 (features.*, reg_layer.0/2, density_layer.0)",
                          _keys(VGG19Regressor(_TINY, (8, 4), "dm-count")), _build_vgg19("dm-count")),
    "bayesian-loss": KeyLayout("Bayesian-Loss VGG-19 (features.*, reg_layer.0/2/4)",
                               _keys(VGG19Regressor(_TINY, (8, 4), "bayesian-loss")), _build_vgg19("bayesian-loss")),
}


@dataclass(frozen=True)
class OpenedCheckpoint:
    """A checkpoint file, opened: its state dict without wrapper prefixes, and what identifies its family."""

    path: Path
    state: dict[str, torch.Tensor]
    prefix: str
    meta: dict[str, Any]
    layout: str | None


def _match_layout(state: dict[str, torch.Tensor]) -> str | None:
    for name, layout in KEY_LAYOUTS.items():
        present = {k for k in state if not k.startswith(layout.ignore)}
        if present == set(layout.keys):
            return name
    return None


def _closest_layout(state: dict[str, torch.Tensor]) -> tuple[str, str]:
    """``(layout title, first mismatching key with why)`` of the layout sharing most keys with ``state``."""
    def share(layout: KeyLayout) -> float:
        return sum(k in state for k in layout.keys) / len(layout.keys)

    name = max(KEY_LAYOUTS, key=lambda n: share(KEY_LAYOUTS[n]))  # max keeps the first of equals
    layout = KEY_LAYOUTS[name]
    missing = next((k for k in layout.keys if k not in state), None)
    if missing is not None:
        return layout.title, f"'{missing}' (missing)"
    extra = next((k for k in state if k not in layout.keys and not k.startswith(layout.ignore)), "")
    return layout.title, f"'{extra}' (not in that layout)"


def inspect_checkpoint(path: str | Path) -> OpenedCheckpoint:
    """Open a checkpoint and match its keys against :data:`KEY_LAYOUTS` (``layout`` is ``None`` if none fits)."""
    path = Path(path).expanduser()
    state, meta = _unwrap(read_checkpoint(path), path)
    state, prefix = _strip_prefixes(state)
    return OpenedCheckpoint(path, state, prefix, meta, _match_layout(state))


def _unknown_layout(found: OpenedCheckpoint) -> UserError:
    if not found.state:
        return UserError(f"{found.path}: the state dict is empty")
    title, key = _closest_layout(found.state)
    return UserError(f"{found.path}: unknown checkpoint layout ({len(found.state)} tensors, first key "
                     f"'{next(iter(found.state))}'); closest known: {title}, first mismatching key {key}")


# ----------------------------------------------------------------------------------------------
# Families: who writes a layout, and with which conventions
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """A project whose checkpoints vkd counts with.

    Attributes:
        title: its name in messages and the README.
        detect: whether an opened checkpoint is this family's (tried in :data:`FAMILIES` order).
        mean: input normalisation mean (RGB, on [0, 1] pixels) the project trained with.
        std: input normalisation std.
        normalisation: the name printed with them.
        ceil_mode: max-pool rounding of the project's network (weights do not depend on it, sizes do).
        log_para: densities were trained multiplied by this (count = Σ density / log_para).
        out_stride: 8 (density at 1/8) or 1 (up-sampled to full resolution).
        min_size: smallest input side the network accepts.
        output: how the output is read, for the printed description.
    """

    title: str
    detect: Callable[[OpenedCheckpoint], bool]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    normalisation: str = "ImageNet"
    ceil_mode: bool = False
    log_para: float = 1.0
    out_stride: int = 8
    min_size: int = 8
    output: str = "density at 1/8, count = sum"


# tried in this order: the first whose detect() is true names the family
FAMILIES: dict[str, Family] = {
    # C³'s CrowdCounter keeps the network in .CCN (.CCN.module under DataParallel); its CSRNet ends with
    # F.upsample(scale_factor=8) (nearest) and learns densities × LOG_PARA (100 in every setting.py)
    "c3-framework": Family("C³-Framework CSRNet", lambda c: c.layout == "csrnet" and "CCN." in c.prefix,
                           C3_SHHA_MEAN, C3_SHHA_STD, "C³-Framework SHHA", log_para=100.0, out_stride=1,
                           output="density up-sampled ×8 to full resolution, count = sum / LOG_PARA"),
    # vkd's own exports (export/model.safetensors, with model.json beside it)
    "vkd": Family("vkd export", lambda c: c.layout == "csrnet" and c.path.suffix == ".safetensors", ceil_mode=True),
    # chen-judge/SKT: students with conv{s}_{k} keys, teachers in CSRNet keys with mae_best_prec1; ceil pooling
    "skt": Family("SKT (official)", lambda c: c.layout == "skt-student" or (c.layout == "csrnet"
                                                                            and "mae_best_prec1" in c.meta),
                  ceil_mode=True),
    # leeyeehoo/CSRNet-pytorch: {'epoch', 'arch', 'state_dict', 'best_prec1', 'optimizer'}; floor pooling
    "csrnet-pytorch": Family("CSRNet-pytorch", lambda c: c.layout == "csrnet"),
    # cvlab-stonybrook/DM-Count and ZhihengCV/Bayesian-Crowd-Counting: VGG-19, 4 floor pools, bilinear ×2
    "dm-count": Family("DM-Count", lambda c: c.layout == "dm-count", min_size=16),
    "bayesian-loss": Family("Bayesian Loss", lambda c: c.layout == "bayesian-loss", min_size=16),
}


@dataclass
class Counter:
    """A counting network with the conventions of the family that trained it.

    Attributes:
        model: ``[B, 3, H, W]`` normalised with ``mean``/``std`` → people per cell ``[B, 1, ⌈H/8⌉, ⌈W/8⌉]``,
            in eval mode on the CPU.
        family: a key of :data:`FAMILIES`, or ``"vkd-run"``.
        title: the family's name.
        arch: the architecture inferred from the tensors.
        mean: applied input normalisation mean (RGB).
        std: applied input normalisation std.
        normalisation: where ``mean``/``std`` come from (``"ImageNet"``, ``"--mean/--std"``, ...).
        log_para: the density scale divided out (1 except C³-Framework).
        output: how the output is read.
        source: the file or run directory.
        tile_size: images larger than this are tiled (a run's ``eval.tile_size``; 512 for files).
        tile_overlap: tile overlap in pixels.
        min_size: smallest side accepted.
        meta: the checkpoint's metadata (``epoch``, ``best_prec1``, ...).
    """

    model: nn.Module
    family: str
    title: str
    arch: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    normalisation: str
    source: str
    log_para: float = 1.0
    output: str = "density at 1/8, count = sum"
    tile_size: int = 512
    tile_overlap: int = 0
    min_size: int = 8
    meta: dict[str, Any] = field(default_factory=dict)

    def to_tensor(self, image: np.ndarray) -> torch.Tensor:
        """``[H, W, 3]`` uint8 → ``[3, H, W]`` normalised as this network expects."""
        return to_tensor(image, self.mean, self.std)

    def input_text(self) -> str:
        """The normalisation applied: ``"ImageNet: mean (0.485, 0.456, 0.406) std (0.229, 0.224, 0.225)"``."""
        mean = ", ".join(f"{v:.3f}" for v in self.mean)
        std = ", ".join(f"{v:.3f}" for v in self.std)
        return f"{self.normalisation}: mean ({mean}) std ({std})"

    def describe(self) -> str:
        """One line: family, architecture, the normalisation applied and how the output is read."""
        scale = f" ({self.log_para:g})" if self.log_para != 1.0 else ""
        return f"{self.title}, {self.arch}; input normalisation {self.input_text()}; output: {self.output}{scale}"


def _triple(value: str | tuple[float, ...] | None, name: str) -> tuple[float, float, float] | None:
    if value is None:
        return None
    try:
        parts = tuple(float(v) for v in (value.replace(",", " ").split() if isinstance(value, str) else value))
    except ValueError:
        raise UserError(f"{name} takes three numbers R,G,B, got {value!r}") from None
    if len(parts) != 3 or not all(np.isfinite(parts)):
        raise UserError(f"{name} takes three finite numbers R,G,B, got {value!r}")
    return parts  # type: ignore[return-value]


def _export_ceil_mode(path: Path, default: bool) -> bool:
    """``ceil_mode`` recorded in a vkd export's ``model.json`` next to the weights."""
    info = path.with_suffix(".json")
    try:
        return bool(json.loads(info.read_text()).get("ceil_mode", default)) if info.is_file() else default
    except (OSError, ValueError, AttributeError):
        return default


def load_counter(source: str | Path, mean: str | tuple[float, ...] | None = None,
                 std: str | tuple[float, ...] | None = None, log_para: float | None = None) -> Counter:
    """The counting network of a vkd run directory or of a checkpoint file of any family in :data:`FAMILIES`.

    Architecture and width come from the tensor shapes; the family's normalisation, pooling rounding and output
    scale are applied unless overridden.

    Args:
        source: a ``skt`` / ``skt-teacher`` run directory, a ``.pth``, ``.pth.tar``, ``.tar`` or
            ``.safetensors`` file, or an ``.onnx`` / TorchScript file of ``vkd export skt``
            (:func:`vkd.skt.export.exported_counter_fields`).
        mean: override of the input mean, ``"R,G,B"``.
        std: override of the input std, ``"R,G,B"``.
        log_para: override of C³-Framework's ``LOG_PARA`` (refused for other families).

    Raises:
        UserError: nothing there, an unreadable file, an unknown key layout (naming the closest known layout
            and the first key that does not fit it), or tensors of inconsistent shapes.

    Examples:
        >>> counter = load_counter("PartAmodel_best.pth.tar")  # doctest: +SKIP
        >>> counter.describe()  # doctest: +SKIP
        'CSRNet-pytorch, CSRNet 1/1 (16,263,489 parameters, floor pooling); input normalisation ImageNet: ...'
    """
    path = Path(source).expanduser()
    mean_o, std_o = _triple(mean, "--mean"), _triple(std, "--std")
    if std_o is not None and min(std_o) <= 0:
        raise UserError(f"--std must be positive, got {std}")
    if log_para is not None and not (np.isfinite(log_para) and log_para > 0):
        raise UserError(f"--log-para must be a positive number, got {log_para}")
    if is_exported_file(path):  # vkd export skt: the network in ONNX Runtime / TorchScript, the rest recorded
        counter = Counter(**exported_counter_fields(path, log_para))
        family = FAMILIES.get(counter.family)
    elif path.is_dir():
        cfg, model = load_run(path)
        counter = Counter(GridCounter(model).eval(), "vkd-run", "vkd run", f"CSRNet 1/{model.width_div} "
                          f"({count_parameters(model):,} parameters)", IMAGENET_MEAN, IMAGENET_STD, "ImageNet",
                          str(path), tile_size=cfg.eval.tile_size, tile_overlap=cfg.eval.tile_overlap,
                          min_size=cfg.data.min_size)
        family = None
    else:
        found = inspect_checkpoint(path)
        if "CCN." in found.prefix and found.layout != "csrnet":
            raise UserError(f"{path}: a C³-Framework checkpoint of a network other than CSRNet "
                            f"(first key '{next(iter(found.state), '')}'); vkd models C³'s CSRNet only")
        name = next((n for n, fam in FAMILIES.items() if found.layout and fam.detect(found)), None)
        if name is None or found.layout is None:
            raise _unknown_layout(found)
        family = FAMILIES[name]
        layout = KEY_LAYOUTS[found.layout]
        ceil_mode = _export_ceil_mode(path, family.ceil_mode) if name == "vkd" else family.ceil_mode
        net, arch = layout.build(layout.convert(found.state), ceil_mode, str(path))
        if family.out_stride == 1:
            net = nn.Sequential(net, nn.Upsample(scale_factor=8, mode="nearest"))  # C³'s F.upsample(x, 8)
        scale = log_para if log_para is not None else family.log_para
        counter = Counter(GridCounter(net, 1.0 / scale, family.out_stride).eval(), name, family.title, arch,
                          family.mean, family.std, family.normalisation, str(path), log_para=scale,
                          output=family.output, min_size=family.min_size, meta=found.meta)
    if log_para is not None and (family is None or family.log_para == 1.0):
        raise UserError(f"--log-para applies to C³-Framework checkpoints only; {path} is a {counter.title} model")
    overridden = [flag for flag, value in (("--mean", mean_o), ("--std", std_o)) if value is not None]
    if overridden:
        counter.mean, counter.std = mean_o or counter.mean, std_o or counter.std
        counter.normalisation = f"{'/'.join(overridden)} (family default: {counter.normalisation})"
    return counter


# ----------------------------------------------------------------------------------------------
# Weights into a given CSRNet: teachers and initialisations
# ----------------------------------------------------------------------------------------------


def load_reference_checkpoint(model: CSRNet, path: str | Path) -> dict[str, Any]:
    """Load a CSRNet-pytorch / SKT teacher, an official SKT student or a vkd ``.safetensors`` into ``model``.

    Teacher dicts carry ``state_dict`` with ``frontend.N.*``, ``backend.N.*``, ``output_layer.*`` keys
    (``module.`` prefixes are removed); SKT student dicts carry ``conv0_0.0.weight`` … ``conv5_0.weight`` plus
    ``transform*`` adapter keys, which are dropped (they are training-only).

    Returns:
        The non-tensor metadata of the checkpoint (``epoch``, ``arch``, ``mae_best_prec1``, ...).

    Raises:
        UserError: another architecture (DM-Count, Bayesian Loss), a C³-Framework file (its densities are
            scaled by ``LOG_PARA``), an unknown layout, or a CSRNet of another width.
    """
    found = inspect_checkpoint(path)
    if found.layout is None:
        raise _unknown_layout(found)
    if found.layout not in ("csrnet", "skt-student"):
        raise UserError(f"{found.path} is a {KEY_LAYOUTS[found.layout].title} checkpoint; a CSRNet is needed here")
    if "CCN." in found.prefix:
        raise UserError(f"{found.path} is a C³-Framework checkpoint (densities × LOG_PARA at full resolution); "
                        f"count with it (vkd count --weights), it is not a CSRNet in people per 1/8 cell")
    state = KEY_LAYOUTS[found.layout].convert(found.state)
    own = model.state_dict()
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise UserError(f"{found.path}: '{key}' has shape {tuple(value.shape)}, a 1/{model.width_div} CSRNet "
                            f"expects {tuple(own[key].shape)} (wrong width_div?)")
    model.load_state_dict(state)
    return found.meta


# ----------------------------------------------------------------------------------------------
# ImageNet VGG-16 weights for the teacher's frontend
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
    state = read_checkpoint(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{path} does not hold a state dict")
    _copy_vgg_features(model, state, str(path))


def is_vgg_state_file(path: Path) -> bool:
    """Whether ``path`` is a VGG-16 state dict (``features.*`` keys, no counting head) rather than a whole
    CSRNet / SKT / DM-Count checkpoint."""
    state = read_checkpoint(path) if path.is_file() else {}
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        return False
    keys = [str(k).removeprefix("module.") for k in state]
    return any(k.startswith("features.") for k in keys) and not any(k.startswith("reg_layer.") for k in keys)
