#!/usr/bin/env python
"""Benchmark of vkd.render: Gaussian rasterization (torch backend vs naive baselines, gsplat on CUDA) and 2D density
maps (splat_points_2d vs per-head scipy.ndimage.gaussian_filter).

Usage:
    .venv/bin/python scripts/bench_render.py [--quick] [--out bench_render.json] [--repeats 3] [--threads N]

Timings are the best of ``--repeats`` runs after one warm-up: wall time, and process CPU time (all threads; on a
shared machine the single-thread CPU time is the contention-independent figure). ``fwd`` is an inference render (``torch.no_grad``);
``fwd+bwd`` is a training step: render with parameters requiring grad, then backward of a weighted sum of image and
alpha. CPU peak memory is the peak RSS increase of one call, measured in a fresh subprocess with glibc's mmap
threshold lowered so that freed blocks leave RSS (Linux: ``/proc/self/clear_refs`` resets the high-water mark
``VmHWM``); CUDA peak memory is ``torch.cuda.max_memory_allocated``. ``OMP_WAIT_POLICY`` defaults to ``PASSIVE``
because the benchmark machine is shared (spinning OpenMP workers collapse under oversubscription).

Baselines:
* ``dense``: no tiling, every Gaussian against every pixel with plain autograd (the textbook formula, in pixel
  chunks). Only run where its saved tensors fit in ``--dense-budget-gb``.
* ``blockloop``: the spec's prototype (render.md §7): a Python loop over 16×16 blocks, box culling per block and
  plain autograd on ``[P, G]`` tensors. Run for N ≤ 20k.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

# The machine is shared: spinning OpenMP workers collapse under oversubscription, so wait passively unless the
# caller chose otherwise (recorded in the result file).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vkd.render import rasterization  # noqa: E402
from vkd.render.splat2d import geometry_adaptive_sigmas, splat_points_2d  # noqa: E402
from vkd.render.torch_backend import project_gaussians  # noqa: E402


# ---------------------------------------------------------------------------------------------------------- memory
def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(fn, repeats: int, device: str) -> tuple[float, float, float | None]:
    """Best wall time and best process CPU time (all threads) over ``repeats`` after one warm-up, and the CUDA peak
    memory in MiB (CPU: None, see :func:`cpu_peak_mib`)."""
    fn()
    _sync(device)
    best, best_cpu = math.inf, math.inf
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    peak = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        _sync(device)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return best, best_cpu, peak


def cpu_peak_mib(method: str, N: int, D: int, W: int, H: int, train: bool) -> float | None:
    """Peak RSS increase of one call, measured in a fresh process where large blocks are mmap-ed (so freed memory
    leaves RSS and the high-water mark resets cleanly)."""
    import subprocess

    env = dict(
        os.environ,
        MALLOC_MMAP_THRESHOLD_="65536",
        MALLOC_TRIM_THRESHOLD_="0",
        OMP_NUM_THREADS=str(torch.get_num_threads()),
    )
    cmd = [
        sys.executable,
        __file__,
        "--_probe",
        method,
        str(N),
        str(D),
        str(W),
        str(H),
        "1" if train else "0",
    ]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        return float(out.stdout.strip().splitlines()[-1])
    except Exception:  # noqa: BLE001 - memory is optional information
        return None


def _probe(method: str, N: int, D: int, W: int, H: int, train: bool) -> None:
    params, vm, K = make_scene(N, D, W, H)
    wimg = torch.rand(1, H, W, D)

    def run():
        if method in ("torch",):
            if train:
                ps = [t.detach().requires_grad_() for t in params]
                img, alpha, _ = rasterization(*ps, vm, K, W, H, backend="torch")
                ((img * wimg).sum() + alpha.sum()).backward()
            else:
                with torch.no_grad():
                    rasterization(*params, vm, K, W, H, backend="torch")
        else:
            fn = dense_render if method == "dense" else blockloop_render
            if train:
                ps = [t.detach().requires_grad_() for t in params]
                img, alpha = fn(*ps, vm, K, W, H)
                ((img * wimg[0]).sum() + alpha.sum()).backward()
            else:
                with torch.no_grad():
                    fn(*params, vm, K, W, H)

    run()  # lazy initialisation
    import gc

    gc.collect()
    if not _reset_peak():
        print("nan")
        return
    base = _status_kb("VmRSS")
    run()
    hwm = _status_kb("VmHWM")
    print(max(0, hwm - base) / 1024)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------- scene
def make_scene(N: int, D: int, W: int, H: int, device: str = "cpu", seed: int = 0):
    """Random Gaussians in the view frustum at depth 2.5-3.5, scales 1-6 cm (log-uniform), 60° horizontal FOV."""
    g = torch.Generator().manual_seed(seed)
    fx = 0.5 * W / math.tan(math.radians(30))
    z = torch.rand(N, generator=g) + 2.5
    x = (torch.rand(N, generator=g) * 2 - 1) * z * 0.5 * W / fx * 1.05
    y = (torch.rand(N, generator=g) * 2 - 1) * z * 0.5 * H / fx * 1.05
    means = torch.stack([x, y, z], -1)
    quats = torch.randn(N, 4, generator=g)
    scales = torch.exp(torch.empty(N, 3).uniform_(math.log(0.01), math.log(0.06), generator=g))
    opac = torch.rand(N, generator=g) * 0.8 + 0.1
    feats = torch.rand(N, D, generator=g)
    K = torch.tensor([[fx, 0, W / 2], [0, fx, H / 2], [0, 0, 1.0]])[None]
    vm = torch.eye(4)[None]
    return [t.to(device) for t in (means, quats, scales, opac, feats)], vm.to(device), K.to(device)


# ---------------------------------------------------------------------------------------------------------- baselines
def _common(means, quats, scales, opac, vm, K, W, H):
    p = project_gaussians(means, quats, scales, opac, vm, K, W, H)
    vis = p["valid"][0]
    order = torch.argsort(p["depths"][0][vis], stable=True)
    ids = vis.nonzero().squeeze(1)[order]
    return p, ids


def _composite_pg(px, py, m2, cn, op, feats):
    """Plain-autograd compositing of pixels ``[P]`` against depth-sorted Gaussians ``[G]`` → ``[P, D]``, ``[P]``."""
    dx = m2[None, :, 0] - px[:, None]
    dy = m2[None, :, 1] - py[:, None]
    sig = 0.5 * (cn[None, :, 0] * dx * dx + cn[None, :, 2] * dy * dy) + cn[None, :, 1] * dx * dy
    a = torch.clamp(op[None, :] * torch.exp(-sig), max=0.999)
    a = torch.where((sig >= 0) & (a >= 1 / 255), a, torch.zeros_like(a))
    t = torch.cumprod(torch.cat([torch.ones_like(a[:, :1]), 1 - a[:, :-1]], 1), 1)
    a = torch.where(t * (1 - a) > 1e-4, a, torch.zeros_like(a))
    t = torch.cumprod(torch.cat([torch.ones_like(a[:, :1]), 1 - a[:, :-1]], 1), 1)
    w = a * t
    return w @ feats, w.sum(1)


def dense_render(means, quats, scales, opac, feats, vm, K, W, H, chunk=4096):
    """No tiling: all visible Gaussians against all pixels, in pixel chunks."""
    p, ids = _common(means, quats, scales, opac, vm, K, W, H)
    m2, cn, op, f = p["means2d"][0][ids], p["conics"][0][ids], p["opacities"][0][ids], feats[ids]
    jj, ii = torch.meshgrid(torch.arange(W), torch.arange(H), indexing="xy")
    px, py = jj.reshape(-1).float() + 0.5, ii.reshape(-1).float() + 0.5
    outs, alphas = [], []
    for s in range(0, px.numel(), chunk):
        o, a = _composite_pg(px[s : s + chunk], py[s : s + chunk], m2, cn, op, f)
        outs.append(o)
        alphas.append(a)
    return torch.cat(outs).reshape(H, W, -1), torch.cat(alphas).reshape(H, W, 1)


def blockloop_render(means, quats, scales, opac, feats, vm, K, W, H, block=16):
    """The spec's prototype: Python loop over 16×16 blocks with box culling, plain autograd."""
    p, ids = _common(means, quats, scales, opac, vm, K, W, H)
    m2, cn, op, f = p["means2d"][0][ids], p["conics"][0][ids], p["opacities"][0][ids], feats[ids]
    r = p["radii"][0][ids].float()
    img = torch.zeros(H, W, f.shape[1])
    alpha = torch.zeros(H, W, 1)
    rows = []
    for by in range(0, H, block):
        cols = []
        for bx in range(0, W, block):
            h, w = min(block, H - by), min(block, W - bx)
            md = m2.detach()
            hit = (
                (md[:, 0] + r[:, 0] > bx)
                & (md[:, 0] - r[:, 0] < bx + w)
                & (md[:, 1] + r[:, 1] > by)
                & (md[:, 1] - r[:, 1] < by + h)
            )
            sel = hit.nonzero().squeeze(1)
            jj, ii = torch.meshgrid(torch.arange(bx, bx + w), torch.arange(by, by + h), indexing="xy")
            px, py = jj.reshape(-1).float() + 0.5, ii.reshape(-1).float() + 0.5
            o, a = _composite_pg(px, py, m2[sel], cn[sel], op[sel], f[sel])
            cols.append(torch.cat([o, a[:, None]], 1).reshape(h, w, -1))
        rows.append(torch.cat(cols, 1))
    out = torch.cat(rows, 0)
    img, alpha = out[..., :-1], out[..., -1:]
    return img, alpha


