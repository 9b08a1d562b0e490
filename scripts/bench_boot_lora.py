#!/usr/bin/env python
"""Benchmark LoRA BOOT students against the full student: training throughput, peak memory, trainable
parameters and checkpoint/export size, side by side in one run (rounds alternate the configurations).

    python scripts/bench_boot_lora.py                                   # the embedded teachers, ranks 4 and 16

Default teachers: the digits teacher and the text-to-image teacher trained by ``scripts/bench_boot.py`` (``--text``);
without a trained digits teacher, its architecture with untrained weights (speed and memory are the same).
    python scripts/bench_boot_lora.py --teacher runs/bench_boot/boot-teacher/digits/teacher --ranks 8
    python scripts/bench_boot_lora.py --teacher /models/sd15 --prompts prompts.txt --device cuda --batch-size 4
    python scripts/bench_boot_lora.py --sd-like 160 --batch-size 2 --steps 4 --ranks 16,64   # SD-1.5 layout, half width

Each measurement runs in its own process: BootTask (real teacher, real BOOT loss) + AdamW over the trainable
parameters, ``--warmup`` steps, then ``--steps`` timed steps. Memory: on CUDA ``torch.cuda.max_memory_allocated``
of the training steps; on CPU the process's peak RSS (``wait4``) and its growth over the RSS after the task was
built (what training itself adds: gradients, optimizer state, activations). Writes ``<out>/bench_boot_lora.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_TEACHERS = {  # written by scripts/bench_boot.py (and its --text run)
    "digits": (ROOT / "runs/bench_boot/boot-teacher/digits/teacher", None),
    "digits-text": (ROOT / "runs/bench_boot_text/boot-text-teacher/digits-text/teacher",
                    ROOT / "runs/bench_boot_text/boot-text-teacher/digits-text/prompts.txt"),
}


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(args: argparse.Namespace) -> dict:
    """One configuration, in this process (the child side)."""
    import torch

    from vkd.boot.config import BootConfig
    from vkd.boot.distiller import BootTask
    from vkd.config import load_config

    if args.threads:
        torch.set_num_threads(args.threads)
    sets = [f"teacher.path={args.teacher}", f"train.batch_size={args.batch_size}", f"train.device={args.device}",
            f"student.lora_rank={args.rank}", "eval.num_samples=0"]
    if args.prompts:
        sets.append(f"data.prompts={args.prompts}")
    cfg = load_config(BootConfig, None, sets, task="boot")
    dev = torch.device(args.device)
    task = BootTask(cfg).to(dev).train()
    params = task.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-5)
    built_rss = rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for step in range(args.warmup + args.steps):
        batch = torch.arange(step * args.batch_size, (step + 1) * args.batch_size)
        t0 = time.perf_counter()
        loss = task(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    state = task.checkpoint_state_dict()
    out = {"rank": args.rank, "trainable_params": sum(p.numel() for p in params),
           "student_params": sum(p.numel() for p in task.student.parameters()),
           "checkpoint_weights_mb": sum(v.numel() * v.element_size() for v in state.values()) / 2**20,
           "optimizer_state_mb": sum(v.numel() * v.element_size() for s in opt.state.values()
                                     for v in s.values() if torch.is_tensor(v)) / 2**20,
           "step_s_median": statistics.median(times), "steps_per_s": 1.0 / statistics.median(times),
           "images_per_s": args.batch_size / statistics.median(times),
           "built_rss_mb": built_rss, "final_rss_mb": rss_mb()}
    if dev.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return out


def untrained_digits_teacher(out: Path) -> Path:
    """The embedded digits teacher's architecture and scheduler with its initial (untrained) weights."""
    from vkd.boot.config import BootTeacherConfig
    from vkd.boot.distiller import TeacherTrainingTask
    from vkd.config import load_config

    cfg = load_config(BootTeacherConfig, ROOT / "configs/boot/digits-teacher.yaml", [], task="boot-teacher")
    run = out / "digits-random"
    if not (run / "teacher" / "model_index.json").is_file():
        TeacherTrainingTask(cfg).export(run)
    return run / "teacher"


