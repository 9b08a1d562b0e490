"""Training-free feature lifting (``vkd lift``): each Gaussian's feature is the blending-weighted average of the
teacher's maps over the training views (LUDVIG: Marrie et al., "Learning-free Uplifting of 2D Visual Features to
Gaussian Splatting Scenes", 2024), on frozen geometry.

The rendered feature at pixel p is ``R(p) = Σᵢ wᵢ(p)·fᵢ`` with ``wᵢ(p) = αᵢ(p)·Tᵢ(p)``, so ``∂R(p)/∂fᵢ = wᵢ(p)``.
Training compares ``resize(R)`` (bilinear, ``align_corners=True``, to the teacher's grid; :func:`resize_features`)
with the teacher map ``F``; lifting uses the same map. For each view (views of one size go through together,
:func:`view_groups`):

1. Render ``[G, D+1]`` zero colours (geometry detached) and resize the ``[D+1, H, W]`` map to the teacher grid.
2. Backpropagate ``L = Σ_q ⟨resize(R)(q), [F(q); 1]⟩``: the colour gradient is
   ``Σ_p wᵢ(p)·[F̃(p); r(p)]`` with ``F̃ = resizeᵀ F`` and ``r = resizeᵀ 1``, i.e. the numerator and the
   denominator of the average in one feature-only forward + backward (any rasterizer backend).
3. Sum both over the views; ``gᵢ = Σ_v num / Σ_v den`` (Gaussians no view sees get the weighted mean).
4. Fit the field: without a decoder, or when ``model.render_dim`` equals the teacher width D, ``fᵢ = gᵢ`` (the
   decoder, if any, is the identity). With a narrower ``render_dim`` N the decoder is the weighted PCA of the
   ``gᵢ``: ``fᵢ = Uᵀ(gᵢ - μ)``, ``W = U`` (the top-N principal directions), ``b = μ``.

Memory is ``O(G·D)`` (the two accumulators) plus one view's render; views stream. Progress is saved every
``lift.save_every`` views (``<run>/lift/state.safetensors``, atomic), so a rerun of the same command resumes. Under
``torchrun`` / ``accelerate launch`` the views of each batch are shared over the processes and their sums
all-reduced. The result is an ordinary run directory: ``checkpoints/checkpoint-<views>``, ``config.yaml``,
``teacher/``, ``export/`` (``vkd eval``, ``vkd render``, queries, extraction and deletion read it).

Examples:
    >>> from vkd.config import load_config
    >>> cfg = load_config(Feature3DGSConfig, "configs/feature3dgs/synthetic.yaml",
    ...                   ["model.init_ply=runs/feature3dgs/synthetic/export/point_cloud.ply"])
    >>> summary = lift(cfg, "runs/lift/synthetic")  # doctest: +SKIP
    >>> summary["views"], summary["seen_fraction"]  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from vkd.cache import atomic_write_text, tmp_path
from vkd.config import save_config
from vkd.engine import latest_checkpoint, save_checkpoint, torch_threads
from vkd.engine.runs import resolve_device
from vkd.errors import ConfigError, DataError, TrainingInterrupted, UserError
from vkd.feature3dgs.config import Feature3DGSConfig
from vkd.feature3dgs.data import Scene
from vkd.feature3dgs.data.prepare import prepare_scene
from vkd.feature3dgs.distiller import Feature3DGSTask, build_field, centres_in_view, load_init_ply
from vkd.feature3dgs.export import export_field
from vkd.feature3dgs.feature_cache import FeatureCache, scene_fingerprint
from vkd.feature3dgs.losses import resize_features
from vkd.feature3dgs.model import GaussianField
from vkd.feature3dgs.teacher import RANDOM_INIT_WARNING, prepare_teacher, save_teacher_for_queries
from vkd.render import rasterization, rasterization_adjoint

__all__ = ["lift", "lift_views", "view_groups", "resize_transpose", "fit_lifted_field", "check_ply_matches_scene", "views_without_gaussians",
           "LIFT_DIR"]

log = logging.getLogger(__name__)

LIFT_DIR = "lift"  # <run>/lift: resume state and progress
_STATE = "state.safetensors"
_PROGRESS = "progress.json"
# A Gaussian whose summed weight is at most this never contributed to any pixel of any view.
_UNSEEN_WEIGHT = 1e-12


# ----------------------------------------------------------------------------------------------------------------
# One view
# ----------------------------------------------------------------------------------------------------------------


def lift_views(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, viewmats: Tensor, Ks: Tensor,
               width: int, height: int, targets: Tensor, backend: str = "auto",
               rasterize_mode: str = "classic", method: str = "auto") -> Tensor:
    """Numerator and denominator of the weighted average over C views of one size, by one feature-only forward +
    backward (or one adjoint pass).

    Args:
        means: ``[G, 3]``; quats: ``[G, 4]`` (wxyz); scales: ``[G, 3]`` (activated); opacities: ``[G]``
            (activated). No gradient flows into them.
        viewmats: ``[C, 4, 4]`` world-to-camera; Ks: ``[C, 3, 3]``.
        width, height: render size (the images').
        targets: ``[C, D, h, w]`` teacher features of the views.
        backend, rasterize_mode: as :func:`vkd.render.rasterization`. The torch backend (``auto`` off CUDA) takes
            its exact transpose, :func:`vkd.render.rasterization_adjoint`, instead of autograd (same result).
        method: ``auto`` (as just said) | ``adjoint`` | ``autograd`` (any backend; the oracle of the tests).

    Returns:
        ``[G, D+1]``: ``Σ_c Σ_p wᵢ(p)·F̃(p)`` in the first D columns, ``Σ_c Σ_p wᵢ(p)·r(p)`` in the last (see the
        module docstring), in the dtype of ``means``.
    """
    if method not in ("auto", "adjoint", "autograd"):
        raise ValueError(f"method must be auto, adjoint or autograd, got {method!r}")
    G, (C, D) = means.shape[0], targets.shape[:2]
    grid = targets.shape[-2:]
    weights = torch.cat([targets.to(means.dtype), targets.new_ones(C, 1, *grid).to(means.dtype)], 1)  # [C, D+1, h, w]
    torch_backend = backend == "torch" or (backend == "auto" and means.device.type != "cuda")
    if method == "adjoint" or (method == "auto" and torch_backend):
        # The torch backend's exact transpose (rasterization_adjoint): the gradient of step 2 without compositing
        # D+1 zero channels first, i.e. one pass over the tiles instead of a forward and a backward.
        splat = resize_transpose(weights, height, width).permute(0, 2, 3, 1)  # [C, H, W, D+1]
        return rasterization_adjoint(means.detach(), quats.detach(), scales.detach(), opacities.detach(),
                                     viewmats, Ks, splat, rasterize_mode=rasterize_mode)  # [G, D+1]
    colors = torch.zeros(G, D + 1, dtype=means.dtype, device=means.device, requires_grad=True)  # [G, D+1]
    with torch.enable_grad():
        img, _, _ = rasterization(means.detach(), quats.detach(), scales.detach(), opacities.detach(), colors,
                                  viewmats, Ks, width, height, sh_degree=None, packed=False,
                                  rasterize_mode=rasterize_mode, backend=backend)  # [C, H, W, D+1]
        rendered = resize_features(img.permute(0, 3, 1, 2), grid)  # [C, D+1, h, w]
        (grad,) = torch.autograd.grad((rendered * weights).sum(), colors)
    return grad  # [G, D+1]


def _axis_matrix(src: int, dst: int, like: Tensor) -> Tensor:
    """``[src, dst]``: :func:`resize_features` along one axis (bilinear is separable), read off the unit vectors."""
    eye = torch.eye(src, dtype=like.dtype, device=like.device).reshape(src, 1, 1, src)
    return resize_features(eye, (1, dst)).reshape(src, dst)


def resize_transpose(maps: Tensor, height: int, width: int) -> Tensor:
    """``resizeᵀ`` of :func:`resize_features` ``[H, W] -> [h, w]``: ``[C, K, h, w]`` maps to ``[C, K, H, W]``.

    The resize is ``Mₕᵀ·X·M_w`` with the separable per-axis matrices, so its transpose is ``Mₕ·F·M_wᵀ``: two small
    matrix products instead of autograd through an ``[C, K, H, W]`` probe.
    """
    h, w = maps.shape[-2:]
    out = maps
    if w != width:
        out = out @ _axis_matrix(width, w, maps).T  # [C, K, h, W]
    if h != height:
        out = _axis_matrix(height, h, maps) @ out  # [C, K, H, W]
    return out


def view_groups(scene: Scene, views: Sequence[int], grid_of: Any, dim: int,
                max_elements: int = 1 << 25) -> list[list[int]]:
    """Split ``views`` (in order) into runs of one image size and teacher grid whose re-tiled maps
    (``C·H·W·(dim+1)`` floats) stay within ``max_elements``: one :func:`lift_views` call each (at least one view)."""
    groups: list[list[int]] = []
    key = None
    for v in views:
        cam = scene.cameras[v]
        k = (cam.width, cam.height, tuple(grid_of(v)))
        per_view = cam.width * cam.height * (dim + 1)
        if groups and k == key and (len(groups[-1]) + 1) * per_view <= max_elements:
            groups[-1].append(v)
        else:
            groups.append([v])
            key = k
    return groups


# ----------------------------------------------------------------------------------------------------------------
# The field
# ----------------------------------------------------------------------------------------------------------------


def check_render_width(field: GaussianField, dim: int) -> None:
    """Raise ``ConfigError`` when ``field`` cannot hold ``dim``-wide lifted features: a rendered width above
    ``dim`` (a linear decoder cannot widen them), or, without a decoder, any width but ``dim``."""
    N = field.render_dim
    if field.decoder is None and N != dim:
        raise ConfigError(f"model.render_dim={N} must equal the feature width {dim} when model.decoder=false")
    if field.decoder is not None and N > dim:
        raise ConfigError(f"model.render_dim={N} exceeds the feature width {dim}: a linear decoder cannot widen "
                          f"lifted features; set model.render_dim <= {dim}")


def fit_lifted_field(field: GaussianField, numerator: Tensor, weight: Tensor) -> dict[str, Any]:
    """Set ``field``'s features (and decoder) from the accumulated sums, in place.

    Args:
        field: the frozen-geometry field (its ``render_dim``, ``teacher_dim`` and decoder decide the fit).
        numerator: ``[G, D]`` ``Σ_v Σ_p wᵢ(p)·F̃(p)``.
        weight: ``[G]`` ``Σ_v Σ_p wᵢ(p)·r(p)``.

    Returns:
        ``{"seen": int, "fit": "direct" | "identity_decoder" | "pca_decoder", "explained_variance": float}``
        (the last only for ``pca_decoder``).

    Raises:
        ConfigError: ``render_dim`` exceeds D with a decoder, or differs from D without one.
    """
    G, D = numerator.shape
    N = field.render_dim
    check_render_width(field, D)
    seen = weight > _UNSEEN_WEIGHT  # [G]
    if not bool(seen.any()):
        raise DataError("no Gaussian contributes to any training view: nothing to lift")
    w = weight.float().clamp_min(0.0)
    # [D] the weighted mean of the gᵢ (an unseen Gaussian's numerator row is zero); float64 sums, no G x D copy
    mean = numerator.sum(0, dtype=torch.float64) / w.sum(dtype=torch.float64)
    g = numerator.float() / w.clamp_min(_UNSEEN_WEIGHT)[:, None]  # [G, D] teacher-space features
    g[~seen] = mean.float()
    info: dict[str, Any] = {"seen": int(seen.sum())}
    p = field.params
    with torch.no_grad():
        if field.decoder is None:
            p["features"].copy_(g.to(p["features"].dtype))
            info["fit"] = "direct"
        elif N == D:
            p["features"].copy_(g.to(p["features"].dtype))
            field.decoder.weight.copy_(torch.eye(D, dtype=field.decoder.weight.dtype)[:, :, None, None])
            if field.decoder.bias is not None:
                field.decoder.bias.zero_()
            info["fit"] = "identity_decoder"
        else:  # N < D (check_render_width)
            # Weighted PCA: Σ = Σᵢ wᵢ (gᵢ-μ)(gᵢ-μ)ᵀ / Σᵢ wᵢ, accumulated in row chunks (G·D memory, not G·D·D).
            cov = torch.zeros(D, D, dtype=torch.float64)
            for i0 in range(0, G, 65536):
                c = (g[i0:i0 + 65536].double() - mean) * w[i0:i0 + 65536, None].double().sqrt()
                cov += c.T @ c
            cov /= w.sum(dtype=torch.float64)
            evals, evecs = torch.linalg.eigh(cov)  # ascending
            basis = evecs[:, -N:].flip(-1)  # [D, N] top-N directions, largest first
            p["features"].copy_((g - mean.float()) @ basis.float())
            field.decoder.weight.copy_(basis.to(field.decoder.weight.dtype)[:, :, None, None])
            if field.decoder.bias is not None:
                field.decoder.bias.copy_(mean.to(field.decoder.bias.dtype))
            total = float(evals.clamp_min(0).sum())
            info["fit"] = "pca_decoder"
            info["explained_variance"] = float(evals[-N:].clamp_min(0).sum()) / total if total > 0 else 1.0
    return info


# ----------------------------------------------------------------------------------------------------------------
# Checks: does the PLY belong to the scene?
# ----------------------------------------------------------------------------------------------------------------


def views_without_gaussians(means: Tensor, scene: Scene, ids: Sequence[int]) -> list[str]:
    """Names of the views ``ids`` into which no Gaussian centre projects (in front of the camera, inside)."""
    return [scene.cameras[i].name for i in ids if not bool(centres_in_view(means, scene.cameras[i]).any())]


def _inria_cameras(ply: Path) -> Path | None:
    """The ``cameras.json`` an Inria / gsplat-style model folder keeps beside (or above) its PLY."""
    for parent in list(ply.resolve().parents)[:3]:  # <model>/point_cloud/iteration_N/point_cloud.ply
        if (parent / "cameras.json").is_file():
            return parent / "cameras.json"
    return None


def check_ply_matches_scene(ply: str | Path, means: Tensor, scene: Scene) -> None:
    """Stop (one line) when the PLY's cameras are not the scene's.

    With the Inria layout's ``cameras.json`` (``img_name``, ``position`` = camera centre in world coordinates):
    every listed image must be in the scene, with its camera centre within 1e-3 of the scene's extent. Then, for
    any PLY: every training view must see at least one Gaussian centre.

    Raises:
        DataError: naming the first image that does not match.
    """
    ply = Path(ply)
    cams_json = _inria_cameras(ply)
    tol = 1e-3 * max(scene.extent(), 1e-6)
    if cams_json is not None:
        try:
            entries = json.loads(cams_json.read_text())
            listed = {str(e["img_name"]): torch.tensor([float(c) for c in e["position"]]) for e in entries}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(f"{cams_json} is not a 3DGS cameras.json: {err}") from None
        by_stem = {Path(c.name).stem: c for c in scene.cameras}
        missing = sorted(set(listed) - set(by_stem))
        if missing:
            raise DataError(f"{ply}: its {cams_json.name} lists images the scene {scene.root} does not have: "
                            f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        for name, position in listed.items():
            centre = by_stem[name].center
            if float((centre - position).norm()) > tol:
                raise DataError(f"{ply}: image {name} has its camera at {position.tolist()} in {cams_json.name} but "
                                f"at {[round(v, 4) for v in centre.tolist()]} in the scene {scene.root}: the PLY and "
                                "the scene are in different coordinate frames")
    empty = views_without_gaussians(means, scene, scene.train_ids)
    if empty:
        raise DataError(f"{ply}: no Gaussian of the PLY projects into the training view {empty[0]}"
                        f"{f' (and {len(empty) - 1} more)' if len(empty) > 1 else ''} of {scene.root}; the PLY "
                        "and the scene do not match")


# ----------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------


def _fingerprint(cfg: Feature3DGSConfig, scene: Scene, cache: FeatureCache, views: list[int]) -> str:
    """Identity of a lift's inputs: a resumed lift must add views of the same PLY, scene, teacher and render."""
    st = Path(cfg.model.init_ply).stat()
    parts = [str(Path(cfg.model.init_ply).resolve()), str(st.st_size), str(st.st_mtime_ns), scene_fingerprint(scene),
             str(cache.manifest.get("teacher")), json.dumps(list(cache.shape)), cfg.model.backend,
             cfg.model.rasterize_mode, json.dumps(views)]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def _load_state(lift_dir: Path, fingerprint: str, G: int, D: int) -> tuple[Tensor, Tensor, list[int]]:
    path = lift_dir / _STATE
    if not path.is_file():
        return torch.zeros(G, D), torch.zeros(G), []
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            numerator, weight = f.get_tensor("numerator"), f.get_tensor("weight")
    except Exception as err:  # noqa: BLE001 - a torn or foreign file: say so in one line
        raise DataError(f"cannot read the lift state {path}: {str(err).splitlines()[0]}; delete it to start over") \
            from None
    if meta.get("fingerprint") != fingerprint or tuple(numerator.shape) != (G, D):
        raise UserError(f"{lift_dir.parent} holds a lift of other inputs (PLY, scene, teacher or render settings); "
                        "choose another --out or delete it")
    return numerator, weight, json.loads(meta["views_done"])


def _save_state(lift_dir: Path, numerator: Tensor, weight: Tensor, done: list[int], fingerprint: str,
                total: int) -> None:
    lift_dir.mkdir(parents=True, exist_ok=True)
    path = lift_dir / _STATE
    tmp = tmp_path(path)
    save_file({"numerator": numerator.contiguous(), "weight": weight.contiguous()}, str(tmp),
              metadata={"fingerprint": fingerprint, "views_done": json.dumps(done)})
    os.replace(tmp, path)  # a reader (or a resumed run) never sees a torn state
    atomic_write_text(lift_dir / _PROGRESS, json.dumps({"views_done": len(done), "views": total,
                                                        "fingerprint": fingerprint, "complete": False}, indent=1))


def _distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, this process's device), starting the process group under torchrun / accelerate launch."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState  # on use: only multi-process runs need it

        state = PartialState(cpu=device.type == "cpu")  # gloo on CPU; one GPU per process on CUDA
        return state.process_index, state.num_processes, state.device
    return 0, 1, device


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _all_reduce(*tensors: Tensor) -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for t in tensors:
            torch.distributed.all_reduce(t)


def _check_run_dir(run_dir: Path) -> dict | None:
    """The finished lift's summary when ``run_dir`` holds one; raise when it holds anything but a lift."""
    if not run_dir.exists():
        return None
    if (run_dir / LIFT_DIR / _PROGRESS).is_file():
        progress = json.loads((run_dir / LIFT_DIR / _PROGRESS).read_text())
        if progress.get("complete") and (run_dir / "summary.json").is_file():
            return json.loads((run_dir / "summary.json").read_text())
        return None
    if latest_checkpoint(run_dir) is not None or (run_dir / "config.yaml").exists():
        raise UserError(f"{run_dir} already holds a run that is not a lift; choose another --out")
    return None


def lift(cfg: Feature3DGSConfig, out: str | Path, progress: bool = True) -> dict:
    """``vkd lift``: lift the teacher's features onto the Gaussians of ``model.init_ply``; write a run at ``out``.

    Everything the inputs can get wrong (the PLY, its match with the scene's cameras, the feature files) is
    checked before ``out`` is created. A rerun with the same inputs resumes from the last saved view batch (or
    returns the finished lift's summary).

    Args:
        cfg: the Feature 3DGS config (``model.init_ply`` set; ``teacher`` as for training).
        out: the run directory to write.
        progress: show a progress bar.

    Returns:
        the summary (also ``out/summary.json``): views, Gaussians, seen fraction, fit, timings.

    Raises:
        UserError / DataError / ConfigError: bad input (one line, nothing written to ``out``).
    """
    run_dir = Path(out)
    if not cfg.model.init_ply:
        raise ConfigError("vkd lift needs the trained Gaussians: --ply PATH (model.init_ply)")
    done_summary = _check_run_dir(run_dir)
    if done_summary is not None:
        log.info("lift: %s is already complete", run_dir)
        return done_summary
    with torch_threads(cfg.compute.cpu_threads):
        t0 = time.perf_counter()
        rank, world, device = _distributed(resolve_device(cfg.train.device))
        scene = prepare_scene(cfg)
        gaussians = load_init_ply(cfg, scene)
        check_ply_matches_scene(cfg.model.init_ply, gaussians["means"], scene)
        teacher, info, cache = prepare_teacher(cfg, scene, progress=progress and rank == 0)
        D = int(cache.shape[0])
        field = build_field(cfg, scene, D, gaussians)
        check_render_width(field, D)  # before the run directory exists (fit_lifted_field checks it again)
        views = list(scene.train_ids)
        fingerprint = _fingerprint(cfg, scene, cache, views)
        lift_dir = run_dir / LIFT_DIR
        numerator, weight, done = _load_state(lift_dir, fingerprint, field.num_gaussians, D)
        t_prep = time.perf_counter() - t0
        _barrier()  # every rank has checked the inputs (and the run directory) before rank 0 writes into it
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
            info = save_teacher_for_queries(info, run_dir)
            if info.get("random_init"):
                log.warning(RANDOM_INIT_WARNING)
        means, quats, scales, opac = (t.detach().to(device) for t in field.activated())
        todo = [v for v in views if v not in set(done)]
        batch = max(1, cfg.lift.save_every)
        bar = tqdm(total=len(views), initial=len(done), desc="lift", disable=not progress or rank != 0 or None)
        t1 = time.perf_counter()
        try:
            for b0 in range(0, len(todo), batch):
                chunk = todo[b0:b0 + batch]
                part = torch.zeros(field.num_gaussians, D + 1, device=device)  # [G, D+1] this batch's sums
                for group in view_groups(scene, chunk[rank::world], lambda v: cache.map_shape(v)[1:], D):
                    cams = [scene.cameras[v] for v in group]
                    targets = torch.stack([cache.get(v) for v in group]).to(device)  # [C, D, h, w]
                    part += lift_views(means, quats, scales, opac, torch.stack([c.viewmat for c in cams]).to(device),
                                       torch.stack([c.K for c in cams]).to(device), cams[0].width, cams[0].height,
                                       targets, cfg.model.backend, cfg.model.rasterize_mode).float()
                    del targets
                    if world == 1:
                        bar.update(len(group))
                _all_reduce(part)
                numerator += part[:, :D].cpu()
                weight += part[:, D].cpu()
                done += chunk
                del part
                if world > 1:
                    bar.update(len(chunk))
                if rank == 0 and len(done) < len(views):
                    _save_state(lift_dir, numerator, weight, done, fingerprint, len(views))
        except KeyboardInterrupt:
            raise TrainingInterrupted(f"lift interrupted after {len(done)} of {len(views)} views (saved every "
                                      f"{batch}); rerun the same command to resume") from None
        finally:
            bar.close()
        t_lift = time.perf_counter() - t1
        fit = fit_lifted_field(field, numerator, weight)
        summary = {"task": "feature3dgs", "method": "lift", "views": len(views),
                   "num_gaussians": field.num_gaussians, "feature_dim": D, "render_dim": field.render_dim,
                   "seen_fraction": fit["seen"] / field.num_gaussians, **fit, "world_size": world,
                   "teacher": {k: info.get(k) for k in ("kind", "model", "pretrained", "random_init",
                                                         "feature_shape")},
                   "timings_s": {"scene_and_teacher": t_prep, "lifting": t_lift}}
        if rank == 0:
            _write_run(cfg, field, run_dir, summary, fingerprint)
        log.info("lift: %d Gaussians (%.1f%% seen) from %d views in %.1f s (%s)", field.num_gaussians,
                 100 * summary["seen_fraction"], len(views), t_lift, fit["fit"])
        return summary


def _write_run(cfg: Feature3DGSConfig, field: GaussianField, run_dir: Path, summary: dict, fingerprint: str) -> None:
    """The checkpoint (engine format, so every run reader opens it), the export, the summary; then the state goes."""
    task = Feature3DGSTask(cfg, field.cpu(), 1.0)
    save_checkpoint(run_dir / "checkpoints", summary["views"], task.checkpoint_state_dict(),
                    {"step": summary["views"], "extra": task.extra_state_dict()},
                    extra_meta={"method": "lift", "fingerprint": fingerprint})
    export_field(field, run_dir / "export", cfg)
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    (run_dir / LIFT_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / LIFT_DIR / _PROGRESS, json.dumps({"views_done": summary["views"],
                                                                  "views": summary["views"],
                                                                  "fingerprint": fingerprint, "complete": True},
                                                                 indent=1))
    (run_dir / LIFT_DIR / _STATE).unlink(missing_ok=True)  # G·D floats: not needed once the checkpoint exists
