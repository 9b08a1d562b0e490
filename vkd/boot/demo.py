"""The BOOT stage of ``vkd demo``: digits DDPM teacher → one-step BOOT student → FID and speed vs DDIM."""

from __future__ import annotations

import json
from pathlib import Path

from vkd.boot.commands import run_boot, run_teacher
from vkd.boot.config import BootConfig, BootTeacherConfig
from vkd.boot.evaluate import compare_generators
from vkd.boot.student import exported_student
from vkd.config import find_preset, load_config
from vkd.report import Section, bar_chart

__all__ = ["demo_stage"]


def demo_stage(out: Path, quick: bool = False) -> Section:
    """Run the embedded BOOT pipeline in ``out`` and describe it as a report section.

    Both modes are shorter than the presets (which ``scripts/bench_boot.py`` runs) so that the whole demo fits
    in about a quarter of an hour: full trains the teacher 1,000 steps and BOOT 500 steps and scores 1,000
    samples; ``quick`` (a smoke test) 200 / 60 steps and 200 samples.
    """

    out = Path(out)
    runs = out / "runs"
    tcfg = load_config(BootTeacherConfig, find_preset("boot", "digits-teacher"),
                       [f"run.output_dir={runs}"] + (["train.steps=200", "train.checkpoint_every=100",
                                                       "train.sample_every=100"] if quick else
                                                      ["train.steps=1000", "train.checkpoint_every=500",
                                                       "train.sample_every=500"]),
                       task="boot-teacher")
    teacher_dir = tcfg.run_dir() / "teacher"
    if not (teacher_dir / "model_index.json").is_file():
        run_teacher(tcfg, "latest")
    bcfg = load_config(BootConfig, find_preset("boot", "digits"),
                       [f"run.output_dir={runs}", f"teacher.path={teacher_dir}", "eval.num_samples=0"]
                       + (["train.steps=60", "train.checkpoint_every=30", "train.sample_every=30"] if quick
                          else ["train.steps=500", "train.checkpoint_every=250", "train.sample_every=250"]),
                       task="boot")
    if exported_student(bcfg.run_dir()) is None:
        run_boot(bcfg, "latest")

    num = 200 if quick else 1000
    steps = (1, 4, 10, 50)
    cmp = compare_generators(bcfg.run_dir(), num, steps, seed=2024, batch_size=250, grid_dir=out / "grids")
    (out / "compare.json").write_text(json.dumps(cmp, indent=2) + "\n")
    g = cmp["generators"]
    s, d50, d1 = g["boot_student_1step"], g["teacher_ddim50"], g["teacher_ddim1"]
    pretty = {name: name.replace("boot_student_1step", "BOOT 1 step").replace("teacher_ddim", "DDIM-")
              for name in g}
    chart = bar_chart(out / "fid_chart.png", [pretty[n] for n in g], [r["fid"] for r in g.values()],
                      "FID on digits (digits-CNN features; lower is better)", "FID")

    sec = Section(title="BOOT")
    sec.headline = [
        ("student FID, 1 step", f"{s['fid']:.2f}", "ImageNet-64: 16.3 (BOOT, 1 step)",
         f"digits 16×16, digits-CNN FID, {num} samples vs {cmp['num_reference']} held-out digits"),
        ("teacher FID, DDIM 50 steps", f"{d50['fid']:.2f}", "ImageNet-64: 13.7 (teacher)", ""),
        ("teacher FID, DDIM 1 step", f"{d1['fid']:.2f}", "", "what one teacher step gives without BOOT"),
        ("student FID / teacher DDIM-50 FID", f"{s['fid'] / d50['fid']:.2f}", "1.19 (16.3 / 13.7)",
         "target ≤ 1.25"),
        ("student sampling speed-up vs DDIM-50", f"{s['images_per_s'] / d50['images_per_s']:.1f}×", "",
         "target ≥ 30×"),
    ]
    sec.tables["FID and throughput per generator (same noise)"] = [
        {"generator": name, "NFE": r["nfe"], "FID": f"{r['fid']:.2f}", "images/s": f"{r['images_per_s']:.0f}"}
        for name, r in g.items()]
    sec.images = [("BOOT student, one step", Path(cmp["grids"]["boot_student_1step"])),
                  ("teacher, DDIM 50 steps, same noise and classes", Path(cmp["grids"]["teacher_ddim50"])),
                  ("teacher, DDIM 1 step, same noise and classes", Path(cmp["grids"]["teacher_ddim1"])),
                  ("FID per generator", chart)]
    sec.text = [
        f"Teacher: a class-conditional diffusers UNet2DModel DDPM trained for {tcfg.train.steps} steps on "
        f"scikit-learn digits (16×16). Student: BOOT, data-free (it only reads noise), {bcfg.train.steps} steps, "
        f"δ = {bcfg.loss.delta}. FID uses the {cmp['extractor']} extractor: numbers are not comparable with "
        "published FIDs, only with each other. The demo trains both stages shorter than the presets "
        "(2,000 / 1,500 steps) that scripts/bench_boot.py measures against the targets; see the README.",
    ]
    return sec
