"""Classifiers used as HeLlO teachers and students, and the teacher artefact format.

Every classifier takes images in [0, 1] and normalises them itself, so teacher, projector and student
see the same tensors. A ``hello-teacher`` run directory holds::

    teacher.safetensors            final weights
    teacher.json                   architecture, class names (index order), image size, test accuracy
    teachers/teacher-step{N}.safetensors   weak-teacher snapshots along training (the spec's trajectory)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from vkd.errors import ConfigError, DataError, UserError
from vkd.hello.config import ClassifierConfig, HelloConfig
from vkd.hello.data import LabelledImages

__all__ = ["Classifier", "SmallCNN", "build_classifier", "save_teacher", "load_teacher", "load_teacher_run",
           "load_state_file", "TeacherBundle", "TEACHER_SOURCES", "resolve_teachers"]

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


def save_teacher(model: Classifier, path: Path, meta: dict[str, Any]) -> None:
    """Write ``model``'s weights as safetensors at ``path`` (and ``meta`` as ``<stem>.json`` if given)."""

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    if meta:
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2))


def load_teacher(path: str | Path, cfg: ClassifierConfig, num_classes: int, image_size: int) -> Classifier:
    """Build a ``cfg`` classifier and load weights from ``path`` (frozen, eval mode).

    Raises:
        DataError: the checkpoint's class count differs from ``num_classes``, or it does not fit.
    """
    state = load_state_file(path)
    fc = [k for k in state if k.endswith("fc.weight")]
    if fc and state[fc[-1]].shape[0] != num_classes:
        raise DataError(f"teacher {path} predicts {state[fc[-1]].shape[0]} classes but the dataset has "
                        f"{num_classes}")
    init_free = ClassifierConfig(**{**asdict(cfg), "init": "random", "init_checkpoint": ""})
    model = build_classifier(init_free, num_classes, image_size)
    target = model if any(k.startswith("net.") for k in state) else model.net
    missing, unexpected = target.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DataError(f"teacher checkpoint {path} does not fit a {cfg.arch} "
                        f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    return model.requires_grad_(False).eval()


class TeacherBundle:
    """The final teacher plus the weak-teacher snapshots of a ``hello-teacher`` run."""

    def __init__(self, final: Classifier, snapshots: list[Classifier], meta: dict[str, Any]):
        self.final = final
        self.snapshots = snapshots
        self.meta = meta


def load_teacher_run(run_dir: str | Path, num_classes: int, class_names: tuple[str, ...] | None = None,
                     image_size: int | None = None) -> TeacherBundle:
    """Load a ``hello-teacher`` run directory.

    Raises:
        UserError: the directory has no exported teacher.
        DataError: class count (or class names) differ from the dataset's.
    """
    run_dir = Path(run_dir)
    meta_path = run_dir / "teacher.json"
    if not meta_path.is_file():
        raise UserError(f"no trained teacher in {run_dir} (teacher.json missing); run `vkd distill hello-teacher` "
                        "first or set teacher.run / teacher.checkpoint")
    meta = json.loads(meta_path.read_text())
    if int(meta["num_classes"]) != num_classes:
        raise DataError(f"teacher in {run_dir} has {meta['num_classes']} classes but the dataset has {num_classes}")
    if class_names is not None and list(meta.get("class_names", class_names)) != list(class_names):
        raise DataError(f"teacher in {run_dir} was trained with a different class order/names than the dataset")
    if image_size is not None and int(meta.get("image_size", image_size)) != image_size:
        raise DataError(f"teacher in {run_dir} was trained at {meta['image_size']} px but data.image_size is "
                        f"{image_size}")
    cfg = ClassifierConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["model"].items()})
    size = int(meta.get("image_size", image_size or 32))
    final = load_teacher(run_dir / "teacher.safetensors", cfg, num_classes, size)
    snaps = sorted((run_dir / "teachers").glob("teacher-step*.safetensors"),
                   key=lambda p: int(p.stem.split("step")[-1]))
    snapshots = [load_teacher(p, cfg, num_classes, size) for p in snaps]
    meta["snapshot_files"] = [p.name for p in snaps]
    return TeacherBundle(final, snapshots, meta)


def _teacher_from_checkpoint(cfg: HelloConfig, train: LabelledImages
                             ) -> tuple[list[Classifier], Classifier, dict[str, Any]]:
    final = load_teacher(cfg.teacher.checkpoint, cfg.teacher.model, train.num_classes, cfg.data.image_size)
    return [], final, {"checkpoint": cfg.teacher.checkpoint}


def _teacher_from_run(cfg: HelloConfig, train: LabelledImages) -> tuple[list[Classifier], Classifier, dict[str, Any]]:
    run = Path(cfg.teacher.run) if cfg.teacher.run else Path(cfg.run.output_dir) / "hello-teacher" / "default"
    bundle = load_teacher_run(run, train.num_classes, train.class_names, cfg.data.image_size)
    snaps = bundle.snapshots or [bundle.final]
    if cfg.teacher.snapshots:
        bad = [i for i in cfg.teacher.snapshots if not -len(snaps) <= i < len(snaps)]
        if bad:
            raise ConfigError(f"teacher.snapshots {bad} out of range: {run} has {len(snaps)} snapshots")
        snaps = [snaps[i] for i in cfg.teacher.snapshots]
    fit = [] if cfg.teacher.sampling == "final_only" else snaps
    return fit, bundle.final, bundle.meta


# where the teacher comes from -> loader; a new source of teachers is one entry here
TEACHER_SOURCES: dict[str, Callable[[HelloConfig, LabelledImages],
                                    tuple[list[Classifier], Classifier, dict[str, Any]]]] = {
    "checkpoint": _teacher_from_checkpoint,  # teacher.checkpoint: one weights file (timm / torchvision / vkd)
    "run": _teacher_from_run,  # teacher.run: a `vkd distill hello-teacher` run with its weak-teacher snapshots
}


def resolve_teachers(cfg: HelloConfig, train: LabelledImages) -> tuple[list[Classifier], Classifier, dict[str, Any]]:
    """(teachers used for fitting, final teacher, teacher metadata) as configured in ``cfg.teacher``: a checkpoint
    file when ``teacher.checkpoint`` is set, else a ``hello-teacher`` run."""
    return TEACHER_SOURCES["checkpoint" if cfg.teacher.checkpoint else "run"](cfg, train)
