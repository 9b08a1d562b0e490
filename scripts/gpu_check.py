#!/usr/bin/env python
"""The prepared GPU check: everything of vkd that only a CUDA machine can show, in one run of a few minutes.

Run it through ``scripts/gpu_check.sh`` on a machine with one GPU (it is never needed for ``make test``). Steps, each
timed, each failure recorded and the next step run anyway:

1. ``env``: torch, CUDA, the card's name, gsplat's version.
2. ``gsplat_build``: the first gsplat rasterization, which JIT-compiles gsplat's CUDA kernels (minutes when cold).
3. ``pytest_gpu``: the ``gpu``-marked tests (gsplat vs torch parity per mode, MCMC strategy on CUDA).
4. ``parity``: gsplat vs vkd's torch backend on the render benchmark's scenes (``scripts/bench_render.py``'s scene
   generator and sizes): max |difference| of colours and alphas, forward and gradients, and both backends' times.
5. ``task:<name>:<precision>``: a few training steps of every training task of the CLI on CUDA, in float32 and in
   bf16 mixed precision, chained as a user would (BOOT distils the teacher the ``boot-teacher`` step trained, and
   so on), each as ``python -m vkd.cli distill`` in a child process with its wall time and summary.

Everything lands in one JSON (``--out``, default ``$OUT/gpu_check.json`` or ``runs/gpu_check.json``) and a table.

Usage:
    bash scripts/gpu_check.sh                  # on the GPU machine; ≤ 8 min on one GPU
    python scripts/gpu_check.py --dry-run      # list the steps without running them (any machine)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

# Tiny, fast settings per training task (the same sizes as the kill-and-resume tests); "{work}" is this check's
# working directory, "{dev}" the device. Every task of vkd.registry.task_names() must have an entry
# (tests/test_gpu_check.py holds the list to the registry).
TASK_SETS: dict[str, list[str]] = {
    "toy": [],
    "boot-teacher": ["model.block_out_channels=[8,16]", "model.norm_num_groups=4", "data.size=8",
                     "train.batch_size=8", "sample.num=4", "sample.teacher_steps=2"],
    "boot": ["teacher.path={work}/runs/boot-teacher/{name}/teacher", "train.batch_size=4", "sample.num=4",
             "sample.teacher_steps=2", "eval.num_samples=0"],
    "boot-text-teacher": ["model.block_out_channels=[8,16]", "model.norm_num_groups=4", "model.attention_head_dim=4",
                          "text_encoder.hidden_size=16", "text_encoder.intermediate_size=32",
                          "text_encoder.num_layers=1", "data.size=8", "train.batch_size=8", "sample.num=10",
                          "sample.teacher_steps=2", "eval.num_samples=0"],
    "feature3dgs": ["data.synthetic.num_views=8", "data.synthetic.resolution=32", "data.synthetic.supersample=1",
                    "data.synthetic.num_points=500", "data.test_every=4", "teacher.tiny.steps=20",
                    "eval.fps_repeats=1"],
    "hello-teacher": ["model.width=8", "model.depth=2", "extra.num_snapshots=2", "train.batch_size=16"],
    "hello": ["teacher.run={work}/runs/hello-teacher/{name}", "clip.tiny.steps=20", "selection.ipc=1",
              "selection.mipc=4", "image_update.steps=2", "student.steps=2", "student.model.width=8",
              "train.batch_size=16"],
    "skt-teacher": ["data.root={work}/crowds", "data.synthetic.num_train=8", "data.synthetic.num_test=2",
                    "data.synthetic.height=64", "data.synthetic.width=64", "train.batch_size=2",
                    "eval.tile_size=0"],
    "skt": ["data.root={work}/crowds", "data.synthetic.num_train=8", "data.synthetic.num_test=2",
            "data.synthetic.height=64", "data.synthetic.width=64", "train.batch_size=2", "eval.tile_size=0",
            "teacher.run={work}/runs/skt-teacher/{name}"],
}
PRECISIONS = {"fp32": ["train.mixed_precision='no'"], "bf16": ["train.mixed_precision=bf16"]}
STEPS = 4


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


class Check:
    """Runs named steps, records ``{status, seconds, result|error}`` for each, and never stops at a failure."""

    def __init__(self, out: Path):
        self.out, self.steps, self.start = out, [], time.perf_counter()

    def step(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            result = fn()
            row = {"name": name, "status": "ok", "seconds": round(time.perf_counter() - t0, 2),
                   "result": _jsonable(result)}
        except Exception as err:  # recorded: the remaining steps still run
            result = None
            row = {"name": name, "status": "error", "seconds": round(time.perf_counter() - t0, 2),
                   "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
        self.steps.append(row)
        print(f"[gpu_check] {name}: {row['status']} in {row['seconds']:.1f} s"
              + (f" ({row['error']})" if row["status"] == "error" else ""), flush=True)
        self.write()
        return result

    def write(self) -> None:  # after every step: a run killed at its time limit keeps what it measured
        self.out.parent.mkdir(parents=True, exist_ok=True)
        data = {"total_seconds": round(time.perf_counter() - self.start, 2), "steps": self.steps}
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.out)


def env_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                            "cuda_available": torch.cuda.is_available(), "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(0)
        info["capability"] = list(torch.cuda.get_device_capability(0))
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
    try:
        import gsplat

        info["gsplat"] = gsplat.__version__
    except Exception as err:  # recorded, not fatal: the later steps say what it costs
        info["gsplat"] = f"unavailable: {type(err).__name__}: {err}"
    return info


def gsplat_build() -> dict[str, Any]:
    import torch
    from bench_render import make_scene

    from vkd.render import rasterization

    params, vm, K = make_scene(100, 3, 32, 32, "cuda")
    t0 = time.perf_counter()
    with torch.no_grad():
        rasterization(*params, vm, K, 32, 32, backend="gsplat")
    torch.cuda.synchronize()
    return {"first_call_seconds": round(time.perf_counter() - t0, 2)}


def pytest_gpu() -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    tail = (proc.stdout + proc.stderr)[-3000:]
    if proc.returncode != 0:
        raise RuntimeError(f"pytest -m gpu exited {proc.returncode}: {tail[-1500:]}")
    return {"summary": tail.strip().splitlines()[-1] if tail.strip() else ""}


def parity(scenes: list[tuple[int, int, int, int]]) -> list[dict[str, Any]]:
    """gsplat vs torch backend on the render benchmark's scenes: forward and gradient differences, times."""
    import torch
    from bench_render import make_scene

    from vkd.render import rasterization

    rows = []
    for N, D, W, H in scenes:
        params, vm, K = make_scene(N, D, W, H, "cuda")
        outs, grads, times = {}, {}, {}
        for backend in ("torch", "gsplat"):
            leaves = [p.detach().clone().requires_grad_(True) for p in params]
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            img, alpha, _ = rasterization(*leaves, vm, K, W, H, backend=backend)
            (img.square().mean() + alpha.mean()).backward()
            torch.cuda.synchronize()
            times[backend] = round(time.perf_counter() - t0, 4)
            outs[backend] = (img.detach(), alpha.detach())
            grads[backend] = [p.grad for p in leaves]
        fwd = max(float((outs["torch"][i] - outs["gsplat"][i]).abs().max()) for i in range(2))
        rel = []
        for a, b in zip(grads["torch"], grads["gsplat"], strict=True):
            if a is not None and b is not None:
                rel.append(float((a - b).norm() / a.norm().clamp_min(1e-12)))
        rows.append({"N": N, "D": D, "W": W, "H": H, "forward_max_abs": fwd,
                     "grad_max_rel_l2": max(rel) if rel else None, "fwd_bwd_seconds": times})
    return rows


