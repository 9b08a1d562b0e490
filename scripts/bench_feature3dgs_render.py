#!/usr/bin/env python
"""Peak memory (RSS) and wall time of ``vkd render`` (:func:`vkd.feature3dgs.render.render_run`) on a large field.

The benchmark writes a complete run directory with a random field (``--gaussians`` Gaussians in a cube in front of
the cameras, SH degree 3, ``--render-dim`` rendered channels and a 1x1 decoder to ``--teacher-dim``), a
nerfstudio ``transforms.json`` scene of ``--views`` random images at ``--width`` x ``--height`` (every 4th held
out, so 4 training views feed the PCA fit), and a callable stand-in teacher whose text embeddings are seeded
random vectors (so ``--query`` gives relevancy maps). It then runs ``render_run`` on the test views in a fresh
subprocess and reads its peak RSS from ``os.wait4``'s ``ru_maxrss`` (the whole process: Python, torch, the
field, the rasterizer's buffers and the colouring). Nothing is downloaded.

Usage::

    .venv/bin/python scripts/bench_feature3dgs_render.py [--gaussians 300000] [--width 1280 --height 720]
        [--render-dim 13] [--teacher-dim 512] [--query "chair, table, floor"] [--format mp4] [--threads 1]
        [--max-pairs N] [--out-dir runs/bench_feature3dgs_render] [--json bench_feature3dgs_render.json]

``--max-pairs`` is ``render_run``'s rasterizer pair budget per call (default: its ``RENDER_MAX_PAIRS``; 0 renders
each frame in one rasterizer call, to see what the row bands save).

Writes a JSON file and prints a table. Target (issue 18): peak RSS <= 2 GB at 1280x720 with a 512-d decoder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the machine is shared (see scripts/bench_render.py)

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TARGET_PEAK_MIB = 2048.0

# Text embeddings of the stand-in teacher: a unit vector seeded by the prompt, so a label set gives distinct maps.
STUB = textwrap.dedent('''
    import zlib

    import torch

    class Teacher:
        dim = {dim}

        def __call__(self, images):
            raise RuntimeError("the render benchmark never runs the teacher on images")

        def encode_text(self, prompts):
            rows = []
            for p in prompts:
                g = torch.Generator().manual_seed(zlib.crc32(p.encode()))
                rows.append(torch.nn.functional.normalize(torch.randn(self.dim, generator=g), dim=0))
            return torch.stack(rows)

    teacher = Teacher()
''')


def _look_at_c2w_opengl(eye: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Camera-to-world in OpenGL axes (x right, y up, camera looks along -z) for a camera at ``eye``."""
    forward = target - eye
    forward = forward / forward.norm()
    right = torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0]))
    right = right / right.norm()
    up = torch.linalg.cross(right, forward)
    c2w = torch.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, -forward, eye
    return c2w  # [4, 4]


