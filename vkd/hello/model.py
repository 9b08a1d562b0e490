"""Classifiers used as HeLlO teachers and students, by architecture name.

``small_cnn`` is vkd's ConvNet; every other name is a torchvision classification model
(``torchvision.models.get_model``) or a timm model (``timm.create_model``), built for any class count. Weights
(``ClassifierConfig.pretrained``): the library's ImageNet weights, read from the local torch hub / Hugging Face cache
only (nothing is downloaded), or a local ``.safetensors`` / torch state dict (``weights_only=True``). When the
weights' classifier head has another class count than the dataset, the head is re-initialised and the log says so;
any other mismatch is a one-line :class:`~vkd.errors.DataError`.

Every classifier takes images in [0, 1] and normalises them itself (the library's mean/std), so teacher, projector and
student see the same tensors.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors.torch import load_file
from torch import nn

from vkd.errors import ConfigError, DataError, UserError
from vkd.hello.config import ClassifierConfig

__all__ = ["Classifier", "SmallCNN", "ArchSpec", "resolve_arch", "build_classifier", "load_state_file",
           "load_weights", "classifier_layer"]

log = logging.getLogger(__name__)

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
    """Wraps a network with its input normalisation: ``forward(images in [0, 1] [B, 3, H, W]) -> logits [B, C]``."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], arch: str = "",
                 num_classes: int | None = None):
        super().__init__()
        self.net = net
        self.arch = arch
        self._num_classes = num_classes
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)

    @property
    def num_classes(self) -> int:
        if self._num_classes is not None:
            return self._num_classes
        last = [m for m in self.net.modules() if isinstance(m, nn.Linear)][-1]
        return int(last.out_features)


# --------------------------------------------------------------------------------------------------------------------
# Architecture names
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchSpec:
    """A resolved architecture: ``library`` (``vkd``, ``torchvision`` or ``timm``) and the name it takes."""

    library: str
    name: str


@functools.cache
def _torchvision_names() -> tuple[str, ...]:
    import torchvision.models as tvm

    return tuple(tvm.list_models(module=tvm))  # classification models only


@functools.cache
def _timm_names() -> tuple[str, ...]:
    import timm

    return tuple(timm.list_models())


def _timm_known(name: str) -> bool:
    import timm

    return bool(timm.is_model(name))


def resolve_arch(arch: str) -> ArchSpec:
    """``small_cnn``, a torchvision name (looked up first) or a timm name; ``torchvision:`` / ``timm:`` prefixes
    pick the library.

    Raises:
        ConfigError: an unknown name, with the close matches among ``torchvision.models.list_models()`` and
            ``timm.list_models()``.

    Examples:
        >>> resolve_arch("mobilenet_v2")
        ArchSpec(library='torchvision', name='mobilenet_v2')
        >>> resolve_arch("timm:resnet18").library
        'timm'
    """
    arch = arch.strip()
    if arch == "small_cnn":
        return ArchSpec("vkd", arch)
    lib, sep, name = arch.partition(":")
    if not sep or lib not in ("torchvision", "timm"):
        lib, name = "", arch
    if lib in ("", "torchvision") and name in _torchvision_names():
        return ArchSpec("torchvision", name)
    if lib in ("", "timm") and _timm_known(name):
        return ArchSpec("timm", name)
    raise ConfigError(unknown_arch_message(arch))


def unknown_arch_message(arch: str) -> str:
    """``unknown architecture 'x'; close matches: ...`` (difflib over the torchvision and timm model lists)."""
    base = arch.split(":", 1)[-1].split(".", 1)[0]
    tv, tm = _torchvision_names(), _timm_names()
    where = {n: "timm" for n in tm} | {n: "torchvision" for n in tv} | {"small_cnn": "vkd"}
    close = difflib.get_close_matches(base, list(where), n=6, cutoff=0.6)
    hint = ", ".join(f"{n} ({where[n]})" for n in close) if close else "none"
    return (f"unknown architecture {arch!r}; close matches: {hint} (names: small_cnn, "
            f"torchvision.models.list_models(), timm.list_models())")