def sd_like_teacher(out: Path, width: int) -> tuple[Path, Path]:
    """A random text-to-image teacher with Stable Diffusion 1.5's UNet layout at ``width`` channels in the first
    block (SD: 320; blocks width x (1, 2, 4, 4), cross-attention 768, 8 heads), 4 x 32 x 32 inputs, a 1-layer
    768-wide CLIP text encoder and SD's tokenizer, in the StableDiffusionPipeline layout (no VAE)."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from vkd.boot.teacher import save_text_teacher
    from vkd.models.clip_tokenizer import CLIP_BOS_ID, CLIP_EOS_ID, CLIP_VOCAB_SIZE, clip_tokenizer

    path, prompts = out / f"sd-like-{width}" / "teacher", out / f"sd-like-{width}" / "prompts.txt"
    if not (path / "model_index.json").is_file():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(sample_size=32, in_channels=4, out_channels=4,
                                    block_out_channels=(width, 2 * width, 4 * width, 4 * width),
                                    cross_attention_dim=768, attention_head_dim=8)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=1, num_attention_heads=12, max_position_embeddings=77,
                                            bos_token_id=CLIP_BOS_ID, eos_token_id=CLIP_EOS_ID))
        sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
        save_text_teacher(unet, text, clip_tokenizer(77), sched, path, {"dataset": "random (benchmark)"})
        prompts.write_text("a photograph of an astronaut riding a horse\na red bicycle\na bowl of fruit\n")
    return path, prompts


def run_child(argv: list[str]) -> dict:
    """Run one measurement in a fresh process; its peak RSS from ``wait4``."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", *argv], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"measurement failed ({proc.returncode}): {' '.join(argv)}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # KiB on Linux
    result["training_rss_growth_mb"] = result["peak_rss_mb"] - result["built_rss_mb"]
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", type=Path, action="append", default=None,
                   help="teacher pipeline directory (repeatable; default: the embedded digits and text teachers)")
    p.add_argument("--prompts", type=Path, default=None, help="prompt file for a text-to-image --teacher")
    p.add_argument("--ranks", default="4,16", help="LoRA ranks to compare with the full student (0)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds over the configurations")
    p.add_argument("--sd-like", type=int, default=0, metavar="WIDTH",
                   help="also a random teacher with SD-1.5's UNet layout at this first-block width (SD: 320)")
    p.add_argument("--no-embedded", action="store_true", help="skip the embedded teachers (with --sd-like)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_boot_lora")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.teacher = args.teacher[0]
        print(json.dumps(measure(args)))
        return 0

    if args.teacher:
        teachers = {t.name if t.name != "teacher" else t.parent.name: (t, args.prompts) for t in args.teacher}
    elif args.no_embedded:
        teachers = {}
    else:
        teachers = {k: v for k, v in DEFAULT_TEACHERS.items() if (v[0] / "model_index.json").is_file()}
        if "digits" not in teachers:  # speed and memory do not depend on the weights: the architecture suffices
            teachers = {"digits(random)": (untrained_digits_teacher(args.out), None), **teachers}
    if args.sd_like:
        teachers[f"sd-like-{args.sd_like}"] = sd_like_teacher(args.out, args.sd_like)
    ranks = [0] + [int(r) for r in args.ranks.split(",") if r]
    common = ["--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--device", args.device] + (["--threads", str(args.threads)] if args.threads else [])
    runs: dict[str, dict[int, list[dict]]] = {name: {r: [] for r in ranks} for name in teachers}
    for rnd in range(args.rounds):
        for name, (teacher, prompts) in teachers.items():
            for rank in ranks if rnd % 2 == 0 else ranks[::-1]:
                argv = ["--teacher", str(teacher), "--rank", str(rank), *common]
                if prompts:
                    argv += ["--prompts", str(prompts)]
                r = run_child(argv)
                runs[name][rank].append(r)
                print(f"  round {rnd} {name} rank {rank}: {r['steps_per_s']:.2f} steps/s, "
                      f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)

    def med(rows: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rows) if key in rows[0] else float("nan")

    summary: dict = {}
    keys = ("trainable_params", "student_params", "checkpoint_weights_mb", "optimizer_state_mb", "steps_per_s",
            "images_per_s", "peak_rss_mb", "training_rss_growth_mb", "cuda_peak_mb")
    for name in teachers:
        summary[name] = {}
        for rank in ranks:
            rows = runs[name][rank]
            summary[name][f"rank{rank}" if rank else "full"] = {
                **{k: med(rows, k) for k in keys},
                "steps_per_s_all": [r["steps_per_s"] for r in rows]}
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "device": args.device,
                          "loadavg_end": os.getloadavg()},
              "batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds, "teachers":
              {k: str(v[0]) for k, v in teachers.items()}, "results": summary,
              "process_cpu_s": resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_boot_lora.json").write_text(json.dumps(result, indent=2) + "\n")

    print(f"\nLoRA vs full BOOT student (batch {args.batch_size}, {args.device}, median of {args.rounds} rounds "
          f"x {args.steps} steps)")
    mem = "CUDA peak MB" if args.device.startswith("cuda") else "RSS growth MB"
    print(f"{'teacher':<14s}{'student':<9s}{'trainable':>12s}{'ckpt MB':>9s}{'optim MB':>10s}{'steps/s':>9s}"
          f"{'vs full':>9s}{mem:>15s}{'peak RSS MB':>13s}")
    for name, rows in summary.items():
        full = rows["full"]
        for label, r in rows.items():
            m = r["cuda_peak_mb"] if args.device.startswith("cuda") else r["training_rss_growth_mb"]
            print(f"{name:<14s}{label:<9s}{r['trainable_params']:>12,.0f}{r['checkpoint_weights_mb']:>9.2f}"
                  f"{r['optimizer_state_mb']:>10.2f}{r['steps_per_s']:>9.2f}{r['steps_per_s'] / full['steps_per_s']:>8.2f}x"
                  f"{m:>15.0f}{r['peak_rss_mb']:>13.0f}")
    print(f"JSON: {args.out / 'bench_boot_lora.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