def make_run(out_dir: Path, gaussians: int, width: int, height: int, render_dim: int, teacher_dim: int,
             num_views: int, seed: int = 0) -> Path:
    """Write scene, stand-in teacher, config and a checkpoint of a random field; returns the run directory."""
    from PIL import Image

    from vkd.engine import save_checkpoint
    from vkd.feature3dgs.model import GaussianField

    g = torch.Generator().manual_seed(seed)
    scene_dir, run_dir = out_dir / "scene", out_dir / "run"
    (scene_dir / "images").mkdir(parents=True, exist_ok=True)
    fx = 0.5 * width / math.tan(math.radians(30))  # 60° horizontal field of view
    frames = []
    for k in range(num_views):
        angle = 2 * math.pi * k / num_views
        eye = torch.tensor([3.0 * math.cos(angle), 3.0 * math.sin(angle), 1.0])
        img = (torch.rand(height // 8, width // 8, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(img).resize((width, height), Image.NEAREST).save(scene_dir / "images" / f"{k:03d}.png")
        frames.append({"file_path": f"images/{k:03d}.png",
                       "transform_matrix": _look_at_c2w_opengl(eye, torch.zeros(3)).tolist()})
    meta = {"camera_model": "PINHOLE", "fl_x": fx, "fl_y": fx, "cx": width / 2, "cy": height / 2, "w": width,
            "h": height, "frames": frames}
    (scene_dir / "transforms.json").write_text(json.dumps(meta))

    field = GaussianField(gaussians, render_dim, teacher_dim, sh_degree=3, decoder=True)
    with torch.no_grad():
        p = field.params
        p["means"].copy_((torch.rand(gaussians, 3, generator=g) * 2 - 1) * 1.0)
        p["scales"].copy_(torch.empty(gaussians, 3).uniform_(math.log(0.004), math.log(0.03), generator=g))
        p["quats"].copy_(torch.randn(gaussians, 4, generator=g))
        p["opacities"].copy_(torch.randn(gaussians, generator=g))
        p["sh0"].copy_(torch.randn(gaussians, 1, 3, generator=g) * 0.5)
        p["shN"].copy_(torch.randn(gaussians, 15, 3, generator=g) * 0.05)
        p["features"].copy_(torch.randn(gaussians, render_dim, generator=g))
    state = {f"student.{k}": v.detach().clone() for k, v in field.state_dict().items()}
    save_checkpoint(run_dir / "checkpoints", 1, state, {"extra": {"active_sh_degree": 3}})

    (run_dir / "teacher").mkdir(parents=True, exist_ok=True)
    (run_dir / "bench_render_stub.py").write_text(STUB.replace("{dim}", str(teacher_dim)))
    (run_dir / "teacher" / "teacher.json").write_text(json.dumps(
        {"kind": "callable", "target": "bench_render_stub:teacher", "text_aligned": True}))
    (run_dir / "config.yaml").write_text(textwrap.dedent(f"""\
        task: feature3dgs
        run:
          name: bench_render
          output_dir: {out_dir / 'outputs'}
        data:
          path: {scene_dir}
          test_every: 4
        teacher:
          kind: callable
          target: bench_render_stub:teacher
        model:
          render_dim: {render_dim}
          sh_degree: 3
          init: random
        compute:
          cpu_threads: {torch.get_num_threads()}
        """))
    return run_dir


def _probe(run_dir: str, query: str, fmt: str, max_pairs: str) -> None:
    """Child process: one ``render_run`` of the test views; prints a JSON line with its own timings."""
    from vkd.feature3dgs.render import render_run

    t0 = time.perf_counter()
    summary = render_run(Path(run_dir), views="test", query=query or None, out=Path(run_dir) / "renders",
                         fmt=fmt, progress=False, max_pairs=int(max_pairs) or None)
    print(json.dumps({"wall_s": time.perf_counter() - t0, "frames": summary["frames"],
                      "width": summary["width"], "height": summary["height"],
                      "num_gaussians": summary["num_gaussians"]}))


def measure(run_dir: Path, query: str, fmt: str, threads: int, max_pairs: int) -> dict:
    """Run :func:`_probe` in a fresh process; its peak RSS comes from ``wait4``'s ``ru_maxrss`` (KiB on Linux)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(run_dir), str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, "--_probe", str(run_dir), query, fmt, str(max_pairs)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"render subprocess failed ({proc.returncode}):\n{err[-3000:]}")
    child = json.loads(out.strip().splitlines()[-1])
    return {**child, "process_wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024,
            "cpu_s": usage.ru_utime + usage.ru_stime}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gaussians", type=int, default=300_000)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--render-dim", type=int, default=13)
    ap.add_argument("--teacher-dim", type=int, default=512)
    ap.add_argument("--views", type=int, default=6, help="scene images (every 4th is a test view)")
    ap.add_argument("--query", default="chair, table, floor", help="text query ('' for none)")
    ap.add_argument("--format", default="mp4", choices=("mp4", "gif", "png"))
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads of the render (compute.cpu_threads)")
    ap.add_argument("--max-pairs", type=int, default=None, help="rasterizer pairs per call (0: one call per frame)")
    ap.add_argument("--out-dir", default="runs/bench_feature3dgs_render")
    ap.add_argument("--json", default="bench_feature3dgs_render.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.max_pairs is None:
        from vkd.feature3dgs.render import RENDER_MAX_PAIRS

        args.max_pairs = RENDER_MAX_PAIRS

    load_start = os.getloadavg()
    t0 = time.perf_counter()
    run_dir = make_run(Path(args.out_dir).resolve(), args.gaussians, args.width, args.height, args.render_dim,
                       args.teacher_dim, args.views)
    setup_s = time.perf_counter() - t0
    m = measure(run_dir, args.query, args.format, args.threads, args.max_pairs)
    result = {
        "command": "python scripts/bench_feature3dgs_render.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": args.threads, "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "field": {"gaussians": args.gaussians, "render_dim": args.render_dim, "teacher_dim": args.teacher_dim,
                  "sh_degree": 3},
        "query": args.query, "format": args.format, "max_pairs": args.max_pairs, "setup_s": setup_s, **m,
        "target_peak_rss_mib": TARGET_PEAK_MIB, "target_met": m["peak_rss_mib"] <= TARGET_PEAK_MIB,
    }
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"\nvkd render: {m['frames']} test frames at {m['width']}x{m['height']} + PCA fit, "
          f"{args.gaussians} Gaussians, render_dim {args.render_dim} -> decoder {args.teacher_dim}, "
          f"query {args.query!r}, {args.format}, max_pairs {args.max_pairs or 'one call'}, {args.threads} thread(s), "
          f"load avg {load_start[0]:.1f} -> {result['machine']['loadavg_end'][0]:.1f}")
    print(f"{'peak RSS (MiB)':<24}{m['peak_rss_mib']:>10.0f}   target <= {TARGET_PEAK_MIB:.0f}: "
          f"{'yes' if result['target_met'] else 'NO'}")
    print(f"{'render_run wall (s)':<24}{m['wall_s']:>10.1f}")
    print(f"{'process CPU (s)':<24}{m['cpu_s']:>10.1f}")
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_probe":
        _probe(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5])
    else:
        main()