# ---------------------------------------------------------------------------------------------------------- runs
def bench_raster(configs, repeats, dense_budget_gb, devices, memory=True, baselines=True):
    rows = []
    for N, D, W, H in configs:
        for device in devices:
            rows += _bench_config(N, D, W, H, device, repeats, dense_budget_gb, memory, baselines)
    return rows


def _bench_config(N, D, W, H, device, repeats, dense_budget_gb, memory, baselines):
    rows = []
    params, vm, K = make_scene(N, D, W, H, device)
    wimg = torch.rand(1, H, W, D, device=device)

    def fwd(backend):
        with torch.no_grad():
            rasterization(*params, vm, K, W, H, backend=backend)

    def train(backend):
        ps = [t.detach().requires_grad_() for t in params]
        img, alpha, _ = rasterization(*ps, vm, K, W, H, backend=backend)
        ((img * wimg).sum() + alpha.sum()).backward()

    for backend in ["torch"] + (["gsplat"] if device == "cuda" else []):
        try:
            tf, cf, mf = measure(lambda b=backend: fwd(b), repeats, device)
            tt, ct, mt = measure(lambda b=backend: train(b), repeats, device)
            if device == "cpu" and memory:
                mf, mt = cpu_peak_mib(backend, N, D, W, H, False), cpu_peak_mib(backend, N, D, W, H, True)
            row = dict(
                method=backend,
                device=device,
                N=N,
                D=D,
                W=W,
                H=H,
                fwd_s=tf,
                fwd_cpu_s=cf,
                fwd_peak_mib=mf,
                fwdbwd_s=tt,
                fwdbwd_cpu_s=ct,
                fwdbwd_peak_mib=mt,
                status="ok",
            )
        except Exception as e:  # noqa: BLE001 - recorded in the result file
            row = dict(method=backend, device=device, N=N, D=D, W=W, H=H, status=f"error: {e}"[:300])
        rows.append(row)
        _print_row(row)
    if device != "cpu" or not baselines:
        return rows
    # Naive baselines on CPU.
    for name, fn, fits in [
        ("dense", dense_render, N * W * H * 48 <= dense_budget_gb * 2**30),
        ("blockloop", blockloop_render, N <= 20000),
    ]:
        if not fits:
            row = dict(method=name, device=device, N=N, D=D, W=W, H=H, status="skipped (too large)")
            rows.append(row)
            _print_row(row)
            continue

        def fwd_b(fn=fn):
            with torch.no_grad():
                fn(*params, vm, K, W, H)

        def train_b(fn=fn):
            ps = [t.detach().requires_grad_() for t in params]
            img, alpha = fn(*ps, vm, K, W, H)
            ((img * wimg[0]).sum() + alpha.sum()).backward()

        tf, cf, mf = measure(fwd_b, max(1, repeats - 1), device)
        tt, ct, mt = measure(train_b, max(1, repeats - 1), device)
        if memory:
            mf, mt = cpu_peak_mib(name, N, D, W, H, False), cpu_peak_mib(name, N, D, W, H, True)
        row = dict(
            method=name,
            device=device,
            N=N,
            D=D,
            W=W,
            H=H,
            fwd_s=tf,
            fwd_cpu_s=cf,
            fwd_peak_mib=mf,
            fwdbwd_s=tt,
            fwdbwd_cpu_s=ct,
            fwdbwd_peak_mib=mt,
            status="ok",
        )
        rows.append(row)
        _print_row(row)
    return rows


