"""Import a trained 3DGS scene (``model.init_ply``) and train only its features (``train.freeze_geometry``):
issue 19, item 2."""

from __future__ import annotations

from dataclasses import fields
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from f3d_helpers import TEACHER_DIM, tiny_cfg, trained_like
from plyfile import PlyData, PlyElement

from vkd.cli import main
from vkd.config import TrainConfig, dump_config
from vkd.engine import train_task
from vkd.feature3dgs.data.prepare import prepare_scene
from vkd.feature3dgs.distiller import FROZEN_KEYS, build_field, build_task, count_gaussians_in_views
from vkd.feature3dgs.export import export_ply
from vkd.feature3dgs.ply import read_ply, write_ply


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # the CPU rasterizer's small ops; conftest restores the count


def _inria_names(sh_degree: int) -> list[str]:
    """The Inria 3DGS PLY property order, spelt out by hand (the oracle of the layout)."""
    rest = 3 * ((sh_degree + 1) ** 2 - 1)
    return (["x", "y", "z", "nx", "ny", "nz"] + [f"f_dc_{i}" for i in range(3)]
            + [f"f_rest_{i}" for i in range(rest)] + ["opacity"] + [f"scale_{i}" for i in range(3)]
            + [f"rot_{i}" for i in range(4)])


@pytest.mark.parametrize("sh_degree", [0, 3])
def test_export_then_import_renders_identically(tmp_path, sh_degree):
    cfg = tiny_cfg(tmp_path, extra=[f"model.sh_degree={sh_degree}"])
    scene = prepare_scene(cfg)
    source = trained_like(cfg, scene, seed=sh_degree)
    path = export_ply(source, tmp_path / "trained.ply")
    imported = build_field(tiny_cfg(tmp_path, extra=[f"model.sh_degree={sh_degree}", f"model.init_ply={path}"]),
                           scene, TEACHER_DIM)
    assert imported.num_gaussians == source.num_gaussians and imported.active_sh_degree == sh_degree
    assert torch.count_nonzero(imported.params["features"]) == 0  # features start as in every init
    bg = torch.tensor(scene.background, dtype=torch.float32)
    for i in (0, 3, 5):
        cam = scene.cameras[i]
        with torch.no_grad():
            want = source.render(cam.viewmat[None], cam.K[None], cam.width, cam.height, background=bg,
                                 features=False)
            got = imported.render(cam.viewmat[None], cam.K[None], cam.width, cam.height, background=bg,
                                  features=False)
            flat = source.render(cam.viewmat[None], cam.K[None], cam.width, cam.height, background=bg,
                                 features=False, sh_degree=0)
        torch.testing.assert_close(got["rgb"], want["rgb"], atol=1e-6, rtol=0)
        torch.testing.assert_close(got["alpha"], want["alpha"], atol=1e-6, rtol=0)
        assert float(want["alpha"].max()) > 0.5  # the view sees the Gaussians
        if sh_degree:  # the higher bands change the colour: dropping them on import would fail the comparison
            assert float((flat["rgb"] - want["rgb"]).abs().max()) > 0.05


@pytest.mark.parametrize(("ply_degree", "model_degree"), [(3, 3), (1, 3), (3, 1), (2, 0)])
def test_reads_an_inria_layout_ply_written_with_plyfile(tmp_path, ply_degree, model_degree):
    """Columns land where the layout says (``f_rest`` channel-major); SH bands are zero-padded or truncated."""
    scene = prepare_scene(tiny_cfg(tmp_path))
    n = 40
    rng = np.random.default_rng(10 * ply_degree + model_degree)
    names = _inria_names(ply_degree)
    cols = {k: rng.standard_normal(n).astype("f4") for k in names}
    for axis, k in enumerate("xyz"):
        cols[k] = scene.points[:n, axis].numpy()
    for k in ("nx", "ny", "nz"):
        cols[k] = np.zeros(n, "f4")
    data = np.empty(n, dtype=[(k, ">f4") for k in names])  # big-endian, as any 3DGS writer may choose
    for k, v in cols.items():
        data[k] = v
    path = tmp_path / "inria.ply"
    PlyData([PlyElement.describe(data, "vertex")], byte_order=">").write(str(path))

    cfg = tiny_cfg(tmp_path, extra=[f"model.sh_degree={model_degree}", f"model.init_ply={path}"])
    p = build_field(cfg, scene, TEACHER_DIM).params

    def col(*keys: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([cols[k] for k in keys], -1))

    assert torch.equal(p["means"], col("x", "y", "z"))
    assert torch.equal(p["scales"], col("scale_0", "scale_1", "scale_2"))
    assert torch.equal(p["quats"], col("rot_0", "rot_1", "rot_2", "rot_3"))
    assert torch.equal(p["opacities"], col("opacity")[:, 0])
    assert torch.equal(p["sh0"][:, 0], col("f_dc_0", "f_dc_1", "f_dc_2"))
    src_rest, dst_rest = (ply_degree + 1) ** 2 - 1, (model_degree + 1) ** 2 - 1
    expected = torch.zeros(n, dst_rest, 3)
    for c in range(3):  # f_rest_{c·(K-1) + j}: band j + 1 of channel c
        for j in range(min(src_rest, dst_rest)):
            expected[:, j, c] = torch.from_numpy(cols[f"f_rest_{c * src_rest + j}"])
    if dst_rest:
        assert torch.equal(p["shN"], expected)
    else:
        assert "shN" not in p


