#!/usr/bin/env python
"""Benchmark BOOT on the embedded default: train the digits teacher, distil it with BOOT, then measure
FID (digits CNN extractor, NOT Inception; N samples vs the 360 held-out test digits) and images/s of the
one-step student and of the teacher with DDIM 1, 4, 10 and 50 steps, on the same seeded noise, in one run.

    python scripts/bench_boot.py                       # full: train both stages, 2,000 samples
    python scripts/bench_boot.py --reuse               # reuse finished runs in --out
    python scripts/bench_boot.py --teacher-steps 300 --boot-steps 200 --num-samples 500   # quick
    python scripts/bench_boot.py --prediction-type epsilon   # the digits teacher retrained as ε-prediction

``--prediction-type`` retrains the embedded teacher as an ε-, v- or x0-prediction model (runs named
``digits-<type>``; ``sample`` is the shipped default, run name ``digits``); the student parameterisation
is the preset's (``auto``: preconditioned for ε and v).

Writes ``<out>/bench_boot_<run name>.json`` and prints a table. Wall times depend on what else runs on the machine:
the JSON also records process CPU time and the load average so shared-machine numbers can be read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def timed(fn):
    t0, c0 = time.perf_counter(), cpu_seconds()
    out = fn()
    return out, time.perf_counter() - t0, cpu_seconds() - c0


def main() -> int:
    from vkd.boot.commands import run_boot, run_teacher
    from vkd.boot.config import BootConfig, BootTeacherConfig
    from vkd.boot.evaluate import compare_generators
    from vkd.boot.student import exported_student
    from vkd.config import load_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_boot")
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--ddim", default="1,4,10,50", help="teacher DDIM step counts")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--teacher-steps", type=int, default=None, help="override train.steps of digits-teacher")
    p.add_argument("--boot-steps", type=int, default=None, help="override train.steps of digits")
    p.add_argument("--reuse", action="store_true", help="reuse finished runs in --out instead of training")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--prediction-type", choices=("sample", "epsilon", "v_prediction"), default="sample",
                   help="the digits teacher's prediction type (sample = the embedded default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override of the BOOT config (e.g. student.parameterization=teacher_to_x0)")
    p.add_argument("--tag", default="", help="suffix of the BOOT run name (the teacher run is shared)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    result: dict = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                "platform": platform.platform(), "python": platform.python_version(),
                                "torch": torch.__version__, "loadavg_start": load_start},
                    "num_samples": args.num_samples, "seed": args.seed, "prediction_type": args.prediction_type,
                    "boot_overrides": args.set}
    teacher_name = "digits" if args.prediction_type == "sample" else f"digits-{args.prediction_type}"
    name = f"{teacher_name}-{args.tag}" if args.tag else teacher_name

    # ---- 1. teacher training -----------------------------------------------------------------
    t_sets = [f"run.output_dir={out}", f"run.name={teacher_name}", f"scheduler.prediction_type={args.prediction_type}"]
    if args.teacher_steps:
        t_sets.append(f"train.steps={args.teacher_steps}")
    tcfg = load_config(BootTeacherConfig, ROOT / "configs/boot/digits-teacher.yaml", t_sets, task="boot-teacher")
    teacher_dir = tcfg.run_dir() / "teacher"
    if args.reuse and (teacher_dir / "model_index.json").is_file():
        result["teacher_training"] = json.loads((out / f"bench_times_{name}.json").read_text())["teacher_training"] \
            if (out / f"bench_times_{name}.json").is_file() else {"reused": True}
    else:
        _, wall, cpu = timed(lambda: run_teacher(tcfg, resume=None if not tcfg.run_dir().exists() else "latest"))
        result["teacher_training"] = {"steps": tcfg.train.steps, "wall_s": wall, "cpu_s": cpu}

    # ---- 2. BOOT distillation ------------------------------------------------------------------
    b_sets = [f"run.output_dir={out}", f"run.name={name}", f"teacher.path={teacher_dir}", "eval.num_samples=0",
              *args.set]
    if args.boot_steps:
        b_sets.append(f"train.steps={args.boot_steps}")
    bcfg = load_config(BootConfig, ROOT / "configs/boot/digits.yaml", b_sets, task="boot")
    if args.reuse and exported_student(bcfg.run_dir()) is not None:
        result["boot_training"] = json.loads((out / f"bench_times_{name}.json").read_text())["boot_training"] \
            if (out / f"bench_times_{name}.json").is_file() else {"reused": True}
    else:
        _, wall, cpu = timed(lambda: run_boot(bcfg, resume=None if not bcfg.run_dir().exists() else "latest"))
        result["boot_training"] = {"steps": bcfg.train.steps, "wall_s": wall, "cpu_s": cpu}
    (out / f"bench_times_{name}.json").write_text(json.dumps({k: result[k] for k in ("teacher_training", "boot_training")}))
    tt, bt = result["teacher_training"], result["boot_training"]
    if "wall_s" in tt and "wall_s" in bt:
        result["train_total"] = {"wall_s": tt["wall_s"] + bt["wall_s"], "cpu_s": tt["cpu_s"] + bt["cpu_s"]}

    # ---- 3. FID and throughput, same noise for every generator -------------------------------------
    cmp = compare_generators(bcfg.run_dir(), args.num_samples, [int(v) for v in args.ddim.split(",")], args.seed,
                             args.batch_size, grid_dir=out / f"grids_{name}", progress=lambda line: print("  " + line,
                                                                                                 flush=True))
    rows = cmp["generators"]
    result.update(extractor=cmp["extractor"], extractor_sha256=cmp["extractor_sha256"],
                  num_reference=cmp["num_reference"], grids=cmp["grids"])
    result["generators"] = rows
    s, d50, d1 = rows["boot_student_1step"], rows.get("teacher_ddim50"), rows.get("teacher_ddim1")
    targets = {}
    if d50:
        targets["student_fid_over_ddim50_fid"] = s["fid"] / d50["fid"]
        targets["fid_vs_ddim50_ok (<= 1.25)"] = s["fid"] <= 1.25 * d50["fid"]
        targets["speedup_vs_ddim50"] = s["images_per_s"] / d50["images_per_s"]
        targets["speedup_ok (>= 30)"] = targets["speedup_vs_ddim50"] >= 30
    if d1:
        targets["student_fid_over_ddim1_fid"] = s["fid"] / d1["fid"]
        targets["fid_vs_ddim1_ok (<= 0.5)"] = s["fid"] <= 0.5 * d1["fid"]
    if "train_total" in result:
        targets["train_total_wall_min"] = result["train_total"]["wall_s"] / 60
        targets["train_total_ok (<= 10 min wall)"] = result["train_total"]["wall_s"] <= 600
    result["targets"] = targets
    result["machine"]["loadavg_end"] = os.getloadavg()
    (out / f"bench_boot_{name}.json").write_text(json.dumps(result, indent=2) + "\n")

    print(f"\nBOOT benchmark (digits teacher, {args.prediction_type} prediction; FID with {result['extractor']}, "
          f"{args.num_samples} samples vs {result['num_reference']} held-out digits)")
    print(f"{'generator':<22s}{'NFE':>5s}{'FID':>10s}{'img/s':>12s}")
    for gen, r in rows.items():
        print(f"{gen:<22s}{r['nfe']:>5d}{r['fid']:>10.3f}{r['images_per_s']:>12.1f}")
    for stage in ("teacher_training", "boot_training", "train_total"):
        if stage in result and "wall_s" in result[stage]:
            r = result[stage]
            print(f"{stage:<22s} wall {r['wall_s'] / 60:6.2f} min   process CPU {r['cpu_s'] / 60:6.2f} min")
    for k, v in targets.items():
        print(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")
    print(f"load average start {load_start}, end {result['machine']['loadavg_end']}; "
          f"JSON: {out / f'bench_boot_{name}.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
