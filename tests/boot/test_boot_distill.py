"""BOOT through the engine: data-free inputs, smoke run, checkpoint/resume, export, sampling, FID on a run,
and the embedded teacher's training task (tiny models, a few steps)."""

from __future__ import annotations

import json

import pytest
import torch
from boot_helpers import save_tiny_teacher
from PIL import Image

from vkd.boot.commands import run_boot, run_teacher, sample
from vkd.boot.config import BootConfig, BootTeacherConfig
from vkd.boot.distiller import draw_boot_inputs
from vkd.boot.student import load_student
from vkd.boot.teacher import load_diffusers_teacher
from vkd.config import load_config
from vkd.engine import latest_checkpoint, load_checkpoint_weights
from vkd.errors import ConfigError, UserError
from vkd.registry import get_task

BOOT, BOOT_TEACHER = get_task("boot"), get_task("boot-teacher")

def test_inputs_depend_only_on_seed_and_index():
    """Two processes holding halves of a global batch draw exactly the single-process inputs."""
    full = draw_boot_inputs(torch.arange(8), 3, (1, 4, 4), 1000, 20, num_classes=10)
    halves = [draw_boot_inputs(torch.arange(a, a + 4), 3, (1, 4, 4), 1000, 20, num_classes=10) for a in (0, 4)]
    for k in range(4):
        torch.testing.assert_close(full[k], torch.cat([h[k] for h in halves]))
    eps, t, s, c = full
    assert t.dtype == torch.float64 and bool(((t >= 19) & (t <= 999)).all()) and torch.equal(s, t - 20)
    assert not torch.equal(eps, draw_boot_inputs(torch.arange(8), 4, (1, 4, 4), 1000, 20)[0])  # seed matters
    # continuous time: s < 0 maps to the clean endpoint
    _, t2, s2, _ = draw_boot_inputs(torch.arange(200), 0, (1, 2, 2), 1000, 20, time_sampling="continuous")
    assert bool((s2 >= -1).all()) and bool(((s2 == -1) == (t2 < 20)).all())
    # without the clean endpoint t starts at δ and s at 0
    _, t3, s3, _ = draw_boot_inputs(torch.arange(200), 0, (1, 2, 2), 1000, 20, clean_endpoint=False)
    assert float(t3.min()) >= 20 and float(s3.min()) >= 0


def _boot_cfg(tmp_path, teacher_dir, name="run", steps=4, **overrides) -> BootConfig:
    sets = [f"teacher.path={teacher_dir}", f"run.output_dir={tmp_path / 'runs'}", f"run.name={name}",
            f"train.steps={steps}", "train.batch_size=4", "train.checkpoint_every=2", "train.log_every=1",
            "train.device=cpu", "train.lr=1e-3", "sample.num=4", "sample.teacher_steps=2", "eval.num_samples=0"]
    sets += [f"{k}={v}" for k, v in overrides.items()]
    return load_config(BootConfig, None, sets, task="boot")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "t", "epsilon", num_classes=3)


def test_boot_smoke_resume_export_and_sample(tmp_path, teacher_dir):
    summary = run_boot(_boot_cfg(tmp_path, teacher_dir, "full", steps=4))
    run_dir = tmp_path / "runs" / "boot" / "full"
    assert summary["status"] == "finished" and summary["steps"] == 4
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)
    assert {"bootstrap", "boundary", "out_rms_s"} <= set(records[0])
    assert (run_dir / "samples" / "student_step000004.png").is_file()
    assert (run_dir / "samples" / "teacher_ddim2.png").is_file()
    # the teacher is frozen and not checkpointed; the student is
    weights = load_checkpoint_weights(latest_checkpoint(run_dir))
    assert weights and all(k.startswith("student.") for k in weights)

    # resume: 2 steps, then continue to 4 → the same weights as the uninterrupted run
    run_boot(_boot_cfg(tmp_path, teacher_dir, "split", steps=2))
    run_boot(_boot_cfg(tmp_path, teacher_dir, "split", steps=4), resume="latest")
    resumed = load_checkpoint_weights(latest_checkpoint(tmp_path / "runs" / "boot" / "split"))
    for k, v in weights.items():
        torch.testing.assert_close(resumed[k], v, rtol=1e-5, atol=1e-6, msg=k)

    # the exported student reproduces the task's one-step samples
    student, meta = load_student(run_dir / "pipeline")
    assert meta["num_classes"] == 3 and student.t_sample == -1.0
    ckpt_student = {k[len("student."):]: v for k, v in weights.items()}
    assert all(torch.equal(student.state_dict()[k], v) for k, v in ckpt_student.items())

    # vkd sample boot: student, then teacher DDIM-K on the same seeded noise
    res = sample(run_dir, 5, tmp_path / "s", None, 0, 2)
    assert len(list((tmp_path / "s").glob("*.png"))) == 5 and (tmp_path / "s" / "grid" / "grid.png").is_file()
    assert res["images_per_s"] > 0 and res["image_size"] == "1x8x8"
    res_t = sample(run_dir, 3, tmp_path / "t", 2, 0, 2)
    assert res_t["generator"].startswith("teacher (DDIM 2") and len(list((tmp_path / "t").glob("*.png"))) == 3
    with Image.open(tmp_path / "s" / "000000.png") as im:
        assert im.size == (8, 8)