def test_count_gaussians_in_views_counts_centres_inside_an_image():
    K = torch.tensor([[10.0, 0, 5], [0, 10, 4], [0, 0, 1]])  # 10 x 8 pixels, principal point in the middle
    here = SimpleNamespace(viewmat=torch.eye(4), K=K, width=10, height=8)
    # u = 10 x / z + 5, v = 10 y / z + 4: inside, behind, right of it, corner (0, 0), just past the right edge
    pts = torch.tensor([[0.0, 0, 1], [0, 0, -1], [1, 0, 1], [-0.5, -0.4, 1], [0.5, 0, 1]])
    assert count_gaussians_in_views(pts, SimpleNamespace(cameras=[here])) == 2
    shifted = torch.eye(4)
    shifted[0, 3] = -1.0  # a camera at x = 1 also sees the third point (u = 5) and the last one (u = 0)
    both = SimpleNamespace(cameras=[here, SimpleNamespace(viewmat=shifted, K=K, width=10, height=8)])
    assert count_gaussians_in_views(pts, both) == 4


def test_freeze_geometry_trains_features_and_decoder_only(tmp_path, stub_teacher):
    cfg = tiny_cfg(tmp_path, "source")
    scene = prepare_scene(cfg)
    path = export_ply(trained_like(cfg, scene, seed=1), tmp_path / "trained.ply")
    common = [f"model.init_ply={path}", "train.steps=3", "train.checkpoint_every=3", "train.log_every=1"]
    assert "freeze_geometry" not in {f.name for f in fields(TrainConfig)}  # not in the shared class

    frozen = tiny_cfg(tmp_path, "frozen", [*common, "train.freeze_geometry=true"])  # densify.enabled stays true
    task, dataset, _ = build_task(frozen, progress=False, with_evaluator=False)
    assert task.strategy is None
    before = {k: v.detach().clone() for k, v in task.student.params.items()}
    decoder_before = task.student.decoder.weight.detach().clone()
    train_task(frozen, task, dataset)
    after = task.student.params
    assert task.student.num_gaussians == before["means"].shape[0]
    for key in FROZEN_KEYS:
        if key in after:
            assert torch.equal(after[key], before[key]), key
            assert not after[key].requires_grad
    assert torch.count_nonzero(after["features"]) > 0  # trained away from the zero init
    assert not torch.equal(task.student.decoder.weight, decoder_before)

    # The same run without the freeze moves geometry and colour: the equalities above can fail.
    free = tiny_cfg(tmp_path, "free", [*common, "densify.enabled=false"])
    task, dataset, _ = build_task(free, progress=False, with_evaluator=False)
    train_task(free, task, dataset)
    for key in ("means", "scales", "opacities", "sh0"):
        assert not torch.equal(task.student.params[key], before[key]), key


def test_bad_init_ply_is_one_line_and_exit_code_2(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path, "bad")
    scene = prepare_scene(cfg)
    config = tmp_path / "tiny.yaml"
    config.write_text(dump_config(cfg))
    table = read_ply(export_ply(trained_like(cfg, scene, seed=2), tmp_path / "good.ply"))
    n = len(table["x"])

    missing = write_ply(tmp_path / "missing.ply", {k: v for k, v in table.items() if k not in ("opacity", "rot_3")})
    odd_rest = write_ply(tmp_path / "odd_rest.ply", {**table, **{f"f_rest_{i}": table["x"] for i in range(10)}})
    elsewhere = write_ply(tmp_path / "elsewhere.ply", {**table, "x": table["x"] + 1000.0})
    cases = [
        (["--set", f"model.init_ply={missing}"], "missing vertex properties: opacity, rot_3"),
        (["--set", f"model.init_ply={odd_rest}"], "10 f_rest_* properties match no SH degree"),
        (["--set", f"model.init_ply={elsewhere}"],
         f"none of its {n} Gaussians projects into any of the scene's {len(scene.cameras)} views"),
        (["--set", f"model.init_ply={tmp_path / 'absent.ply'}"], "model.init_ply: file not found"),
        (["--set", f"model.init_ply={missing}", "--set", "model.init=points"], "conflicts with model.init_ply"),
    ]
    for args, message in cases:
        code = main(["distill", "feature3dgs", "--config", str(config), *args])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("vkd: error:")]
        assert code == 2 and len(errors) == 1 and message in errors[0], (args, err)
        assert "Traceback" not in err
        assert not cfg.run_dir().exists()  # nothing written in the run directory


def test_init_ply_needs_no_colmap_points_and_freezing_turns_densification_off_in_the_saved_config(tmp_path):
    """A trained PLY brings its Gaussians: a COLMAP scene with an empty points3D loads with model.init_ply (and is
    refused without it); freeze_geometry writes densify.enabled=false into the resolved config."""
    from test_scene import _write_images, write_colmap_txt

    from vkd.config import load_config
    from vkd.errors import DataError
    from vkd.feature3dgs.config import Feature3DGSConfig
    from vkd.feature3dgs.data.prepare import prepare_scene

    write_colmap_txt(tmp_path, points=[])
    _write_images(tmp_path, ["a.png", "b.png", "c.png"])
    base = [f"data.path={tmp_path}", "data.format=colmap", f"run.output_dir={tmp_path / 'runs'}"]
    with pytest.raises(DataError):
        prepare_scene(load_config(Feature3DGSConfig, None, base, task="feature3dgs"))
    cfg = load_config(Feature3DGSConfig, None, [*base, f"model.init_ply={tmp_path / 'any.ply'}",
                                                "train.freeze_geometry=true"], task="feature3dgs")
    scene = prepare_scene(cfg)
    assert len(scene.cameras) == 3 and not cfg.densify.enabled
