"""Export a trained field: a standard 3DGS ``.ply``, the per-Gaussian features, and the raw parameters.

* ``point_cloud.ply`` is exactly the Inria 3DGS layout that viewers read as a fixed struct (binary little-endian,
  float ``x y z nx ny nz f_dc_0..2 f_rest_* opacity scale_0..2 rot_0..3``, opacity as a logit, scales as logs,
  quaternions wxyz, ``f_rest`` channel-major) and nothing else.
* ``features.safetensors`` holds the per-Gaussian features, row ``i`` = vertex ``i`` of the PLY: ``features``
  ``[G, N]`` (rendered), ``folded_features`` ``[G, M]`` (teacher space ``W·fᵢ + b``, what text queries use) and,
  with a decoder, ``decoder.weight`` ``[M, N]`` / ``decoder.bias`` ``[M]``; its metadata gives the dims and teacher.
* ``field.safetensors`` holds the raw parameters, the decoder and ``folded_features``, with the metadata needed to
  reload the field (:func:`load_exported_field`).

vkd exports before this layout put the rendered features in the PLY as ``f_sem_*`` columns;
:func:`~vkd.feature3dgs.ply.read_ply` still reads them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vkd.errors import DataError
from vkd.feature3dgs.config import Feature3DGSConfig
from vkd.feature3dgs.model import GaussianField
from vkd.feature3dgs.ply import gaussian_ply_properties, write_ply

__all__ = ["export_ply", "export_features", "export_field", "load_exported_field"]

FEATURES_FORMAT = "vkd-feature3dgs-features"


@torch.no_grad()
def export_ply(field: GaussianField, path: str | Path) -> Path:
    """Write the field's Gaussians as a standard 3DGS ``.ply`` (no feature columns).

    Columns follow :func:`~vkd.feature3dgs.ply.gaussian_ply_properties` for the field's ``sh_degree``.
    """
    p = {k: v.detach().float().cpu() for k, v in field.params.items()}
    n = p["means"].shape[0]
    sh_rest = p["shN"] if "shN" in p else torch.zeros(n, 0, 3)  # [G, K-1, 3]
    blocks = [
        p["means"],  # [G, 3]
        torch.zeros(n, 3),  # normals: 3DGS writes zeros and never reads them
        p["sh0"][:, 0, :],  # [G, 3]
        sh_rest.transpose(1, 2).reshape(n, -1),  # [G, 3(K-1)] channel-major, as 3DGS writes it
        p["opacities"][:, None],  # [G, 1] logits
        p["scales"],  # [G, 3] log scales
        p["quats"],  # [G, 4] wxyz
    ]
    table = torch.cat(blocks, 1).numpy()  # [G, P]
    names = gaussian_ply_properties(field.sh_degree)
    if table.shape[1] != len(names):
        raise ValueError(f"field parameters give {table.shape[1]} PLY columns, the 3DGS layout of SH degree "
                         f"{field.sh_degree} has {len(names)}")
    return write_ply(path, {name: np.ascontiguousarray(table[:, i], dtype=np.float32)
                            for i, name in enumerate(names)})


def _teacher_name(out_dir: Path, cfg: Feature3DGSConfig | None) -> str | None:
    """The teacher as ``kind:model:pretrained`` (``kind:target`` for a callable), or ``None`` when unknown.

    Read from the run's ``teacher/teacher.json`` (``export/`` sits next to it), else from a config whose
    ``teacher.kind`` is not ``auto`` (``auto`` is resolved only once the scene is loaded).
    """
    info: dict = {}
    info_path = out_dir.parent / "teacher" / "teacher.json"
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text())
        except (OSError, ValueError):
            info = {}  # the name is informative only: never fail an export over it
    elif cfg is not None and cfg.teacher.kind != "auto":
        t = cfg.teacher
        info = {"kind": t.kind, "target": t.target if t.kind == "callable" else None,
                "model": t.model if t.kind == "maskclip" else None,
                "pretrained": t.pretrained if t.kind == "maskclip" else None}
    if not isinstance(info, dict):
        return None
    parts = [info.get("kind"), info.get("target") or info.get("model"), info.get("pretrained"),
             "random_init" if info.get("random_init") else None]
    return ":".join(dict.fromkeys(str(x) for x in parts if x)) or None  # dedupe: tiny_clip's model is "tiny_clip"


@torch.no_grad()
def export_features(field: GaussianField, path: str | Path, teacher: str | None = None,
                    ply_name: str = "point_cloud.ply") -> Path:
    """Write the per-Gaussian features to ``features.safetensors`` (row ``i`` = vertex ``i`` of ``ply_name``).

    Tensors: ``features`` ``[G, N]``, ``folded_features`` ``[G, M]`` (``W·fᵢ + b``; ``fᵢ`` without a decoder) and,
    with a decoder, ``decoder.weight`` ``[M, N]`` and ``decoder.bias`` ``[M]``. String metadata: ``format``,
    ``version``, ``ply``, ``row_order``, ``num_gaussians``, ``render_dim``, ``teacher_dim``, ``decoder`` and, when
    known, ``teacher``.
    """
    path = Path(path)
    # clone: without a decoder folded_features() is params["features"] itself, and safetensors refuses aliases
    tensors = {"features": field.params["features"].detach().float().cpu().contiguous(),  # [G, N]
               "folded_features": field.folded_features().detach().float().cpu().clone()}  # [G, M]
    if field.decoder is not None:
        tensors["decoder.weight"] = field.decoder.weight[:, :, 0, 0].detach().float().cpu().contiguous()  # [M, N]
        if field.decoder.bias is not None:
            tensors["decoder.bias"] = field.decoder.bias.detach().float().cpu().contiguous()  # [M]
    meta = {"format": FEATURES_FORMAT, "version": "1", "ply": ply_name,
            "row_order": f"row i of every tensor with num_gaussians rows is vertex i of {ply_name}",
            "num_gaussians": str(field.num_gaussians), "render_dim": str(field.render_dim),
            "teacher_dim": str(field.teacher_dim), "decoder": str(field.decoder is not None)}
    if teacher:
        meta["teacher"] = teacher
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


@torch.no_grad()
def export_field(field: GaussianField, out_dir: str | Path, cfg: Feature3DGSConfig | None = None
                 ) -> dict[str, str]:
    """Write ``point_cloud.ply``, ``features.safetensors`` and ``field.safetensors`` (+ ``field.json``) under ``out_dir``.

    Returns:
        ``{"ply": ..., "features": ..., "safetensors": ...}`` paths (``safetensors`` is ``field.safetensors``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ply = export_ply(field, out / "point_cloud.ply")
    teacher = _teacher_name(out, cfg)
    features = export_features(field, out / "features.safetensors", teacher, ply.name)
    tensors = {f"params.{k}": v.detach().float().cpu().contiguous() for k, v in field.params.items()}
    if field.decoder is not None:
        tensors["decoder.weight"] = field.decoder.weight.detach().float().cpu().contiguous()
        if field.decoder.bias is not None:
            tensors["decoder.bias"] = field.decoder.bias.detach().float().cpu().contiguous()
    # clone: without a decoder folded_features() aliases params.features (safetensors refuses shared memory)
    tensors["folded_features"] = field.folded_features().detach().float().cpu().clone()  # [G, M]
    meta = {"format": "vkd-feature3dgs-field", "version": "1", "num_gaussians": str(field.num_gaussians),
            "render_dim": str(field.render_dim), "teacher_dim": str(field.teacher_dim),
            "sh_degree": str(field.sh_degree), "active_sh_degree": str(field.active_sh_degree),
            "decoder": str(field.decoder is not None)}
    st = out / "field.safetensors"
    save_file(tensors, str(st), metadata=meta)
    info = {**meta, "ply": ply.name, "features": features.name, "safetensors": st.name, "teacher": teacher}
    if cfg is not None:
        info["background"] = list(cfg.model.background) if cfg.model.background is not None else None
    (out / "field.json").write_text(json.dumps(info, indent=1))
    return {"ply": str(ply), "features": str(features), "safetensors": str(st)}


def load_exported_field(path: str | Path) -> GaussianField:
    """Rebuild a :class:`~vkd.feature3dgs.model.GaussianField` from ``field.safetensors``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"exported field not found: {path}")
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
    if meta.get("format") != "vkd-feature3dgs-field":
        raise DataError(f"{path} is not a vkd Feature 3DGS field export")
    state = load_file(str(path))
    field = GaussianField(int(meta["num_gaussians"]), int(meta["render_dim"]), int(meta["teacher_dim"]),
                          int(meta["sh_degree"]), decoder=meta["decoder"] == "True")
    field.active_sh_degree = int(meta["active_sh_degree"])
    state.pop("folded_features", None)
    field.load_state_dict(state, strict=True)
    return field.eval()
