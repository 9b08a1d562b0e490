"""Training-free lifting (``vkd lift``): issue 19, item 3.

The weighted average against its definition (both routes of :func:`lift_views`), the decoder fits, the command end
to end on the tiny synthetic scene (a normal run directory: eval, render, text and point queries), resume after an
interrupt (bit-identical), two processes, and bad input (one line, exit code 2, nothing written).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from f3d_helpers import TEACHER_DIM, tiny_cfg, trained_like

import vkd.feature3dgs.lift as lift_module
from vkd.cli import main
from vkd.config import dump_config
from vkd.engine import latest_checkpoint, load_checkpoint_weights
from vkd.errors import ConfigError
from vkd.feature3dgs.data.prepare import prepare_scene
from vkd.feature3dgs.evaluate import run_evaluator
from vkd.feature3dgs.export import export_ply
from vkd.feature3dgs.lift import fit_lifted_field, lift_views, view_groups, views_without_gaussians
from vkd.feature3dgs.losses import resize_features
from vkd.feature3dgs.model import GaussianField
from vkd.feature3dgs.ply import read_gaussian_ply, read_ply, write_ply
from vkd.feature3dgs.runs import load_run
from vkd.render import rasterization

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # the CPU rasterizer's small ops; conftest restores the count


def _scene_gaussians(seed: int, n: int = 60):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g, dtype=F64) * 0.4 + torch.tensor([0.0, 0.0, 3.0], dtype=F64)
    quats = torch.randn(n, 4, generator=g, dtype=F64)
    scales = torch.exp(torch.randn(n, 3, generator=g, dtype=F64) * 0.4 - 1.8)
    opac = torch.rand(n, generator=g, dtype=F64) * 0.9
    K = torch.tensor([[22.0, 0, 12.3], [0, 24.0, 9.1], [0, 0, 1]], dtype=F64)
    return means, quats, scales, opac, torch.eye(4, dtype=F64), K


# ----------------------------------------------------------------------------------------------------------------
# One view: the definition
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [(18, 24), (7, 9), (36, 10)])  # the render size, coarser, finer x coarser
def test_lift_views_is_the_weighted_sum_of_the_resized_teacher_maps(grid):
    """Both routes (torch adjoint, autograd) = Σ_c Σ_p w_i(p)·[F̃(p); r(p)] over two views, with w_i from one-hot
    renders and F̃ = resizeᵀF, r = resizeᵀ1 spelt out through the resize's matrix."""
    means, quats, scales, opac, vm, K = _scene_gaussians(0)
    shifted = vm.clone()
    shifted[0, 3] = 0.25
    vms, Ks = torch.stack([vm, shifted]), K.expand(2, 3, 3)
    W, H, D, n = 24, 18, 5, means.shape[0]
    targets = torch.randn(2, D, *grid, generator=torch.Generator().manual_seed(1), dtype=F64)
    adjoint = lift_views(means, quats, scales, opac, vms, Ks, W, H, targets, backend="torch", method="adjoint")
    autograd = lift_views(means, quats, scales, opac, vms, Ks, W, H, targets, backend="torch", method="autograd")
    torch.testing.assert_close(adjoint, autograd, rtol=1e-10, atol=1e-12)

    basis = torch.eye(H * W, dtype=F64).reshape(H * W, 1, H, W)
    R = resize_features(basis, grid).reshape(H * W, -1)  # [HW, hw]: the resize as a matrix
    expected = torch.zeros(n, D + 1, dtype=F64)
    for c in range(2):
        w = rasterization(means, quats, scales, opac, torch.eye(n, dtype=F64), vms[c:c + 1], Ks[c:c + 1], W, H,
                          backend="torch")[0][0]  # [H, W, n]: the blending weights themselves
        ext = torch.cat([targets[c], torch.ones(1, *grid, dtype=F64)]).reshape(D + 1, -1)  # [D+1, hw]
        expected += w.reshape(H * W, n).T @ (R @ ext.T)  # Σ_p w(p) (resizeᵀ[F; 1])(p)
        assert float(w.sum(-1).max()) > 0.5  # a real, partly covered view
    assert (expected[:, -1] > 0).sum() > n // 3
    torch.testing.assert_close(adjoint, expected, rtol=1e-9, atol=1e-11)
    one = sum(lift_views(means, quats, scales, opac, vms[c:c + 1], Ks[c:c + 1], W, H, targets[c:c + 1])
              for c in range(2))
    torch.testing.assert_close(adjoint, one, rtol=1e-10, atol=1e-12)  # batching views changes nothing


