"""Benchmark HeLlO on the embedded default (scikit-learn digits): accuracy per label source, storage, wall time.

For every IPC and seed the whole distillation runs (projector fit → RDED selection → export) with that
seed, then fresh students train on the exported set with each label source (hard, teacher online,
projector online, CLIP zero-shot online, random-real-images control). The teacher and the tiny CLIP are trained once (the
tiny CLIP from an empty cache, so its pretraining time is measured). Writes JSON and prints a table with, per IPC,
the share of the zero-shot → teacher gap the projector closes, projector / teacher, the margin over the
random-images control against the seed spread, and the storage (the base CLIP is public and not counted; its size
and pretraining data are reported).

    .venv/bin/python scripts/bench_hello.py                      # IPC 1 and 10, seeds 0 1 2
    .venv/bin/python scripts/bench_hello.py --ipc 10 --seeds 0   # one pipeline, the "embedded run"

``--streaming``: memory and throughput of the streaming data pipeline instead. Generates ``--num-images`` JPEGs
(shorter side 224 px) in ``--classes`` class folders under a temporary directory (deleted afterwards), then, in a
child process, indexes the ImageFolder tree and runs HeLlO's teacher scoring over every image (``rded_select``: all
images of each class scored by a small CNN teacher, decoded per batch in ``--workers`` DataLoader workers). Reports
images/s and the peak memory: the child's and its workers' peak RSS (``resource.getrusage``) and the peak of the
summed PSS of the process tree (sampled from ``/proc``; shared pages counted once)::

    .venv/bin/python scripts/bench_hello.py --streaming --num-images 5000 --classes 100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
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

SOURCES = ["hard", "teacher", "projector", "zero_shot", "random"]


def _ms(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _targets(per: dict[str, list[float]]) -> dict[str, float]:
    """The issue's figures from per-seed student accuracies: the share of the zero-shot → teacher gap the projector
    closes (on the means, and its spread over seeds), and the projector's margin over the random-images control
    against the seed spread (the larger of the two sources' standard deviations)."""
    (p, p_sd), (t, _), (z, _), (r, r_sd) = (_ms(per[k]) for k in ("projector", "teacher", "zero_shot", "random"))
    per_seed_gap = [(ps - zs) / (ts - zs) for ps, ts, zs in zip(per["projector"], per["teacher"], per["zero_shot"],
                                                                 strict=True) if ts != zs]
    margins = [ps - rs for ps, rs in zip(per["projector"], per["random"], strict=True)]
    return {"gap_closed": (p - z) / (t - z) if t != z else float("nan"), "gap_closed_per_seed": per_seed_gap,
            "control_margin": p - r, "control_margin_per_seed": margins, "seed_spread": max(p_sd, r_sd)}


def _make_image(job: tuple[str, int, int]) -> None:
    """One smooth random JPEG (gradients + ellipses + noise: compresses like a photo, ~10-20 kB), shorter side 224."""
    import numpy as np
    from PIL import Image, ImageDraw

    path, seed, label = job
    rng = np.random.default_rng(seed)
    w, h = 224 + int(rng.integers(0, 96)), 224
    if rng.random() < 0.5:
        w, h = h, w
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([np.sin(xx / rng.uniform(8, 40) + rng.uniform(0, 6)) * 60 + 40 * (label % 3 == k) + 100
                     for k in range(3)], -1) + np.cos(yy / rng.uniform(8, 40))[..., None] * 40
    img = Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        draw.ellipse([x0, y0, x0 + int(rng.integers(20, 120)), y0 + int(rng.integers(20, 120))],
                     fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    img.save(path, quality=90)


def _generate(root: Path, num_images: int, classes: int, procs: int, unique: int = 0) -> float:
    """``num_images`` JPEGs in ``classes`` folders; with ``unique`` > 0 only the first ``unique`` are encoded and the
    rest are hard links to them (same files to open and decode, a fraction of the generation time)."""
    from multiprocessing import Pool

    jobs, links = [], []
    for i in range(num_images):
        c = i % classes
        folder = root / f"class_{c:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = str(folder / f"{i:07d}.jpg")
        if unique and i >= unique:
            links.append((jobs[i % unique][0], path))
        else:
            jobs.append((path, i, c))
    t0 = time.perf_counter()
    with Pool(procs) as pool:
        for _ in pool.imap_unordered(_make_image, jobs, chunksize=64):
            pass
    for src, dst in links:
        os.link(src, dst)
    return time.perf_counter() - t0


def _tree_memory(pid: int) -> tuple[int, int]:
    """(summed PSS, summed RSS) in bytes of ``pid`` and all its descendants (0 for processes already gone)."""
    pids, stack = [], [pid]
    while stack:
        p = stack.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except OSError:
            continue
    pss = rss = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
                    elif line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
        except OSError:
            continue
    return pss, rss


def _score_child(args: argparse.Namespace) -> None:
    """In the child process: index the folder, score every image with a small teacher, print JSON."""
    from vkd.hello.config import ClassifierConfig
    from vkd.hello.data import load_imagefolder
    from vkd.hello.images import rded_select
    from vkd.hello.model import build_classifier

    torch.set_num_threads(args.threads or 1)
    t0 = time.perf_counter()
    # no verification pass: the figure is the scoring pass alone (data.verify=false, as for an ImageNet-scale set)
    data = load_imagefolder(args.score_dir, 224, num_workers=args.workers, verify=False)
    t_index = time.perf_counter() - t0
    torch.manual_seed(0)  # random weights: the scoring cost does not depend on them
    teacher = build_classifier(ClassifierConfig(arch="small_cnn", width=args.teacher_width, depth=3),
                               data.num_classes, 224).eval()
    per_class = int(data.counts().max())
    t0 = time.perf_counter()
    sel = rded_select(data, None, teacher, data.num_classes, ipc=1, factor=1, mipc=per_class, num_crop=1,
                      crop_scale=(1.0, 1.0), batch_size=args.batch_size, patch_dtype=torch.uint8)
    t_score = time.perf_counter() - t0
    print(json.dumps({
        "images": len(data), "classes": data.num_classes, "index_seconds": t_index, "score_seconds": t_score,
        "images_per_second": len(data) / t_score, "selected": int(sel.patches.shape[0]), "skipped": data.skipped,
        "child_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        # Linux: the largest terminated child (here: one DataLoader worker), not their sum
        "worker_peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "torch_threads": torch.get_num_threads()}))


def streaming_bench(args: argparse.Namespace) -> None:
    """Generate the ImageFolder tree, score it in a child process while sampling the tree's memory, report."""
    tmp = Path(tempfile.mkdtemp(prefix="vkd_hello_stream_", dir=args.tmp_dir or None))
    try:
        t_gen = _generate(tmp, args.num_images, args.classes, max(1, os.cpu_count() or 1), args.unique)
        disk = sum(f.stat().st_size for f in tmp.rglob("*.jpg"))
        distinct = f", {args.unique} distinct + hard links" if args.unique else ""
        print(f"generated {args.num_images} JPEGs in {args.classes} classes ({disk / 2**20:.0f} MiB{distinct}) in "
              f"{t_gen:.0f} s under {tmp}", flush=True)
        cmd = [sys.executable, __file__, "--score-dir", str(tmp), "--workers", str(args.workers), "--threads",
               str(args.threads or 1), "--teacher-width", str(args.teacher_width), "--batch-size",
               str(args.batch_size)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        peak = {"pss": 0, "rss": 0}
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                pss, rss = _tree_memory(proc.pid)
                peak["pss"], peak["rss"] = max(peak["pss"], pss), max(peak["rss"], rss)
                done.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        out, _ = proc.communicate()
        wall = time.perf_counter() - t0
        done.set()
        sampler.join()
        if proc.returncode:
            raise SystemExit(f"scoring child failed with exit code {proc.returncode}")
        child = json.loads(out.strip().splitlines()[-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    in_ram = args.num_images * 3 * 224 * 224  # what the former loader held: uint8 [N, 3, 224, 224]
    report = {
        "benchmark": "hello-streaming-imagefolder",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "num_images": args.num_images, "distinct_images": args.unique or args.num_images, "classes": args.classes,
        "workers": args.workers,
        "teacher": f"small_cnn width {args.teacher_width} depth 3 at 224 px (random weights)",
        "generate_seconds": t_gen, "jpeg_bytes_on_disk": disk, "child_wall_seconds": wall, **child,
        "peak_tree_pss_bytes": peak["pss"], "peak_tree_rss_bytes": peak["rss"],
        "in_ram_uint8_bytes_former_loader": in_ram,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "load_avg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench_hello_streaming_{args.num_images}.json"
    path.write_text(json.dumps(report, indent=2))
    gib = 2**30
    print(f"{args.num_images} images / {args.classes} classes, {args.workers} workers: teacher scoring "
          f"{child['images_per_second']:.1f} images/s ({child['score_seconds']:.1f} s, index {child['index_seconds']:.1f} s)")
    print(f"peak memory: process tree PSS {peak['pss'] / gib:.2f} GiB (RSS sum {peak['rss'] / gib:.2f} GiB); main "
          f"process RSS {child['child_peak_rss_bytes'] / gib:.2f} GiB, largest worker RSS "
          f"{child['worker_peak_rss_bytes'] / gib:.2f} GiB; the former in-RAM loader: {in_ram / gib:.2f} GiB of uint8")
    print(f"JSON: {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streaming", action="store_true", help="benchmark the streaming pipeline (see above)")
    ap.add_argument("--num-images", type=int, default=5000, help="--streaming: JPEGs to generate")
    ap.add_argument("--classes", type=int, default=100, help="--streaming: class folders")
    ap.add_argument("--workers", type=int, default=2, help="--streaming: DataLoader decoding workers")
    ap.add_argument("--teacher-width", type=int, default=8, help="--streaming: small CNN teacher width")
    ap.add_argument("--batch-size", type=int, default=64, help="--streaming: scoring (teacher) batch size")
    ap.add_argument("--tmp-dir", default="", help="--streaming: where the temporary image folder goes")
    ap.add_argument("--unique", type=int, default=0,
                    help="--streaming: encode only this many distinct JPEGs, hard-link the rest (0: all distinct)")
    ap.add_argument("--score-dir", default="", help=argparse.SUPPRESS)  # internal: the scoring child
    ap.add_argument("--ipc", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/bench/hello")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    ap.add_argument("--keep-cache", action="store_true", help="reuse a pretrained tiny CLIP from a previous run")
    ap.add_argument("--set", nargs="*", default=[], help="extra hello overrides, e.g. student.steps=200")
    args = ap.parse_args()
    if args.score_dir:
        _score_child(args)
        return
    if args.streaming:
        if args.out == "runs/bench/hello":
            args.out = "runs/bench/hello_streaming"
        streaming_bench(args)
        return
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
    print(f"tiny CLIP: zero-shot {clip_info['train_zero_shot_accuracy']:.4f} on its own pretraining pairs, in {t_clip:.1f} s",
          flush=True)

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
            public = json.loads((cfg.run_dir() / "hello.json").read_text())["storage"]["public"]
            print(f"IPC {ipc} seed {seed}: " + ", ".join(f"{s} {res['per_seed'][s][0]:.3f}" for s in SOURCES)
                  + f" | fit {t_fit:.0f} s, eval {t_eval:.0f} s", flush=True)
        summ = {f"acc_{s}": _ms(v) for s, v in per.items()}
        summ.update({k: _ms(v) for k, v in extra.items()})
        summ["projector_over_teacher"] = summ["acc_projector"][0] / summ["acc_teacher"][0]
        summ["ior"] = summ["acc_projector"][0] - summ["acc_random"][0]
        summ.update(_targets(per))
        results[str(ipc)] = {"summary": summ, "per_seed": per, "storage": storage, "public_clip": public,
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
    print("| IPC | hard | teacher online | projector online | zero-shot CLIP online | random-images control |"
          " gap closed | projector / teacher | projector − control (seed spread) |"
          " adapter bytes | stored soft labels | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for ipc, r in results.items():
        s, st = r["summary"], r["storage"]
        cells = " | ".join(f"{s[f'acc_{k}'][0]:.3f} ± {s[f'acc_{k}'][1]:.3f}" for k in SOURCES)
        print(f"| {ipc} | {cells} | {100 * s['gap_closed']:.0f} % | {s['projector_over_teacher']:.3f} |"
              f" {s['control_margin']:+.3f} ({s['seed_spread']:.3f}) | {int(st['adapter_bytes'])} |"
              f" {int(st['soft_label_bytes'])} | {100 * st['storage_ratio']:.2f} % |")
    print()
    for ipc, r in results.items():  # the targets, each with its verdict
        s, st = r["summary"], r["storage"]
        control = (s["control_margin"] > s["seed_spread"]) if ipc == "1" else (s["control_margin"] >= 0)
        word = "clearly above (margin > seed spread)" if ipc == "1" else "not below"
        print(f"IPC {ipc}: gap closed {100 * s['gap_closed']:.0f} % (target >= 70 %: "
              f"{'met' if s['gap_closed'] >= 0.7 else 'NOT met'}); projector / teacher {s['projector_over_teacher']:.3f}"
              f" (>= 0.95: {'met' if s['projector_over_teacher'] >= 0.95 else 'NOT met'}); control {word}: "
              f"{'met' if control else 'NOT met'}; storage {100 * st['storage_ratio']:.2f} %"
              f" (<= 1 %: {'met' if st['storage_ratio'] <= 0.01 else 'not met'})")
    pub = next(iter(results.values()))["public_clip"]
    pre = pub.get("pretraining", {})
    print(f"public (not counted): {pub.get('model')} — {pub.get('image_params')} image-tower parameters, "
          f"{pub.get('params')} in all ({pub.get('bytes')} bytes); pretrained on {pre.get('source')} "
          f"({pre.get('num_images')} images, {pre.get('target_train_images_seen')} of them target training images)")
    print()
    print(f"teacher {t_teacher:.0f} s, tiny CLIP {t_clip:.0f} s, one embedded run (teacher + CLIP + distill + eval, "
          f"IPC {first}) {embedded:.0f} s, whole benchmark {report['total_seconds']:.0f} s, "
          f"{report['threads']} thread(s); JSON: {out / 'bench_hello.json'}")


if __name__ == "__main__":
    main()