def run_task(work: Path, task: str, precision: str, device: str) -> dict[str, Any]:
    name = precision
    sets = [s.format(work=work, name=name, dev=device) for s in TASK_SETS[task]]
    sets += [f"run.output_dir={work / 'runs'}", f"run.name={name}", f"train.steps={STEPS}", "train.log_every=1",
             f"train.device={device}", *PRECISIONS[precision]]
    cmd = [sys.executable, "-m", "vkd.cli", "distill", task, "--overwrite", *[x for s in sets for x in ("--set", s)]]
    env = dict(os.environ, HF_HUB_OFFLINE="1", VKD_CACHE_DIR=str(work / "cache"), PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=240)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr.strip()[-1500:]}")
    summary_path = work / "runs" / task / name / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    keep = {k: v for k, v in summary.items() if isinstance(v, int | float | str) and len(str(v)) < 200}
    return {"wall_seconds": round(seconds, 2), "summary": keep}


def plan(scenes: list[tuple[int, int, int, int]]) -> list[str]:
    from vkd.registry import task_names

    names = ["env", "gsplat_build", "pytest_gpu", f"parity ({len(scenes)} scenes)"]
    return names + [f"task:{t}:{p}" for t in task_names() for p in PRECISIONS]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else ROOT / "runs/gpu_check.json"
    ap.add_argument("--out", type=Path, default=default_out)
    ap.add_argument("--work", type=Path, default=Path("/tmp/vkd-gpu-check"), help="scratch directory")
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu only to try the script itself")
    ap.add_argument("--dry-run", action="store_true", help="print the steps and exit")
    ap.add_argument("--skip", nargs="*", default=[], help="step names (or prefixes) to skip")
    args = ap.parse_args(argv)

    # the render benchmark's --quick sizes plus one large scene
    scenes = [(5000, 16, 320, 240), (20000, 16, 320, 240), (100000, 3, 320, 240)]
    if args.dry_run:
        print("\n".join(plan(scenes)))
        return 0
    import torch

    from vkd.registry import task_names

    def wanted(name: str) -> bool:
        return not any(name.startswith(s) for s in args.skip)

    check = Check(args.out)
    info = check.step("env", env_info)
    gpu = bool(info and info.get("cuda_available"))
    if args.device == "cuda" and not gpu:
        print("[gpu_check] no CUDA device: nothing else to check (--device cpu tries the task steps on the CPU)")
    if gpu and args.device == "cuda":
        for name, fn in (("gsplat_build", gsplat_build), ("pytest_gpu", pytest_gpu),
                         ("parity", lambda: parity(scenes))):
            if wanted(name):
                check.step(name, fn)
    if gpu or args.device != "cuda":
        args.work.mkdir(parents=True, exist_ok=True)
        for task in task_names():
            for precision in PRECISIONS:
                name = f"task:{task}:{precision}"
                if wanted(name):
                    check.step(name, lambda t=task, p=precision: run_task(args.work, t, p, args.device))
    check.write()
    rows = check.steps
    print(f"\n{'step':<32} {'status':<7} {'seconds':>8}  detail")
    for row in rows:
        detail = row.get("error", "")
        if row["name"].startswith("task:") and row["status"] == "ok":
            detail = f"wall {row['result']['wall_seconds']} s"
        elif row["name"] == "parity" and row["status"] == "ok":
            detail = "; ".join(f"N={r['N']} D={r['D']}: fwd {r['forward_max_abs']:.1e} grad {r['grad_max_rel_l2']:.1e}"
                               for r in row["result"])
        print(f"{row['name']:<32} {row['status']:<7} {row['seconds']:>8.1f}  {detail[:150]}")
    print(f"wrote {args.out} ({torch.cuda.get_device_name(0) if gpu else 'no GPU'})")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
