"""The HeLlO stage of ``vkd demo``: teacher → tiny CLIP → projector → distilled set → students, on digits."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import save_image

from vkd.config import find_preset, load_config
from vkd.hello.commands import run_hello, run_teacher
from vkd.hello.config import HelloConfig, HelloTeacherConfig
from vkd.hello.data import read_distilled_set
from vkd.hello.evaluate import evaluate_run
from vkd.report import Section, bar_chart

__all__ = ["demo_stage"]


def demo_stage(out: Path, quick: bool = False) -> Section:
    """Run the embedded HeLlO pipeline in ``out`` and describe it as a report section.

    ``quick`` (a smoke test): one student seed and 120-step fits; full: two student seeds (the benchmark runs
    three).
    """

    out = Path(out)
    runs = out / "runs"
    extra_t = ["train.steps=120"] if quick else []
    tcfg = load_config(HelloTeacherConfig, find_preset("hello", "digits-teacher"),
                       [f"run.output_dir={runs}"] + extra_t, task="hello-teacher")
    if not (tcfg.run_dir() / "teacher.json").is_file():
        run_teacher(tcfg, "latest")
    extra = ["train.steps=120", "student.steps=120", "eval.seeds=[0]"] if quick else ["eval.seeds=[0,1]"]
    cfg = load_config(HelloConfig, find_preset("hello", "digits"),
                      [f"run.output_dir={runs}", f"clip.cache_dir={out / 'cache'}"] + extra, task="hello")
    if not (cfg.run_dir() / "projector_adapters.safetensors").is_file():
        run_hello(cfg, "latest")
    result = evaluate_run(cfg, cfg.run_dir(), progress=False)
    s, per = result["summary"], result["per_seed"]

    images, labels, manifest = read_distilled_set(cfg.run_dir() / "distilled")
    order = torch.argsort(labels, stable=True)
    grid = out / "distilled_grid.png"
    save_image(F.interpolate(images[order], scale_factor=4, mode="nearest"), grid, nrow=int(manifest["ipc"]),
               padding=2, pad_value=1.0)

    def acc(name: str) -> str:
        if len(result["seeds"]) < 2:  # one seed has no spread to show
            return f"{s[f'acc_{name}_mean']:.3f} (1 seed)"
        return f"{s[f'acc_{name}_mean']:.3f} ± {s[f'acc_{name}_std']:.3f} ({len(result['seeds'])} seeds)"

    sec = Section(title="HeLlO")
    sec.headline = [
        ("student accuracy, projector labels online (IPC 10)", acc("projector"),
         "ImageNet-1K IPC10 ResNet-18: 43.7 % (HeLlO), 42.0 % (RDED)", "digits, small CNN student"),
        ("student accuracy, teacher labels online (IPC 10)", acc("teacher"), "", "the soft-label generator replaced"),
        ("student accuracy, hard labels (IPC 10)", acc("hard"), "", ""),
        ("student accuracy, zero-shot CLIP labels online (IPC 10)", acc("zero_shot"), "",
         "the projector before its LoRA fit"),
        ("random-images control, projector labels", acc("random"), "", "DD-Ranking: same labels, random real images"),
        ("projector / teacher-online accuracy", f"{s.get('projector_over_teacher', float('nan')):.3f}", "", "target ≥ 0.95"),
        ("label storage: adapters / stored soft labels", f"{100 * s['storage_ratio']:.2f} %",
         "0.003 % (ImageNet-1K IPC50, paper)", f"{int(s['adapter_bytes'])} B vs {int(s['soft_label_bytes'])} B"),
    ]
    sec.tables["Student test accuracy per label source"] = [
        {"source": k, **{f"seed {seed}": f"{v:.3f}" for seed, v in zip(result["seeds"], vals, strict=True)},
         "mean ± std": acc(k)} for k, vals in per.items()]
    names = {"hard": "hard labels", "teacher": "teacher online", "projector": "projector online",
             "zero_shot": "zero-shot CLIP\nonline", "random": "random images\n+ projector"}
    keys = [k for k in ("hard", "teacher", "projector", "zero_shot", "random") if f"acc_{k}_mean" in s]
    chart = bar_chart(out / "accuracy_chart.png", [names[k] for k in keys], [s[f"acc_{k}_mean"] for k in keys],
                      "Student test accuracy by label source (IPC 10)", "accuracy",
                      errors=[s[f"acc_{k}_std"] for k in keys] if len(result["seeds"]) > 1 else None)
    chosen = {"cluster": "real digits nearest the centres of k-means clusters of the teacher's features",
              "lowest_ce": "the real digits the teacher is most confident on (RDED)"}[cfg.selection.strategy]
    sec.images = [(f"The distilled set: {chosen}, one row per class (IPC {manifest['ipc']})", grid),
                  ("Student accuracy per label source (mean ± std over seeds)", chart)]
    sec.text = [
        f"Teacher test accuracy {s['teacher_test_acc']:.3f}; projector (tiny CLIP + LoRA) test accuracy "
        f"{s['projector_test_acc']:.3f}. The projector ships as {int(s['adapter_params'])} LoRA parameters "
        f"({int(s['adapter_bytes'])} bytes, fp16) on top of the CLIP, instead of 300 epochs × {s['num_images']} "
        f"images × 10 classes of fp16 soft labels.",
        "The tiny CLIP stands in for a public CLIP (none can be downloaded offline): vkd pretrains it on printed "
        "digits rendered from matplotlib's fonts with the class prompts as captions, never on the handwritten target "
        "digits, so its zero-shot labels are weak and the LoRA fit to the teacher closes the gap. It is public (vkd "
        "rebuilds it) and its size is not counted in the storage ratio; only the LoRA factors are stored.",
    ]
    return sec
