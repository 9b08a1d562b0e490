"""The embedded text-to-image teacher (``boot-text-teacher``): captions, its pipeline export, and BOOT on it through
the path a hub pipeline takes (``teacher.kind=auto``, a prompt file, the digits-CNN FID and prompt accuracy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from vkd.boot.commands import run_boot, run_text_teacher
from vkd.boot.config import BootConfig, BootDataConfig, BootTeacherRef, BootTextTeacherConfig
from vkd.boot.data import DIGIT_CAPTION_TEMPLATES, digit_captions, digit_named_in, read_prompts
from vkd.boot.distiller import TextTeacherTrainingTask, caption_prompts
from vkd.boot.evaluate import PromptAccuracy
from vkd.boot.sample import noise_batches
from vkd.boot.teacher import build_teacher, resolve_teacher_kind
from vkd.config import find_preset, load_config
from vkd.engine import latest_checkpoint, load_checkpoint_weights
from vkd.errors import UserError

# a tiny teacher: 8x8 digits, two UNet levels of 8/16 channels, a 16-wide 1-layer CLIP text encoder
TINY = ["model.block_out_channels=[8,16]", "model.norm_num_groups=4", "model.attention_head_dim=4",
        "text_encoder.hidden_size=16", "text_encoder.intermediate_size=32", "text_encoder.num_layers=1",
        "data.size=8", "train.batch_size=8", "train.warmup_steps=2", "train.ema_decay=0.9", "train.device=cpu",
        "sample.num=10", "sample.teacher_steps=2"]


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


@pytest.fixture(scope="module")
def text_teacher_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("text-teacher")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(BootTextTeacherConfig, None, [*TINY, f"run.output_dir={out}", "run.name=tiny",
                                                         "train.steps=6", "train.checkpoint_every=6"],
                          task="boot-text-teacher")
        summary = run_text_teacher(cfg)
    finally:
        torch.set_num_threads(before)
    return cfg, summary


def test_captions_are_template_major_and_each_names_its_digit():
    prompts = caption_prompts()
    assert len(prompts) == 10 * len(DIGIT_CAPTION_TEMPLATES) == len(set(prompts))
    assert [digit_named_in(p) for p in prompts] == [p % 10 for p in range(len(prompts))]
    assert digit_captions(7)[0] == "a handwritten seven" and "the digit 7" in digit_captions(7)
    assert digit_named_in("a red bicycle") is None and digit_named_in("seven or 8") is None
    assert digit_named_in("2024, a one") == 1  # a numeral must stand alone


def test_every_caption_fits_the_teacher_tokenizer():
    from vkd.models.clip_tokenizer import clip_tokenizer

    limit = BootTextTeacherConfig().text_encoder.max_tokens
    lengths = [len(ids) for ids in clip_tokenizer(limit)(list(caption_prompts())).input_ids]
    assert max(lengths) <= limit, max(lengths)


def test_export_is_a_pixel_space_sd_layout_that_loads_as_the_trained_model(text_teacher_run):
    cfg, summary = text_teacher_run
    teacher_dir = cfg.run_dir() / "teacher"
    index = json.loads((teacher_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["vae"] == [None, None]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    # the scheduler is saved as trained (the SD pipeline's constructor would have rewritten clip_sample)
    sched = json.loads((teacher_dir / "scheduler" / "scheduler_config.json").read_text())
    assert sched["clip_sample"] is True and sched["prediction_type"] == "epsilon"
    assert read_prompts(summary["prompts"]).prompts == caption_prompts()

    ref = BootTeacherRef(path=str(teacher_dir))
    assert resolve_teacher_kind(ref) == "text-to-image"
    loaded = build_teacher(ref, BootDataConfig(prompts=summary["prompts"]))
    assert not loaded.latent and loaded.sample_shape == (1, 8, 8) and loaded.num_classes == 100
    assert loaded.clip_x0 and loaded.prediction_type == "epsilon"
    # the loaded teacher is the exported (EMA) weights: same x0 as the task's own teacher view of them
    task = TextTeacherTrainingTask(cfg)
    task.load_state_dict({f"model.{k}": v for k, v in _ema_weights(cfg).items()}, strict=False)
    trained = task.as_teacher()
    _, eps, labels = next(noise_batches(12, 3, (1, 8, 8), 100, 12))
    t = torch.linspace(10, 990, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(eps, t, labels), trained(eps, t, labels), rtol=0, atol=1e-5)
        assert not torch.allclose(loaded(eps, t, labels), loaded(eps, t, (labels + 1) % 100))  # text matters


def _ema_weights(cfg):
    return load_checkpoint_weights(latest_checkpoint(cfg.run_dir()), "ema.safetensors")


def test_boot_on_the_embedded_text_teacher_scores_fid_and_prompt_accuracy(text_teacher_run, tmp_path):
    """The digits-text preset with only paths changed: prompts from the teacher run, FID + prompt accuracy on."""
    cfg, summary = text_teacher_run
    sets = [f"teacher.path={cfg.run_dir() / 'teacher'}", f"data.prompts={summary['prompts']}",
            f"run.output_dir={tmp_path}", "train.steps=2", "train.batch_size=4", "train.checkpoint_every=2",
            "train.sample_every=0", "sample.num=4", "sample.teacher_steps=2", "eval.num_samples=20",
            "eval.teacher_steps=[2]", "eval.batch_size=10"]
    boot_cfg = load_config(BootConfig, find_preset("boot", "digits-text"), sets, task="boot")
    result = run_boot(boot_cfg)
    metrics = result["eval"]
    for name in ("student", "teacher_ddim2"):
        assert metrics[f"{name}_fid_digitscnn"] > 0
        assert 0.0 <= metrics[f"{name}_prompt_accuracy"] <= 1.0
    export = boot_cfg.run_dir() / "pipeline"
    assert json.loads((export / "vkd_student.json").read_text())["num_prompts"] == 100


class _FixedClassifier:
    """A stand-in digits classifier that reads the digit off pixel [0, 0, 0, 0]."""

    def classify(self, images):
        return images[:, 0, 0, 0].long()


def test_prompt_accuracy_counts_only_prompts_that_name_a_digit():
    tally = PromptAccuracy(["a handwritten seven", "a red bicycle", "the digit 3"], _FixedClassifier())
    assert tally.applies and tally.named.tolist() == [7, -1, 3]
    images = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.tensor([7, 5, 2, 3], dtype=torch.uint8)
    tally(images, torch.tensor([0, 1, 2, 2]))  # right, not counted, wrong, right
    assert (tally.correct, tally.total) == (2, 3) and tally.accuracy == pytest.approx(2 / 3)
    assert not PromptAccuracy(["a red bicycle"], _FixedClassifier()).applies


def test_missing_embedded_text_teacher_names_the_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(BootConfig, find_preset("boot", "digits-text"), [], task="boot")
    with pytest.raises(UserError, match="vkd distill boot-text-teacher --config digits-text-teacher"):
        run_boot(cfg)


def test_text_teacher_two_processes(tmp_path, master_port):
    """``torchrun --nproc_per_node 2`` (gloo, CPU) trains and exports the text teacher."""
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("RANK", None)
    sets = [*TINY, f"run.output_dir={tmp_path}", "run.name=two", "train.steps=3", "train.checkpoint_every=3",
            "train.sample_every=0"]
    script = tmp_path / "cli.py"
    script.write_text("from vkd.cli import main; raise SystemExit(main())\n")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           master_port, str(script), "distill", "boot-text-teacher",
                           *[a for s in sets for a in ("--set", s)]],
                          env=env, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "boot-text-teacher" / "two"
    assert latest_checkpoint(run_dir).name == "checkpoint-3"
    assert (run_dir / "teacher" / "model_index.json").is_file() and (run_dir / "prompts.txt").is_file()
