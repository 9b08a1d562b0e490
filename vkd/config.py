"""Typed configuration: one dataclass tree per task, YAML presets and ``--set`` overrides.

Precedence is ``dataclass defaults < YAML file < --set a.b=value``. Every key is checked against the
dataclass tree: unknown keys and values of the wrong type raise :class:`~vkd.errors.ConfigError`
naming the key and listing the valid ones. The resolved config is written to each run directory as
``config.yaml`` and loading that file reproduces the run.

We considered OmegaConf structured configs; they do not support ``Literal`` or ``Union`` fields and
their errors do not list the valid keys, so the ~250 lines below do the typed merge themselves.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from vkd.errors import ConfigError

T = TypeVar("T")

__all__ = [
    "RunConfig",
    "TrainConfig",
    "TaskConfig",
    "from_dict",
    "to_dict",
    "apply_overrides",
    "load_config",
    "save_config",
    "dump_config",
    "find_preset",
    "check_positive",
    "check_nonnegative",
]


@dataclass
class RunConfig:
    """Where a run writes and how it is seeded."""

    name: str = "default"  # run directory is <output_dir>/<task>/<name>
    output_dir: str = "runs"
    seed: int = 0


@dataclass
class TrainConfig:
    """Options of the shared training loop (:class:`vkd.engine.Trainer`)."""

    steps: int = 1000
    batch_size: int = 32  # global batch: split evenly across processes
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: Literal["adam", "adamw", "sgd"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    fused_optimizer: bool = False  # adam/adamw: torch's fused kernel (faster on CPU and CUDA; float params only)
    momentum: float = 0.9  # sgd only
    scheduler: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    grad_clip: float = 0.0  # max global grad norm; 0 disables clipping
    grad_accum: int = 1
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] = "no"  # auto: bf16 where the device has it natively
    ema_decay: float = 0.0  # 0 disables the EMA copy of the student
    log_every: int = 10
    checkpoint_every: int = 500  # also saved at the last step
    keep_last: int = 3  # older checkpoint-{step} directories are deleted; 0 keeps all
    sample_every: int = 0  # calls task.save_samples every N steps (and at the end); 0 only at the end
    eval_every: int = 0  # calls task.evaluate every N steps (and at the end); 0 only at the end
    num_workers: int = 0
    detect_anomaly: bool = False  # torch.autograd anomaly detection, for debugging only
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Model selection: a validation metric of the task (DistillationTask.validation_metrics, measured on a split
    # carved from the training data, never the test split) checked at every checkpoint step; the best weights are
    # kept in <run>/best and exported. "" disables it.
    select_best: str = ""
    select_mode: Literal["min", "max"] = "min"

    def __post_init__(self) -> None:
        check_positive(self, ["steps", "batch_size", "grad_accum", "log_every", "checkpoint_every"])
        check_nonnegative(self, ["lr", "weight_decay", "warmup_steps", "grad_clip", "keep_last",
                                  "sample_every", "eval_every", "num_workers"])
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass
class TaskConfig:
    """Base of every task's config: subclasses add ``model``, ``data``, ``loss`` sections."""

    task: str = ""
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.task / self.run.name


def check_positive(obj: Any, names: list[str]) -> None:
    """``ConfigError`` unless every field ``names`` of ``obj`` is > 0 (for ``__post_init__`` of config sections)."""
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(f"{type(obj).__name__}.{name} must be > 0, got {getattr(obj, name)}")


def check_nonnegative(obj: Any, names: list[str]) -> None:
    """``ConfigError`` unless every field ``names`` of ``obj`` is >= 0."""
    for name in names:
        if getattr(obj, name) < 0:
            raise ConfigError(f"{type(obj).__name__}.{name} must be >= 0, got {getattr(obj, name)}")


