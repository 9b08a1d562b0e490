"""Renders of a run follow its field (rasterize mode, backend, SH degree); `vkd render` colours and queries in the
render_dim space; the segmentation protocol at the rendered resolution (issue 18, items 3 and 7)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from f3d_helpers import tiny_cfg
from PIL import Image
from scipy.interpolate import RegularGridInterpolator

import vkd.feature3dgs.model as model_module
from vkd.feature3dgs.evaluate import Evaluator, protocol_labels, protocol_size, run_evaluator
from vkd.feature3dgs.model import GaussianField, row_bands
from vkd.feature3dgs.query import DecodedSpace, label_scores, relevancy, select_gaussians
from vkd.feature3dgs.render import fit_scene_pca, render_run
from vkd.feature3dgs.runs import load_run
from vkd.feature3dgs.visualize import PCAColorizer, to_uint8
from vkd.render import c2w_to_viewmat, intrinsics_from_fov, look_at


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()  # compute.cpu_threads changes a process-wide setting: restore it
    torch.set_num_threads(1)  # the rasterizer's many small ops are much faster on 1 thread on a shared machine
    yield
    torch.set_num_threads(threads)




def _field(num=400, render_dim=3, teacher_dim=16, sh_degree=1, seed=0) -> GaussianField:
    """Random Gaussians of varied size (some sub-pixel) around the origin, random features and decoder."""
    g = torch.Generator().manual_seed(seed)
    f = GaussianField.random(num, torch.zeros(3), 1.0, render_dim, teacher_dim, sh_degree=sh_degree, generator=g)
    with torch.no_grad():
        f.params["scales"].add_(torch.randn(num, 3, generator=g) * 0.6)
        f.params["opacities"].copy_(torch.randn(num, generator=g))
        f.params["features"].copy_(torch.randn(num, render_dim, generator=g))
        if "shN" in f.params:
            f.params["shN"].normal_(0, 0.2, generator=g)
        f.decoder.weight.normal_(generator=g)
        f.decoder.bias.normal_(generator=g)
    f.active_sh_degree = sh_degree
    return f.eval()


def _camera(width=48, height=36, eye=(0.0, -3.0, 0.5)):
    vm = c2w_to_viewmat(look_at(torch.tensor(eye), torch.zeros(3)))[None]  # [1, 4, 4]
    return vm, intrinsics_from_fov(width, height, fov_x=60.0)[None]  # [1, 3, 3]


def _decode(field: GaussianField, fmap: torch.Tensor) -> torch.Tensor:
    """Oracle decode ``[B, N, H, W] -> [B, M, H, W]`` in float64 from the decoder's weights."""
    W, b = field.decoder.weight.detach()[:, :, 0, 0].double(), field.decoder.bias.detach().double()
    return torch.einsum("mn,bnhw->bmhw", W, fmap.detach().double()) + b[None, :, None, None]


# ---- B: the render_dim-space path equals decode-then-project ---------------------------------------------------
def test_decoded_space_cosines_relevancy_and_selection_equal_explicit_decode():
    field = _field()
    vm, K = _camera()
    with torch.no_grad():
        fmap = field.render(vm, K, 48, 36)["features"].permute(0, 3, 1, 2)  # [1, N, H, W]
    decoded = _decode(field, fmap)  # [1, M, H, W] float64 oracle
    text = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))  # [K, M]
    space = DecodedSpace.of_field(field)
    coords, text_d = space.features(fmap, dim=1), space.vectors(text)
    assert coords.shape[1] == field.render_dim + 2  # N + 2 channels instead of M
    torch.testing.assert_close(coords.norm(dim=1).double(), decoded.norm(dim=1), atol=1e-5, rtol=1e-5)
    cos_oracle = torch.einsum("bmhw,km->bkhw", F.normalize(decoded, dim=1), F.normalize(text.double(), dim=-1))
    torch.testing.assert_close(label_scores(coords, text_d).double(), cos_oracle, atol=1e-5, rtol=0)
    rel_oracle = torch.softmax(10.0 * cos_oracle, dim=1)[:, 0]
    torch.testing.assert_close(relevancy(coords, text_d[0], text_d[1:], 10.0).double(), rel_oracle, atol=1e-5,
                               rtol=0)
    assert float(rel_oracle.std()) > 0.05  # the maps are not constant: the comparison can fail
    # Gaussian selection on [G, N + 2] coordinates = on the folded [G, M] features.
    with torch.no_grad():
        folded = field.folded_features()
        gauss = space.features(field.params["features"])
    for mode, thr in (("extract", None), ("delete", 0.3)):
        ours = select_gaussians(gauss, text_d, [0, 2], thr, mode)
        assert torch.equal(ours, select_gaussians(folded, text, [0, 2], thr, mode))
        assert 0 < int(ours.sum()) < field.num_gaussians