def check_agreement(N, D, W, H):
    """Max abs difference between the torch backend and the dense baseline (float32, same scene)."""
    params, vm, K = make_scene(N, D, W, H)
    with torch.no_grad():
        img, alpha, _ = rasterization(*params, vm, K, W, H, backend="torch")
        ri, ra = dense_render(*params, vm, K, W, H)
    return float(max((img[0] - ri).abs().max(), (alpha[0] - ra).abs().max()))


def gpu_agreement(N, D, W, H):
    params, vm, K = make_scene(N, D, W, H, "cuda")
    with torch.no_grad():
        a = rasterization(*params, vm, K, W, H, backend="torch")
        b = rasterization(*params, vm, K, W, H, backend="gsplat")
    return float(max((a[0] - b[0]).abs().max(), (a[1] - b[1]).abs().max()))


def bench_density(n_heads: int, H: int, W: int, modes, seed: int = 0):
    import numpy as np
    from scipy.ndimage import gaussian_filter

    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(n_heads, 2, generator=g, dtype=torch.float64) * torch.tensor([W, H], dtype=torch.float64)
    sig = geometry_adaptive_sigmas(pts, k=3, beta=0.3)
    rows = []
    for mode in modes:
        # Reference: the usual per-head pipeline (float32 delta image, gaussian_filter, sum).
        t0 = time.perf_counter()
        ref = np.zeros((H, W), np.float32)
        for (x, y), s in zip(pts.tolist(), sig.tolist(), strict=True):
            d = np.zeros((H, W), np.float32)
            d[min(max(int(math.floor(y)), 0), H - 1), min(max(int(math.floor(x)), 0), W - 1)] = 1.0
            ref += gaussian_filter(d, s, mode=mode)
        t_ref = time.perf_counter() - t0
        splat_points_2d(pts, sig, H, W, border=mode)  # warm-up
        best = math.inf
        for _ in range(5):
            t0 = time.perf_counter()
            out = splat_points_2d(pts, sig, H, W, border=mode)
            best = min(best, time.perf_counter() - t0)
        diff = float(np.abs(out.numpy() - ref).max())
        row = dict(
            mode=mode,
            heads=n_heads,
            H=H,
            W=W,
            sigma_min=float(sig.min()),
            sigma_max=float(sig.max()),
            reference_s=t_ref,
            splat_s=best,
            speedup=t_ref / best,
            max_abs_diff=diff,
            count_ref=float(ref.sum(dtype=np.float64)),
            count_splat=float(out.double().sum()),
        )
        rows.append(row)
        print(
            f"density {mode:9s} {n_heads} heads {W}x{H}: reference {t_ref:8.3f} s  splat_points_2d {best * 1e3:7.2f} ms"
            f"  speed-up {t_ref / best:8.0f}x  max|diff| {diff:.2e}"
        )
    return rows


