"""End to end on a tiny synthetic scene: distil (engine), evaluate, export, render, query."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from f3d_helpers import tiny_cfg

from vkd.errors import UserError
from vkd.feature3dgs.commands import evaluate, render, run
from vkd.feature3dgs.distiller import build_task
from vkd.registry import get_task

FEATURE3DGS = get_task("feature3dgs")



def test_train_eval_render(tmp_path, stub_teacher):
    cfg = tiny_cfg(tmp_path)
    torch.set_num_threads(1)  # as run() will (compute.cpu_threads=1)
    task, dataset, prep = build_task(cfg, progress=False)
    before = task.evaluator.evaluate(task.student, fps=False)
    assert len(dataset) == 6 and before["num_views"] == 2
    torch.set_num_threads(2)
    summary = run(cfg)
    # compute.cpu_threads=1 applies inside run() only: a later task in the same process keeps its threads
    assert torch.get_num_threads() == 2
    after = summary["eval"]
    # Training improves held-out feature similarity substantially over the zero-initialised features.
    assert after["feature_cosine"] > 0.9
    assert after["feature_cosine"] - before["feature_cosine"] > 0.3
    assert after["feature_l1"] < before["feature_l1"]
    assert after["psnr"] > before["psnr"] and after["teacher_label_acc"] > 0.7
    assert {"ssim", "teacher_label_miou", "true_label_acc", "teacher_true_label_acc", "fps"} <= set(after)
    run_dir = cfg.run_dir()
    assert (run_dir / "export" / "point_cloud.ply").is_file() and (run_dir / "export" / "field.safetensors").is_file()
    assert summary["teacher"]["kind"] == "callable" and summary["checkpoint"]
    assert json.loads((run_dir / "summary.json").read_text())["timings_s"]["training"] > 0

    metrics = evaluate(run_dir, [], tmp_path / "eval")
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["feature_cosine"] == pytest.approx(
        metrics["feature_cosine"])
    assert metrics["feature_cosine"] == pytest.approx(after["feature_cosine"], abs=1e-4)
    assert torch.get_num_threads() == 2

    # Test views as PNG frames.
    out = render(run_dir, "test", 0, None, None, None, tmp_path / "r_test", "png")
    assert out["frames"] == 2
    for stream in ("rgb", "depth", "features"):
        assert sorted(p.name for p in (tmp_path / "r_test" / stream).iterdir()) == ["frame_00000.png",
                                                                                   "frame_00001.png"]
    assert not (tmp_path / "r_test" / "relevancy").exists()
    # An orbit with a text query and extraction, as GIFs.
    out = render(run_dir, "orbit", 3, "red sphere", "extract", None, tmp_path / "r_orbit", "gif")
    assert out["frames"] == 3 and out["label_set"][0] == "red sphere"
    assert 0 < out["selected_gaussians"] < out["num_gaussians"] and out["kept_gaussians"] == out[
        "selected_gaussians"]
    for stream in ("rgb", "depth", "features", "relevancy"):
        assert (tmp_path / "r_orbit" / f"{stream}.gif").stat().st_size > 0
        assert len(list((tmp_path / "r_orbit" / stream).glob("frame_*.png"))) == 3
    assert json.loads((tmp_path / "r_orbit" / "render.json").read_text())["edit"] == "extract"
    assert torch.get_num_threads() == 2
    with pytest.raises(UserError, match="needs --query"):
        render(run_dir, "test", 0, None, "delete", None, None, "png")
    with pytest.raises(UserError, match="unknown views"):
        render(run_dir, "sideways", 0, None, None, None, None, "png")

    # A run whose teacher has no text tower cannot be queried.
    other = tmp_path / "runs" / "feature3dgs" / "notext"
    shutil.copytree(run_dir, other)
    info = json.loads((other / "teacher" / "teacher.json").read_text())
    info.update(target="f3d_stub_teacher:no_text", text_aligned=False)
    (other / "teacher" / "teacher.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match="text-aligned"):
        render(other, "test", 1, "red sphere", None, None, None, "png")
    assert FEATURE3DGS.name == "feature3dgs" and FEATURE3DGS.preset_dir == "feature3dgs"


@pytest.mark.slow
def test_tiny_clip_pipeline(tmp_path):
    """The embedded default path: tiny CLIP pretrained on the scene's crops, distilled, queried."""
    cfg = tiny_cfg(tmp_path, "tinyclip", ["teacher.kind=tiny_clip", "teacher.tiny.steps=60",
                                      "teacher.tiny.crops_per_view=16", "teacher.input_size=48",
                                      "data.synthetic.resolution=32", "train.steps=150",
                                      "train.checkpoint_every=150", "densify.refine_stop=120"])
    torch.set_num_threads(1)  # as run() will (compute.cpu_threads=1)
    task, _, _ = build_task(cfg, progress=False)
    before = task.evaluator.evaluate(task.student, fps=False)
    summary = run(cfg)
    after = summary["eval"]
    assert summary["teacher"]["kind"] == "tiny_clip" and summary["teacher"]["tiny_clip_zero_shot"] > 0.5
    assert after["feature_cosine"] > 0.7 and after["feature_cosine"] - before["feature_cosine"] > 0.3
    out = render(cfg.run_dir(), "test", 1, "red sphere", "delete", None, tmp_path / "r", "png")
    assert (tmp_path / "r" / "relevancy" / "frame_00000.png").is_file()
    assert out["selected_gaussians"] > 0
