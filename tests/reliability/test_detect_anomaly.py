"""``vkd distill --detect-anomaly``: accepted, reaches the training loop, and a NaN gradient it catches stops the
run like any non-finite value (exit code 3, last good checkpoint kept, the failing op named)."""

from __future__ import annotations

import contextlib
import json
import logging

import pytest
import torch

from vkd.cli import main
from vkd.engine import list_checkpoints, verify_checkpoint
from vkd.engine.toy import ToyTask

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.timeout(120)]


def _cli(capsys, *args) -> tuple[int, str]:
    root = logging.getLogger()
    handlers = list(root.handlers)
    try:
        code = main([str(a) for a in args])
    finally:  # the handler logging.basicConfig adds must not outlive this test's captured stderr
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
    return code, capsys.readouterr().err


def _sets(tmp_path, name: str, *extra: str) -> list[str]:
    items = [f"run.output_dir={tmp_path}", f"run.name={name}", "train.steps=6", "train.checkpoint_every=2",
             "train.log_every=1", *extra]
    return [x for item in items for x in ("--set", item)]


def test_detect_anomaly_reaches_the_training_loop(tmp_path, capsys, monkeypatch):
    seen: list[bool] = []
    real_forward = ToyTask.forward

    def forward(self, batch):
        seen.append(torch.is_anomaly_enabled())
        return real_forward(self, batch)

    monkeypatch.setattr(ToyTask, "forward", forward)
    code, err = _cli(capsys, "distill", "toy", "--detect-anomaly", *_sets(tmp_path, "on"))
    assert code == 0, err
    assert len(seen) == 6 and all(seen)
    assert "detect_anomaly: true" in (tmp_path / "toy" / "on" / "config.yaml").read_text()
    assert not torch.is_anomaly_enabled()  # switched off again after the run

    seen.clear()
    code, err = _cli(capsys, "distill", "toy", *_sets(tmp_path, "off"))
    assert code == 0 and len(seen) == 6 and not any(seen), err


@pytest.mark.parametrize("anomaly", [True, False])
def test_nan_gradient_stops_with_exit_3(tmp_path, capsys, monkeypatch, anomaly):
    calls = {"n": 0}
    real_forward = ToyTask.forward

    def forward(self, batch):
        out = real_forward(self, batch)
        calls["n"] += 1
        if calls["n"] >= 3:  # from step 3: a finite loss whose gradient is NaN (d sqrt(x)/dx at 0, times 0)
            w = self.student[0].weight
            out["loss"] = out["loss"] + 0.0 * torch.sqrt(w - w).sum()
        return out

    monkeypatch.setattr(ToyTask, "forward", forward)
    flags = ["--detect-anomaly"] if anomaly else []
    with pytest.warns(UserWarning) if anomaly else contextlib.nullcontext():  # torch's anomaly report: the op's forward trace
        code, err = _cli(capsys, "distill", "toy", *flags, *_sets(tmp_path, "nan"))
    errors = [line for line in err.splitlines() if line.startswith("vkd: error:")]
    assert code == 3 and len(errors) == 1, err
    assert "at step 3" in errors[0] and "checkpoint-2" in errors[0]
    assert ("SqrtBackward0" in errors[0]) if anomaly else ("non-finite gradient norm" in errors[0])
    run_dir = tmp_path / "toy" / "nan"
    found = list_checkpoints(run_dir / "checkpoints")
    assert [s for s, _ in found] == [2]
    verify_checkpoint(found[0][1])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "non-finite" and summary["step"] == 3