def test_pca_pull_back_equals_project_of_decoded():
    field = _field()
    vm, K = _camera()
    with torch.no_grad():
        fmap = field.render(vm, K, 48, 36)["features"].permute(0, 3, 1, 2)
    decoded = _decode(field, fmap).float()
    pca = PCAColorizer.fit(decoded.flatten(2)[0].T)
    space = DecodedSpace.of_field(field)
    pulled = pca.pull_back(space.vectors(pca.components.T).T)
    explicit = ((decoded.permute(0, 2, 3, 1) - pca.mean) @ pca.components - pca.lo) / (pca.hi - pca.lo)  # [1, H, W, 3]
    ours = pulled(space.features(fmap, dim=1))
    torch.testing.assert_close(ours, explicit.clamp(0, 1), atol=1e-5, rtol=0)
    assert float(ours.std()) > 0.1


def test_fit_scene_pca_equals_fit_on_decoded_renders():
    """Today's fit (decode every training render, sample 20000 pixels by alpha, PCA) = the render_dim-space fit."""
    field = _field()
    eyes = [(3 * math.cos(a), 3 * math.sin(a), 0.5) for a in (0.0, 1.5, 3.0, 4.5)]
    cams = []
    for eye in eyes:
        vm, K = _camera(96, 72, eye)
        cams.append(SimpleNamespace(viewmat=vm[0], K=K[0], width=96, height=72))
    scene = SimpleNamespace(train_ids=[0, 1, 2, 3], cameras=cams)  # 4 x 96 x 72 > 20000 pixels: sampling applies
    feats, weights = [], []
    with torch.no_grad():
        for c in cams:
            r = field.render(c.viewmat[None], c.K[None], c.width, c.height, features=True)
            feats.append(field.decode(r["features"].permute(0, 3, 1, 2))[0].flatten(1).T)
            weights.append(r["alpha"][0, ..., 0].flatten())
    torch.manual_seed(0)  # torch.pca_lowrank draws from the global generator
    oracle = PCAColorizer.fit(torch.cat(feats), weights=torch.cat(weights), max_samples=20000)
    torch.manual_seed(0)
    ours = fit_scene_pca(field, scene)
    for name in ("mean", "components", "lo", "hi"):
        torch.testing.assert_close(getattr(ours, name), getattr(oracle, name), atol=1e-5, rtol=1e-5)


def test_banded_render_equals_one_call():
    field = _field(num=600, render_dim=4)
    vm, K = _camera(48, 40)
    bg = torch.tensor([0.2, 0.3, 0.4])
    with torch.no_grad():
        for mode in ("classic", "antialiased"):
            one = field.render(vm, K, 48, 40, background=bg, depth=True, rasterize_mode=mode)
            banded = field.render(vm, K, 48, 40, background=bg, depth=True, rasterize_mode=mode, max_pairs=150)
            assert len(banded["meta"]["bands"]) > 2
            for key in ("rgb", "alpha", "features", "depth"):
                torch.testing.assert_close(banded[key], one[key], atol=1e-6, rtol=0)
    # With autograd the budget is ignored (one call, full meta for densification).
    out = field.render(vm, K, 48, 40, max_pairs=150)
    assert "means2d" in out["meta"]


