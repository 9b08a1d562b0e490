#!/usr/bin/env python
"""Benchmark of training-free lifting (``vkd lift``) against gradient training; run as
``scripts/bench_feature3dgs.py --lift`` (or directly).

Part 1, the embedded scene (synthetic scene + tiny-CLIP teacher), for each seed:

* (c) today's joint training (the ``synthetic`` preset: geometry, colour, features, densification);
* from (c)'s exported geometry: (a) lifting (``vkd lift``) and (b) features-only gradient training
  (``model.init_ply`` + ``train.freeze_geometry``, the preset's steps);
* teacher-label accuracy / mIoU, feature cosine and PSNR on the held-out views (one evaluator, one protocol) and
  the wall time of each method's own work (lifting, or the training loop; the scene and teacher cache are shared).

Targets (issue 19): lifting's teacher-label accuracy within 0.01 of (b), in >= 50x less wall time.

Part 2, realistic size (synthetic content): ``--gaussians`` Gaussians (default 300k), ``--views`` posed 640x480 views
of a transforms.json scene, ``--dim``-wide feature files (default 512) on a ``--grid`` teacher grid; ``vkd lift`` in
a child process, its wall time and peak RSS. Targets: <= 15 min and <= 8 GB on 2 CPU cores.

Writes a JSON file and prints a table.

Usage::

    .venv/bin/python scripts/bench_feature3dgs.py --lift [--seeds 0,1,2] [--output-dir runs/bench_lift]
        [--skip-embedded] [--skip-realistic] [--gaussians 300000 --views 100 --dim 512 --grid 60x80]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vkd.config import find_preset, load_config  # noqa: E402
from vkd.feature3dgs.commands import run  # noqa: E402
from vkd.feature3dgs.config import Feature3DGSConfig  # noqa: E402
from vkd.feature3dgs.evaluate import run_evaluator  # noqa: E402
from vkd.feature3dgs.export import export_ply  # noqa: E402
from vkd.feature3dgs.lift import lift  # noqa: E402
from vkd.feature3dgs.model import GaussianField  # noqa: E402
from vkd.feature3dgs.runs import load_run  # noqa: E402

METRICS = ("teacher_label_acc", "teacher_label_miou", "feature_cosine", "psnr")
TARGETS = {"acc_gap": 0.01, "speedup": 50.0, "realistic_s": 15 * 60.0, "realistic_rss_gb": 8.0}


def _evaluate(run_dir: Path) -> dict[str, float]:
    loaded = load_run(run_dir)
    with torch.no_grad():
        ev = run_evaluator(loaded).evaluate(loaded.field, fps=False)
    return {k: float(ev[k]) for k in METRICS if k in ev}


def embedded(out: Path, seeds: list[int], threads: int, overrides: list[str]) -> dict:
    rows: dict[str, list[dict]] = {"lift": [], "features_only": [], "joint": []}
    preset = find_preset("feature3dgs", "synthetic")
    for seed in seeds:
        base = [f"run.output_dir={out}", f"run.seed={seed}", f"compute.cpu_threads={threads}", *overrides]
        joint_cfg = load_config(Feature3DGSConfig, preset, [*base, f"run.name=joint_s{seed}"], task="feature3dgs")
        shutil.rmtree(joint_cfg.run_dir(), ignore_errors=True)
        joint = run(joint_cfg, None)
        ply = joint_cfg.run_dir() / "export" / "point_cloud.ply"
        rows["joint"].append({"seed": seed, "wall_s": joint["timings_s"]["training"],
                              "num_gaussians": joint["num_gaussians"], **_evaluate(joint_cfg.run_dir())})

        frozen = [*base, f"model.init_ply={ply}", "train.freeze_geometry=true"]
        lift_cfg = load_config(Feature3DGSConfig, preset, [*frozen, f"run.name=lift_s{seed}"], task="feature3dgs")
        lift_dir = out / "feature3dgs" / f"lift_s{seed}"
        shutil.rmtree(lift_dir, ignore_errors=True)
        t0 = time.perf_counter()
        lifted = lift(lift_cfg, lift_dir, progress=False)
        rows["lift"].append({"seed": seed, "wall_s": lifted["timings_s"]["lifting"],
                             "wall_s_with_setup": time.perf_counter() - t0, "fit": lifted["fit"],
                             "seen_fraction": lifted["seen_fraction"], **_evaluate(lift_dir)})

        feat_cfg = load_config(Feature3DGSConfig, preset, [*frozen, f"run.name=features_only_s{seed}"],
                               task="feature3dgs")
        shutil.rmtree(feat_cfg.run_dir(), ignore_errors=True)
        trained = run(feat_cfg, None)
        rows["features_only"].append({"seed": seed, "wall_s": trained["timings_s"]["training"],
                                      "steps": feat_cfg.train.steps, **_evaluate(feat_cfg.run_dir())})

    def stats(method: str, key: str) -> dict:
        values = [r[key] for r in rows[method] if key in r]
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "values": values}

    summary = {m: {k: stats(m, k) for k in (*METRICS, "wall_s")} for m in rows}
    gap = abs(summary["lift"]["teacher_label_acc"]["mean"] - summary["features_only"]["teacher_label_acc"]["mean"])
    speedup = summary["features_only"]["wall_s"]["mean"] / max(summary["lift"]["wall_s"]["mean"], 1e-9)
    return {"seeds": seeds, "rows": rows, "summary": summary,
            "targets": {"acc_gap": {"value": gap, "target": TARGETS["acc_gap"], "met": gap <= TARGETS["acc_gap"]},
                        "speedup": {"value": speedup, "target": TARGETS["speedup"],
                                    "met": speedup >= TARGETS["speedup"]}}}


def make_realistic_scene(root: Path, gaussians: int, views: int, width: int, height: int, dim: int,
                         grid: tuple[int, int], seed: int = 0) -> tuple[Path, Path, Path]:
    """A transforms.json scene of ``views + 1`` cameras on an orbit (the first is held out), a 3DGS PLY of
    ``gaussians`` random Gaussians in the unit ball and ``[dim, *grid]`` fp16 feature files. Reused when present."""
    scene, ply, feats = root / "scene", root / "scene.ply", root / "features"
    done = root / "done.json"
    spec = {"gaussians": gaussians, "views": views, "width": width, "height": height, "dim": dim,
            "grid": list(grid), "seed": seed}
    if done.is_file() and json.loads(done.read_text()) == spec:
        return scene, ply, feats
    shutil.rmtree(root, ignore_errors=True)
    (scene / "images").mkdir(parents=True)
    feats.mkdir()
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    frames = []
    fl = 0.5 * width / math.tan(math.radians(30))  # 60 degree horizontal field of view
    for i in range(views + 1):
        ang = 2 * math.pi * i / (views + 1)
        eye = np.array([3.0 * math.cos(ang), 0.6, 3.0 * math.sin(ang)])
        fwd = -eye / np.linalg.norm(eye)  # looks at the origin
        right = np.cross(fwd, [0.0, 1.0, 0.0])
        right /= np.linalg.norm(right)
        up = np.cross(right, fwd)
        c2w = np.eye(4)
        c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, -fwd, eye  # OpenGL axes: -z forward
        name = f"frame_{i:04d}.png"
        shade = int(40 + 200 * i / (views + 1))
        Image.new("RGB", (width, height), (shade, 128, 255 - shade)).save(scene / "images" / name)
        frames.append({"file_path": f"images/{name}", "transform_matrix": c2w.tolist()})
        f = torch.randn(dim, *grid, generator=g).to(torch.float16).numpy()
        np.save(feats / f"frame_{i:04d}.npy", f)
    meta = {"camera_model": "PINHOLE", "fl_x": fl, "fl_y": fl, "cx": width / 2, "cy": height / 2, "w": width,
            "h": height, "frames": frames}
    (scene / "transforms.json").write_text(json.dumps(meta))
    pts = torch.randn(gaussians, 3, generator=g)
    pts = pts / pts.norm(dim=1, keepdim=True) * torch.rand(gaussians, 1, generator=g).pow(1 / 3)  # in the ball
    field = GaussianField.from_points(pts, torch.rand(gaussians, 3, generator=g), 1, 1, sh_degree=3, decoder=False,
                                      init_opacity=0.5)
    with torch.no_grad():
        field.params["opacities"].copy_(torch.randn(gaussians, generator=g))  # a spread of opacities, as trained
    export_ply(field, ply)
    done.write_text(json.dumps(spec))
    return scene, ply, feats


def realistic(out: Path, gaussians: int, views: int, dim: int, grid: tuple[int, int], threads: int,
              timeout: int) -> dict:
    root = out / "realistic"
    t0 = time.perf_counter()
    scene, ply, feats = make_realistic_scene(root, gaussians, views, 640, 480, dim, grid)
    t_make = time.perf_counter() - t0
    run_dir = root / "lifted"
    shutil.rmtree(run_dir, ignore_errors=True)
    cache = root / "cache"
    shutil.rmtree(cache, ignore_errors=True)  # the feature cache is part of the measured work
    cli = "from vkd.cli import main; raise SystemExit(main())"
    cmd = [sys.executable, "-c", cli, "lift", "--scene", str(scene), "--ply", str(ply), "--features", str(feats),
           "--out", str(run_dir), "--set", f"run.output_dir={root / 'runs'}", "--set", f"teacher.cache_dir={cache}",
           "--set", f"data.test_every={views + 1}", "--set", f"compute.cpu_threads={threads}",
           "--set", f"model.render_dim={dim}", "--set", "model.decoder=false", "--set", "model.sh_degree=3"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads))
    t1 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t1
    if proc.returncode != 0:
        raise SystemExit(f"vkd lift failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rss_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2  # KiB on Linux
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"gaussians": gaussians, "views_lifted": summary["views"], "size": [640, 480], "dim": dim,
            "teacher_grid": list(grid), "threads": threads, "scene_generation_s": t_make, "wall_s": wall,
            "lifting_s": summary["timings_s"]["lifting"], "setup_s": summary["timings_s"]["scene_and_teacher"],
            "peak_rss_gb": rss_gb, "seen_fraction": summary["seen_fraction"],
            "targets": {"realistic_s": {"value": wall, "target": TARGETS["realistic_s"],
                                        "met": wall <= TARGETS["realistic_s"]},
                        "realistic_rss_gb": {"value": rss_gb, "target": TARGETS["realistic_rss_gb"],
                                             "met": rss_gb <= TARGETS["realistic_rss_gb"]}}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lift", action="store_true", help="(accepted: this is the lift benchmark)")
    ap.add_argument("--output-dir", default="runs/bench_lift")
    ap.add_argument("--json", default="bench_feature3dgs_lift.json")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the embedded runs (preset: 1)")
    ap.add_argument("--realistic-threads", type=int, default=2, help="torch threads of the realistic lift")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="override of the embedded runs")
    ap.add_argument("--skip-embedded", action="store_true")
    ap.add_argument("--skip-realistic", action="store_true")
    ap.add_argument("--gaussians", type=int, default=300_000)
    ap.add_argument("--views", type=int, default=100)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--grid", default="60x80", help="teacher grid h x w of the feature files")
    ap.add_argument("--timeout", type=int, default=3600)
    args = ap.parse_args(argv)
    out = Path(args.output_dir)
    load_start = os.getloadavg()
    result: dict = {"command": "python scripts/bench_feature3dgs.py --lift " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]) if a != "--lift"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "loadavg_start": load_start}}
    if not args.skip_embedded:
        torch.set_num_threads(args.threads)
        result["embedded"] = embedded(out, [int(s) for s in args.seeds.split(",")], args.threads, args.overrides)
    if not args.skip_realistic:
        h, w = (int(v) for v in args.grid.lower().split("x"))
        result["realistic"] = realistic(out, args.gaussians, args.views, args.dim, (h, w), args.realistic_threads,
                                        args.timeout)
    result["machine"]["loadavg_end"] = os.getloadavg()
    Path(args.json).write_text(json.dumps(result, indent=2, default=str))

    print(f"\nFeature 3DGS lifting benchmark (load avg {load_start[0]:.1f} -> {result['machine']['loadavg_end'][0]:.1f})")
    if "embedded" in result:
        e = result["embedded"]
        print(f"embedded scene, seeds {e['seeds']} (mean ± std over seeds; wall: the method's own work)")
        print(f"{'method':<16}" + "".join(f"{k:>24}" for k in (*METRICS, "wall_s")))
        for method, s in e["summary"].items():
            print(f"{method:<16}" + "".join(f"{s[k]['mean']:>15.4f} ± {s[k]['std']:<6.4f}" for k in
                                             (*METRICS, "wall_s")))
    if "realistic" in result:
        r = result["realistic"]
        print(f"realistic: {r['gaussians']} Gaussians, {r['views_lifted']} views 640x480, {r['dim']}-d on "
              f"{r['teacher_grid']}, {r['threads']} threads: wall {r['wall_s']:.1f} s (lifting {r['lifting_s']:.1f}"
              f" s, setup {r['setup_s']:.1f} s), peak RSS {r['peak_rss_gb']:.2f} GB")
    print(f"{'target':<20}{'value':>12}{'target':>10}  met")
    for part in ("embedded", "realistic"):
        for k, c in result.get(part, {}).get("targets", {}).items():
            print(f"{k:<20}{c['value']:>12.4g}{c['target']:>10}  {'yes' if c['met'] else 'NO'}")
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