# --------------------------------------------------------------------------------------------------------------------
# Building and weights
# --------------------------------------------------------------------------------------------------------------------


def classifier_layer(net: nn.Module) -> str:
    """Module name of ``net``'s classification layer: timm's ``get_classifier()``, else the last ``nn.Linear`` (or,
    for conv heads such as SqueezeNet's, the last ``nn.Conv2d``)."""
    get = getattr(net, "get_classifier", None)
    if callable(get):
        head = get()
        for name, m in net.named_modules():
            if m is head and name:
                return name
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        names = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    return names[-1] if names else ""


def _set_module(net: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, module)


def _replace_head(net: nn.Module, num_classes: int) -> tuple[str, int]:
    """Swap the classification layer for a fresh one with ``num_classes`` outputs; ``(layer name, old classes)``."""
    name = classifier_layer(net)
    old = net.get_submodule(name)
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
        before = old.out_features
    elif isinstance(old, nn.Conv2d):
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding,
                        bias=old.bias is not None)
        before = old.out_channels
    else:
        raise UserError(f"cannot replace the classifier head '{name}' ({type(old).__name__})")
    _set_module(net, name, new)
    return name, int(before)


def _cache_file(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _torchvision_imagenet(name: str, num_classes: int) -> nn.Module:
    from torchvision.models import get_model, get_model_weights

    try:
        weights = get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        raise UserError(f"torchvision has no pretrained weights for '{name}'") from None
    file = _cache_file(weights.url)
    if not file.is_file():  # never download: the cache or a local file only
        raise UserError(f"ImageNet weights of torchvision {name} are not in the torch hub cache ({file}); place "
                        f"{file.name} there, or set pretrained to a local weights file or '' (random init)")
    net = get_model(name, weights=weights)  # read from the cache file, through the builder's own key remapping
    classes = len(weights.meta.get("categories") or [None] * 1000)
    if classes != num_classes:
        layer, before = _replace_head(net, num_classes)
        log.info("torchvision %s ImageNet weights: %d-class head '%s' replaced by a new %d-class head", name,
                 before, layer, num_classes)
    return net


def _timm_cached_weights(name: str) -> Path | None:
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
    if cfg is None:
        return None
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    hub = cfg.get("hf_hub_id")
    if hub:
        files = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
        for filename in files:
            found = try_to_load_from_cache(hub, filename)
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
    if cfg.get("url"):
        file = _cache_file(cfg["url"])
        if file.is_file():
            return file
    return None


def _timm_imagenet(name: str, num_classes: int) -> nn.Module:
    import timm

    file = _timm_cached_weights(name)
    if file is None:
        raise UserError(f"pretrained weights of timm {name} are not in the Hugging Face or torch hub cache; "
                        "download them once with network access, or set pretrained to a local weights file or ''")
    # timm's loader reads the local file, applies the model's own filters and drops a head of another size
    net = timm.create_model(name, pretrained=True, num_classes=num_classes,
                            pretrained_cfg_overlay={"file": str(file), "source": "timm"})
    classes = int(net.pretrained_cfg.get("num_classes") or num_classes)
    if classes != num_classes:
        log.info("timm %s pretrained weights: %d-class head replaced by a new %d-class head", name, classes,
                 num_classes)
    return net


def build_classifier(cfg: ClassifierConfig, num_classes: int, image_size: int,
                     allow_head_reset: bool = True) -> Classifier:
    """A ``cfg.arch`` classifier for ``num_classes`` classes, initialised as ``cfg.pretrained`` says.

    Torchvision ResNets get, at ≤ 64 px (or ``low_res_stem=True``), a 3×3 stride-1 stem without max-pool (the usual
    CIFAR adaptation); library weights are loaded before, a local weights file after this change.

    Args:
        cfg: architecture and weights.
        num_classes: C.
        image_size: input side S (for the stem choice).
        allow_head_reset: a local weights file with another head size re-initialises the head (else DataError).

    Raises:
        ConfigError: unknown architecture, or an option the architecture does not have.
        UserError: library weights not in the local cache.
        DataError: a weights file that does not fit the architecture (or the class count, without head reset).
    """
    spec = resolve_arch(cfg.arch)
    library = cfg.pretrained == "imagenet"
    if spec.library == "vkd":
        if library:
            raise ConfigError("small_cnn has no ImageNet weights: set pretrained to '' or a local weights file")
        net: nn.Module = SmallCNN(num_classes, cfg.width, cfg.depth, cfg.norm)
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    elif spec.library == "torchvision":
        from torchvision.models import ResNet, get_model

        net = _torchvision_imagenet(spec.name, num_classes) if library else \
            get_model(spec.name, weights=None, num_classes=num_classes)
        low_res = cfg.low_res_stem if cfg.low_res_stem is not None else image_size <= 64
        if isinstance(net, ResNet):
            if low_res:
                net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, 1, 1, bias=False)
                net.maxpool = nn.Identity()
        elif cfg.low_res_stem:
            raise ConfigError(f"model.low_res_stem is only available for torchvision ResNets, not {cfg.arch}")
        mean, std = _IMAGENET_MEAN, _IMAGENET_STD
    else:
        import timm

        if cfg.low_res_stem:
            raise ConfigError(f"model.low_res_stem is only available for torchvision ResNets, not {cfg.arch}")
        net = _timm_imagenet(spec.name, num_classes) if library else \
            timm.create_model(spec.name, pretrained=False, num_classes=num_classes)
        pcfg = getattr(net, "pretrained_cfg", None) or {}
        mean, std = tuple(pcfg.get("mean", _IMAGENET_MEAN)), tuple(pcfg.get("std", _IMAGENET_STD))
    model = Classifier(net, mean, std, arch=cfg.arch, num_classes=num_classes)
    if cfg.pretrained and not library:
        load_weights(model, cfg.pretrained, num_classes, allow_head_reset)
    return model


