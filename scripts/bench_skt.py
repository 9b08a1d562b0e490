#!/usr/bin/env python
"""SKT benchmark on the embedded default (synthetic crowds, CPU).

Trains, in one process and with the same data and budget, (1) the CSRNet teacher, (2) the 1/4 student with SKT
and (3) the same 1/4 student without transfer (ground-truth loss only), through the same functions as
``vkd distill skt-teacher`` / ``vkd distill skt``; the two students are trained once per ``--seeds`` seed (``run.seed``:
initial weights, batch order and augmentation) from the one teacher, and reported as mean ± std over the seeds. Reports MAE and RMSE (RMSE is what the papers call "MSE") on
the synthetic test split, parameters, MACs at 576×864 (forward hooks on every conv, cross-checked with
``torch.utils.flop_counter.FlopCounterMode``) and CPU latency of teacher and student at 576×864, measured
interleaved in the same run. Writes a JSON file and prints a table.

    .venv/bin/python scripts/bench_skt.py [--out bench_skt.json] [--set train.steps=N] [--latency-repeats 3]
        [--seeds 0,1,2]
    .venv/bin/python scripts/bench_skt.py --cache [--out bench_skt_cache.json]

``--cache`` only measures the density cache on a UCF-QNRF-sized synthetic crowd (2013×2902 px, 815 heads, the
UCF-QNRF preset's kernel): bytes per image of the full-resolution float32 map (the previous format) and of the 1/8
float16 one, time to build each (median of 3, cold cache), time to read it back, and the count error of float16.

    .venv/bin/python scripts/bench_skt.py --export [--out bench_skt_export.json] [--threads 2]

``--export`` only compares torch and ONNX Runtime (``vkd export skt``) for the 1/4 student: one 1280×720 forward
(batch 1, ``--export-repeats`` interleaved repeats, torch threads = ORT intra-op threads = ``--threads``, default
2) with the count difference, and ``vkd count``'s frames per second on a generated 1280×720 clip.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vkd.config import load_config  # noqa: E402
from vkd.engine import native_bf16  # noqa: E402
from vkd.skt.commands import run_skt, run_teacher  # noqa: E402
from vkd.skt.config import SKTConfig, SKTTeacherConfig  # noqa: E402
from vkd.skt.crowds import CrowdSpec, generate_crowd  # noqa: E402
from vkd.skt.datasets import resolve_root  # noqa: E402
from vkd.skt.density import DensityCache, KernelSpec, density_map, sum_pool  # noqa: E402
from vkd.skt.evaluate import measure_latency  # noqa: E402
from vkd.skt.models import CSRNet, count_macs, count_parameters  # noqa: E402


def flop_counter_macs(model: torch.nn.Module, shape: tuple[int, ...]) -> float:
    """MACs from torch's FlopCounterMode (conv FLOPs = 2·MACs), on the meta device."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(model).to("meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta(torch.empty(shape, device="meta"))
    return counter.get_total_flops() / 2


def train_students(train, sets: list[str], seeds: list[int], work: Path):
    """The SKT student and the no-transfer student (ground-truth loss only) for each seed; ``train(label, fn, cfg)``
    records ``student_skt_s<seed>`` / ``student_scratch_s<seed>``. Returns the first seed's SKT config."""
    first = None
    for seed in seeds:
        for label, extra in (("skt", []), ("scratch", ["loss.teacher_weight=0", "loss.cos_weight=0",
                                                       "loss.fsp_weight=0"])):
            name = f"bench-{label}-s{seed}"
            shutil.rmtree(work / "skt" / name, ignore_errors=True)
            cfg = load_config(SKTConfig, None, sets + [f"run.seed={seed}", f"run.name={name}", *extra], task="skt")
            train(f"student_{label}_s{seed}", run_skt, cfg)
            first = first or cfg
    return first


