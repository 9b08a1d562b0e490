"""The frozen CSRNet teacher of ``vkd distill skt``: where ``teacher.run`` points, and how each kind is loaded.

:data:`TEACHER_KINDS` is the one table of teacher kinds; :func:`load_teacher` resolves a config's teacher spec
through it. A new kind is one ``detect`` / ``build`` pair there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vkd.errors import UserError
from vkd.skt.checkpoints import load_reference_checkpoint
from vkd.skt.config import SKTConfig, TeacherRefConfig
from vkd.skt.models import CSRNet
from vkd.skt.runs import load_run

__all__ = ["TeacherKind", "TEACHER_KINDS", "teacher_path", "teacher_kind", "load_teacher"]


@dataclass(frozen=True)
class TeacherKind:
    """One kind of teacher.

    Attributes:
        detect: whether a path is a teacher of this kind.
        build: ``(path, cfg.teacher) -> CSRNet`` in eval mode on the CPU.
    """

    detect: Callable[[Path], bool]
    build: Callable[[Path, TeacherRefConfig], CSRNet]


def _teacher_from_run(path: Path, ref: TeacherRefConfig) -> CSRNet:
    _, model = load_run(path)  # its own config says the width
    return model


def _teacher_from_checkpoint(path: Path, ref: TeacherRefConfig) -> CSRNet:
    model = CSRNet(ref.width_div)
    load_reference_checkpoint(model, path)
    return model.eval()


# kind -> how to recognise and load it, tried in this order
TEACHER_KINDS: dict[str, TeacherKind] = {
    # a `vkd distill skt-teacher` run directory: its export, else its newest checkpoint
    "run": TeacherKind(detect=Path.is_dir, build=_teacher_from_run),
    # one file: a vkd .safetensors, a CSRNet-pytorch .pth.tar or an official SKT student dict (teacher.width_div)
    "checkpoint": TeacherKind(detect=Path.is_file, build=_teacher_from_checkpoint),
}


def teacher_path(cfg: SKTConfig) -> Path:
    """``teacher.run``, or by default the ``skt-teacher`` run of the same name: ``<run.output_dir>/skt-teacher/<run.name>``."""
    ref = cfg.teacher.run or str(Path(cfg.run.output_dir) / "skt-teacher" / cfg.run.name)
    return Path(ref).expanduser()


def teacher_kind(path: Path) -> str | None:
    """The first kind of :data:`TEACHER_KINDS` that ``path`` is, or ``None``."""
    return next((name for name, kind in TEACHER_KINDS.items() if kind.detect(path)), None)


def load_teacher(cfg: SKTConfig) -> CSRNet:
    """The frozen teacher named by ``cfg.teacher.run``: a ``skt-teacher`` run directory or a checkpoint file.

    Raises:
        UserError: nothing at the path, or a checkpoint that does not fit a 1/``teacher.width_div`` CSRNet.

    Examples:
        >>> teacher = load_teacher(load_config(SKTConfig, None, ["teacher.run=csrnet_shA.pth.tar"]))  # doctest: +SKIP
        >>> teacher(torch.rand(1, 3, 64, 64)).shape  # doctest: +SKIP
        torch.Size([1, 1, 8, 8])
    """
    path = teacher_path(cfg)
    kind = teacher_kind(path)
    if kind is None:
        raise UserError(f"no teacher at {path}: train one with `vkd distill skt-teacher` (same --set run.name) or "
                        f"set teacher.run=RUN_DIR_OR_CHECKPOINT")
    return TEACHER_KINDS[kind].build(path, cfg.teacher)
