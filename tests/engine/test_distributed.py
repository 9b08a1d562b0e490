"""Two CPU processes under torchrun (gloo) reproduce the single-process run with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from vkd.engine import latest_checkpoint, list_checkpoints, load_checkpoint_weights

SCRIPT = Path(__file__).with_name("ddp_toy_script.py")


def _env():
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("RANK", None)
    return env


def test_two_processes_match_single_process(tmp_path, master_port):
    subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "single"], check=True, env=_env(), timeout=300)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", master_port]
    proc = subprocess.run([*torchrun, str(SCRIPT), str(tmp_path), "ddp"], env=_env(), timeout=300,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]

    single = json.loads((tmp_path / "single-rank0.json").read_text())
    ranks = [json.loads((tmp_path / f"ddp-rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world_size"] == 2 for r in ranks)
    # Sharding: per step, the two ranks see disjoint halves whose union is the single-process batch.
    for step, whole in enumerate(single["seen"]):
        a, b = ranks[0]["seen"][step], ranks[1]["seen"][step]
        assert len(a) == len(b) == 8
        assert not set(a) & set(b)
        assert a + b == whole
    # Only rank 0 writes checkpoints.
    assert ranks[0]["writers"] == [0, 0] and ranks[1]["writers"] == []
    ddp_dir, single_dir = tmp_path / "toy" / "ddp", tmp_path / "toy" / "single"
    assert [s for s, _ in list_checkpoints(ddp_dir / "checkpoints")] == [6, 12]
    # Same final weights and the same gathered (mean over ranks) losses.
    wa = load_checkpoint_weights(latest_checkpoint(single_dir))
    wb = load_checkpoint_weights(latest_checkpoint(ddp_dir))
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-6)

    def losses(run_dir):
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in lines if "loss" in r]

    la, lb = losses(single_dir), losses(ddp_dir)
    assert [s for s, _ in la] == [s for s, _ in lb] == [3, 6, 9, 12]
    for (_, x), (_, y) in zip(la, lb, strict=True):
        assert abs(x - y) <= 1e-5 * max(1.0, abs(x))
