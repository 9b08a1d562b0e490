"""Disk full and other write failures from the CLI: the run stops with one clear line and a non-zero exit code,
the previous checkpoint stays intact and verifiable, and ``--resume`` (once the disk is fine again) continues
to exactly the result of an uninterrupted run.

The child processes are ``python -c CHILD MODE N distill toy ...``: ``CHILD`` makes the (N+1)-th write of one
kind fail with a real ``OSError`` errno, exactly where the operating system would raise it, then runs
``vkd.cli.main``. A read-only run directory is tested too where the test does not run as root (root ignores
file permissions).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
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

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.timeout(240)]

CHILD = r'''
import errno, os, sys
import vkd.engine.checkpoint as ckpt
import vkd.engine.trainer as trainer

mode, after = sys.argv[1], int(sys.argv[2])
calls = {"n": 0}


def hit():
    calls["n"] += 1
    return calls["n"] > after


if mode == "enospc":  # model.safetensors: a partial file, then the disk is full
    real_save = ckpt.save_file

    def save_file(tensors, filename, metadata=None):
        if hit():
            with open(filename, "wb") as fh:
                fh.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real_save(tensors, filename, metadata=metadata)

    ckpt.save_file = save_file
elif mode == "eio":  # fsync of meta.json: the device reports an I/O error
    real_fsync = ckpt._fsync

    def _fsync(path):
        if path.name == "meta.json" and hit():
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return real_fsync(path)

    ckpt._fsync = _fsync
elif mode == "erofs":  # the file system was remounted read-only: creating the checkpoint directory fails
    import pathlib

    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.name.startswith(".tmp-checkpoint-") and hit():
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    pathlib.Path.mkdir = mkdir
elif mode == "metrics":  # metrics.jsonl: the disk fills up between checkpoints
    real_append = trainer._append_jsonl

    def _append_jsonl(path, record):
        if hit():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_append(path, record)

    trainer._append_jsonl = _append_jsonl
from vkd.cli import main

sys.exit(main(sys.argv[3:]))
'''

STEPS = 50
ARGS = [f"train.steps={STEPS}", "train.checkpoint_every=10", "train.log_every=5", "train.keep_last=0"]


def _sets(out, name: str) -> list[str]:
    return [x for a in [f"run.output_dir={out}", f"run.name={name}", *ARGS] for x in ("--set", a)]


def _child(mode: str, after: int, args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", CHILD, mode, str(after), *args], env=env, capture_output=True,
                          text=True, timeout=180)


def _vkd(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "vkd.cli", *args], env=env, capture_output=True, text=True,
                          timeout=180)


def _one_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vkd: error:")]
    assert proc.returncode == 2, proc.stderr
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def _intact(run_dir, steps: list[int]) -> None:
    ckpts = run_dir / "checkpoints"
    found = list_checkpoints(ckpts)
    assert [s for s, _ in found] == steps
    for _, path in found:
        verify_checkpoint(path)
    assert not [p.name for p in ckpts.iterdir() if p.name.startswith(".")]  # no half-written leftovers


def test_disk_full_while_writing_a_checkpoint(tmp_path):
    run_dir = tmp_path / "toy" / "full"
    proc = _child("enospc", 2, ["distill", "toy", *_sets(tmp_path, "full")])
    line = _one_line(proc, "could not write checkpoint-30", "No space left on device",
                     "previous checkpoint intact", "checkpoint-20")
    assert line.count("\n") == 0
    _intact(run_dir, [10, 20])
    assert not (run_dir / "summary.json").exists()

    # the disk has space again: --resume continues from checkpoint-20 to the uninterrupted result
    resumed = _vkd(["distill", "toy", *_sets(tmp_path, "full"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    reference = apply_overrides(ToyConfig(), [f"run.output_dir={tmp_path}", "run.name=reference", *ARGS])
    train_task(reference, ToyTask(reference), make_toy_data(reference))
    a = load_checkpoint_weights(latest_checkpoint(reference.run_dir()))
    b = load_checkpoint_weights(latest_checkpoint(run_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_io_error_while_syncing_a_checkpoint(tmp_path):
    proc = _child("eio", 1, ["distill", "toy", *_sets(tmp_path, "eio")])
    _one_line(proc, "could not write checkpoint-20", "Input/output error", "previous checkpoint intact",
              "checkpoint-10")
    _intact(tmp_path / "toy" / "eio", [10])


def test_read_only_file_system(tmp_path):
    proc = _child("erofs", 3, ["distill", "toy", *_sets(tmp_path, "erofs")])
    _one_line(proc, "could not write checkpoint-40", "Read-only file system", "previous checkpoint intact",
              "checkpoint-30")
    _intact(tmp_path / "toy" / "erofs", [10, 20, 30])


def test_disk_full_while_logging_metrics(tmp_path):
    proc = _child("metrics", 4, ["distill", "toy", *_sets(tmp_path, "metrics")])
    line = _one_line(proc, "No space left on device", "metrics.jsonl")
    assert line == f"vkd: error: No space left on device: {tmp_path / 'toy' / 'metrics' / 'metrics.jsonl'}"
    _intact(tmp_path / "toy" / "metrics", [10, 20])


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_run_directory(tmp_path):
    """The run directory becomes read-only after the first checkpoint (a quota, a remount, a careless chmod)."""
    import time

    run_dir = tmp_path / "toy" / "ro"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "vkd.cli", "distill", "toy", *_sets(tmp_path, "ro"),
                             "--set", "train.steps=100000", "--set", "train.checkpoint_every=200"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not list_checkpoints(run_dir / "checkpoints") and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        ro = stat.S_IRUSR | stat.S_IXUSR
        for path in (run_dir / "checkpoints", run_dir):
            path.chmod(ro)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        for path in (run_dir, run_dir / "checkpoints"):
            path.chmod(stat.S_IRWXU)
    _one_line(subprocess.CompletedProcess([], proc.returncode, "", err), "Permission denied")
    found = list_checkpoints(run_dir / "checkpoints")
    assert found
    for _, path in found:
        verify_checkpoint(path)
