"""BOOT under torchrun with 2 CPU processes (gloo) gives the single-process weights: ε teacher, default
(preconditioned) student, class-conditional, the same global batch; the full student and a LoRA student."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from boot_helpers import save_tiny_teacher
from safetensors.torch import load_file

from vkd.engine import latest_checkpoint, load_checkpoint_weights


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_processes_match_one(tmp_path, lora, master_port):
    teacher = save_tiny_teacher(tmp_path / "t", "epsilon", num_classes=3)
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("RANK", None)
    sets = [f"teacher.path={teacher}", f"run.output_dir={tmp_path / 'runs'}", "train.steps=3", "train.batch_size=8",
            "train.checkpoint_every=3", "train.log_every=1", "train.device=cpu", "train.lr=1e-2",
            "train.optimizer=sgd",  # linear in the gradient: Adam turns all-reduce rounding on ~0 gradients into lr-size steps
            "sample.num=4", "sample.teacher_steps=2", "eval.num_samples=0"]
    if lora:
        sets.append("student.lora_rank=2")
    args = [a for s in sets for a in ("--set", s)]
    cli = "from vkd.cli import main; raise SystemExit(main())"
    subprocess.run([sys.executable, "-c", cli, "distill", "boot", *args, "--set", "run.name=one"],
                   check=True, env=env, timeout=300)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", master_port]
    script = tmp_path / "cli.py"
    script.write_text(cli + "\n")
    proc = subprocess.run([*torchrun, str(script), "distill", "boot", *args, "--set", "run.name=two"],
                          env=env, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = load_checkpoint_weights(latest_checkpoint(tmp_path / "runs" / "boot" / "one"))
    two = load_checkpoint_weights(latest_checkpoint(tmp_path / "runs" / "boot" / "two"))
    assert one.keys() == two.keys() and one
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-5, msg=key)
    if lora:  # only the adapters are checkpointed, and the B factors moved from zero
        assert all(".lora_" in k for k in one)
        assert any(one[k].abs().max() > 0 for k in one if "lora_B" in k)
        return
    # and training moved the student away from the teacher it was copied from
    init = load_file(str(teacher / "unet" / "diffusion_pytorch_model.safetensors"))
    moved = [k for k, v in init.items() if not torch.equal(v, one[f"student.net.unet.{k}"])]
    assert len(moved) > len(init) // 2