def test_fid_of_a_run_directory(tmp_path, teacher_dir):
    """``vkd fid --fake RUN`` samples the run's student with per-index seeds."""
    from vkd.metrics.fid_command import fid_command

    run_boot(_boot_cfg(tmp_path, teacher_dir, "fid", steps=1))
    run_dir = tmp_path / "runs" / "boot" / "fid"
    real = tmp_path / "real"
    real.mkdir()
    for i in range(6):
        Image.fromarray((torch.rand(8, 8) * 255).to(torch.uint8).numpy(), mode="L").save(real / f"{i}.png")

    class Feat(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x.mean(dim=(1, 2, 3))[:, None], x[:, 0, :2, :2].flatten(1)], 1)

    torch.jit.script(Feat()).save(str(tmp_path / "f.ts"))
    out = fid_command(str(real), str(run_dir), str(tmp_path / "f.ts"), None, 4, 7, None, "cpu")
    assert out["fake_source"] == "run" and out["num_samples"] == 7 and out["fid"] >= 0
    again = fid_command(str(real), str(run_dir), str(tmp_path / "f.ts"), None, 3, 7, None, "cpu")
    assert again["fid"] == pytest.approx(out["fid"], rel=1e-6)  # batch size does not change the sample set


def test_boot_config_validation_and_missing_teacher(tmp_path):
    with pytest.raises(ConfigError):
        load_config(BootConfig, None, ["loss.delta=0"], task="boot")
    with pytest.raises(ConfigError):
        load_config(BootConfig, None, ["loss.weighting=l1"], task="boot")
    cfg = load_config(BootConfig, None, [f"run.output_dir={tmp_path}"], task="boot")
    with pytest.raises(UserError, match="boot-teacher"):
        run_boot(cfg)  # the default teacher path does not exist yet
    assert BOOT.name == "boot" and BOOT_TEACHER.name == "boot-teacher"
    for preset in ("digits", "digits-teacher", "cifar10-ddpm"):
        entry = BOOT if preset != "digits-teacher" else BOOT_TEACHER
        cfg = load_config(entry.config_cls, f"configs/boot/{preset}.yaml", [], task=entry.name)
        assert cfg.task == entry.name


def test_teacher_training_task_exports_a_loadable_teacher(tmp_path):
    sets = [f"run.output_dir={tmp_path}", "run.name=tiny", "train.steps=2", "train.batch_size=8",
            "train.checkpoint_every=2", "train.log_every=1", "train.device=cpu", "train.ema_decay=0.9",
            "model.block_out_channels=[8,16]", "model.norm_num_groups=4", "data.size=8", "sample.num=4",
            "sample.teacher_steps=2", "scheduler.prediction_type=v_prediction"]
    cfg = load_config(BootTeacherConfig, "configs/boot/digits-teacher.yaml", sets, task="boot-teacher")
    summary = run_teacher(cfg)
    teacher = load_diffusers_teacher(summary["teacher"])
    assert teacher.prediction_type == "v_prediction" and teacher.num_classes == 10 and teacher.null_class == 10
    assert teacher.sample_shape == (1, 8, 8)
    meta = json.loads((tmp_path / "boot-teacher" / "tiny" / "teacher" / "vkd_teacher.json").read_text())
    assert meta["dataset"] == "digits" and meta["ema"] is True
    assert (tmp_path / "boot-teacher" / "tiny" / "samples" / "teacher_ddim2_step000002.png").is_file()
    x = teacher(torch.randn(2, 1, 8, 8), torch.tensor([900.0, 10.0]), torch.tensor([3, 7]))
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()


