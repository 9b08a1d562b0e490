"""``vkd export skt``: a counter as an ONNX or TorchScript file that ``vkd count --weights`` counts with again.

The exported graph is the counter's *network* (what :func:`vkd.skt.checkpoints.load_counter` rebuilt from a run or
a checkpoint: a CSRNet, C³-Framework's CSRNet with its ×8 up-sampling, a VGG-19 regressor), with dynamic batch,
height and width. Everything else a count needs travels as JSON inside the file, under :data:`METADATA_KEY` (ONNX
``metadata_props``; a TorchScript extra file ``extra/vkd_counter.json``): family, architecture, input
normalisation (``mean``, ``std``), the density scale (``log_para``, ``gain``), the output stride and the tiling.
On load the network is wrapped again in :class:`~vkd.skt.models.GridCounter` from that metadata, so the resulting
:class:`~vkd.skt.checkpoints.Counter` goes through :func:`vkd.skt.count.count_frame`, tiling and videos unchanged.

``GridCounter`` (grid padding, sum-pooling, ``1 / LOG_PARA``) stays out of the graph on purpose: the ONNX tracer
freezes its padding amounts at the traced size, which gives floor-pooling networks (CSRNet-pytorch, C³, VGG-19)
wrong grids at other sizes. Every export is run again, from the written file, on inputs of sizes other than the
traced one, and must match the torch counter to :data:`VERIFY_ATOL`.

:mod:`vkd.skt.checkpoints` imports this module (``load_counter`` reads exported files), so this one does not
import it: counters are read through :class:`CounterLike` and rebuilt from :func:`exported_counter_fields`.

ONNX uses torch's TorchScript-based exporter (``dynamo=False``): it takes ``dynamic_axes`` and needs no
``onnxscript``. ``onnx`` (metadata, checker) and ``onnxruntime`` are the optional extra ``vkd[onnx]``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import time
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from vkd.errors import UserError, first_line
from vkd.skt.models import GridCounter

__all__ = [
    "FORMATS",
    "METADATA_KEY",
    "VERIFY_ATOL",
    "OnnxRuntimeNetwork",
    "counter_metadata",
    "export_counter",
    "max_abs_difference",
    "is_exported_file",
    "exported_counter_fields",
]

# format -> default file name
FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
# ONNX metadata_props key, and the TorchScript extra file (``METADATA_KEY + ".json"``)
METADATA_KEY = "vkd_counter"
METADATA_VERSION = 1
ONNX_OPSET = 17
# Traced at a size that is no multiple of 8 or 16 (every pooling rounds); verified at two other sizes, one of them
# a multiple of 16 (no rounding) and with batch 2 (the dynamic batch axis).
TRACE_SHAPE = (1, 3, 75, 99)
VERIFY_SHAPES = ((2, 3, 64, 96), (1, 3, 45, 61))
# Largest |exported - torch| accepted, in people per 1/8 cell.
VERIFY_ATOL = 1e-4

_EXTRA_NAME = f"{METADATA_KEY}.json"
_INSTALL_HINT = "pip install 'vkd[onnx]'"
# Counter fields without a default: an export must record them
_REQUIRED = ("family", "title", "arch", "mean", "std", "normalisation", "source")


class CounterLike(Protocol):
    """What an export reads of a :class:`vkd.skt.checkpoints.Counter` (a dataclass; not imported here, since
    :mod:`vkd.skt.checkpoints` imports this module to load exported files)."""

    model: nn.Module
    source: str
    title: str
    arch: str

    def describe(self) -> str: ...


def _optional(module: str) -> Any:
    """``onnx`` / ``onnxruntime``, or a one-line error naming the extra that installs them."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{module} is not installed: {_INSTALL_HINT}") from None


@contextmanager
def _quiet_torch() -> Iterator[None]:
    # torch 2.9+ marks torch.jit and the TorchScript-based ONNX exporter deprecated: one warning per call, noise
    # on every export and load (the exporter choice is explained in the module docstring)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


# ----------------------------------------------------------------------------------------------
# The exported network and its metadata
# ----------------------------------------------------------------------------------------------


class OnnxRuntimeNetwork(nn.Module):
    """An ONNX Runtime session as a module, on the CPU.

    Args:
        session: an ``onnxruntime.InferenceSession`` with one ``[B, 3, H, W]`` float32 input.

    Forward:
        ``x [B, 3, H, W]`` → the session's first output as a float32 tensor (``[B, 1, h, w]``).
    """

    def __init__(self, session: Any):
        super().__init__()
        self.session = session
        self.input_name = session.get_inputs()[0].name
        # vkd.skt.evaluate.predict reads the device from the first parameter: an empty one says "CPU"
        self.device_anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())  # tiles are strided views
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


