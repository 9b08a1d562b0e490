#!/usr/bin/env python
"""Throughput of ``vkd fid`` with every metric: N random 32×32 PNGs per set, one extractor pass over each.

Writes N "real" and N "fake" random PNG files (the fake ones darker, with prompts) into a temporary folder, then
times one in-process ``vkd fid`` (:func:`vkd.metrics.fid_command.fid_command`): scanning and decoding the files,
the extractor pass over each set (features, and the logits of IS in the same pass), KID, precision/recall, IS, and
the CLIP score (open_clip, in the fake pass). Writing the PNGs is not timed. The numbers are throughput only:
random images and, unless real weights are given, random networks.

- ``--extractor digits``: the embedded digits CNN (not Inception).
- ``--extractor inception``: ``--weights PATH`` (the real file), or ``--random-inception`` for random weights
  (batch-norm statistics set from one random batch so activations stay finite; the cost is the same).
- CLIP score: ``--clip-model NAME --clip-weights PATH`` (e.g. ViT-L-14), or by default a tiny random open_clip
  (32 px, 1 layer) whose cost is small next to a real CLIP's; ``--metrics`` without ``clip`` leaves it out.

    .venv/bin/python scripts/bench_fid.py --num 2000 --extractor digits [--json bench_fid.json]
    .venv/bin/python scripts/bench_fid.py --num 200 --extractor inception --random-inception
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vkd.metrics.fid_command import fid_command  # noqa: E402

PROMPTS = ["a red square", "two cats on a sofa", "a blue circle on grass", "the sea at night", "an orange",
           "a dark room", "a city street", "a bowl of fruit"]


def write_pngs(folder: Path, n: int, seed: int, scale: float, size: int) -> None:
    """``n`` random RGB PNGs ``size × size`` (smooth blobs plus noise, scaled by ``scale``)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        low = rng.uniform(0, 255, (4, 4, 3))
        img = np.kron(low, np.ones((size // 4, size // 4, 1))) + rng.normal(0, 20, (size, size, 3))
        Image.fromarray(np.clip(img * scale, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.png")


def random_inception(path: Path) -> Path:
    """Random Inception weights in torch-fidelity's layout, batch-norm statistics of one random batch."""
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    model = inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=True)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model.train()(torch.randn(3, 3, 299, 299))
        model.fc.weight *= 0.01
    torch.save(model.state_dict(), path)
    return path


def tiny_clip(folder: Path) -> str:
    """A random tiny open_clip in the ``local-dir:`` layout."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32,
                                           "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    folder.mkdir(parents=True, exist_ok=True)
    model = open_clip.CLIP(**cfg).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {"size": 32}}))
    return f"local-dir:{folder}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=2000, help="images per set (50,000 for the full-size run)")
    parser.add_argument("--size", type=int, default=32, help="image side (default 32)")
    parser.add_argument("--extractor", default="digits", help="digits | inception | dinov2 | clip | a path")
    parser.add_argument("--weights", default=None, help="the extractor's weights")
    parser.add_argument("--random-inception", action="store_true", help="random Inception weights (throughput)")
    parser.add_argument("--metrics", default="fid,kid,pr,is,clip")
    parser.add_argument("--clip-model", default=None, help="open_clip model of the CLIP score (default: tiny random)")
    parser.add_argument("--clip-weights", default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", default=None, help="where the PNGs go (default: a temporary folder)")
    parser.add_argument("--json", default="bench_fid.json", help="JSON result file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        write_pngs(root / "real", args.num, 0, 1.0, args.size)
        write_pngs(root / "fake", args.num, 1, 0.8, args.size)
        (root / "prompts.txt").write_text("\n".join(PROMPTS[i % len(PROMPTS)] for i in range(args.num)) + "\n")
        t_write = time.perf_counter() - t0
        weights = args.weights
        if args.random_inception:
            weights = str(random_inception(root / "random-inception.pth"))
        clip_model = args.clip_model or (tiny_clip(root / "tiny_clip") if "clip" in args.metrics else None)
        kw = {"metrics": args.metrics, "kid_subset_size": min(1000, args.num), "num_workers": args.workers}
        if "clip" in args.metrics:
            kw.update(prompts=str(root / "prompts.txt"), clip_model=clip_model, clip_weights=args.clip_weights)
        t0 = time.perf_counter()
        res = fid_command(str(root / "real"), str(root / "fake"), args.extractor, weights, args.batch_size, None,
                          None, args.device, **kw)
        wall = time.perf_counter() - t0

    t = res["timing_s"]
    n_img = res["num_reference"] + res["num_samples"]
    passes = t.get("real_pass", 0.0) + t.get("fake_pass", 0.0)
    out = {
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "torch": torch.__version__, "device": args.device,
                    "load_average_1m": os.getloadavg()[0]},
        "num_real": res["num_reference"], "num_fake": res["num_samples"], "image_size": args.size,
        "extractor": res["extractor"], "weights": "random" if args.random_inception else (weights or "default"),
        "clip_model": "tiny random open_clip" if args.clip_model is None and "clip" in args.metrics else args.clip_model,
        "metrics": res["metrics"], "scores": {k: res[k] for k in ("fid", "kid", "kid_std", "precision", "recall", "is",
                                                                  "is_std", "clip_score", "sfid") if k in res},
        "png_write_s": t_write, "wall_s": wall, "timing_s": t,
        "images_per_s_total": n_img / wall, "images_per_s_passes": n_img / passes if passes else None,
        "line": res["line"],
    }
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"vkd fid throughput: {out['num_real']} real + {out['num_fake']} fake {args.size}x{args.size} PNGs, "
          f"extractor {out['extractor']}, {args.device}, {out['machine']['cpu_count']} CPUs "
          f"(load {out['machine']['load_average_1m']:.2f})")
    rows = [("setup (networks)", t.get("setup")), ("scan + decode check + hash", t.get("scan")),
            ("fake pass (extractor + CLIP)", t.get("fake_pass")), ("real pass (extractor)", t.get("real_pass")),
            ("KID", t.get("kid")), ("precision/recall", t.get("pr")), ("all metrics", t.get("metrics")),
            ("total (fid_command)", wall)]
    print(f"{'phase':<30s}{'seconds':>10s}")
    for name, sec in rows:
        if sec is not None:
            print(f"{name:<30s}{sec:>10.2f}")
    print(f"{'images/s (passes)':<30s}{out['images_per_s_passes'] or float('nan'):>10.1f}")
    print(f"{'images/s (total)':<30s}{out['images_per_s_total']:>10.1f}")
    print(res["line"])
    print(f"written: {args.json}")


if __name__ == "__main__":
    main()