_LOAD_PIPELINE = """
import sys, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)  # pipeline_boot.py
eps, labels = torch.load(sys.argv[2])
images = pipe(class_labels=labels, latents=eps, num_inference_steps=1, output_type="pt").images
pil = pipe(batch_size=2, class_labels=[0, 1], generator=torch.Generator().manual_seed(0)).images
assert type(pipe).__name__ == "BootPipeline" and len(pil) == 2 and pil[0].size == (8, 8)
assert not any(m == "vkd" or m.startswith("vkd.") for m in sys.modules), "vkd was imported"
torch.save(images, sys.argv[3])
"""


@pytest.mark.parametrize("prediction_type,parameterization", [
    ("epsilon", "auto"), ("epsilon", "preconditioned"), ("v_prediction", "preconditioned")])
def test_every_run_exports_a_diffusers_pipeline(tmp_path, prediction_type, parameterization):
    """``DiffusionPipeline.from_pretrained(RUN/pipeline)`` in a fresh process, without vkd: one step, the
    same images as ``vkd sample boot`` on the same noise (an x0 head, and the ε/v conversions of the
    preconditioned head)."""
    import subprocess
    import sys

    from vkd.boot.sample import noise_batches

    teacher_dir = save_tiny_teacher(tmp_path / "t", prediction_type, num_classes=3)
    run_boot(_boot_cfg(tmp_path, teacher_dir, "pipe", steps=2, **{"student.parameterization": parameterization}))
    run_dir = tmp_path / "runs" / "boot" / "pipe"
    index = json.loads((run_dir / "pipeline" / "model_index.json").read_text())
    assert index["prediction_type"] == ("sample" if parameterization == "auto" else prediction_type)
    assert index["_class_name"] == ["pipeline_boot", "BootPipeline"] and (run_dir / "pipeline" / "pipeline_boot.py").is_file()
    sample(run_dir, 5, tmp_path / "s", None, 0, 5)  # vkd sample boot
    _, eps, labels = next(noise_batches(5, 0, (1, 8, 8), 3, 5))
    torch.save((eps, labels), tmp_path / "noise.pt")
    subprocess.run([sys.executable, "-c", _LOAD_PIPELINE, str(run_dir / "pipeline"), str(tmp_path / "noise.pt"),
                    str(tmp_path / "images.pt")], check=True, cwd=tmp_path, timeout=300)
    images = torch.load(tmp_path / "images.pt")  # [5, 1, 8, 8] in [-1, 1]
    student, _ = load_student(run_dir / "pipeline")
    torch.testing.assert_close(images, student.generate(eps, labels), rtol=0, atol=1e-6)
    u8 = ((images.clamp(-1, 1) + 1.0) * 127.5 + 0.5).floor().to(torch.uint8)
    for k in range(5):
        with Image.open(tmp_path / "s" / f"{k:06d}.png") as im:
            assert torch.equal(torch.from_numpy(__import__("numpy").asarray(im)), u8[k, 0]), k


def test_compare_generators_reports_fid_precision_recall_and_rms_on_the_same_noise(tmp_path, teacher_dir):
    """The benchmark's side-by-side comparison: each generator's precision/recall equals the metric on its own
    features against the held-out digits, and the reference chain has RMS 0 to itself."""
    from vkd.boot.evaluate import DigitsFID, compare_generators
    from vkd.boot.runs import load_run as load_boot_run
    from vkd.boot.sample import ddim_sample, noise_batches, to_uint8
    from vkd.metrics.fid import feature_pass
    from vkd.metrics.scores import precision_recall

    run_boot(_boot_cfg(tmp_path, teacher_dir, "cmp", steps=1))
    run_dir = tmp_path / "runs" / "boot" / "cmp"
    out = compare_generators(run_dir, 24, [2, 1], seed=3, batch_size=8)
    rows = out["generators"]
    assert list(rows) == ["boot_student_1step", "teacher_ddim2", "teacher_ddim1"]
    assert rows["teacher_ddim2"]["rms_to_reference"] == 0.0 and rows["teacher_ddim1"]["rms_to_reference"] > 0
    for r in rows.values():
        assert 0.0 <= r["precision"] <= 1.0 and 0.0 <= r["recall"] <= 1.0 and r["fid"] > 0

    _, _, teacher = load_boot_run(run_dir, need_teacher=True)
    fid = DigitsFID(teacher.sample_shape[-1])
    batches = [to_uint8(ddim_sample(teacher, e, c, 1)) for _, e, c in
               noise_batches(24, 3, teacher.sample_shape, teacher.num_classes, 8)]
    feats = feature_pass(batches, fid.extractor, keep=("features",)).features
    p, r = precision_recall(fake=feats, real=fid.real_features)
    assert (rows["teacher_ddim1"]["precision"], rows["teacher_ddim1"]["recall"]) == pytest.approx((p, r))