def _network(counter: CounterLike) -> tuple[nn.Module, float, int]:
    """``(network, gain, out_stride)``: the counter's model without its :class:`GridCounter`."""
    model = counter.model
    net, gain, stride = (model.net, model.gain, model.out_stride) if isinstance(model, GridCounter) else (model, 1.0, 8)
    if isinstance(net, (OnnxRuntimeNetwork, torch.jit.ScriptModule)):
        raise UserError(f"{counter.source} is already an export; export the run or checkpoint it was made from")
    return net, gain, stride


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def counter_metadata(counter: CounterLike) -> dict[str, Any]:
    """The JSON an export carries: every field of the counter but its model, the network's output scale
    (``gain``) and stride (``out_stride``), and the metadata version."""
    _, gain, stride = _network(counter)
    fields = {f.name: _plain(getattr(counter, f.name)) for f in dataclasses.fields(counter)  # type: ignore[arg-type]
              if f.name != "model"}
    fields["meta"] = {k: v for k, v in fields.get("meta", {}).items()
                      if isinstance(v, (str, int, float, bool)) or v is None}
    return {"version": METADATA_VERSION, "gain": gain, "out_stride": stride,
            "input": "image [B, 3, H, W] float32: RGB in [0, 1], then (x - mean) / std", "counter": fields}


def max_abs_difference(reference: nn.Module, other: nn.Module, shapes: tuple[tuple[int, int, int, int], ...] =
                       VERIFY_SHAPES, seed: int = 0) -> float:
    """Largest ``|reference(x) - other(x)|`` over seeded normal inputs ``x`` of each shape ``[B, 3, H, W]``."""
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    with torch.inference_mode():
        for shape in shapes:
            x = torch.randn(shape, generator=generator)
            a, b = reference(x), other(x)
            if a.shape != b.shape:
                raise RuntimeError(f"exported output {tuple(b.shape)} != torch output {tuple(a.shape)} at input "
                                   f"{tuple(shape)}")
            worst = max(worst, float((a - b).abs().max()))
    return worst


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


def _write_onnx(net: nn.Module, metadata: dict[str, Any], path: Path, description: str) -> None:
    onnx = _optional("onnx")
    _optional("onnxruntime")  # the verification runs the file: fail before the export, not after
    example = torch.zeros(TRACE_SHAPE)
    with _quiet_torch(), torch.no_grad():
        torch.onnx.export(net, (example,), str(path), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["image"], output_names=["density"], do_constant_folding=True,
                          dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                                        "density": {0: "batch", 2: "grid_height", 3: "grid_width"}})
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    model.doc_string = description
    onnx.save(model, str(path))


def _write_torchscript(net: nn.Module, metadata: dict[str, Any], path: Path) -> None:
    with _quiet_torch(), torch.no_grad():
        traced = torch.jit.trace(net, (torch.zeros(TRACE_SHAPE),), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={_EXTRA_NAME: json.dumps(metadata)})


def export_counter(counter: CounterLike, out: str | Path, fmt: str = "onnx") -> dict[str, Any]:
    """Write ``counter`` as an ONNX or TorchScript file and check it against the torch counter.

    The file is written beside ``out`` first, loaded back with :func:`exported_counter_fields` and run on inputs of
    :data:`VERIFY_SHAPES` (other sizes than the traced :data:`TRACE_SHAPE`); only a file within
    :data:`VERIFY_ATOL` of the torch counter replaces ``out``.

    Args:
        counter: a :class:`~vkd.skt.checkpoints.Counter` (:func:`~vkd.skt.checkpoints.load_counter`).
        out: the file to write (parent folders are created).
        fmt: ``"onnx"`` or ``"torchscript"``.

    Returns:
        ``{"format", "out", "model", "bytes", "max_abs_diff", "verified_at", "seconds"}``.

    Raises:
        UserError: an unknown format, a counter that is already an export, ``onnx`` / ``onnxruntime`` missing.
        RuntimeError: the exported file does not reproduce the torch counter (nothing is left at ``out``).
    """
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    net, _, _ = _network(counter)
    metadata = counter_metadata(counter)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    t0 = time.perf_counter()
    net.eval()
    try:
        if fmt == "onnx":
            _write_onnx(net, metadata, tmp, counter.describe())
        else:
            _write_torchscript(net, metadata, tmp)
        diff = max_abs_difference(counter.model, _load(tmp, fmt)["model"])
        if not diff <= VERIFY_ATOL:
            raise RuntimeError(f"the {fmt} export of {counter.source} differs from the torch model by {diff:.3g} "
                               f"(> {VERIFY_ATOL:g}) on inputs {list(VERIFY_SHAPES)}; nothing was written")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"format": fmt, "out": str(out), "model": f"{counter.title}, {counter.arch}", "bytes": out.stat().st_size,
            "max_abs_diff": diff, "verified_at": ", ".join("x".join(map(str, s)) for s in VERIFY_SHAPES),
            "seconds": round(time.perf_counter() - t0, 2)}


