"""Export a trained field: a 3DGS-compatible ``.ply`` with extra ``f_sem_*`` feature properties, and safetensors.

The PLY follows the layout 3DGS viewers read (``x y z nx ny nz f_dc_0..2 f_rest_* opacity scale_0..2 rot_0..3``,
opacity as a logit, scales as logs, ``f_rest`` channel-major), plus ``f_sem_0 .. f_sem_{N-1}``: the rendered
per-Gaussian features. ``field.safetensors`` holds the raw parameters, the decoder, and ``folded_features`` — the
teacher-space features ``W·fᵢ + b`` that text queries use — with the metadata needed to reload it.
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
from vkd.feature3dgs.ply import write_ply

__all__ = ["export_ply", "export_field", "load_exported_field"]


@torch.no_grad()
def export_ply(field: GaussianField, path: str | Path) -> Path:
    """Write the field as a 3DGS ``.ply`` with ``f_sem_*`` features."""
    p = {k: v.detach().float().cpu() for k, v in field.params.items()}
    n = p["means"].shape[0]
    cols: dict[str, np.ndarray] = {}
    for i, axis in enumerate("xyz"):
        cols[axis] = p["means"][:, i].numpy()
    for axis in ("nx", "ny", "nz"):
        cols[axis] = np.zeros(n, dtype=np.float32)
    for i in range(3):
        cols[f"f_dc_{i}"] = p["sh0"][:, 0, i].numpy()
    if "shN" in p:
        rest = p["shN"].transpose(1, 2).reshape(n, -1)  # channel-major, as 3DGS writes it
        for i in range(rest.shape[1]):
            cols[f"f_rest_{i}"] = rest[:, i].numpy()
    cols["opacity"] = p["opacities"].numpy()
    for i in range(3):
        cols[f"scale_{i}"] = p["scales"][:, i].numpy()
    for i in range(4):
        cols[f"rot_{i}"] = p["quats"][:, i].numpy()
    for i in range(p["features"].shape[1]):
        cols[f"f_sem_{i}"] = p["features"][:, i].numpy()
    return write_ply(path, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in cols.items()})


@torch.no_grad()
def export_field(field: GaussianField, out_dir: str | Path, cfg: Feature3DGSConfig | None = None
                 ) -> dict[str, str]:
    """Write ``point_cloud.ply`` and ``field.safetensors`` (+ ``field.json``) under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ply = export_ply(field, out / "point_cloud.ply")
    tensors = {f"params.{k}": v.detach().float().cpu().contiguous() for k, v in field.params.items()}
    if field.decoder is not None:
        tensors["decoder.weight"] = field.decoder.weight.detach().float().cpu().contiguous()
        if field.decoder.bias is not None:
            tensors["decoder.bias"] = field.decoder.bias.detach().float().cpu().contiguous()
    tensors["folded_features"] = field.folded_features().detach().float().cpu().contiguous()
    meta = {"format": "vkd-feature3dgs-field", "version": "1", "num_gaussians": str(field.num_gaussians),
            "render_dim": str(field.render_dim), "teacher_dim": str(field.teacher_dim),
            "sh_degree": str(field.sh_degree), "active_sh_degree": str(field.active_sh_degree),
            "decoder": str(field.decoder is not None)}
    st = out / "field.safetensors"
    save_file(tensors, str(st), metadata=meta)
    info = {**meta, "ply": ply.name, "safetensors": st.name}
    if cfg is not None:
        info["background"] = list(cfg.model.background) if cfg.model.background is not None else None
    (out / "field.json").write_text(json.dumps(info, indent=1))
    return {"ply": str(ply), "safetensors": str(st)}


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
