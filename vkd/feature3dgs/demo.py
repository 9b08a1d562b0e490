"""The Feature 3DGS stage of ``vkd demo``: synthetic scene → tiny-CLIP teacher → feature field → renders + query."""

from __future__ import annotations

import json
from pathlib import Path

from vkd.config import find_preset, load_config
from vkd.engine import latest_checkpoint
from vkd.feature3dgs.commands import render, run
from vkd.feature3dgs.config import Feature3DGSConfig
from vkd.feature3dgs.evaluate import evaluate_run
from vkd.report import Section

__all__ = ["demo_stage"]


def demo_stage(out: Path, quick: bool = False) -> Section:
    """Run the embedded default in ``out`` and describe it as a report section.

    ``quick`` trains 400 steps instead of the preset's 1000 and renders a shorter orbit.
    """
    out = Path(out)
    extra = ["train.steps=400", "densify.refine_stop=320", "model.sh_degree_interval=200"] if quick else []
    cfg = load_config(Feature3DGSConfig, find_preset("feature3dgs", "synthetic"),
                      [f"run.output_dir={out / 'runs'}"] + extra, task="feature3dgs")
    run_dir = cfg.run_dir()
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None or not (run_dir / "summary.json").is_file() or \
            json.loads((run_dir / "summary.json").read_text()).get("steps") != cfg.train.steps:
        summary = run(cfg, "latest")
    else:
        summary = json.loads((run_dir / "summary.json").read_text())
    m = evaluate_run(run_dir, [], None)
    frames = 12 if quick else 36
    orbit = render(run_dir, "orbit", frames, "red sphere", None, None, out / "orbit", "mp4")
    extract = render(run_dir, "orbit", frames, "red sphere", "extract", None, out / "orbit_extract", "mp4")
    test = render(run_dir, "test", 3, None, None, None, out / "test_views", "png")

    def f(key: str, digits: int = 3) -> str:
        v = m.get(key)
        return "n/a" if v is None else f"{v:.{digits}f}"

    sec = Section(title="Feature 3DGS")
    sec.headline = [
        ("held-out RGB PSNR (dB)", f("psnr", 2), "Replica: 36.9 (Feature 3DGS, Table 1, secondary)",
         "target ≥ 28"),
        ("held-out feature cosine to the teacher", f("feature_cosine"), "", "target ≥ 0.9"),
        ("teacher-label pixel accuracy (F3DGS protocol)", f("teacher_label_acc"), "Replica: 0.943 (LSeg teacher)",
         "target ≥ 0.9"),
        ("teacher-label mIoU (7 most frequent labels)", f("teacher_label_miou"), "Replica: 0.787", ""),
        ("student accuracy vs true labels", f("true_label_acc"), "", f"teacher: {f('teacher_true_label_acc')}"),
        ("student mIoU vs true labels", f("true_label_miou"), "", f"teacher: {f('teacher_true_label_miou')}"),
        ("render FPS at the scene resolution (this device)", f("fps", 1), "Replica: 14.6 (speed-up, GPU)", ""),
    ]
    t = summary.get("timings_s", {})
    sec.tables["Run"] = [{"steps": summary.get("steps"), "Gaussians": summary.get("num_gaussians"),
                          "teacher": (summary.get("teacher") or {}).get("kind"),
                          "scene + teacher (s)": round(t.get("scene_and_teacher", float("nan")), 1),
                          "training (s)": round(t.get("training", float("nan")), 1)}]
    names = {"rgb": "RGB", "depth": "depth", "features": "PCA of the decoded features"}
    sec.images = [(f"Held-out view: {names[s]}", Path(test["outputs"][s]) / "frame_00000.png")
                  for s in ("features", "rgb", "depth")]
    mid = f"frame_{frames // 3:05d}.png"  # one orbit frame per stream (the videos are linked below)
    orbit_dir = Path(orbit["out"])
    sec.images += [("Orbit frame: RGB", orbit_dir / "rgb" / mid),
                   ("Orbit frame: PCA features", orbit_dir / "features" / mid),
                   ("Orbit frame: relevancy heat map of 'red sphere'", orbit_dir / "relevancy" / mid),
                   ("Orbit frame: 'red sphere' extracted", Path(extract["out"]) / "rgb" / mid)]
    sec.links = [
        ("orbit: RGB", Path(orbit["outputs"]["rgb"])),
        ("orbit: PCA features", Path(orbit["outputs"]["features"])),
        ("orbit: relevancy of 'red sphere'", Path(orbit["outputs"]["relevancy"])),
        ("orbit: 'red sphere' extracted by its folded per-Gaussian features", Path(extract["outputs"]["rgb"])),
    ]
    sec.text = [
        "A synthetic scene (four coloured primitives on a floor, 48 posed 64x64 views) is ray-cast by vkd, written as "
        "a transforms.json scene, and distilled from an offline teacher: vkd's tiny open_clip CLIP pretrained on "
        "captioned crops of the training views, used densely. The student renders 16 feature channels with RGB in "
        "one rasterizer call and decodes them to the teacher's 64 with a 1x1 conv; queries use the decoder folded "
        "into per-Gaussian features.",
        f"Extraction kept {extract.get('kept_gaussians')} of {extract.get('num_gaussians')} Gaussians for "
        "'red sphere' (softmax over the scene's label set, argmax rule).",
    ]
    return sec