# ----------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive: a zip with ``<name>/constants.pkl`` (``torch.save`` zips have none)."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") for name in archive.namelist())
    except OSError:
        return False


def is_exported_file(path: str | Path) -> bool:
    """Whether ``path`` is for :func:`exported_counter_fields`: an ``.onnx`` file or a TorchScript archive."""
    path = Path(path)
    return path.suffix.lower() == ".onnx" or (path.is_file() and _is_torchscript(path))


def _parse_metadata(text: str | None, path: Path) -> dict[str, Any]:
    if text is None:
        raise UserError(f"{path} carries no '{METADATA_KEY}' metadata: not a vkd export (make one with "
                        f"vkd export skt --run RUN or --weights FILE)")
    try:
        meta = json.loads(text)
        fields = meta["counter"]
        missing = [k for k in ("gain", "out_stride") if k not in meta] + [k for k in _REQUIRED if k not in fields]
    except (ValueError, TypeError, KeyError):
        raise UserError(f"{path}: its '{METADATA_KEY}' metadata is not that of a vkd export") from None
    if int(meta.get("version", 0)) > METADATA_VERSION:
        raise UserError(f"{path} was exported by a newer vkd (metadata version {meta['version']}); upgrade vkd")
    if missing:
        raise UserError(f"{path}: its '{METADATA_KEY}' metadata lacks {', '.join(missing)}")
    return meta


def _onnx_session(path: Path, threads: int) -> Any:
    ort = _optional("onnxruntime")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own Fail / InvalidProtobuf / NoSuchFile classes
        raise UserError(f"cannot load {path} with onnxruntime: {first_line(err)}") from None


def _load(path: Path, fmt: str, log_para: float | None = None, threads: int = 0) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if fmt == "onnx":
        session = _onnx_session(path, threads)
        meta = _parse_metadata(session.get_modelmeta().custom_metadata_map.get(METADATA_KEY), path)
        net: nn.Module = OnnxRuntimeNetwork(session)
        runtime = "ONNX Runtime"
    else:
        extra = {_EXTRA_NAME: ""}
        try:
            with _quiet_torch():
                net = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except Exception as err:
            raise UserError(f"cannot load TorchScript file {path}: {first_line(err)}") from None
        meta = _parse_metadata(extra[_EXTRA_NAME] or None, path)
        runtime = "TorchScript"
    fields = dict(meta["counter"])
    gain = float(meta["gain"])
    if log_para is not None:
        fields["log_para"], gain = float(log_para), 1.0 / float(log_para)
    fields.update(model=GridCounter(net, gain, int(meta["out_stride"])).eval(), source=str(path),
                  title=f"{fields['title']} via {runtime}", mean=tuple(fields["mean"]), std=tuple(fields["std"]),
                  meta={**fields.get("meta", {}), "exported_from": fields["source"]})
    return fields


def exported_counter_fields(path: str | Path, log_para: float | None = None, threads: int = 0) -> dict[str, Any]:
    """The fields of a :class:`~vkd.skt.checkpoints.Counter` (``Counter(**fields)``) for a file written by
    :func:`export_counter`: the network in its runtime, wrapped in :class:`GridCounter` as it was exported, and
    the recorded conventions (``source`` is now ``path``, ``meta["exported_from"]`` the original source).

    ``.onnx`` files run in ONNX Runtime (CPU, ``ORT_ENABLE_ALL`` graph optimisations, sequential execution),
    TorchScript archives (any suffix) in ``torch.jit``. A TorchScript file is a program: load only files you
    trust (ONNX files are a graph and weights).

    Args:
        path: the exported file.
        log_para: replaces the recorded density scale (C³-Framework exports; ``load_counter`` refuses it for
            other families).
        threads: ONNX Runtime intra-op threads (0: its default, one per physical core).

    Raises:
        UserError: missing file, ``onnxruntime`` not installed (naming ``vkd[onnx]``), a file the runtime cannot
            load, or one without vkd's metadata.
    """
    path = Path(path).expanduser()
    return _load(path, "onnx" if path.suffix.lower() == ".onnx" else "torchscript", log_para, threads)