def test_row_bands_follow_the_pair_estimate():
    # Gaussian A: 1 tile in tile row 0; Gaussian B: 2 tiles in each of tile rows 1..3 (8-px tiles, 32x32 image).
    means2d = torch.tensor([[[4.0, 4.0], [16.0, 20.0], [0.0, 0.0]]])  # [C, G, 2]
    radii = torch.tensor([[[3, 3], [8, 8], [0, 0]]], dtype=torch.int32)  # the third is culled
    # Pairs per tile row [1, 2, 2, 2]; budget 3 -> rows {0, 1}, {2}, {3}.
    assert row_bands(means2d, radii, 32, 32, 3) == [(0, 16), (16, 24), (24, 32)]
    assert row_bands(means2d, radii, 32, 30, 100) == [(0, 30)]
    assert row_bands(means2d, radii, 32, 32, 0) == [(0, 8), (8, 16), (16, 24), (24, 32)]


# ---- A: every render of a run uses its rasterize mode ------------------------------------------------------------
def test_run_renders_follow_rasterize_mode(tmp_path, stub_teacher, monkeypatch):
    from vkd.feature3dgs.commands import run

    cfg = tiny_cfg(tmp_path, "aa", ["model.rasterize_mode=antialiased", "model.backend=torch", "densify.enabled=false",
                                "train.steps=4", "train.checkpoint_every=4", "model.sh_degree=1",
                                "model.sh_degree_interval=2"])
    run(cfg)
    calls: list[tuple[str, str]] = []
    real = model_module.rasterization

    def spy(*args, **kwargs):
        calls.append((kwargs.get("rasterize_mode"), kwargs.get("backend")))
        return real(*args, **kwargs)

    monkeypatch.setattr(model_module, "rasterization", spy)
    loaded = load_run(cfg.run_dir())
    assert loaded.field.active_sh_degree == 1  # the degree training reached, not the initial 0
    field, scene = loaded.field, loaded.scene
    ev = run_evaluator(loaded)
    metrics = ev.evaluate(field, fps=True)
    ev.save_samples(field, tmp_path / "samples.png")
    render_run(cfg.run_dir(), "test", 1, "red sphere", None, None, tmp_path / "r", "png", progress=False)
    assert calls and set(calls) == {("antialiased", "torch")}  # evaluation, FPS, samples, PCA fit, frames
    monkeypatch.setattr(model_module, "rasterization", real)

    # The values: the evaluator's PSNR and the rendered frame are those of the antialiased render.
    i = scene.test_ids[0]
    cam = scene.cameras[i]
    bg = torch.tensor(scene.background, dtype=torch.float32)
    with torch.no_grad():
        aa, classic = (field.render(cam.viewmat[None], cam.K[None], cam.width, cam.height, background=bg,
                                    rasterize_mode=m)["rgb"][0].clamp(0, 1) for m in ("antialiased", "classic"))
    frame = np.asarray(Image.open(tmp_path / "r" / "rgb" / "frame_00000.png")).astype(int)
    assert np.abs(frame - to_uint8(aa).astype(int)).max() <= 1
    assert np.abs(frame - to_uint8(classic).astype(int)).mean() > 2.0  # the compensation matters at this size

    def psnr(img: torch.Tensor, j: int) -> float:
        return float(-10 * torch.log10(((img.permute(2, 0, 1) - scene.load_image(j)) ** 2).mean()))

    psnrs = {m: [] for m in ("antialiased", "classic")}
    for j in ev.views:
        c = scene.cameras[j]
        with torch.no_grad():
            for m in psnrs:
                out = field.render(c.viewmat[None], c.K[None], c.width, c.height, background=bg, rasterize_mode=m)
                psnrs[m].append(psnr(out["rgb"][0].clamp(0, 1), j))
    assert metrics["psnr"] == pytest.approx(sum(psnrs["antialiased"]) / len(ev.views), abs=1e-3)
    assert abs(metrics["psnr"] - sum(psnrs["classic"]) / len(ev.views)) > 0.1


# ---- C: segmentation at the rendered resolution --------------------------------------------------------------------
def _bilinear_align_corners(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Oracle: ``[C, h, w]`` sampled at an ``align_corners=True`` grid of ``size`` with scipy's linear interpolant."""
    c, h, w = x.shape
    ys, xs = np.linspace(0, h - 1, size[0]), np.linspace(0, w - 1, size[1])
    pts = np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)
    out = [RegularGridInterpolator((np.arange(h), np.arange(w)), x[k], method="linear")(pts) for k in range(c)]
    return np.stack(out).reshape(c, *size)