def load_weights(model: Classifier, path: str | Path, num_classes: int, allow_head_reset: bool = True,
                 what: str = "weights") -> list[str]:
    """Load a local state dict into ``model`` (keys of ``model.net``, or of the wrapper with a ``net.`` prefix).

    Returns:
        The re-initialised head keys (empty when the head fitted).

    Raises:
        DataError: missing / unexpected keys or a shape mismatch outside the head; with ``allow_head_reset=False``
            also a head of another class count (``"<what> <path> predicts K classes but the dataset has C"``).
    """
    state = load_state_file(path)
    target: nn.Module = model if any(k.startswith("net.") for k in state) else model.net
    prefix = "net." if target is model else ""
    own = target.state_dict()
    head = prefix + classifier_layer(model.net) + "."
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    head_keys = [k for k in mismatched if k.startswith(head) and state[k].ndim == own[k].ndim
                 and state[k].shape[1:] == own[k].shape[1:]]
    other = [k for k in mismatched if k not in head_keys]
    arch = model.arch or type(model.net).__name__
    if missing or unexpected or other:
        shapes = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in other[:2])
        raise DataError(f"{what} {path} do not fit a {arch} with {num_classes} classes (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}{', shape mismatch ' + shapes if shapes else ''})")
    if head_keys:
        before = int(state[head_keys[0]].shape[0])
        if not allow_head_reset:
            raise DataError(f"{what} {path} predicts {before} classes but the dataset has {num_classes}")
        log.info("%s %s: %d-class head, the dataset has %d classes: head %s re-initialised", what, path, before,
                 num_classes, head_keys)
        state = {k: v for k, v in state.items() if k not in head_keys}
    target.load_state_dict(state, strict=False)  # only num_batches_tracked / the reset head can be missing here
    return head_keys


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
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise DataError(f"{path} does not contain a state dict")
    return {k.removeprefix("module."): v for k, v in obj.items() if torch.is_tensor(v)}
