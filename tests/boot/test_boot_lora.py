"""LoRA students (``student.lora_rank``, peft): equal to the full student at step 0, only the adapters train and
are checkpointed, averaged and exported (peft's adapter layout, loadable with ``PeftModel.from_pretrained`` on the
teacher's UNet), exact resume, a merged ``RUN/pipeline`` on request, text-to-image UNets, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import t2i_fixtures as fx
import torch
from boot_helpers import save_tiny_teacher
from safetensors.torch import load_file

from vkd.boot.commands import run_boot, sample
from vkd.boot.config import BootConfig
from vkd.boot.runs import load_run
from vkd.boot.sample import noise_batches
from vkd.boot.student import (
    BootStudent,
    add_lora,
    has_lora,
    load_lora,
    load_student,
    lora_target_names,
    student_from_config,
)
from vkd.boot.teacher import build_teacher
from vkd.config import load_config
from vkd.engine import latest_checkpoint, load_checkpoint_weights
from vkd.errors import ConfigError, UserError


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "t", "epsilon", num_classes=3)


def _cfg(tmp_path, teacher_dir, name="lora", steps=4, *extra) -> BootConfig:
    sets = [f"teacher.path={teacher_dir}", f"run.output_dir={tmp_path / 'runs'}", f"run.name={name}",
            f"train.steps={steps}", "train.batch_size=4", "train.checkpoint_every=2", "train.log_every=1",
            "train.device=cpu", "train.lr=1e-2", "train.ema_decay=0.5", "sample.num=4", "sample.teacher_steps=2",
            "eval.num_samples=0", "student.lora_rank=2", *extra]
    return load_config(BootConfig, None, sets, task="boot")


def test_lora_student_starts_as_the_full_student_and_trains_only_adapters(tmp_path, teacher_dir):
    cfg = _cfg(tmp_path, teacher_dir)
    teacher = build_teacher(cfg.teacher, cfg.data)
    full = load_config(BootConfig, None, [f"teacher.path={teacher_dir}"], task="boot")
    full_student, lora_student = student_from_config(teacher, full), student_from_config(teacher, cfg)
    assert not has_lora(full_student) and has_lora(lora_student)
    _, eps, labels = next(noise_batches(4, 0, teacher.sample_shape, teacher.num_classes, 4))
    t = torch.tensor([999.0, 500.0, 20.0, -1.0])
    torch.testing.assert_close(lora_student(eps, t, labels), full_student(eps, t, labels), rtol=0, atol=1e-6)
    trainable = [n for n, p in lora_student.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in lora_student.named_parameters() if p.requires_grad)
    # every ResNet conv and time projection of the UNet got an adapter (the LCM-LoRA target set)
    targets = lora_target_names(full_student.net.unet)
    assert {n.rsplit(".", 1)[-1] for n in targets} >= {"conv1", "conv2", "time_emb_proj"}
    assert len(lora_student.lora_config["target_modules"]) == len(targets)
    n_lora = sum(p.numel() for p in lora_student.parameters() if p.requires_grad)
    n_full = sum(p.numel() for p in full_student.parameters() if p.requires_grad)
    assert n_lora < n_full / 4
    # a backward pass reaches only the adapters (the frozen copy gets no .grad)
    lora_student(eps, t, labels).square().mean().backward()
    assert all((p.grad is not None) == p.requires_grad for p in lora_student.parameters())


def test_lora_run_checkpoints_adapters_resumes_exactly_and_exports_the_peft_layout(tmp_path, teacher_dir):
    from diffusers import UNet2DModel
    from peft import PeftModel

    run_boot(_cfg(tmp_path, teacher_dir, "full", 4))
    run_boot(_cfg(tmp_path, teacher_dir, "split", 2))
    run_boot(_cfg(tmp_path, teacher_dir, "split", 4), resume="latest")
    runs = tmp_path / "runs" / "boot"
    full, split = (load_checkpoint_weights(latest_checkpoint(runs / n)) for n in ("full", "split"))
    ema = load_checkpoint_weights(latest_checkpoint(runs / "full"), "ema.safetensors")
    assert full and all(".lora_" in k for k in full) and ema and all(".lora_" in k for k in ema)
    assert full.keys() == split.keys()
    for key in full:
        torch.testing.assert_close(split[key], full[key], rtol=0, atol=0, msg=key)  # exact resume
    assert any(v.abs().max() > 0 for k, v in full.items() if "lora_B" in k)  # the adapters moved from B = 0
    export = runs / "full" / "lora"
    assert not (runs / "full" / "pipeline").exists()  # adapters only, unless lora_merged_export
    config = json.loads((export / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2
    stored = load_file(str(export / "adapter_model.safetensors"))
    assert sum(v.numel() for v in stored.values()) == sum(v.numel() for v in ema.values())

    # the community loader: peft onto the teacher's UNet gives vkd's student network (EMA adapters)
    _, student, _ = load_run(runs / "full")
    unet = PeftModel.from_pretrained(UNet2DModel.from_pretrained(str(teacher_dir / "unet")), str(export)).eval()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([-1.0, 300.0]), torch.tensor([0, 2])
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, class_labels=y).sample, student.net.unet(x, t, class_labels=y).sample,
                                   rtol=0, atol=1e-6)
    sample(runs / "full", 4, tmp_path / "samples", None, 0, 4)  # vkd sample boot on an adapters-only run
    assert len(list((tmp_path / "samples").glob("*.png"))) == 4


def test_merged_export_is_a_plain_pipeline_that_generates_as_the_lora_student(tmp_path, teacher_dir):
    run_boot(_cfg(tmp_path, teacher_dir, "merged", 2, "student.lora_merged_export=true"))
    run_dir = tmp_path / "runs" / "boot" / "merged"
    merged, _ = load_student(run_dir / "pipeline")
    assert not has_lora(merged) and not any(".lora_" in k for k in merged.state_dict())
    cfg = _cfg(tmp_path, teacher_dir, "merged", 2)
    teacher = build_teacher(cfg.teacher, cfg.data)
    lora_student = load_lora(BootStudent.from_teacher(teacher), run_dir / "lora").eval()
    _, eps, labels = next(noise_batches(4, 3, teacher.sample_shape, teacher.num_classes, 4))
    torch.testing.assert_close(merged.generate(eps, labels), lora_student.generate(eps, labels), rtol=0, atol=1e-5)


def test_lora_on_a_text_to_image_unet_adapts_attention_and_survives_gradient_checkpointing(tmp_path):
    root = fx.write_sd_pipeline(tmp_path / "sd15", "epsilon")
    (tmp_path / "prompts.txt").write_text("a handwritten seven\ntwo\n")
    sets = [f"teacher.path={root}", f"data.prompts={tmp_path / 'prompts.txt'}", "student.lora_rank=4"]
    cfg = load_config(BootConfig, None, sets, task="boot")
    teacher = build_teacher(cfg.teacher, cfg.data)
    student = student_from_config(teacher, cfg)
    adapted = student.lora_config["target_modules"]
    assert any(n.endswith("attn2.to_k") for n in adapted) and any(n.endswith("ff.net.2") for n in adapted)
    assert not [n for n, p in student.named_parameters() if p.requires_grad and ".lora_" not in n]
    for name, p in student.named_parameters():  # non-zero B so that every adapter gets a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    _, eps, labels = next(noise_batches(2, 0, teacher.sample_shape, teacher.num_classes, 2))
    t = torch.tensor([700.0, 10.0])

    def grads():
        student.zero_grad()
        student(eps, t, labels).square().mean().backward()
        return {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}

    plain = grads()
    student.train()
    student.net.unet.enable_gradient_checkpointing()
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-7, msg=name)
    assert all(g.abs().max() > 0 for n, g in plain.items() if "lora_A" in n)


def test_lora_bad_input_is_one_line_exit_2(tmp_path, teacher_dir):
    with pytest.raises(ConfigError, match="lora_rank"):
        load_config(BootConfig, None, ["student.lora_targets=[to_q]"], task="boot")
    with pytest.raises(ConfigError):
        load_config(BootConfig, None, ["student.lora_rank=-1"], task="boot")
    cfg = _cfg(tmp_path, teacher_dir, "bad", 1, "student.lora_targets=[ff.net.2]")  # no transformer block
    with pytest.raises(UserError, match="no Linear/Conv2d layer"):
        add_lora(BootStudent.from_teacher(build_teacher(cfg.teacher, cfg.data)), 2, 0, cfg.student.lora_targets)
    proc = subprocess.run([sys.executable, "-m", "vkd.cli", "distill", "boot", "--set", f"teacher.path={teacher_dir}",
                           "--set", f"run.output_dir={tmp_path / 'cli'}", "--set", "student.lora_rank=2",
                           "--set", "student.lora_targets=[attn1.to_q]", "--set", "train.steps=1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no Linear/Conv2d layer" in lines[0] and "Traceback" not in proc.stderr
