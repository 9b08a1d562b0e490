"""``vkd demo --quick`` end to end, each stage from empty caches (the cold start of a fresh machine): all four
modules, a report with finite numbers, reuse and failure isolation."""

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


def _vkd(*args: str, timeout: float, env: dict | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ if env is None else env, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "vkd.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def cold_env(root) -> dict:
    """The environment of a fresh machine: every cache variable points at an empty directory under ``root``."""
    return dict(os.environ, VKD_CACHE_DIR=str(root / "vkd"), XDG_CACHE_HOME=str(root / "xdg"),
                TORCH_HOME=str(root / "torch"), HF_HOME=str(root / "hf"))


# What each stage builds on first use and caches (relative to the stage directory, or to the empty VKD_CACHE_DIR
# for "cache:"): a cold run must have built all of it.
CACHED_ARTEFACTS = {
    "boot": ["cache:digits-cnn-v1.pt", "runs/boot-teacher/digits/teacher/model_index.json"],
    "feature3dgs": ["runs/feature3dgs/_cache/scenes/synthetic-*/transforms.json",
                    "runs/feature3dgs/_cache/tiny_clip/*/open_clip_model.safetensors",
                    "runs/feature3dgs/_cache/teacher/*/manifest.json"],
    "hello": ["cache/tiny_clip/*/open_clip_model.safetensors"],
    "skt": ["data/meta.json", "cache:skt/density/*/*.npy"],
}


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """``vkd demo --quick``, one stage per process, each from empty caches in a fresh working directory (the
    cold start of a new machine; the stages share the output directory, so the last report holds all four)."""
    out = tmp_path_factory.mktemp("demo")
    stages = {}
    for name in STAGES:
        cold = tmp_path_factory.mktemp(f"cold-{name}")
        start = time.perf_counter()
        proc = _vkd("demo", "--quick", "--only", name, "--out", str(out), timeout=600,  # a hang guard
                    env=cold_env(cold), cwd=str(cold))
        stages[name] = (proc, time.perf_counter() - start, cold)
    return out, stages


@pytest.mark.parametrize("name", list(STAGES))
def test_cold_start_stage_builds_its_caches(quick_demo, name):
    out, stages = quick_demo
    proc, wall, cold = stages[name]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"vkd demo --quick --only {name} from empty caches: {wall:.0f} s")  # a benchmark figure, not asserted
    stage_dir = out / name / "quick"
    assert json.loads((stage_dir / "stage.json").read_text())["status"] == "ok"
    for pattern in CACHED_ARTEFACTS[name]:
        base, rel = (cold / "vkd", pattern[len("cache:"):]) if pattern.startswith("cache:") else (stage_dir, pattern)
        assert list(base.glob(rel)), f"{name}: nothing at {base / rel} after a cold run"


def test_quick_demo_runs_all_four_modules_with_finite_numbers(quick_demo):
    out, stages = quick_demo
    for name, (proc, _, _) in stages.items():
        assert proc.returncode == 0, f"{name}: " + proc.stderr[-3000:]
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
    out, stages = quick_demo
    assert stages["boot"][0].returncode == 0
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
