"""The SKT stage of ``vkd demo``: synthetic crowds → CSRNet teacher → 1/4 student with SKT (and without)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from vkd.config import find_preset, load_config
from vkd.report import Section, bar_chart
from vkd.skt.commands import run_skt, run_teacher
from vkd.skt.config import SKTConfig, SKTTeacherConfig
from vkd.skt.count import count_images
from vkd.skt.datasets import resolve_root
from vkd.skt.evaluate import measure_latency
from vkd.skt.models import count_macs, count_parameters
from vkd.skt.runs import load_run

__all__ = ["demo_stage"]


def demo_stage(out: Path, quick: bool = False) -> Section:
    """Run the embedded SKT pipeline in ``out`` and describe it as a report section.

    Full mode trains the teacher 300 steps, the SKT student and the same student without transfer (the control)
    200 steps each (the presets train 600 / 800 steps; ``scripts/bench_skt.py`` runs those); ``quick`` (a smoke test)
    trains 30 steps each on fewer images and skips the control.
    """
    out = Path(out)
    common = [f"run.output_dir={out / 'runs'}", f"data.root={out / 'data'}"]
    # shorter than the presets (which scripts/bench_skt.py runs) so that the whole demo fits in ~15 minutes
    short = ["data.synthetic.num_train=100", "data.synthetic.num_test=20"] if quick else []
    teacher_steps = ["train.steps=30"] if quick else ["train.steps=300"]
    student_steps = ["train.steps=30"] if quick else ["train.steps=200"]
    tcfg = load_config(SKTTeacherConfig, find_preset("skt", "synthetic-teacher"), common + short + teacher_steps,
                       task="skt-teacher")
    scfg = load_config(SKTConfig, find_preset("skt", "synthetic"), common + short + student_steps, task="skt")

    def finished(cfg: SKTTeacherConfig | SKTConfig) -> dict:
        path = cfg.run_dir() / "summary.json"
        if path.is_file():
            summary = json.loads(path.read_text())
            if summary.get("steps") == cfg.train.steps and "eval" in summary:
                return summary
        return {}

    runs = {"teacher": (tcfg, run_teacher), "student_skt": (scfg, run_skt)}
    if not quick:
        control = load_config(SKTConfig, find_preset("skt", "synthetic"),
                              common + short + student_steps
                              + ["run.name=no-transfer", "loss.teacher_weight=0", "loss.cos_weight=0",
                                 "loss.fsp_weight=0"], task="skt")
        runs["student_no_transfer"] = (control, run_skt)
    results = {}
    for name, (cfg, fn) in runs.items():
        results[name] = finished(cfg) or fn(cfg, "latest")
    ev = {name: r["eval"] for name, r in results.items()}

    _, teacher = load_run(tcfg.run_dir())
    _, student = load_run(scfg.run_dir())
    shape = (1, 3, 576, 864)
    times = measure_latency({"teacher": teacher, "student": student}, shape, repeats=3 if quick else 5)
    lat = {k: statistics.median(v) for k, v in times.items()}
    speedup = lat["teacher"] / lat["student"]
    macs = {"teacher": count_macs(teacher, shape) / 1e9, "student": count_macs(student, shape) / 1e9}
    params = {"teacher": count_parameters(teacher), "student": count_parameters(student)}
    (out / "skt_summary.json").write_text(json.dumps({"eval": ev, "latency_s": times, "gmacs": macs,
                                                      "parameters": params}, indent=2) + "\n")
    chart = bar_chart(out / "latency_chart.png", ["CSRNet teacher", "1/4 student"],
                      [1000 * lat["teacher"], 1000 * lat["student"]], "CPU latency at 576×864 (median)", "ms")

    test_images = sorted((resolve_root(tcfg.data) / "test").glob("img_*.png"))[:3]
    overlays = []
    if test_images:
        counted = count_images(scfg.run_dir(), [str(p) for p in test_images], out / "overlays", echo=False)
        overlays = sorted(Path(counted["out"]).glob("*_density.png"))

    def mae(name: str) -> str:
        return f"{ev[name]['mae']:.2f} / {ev[name]['rmse']:.2f}"

    sec = Section(title="SKT")
    sec.headline = [
        ("teacher MAE / RMSE", mae("teacher"), "ShanghaiTech A: 68.43 / 105.99 (CSRNet, SKT paper)",
         f"synthetic crowds, {tcfg.data.synthetic.num_test} test images"),
        ("1/4 student + SKT MAE / RMSE", mae("student_skt"), "ShanghaiTech A: 71.55 / 114.40", ""),
        ("student MAE / teacher MAE", f"{ev['student_skt']['mae'] / ev['teacher']['mae']:.2f}", "1.05",
         "target ≤ 1.1"),
        ("CPU speed-up at 576×864", f"{speedup:.1f}×", "9–13× (paper, CPU)", "target ≥ 9×"),
        ("parameters teacher / student", f"{params['teacher']:,} / {params['student']:,}",
         "16.26 M / 1.02 M", ""),
    ]
    if "student_no_transfer" in ev:
        sec.headline.insert(2, ("1/4 student without transfer MAE / RMSE", mae("student_no_transfer"), "",
                                "the control: same student, ground-truth loss only"))
    sec.tables["Models"] = [
        {"model": label, "MAE": f"{ev[key]['mae']:.2f}", "RMSE": f"{ev[key]['rmse']:.2f}",
         "parameters": f"{params[net]:,}", "GMACs (576×864)": f"{macs[net]:.1f}",
         "CPU latency (ms)": f"{1000 * lat[net]:.0f}"}
        for label, key, net in (("CSRNet teacher", "teacher", "teacher"), ("1/4 student + SKT", "student_skt",
                                                                           "student"),
                                ("1/4 student, no transfer", "student_no_transfer", "student")) if key in ev]
    sec.images = [(f"SKT student density: {p.stem.replace('_density', '')}", p) for p in overlays]
    sec.images.append(("Teacher vs student CPU latency", chart))
    sec.text = [
        "RMSE is the metric crowd-counting papers call MSE. Synthetic crowds are generated by vkd (person-like "
        "figures with perspective and occlusion); the teacher is trained from random initialisation, so absolute "
        "errors are not comparable with ShanghaiTech numbers.",
    ]
    return sec
