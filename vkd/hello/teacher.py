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
from vkd.hello.model import Classifier, build_classifier, load_weights

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
    """Build a ``cfg.arch`` classifier and load the teacher weights ``path`` (frozen, eval mode).

    ``path="imagenet"``: the library's ImageNet weights of ``cfg.arch`` from the local cache (a 1000-class teacher).

    Raises:
        DataError: the checkpoint's class count differs from ``num_classes``, or it does not fit the architecture.
    """
    if str(path) == "imagenet":
        if num_classes != 1000:
            raise DataError(f"teacher.checkpoint=imagenet gives a 1000-class teacher but the dataset has "
                            f"{num_classes} classes")
        library = ClassifierConfig(**{**asdict(cfg), "pretrained": "imagenet", "init": "random",
                                      "init_checkpoint": ""})
        return build_classifier(library, num_classes, image_size).requires_grad_(False).eval()
    bare = ClassifierConfig(**{**asdict(cfg), "pretrained": "", "init": "random", "init_checkpoint": ""})
    model = build_classifier(bare, num_classes, image_size)
    load_weights(model, path, num_classes, allow_head_reset=False, what="teacher")
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
    return [], final, {"checkpoint": cfg.teacher.checkpoint, "model": asdict(cfg.teacher.model)}


def select_snapshots(files: list[str], accuracies: dict[str, float], indices: list[int], min_accuracy: float,
                     where: str = "the teacher run") -> tuple[list[int], list[dict[str, Any]]]:
    """Which weak-teacher snapshots the projector is fitted to.

    Args:
        files: snapshot file names in trajectory order (``teacher-step{N}.safetensors``).
        accuracies: ``{"N": test accuracy}`` recorded by ``hello-teacher`` (``snapshot_test_acc``).
        indices: ``teacher.snapshots`` (empty: all), applied first.
        min_accuracy: ``teacher.min_snapshot_accuracy``: snapshots below it are skipped.

    Returns:
        ``(positions into files, one record per snapshot considered: file, step, test_acc, used)``.

    Raises:
        ConfigError: an index out of range, or no snapshot reaches ``min_accuracy``.
        DataError: ``min_accuracy > 0`` and a snapshot has no recorded accuracy.
    """
    chosen = list(range(len(files)))
    if indices:
        bad = [i for i in indices if not -len(files) <= i < len(files)]
        if bad:
            raise ConfigError(f"teacher.snapshots {bad} out of range: {where} has {len(files)} snapshots")
        chosen = [chosen[i] for i in indices]
    records, keep = [], []
    for pos in chosen:
        step = files[pos].removeprefix("teacher-step").removesuffix(".safetensors")
        acc = accuracies.get(step)
        if acc is None and min_accuracy > 0:
            raise DataError(f"{where} has no recorded test accuracy for snapshot {files[pos]}; "
                            "teacher.min_snapshot_accuracy needs one (retrain with vkd distill hello-teacher)")
        used = acc is None or acc >= min_accuracy
        records.append({"file": files[pos], "step": int(step), "test_acc": acc, "used": used})
        if used:
            keep.append(pos)
    if not keep:
        best = max((r["test_acc"] for r in records), default=0.0)
        raise ConfigError(f"no weak-teacher snapshot of {where} reaches teacher.min_snapshot_accuracy="
                          f"{min_accuracy} (best {best:.3f}); lower it")
    return keep, records


def _teacher_from_run(cfg: HelloConfig, train: LabelledImages) -> tuple[list[Classifier], Classifier, dict[str, Any]]:
    run = Path(cfg.teacher.run) if cfg.teacher.run else Path(cfg.run.output_dir) / "hello-teacher" / "default"
    bundle = load_teacher_run(run, train.num_classes, train.class_names, cfg.data.image_size)
    if bundle.snapshots:
        keep, records = select_snapshots(bundle.meta["snapshot_files"], bundle.meta.get("snapshot_test_acc", {}),
                                         cfg.teacher.snapshots, cfg.teacher.min_snapshot_accuracy, str(run))
        snaps = [bundle.snapshots[i] for i in keep]
        bundle.meta["fit_snapshots"] = records
    else:  # a run without snapshots: the final teacher is the only one
        snaps = [bundle.final]
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
