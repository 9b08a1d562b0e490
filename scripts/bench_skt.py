#!/usr/bin/env python
"""SKT benchmark on the embedded default (synthetic crowds, CPU).

Trains, in one process and with the same data and budget, (1) the CSRNet teacher, (2) the 1/4 student with SKT
and (3) the same 1/4 student without transfer (ground-truth loss only), through the same functions as
``vkd distill skt-teacher`` / ``vkd distill skt``. Reports MAE and RMSE (RMSE is what the papers call "MSE") on
the synthetic test split, parameters, MACs at 576×864 (forward hooks on every conv, cross-checked with
``torch.utils.flop_counter.FlopCounterMode``) and CPU latency of teacher and student at 576×864, measured
interleaved in the same run. Writes a JSON file and prints a table.

    .venv/bin/python scripts/bench_skt.py [--out bench_skt.json] [--set train.steps=N] [--latency-repeats 3]
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

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vkd.config import load_config  # noqa: E402
from vkd.engine import native_bf16  # noqa: E402
from vkd.skt.commands import run_skt, run_teacher  # noqa: E402
from vkd.skt.config import SKTConfig, SKTTeacherConfig  # noqa: E402
from vkd.skt.datasets import resolve_root  # noqa: E402
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
        s_cfg = load_config(SKTConfig, None, common + args.student_set, task="skt")
        train("student_skt", run_skt, s_cfg)
        b_cfg = load_config(SKTConfig, None, common + args.student_set
                            + ["run.name=bench-scratch", "loss.teacher_weight=0", "loss.cos_weight=0",
                               "loss.fsp_weight=0"], task="skt")
        train("student_scratch", run_skt, b_cfg)
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
        targets["skt_better_than_scratch"] = s_mae < b_mae
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
    print(f"{'model':<22}{'MAE':>9}{'RMSE':>9}{'params':>12}{'GMACs':>9}{'CPU s':>9}{'train s':>9}")
    rows = [("CSRNet teacher", "teacher", "teacher"), ("1/4 student + SKT", "student_skt", "student"),
            ("1/4 student scratch", "student_scratch", "student")]
    for label, run_key, net in rows:
        r = runs.get(run_key, {})
        mae = f"{r['mae']:.2f}" if r else "-"
        rmse = f"{r['rmse']:.2f}" if r else "-"
        tr = f"{r['train_wall_s']:.0f}" if r else "-"
        print(f"{label:<22}{mae:>9}{rmse:>9}{size[net]['parameters']:>12,}{size[net]['macs_g']:>9.2f}"
              f"{lat[net]['median_s']:>9.3f}{tr:>9}")
    print(f"speed-up (median latency): {lat['speedup_median']:.1f}x;  targets: "
          + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in targets.items()))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
