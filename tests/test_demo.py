"""``vkd demo --quick`` end to end: all four modules, a report with finite numbers, reuse and failure isolation."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time

import pytest

from vkd.demo import STAGES, run_demo
from vkd.report import Section

NUMBER = re.compile(r"[-+]?\d+(?:[.,]\d+)*(?:[eE][-+]?\d+)?")


def _vkd(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "vkd.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    start = time.perf_counter()
    proc = _vkd("demo", "--quick", "--out", str(out), timeout=900)  # a hang guard, not a speed target
    return out, proc, time.perf_counter() - start


def test_quick_demo_runs_all_four_modules_with_finite_numbers(quick_demo):
    out, proc, wall = quick_demo
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"vkd demo --quick: {wall:.0f} s")  # speed is a benchmark figure (README), not asserted here
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    for name in STAGES:
        marker = json.loads((out / name / "quick" / "stage.json").read_text())
        assert marker["status"] == "ok"
        assert marker["title"] in md and marker["title"] in html
        assert len(marker["headline"]) >= 3
        for metric, value, _, _ in marker["headline"]:
            numbers = [float(v.replace(",", "")) for v in NUMBER.findall(str(value))]
            assert numbers, f"{name}: headline {metric!r} has no number: {value!r}"
            assert all(math.isfinite(v) for v in numbers), f"{name}: {metric} = {value}"
        for _, path in marker["images"]:
            assert os.path.isfile(path), path
    assert html.count("data:image/png;base64,") >= 8  # self-contained: images embedded
    assert "Status: **failed**" not in md


def test_quick_demo_rerun_reuses_finished_stages(quick_demo):
    out, proc, _ = quick_demo
    assert proc.returncode == 0
    before = (out / "boot" / "quick" / "stage.json").stat().st_mtime_ns
    rerun = _vkd("demo", "--quick", "--out", str(out), "--only", "boot", timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "reusing finished stage" in rerun.stdout
    assert (out / "boot" / "quick" / "stage.json").stat().st_mtime_ns == before
    assert all(STAGES[n][0] in (out / "report.md").read_text() for n in STAGES)  # others kept in the report


def test_failed_stage_is_reported_and_does_not_hide_the_others(tmp_path, monkeypatch):
    def boom(out, quick):
        raise RuntimeError("simulated stage failure")

    def fine(out, quick):
        sec = Section(title="x")
        sec.headline = [("a number", "1.5", "", "")]
        return sec

    stages = {name: (title, boom if name == "hello" else fine) for name, (title, _) in STAGES.items()}
    monkeypatch.setattr("vkd.demo.STAGES", stages)
    code = run_demo(tmp_path, quick=True)
    assert code == 1
    md = (tmp_path / "report.md").read_text()
    assert "simulated stage failure" in md and md.count("Status: **ok**") == 3
    assert "Traceback" in (tmp_path / "hello" / "quick" / "error.log").read_text()
    assert not (tmp_path / "hello" / "quick" / "stage.json").exists()  # a rerun retries it
    # --force redoes a finished stage from scratch
    (tmp_path / "boot" / "quick" / "leftover.txt").write_text("old")
    run_demo(tmp_path, quick=True, force=True, only=["boot"])
    assert not (tmp_path / "boot" / "quick" / "leftover.txt").exists()


def test_unknown_stage_is_a_user_error(tmp_path):
    proc = _vkd("demo", "--out", str(tmp_path), "--only", "nope", timeout=60)
    assert proc.returncode == 2
    assert "unknown demo stage" in proc.stderr and "Traceback" not in proc.stderr
