"""SIGKILL a training process after its first checkpoint, resume, and get the uninterrupted result."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import torch

from vkd.config import apply_overrides
from vkd.engine import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint_weights,
    train_task,
    verify_checkpoint,
)
from vkd.engine.toy import ToyConfig, ToyTask, make_toy_data

STEPS = 600
ARGS = [f"train.steps={STEPS}", "train.checkpoint_every=25", "train.log_every=25", "train.keep_last=0"]


def _vkd(args, **kw):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "vkd.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kw)


def _sets(tmp_path, name):
    return [x for a in [f"run.output_dir={tmp_path}", f"run.name={name}", *ARGS] for x in ("--set", a)]


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    torch.set_num_threads(1)
    reference = apply_overrides(ToyConfig(), [f"run.output_dir={tmp_path}", "run.name=reference", *ARGS])
    train_task(reference, ToyTask(reference), make_toy_data(reference))

    proc = _vkd(["distill", "toy", *_sets(tmp_path, "killed")])
    ckpt_dir = tmp_path / "toy" / "killed" / "checkpoints"
    deadline = time.time() + 120
    while not list_checkpoints(ckpt_dir) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = list_checkpoints(ckpt_dir)
    assert killed_at, "no checkpoint was written before the kill"
    assert killed_at[-1][0] < STEPS, "the run finished before it could be killed; make it longer"
    for _, path in killed_at:  # every checkpoint left behind is complete and uncorrupted
        verify_checkpoint(path)

    resumed = _vkd(["distill", "toy", *_sets(tmp_path, "killed"), "--resume"])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    a = load_checkpoint_weights(latest_checkpoint(reference.run_dir()))
    b = load_checkpoint_weights(latest_checkpoint(tmp_path / "toy" / "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_saves_a_checkpoint_before_exiting(tmp_path):
    proc = _vkd(["distill", "toy", *_sets(tmp_path, "term"), "--set", "train.checkpoint_every=100000"])
    run_dir = tmp_path / "toy" / "term"
    deadline = time.time() + 120
    while not (run_dir / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted by SIGTERM" in err and "--resume" in err
    found = list_checkpoints(run_dir / "checkpoints")
    assert len(found) == 1 and 0 < found[0][0] < STEPS
    verify_checkpoint(found[0][1])