def _argmax_cosine(x: np.ndarray, text: np.ndarray) -> np.ndarray:
    xn = x / np.linalg.norm(x, axis=0, keepdims=True)
    tn = text / np.linalg.norm(text, axis=1, keepdims=True)
    return np.einsum("mhw,km->khw", xn, tn).argmax(0)


@pytest.mark.parametrize("size,max_width", [((5, 7), 480), ((6, 16), 8)])
def test_protocol_labels_match_bilinear_oracle(size, max_width):
    g = torch.Generator().manual_seed(3)
    M, N = 3, 2
    text = torch.eye(M) + 0.1 * torch.randn(M, M, generator=g)  # [K, M]
    teacher = torch.randn(1, M, 2, 3, generator=g)  # [1, M, h, w] patch grid
    fmap = torch.randn(1, N, *size, generator=g)  # [1, N, H, W] rendered features
    W, b = torch.randn(M, N, generator=g), torch.randn(M, generator=g)
    s_lab, t_lab = protocol_labels(fmap, DecodedSpace.of_decoder(W, b), teacher, text, None, max_width)

    out_size = protocol_size(*size, max_width)
    assert out_size == (size if size[1] <= max_width else (3, 8))
    decoded = np.einsum("mn,nhw->mhw", W.double().numpy(), fmap[0].double().numpy()) + b.double().numpy()[:, None,
                                                                                                          None]
    if out_size != size:  # the reference decodes at the render size, then resizes
        decoded = _bilinear_align_corners(decoded, out_size)
    t_oracle = _argmax_cosine(_bilinear_align_corners(teacher[0].double().numpy(), out_size), text.double().numpy())
    s_oracle = _argmax_cosine(decoded, text.double().numpy())
    assert s_lab.shape == t_lab.shape == out_size
    np.testing.assert_array_equal(t_lab.numpy(), t_oracle)
    np.testing.assert_array_equal(s_lab.numpy(), s_oracle)
    assert len(np.unique(t_oracle)) > 1 and len(np.unique(s_oracle)) > 1


class _RecordingTeacher:
    text_aligned = True

    def __init__(self):
        self.prompts: list[str] = []

    def encode_text(self, prompts):
        self.prompts = list(prompts)
        return torch.eye(len(prompts), 4)


def test_evaluator_prompts_are_the_teachers_own_by_default(tmp_path):
    from vkd.config import load_config
    from vkd.feature3dgs.config import Feature3DGSConfig

    scene = SimpleNamespace(label_names=["background", "red sphere", "floor"], test_ids=[0], train_ids=[1],
                            background=(0.0, 0.0, 0.0))
    cfg = load_config(Feature3DGSConfig, None, [f"run.output_dir={tmp_path}"], task="feature3dgs")
    teacher = _RecordingTeacher()
    ev = Evaluator.build(cfg, scene, None, teacher, {})
    assert teacher.prompts == ["red sphere", "floor"] and ev.segmentation == "render"
    # auto: the embedded tiny CLIP is labelled with the caption template its text tower was pretrained on
    Evaluator.build(cfg, scene, None, teacher, {"kind": "tiny_clip"})
    assert teacher.prompts == ["a photo of the red sphere.", "a photo of the floor."]
    Evaluator.build(cfg, scene, None, teacher, {"kind": "maskclip"})
    assert teacher.prompts == ["red sphere", "floor"]
    from vkd.errors import ConfigError
    from vkd.feature3dgs.query import label_prompt_template

    assert label_prompt_template("auto", {"kind": "tiny_clip"}) == "a photo of the {}."  # vkd render --query too
    assert label_prompt_template("auto", {"kind": "callable"}) == "{}"
    assert label_prompt_template("a {} here", {"kind": "tiny_clip"}) == "a {} here"
    with pytest.raises(ConfigError, match="query.prompt_template"):
        load_config(Feature3DGSConfig, None, ["query.prompt_template=no placeholder"], task="feature3dgs")
    old = load_config(Feature3DGSConfig, None, [f"run.output_dir={tmp_path}", "eval.segmentation=teacher_grid",
                                                "eval.prompt_template=a photo of the {}."], task="feature3dgs")
    ev = Evaluator.build(old, scene, None, teacher, {})
    assert teacher.prompts == ["a photo of the red sphere.", "a photo of the floor."]
    assert ev.segmentation == "teacher_grid"