def _fmt(v, unit=""):
    return "-" if v is None else (f"{v:.3f}{unit}" if isinstance(v, float) else str(v))


def _print_row(r):
    if r["status"] != "ok":
        print(
            f"{r['method']:9s} {r['device']:4s} N={r['N']:>6} D={r['D']:>2} {r['W']}x{r['H']}: {r['status']}"
        )
        return
    mf = "-" if r["fwd_peak_mib"] is None else f"{r['fwd_peak_mib']:.0f}"
    mt = "-" if r["fwdbwd_peak_mib"] is None else f"{r['fwdbwd_peak_mib']:.0f}"
    print(
        f"{r['method']:9s} {r['device']:4s} N={r['N']:>6} D={r['D']:>2} {r['W']}x{r['H']}: fwd {r['fwd_s']:.3f} s "
        f"(cpu {r['fwd_cpu_s']:.3f} s, {mf} MiB)  fwd+bwd {r['fwdbwd_s']:.3f} s (cpu {r['fwdbwd_cpu_s']:.3f} s, "
        f"{mt} MiB)",
        flush=True,
    )


def print_table(rows):
    print(
        "\n| method | device | N | D | size | fwd s | fwd+bwd s | fwd CPU s | fwd+bwd CPU s | fwd peak MiB "
        "| fwd+bwd peak MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        size = f"{r['W']}x{r['H']}"
        if r["status"] != "ok":
            print(
                f"| {r['method']} | {r['device']} | {r['N']} | {r['D']} | {size} | {r['status']} | | | | | |"
            )
            continue
        mf = "-" if r["fwd_peak_mib"] is None else f"{r['fwd_peak_mib']:.0f}"
        mt = "-" if r["fwdbwd_peak_mib"] is None else f"{r['fwdbwd_peak_mib']:.0f}"
        print(
            f"| {r['method']} | {r['device']} | {r['N']} | {r['D']} | {size} | {r['fwd_s']:.3f} | "
            f"{r['fwdbwd_s']:.3f} | {r['fwd_cpu_s']:.3f} | {r['fwdbwd_cpu_s']:.3f} | {mf} | {mt} |"
        )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small subset (N=5k/20k, D=16, 320x240; 100 heads)")
    ap.add_argument("--out", default="bench_render.json")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)"
    )
    ap.add_argument("--dense-budget-gb", type=float, default=5.0)
    ap.add_argument("--skip-density", action="store_true")
    ap.add_argument("--skip-raster", action="store_true")
    ap.add_argument("--no-memory", action="store_true", help="skip the CPU peak-memory probes (subprocesses)")
    ap.add_argument("--no-baselines", action="store_true", help="skip the dense and blockloop baselines")
    ap.add_argument("--_probe", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._probe:
        m, n, d, w, h, tr = args._probe
        _probe(m, int(n), int(d), int(w), int(h), tr == "1")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.quick:
        configs = [(5000, 16, 320, 240), (20000, 16, 320, 240)]
        heads, density_modes = 100, ["constant"]
    else:
        configs = [
            (N, D, W, H)
            for (W, H) in [(160, 120), (320, 240)]
            for N in (5000, 20000, 100000)
            for D in (3, 16, 64)
        ]
        heads, density_modes = 500, ["constant", "reflect"]
    info = dict(
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        cpu=platform.processor() or platform.machine(),
        cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        loadavg_start=os.getloadavg(),
        argv=sys.argv[1:],
        scene="random Gaussians in the frustum, depth 2.5-3.5, scales 1-6 cm log-uniform, opacity U(0.1,0.9), 60 deg FOV",
        memory="CPU: peak RSS increase of one call in a fresh process (MALLOC_MMAP_THRESHOLD_=65536, VmHWM after "
        "/proc/self/clear_refs); CUDA: torch.cuda.max_memory_allocated increase",
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
    )
    print(f"torch {info['torch']}, {info['threads']} threads, load average {info['loadavg_start']}")
    result = dict(info=info)
    if not args.skip_raster:
        rows = bench_raster(
            configs,
            args.repeats,
            args.dense_budget_gb,
            devices,
            memory=not args.no_memory,
            baselines=not args.no_baselines,
        )
        result["raster"] = rows
        result["agreement_torch_vs_dense_max_abs"] = check_agreement(5000, 16, 160, 120)
        print(
            f"torch backend vs dense baseline (N=5000, D=16, 160x120, float32): max |diff| "
            f"{result['agreement_torch_vs_dense_max_abs']:.2e}"
        )
        if "cuda" in devices:
            result["agreement_torch_vs_gsplat_max_abs"] = gpu_agreement(20000, 16, 320, 240)
        print_table(rows)
        target = [
            r
            for r in rows
            if r["method"] == "torch"
            and r["device"] == "cpu"
            and r["status"] == "ok"
            and (r["N"], r["D"], r["W"], r["H"]) == (20000, 16, 320, 240)
        ]
        if target:
            t, c = target[0]["fwdbwd_s"], target[0]["fwdbwd_cpu_s"]
            result["target_20k_D16_320x240_fwdbwd_s"] = t
            result["target_20k_D16_320x240_fwdbwd_cpu_s"] = c
            print(
                f"\ntarget: 20k Gaussians, D=16, 320x240 forward+backward = {t:.3f} s wall, {c:.3f} s CPU "
                f"({torch.get_num_threads()} threads; goal <= 0.6 s)"
            )
    if not args.skip_density:
        result["density"] = bench_density(heads, 768, 1024, density_modes)
    info["loadavg_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