def test_view_groups_keep_sizes_apart_and_respect_the_budget():
    from types import SimpleNamespace

    cams = [SimpleNamespace(width=w, height=h) for w, h in [(4, 4), (4, 4), (4, 4), (8, 4), (4, 4), (4, 4)]]
    scene = SimpleNamespace(cameras=cams)
    grids = {i: (2, 2) for i in range(6)}
    assert view_groups(scene, range(6), grids.get, dim=1) == [[0, 1, 2], [3], [4, 5]]
    assert view_groups(scene, range(6), grids.get, dim=1, max_elements=2 * 16 * 2) == [[0, 1], [2], [3], [4, 5]]
    grids[1] = (3, 3)  # another teacher grid: another call
    assert view_groups(scene, range(3), grids.get, dim=1) == [[0], [1], [2]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gsplat_route_matches_the_torch_adjoint_on_cuda():
    """On CUDA, lifting differentiates through gsplat's kernels (autograd route); it must agree with the torch
    backend's exact transpose."""
    means, quats, scales, opac, vm, K = (t.float() for t in _scene_gaussians(3, n=400))
    target = torch.randn(9, 7, 9, generator=torch.Generator().manual_seed(4))
    ref = lift_views(means, quats, scales, opac, vm[None], K[None], 24, 18, target[None], backend="torch")
    cuda = [t.cuda() for t in (means, quats, scales, opac, vm[None], K[None], target[None])]
    got = lift_views(*cuda[:6], 24, 18, cuda[6], backend="gsplat").cpu()
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-4)