# ----------------------------------------------------------------------------------------------
# Typed conversion
# ----------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple, dict):
        args = ", ".join(_type_name(a) for a in typing.get_args(tp) if a is not Ellipsis)
        return f"{origin.__name__}[{args}]"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, from_string: bool = False) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it converted (int→float, list→tuple)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")

    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise bad
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, from_string)
            except ConfigError:
                continue
        raise bad
    if origin is Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        if isinstance(value, bool) and not any(isinstance(a, bool) for a in args):
            # YAML 1.1 reads no/off/yes/on as booleans: `mixed_precision: no` means the choice "no"
            words = ("yes", "on", "true") if value else ("no", "off", "false")
            for arg in args:
                if isinstance(arg, str) and arg.lower() in words:
                    return arg
        if from_string:
            for arg in args:
                if str(arg) == str(value):
                    return arg
        raise bad
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise bad
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple):
        if isinstance(value, str) and from_string:
            value = [v.strip() for v in value.split(",")] if value.strip() else []
            value = [_yaml_scalar(v) if v else v for v in value]
        if not isinstance(value, (list, tuple)):
            raise bad
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values ({_type_name(tp)}), got {value!r}")
            return tuple(_convert(v, a, f"{key}[{i}]", from_string) for i, (v, a) in enumerate(zip(value, args, strict=True)))
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{key}[{i}]", from_string) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        ktp, vtp = args if args else (Any, Any)
        return {_convert(k, ktp, f"{key}.<key>"): _convert(v, vtp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string
            try:
                value = float(value.strip())
            except ValueError:
                raise bad from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
            if math.isnan(value):
                raise ConfigError(f"{key}: NaN is not a valid value")
            return value
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if from_string and isinstance(value, (int, float, bool)) and value is not None:
            return str(value)
        raise bad
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise bad


def _yaml_scalar(text: str) -> Any:
    """Parse one ``--set`` value as YAML; text that is not valid YAML stays a string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build the dataclass ``cls`` from a nested mapping, strictly.

    Missing keys take the dataclass default; unknown keys and wrong types raise ``ConfigError``.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    fields = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(f"unknown key {full!r}; valid keys{' under ' + prefix if prefix else ''}: "
                              + ", ".join(fields))
        kwargs[key] = _convert(value, fields[key], full)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{prefix + ': ' if prefix else ''}{err}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix or 'config'}: {err}") from None


def to_dict(cfg: Any) -> Any:
    """Dataclass tree → plain dicts/lists (tuples become lists) suitable for YAML/JSON."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def _parse_override(text: str) -> tuple[list[str], str]:
    if "=" not in text:
        raise ConfigError(f"bad --set {text!r}: expected KEY=VALUE, e.g. train.lr=0.001")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part.strip() for part in key.split(".")):
        raise ConfigError(f"bad --set {text!r}: empty key")
    return key.split("."), raw


def apply_overrides(cfg: T, overrides: list[str] | tuple[str, ...]) -> T:
    """Return a copy of ``cfg`` with ``a.b=value`` overrides applied and type-checked.

    Values are parsed as YAML scalars (``1e-3``, ``true``, ``[1, 2]``) and then checked against the
    field's type; for ``str`` fields the raw text is kept, for list fields ``1,2,3`` is accepted.
    """
    data = to_dict(cfg)
    for text in overrides:
        path, raw = _parse_override(text)
        node_cls: Any = type(cfg)
        node = data
        for depth, part in enumerate(path):
            if not (isinstance(node_cls, type) and dataclasses.is_dataclass(node_cls)):
                raise ConfigError(f"bad --set {text!r}: {'.'.join(path[:depth])!r} is not a section")
            fields = _fields(node_cls)
            if part not in fields:
                where = ".".join(path[:depth])
                raise ConfigError(f"unknown key {'.'.join(path[:depth + 1])!r}; valid keys"
                                  f"{' under ' + where if where else ''}: " + ", ".join(fields))
            if depth == len(path) - 1:
                tp = fields[part]
                parsed = _yaml_scalar(raw) if raw.strip() else ""
                if tp is str or (typing.get_origin(tp) in (Union, types.UnionType)
                                 and str in typing.get_args(tp) and parsed is not None):
                    parsed = raw
                if isinstance(parsed, str) and typing.get_origin(tp) in (list, tuple) and not raw.strip().startswith("["):
                    parsed = raw
                node[part] = to_dict(_convert(parsed, tp, ".".join(path), from_string=True))
            else:
                node_cls = fields[part]
                node = node.setdefault(part, {})
    return from_dict(type(cfg), data)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"cannot parse {path}: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of config sections")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                task: str | None = None) -> T:
    """defaults < YAML file < overrides, validated against ``cls``.

    Args:
        cls: the task's config dataclass (a :class:`TaskConfig` subclass).
        path: a YAML file; ``None`` uses the defaults.
        overrides: ``a.b=value`` strings.
        task: if given, the config's ``task`` field must be this (or absent in the file).
    """
    data: dict[str, Any] = _read_yaml(Path(path)) if path is not None else {}
    if task is not None:
        file_task = data.get("task", task)
        if file_task != task:
            raise ConfigError(f"{path} is a config for task '{file_task}', not '{task}'")
        data["task"] = task
    cfg = from_dict(cls, data)
    return apply_overrides(cfg, list(overrides))


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dump_config(cfg), encoding="utf-8")
    tmp.replace(path)
    return path


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def find_preset(task_dir: str, name: str) -> Path:
    """Resolve ``--config``: a path to a YAML file, or a preset name under ``configs/<task_dir>/``."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise ConfigError(f"config file not found: {name}")
        return candidate
    for root in (Path.cwd() / "configs", repo_root() / "configs"):
        preset = root / task_dir / f"{name}.yaml"
        if preset.is_file():
            return preset
    available = sorted(p.stem for p in (repo_root() / "configs" / task_dir).glob("*.yaml"))
    raise ConfigError(f"no config file or preset named '{name}' for {task_dir}; presets: "
                      + (", ".join(available) if available else "none"))
