"""Model selection in the engine (``train.select_best``, ``data.val_split``): issue 21, item 4.

A scripted validation metric decides which step is best; ``best/`` holds exactly that step's weights, the final
evaluation and export use them, a resume keeps the record, bad settings are one line with exit code 2, and two
processes agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from vkd.cli import main
from vkd.config import apply_overrides
from vkd.data.splits import carve_validation
from vkd.engine import load_checkpoint_weights, read_best, selected_checkpoint, train_task
from vkd.engine.toy import ToyConfig, ToyTask, make_toy_data
from vkd.errors import ConfigError

SCRIPT = {10: 3.0, 20: 1.0, 30: 2.0, 40: 1.5, 50: 4.0}  # validation value by step


class Scripted(ToyTask):
    """The toy task whose validation metric follows ``SCRIPT`` (and records when it was asked)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.validation_metrics = ("score",)
        self.validated: list[int] = []

    def validate(self, step):
        self.validated.append(step)
        return {"score": SCRIPT[step], "other": 0.0}

    def export(self, run_dir):
        torch.save({k: v.clone() for k, v in self.student.state_dict().items()}, run_dir / "exported.pt")


def _cfg(tmp_path, name, *overrides):
    return apply_overrides(ToyConfig(), [f"run.output_dir={tmp_path}", f"run.name={name}", "train.steps=50",
                                         "train.checkpoint_every=10", "train.log_every=10", "train.keep_last=0",
                                         "train.select_best=score", *overrides])


@pytest.mark.parametrize("mode, best_step", [("min", 20), ("max", 50)])
def test_best_holds_the_selected_steps_weights_and_the_end_uses_them(tmp_path, mode, best_step):
    cfg = _cfg(tmp_path, mode, f"train.select_mode={mode}")
    task = Scripted(cfg)
    summary = train_task(cfg, task, make_toy_data(cfg))
    assert task.validated == [10, 20, 30, 40, 50]
    assert summary["best"]["step"] == best_step and summary["best"]["value"] == SCRIPT[best_step]
    run = cfg.run_dir()
    best = load_checkpoint_weights(run / "best")
    at_step = load_checkpoint_weights(run / "checkpoints" / f"checkpoint-{best_step}")
    assert best.keys() == at_step.keys() and all(torch.equal(best[k], at_step[k]) for k in best)
    exported = torch.load(run / "exported.pt", weights_only=True)
    assert all(torch.equal(exported[k], best[f"student.{k}"]) for k in exported)
    if best_step != 50:  # the last checkpoint is still the last step (for --resume), not the best
        last = load_checkpoint_weights(run / "checkpoints" / "checkpoint-50")
        assert not torch.equal(last["student.0.weight"], best["student.0.weight"])
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["val/score"] for r in lines if "val/score" in r] == [SCRIPT[s] for s in (10, 20, 30, 40, 50)]
    assert selected_checkpoint(run) == run / "best"


def test_resume_keeps_the_best_record(tmp_path):
    first = _cfg(tmp_path, "resumed", "train.steps=30")
    train_task(first, Scripted(first), make_toy_data(first))
    assert read_best(first.run_dir())["step"] == 20
    cont = _cfg(tmp_path, "resumed")
    task = Scripted(cont)
    summary = train_task(cont, task, make_toy_data(cont), resume="latest")
    assert task.validated == [40, 50]
    # 1.5 at step 40 beats nothing but a lost record: with the record kept, step 20 (1.0) stays the best
    assert summary["best"]["step"] == 20
    assert read_best(cont.run_dir())["value"] == 1.0


def test_a_fresh_run_drops_an_old_best(tmp_path):
    cfg = _cfg(tmp_path, "again", "train.steps=20")
    train_task(cfg, Scripted(cfg), make_toy_data(cfg))
    assert read_best(cfg.run_dir()) is not None
    other = _cfg(tmp_path, "again", "train.steps=10", "train.select_best=")  # --overwrite, no selection
    summary = train_task(other, Scripted(other), make_toy_data(other), overwrite=True)
    assert "best" not in summary and read_best(other.run_dir()) is None
    assert selected_checkpoint(other.run_dir()).parent.name == "checkpoints"  # not the stale best/


def test_carve_validation_is_disjoint_seeded_and_checked():
    train, val = carve_validation(100, 0.25, seed=3)
    assert len(val) == 25 and not set(train) & set(val) and sorted(train + val) == list(range(100))
    assert carve_validation(100, 0.25, seed=3) == (train, val)
    assert carve_validation(100, 0.25, seed=4)[1] != val
    assert len(carve_validation(100, 7, seed=0)[1]) == 7
    for bad, message in [(100, "leaves no training data"), (0.001, "is no item"), (-1, "must be >= 0"),
                         (2.5, "whole number")]:
        with pytest.raises(ConfigError, match=message):
            carve_validation(100, bad, seed=0)


def test_toy_val_split_end_to_end_and_bad_settings_are_one_line(tmp_path, capsys):
    base = ["distill", "toy", "--set", f"run.output_dir={tmp_path}", "--set", "train.steps=40",
            "--set", "train.checkpoint_every=20"]
    assert main([*base, "--set", "run.name=good", "--set", "data.val_split=0.25",
                 "--set", "train.select_best=val_mse"]) == 0
    run = tmp_path / "toy" / "good"
    best = read_best(run)
    assert best["metric"] == "val_mse" and best["step"] in (20, 40)
    assert main(["eval", "toy", "--run", str(run)]) == 0
    assert json.loads((run / "eval.json").read_text())["checkpoint"] == "best"
    cases = [
        (["--set", "train.select_best=val_mse"], "none: the task has no validation split"),
        (["--set", "data.val_split=0.25", "--set", "train.select_best=loss"], "not a validation metric"),
        (["--set", "data.val_split=512", "--set", "train.select_best=val_mse"], "leaves no training data"),
        (["--set", "train.select_mode=lowest"], "train.select_mode"),
    ]
    capsys.readouterr()
    for i, (args, message) in enumerate(cases):
        code = main([*base, "--set", f"run.name=bad{i}", *args])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("vkd: error:")]
        assert code == 2 and len(errors) == 1 and message in errors[0], (args, err)


def test_two_processes_select_the_same_best(tmp_path, master_port):
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("RANK", None)
    sets = ["train.steps=40", "train.checkpoint_every=10", "train.keep_last=0", "data.val_split=0.25",
            "train.select_best=val_mse"]
    cli = "from vkd.cli import main; raise SystemExit(main())"
    script = tmp_path / "cli.py"
    script.write_text(cli + "\n")
    runs = {}
    for name, prefix in (("one", [sys.executable]),
                         ("two", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                  "--master_port", master_port])):
        args = [a for s in [*sets, f"run.output_dir={tmp_path}", f"run.name={name}"] for a in ("--set", s)]
        proc = subprocess.run([*prefix, str(script), "distill", "toy", *args], env=env, timeout=600,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = tmp_path / "toy" / name
    one, two = (json.loads((runs[n] / "summary.json").read_text())["best"] for n in ("one", "two"))
    assert two["step"] == one["step"] and two["value"] == pytest.approx(one["value"], rel=1e-4)
    best = load_checkpoint_weights(runs["two"] / "best")
    at_step = load_checkpoint_weights(runs["two"] / "checkpoints" / f"checkpoint-{two['step']}")
    assert all(torch.equal(best[k], at_step[k]) for k in best)