def test_a_constant_teacher_lifts_to_the_constant_on_every_seen_gaussian():
    """Σ w·c / Σ w = c exactly, whatever the weights: over several views, with a coarse teacher grid."""
    means, quats, scales, opac, vm, K = _scene_gaussians(2)
    c = torch.tensor([0.3, -1.2, 2.0], dtype=F64)
    vms = vm.repeat(3, 1, 1)
    vms[:, 0, 3] = torch.tensor([-0.3, 0.0, 0.3], dtype=F64)
    total = lift_views(means, quats, scales, opac, vms, K.expand(3, 3, 3), 24, 18,
                       c[None, :, None, None].expand(3, 3, 5, 6).clone())
    field = GaussianField(means.shape[0], 3, 3, sh_degree=0, decoder=False)
    info = fit_lifted_field(field, total[:, :3].float(), total[:, 3].float())
    seen = total[:, 3] > 1e-12
    assert info["seen"] == int(seen.sum()) > 0
    torch.testing.assert_close(field.params["features"][seen].double(), c.expand(int(seen.sum()), 3),
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Fitting the field
# ----------------------------------------------------------------------------------------------------------------


def test_fits_pca_decoder_identity_decoder_and_direct_features():
    g = torch.Generator().manual_seed(0)
    G, D, N = 200, 12, 3
    mean = torch.randn(D, generator=g)
    basis = torch.linalg.qr(torch.randn(D, N, generator=g))[0]
    lifted = mean + torch.randn(G, N, generator=g) @ basis.T  # [G, D]: exactly rank N around the mean
    weight = torch.rand(G, generator=g) + 0.1
    weight[:5] = 0.0  # never seen: they get the weighted mean
    numerator = lifted * weight[:, None]

    pca = GaussianField(G, N, D, sh_degree=0, decoder=True)
    info = fit_lifted_field(pca, numerator, weight)
    assert info["fit"] == "pca_decoder" and info["seen"] == G - 5
    assert info["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    folded = pca.folded_features()
    torch.testing.assert_close(folded[5:], lifted[5:], rtol=1e-4, atol=1e-4)
    seen_mean = (numerator[5:].sum(0) / weight[5:].sum())
    torch.testing.assert_close(folded[:5], seen_mean.expand(5, D), rtol=1e-4, atol=1e-4)

    wide = GaussianField(G, D, D, sh_degree=0, decoder=True)
    assert fit_lifted_field(wide, numerator, weight)["fit"] == "identity_decoder"
    torch.testing.assert_close(wide.folded_features()[5:], lifted[5:], rtol=1e-5, atol=1e-5)
    plain = GaussianField(G, D, D, sh_degree=0, decoder=False)
    assert fit_lifted_field(plain, numerator, weight)["fit"] == "direct"
    torch.testing.assert_close(plain.params["features"][5:], lifted[5:], rtol=1e-5, atol=1e-5)

    with pytest.raises(ConfigError, match="exceeds the feature width"):
        fit_lifted_field(GaussianField(G, D + 1, D + 1, sh_degree=0, decoder=True), numerator, weight)
    with pytest.raises(ConfigError, match="must equal the feature width"):
        fit_lifted_field(GaussianField(G, N, N, sh_degree=0, decoder=False), numerator, weight)


# ----------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------


def _setup(tmp_path, name="src"):
    """The tiny scene's config file and a trained-like PLY of it."""
    cfg = tiny_cfg(tmp_path, name)
    scene = prepare_scene(cfg)
    config = tmp_path / "tiny.yaml"
    config.write_text(dump_config(cfg))
    ply = export_ply(trained_like(cfg, scene, seed=4), tmp_path / "trained.ply")
    return cfg, scene, config, ply


def _lift_args(config, ply, out, *extra):
    return ["lift", "--scene", "synthetic", "--ply", str(ply), "--teacher", "callable", "--config", str(config),
            "--out", str(out), *extra]


def test_lift_writes_a_run_that_eval_render_and_queries_read(tmp_path, stub_teacher, capsys):
    cfg, scene, config, ply = _setup(tmp_path)
    out = tmp_path / "lifted"
    assert main(_lift_args(config, ply, out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "lift" and summary["views"] == len(scene.train_ids)
    assert summary["fit"] == "pca_decoder" and summary["feature_dim"] == TEACHER_DIM
    assert (out / "export" / "point_cloud.ply").is_file() and (out / "export" / "features.safetensors").is_file()
    assert not (out / "lift" / "state.safetensors").exists()  # G·D floats are not kept once the checkpoint exists

    run = load_run(out)
    source = GaussianField.from_gaussians(read_gaussian_ply(ply)[0], 4, TEACHER_DIM, 0)
    for key in ("means", "scales", "quats", "opacities", "sh0"):
        assert torch.equal(run.field.params[key], source.params[key]), key  # geometry untouched
    assert run.cfg.train.freeze_geometry and run.cfg.model.init_ply == str(ply)

    assert main(["eval", "feature3dgs", "--run", str(out)]) == 0
    metrics = json.loads((out / "eval.json").read_text())
    # The stub teacher's features are colour embeddings: the lifted field must reproduce them on held-out views
    # (a zero or random field scores far lower: see the assertion on the untrained field below).
    assert metrics["feature_cosine"] > 0.95, metrics
    zero = GaussianField(source.num_gaussians, 4, TEACHER_DIM, 0)
    zero.load_state_dict(run.field.state_dict())
    with torch.no_grad():
        zero.params["features"].normal_()
    assert run_evaluator(run).evaluate(zero, fps=False)["feature_cosine"] < metrics["feature_cosine"] - 0.1

    capsys.readouterr()
    assert main(["render", "--run", str(out), "--query", "red", "--extract", "--format", "png", "--frames", "1"]) == 0
    assert main(["render", "--run", str(out), "--point", "0", "12", "12", "--delete", "--format", "png",
                 "--frames", "1"]) == 0
    assert list((out / "renders").rglob("*.png"))

    # A second call with the same inputs is a no-op that returns the finished lift.
    mtime = (out / "summary.json").stat().st_mtime_ns
    assert main(_lift_args(config, ply, out)) == 0
    assert (out / "summary.json").stat().st_mtime_ns == mtime


def test_an_interrupted_lift_resumes_to_the_same_field(tmp_path, stub_teacher, monkeypatch, capsys):
    cfg, scene, config, ply = _setup(tmp_path)
    assert main(_lift_args(config, ply, tmp_path / "whole", "--set", "lift.save_every=2")) == 0

    calls = {"n": 0}
    real = lift_module.lift_views

    def interrupt_on_the_second(*args, **kwargs):  # one call per batch of 2 views (the tiny views fit one call)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(lift_module, "lift_views", interrupt_on_the_second)
    out = tmp_path / "resumed"
    assert main(_lift_args(config, ply, out, "--set", "lift.save_every=2")) == 130
    progress = json.loads((out / "lift" / "progress.json").read_text())
    assert progress["views_done"] == 2 and not progress["complete"]  # the first batch of 2 was saved
    assert latest_checkpoint(out) is None
    monkeypatch.setattr(lift_module, "lift_views", real)
    # Other inputs in the same run directory: refused, not mixed into the saved sums.
    other = export_ply(trained_like(cfg, scene, seed=5), tmp_path / "other.ply")
    assert main(_lift_args(config, other, out, "--set", "lift.save_every=2")) == 2
    assert "holds a lift of other inputs" in capsys.readouterr().err
    assert main(_lift_args(config, ply, out, "--set", "lift.save_every=2")) == 0
    a = load_checkpoint_weights(latest_checkpoint(tmp_path / "whole"))
    b = load_checkpoint_weights(latest_checkpoint(out))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_bad_input_is_one_line_exit_code_2_and_nothing_written(tmp_path, stub_teacher, capsys):
    cfg, scene, config, ply = _setup(tmp_path)
    table = read_ply(ply)
    feats = tmp_path / "feats"
    feats.mkdir()
    names = [c.name for c in scene.cameras]
    for i, name in enumerate(names):
        np.save(feats / f"{os.path.splitext(os.path.basename(name))[0]}.npy",
                np.zeros((6 if i else 5, 4, 4), np.float32))  # the first file is 5-d, the rest 6-d
    missing_feats = tmp_path / "missing_feats"
    missing_feats.mkdir()
    for name in names[1:]:
        np.save(missing_feats / f"{os.path.splitext(os.path.basename(name))[0]}.npy", np.zeros((6, 4, 4), np.float32))

    not_3dgs = write_ply(tmp_path / "points.ply", {k: table[k] for k in ("x", "y", "z")})
    elsewhere = write_ply(tmp_path / "elsewhere.ply", {**table, "x": table["x"] + 1000.0})
    # A PLY the first training view cannot see: the Gaussians whose centres project into it are removed.
    cam = scene.cameras[scene.train_ids[0]]
    stem = os.path.splitext(os.path.basename(cam.name))[0]
    xyz = torch.tensor(np.stack([table["x"], table["y"], table["z"]], 1), dtype=torch.float32)
    keep = np.array([bool(views_without_gaussians(xyz[i:i + 1], scene, [scene.train_ids[0]]))
                     for i in range(len(xyz))])
    assert 0 < keep.sum() < len(keep)
    blind = write_ply(tmp_path / "blind.ply", {k: v[keep] for k, v in table.items()})
    inria = tmp_path / "inria" / "point_cloud" / "iteration_7000"
    inria.mkdir(parents=True)
    inria_ply = write_ply(inria / "point_cloud.ply", table)
    (tmp_path / "inria" / "cameras.json").write_text(json.dumps(
        [{"id": 0, "img_name": stem, "width": cam.width,
          "height": cam.height, "position": (cam.center + 0.5).tolist(), "rotation": np.eye(3).tolist(),
          "fx": 1.0, "fy": 1.0}]))
    stranger = tmp_path / "stranger" / "point_cloud" / "iteration_1"
    stranger.mkdir(parents=True)
    stranger_ply = write_ply(stranger / "point_cloud.ply", table)
    (tmp_path / "stranger" / "cameras.json").write_text(json.dumps(
        [{"id": 0, "img_name": "DSC_9999", "position": [0, 0, 0]}]))

    out = tmp_path / "out"
    base = ["lift", "--scene", "synthetic", "--config", str(config), "--out", str(out)]
    cases = [
        ([*base, "--ply", str(ply), "--features", str(missing_feats)], "no feature file for image"),
        ([*base, "--ply", str(ply), "--features", str(feats)], "feature widths differ"),
        ([*base, "--ply", str(not_3dgs), "--teacher", "callable"], "missing vertex properties"),
        ([*base, "--ply", str(elsewhere), "--teacher", "callable"], "none of its"),
        ([*base, "--ply", str(blind), "--teacher", "callable"], f"training view {cam.name}"),
        ([*base, "--ply", str(inria_ply), "--teacher", "callable"], f"image {stem} has its camera at"),
        ([*base, "--ply", str(stranger_ply), "--teacher", "callable"], "lists images the scene"),
        ([*base, "--ply", str(tmp_path / "absent.ply"), "--teacher", "callable"], "file not found"),
        ([*base, "--ply", str(ply)], "--features DIR"),
        ([*base, "--ply", str(ply), "--teacher", "callable", "--set", "model.render_dim=7"], "exceeds the feature"),
    ]
    for args, message in cases:
        code = main(args)
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("vkd: error:")]
        assert code == 2 and len(errors) == 1 and message in errors[0], (args, err)
        assert "Traceback" not in err
        assert not out.exists(), args  # nothing written in the run directory

    trained = tmp_path / "trained_run"
    trained.mkdir()
    (trained / "config.yaml").write_text(dump_config(cfg))
    assert main([*base[:-1], str(trained), "--ply", str(ply), "--teacher", "callable"]) == 2
    assert "not a lift" in capsys.readouterr().err


def test_two_processes_lift_the_same_field_as_one(tmp_path, stub_teacher, master_port):
    """torchrun --nproc_per_node 2 (gloo, CPU): each rank lifts half of each view batch, the sums are all-reduced;
    the field equals the one-process lift up to the summation order."""
    cfg, scene, config, ply = _setup(tmp_path)
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(stub_teacher), os.environ.get("PYTHONPATH", "")]))
    env.pop("RANK", None)
    cli = "from vkd.cli import main; raise SystemExit(main())"
    script = tmp_path / "cli.py"
    script.write_text(cli + "\n")
    one, two = tmp_path / "one", tmp_path / "two"
    proc = subprocess.run([sys.executable, str(script), *_lift_args(config, ply, one, "--set", "lift.save_every=3")],
                          env=env, timeout=600, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", master_port]
    proc = subprocess.run([*torchrun, str(script), *_lift_args(config, ply, two, "--set", "lift.save_every=3")],
                          env=env, timeout=600, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2
    a = load_checkpoint_weights(latest_checkpoint(one))
    b = load_checkpoint_weights(latest_checkpoint(two))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