def test_evaluator_labels_at_render_resolution(tmp_path):
    """Evaluator metrics (render protocol) = the oracle's labels of the rendered, decoded map vs the upsampled teacher;
    the earlier protocol labels on the teacher grid and gives other figures."""
    field = _field(render_dim=3, teacher_dim=4)
    vm, K = _camera(40, 30)
    teacher = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(5))  # [M, h, w]
    cam = SimpleNamespace(viewmat=vm[0], K=K[0], width=40, height=30)
    scene = SimpleNamespace(cameras=[cam], label_names=None, test_ids=[0],
                            load_image=lambda i: torch.rand(3, 30, 40, generator=torch.Generator().manual_seed(0)))
    cache = SimpleNamespace(get=lambda i: teacher)
    text = torch.eye(4) + 0.2
    metrics = Evaluator(scene, cache, [0], text, ["a", "b", "c", "d"]).evaluate(field, fps=False)
    with torch.no_grad():
        fmap = field.render(vm, K, 40, 30, background=torch.zeros(3))["features"].permute(0, 3, 1, 2)
    s_oracle = _argmax_cosine(_decode(field, fmap)[0].numpy(), text.double().numpy())
    t_oracle = _argmax_cosine(_bilinear_align_corners(teacher.double().numpy(), (30, 40)), text.double().numpy())
    assert metrics["teacher_label_acc"] == pytest.approx(float((s_oracle == t_oracle).mean()), abs=1e-6)
    assert len(np.unique(t_oracle)) > 1
    old = Evaluator(scene, cache, [0], text, ["a", "b", "c", "d"], segmentation="teacher_grid").evaluate(
        field, fps=False)
    assert old["teacher_label_acc"] != metrics["teacher_label_acc"]


def test_evaluator_rejects_unknown_protocol():
    with pytest.raises(ValueError, match="segmentation"):
        Evaluator(SimpleNamespace(label_names=None), None, [], None, [], segmentation="patch")


def test_render_run_streams_without_holding_frames(tmp_path, monkeypatch):
    """Frames go to the video writer as they are rendered: the writer has frame k before frame k + 1 is rendered."""
    from vkd.feature3dgs import render as render_module

    events: list[str] = []

    class Recorder:
        def __init__(self, path, fps=24):
            self.path = Path(path)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            events.append(f"close {self.path.stem}")

        def append(self, frame):
            events.append(f"append {self.path.stem}")

    real_render = GaussianField.render

    def render(self, *args, **kwargs):
        if kwargs.get("depth"):
            events.append("render")
        return real_render(self, *args, **kwargs)

    field = _field(render_dim=3, teacher_dim=6, sh_degree=0)
    cams = [SimpleNamespace(viewmat=_camera(24, 16, e)[0][0], K=_camera(24, 16, e)[1][0], width=24, height=16,
                            name=f"v{k}") for k, e in enumerate([(0, -3, 0.5), (3, 0, 0.5), (0, 3, 0.5)])]
    scene = SimpleNamespace(cameras=cams, test_ids=[0, 1, 2], train_ids=[0, 1, 2], background=(0.0, 0.0, 0.0))
    model_cfg = SimpleNamespace(background=None)
    cfg = SimpleNamespace(compute=SimpleNamespace(cpu_threads=0), model=model_cfg)
    loaded = SimpleNamespace(field=field, scene=scene, cfg=cfg, checkpoint=tmp_path, teacher_info={})
    monkeypatch.setattr(render_module, "load_run", lambda run_dir: loaded)
    monkeypatch.setattr(render_module, "VideoWriter", Recorder)
    monkeypatch.setattr(GaussianField, "render", render)
    render_run(tmp_path, "test", 0, None, None, None, tmp_path / "out", "mp4", progress=False)
    frame_events = [e for e in events if e == "render" or e == "append rgb"]
    assert frame_events == ["render", "append rgb"] * 3
    assert events[-3:] == ["close features", "close depth", "close rgb"]
