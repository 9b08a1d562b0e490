"""scripts/gpu_check.py covers every training task, and its task step works (tried on the CPU)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from vkd.registry import task_names

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", module)
    spec.loader.exec_module(module)
    return module


def test_every_training_task_has_tiny_settings_and_both_precisions(capsys):
    gpu_check = _load()
    assert set(gpu_check.TASK_SETS) == set(task_names())  # a new task must be added to the GPU check
    assert gpu_check.main(["--dry-run"]) == 0
    steps = capsys.readouterr().out.split()
    for task in task_names():
        assert f"task:{task}:fp32" in steps and f"task:{task}:bf16" in steps
    assert {"gsplat_build", "pytest_gpu"} <= set(steps)


def test_task_step_runs_and_records_the_summary(tmp_path):
    gpu_check = _load()
    result = gpu_check.run_task(tmp_path, "toy", "fp32", "cpu")
    assert result["summary"]["status"] == "finished" and result["summary"]["steps"] == gpu_check.STEPS
    check = gpu_check.Check(tmp_path / "out.json")
    check.step("boom", lambda: 1 / 0)  # a failing step is recorded and does not stop the check
    check.step("fine", lambda: {"x": 1})
    rows = json.loads((tmp_path / "out.json").read_text())["steps"]
    assert [r["status"] for r in rows] == ["error", "ok"] and "ZeroDivisionError" in rows[0]["error"]
