"""HeLlO teachers: the teacher artefact format, its sources table, and loading teachers for a run.

A ``hello-teacher`` run directory holds::

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

from safetensors.torch import save_file

from vkd.errors import ConfigError, DataError, UserError
from vkd.hello.config import ClassifierConfig, HelloConfig
from vkd.hello.data import LabelledImages
from vkd.hello.model import Classifier, build_classifier, load_state_file

__all__ = ["save_teacher", "load_teacher", "load_teacher_run", "TeacherBundle", "TEACHER_SOURCES",
           "resolve_teachers"]

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
