"""A tiny end-to-end HeLlO run through the CLI functions and the engine (digits at 16 px, IPC 1, CPU)."""

import json

import torch

from vkd.config import apply_overrides
from vkd.hello.commands import evaluate_hello, run_hello, run_teacher
from vkd.hello.config import HelloConfig, HelloTeacherConfig
from vkd.hello.projector import load_adapters, read_adapter_meta


def test_projector_labels_beat_hard_labels(tmp_path):
    out = str(tmp_path / "runs")
    teacher_cfg = apply_overrides(HelloTeacherConfig(), [
        f"run.output_dir={out}", "model.width=16", "extra.num_snapshots=3", "train.steps=300",
        "train.checkpoint_every=1000", "train.log_every=100"])
    summary = run_teacher(teacher_cfg)
    assert summary["eval"]["test_acc"] > 0.9
    teacher_dir = teacher_cfg.run_dir()
    assert len(list((teacher_dir / "teachers").glob("teacher-step*.safetensors"))) == 3

    cfg = apply_overrides(HelloConfig(), [
        f"run.output_dir={out}", f"clip.cache_dir={tmp_path / 'cache'}", "clip.tiny.width=32", "clip.tiny.layers=2",
        "clip.tiny.text_width=32", "clip.tiny.embed_dim=32", "clip.tiny.steps=200", "clip.tiny.batch_size=64",
        "clip.tiny.lr=1e-3", "train.steps=150", "train.checkpoint_every=1000", "train.log_every=50",
        "selection.ipc=1", "selection.mipc=40", "student.steps=150", "student.model.width=16",
        "eval.sources=[hard,projector,random]", "eval.seeds=[0]"])
    summary = run_hello(cfg)
    run_dir = cfg.run_dir()
    info = json.loads((run_dir / "hello.json").read_text())
    assert info["zero_shot_test_acc"] > 0.6 and info["projector_test_acc"] > 0.6, info
    assert summary["adapter_bytes"] == info["adapter"]["bytes"] > 0
    manifest = json.loads((run_dir / "distilled" / "manifest.json").read_text())
    assert len(manifest["entries"]) == 10 and manifest["ipc"] == 1
    assert all((run_dir / "distilled" / e["path"]).is_file() for e in manifest["entries"])
    assert read_adapter_meta(run_dir / "projector_adapters.safetensors")["clip_model"].startswith("local-dir:")
    projector = load_adapters(run_dir / "projector_adapters.safetensors")  # base CLIP found from the metadata
    assert projector(torch.rand(2, 3, 16, 16)).shape == (2, 10)

    metrics = evaluate_hello(run_dir, [], None)
    assert (run_dir / "eval.json").is_file()
    # online projector labels beat hard labels clearly on the same 10 images (spec §9 test 7;
    # measured margins 0.20-0.27 on a loaded machine)
    assert metrics["acc_projector_mean"] > metrics["acc_hard_mean"] + 0.1, metrics
    assert 0.0 < metrics["acc_random_mean"] <= 1.0 and "ior" in metrics
    assert metrics["soft_label_bytes"] == 300 * 10 * 10 * 2
    assert metrics["storage_ratio"] == metrics["adapter_bytes"] / metrics["soft_label_bytes"]
