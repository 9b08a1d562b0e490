"""Feature 3DGS export: the standard 3DGS PLY layout, ``features.safetensors``, and reading 3DGS PLYs.

``plyfile`` is the independent reader/writer: vkd's own PLY code is checked against it in both directions.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement
from safetensors import safe_open
from safetensors.torch import load_file

from vkd.errors import DataError
from vkd.feature3dgs.export import export_field, load_exported_field
from vkd.feature3dgs.model import GaussianField
from vkd.feature3dgs.ply import read_ply, validate_gaussian_ply


def _field(num: int = 12, render_dim: int = 3, teacher_dim: int = 5, sh_degree: int = 3, decoder: bool = True,
           seed: int = 0) -> GaussianField:
    """A tiny field with every parameter randomised, so each column has distinct values."""
    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(num, 3, generator=g) - 0.5
    field = GaussianField.from_points(pts, torch.rand(num, 3, generator=g), render_dim, teacher_dim, sh_degree,
                                      decoder, init_opacity=0.7, init_scale=1.0)
    with torch.no_grad():
        for p in field.params.values():
            p.normal_(generator=g)
        if field.decoder is not None:
            field.decoder.weight.normal_(generator=g)
            field.decoder.bias.normal_(generator=g)
    return field


def _inria_names(sh_degree: int) -> list[str]:
    """The Inria 3DGS ``construct_list_of_attributes`` order, spelt out by hand (the oracle for the export)."""
    rest = 3 * ((sh_degree + 1) ** 2 - 1)
    return (["x", "y", "z", "nx", "ny", "nz"] + [f"f_dc_{i}" for i in range(3)]
            + [f"f_rest_{i}" for i in range(rest)] + ["opacity"] + [f"scale_{i}" for i in range(3)]
            + [f"rot_{i}" for i in range(4)])


def _write_with_plyfile(path, columns: dict[str, np.ndarray], text: bool = False) -> None:
    data = np.empty(len(next(iter(columns.values()))), dtype=[(k, "f4") for k in columns])
    for k, v in columns.items():
        data[k] = v
    PlyData([PlyElement.describe(data, "vertex")], text=text).write(str(path))


def _random_3dgs_columns(n: int, sh_degree: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(n).astype(np.float32) for k in _inria_names(sh_degree)}


@pytest.mark.parametrize("sh_degree", [0, 3])
def test_point_cloud_ply_is_exactly_the_3dgs_layout(tmp_path, sh_degree):
    field = _field(num=11, sh_degree=sh_degree)
    paths = export_field(field, tmp_path / "export")
    ply = PlyData.read(paths["ply"])
    assert [e.name for e in ply.elements] == ["vertex"]
    assert not ply.text and ply.byte_order == "<"
    vertex = ply["vertex"]
    names = _inria_names(sh_degree)
    assert [p.name for p in vertex.properties] == names  # exact list and order, no f_sem_* or anything else
    assert all(p.val_dtype == "f4" for p in vertex.properties)
    assert vertex.count == 11
    raw = open(paths["ply"], "rb").read()
    header_len = raw.index(b"end_header\n") + len(b"end_header\n")
    assert raw.startswith(b"ply\nformat binary_little_endian 1.0\nelement vertex 11\n")
    assert len(raw) - header_len == 11 * len(names) * 4  # a fixed float32 struct per vertex, nothing after it

    p = {k: v.detach() for k, v in field.params.items()}

    def col(name: str) -> torch.Tensor:
        return torch.from_numpy(np.asarray(vertex[name]).copy())

    for i, axis in enumerate("xyz"):
        torch.testing.assert_close(col(axis), p["means"][:, i])
    for axis in ("nx", "ny", "nz"):
        assert np.all(vertex[axis] == 0.0)
    for c in range(3):
        torch.testing.assert_close(col(f"f_dc_{c}"), p["sh0"][:, 0, c])
    num_rest = (sh_degree + 1) ** 2 - 1
    for c in range(3):  # channel-major: all coefficients of R, then G, then B
        for k in range(num_rest):
            torch.testing.assert_close(col(f"f_rest_{c * num_rest + k}"), p["shN"][:, k, c])
    torch.testing.assert_close(col("opacity"), p["opacities"])  # logits, as stored
    for i in range(3):
        torch.testing.assert_close(col(f"scale_{i}"), p["scales"][:, i])  # log scales
    for i in range(4):
        torch.testing.assert_close(col(f"rot_{i}"), p["quats"][:, i])  # w first
    # vkd's own reader agrees with plyfile and recognises the layout.
    ours = read_ply(paths["ply"])
    assert list(ours) == names
    assert validate_gaussian_ply(ours, paths["ply"]) == sh_degree


def test_features_safetensors_rows_and_folding(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "teacher").mkdir(parents=True)
    teacher_info = {"kind": "maskclip", "model": "ViT-B-16", "pretrained": "laion2b_s34b_b88k"}
    (run_dir / "teacher" / "teacher.json").write_text(json.dumps(teacher_info))
    field = _field(num=9, render_dim=4, teacher_dim=6, sh_degree=1)
    paths = export_field(field, run_dir / "export")
    assert paths["features"] == str(run_dir / "export" / "features.safetensors")
    st = load_file(paths["features"])
    with safe_open(paths["features"], "pt") as fh:
        meta = fh.metadata()
    f = field.params["features"].detach()  # [G, N]
    W = field.decoder.weight.detach()[:, :, 0, 0]  # [M, N]
    b = field.decoder.bias.detach()  # [M]
    assert set(st) == {"features", "folded_features", "decoder.weight", "decoder.bias"}
    torch.testing.assert_close(st["features"], f)
    torch.testing.assert_close(st["decoder.weight"], W)
    torch.testing.assert_close(st["decoder.bias"], b)
    folded_oracle = torch.stack([W @ f[i] + b for i in range(9)])  # W fᵢ + b, one Gaussian at a time
    torch.testing.assert_close(st["folded_features"], folded_oracle)
    # Row i is vertex i: the PLY's means and the feature rows come from the same Gaussians, in the same order.
    ply = PlyData.read(paths["ply"])["vertex"]
    assert st["features"].shape[0] == ply.count == int(meta["num_gaussians"])
    torch.testing.assert_close(torch.from_numpy(np.asarray(ply["x"]).copy()), field.params["means"][:, 0].detach())
    assert meta["format"] == "vkd-feature3dgs-features" and meta["ply"] == "point_cloud.ply"
    assert "vertex i of point_cloud.ply" in meta["row_order"]
    assert (meta["render_dim"], meta["teacher_dim"], meta["decoder"]) == ("4", "6", "True")
    assert meta["teacher"] == ":".join(teacher_info.values())
    # field.safetensors keeps working: the field reloads and still carries folded_features.
    back = load_exported_field(paths["safetensors"])
    for k, v in field.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v)
    torch.testing.assert_close(load_file(paths["safetensors"])["folded_features"], folded_oracle)
    assert json.loads((run_dir / "export" / "field.json").read_text())["features"] == "features.safetensors"


def test_features_safetensors_without_decoder_or_teacher(tmp_path):
    field = _field(num=7, render_dim=5, teacher_dim=5, sh_degree=0, decoder=False)
    paths = export_field(field, tmp_path / "export")
    st = load_file(paths["features"])
    with safe_open(paths["features"], "pt") as fh:
        meta = fh.metadata()
    assert set(st) == {"features", "folded_features"}
    torch.testing.assert_close(st["features"], field.params["features"].detach())
    torch.testing.assert_close(st["folded_features"], field.params["features"].detach())  # no decoder: identity
    assert meta["decoder"] == "False" and "teacher" not in meta


def test_missing_3dgs_properties_fail_with_one_line(tmp_path):
    cols = _random_3dgs_columns(5, 1, seed=1)
    for k in ("opacity", "rot_3", "f_rest_4"):
        del cols[k]
    path = tmp_path / "broken.ply"
    _write_with_plyfile(path, cols)
    with pytest.raises(DataError, match=r"missing vertex properties: opacity, rot_3, f_rest_4$") as err:
        validate_gaussian_ply(read_ply(path), path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    # A complete f_rest run that is not 3((d+1)^2 - 1) long matches no SH degree.
    cols = _random_3dgs_columns(5, 0, seed=2)
    cols.update({f"f_rest_{i}": np.zeros(5, np.float32) for i in range(6)})
    _write_with_plyfile(path, cols)
    with pytest.raises(DataError, match="6 f_rest_"):
        validate_gaussian_ply(read_ply(path), path)


@pytest.mark.parametrize("sh_degree", [0, 1, 2, 3])
def test_reads_standard_3dgs_plys_of_any_degree(tmp_path, sh_degree):
    cols = _random_3dgs_columns(6, sh_degree, seed=sh_degree)
    for text in (False, True):
        path = tmp_path / f"scene_{text}.ply"
        _write_with_plyfile(path, cols, text=text)
        table = read_ply(path)
        assert list(table) == list(cols)
        for k, v in cols.items():
            np.testing.assert_allclose(table[k], v, rtol=1e-6)
        assert validate_gaussian_ply(table, path) == sh_degree


def test_old_vkd_export_with_f_sem_still_reads(tmp_path):
    cols = _random_3dgs_columns(8, 2, seed=5)
    rng = np.random.default_rng(6)
    sem = rng.standard_normal((8, 4)).astype(np.float32)  # [G, 4] rendered features, as old exports wrote them
    cols.update({f"f_sem_{i}": sem[:, i] for i in range(4)})
    path = tmp_path / "old_point_cloud.ply"
    _write_with_plyfile(path, cols)
    table = read_ply(path)
    assert validate_gaussian_ply(table, path) == 2
    np.testing.assert_array_equal(np.stack([table[f"f_sem_{i}"] for i in range(4)], -1), sem)
    np.testing.assert_array_equal(table["rot_0"], cols["rot_0"])