def over_seeds(per_seed: dict[int, dict]) -> dict:
    """Mean and sample standard deviation (n−1) of MAE, RMSE and training time over the seeds' runs."""
    out: dict = {"per_seed": per_seed, "seeds": sorted(per_seed)}
    for key in ("mae", "rmse", "train_wall_s"):
        values = [r[key] for r in per_seed.values()]
        out[key] = statistics.mean(values)
        out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def bench_density_cache(workdir: Path, height: int = 2013, width: int = 2902, people: int = 1000,
                        repeats: int = 3) -> dict:
    """Bytes per image, build and read time of the density cache, full-resolution float32 vs 1/8 float16.

    The image is a synthetic crowd of UCF-QNRF's average size (2013×2902 px; ``people`` placed, 815 annotated
    heads visible with the default seed) and the UCF-QNRF preset's kernel (σ = min(NN distance, 30)). The full
    resolution cache is the previous ``<root>/.vkd_density`` format (same key, same ``.npy``).
    """
    _, points = generate_crowd(np.random.default_rng(0), CrowdSpec(height=height, width=width, count_min=people,
                                                                    count_max=people, supersample=1))
    spec = KernelSpec("nn_capped", cap=30.0)
    exact = float(sum_pool(density_map(points, height, width, spec).double()).sum())
    out: dict = {"image_hw": [height, width], "heads": len(points), "kernel": "nn_capped, cap 30",
                 "full_fp32_bytes_formula": 4 * height * width}
    for resolution in ("full", "eighth"):
        builds, reads = [], []
        for i in range(repeats):
            directory = workdir / f"{resolution}-{i}"
            shutil.rmtree(directory, ignore_errors=True)
            cache = DensityCache(directory, resolution)
            t0 = time.perf_counter()
            cache.get(points, height, width, spec, name="qnrf")  # cold: splat (+ pool), write
            builds.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            stored = np.array(cache.get(points, height, width, spec, name="qnrf"))  # warm: memory map, copied
            reads.append(time.perf_counter() - t0)
        (file,) = directory.glob("qnrf-*.npy")
        out[resolution] = {"bytes": file.stat().st_size, "dtype": str(stored.dtype), "shape": list(stored.shape),
                           "build_s_median": statistics.median(builds), "build_s": builds,
                           "read_s_median": statistics.median(reads),
                           "count_minus_exact": float(stored.astype(np.float64).sum()) - exact}
        shutil.rmtree(workdir, ignore_errors=True)
    out["bytes_ratio"] = out["eighth"]["bytes"] / out["full"]["bytes"]
    out["targets"] = {"bytes_le_1/100": out["bytes_ratio"] <= 0.01}
    return out


def run_cache_bench(result: dict, out: Path, workdir: Path) -> None:
    """``--cache``: :func:`bench_density_cache`, written to ``out`` and printed."""
    cache = result["density_cache"] = bench_density_cache(workdir)
    result["machine"]["load_avg_end"] = list(os.getloadavg())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    h, w = cache["image_hw"]
    print(f"\nSKT density cache, one {h}x{w} synthetic crowd ({cache['heads']} heads, {cache['kernel']})")
    print(f"{'format':<26}{'bytes':>12}{'build s':>10}{'read s':>10}{'count error':>14}")
    for label, key in (("full-res float32 (old)", "full"), ("1/8 float16 (new)", "eighth")):
        r = cache[key]
        print(f"{label:<26}{r['bytes']:>12,}{r['build_s_median']:>10.3f}{r['read_s_median']:>10.4f}"
              f"{r['count_minus_exact']:>14.2e}")
    print(f"new / old bytes: {cache['bytes_ratio']:.5f} (1/{1 / cache['bytes_ratio']:.0f}); target <= 1/100: "
          f"{'yes' if cache['targets']['bytes_le_1/100'] else 'NO'}")
    print(f"wrote {out}")


def _crowd_clip(path: Path, frames: int, fps: float = 25.0) -> None:
    """A 1280×720 H.264 clip: a window panning across a 1440×810 synthetic crowd (the README's video figures)."""
    from vkd.skt.video import VideoWriter

    image, _ = generate_crowd(np.random.default_rng(0), CrowdSpec(height=810, width=1440, count_min=140,
                                                                   count_max=140, supersample=1))
    pixels = np.asarray(image)
    with VideoWriter(path, fps) as writer:
        for k in range(frames):
            x0 = round(160 * k / max(frames - 1, 1))
            y0 = round(90 * k / max(frames - 1, 1))
            writer.append(np.ascontiguousarray(pixels[y0:y0 + 720, x0:x0 + 1280]))


