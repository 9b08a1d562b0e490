"""The command line: help, config show, the toy task end to end, and one-line errors with exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from vkd.cli import main


def _vkd(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "vkd.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_help_lists_subcommands_and_examples():
    out = _vkd("--help")
    assert out.returncode == 0
    for command in ("distill", "eval", "sample", "render", "count", "fid", "demo", "config"):
        assert command in out.stdout
    for command in ("distill", "eval", "sample", "render", "count", "fid", "demo"):
        sub = _vkd(command, "--help")
        assert sub.returncode == 0 and "examples:" in sub.stdout, command


def test_config_show_resolves_presets_and_overrides(capsys):
    assert main(["config", "show", "toy", "--config", "quick", "--set", "train.lr=0.5"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["task"] == "toy" and shown["train"]["steps"] == 20 and shown["train"]["lr"] == 0.5


def test_distill_eval_and_reproduce_from_saved_config(tmp_path, capsys):
    args = ["--set", f"run.output_dir={tmp_path}", "--set", "train.steps=12", "--set", "train.checkpoint_every=6"]
    assert main(["distill", "toy", *args]) == 0
    run_dir = tmp_path / "toy" / "default"
    assert (run_dir / "config.yaml").is_file()
    assert main(["eval", "toy", "--run", str(run_dir)]) == 0
    assert "test_mse" in capsys.readouterr().out
    # The saved config reproduces the run in a new directory bit for bit.
    assert main(["distill", "toy", "--config", str(run_dir / "config.yaml"), "--set", "run.name=again"]) == 0
    a = (run_dir / "checkpoints" / "checkpoint-12" / "model.safetensors").read_bytes()
    b = (tmp_path / "toy" / "again" / "checkpoints" / "checkpoint-12" / "model.safetensors").read_bytes()
    assert a == b


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["distill", "toy", "--config", "missing.yaml"], "config file not found: missing.yaml"),
        (["distill", "toy", "--config", "nopreset"], "no config file or preset named 'nopreset'"),
        (["distill", "toy", "--set", "train.nope=1"], "unknown key 'train.nope'; valid keys under train: steps"),
        (["distill", "toy", "--set", "train.lr=fast"], "train.lr: expected float, got 'fast'"),
        (["distill", "toy", "--set", "train.lr"], "expected KEY=VALUE"),
        (["eval", "toy", "--run", "no/such/run"], "no/such/run is not a run directory"),
        (["count", "--run", "no/such/run", "x.png"], "error:"),
        (["distill", "toy", "--resume", "no/such/checkpoint"], "checkpoint to resume from not found"),
    ],
)
def test_user_mistakes_are_one_line_exit_2(tmp_path, args, message):
    out = _vkd(*args, "--set", f"run.output_dir={tmp_path}") if args[0] == "distill" else _vkd(*args)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vkd: error:"), out.stderr
    assert message in lines[0]


def test_unknown_task_is_exit_2():
    out = _vkd("distill", "nosuch")
    assert out.returncode == 2 and "invalid choice" in out.stderr and "Traceback" not in out.stderr
