"""Benchmark HeLlO on the embedded default (scikit-learn digits): accuracy per label source, storage, wall time.

For every IPC and seed the whole distillation runs (projector fit → RDED selection → export) with that
seed, then fresh students train on the exported set with each label source (hard, teacher online,
projector online, random-real-images control). The teacher and the tiny CLIP are trained once (the
tiny CLIP from an empty cache, so its pretraining time is measured). Writes JSON and prints a table.

    .venv/bin/python scripts/bench_hello.py                      # IPC 1 and 10, seeds 0 1 2
    .venv/bin/python scripts/bench_hello.py --ipc 10 --seeds 0   # one pipeline, the "embedded run"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vkd.config import find_preset, load_config  # noqa: E402
from vkd.hello.commands import run_hello, run_teacher  # noqa: E402
from vkd.hello.config import HelloConfig, HelloTeacherConfig  # noqa: E402
from vkd.hello.data import load_split  # noqa: E402
from vkd.hello.evaluate import evaluate_run  # noqa: E402
from vkd.hello.projector import build_clip  # noqa: E402

SOURCES = ["hard", "teacher", "projector", "random"]


def _ms(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ipc", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/bench/hello")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    ap.add_argument("--keep-cache", action="store_true", help="reuse a pretrained tiny CLIP from a previous run")
    ap.add_argument("--set", nargs="*", default=[], help="extra hello overrides, e.g. student.steps=200")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    runs = out / "runs"
    cache = out / "cache"
    if runs.exists():
        shutil.rmtree(runs)
    if cache.exists() and not args.keep_cache:
        shutil.rmtree(cache)
    t_all = time.perf_counter()

    # 1. teacher (small CNN, 9 weak-teacher snapshots)
    tcfg = load_config(HelloTeacherConfig, find_preset("hello", "digits-teacher"),
                       [f"run.output_dir={runs}"], task="hello-teacher")
    t0 = time.perf_counter()
    tsum = run_teacher(tcfg)
    t_teacher = time.perf_counter() - t0
    print(f"teacher: test acc {tsum['eval']['test_acc']:.4f} in {t_teacher:.1f} s", flush=True)

    common = [f"run.output_dir={runs}", f"clip.cache_dir={cache}"] + list(args.set)
    base = load_config(HelloConfig, find_preset("hello", "digits"), common, task="hello")

    # 2. tiny CLIP pretraining (cached afterwards)
    t0 = time.perf_counter()
    build_clip(base, load_split(base.data, "train"), progress=False)
    t_clip = time.perf_counter() - t0
    clip_info = json.loads(next(cache.glob("tiny_clip/*/vkd_tiny_clip.json")).read_text())
    print(f"tiny CLIP: train zero-shot {clip_info['train_zero_shot_accuracy']:.4f} in {t_clip:.1f} s", flush=True)

    # 3. distill + evaluate per IPC and seed
    results: dict[str, dict] = {}
    for ipc in args.ipc:
        per: dict[str, list[float]] = {s: [] for s in SOURCES}
        extra: dict[str, list[float]] = {"projector_test_acc": [], "teacher_test_acc": [], "zero_shot_test_acc": [],
                                         "fit_seconds": [], "eval_seconds": []}
        storage = {}
        for seed in args.seeds:
            cfg = load_config(HelloConfig, find_preset("hello", "digits"), common + [
                f"run.seed={seed}", f"run.name=ipc{ipc}_seed{seed}", f"selection.ipc={ipc}",
                f"eval.seeds=[{seed}]"], task="hello")
            t0 = time.perf_counter()
            summary = run_hello(cfg)
            t_fit = time.perf_counter() - t0
            t0 = time.perf_counter()
            res = evaluate_run(cfg, cfg.run_dir(), progress=False)
            t_eval = time.perf_counter() - t0
            for s in SOURCES:
                per[s] += res["per_seed"][s]
            for k in ("projector_test_acc", "zero_shot_test_acc"):
                extra[k].append(summary["eval"][k])
            extra["teacher_test_acc"].append(res["summary"]["teacher_test_acc"])
            extra["fit_seconds"].append(t_fit)
            extra["eval_seconds"].append(t_eval)
            storage = res["storage"]
            print(f"IPC {ipc} seed {seed}: " + ", ".join(f"{s} {res['per_seed'][s][0]:.3f}" for s in SOURCES)
                  + f" | fit {t_fit:.0f} s, eval {t_eval:.0f} s", flush=True)
        summ = {f"acc_{s}": _ms(v) for s, v in per.items()}
        summ.update({k: _ms(v) for k, v in extra.items()})
        summ["projector_over_teacher"] = summ["acc_projector"][0] / summ["acc_teacher"][0]
        summ["ior"] = summ["acc_projector"][0] - summ["acc_random"][0]
        results[str(ipc)] = {"summary": summ, "per_seed": per, "storage": storage,
                             "per_seed_seconds": {"fit": extra["fit_seconds"], "eval": extra["eval_seconds"]}}

    first = str(10 if 10 in args.ipc else args.ipc[0])
    # one embedded run = teacher + tiny CLIP + distill + eval of the first seed's IPC-10 pipeline
    embedded = t_teacher + t_clip + results[first]["per_seed_seconds"]["fit"][0] + \
        results[first]["per_seed_seconds"]["eval"][0]
    report = {
        "benchmark": "hello-embedded-digits",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "ipc": args.ipc, "seeds": args.seeds, "threads": torch.get_num_threads(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "load_avg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "teacher": {"test_acc": tsum["eval"]["test_acc"], "seconds": t_teacher},
        "tiny_clip": {"seconds": t_clip, **{k: clip_info[k] for k in ("train_zero_shot_accuracy", "final_loss")}},
        "results": results,
        "embedded_run_seconds": embedded,
        "total_seconds": time.perf_counter() - t_all,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_hello.json").write_text(json.dumps(report, indent=2))

    print()
    print("| IPC | hard | teacher online | projector online | random-images control | projector / teacher |"
          " adapter bytes | stored soft labels | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for ipc, r in results.items():
        s, st = r["summary"], r["storage"]
        cells = " | ".join(f"{s[f'acc_{k}'][0]:.3f} ± {s[f'acc_{k}'][1]:.3f}" for k in SOURCES)
        print(f"| {ipc} | {cells} | {s['projector_over_teacher']:.3f} | {int(st['adapter_bytes'])} |"
              f" {int(st['soft_label_bytes'])} | {100 * st['storage_ratio']:.2f} % |")
    print()
    print(f"teacher {t_teacher:.0f} s, tiny CLIP {t_clip:.0f} s, one embedded run (teacher + CLIP + distill + eval, "
          f"IPC {first}) {embedded:.0f} s, whole benchmark {report['total_seconds']:.0f} s, "
          f"{report['threads']} thread(s); JSON: {out / 'bench_hello.json'}")


if __name__ == "__main__":
    main()