def bench_export(workdir: Path, threads: int = 2, repeats: int = 10, video_frames: int = 20,
                 video_repeats: int = 1) -> dict:
    """Torch vs ONNX Runtime for the 1/4-CSRNet student (random weights: the same time as trained ones).

    (a) One 1280×720 forward (batch 1, the whole frame, no tiling) of a synthetic crowd, ``repeats`` times,
    torch and ONNX Runtime interleaved after one warm-up each, and the difference of their counts. (b) Frames per
    second of ``vkd count``'s path (decode, tiling into 6 tiles of ≤ 512 px, count, overlay, encode) on a
    ``video_frames``-frame 1280×720 clip, both runtimes in turn, ``video_repeats`` times. ``threads`` torch
    threads and ONNX Runtime intra-op threads.
    """
    from safetensors.torch import save_file

    from vkd.skt.checkpoints import Counter, load_counter
    from vkd.skt.count import count_inputs
    from vkd.skt.export import export_counter, exported_counter_fields

    torch.set_num_threads(threads)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    torch.manual_seed(0)
    save_file(CSRNet(4).state_dict(), str(workdir / "student.safetensors"))
    torch_counter = load_counter(workdir / "student.safetensors")
    exported = export_counter(torch_counter, workdir / "student.onnx", "onnx")
    ort_counter = Counter(**exported_counter_fields(workdir / "student.onnx", threads=threads))
    counters = {"torch": torch_counter, "onnxruntime": ort_counter}
    session = ort_counter.model.net.session
    options = session.get_session_options()

    image, _ = generate_crowd(np.random.default_rng(1), CrowdSpec(height=720, width=1280, supersample=1))
    x = torch_counter.to_tensor(np.asarray(image))[None]  # [1, 3, 720, 1280]
    times: dict[str, list[float]] = {name: [] for name in counters}
    counts: dict[str, float] = {}
    with torch.inference_mode():
        for name, counter in counters.items():  # warm-up: oneDNN primitive cache, ORT allocator
            counts[name] = float(counter.model(x).sum())
        for _ in range(repeats):
            for name, counter in counters.items():
                t0 = time.perf_counter()
                counter.model(x)
                times[name].append(time.perf_counter() - t0)
    forward = {name: {"median_s": statistics.median(v), "fps": 1.0 / statistics.median(v), "all_s": v}
               for name, v in times.items()}
    forward["speedup_median"] = forward["torch"]["median_s"] / forward["onnxruntime"]["median_s"]
    forward["speedup_per_pair"] = [t / o for t, o in zip(times["torch"], times["onnxruntime"], strict=True)]
    forward["count"] = counts
    forward["count_abs_diff"] = abs(counts["torch"] - counts["onnxruntime"])

    clip = workdir / "clip720.mp4"
    _crowd_clip(clip, video_frames)
    video: dict = {name: {"wall_s": []} for name in counters}
    frame_counts: dict[str, list[float]] = {}
    for rep in range(video_repeats):
        for name, counter in counters.items():
            out = workdir / f"count_{name}_{rep}"
            t0 = time.perf_counter()
            result = count_inputs(counter, [str(clip)], out, echo=False)
            video[name]["wall_s"].append(time.perf_counter() - t0)
            with open(out / "counts.csv", newline="") as handle:
                frame_counts[name] = [float(row["count"]) for row in csv.DictReader(handle)]
            video[name]["frames"] = result["frames"]
    for name in counters:
        video[name]["fps"] = video_frames / statistics.median(video[name]["wall_s"])
    video["speedup"] = video["onnxruntime"]["fps"] / video["torch"]["fps"]
    video["frame_count_max_abs_diff"] = max(abs(a - b) for a, b in zip(frame_counts["torch"],
                                                                      frame_counts["onnxruntime"], strict=True))
    video["clip"] = {"frames": video_frames, "size": "1280x720", "tiles_per_frame": 6, "overlays": True}
    return {"threads": threads, "export": exported, "forward_1280x720": forward, "video": video,
            "ort_session": {"graph_optimization_level": str(options.graph_optimization_level),
                            "execution_mode": str(options.execution_mode),
                            "intra_op_num_threads": options.intra_op_num_threads},
            "targets": {"ort_ge_1.3x_torch": forward["speedup_median"] >= 1.3,
                        "counts_equal_1e-3": forward["count_abs_diff"] <= 1e-3
                        and video["frame_count_max_abs_diff"] <= 1e-3}}


