"""Point prompts (``vkd render --point VIEW X Y``) for features without text: issue 19, item 4."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor

from vkd.cli import main
from vkd.errors import UserError
from vkd.feature3dgs import render as render_module
from vkd.feature3dgs.model import GaussianField
from vkd.feature3dgs.query import DecodedSpace
from vkd.feature3dgs.render import point_prompt, render_run
from vkd.render import c2w_to_viewmat, intrinsics_from_fov, look_at

W, H = 32, 24


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # the CPU rasterizer's small ops; conftest restores the count


def _run(tmp_path) -> SimpleNamespace:
    """A stand-in for a loaded run: random Gaussians, features and decoder (render_dim 3 -> teacher 8), 3 views."""
    g = torch.Generator().manual_seed(0)
    field = GaussianField.random(300, torch.zeros(3), 1.0, 3, 8, sh_degree=0, generator=g)
    with torch.no_grad():
        field.params["opacities"].copy_(torch.randn(300, generator=g) + 1.0)
        field.params["features"].copy_(torch.randn(300, 3, generator=g))
        field.decoder.weight.normal_(generator=g)
        field.decoder.bias.normal_(generator=g)
    cams = []
    for k, eye in enumerate([(0.0, -3.0, 0.5), (3.0, 0.0, 0.5), (0.0, 3.0, 0.5)]):
        vm = c2w_to_viewmat(look_at(torch.tensor(eye), torch.zeros(3)))
        cams.append(SimpleNamespace(name=f"images/frame_{k:05d}.png", viewmat=vm, K=intrinsics_from_fov(W, H, 60.0),
                                    width=W, height=H))
    scene = SimpleNamespace(cameras=cams, train_ids=[0, 2], test_ids=[1], background=(0.0, 0.0, 0.0))
    cfg = SimpleNamespace(compute=SimpleNamespace(cpu_threads=0), model=SimpleNamespace(background=None))
    return SimpleNamespace(field=field.eval(), scene=scene, cfg=cfg, checkpoint=tmp_path, teacher_info={})


def _decode64(field: GaussianField, f: Tensor) -> Tensor:
    """Oracle: ``W·f + b`` in float64 from the decoder's weights, ``[..., N] -> [..., M]``."""
    weight, bias = field.decoder.weight.detach()[:, :, 0, 0].double(), field.decoder.bias.detach().double()
    return f.detach().double() @ weight.T + bias


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def test_point_selects_gaussians_by_cosine_with_the_rendered_pixel(tmp_path, monkeypatch):
    run = _run(tmp_path)
    field, cam = run.field, run.scene.cameras[1]
    x, y = 17, 10
    with torch.no_grad():
        rendered = field.render(cam.viewmat[None], cam.K[None], W, H, features=True)
    assert float(rendered["alpha"][0, y, x]) > 0.5  # the pixel sees the Gaussians
    prompt64 = _unit(_decode64(field, rendered["features"][0, y, x]))  # [M] the decoded pixel feature
    cos = _unit(_decode64(field, field.params["features"])) @ prompt64  # [G]
    ranked = cos.sort().values
    threshold = float(ranked[200] + ranked[201]) / 2  # between two cosines: rounding cannot move one across
    expected = cos >= threshold
    assert 0 < int(expected.sum()) < field.num_gaussians

    space = DecodedSpace.of_field(field)
    for view in ("images/frame_00001.png", "frame_00001", "1"):  # a name, a short name, an index
        got = point_prompt(run, (view, str(x), str(y)), "extract", threshold, space)
        assert got["view_index"] == 1 and got["pixel"] == [x, y]
        assert torch.equal(got["selected"], expected)

    # Through render_run: the edit counts, and the similarity stream is the per-pixel cosine with the prompt.
    monkeypatch.setattr(render_module, "load_run", lambda run_dir: run)
    maps: list[Tensor] = []
    real_colormap = render_module.colormap
    monkeypatch.setattr(render_module, "colormap",
                        lambda values, *a, **k: maps.append(values.clone()) or real_colormap(values, *a, **k))
    out = render_run(tmp_path, "test", 0, None, "delete", threshold, tmp_path / "out", "png", progress=False,
                     point=("1", str(x), str(y)))
    assert out["selected_gaussians"] == int(expected.sum())
    assert out["kept_gaussians"] == field.num_gaussians - int(expected.sum())
    assert out["point"] == {"view": cam.name, "view_index": 1, "x": x, "y": y}
    assert (tmp_path / "out" / "similarity" / "frame_00000.png").is_file()
    assert not (tmp_path / "out" / "relevancy").exists()
    assert json.loads((tmp_path / "out" / "render.json").read_text())["threshold"] == threshold
    # The frame is the test view (view 1) with the deleted Gaussians' opacity zeroed.
    with torch.no_grad():
        edited = field.render(cam.viewmat[None], cam.K[None], W, H, features=True,
                              opacity_mask=(~expected).float())["features"][0]  # [H, W, N]
    oracle = _unit(_decode64(field, edited)) @ prompt64  # [H, W] cosines
    similarity = maps[-1]  # depth, then similarity, per frame
    torch.testing.assert_close(similarity.double(), oracle, atol=1e-5, rtol=0)
    assert float(oracle.std()) > 0.1  # not a constant map: the comparison can fail


def test_point_prompt_errors_are_one_line_with_exit_code_2(tmp_path, monkeypatch, capsys):
    run = _run(tmp_path)
    monkeypatch.setattr(render_module, "load_run", lambda run_dir: run)
    out = tmp_path / "out"
    cases = [
        (["--point", "nope", "3", "4"], "unknown view 'nope'"),
        (["--point", "3", "3", "4"], "unknown view '3'"),  # 3 cameras: indices 0..2
        (["--point", "1", str(W), "4"], f"pixel ({W}, 4) is outside view 'images/frame_00001.png'"),
        (["--point", "1", "3", "-1"], "pixel (3, -1) is outside"),
        (["--point", "1", "2.5", "4"], "X and Y must be integer pixel coordinates"),
        (["--point", "1", "3", "4", "--extract", "--threshold", "1.5"], "must be in [-1, 1]"),
    ]
    for args, message in cases:
        code = main(["render", "--run", str(tmp_path), "--out", str(out), "--format", "png", *args])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("vkd: error:")]
        assert code == 2 and len(errors) == 1 and message in errors[0], (args, err)
        assert "Traceback" not in err and not out.exists()
    with pytest.raises(SystemExit) as exc:  # argparse: --query and --point are one exclusive group
        main(["render", "--run", str(tmp_path), "--point", "1", "3", "4", "--query", "red"])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(UserError, match="mutually exclusive"):
        render_run(tmp_path, "test", 0, "red", None, None, out, "png", point=("1", "3", "4"))
