#!/usr/bin/env python
"""Benchmark BOOT on the embedded default: train the digits teacher, distil it with BOOT, then measure
FID and precision/recall (k = 3; digits CNN extractor, NOT Inception; N samples vs the 360 held-out test digits) and
images/s of the one-step student and of the teacher with DDIM 1, 4, 10 and 50 steps, on the same seeded noise, in one
run.

    python scripts/bench_boot.py                       # full: train both stages, 2,000 samples
    python scripts/bench_boot.py --reuse               # reuse finished runs in --out
    python scripts/bench_boot.py --teacher-steps 300 --boot-steps 200 --num-samples 500   # quick
    python scripts/bench_boot.py --prediction-type epsilon   # the digits teacher retrained as ε-prediction
    python scripts/bench_boot.py --text                # the embedded text-to-image teacher, BOOT from prompts

``--prediction-type`` retrains the embedded teacher as an ε-, v- or x0-prediction model (runs named
``digits-<type>``; ``sample`` is the shipped default, run name ``digits``); the student parameterisation
is the preset's (``auto``: an x0 head for ε and v, with ``loss.time_weight=auto`` lowering the noise-amplified
steps of ε teachers).

``--text`` trains the embedded text-to-image teacher (``digits-text-teacher``: UNet2DConditionModel + CLIPTextModel on
captioned digits, ε-prediction) and distils it from its prompt file alone (``digits-text``); every generator then also
reports its **prompt accuracy** (the digits classifier's agreement with the digit the prompt names).
Every generator reports its same-noise RMS distance to the teacher's longest DDIM chain.

``--seeds 0,1,2`` trains the teacher once (its preset seed), then reruns BOOT with ``run.seed=s`` and scores every
generator on noise seeded by ``--seed + s``, for each ``s``; the table gives mean ± std (population std over the
seeds) of every figure, and ``bench_boot_<name>-seeds.json`` holds the per-seed rows. The teacher rows vary only
with the noise; the student rows with the BOOT training seed and the noise.

Writes ``<out>/bench_boot_<run name>.json`` and prints a table. Wall times depend on what else runs on the machine:
the JSON also records process CPU time and the load average so shared-machine numbers can be read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
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
    from vkd.boot.commands import run_boot, run_teacher, run_text_teacher
    from vkd.boot.config import BootConfig, BootTeacherConfig, BootTextTeacherConfig
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
    p.add_argument("--reuse-teacher", action="store_true", help="reuse a finished teacher run in --out (BOOT trains)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--prediction-type", choices=("sample", "epsilon", "v_prediction"), default=None,
                   help="retrain the teacher with this prediction type (default: the preset's: sample for the digits "
                        "teacher, epsilon for the text teacher)")
    p.add_argument("--text", action="store_true",
                   help="the embedded text-to-image teacher (digits-text-teacher) and BOOT from its prompts (digits-text)")
    p.add_argument("--run-seed", type=int, default=None, help="run.seed of both trainings (default: the presets')")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override of the BOOT config (e.g. student.parameterization=teacher_to_x0)")
    p.add_argument("--tag", default="", help="suffix of the BOOT run name (the teacher run is shared)")
    p.add_argument("--seeds", default=None, metavar="S,S,...",
                   help="BOOT training seeds (one teacher): mean ± std over them (e.g. 0,1,2)")
    args = p.parse_args()
    if args.seeds is not None:
        if args.run_seed is not None:
            p.error("--seeds and --run-seed exclude each other (--seeds keeps the teacher's preset seed)")
        return multi_seed(args, [int(v) for v in args.seeds.split(",")])
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
    teacher_name = "digits-text" if args.text else "digits"
    if args.prediction_type is not None and args.prediction_type != ("epsilon" if args.text else "sample"):
        teacher_name += f"-{args.prediction_type}"
    if args.run_seed is not None:
        teacher_name += f"-seed{args.run_seed}"
    name = f"{teacher_name}-{args.tag}" if args.tag else teacher_name
    result["text_to_image"] = args.text
    seed_sets = [] if args.run_seed is None else [f"run.seed={args.run_seed}"]

    # ---- 1. teacher training -----------------------------------------------------------------
    t_sets = [f"run.output_dir={out}", f"run.name={teacher_name}", *seed_sets]
    if args.prediction_type is not None:
        t_sets.append(f"scheduler.prediction_type={args.prediction_type}")
    if args.teacher_steps:
        t_sets.append(f"train.steps={args.teacher_steps}")
    if args.text:
        tcfg = load_config(BootTextTeacherConfig, ROOT / "configs/boot/digits-text-teacher.yaml", t_sets,
                           task="boot-text-teacher")
        train_teacher = run_text_teacher
    else:
        tcfg = load_config(BootTeacherConfig, ROOT / "configs/boot/digits-teacher.yaml", t_sets, task="boot-teacher")
        train_teacher = run_teacher
    teacher_dir = tcfg.run_dir() / "teacher"
    result["prediction_type"] = tcfg.scheduler.prediction_type
    if (args.reuse or args.reuse_teacher) and (teacher_dir / "model_index.json").is_file():
        result["teacher_training"] = json.loads((out / f"bench_times_{name}.json").read_text())["teacher_training"] \
            if (out / f"bench_times_{name}.json").is_file() else {"reused": True}
    else:
        _, wall, cpu = timed(lambda: train_teacher(tcfg, resume=None if not tcfg.run_dir().exists() else "latest"))
        result["teacher_training"] = {"steps": tcfg.train.steps, "wall_s": wall, "cpu_s": cpu}

    # ---- 2. BOOT distillation ------------------------------------------------------------------
    b_sets = [f"run.output_dir={out}", f"run.name={name}", f"teacher.path={teacher_dir}", "eval.num_samples=0",
              *seed_sets]
    if args.text:
        b_sets.append(f"data.prompts={tcfg.run_dir() / 'prompts.txt'}")
    b_sets += args.set
    if args.boot_steps:
        b_sets.append(f"train.steps={args.boot_steps}")
    preset = "digits-text" if args.text else "digits"
    bcfg = load_config(BootConfig, ROOT / f"configs/boot/{preset}.yaml", b_sets, task="boot")
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
    fid_limit = 1.3 if args.text else 1.25
    if d50:
        targets["student_fid_over_ddim50_fid"] = s["fid"] / d50["fid"]
        targets[f"fid_vs_ddim50_ok (<= {fid_limit})"] = s["fid"] <= fid_limit * d50["fid"]
        if "prompt_accuracy" in s and "prompt_accuracy" in d50:
            targets["prompt_accuracy_over_ddim50"] = s["prompt_accuracy"] / max(d50["prompt_accuracy"], 1e-9)
            targets["prompt_accuracy_ok (>= 0.95)"] = targets["prompt_accuracy_over_ddim50"] >= 0.95
        targets["speedup_vs_ddim50"] = s["images_per_s"] / d50["images_per_s"]
        targets["speedup_ok (>= 30)"] = targets["speedup_vs_ddim50"] >= 30
    if d1:
        targets["student_fid_over_ddim1_fid"] = s["fid"] / d1["fid"]
        targets["fid_vs_ddim1_ok (<= 0.5)"] = s["fid"] <= 0.5 * d1["fid"]
    if "train_total" in result:
        limit_min = 15 if args.text else 10
        targets["train_total_wall_min"] = result["train_total"]["wall_s"] / 60
        targets[f"train_total_ok (<= {limit_min} min wall)"] = result["train_total"]["wall_s"] <= 60 * limit_min
    result["targets"] = targets
    result["machine"]["loadavg_end"] = os.getloadavg()
    (out / f"bench_boot_{name}.json").write_text(json.dumps(result, indent=2) + "\n")

    kind = "text-to-image digits teacher" if args.text else "digits teacher"
    print(f"\nBOOT benchmark ({kind}, {result['prediction_type']} prediction; FID with {result['extractor']}, "
          f"{args.num_samples} samples vs {result['num_reference']} held-out digits; RMS to {cmp['reference_chain']} "
          f"on the same noise)")
    print(f"{'generator':<22s}{'NFE':>5s}{'FID':>10s}{'prec':>7s}{'recall':>7s}{'img/s':>12s}{'RMS':>8s}"
          f"{'prompt acc':>12s}")
    for gen, r in rows.items():
        acc = f"{r['prompt_accuracy']:>12.3f}" if "prompt_accuracy" in r else f"{'-':>12s}"
        print(f"{gen:<22s}{r['nfe']:>5d}{r['fid']:>10.3f}{r['precision']:>7.3f}{r['recall']:>7.3f}"
              f"{r['images_per_s']:>12.1f}{r.get('rms_to_reference', float('nan')):>8.3f}{acc}")
    for stage in ("teacher_training", "boot_training", "train_total"):
        if stage in result and "wall_s" in result[stage]:
            r = result[stage]
            print(f"{stage:<22s} wall {r['wall_s'] / 60:6.2f} min   process CPU {r['cpu_s'] / 60:6.2f} min")
    for k, v in targets.items():
        print(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")
    print(f"load average start {load_start}, end {result['machine']['loadavg_end']}; "
          f"JSON: {out / f'bench_boot_{name}.json'}")
    return 0


def _mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    return mean, (sum((v - mean) ** 2 for v in values) / n) ** 0.5


def multi_seed(args: argparse.Namespace, seeds: list[int]) -> int:
    """``--seeds``: one teacher, BOOT per seed (``--tag seed<s>``), then mean ± std of every generator's figures."""
    out = args.out.resolve()
    per_seed: dict[int, dict] = {}
    base = list(sys.argv[1:])
    i = base.index("--seeds")
    base = base[:i] + base[i + 2:]
    for n, s in enumerate(seeds):
        tag = f"{args.tag}-seed{s}" if args.tag else f"seed{s}"
        # reuse the teacher after the first seed; a BOOT run of a seed is reused only with --reuse
        cmd = [sys.executable, __file__, *base, "--tag", tag, "--seed", str(args.seed + s),
               "--set", f"run.seed={s}"]
        if n > 0 and "--reuse" not in cmd:
            cmd.append("--reuse-teacher")
        print(f"== seed {s}: {' '.join(cmd[1:])}", flush=True)
        subprocess.run(cmd, check=True)
        name = _json_name(args, tag)
        per_seed[s] = json.loads((out / f"bench_boot_{name}.json").read_text())
    first = per_seed[seeds[0]]
    keys = ("fid", "precision", "recall", "images_per_s", "rms_to_reference", "prompt_accuracy")
    summary: dict = {}
    for gen in first["generators"]:
        summary[gen] = {"nfe": first["generators"][gen]["nfe"]}
        for k in keys:
            vals = [per_seed[s]["generators"][gen][k] for s in seeds if k in per_seed[s]["generators"][gen]]
            if len(vals) == len(seeds):
                summary[gen][k] = dict(zip(("mean", "std"), _mean_std(vals), strict=True))
    ratio = [per_seed[s]["generators"]["boot_student_1step"]["fid"] / per_seed[s]["generators"]["teacher_ddim50"]["fid"]
             for s in seeds if "teacher_ddim50" in per_seed[s]["generators"]]
    result = {"seeds": seeds, "noise_seeds": [args.seed + s for s in seeds], "prediction_type": first["prediction_type"],
              "text_to_image": first["text_to_image"], "extractor": first["extractor"],
              "num_samples": first["num_samples"], "num_reference": first["num_reference"], "generators": summary,
              "per_seed": {str(s): per_seed[s]["generators"] for s in seeds},
              "boot_training_wall_s": [per_seed[s]["boot_training"].get("wall_s") for s in seeds]}
    if ratio:
        fid_limit = 1.3 if args.text else 1.25
        m, sd = _mean_std(ratio)
        result["targets"] = {"student_fid_over_ddim50_fid": {"mean": m, "std": sd, "per_seed": ratio},
                             f"fid_vs_ddim50_ok (<= {fid_limit}, mean)": m <= fid_limit}
    name = _json_name(args, f"{args.tag}-seeds" if args.tag else "seeds")
    (out / f"bench_boot_{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nBOOT benchmark, {len(seeds)} seeds {seeds} ({first['prediction_type']} prediction; FID with "
          f"{first['extractor']}, {first['num_samples']} samples vs {first['num_reference']} held-out digits), "
          "mean ± std")
    cols = [k for k in keys if k in summary["boot_student_1step"]]
    print(f"{'generator':<22s}{'NFE':>5s}" + "".join(f"{k:>22s}" for k in cols))
    for gen, r in summary.items():
        print(f"{gen:<22s}{r['nfe']:>5d}" + "".join(
            f"{r[k]['mean']:>13.3f} ± {r[k]['std']:<6.3f}" if k in r else f"{'-':>22s}" for k in cols))
    for k, v in result.get("targets", {}).items():
        print(f"  {k}: {v['mean']:.3f} ± {v['std']:.3f} (per seed {', '.join(f'{x:.3f}' for x in v['per_seed'])})"
              if isinstance(v, dict) else f"  {k}: {v}")
    print(f"JSON: {out / f'bench_boot_{name}.json'}")
    return 0


def _json_name(args: argparse.Namespace, tag: str) -> str:
    """The run name :func:`main` gives ``bench_boot_<name>.json`` for these arguments and ``tag``."""
    name = "digits-text" if args.text else "digits"
    if args.prediction_type is not None and args.prediction_type != ("epsilon" if args.text else "sample"):
        name += f"-{args.prediction_type}"
    return f"{name}-{tag}" if tag else name


if __name__ == "__main__":
    raise SystemExit(main())