def run_export_bench(result: dict, out: Path, workdir: Path, args: argparse.Namespace) -> None:
    """``--export``: :func:`bench_export`, written to ``out`` and printed."""
    bench = result["export"] = bench_export(workdir, args.threads or 2, args.export_repeats, args.video_frames,
                                            args.video_repeats)
    result["machine"]["torch_threads"] = torch.get_num_threads()
    result["machine"]["load_avg_end"] = list(os.getloadavg())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    fwd, video = bench["forward_1280x720"], bench["video"]
    print(f"\nSKT 1/4-CSRNet student, torch vs ONNX Runtime, {bench['threads']} threads "
          f"(load average {result['machine']['load_avg_start'][0]:.2f} -> {result['machine']['load_avg_end'][0]:.2f})")
    print(f"{'runtime':<14}{'1280x720 s':>12}{'forward/s':>11}{'count':>12}{'video FPS':>11}")
    for name in ("torch", "onnxruntime"):
        print(f"{name:<14}{fwd[name]['median_s']:>12.3f}{fwd[name]['fps']:>11.2f}{fwd['count'][name]:>12.4f}"
              f"{video[name]['fps']:>11.2f}")
    print(f"ORT / torch: forward {fwd['speedup_median']:.2f}x (median of {len(fwd['torch']['all_s'])}), video "
          f"{video['speedup']:.2f}x ({video['clip']['frames']} frames, 6 tiles each); count difference "
          f"{fwd['count_abs_diff']:.2e} (frames: max {video['frame_count_max_abs_diff']:.2e}); targets: "
          + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in bench["targets"].items()))
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_skt.json", help="JSON result file")
    parser.add_argument("--workdir", default="runs/bench_skt", help="run.output_dir of the three trainings")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="override for all three configs, e.g. train.steps=100 (repeatable)")
    parser.add_argument("--teacher-set", action="append", default=[], help="override for the teacher only")
    parser.add_argument("--student-set", action="append", default=[], help="override for both students only")
    parser.add_argument("--latency-repeats", type=int, default=3)
    parser.add_argument("--latency-shape", default="576x864", help="HxW of the latency input")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--skip-train", action="store_true", help="only parameters, MACs and latency")
    parser.add_argument("--seeds", default="0,1,2", help="run.seed of the two students, comma-separated")
    parser.add_argument("--cache", action="store_true", help="only the density-cache benchmark (see above)")
    parser.add_argument("--export", action="store_true",
                        help="only torch vs ONNX Runtime for the 1/4 student at 1280x720 (see above)")
    parser.add_argument("--export-repeats", type=int, default=10, help="--export: timed forwards per runtime")
    parser.add_argument("--video-frames", type=int, default=20, help="--export: frames of the 1280x720 clip")
    parser.add_argument("--video-repeats", type=int, default=1, help="--export: counts of the clip per runtime")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.latency_shape.lower().split("x"))
    shape = (1, 3, h, w)
    result: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                    "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                                "native_bf16": native_bf16("cpu"),
                                "load_avg_start": list(os.getloadavg())}}
    if args.cache:
        return run_cache_bench(result, Path(args.out), Path(args.workdir) / "density_cache")
    if args.export:
        return run_export_bench(result, Path(args.out), Path(args.workdir) / "export", args)

    # ---- size ------------------------------------------------------------------------------------
    teacher_net, student_net = CSRNet(1), CSRNet(4)
    size = {}
    for name, net in (("teacher", teacher_net), ("student", student_net)):
        size[name] = {"parameters": count_parameters(net), "macs_g": count_macs(net, shape) / 1e9,
                      "macs_g_flop_counter": flop_counter_macs(net, shape) / 1e9}
    result["size"] = size

    # ---- training --------------------------------------------------------------------------------
    runs: dict = {}
    if not args.skip_train:
        work = Path(args.workdir)
        common = [f"run.output_dir={work}", "run.name=bench", *args.overrides]
        for task in ("skt-teacher", "skt"):
            shutil.rmtree(work / task / "bench", ignore_errors=True)
        shutil.rmtree(work / "skt" / "bench-scratch", ignore_errors=True)

        t_cfg = load_config(SKTTeacherConfig, None, common + args.teacher_set, task="skt-teacher")
        t0 = time.perf_counter()
        resolve_root(t_cfg.data)  # generate the synthetic crowds once (cached on disk)
        result["data_generation_s"] = time.perf_counter() - t0

        def train(label: str, fn, cfg) -> dict:
            t0 = time.perf_counter()
            summary = fn(cfg, None)
            wall = time.perf_counter() - t0
            ev = summary["eval"]
            runs[label] = {"mae": ev["mae"], "rmse": ev["rmse"], "train_wall_s": wall,
                           "loop_wall_s": summary["wall_time_s"], "steps": summary["steps"],
                           "run_dir": str(cfg.run_dir())}
            print(f"[bench] {label}: MAE {ev['mae']:.2f} RMSE {ev['rmse']:.2f} in {wall:.0f} s", flush=True)
            return summary

        train("teacher", run_teacher, t_cfg)
        seeds = [int(v) for v in args.seeds.split(",")]
        s_cfg = train_students(train, common + args.student_set + [f"teacher.run={t_cfg.run_dir()}"], seeds, work)
        for label in ("student_skt", "student_scratch"):
            runs[label] = over_seeds({seed: runs.pop(f"{label}_s{seed}") for seed in seeds})
        result["config"] = {"teacher": t_cfg.run_dir().joinpath("config.yaml").read_text(),
                            "student": s_cfg.run_dir().joinpath("config.yaml").read_text()}
        result["data"] = {"test_images": t_cfg.data.synthetic.num_test, "train_images": t_cfg.data.synthetic.num_train,
                          "image_size": [t_cfg.data.synthetic.height, t_cfg.data.synthetic.width]}
    result["runs"] = runs

    # ---- latency ---------------------------------------------------------------------------------
    times = measure_latency({"teacher": teacher_net, "student": student_net}, shape, args.latency_repeats)
    lat = {k: {"median_s": statistics.median(v), "all_s": v} for k, v in times.items()}
    lat["speedup_median"] = lat["teacher"]["median_s"] / lat["student"]["median_s"]
    lat["speedup_per_pair"] = [t / s for t, s in zip(times["teacher"], times["student"], strict=True)]
    result["latency"] = lat
    result["machine"]["load_avg_end"] = list(os.getloadavg())

    # ---- targets ---------------------------------------------------------------------------------
    targets = {"student_faster_9x": lat["speedup_median"] >= 9.0}
    if runs:
        t_mae, s_mae, b_mae = runs["teacher"]["mae"], runs["student_skt"]["mae"], runs["student_scratch"]["mae"]
        targets["skt_mae_le_1.1x_teacher"] = s_mae <= 1.1 * t_mae
        targets["skt_better_than_scratch"] = s_mae < b_mae  # mean MAE over the seeds
        targets["skt_better_than_scratch_rmse"] = runs["student_skt"]["rmse"] < runs["student_scratch"]["rmse"]
        result["skt_wins_per_seed"] = {
            metric: sum(runs["student_skt"]["per_seed"][k][metric] < runs["student_scratch"]["per_seed"][k][metric]
                        for k in runs["student_skt"]["per_seed"]) for metric in ("mae", "rmse")}
        total = runs["teacher"]["train_wall_s"] + runs["student_skt"]["train_wall_s"]
        result["teacher_plus_skt_train_s"] = total
        targets["teacher_plus_skt_le_600s"] = total <= 600.0
        result["skt_mae_ratio_to_teacher"] = s_mae / t_mae
    result["targets"] = targets

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    # ---- table -----------------------------------------------------------------------------------
    print(f"\nSKT benchmark ({result['machine']['cores']} cores, {torch.get_num_threads()} torch threads, "
          f"latency at {h}x{w})")
    if "student_skt" in runs:
        print(f"students: mean ± std over seeds {args.seeds}; SKT wins per seed: {result['skt_wins_per_seed']}")
    print(f"{'model':<22}{'MAE':>13}{'RMSE':>13}{'params':>12}{'GMACs':>9}{'CPU s':>9}{'train s':>9}")
    rows = [("CSRNet teacher", "teacher", "teacher"), ("1/4 student + SKT", "student_skt", "student"),
            ("1/4 student scratch", "student_scratch", "student")]
    for label, run_key, net in rows:
        r = runs.get(run_key, {})
        mae = f"{r['mae']:.2f}" + (f"±{r['mae_std']:.2f}" if "mae_std" in r else "") if r else "-"
        rmse = f"{r['rmse']:.2f}" + (f"±{r['rmse_std']:.2f}" if "rmse_std" in r else "") if r else "-"
        tr = f"{r['train_wall_s']:.0f}" if r else "-"
        print(f"{label:<22}{mae:>13}{rmse:>13}{size[net]['parameters']:>12,}{size[net]['macs_g']:>9.2f}"
              f"{lat[net]['median_s']:>9.3f}{tr:>9}")
    print(f"speed-up (median latency): {lat['speedup_median']:.1f}x;  targets: "
          + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in targets.items()))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
