"""``vkd render --run RUN``: RGB, depth, PCA features and text-query relevancy along test views or camera paths.

A point prompt (``--point VIEW X Y``, for teachers without text such as SAM or DINOv2) replaces the text query: the
feature rendered at pixel ``(X, Y)`` of view ``VIEW`` is the prompt, Gaussians are selected by the cosine of their
folded feature with it (:func:`point_prompt`), and a ``similarity`` stream (that cosine per pixel) replaces
``relevancy``.

Frames go to ``<out>/{rgb,depth,features,relevancy}/frame_XXXXX.png`` and, unless ``fmt="png"``, one video per
stream (``<out>/rgb.mp4`` ...), written as the frames come (nothing holds all frames). PCA colours are fitted once
per scene (on decoded feature renders of a few training views) and depth / relevancy use fixed ranges, so colours
are stable across frames.

Every render uses the run's ``model.rasterize_mode`` and ``model.backend`` and the SH degree the field reached
(:func:`~vkd.feature3dgs.runs.load_run` sets them on the field). Feature colours and relevancy are computed on the
``render_dim``-wide render through :class:`~vkd.feature3dgs.query.DecodedSpace`, never on a ``[H, W, M]`` decoded
map, so memory grows with the frame size and ``render_dim``, not with the teacher's width.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from vkd.engine import torch_threads
from vkd.errors import UserError
from vkd.feature3dgs.data import Scene
from vkd.feature3dgs.model import GaussianField
from vkd.feature3dgs.query import (
    DecodedSpace,
    edit_opacity_mask,
    label_prompt_template,
    label_scores,
    parse_query,
    prompts,
    relevancy,
    select_gaussians,
)
from vkd.feature3dgs.runs import LoadedRun, load_run
from vkd.feature3dgs.visualize import PCAColorizer, VideoWriter, colormap, save_png, to_uint8
from vkd.render import orbit_path, spiral_path

__all__ = ["camera_path", "fit_scene_pca", "render_run", "resolve_view", "point_prompt", "POINT_THRESHOLD"]

VIEW_KINDS = ("test", "train", "orbit", "spiral")
FORMATS = ("mp4", "gif", "png")
# (tile, Gaussian) pairs per rasterizer call (GaussianField.render's row bands): the torch backend needs about 230 B
# per pair (measured at 1280x720, 300k Gaussians), so about 0.5 GB per call whatever the frame size.
RENDER_MAX_PAIRS = 1 << 21
# Default cosine threshold of --point --extract/--delete: a conservative choice (selects little), not tuned on any
# scene; the similarity stream shows which value separates the object.
POINT_THRESHOLD = 0.9


def _c2w(viewmat: Tensor) -> Tensor:
    return torch.linalg.inv(viewmat.double())


def _focus(c2ws: Tensor) -> Tensor:
    """Least-squares point closest to all optical axes (+z forward, OpenCV)."""
    o, d = c2ws[:, :3, 3], c2ws[:, :3, 2] / c2ws[:, :3, 2].norm(dim=-1, keepdim=True)
    A = torch.eye(3, dtype=c2ws.dtype) - d[:, :, None] * d[:, None, :]
    lhs, rhs = A.sum(0), (A @ o[:, :, None]).sum(0)[:, 0]
    if torch.linalg.cond(lhs) > 1e8:
        return o.mean(0) + d.mean(0)
    return torch.linalg.solve(lhs, rhs)


def camera_path(scene: Scene, views: str, frames: int) -> tuple[Tensor, Tensor, int, int, list[str]]:
    """Cameras to render.

    Args:
        scene: the run's scene.
        views: ``test`` / ``train`` (the split's cameras; ``frames > 0`` keeps the first ``frames``), ``orbit``
            (a circle around the cameras' focus at their mean distance and elevation) or ``spiral`` (LLFF-style
            around the training cameras).
        frames: number of path frames (orbit/spiral) or a cap (test/train, 0 = all).

    Returns:
        viewmats ``[F, 4, 4]``, Ks ``[F, 3, 3]``, width, height, frame names.
    """
    if views not in VIEW_KINDS:
        raise UserError(f"unknown views '{views}'; choose one of {', '.join(VIEW_KINDS)}")
    if views in ("test", "train"):
        ids = scene.test_ids if views == "test" else scene.train_ids
        if not ids:
            raise UserError(f"the scene has no {views} views")
        ids = ids[:frames] if frames > 0 else ids
        cams = [scene.cameras[i] for i in ids]
        sizes = {(c.width, c.height) for c in cams}
        if len(sizes) > 1:  # render at the first camera's size, rescaling the others' intrinsics
            w0, h0 = cams[0].width, cams[0].height
            Ks = torch.stack([c.K * torch.tensor([[w0 / c.width], [h0 / c.height], [1.0]]) for c in cams])
        else:
            Ks = torch.stack([c.K for c in cams])
        return torch.stack([c.viewmat for c in cams]), Ks, cams[0].width, cams[0].height, [c.name for c in cams]
    if frames < 1:
        raise UserError(f"--frames must be >= 1 for {views} paths, got {frames}")
    ref = scene.cameras[scene.train_ids[0]]
    c2ws = torch.stack([_c2w(scene.cameras[i].viewmat) for i in scene.train_ids])
    if views == "spiral":
        path = spiral_path(c2ws, frames)
    else:
        center = _focus(c2ws)
        up = -c2ws[:, :3, 1].mean(0)  # camera -y is up in the image (OpenCV)
        up = up / up.norm()
        offsets = c2ws[:, :3, 3] - center
        radius = float(offsets.norm(dim=-1).mean())
        elev = float(torch.rad2deg(torch.asin((offsets @ up / offsets.norm(dim=-1)).clamp(-1, 1))).mean())
        path = orbit_path(center, radius, frames, elevation=elev, up=up, dtype=torch.float64)
    viewmats = torch.linalg.inv(path.double()).float()
    return viewmats, ref.K[None].expand(frames, 3, 3).clone(), ref.width, ref.height, [
        f"{views}_{k:05d}" for k in range(frames)]


def _query_setup(run: LoadedRun, query: str, edit: str | None, threshold: float | None,
                 space: DecodedSpace) -> dict[str, Any]:
    labels = parse_query(query)
    if not labels:
        raise UserError("--query is empty")
    encode = run.text_encoder()  # UserError when the run's teacher has no text tower
    if len(labels) > 1:
        label_set = labels
    else:
        scene_labels = list(run.cfg.eval.labels) or [n for n in (run.scene.label_names or []) if n != "background"]
        others = [n for n in scene_labels if n != labels[0]] or list(run.cfg.query.negatives)
        label_set = [labels[0]] + others
    template = label_prompt_template(run.cfg.query.prompt_template, run.teacher_info)
    text = encode(prompts(label_set, template)).to(run.field.params["means"].device)  # [K, M]
    result: dict[str, Any] = {"query": labels[0], "label_set": label_set, "text": text}
    if edit is not None:
        # Cosines with the folded W·fᵢ + b, computed in the decoded space's [G, N + 2] coordinates (not [G, M]).
        gaussians = space.features(run.field.params["features"].detach())  # [G, N + 2]
        text_d = space.vectors(text)  # [K, N + 2]
        if len(labels) == 1 and threshold is not None:
            selected = select_gaussians(gaussians, text_d[:1], [0], threshold, edit)
        else:
            selected = select_gaussians(gaussians, text_d, [0], threshold, edit)
        result["selected"] = selected
    return result


def resolve_view(scene: Scene, view: str) -> int:
    """The index into ``scene.cameras`` (all cameras, sorted by name) of ``view``: a camera name, also without its
    folder or file suffix when that names one camera (``images/frame_00003.png``, ``frame_00003``), else an integer
    index.

    Raises:
        UserError: no such camera.
    """
    names = [c.name for c in scene.cameras]
    if view in names:
        return names.index(view)
    short = [i for i, n in enumerate(names)
             if view in (str(Path(n).with_suffix("")), Path(n).name, Path(n).stem)]
    if len(short) == 1:
        return short[0]
    if view.isdigit() and int(view) < len(names):
        return int(view)
    raise UserError(f"--point: unknown view {view!r}: give a camera name (e.g. {names[0]!r}) or an index "
                    f"0..{len(names) - 1} of the scene's {len(names)} cameras")


@torch.no_grad()
def point_prompt(run: LoadedRun, point: Sequence[str], edit: str | None, threshold: float,
                 space: DecodedSpace, max_pairs: int | None = RENDER_MAX_PAIRS) -> dict[str, Any]:
    """The prompt of ``--point VIEW X Y``: the feature rendered at pixel ``(X, Y)`` (column, row; pixel units of the
    view's render at its camera's resolution), in ``space``'s coordinates, and the Gaussians it selects.

    The prompt is the decoded pixel feature ``W·F(x, y) + b``, the same map the decoder is trained on; a Gaussian is
    selected when the cosine of its folded feature ``gᵢ = W·fᵢ + b`` with it is ``>= threshold``.

    Returns:
        ``{"view", "view_index", "pixel": [x, y], "prompt": [1, K + 1]}`` and ``"selected": [G]`` bool with an edit.

    Raises:
        UserError: unknown view, coordinates that are not integers or lie outside the image.
    """
    if len(point) != 3:
        raise UserError(f"--point needs VIEW X Y, got {' '.join(map(str, point))!r}")
    view, x_text, y_text = (str(v) for v in point)
    index = resolve_view(run.scene, view)
    cam = run.scene.cameras[index]
    try:
        x, y = int(x_text), int(y_text)
    except ValueError:
        raise UserError(f"--point: X and Y must be integer pixel coordinates, got {x_text!r} {y_text!r}") from None
    if not (0 <= x < cam.width and 0 <= y < cam.height):
        raise UserError(f"--point: pixel ({x}, {y}) is outside view {cam.name!r} ({cam.width}x{cam.height}: "
                        f"X in 0..{cam.width - 1}, Y in 0..{cam.height - 1})")
    field = run.field
    device = field.params["means"].device
    r = field.render(cam.viewmat[None].to(device), cam.K[None].to(device), cam.width, cam.height, features=True,
                     max_pairs=max_pairs)
    prompt = space.features(r["features"][0, y, x][None])  # [1, K + 1]: the decoded W·F(x, y) + b
    result: dict[str, Any] = {"view": cam.name, "view_index": index, "pixel": [x, y], "prompt": prompt}
    if edit is not None:
        gaussians = space.features(field.params["features"].detach())  # [G, K + 1]: the folded W·fᵢ + b
        result["selected"] = select_gaussians(gaussians, prompt, [0], threshold, edit)
    return result


@torch.no_grad()
def fit_scene_pca(field: GaussianField, scene: Scene, backend: str | None = None, max_views: int = 4,
                  rasterize_mode: str | None = None, max_samples: int = 20000,
                  max_pairs: int | None = RENDER_MAX_PAIRS) -> PCAColorizer:
    """Teacher-space PCA colouring, fitted once per scene on decoded feature maps of up to ``max_views`` training
    views.

    Rendered maps (blends of per-Gaussian features) have other statistics than the per-Gaussian features
    themselves, so fitting on renders gives better contrast; the same mapping is then used for every frame. Pixels
    are sampled by alpha (:meth:`PCAColorizer.sample_indices`) on the ``render_dim``-wide renders and only the
    ``max_samples`` sampled pixels are decoded, so the fit holds ``[views·H·W, N]``, never ``[views·H·W, M]``.

    Args:
        field: the trained field.
        scene: its scene (training views).
        backend, rasterize_mode: render settings (default: the field's).
        max_views, max_samples: views rendered and pixels kept for the fit.
        max_pairs: rasterizer pairs per call (:meth:`GaussianField.render`'s row bands).

    Returns:
        The colouriser of decoded ``[..., M]`` maps (pull it back with :meth:`PCAColorizer.pull_back` to colour
        :class:`DecodedSpace` coordinates).
    """
    device = field.params["means"].device
    ids = scene.train_ids[:: max(1, len(scene.train_ids) // max_views)][:max_views]
    cams = [scene.cameras[i] for i in ids]
    total = sum(c.width * c.height for c in cams)
    feats = torch.empty(total, field.render_dim)  # [P, N], filled view by view (no list + cat copy)
    weights = torch.empty(total)  # [P]
    at = 0
    for cam in cams:
        r = field.render(cam.viewmat[None].to(device), cam.K[None].to(device), cam.width, cam.height,
                         features=True, backend=backend, rasterize_mode=rasterize_mode, max_pairs=max_pairs)
        n = cam.width * cam.height
        feats[at:at + n] = r["features"][0].reshape(n, -1).cpu()
        weights[at:at + n] = r["alpha"][0, ..., 0].reshape(n).cpu()
        at += n
        del r
    idx = PCAColorizer.sample_indices(total, weights, max_samples)
    sample = feats if idx is None else feats[idx]  # [S, N]
    del feats
    decoded = field.decode(sample.T[None, :, :, None].to(device))[0, :, :, 0].T.cpu()  # [S, M] via the 1x1 conv
    return PCAColorizer.fit(decoded, max_samples=max_samples)


@torch.no_grad()
def render_run(run_dir: Path, views: str = "test", frames: int = 0, query: str | None = None,
               edit: str | None = None, threshold: float | None = None, out: Path | None = None,
               fmt: str = "mp4", fps: int = 24, progress: bool = True, max_pairs: int | None = RENDER_MAX_PAIRS,
               point: Sequence[str] | None = None) -> dict:
    """Render a trained run (see module docstring). Returns a summary dict (also written as ``render.json``).

    ``max_pairs`` bounds the rasterizer's pairs per call (row bands, :meth:`GaussianField.render`); ``None``
    renders each frame in one call. ``point`` is ``(VIEW, X, Y)`` (:func:`point_prompt`), exclusive with ``query``;
    its ``threshold`` is a cosine and defaults to :data:`POINT_THRESHOLD`.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown format '{fmt}'; choose one of {', '.join(FORMATS)}")
    if edit not in (None, "extract", "delete"):
        raise UserError(f"unknown edit '{edit}'; choose extract or delete")
    if query and point is not None:
        raise UserError("--query and --point are mutually exclusive")
    if edit is not None and not query and point is None:
        raise UserError(f"--{edit} needs --query or --point")
    if point is not None:
        threshold = POINT_THRESHOLD if threshold is None else threshold
        if not -1.0 <= threshold <= 1.0:
            raise UserError(f"--threshold is a cosine for --point: it must be in [-1, 1], got {threshold}")
    run = load_run(run_dir)
    # Threads are restored afterwards (a process-wide setting); videos are finalised when the block exits.
    with torch_threads(run.cfg.compute.cpu_threads), ExitStack() as stack:
        field, scene = run.field, run.scene
        device = field.params["means"].device
        viewmats, Ks, W, H, names = camera_path(scene, views, frames)
        viewmats, Ks = viewmats.to(device), Ks.to(device)
        space = DecodedSpace.of_field(field)
        q = _query_setup(run, query, edit, threshold, space) if query else None
        pt = point_prompt(run, point, edit, threshold, space, max_pairs) if point is not None else None
        text_d = space.vectors(q["text"]).cpu() if q is not None else None  # [K, N + 2]
        prompt_d = pt["prompt"].cpu() if pt is not None else None  # [1, N + 2]
        chosen = q if q is not None else pt
        mask = edit_opacity_mask(chosen["selected"], edit) if chosen is not None and edit is not None else None
        bg = torch.tensor(run.cfg.model.background if run.cfg.model.background is not None else scene.background,
                          dtype=torch.float32, device=device)

        # Fixed colour mappings, fitted once per scene; features are coloured in the decoded space's coordinates.
        pca = fit_scene_pca(field, scene, max_pairs=max_pairs)
        colour = pca.pull_back(space.vectors(pca.components.T).T.cpu())  # [N + 2, 3] axes
        streams = ["rgb", "depth", "features"] + (["relevancy"] if q is not None else []) + (
            ["similarity"] if pt is not None else [])
        out_dir = Path(out) if out is not None else Path(run_dir) / "renders" / (views + (f"-{edit}" if edit else ""))
        for s in streams:
            (out_dir / s).mkdir(parents=True, exist_ok=True)
        writers = {s: stack.enter_context(VideoWriter(out_dir / f"{s}.{fmt}", fps=fps)) for s in streams} \
            if fmt != "png" else {}
        depth_range: tuple[float, float] | None = None
        bar = tqdm(range(len(names)), desc=f"render {views}", disable=not progress or None)
        for k in bar:
            r = field.render(viewmats[k:k + 1], Ks[k:k + 1], W, H, background=bg, features=True, depth=True,
                             opacity_mask=mask, max_pairs=max_pairs)
            rgb = r["rgb"][0].clamp(0, 1).cpu()
            alpha = r["alpha"][0, ..., 0].cpu()
            depth = r["depth"][0, ..., 0].cpu()
            if depth_range is None:
                valid = depth[alpha > 0.5]
                valid = valid if valid.numel() > 10 else depth.flatten()
                depth_range = (float(torch.quantile(valid, 0.02)), float(torch.quantile(valid, 0.98)) + 1e-6)
            coords = space.features(r["features"][0]).cpu()  # [H, W, N + 2]: stands for the decoded [H, W, M]
            del r
            frames_k = {"rgb": rgb, "depth": colormap(depth, *depth_range, name="turbo") * alpha[..., None],
                        "features": colour(coords, channel_dim=-1) * alpha[..., None]}
            if text_d is not None:
                rel = relevancy(coords.permute(2, 0, 1)[None], text_d[0], text_d[1:], run.cfg.query.temperature)[0]
                frames_k["relevancy"] = colormap(rel, 0.0, 1.0, name="turbo")
            if prompt_d is not None:  # cosine with the prompt pixel's decoded feature; <= 0 maps to the bottom
                sim = label_scores(coords.permute(2, 0, 1)[None], prompt_d)[0, 0]  # [H, W]
                frames_k["similarity"] = colormap(sim, 0.0, 1.0, name="turbo")
            for s, img in frames_k.items():
                save_png(img, out_dir / s / f"frame_{k:05d}.png")
                if s in writers:
                    writers[s].append(to_uint8(img))
        outputs = {s: str(writers[s].path if s in writers else out_dir / s) for s in streams}
        summary = {"out": str(out_dir), "views": views, "frames": len(names), "width": W, "height": H,
                   "outputs": outputs, "checkpoint": str(run.checkpoint), "num_gaussians": field.num_gaussians,
                   "rasterize_mode": field.rasterize_mode}
        if q is not None:
            summary.update(query=q["query"], label_set=q["label_set"])
        if pt is not None:
            summary.update(point={"view": pt["view"], "view_index": pt["view_index"], "x": pt["pixel"][0],
                                  "y": pt["pixel"][1]})
        if mask is not None:
            summary.update(edit=edit, threshold=threshold, selected_gaussians=int(chosen["selected"].sum()),
                           kept_gaussians=int(mask.sum()))
        if run.teacher_info.get("random_init"):
            summary["warning"] = "teacher was randomly initialised: relevancy maps carry no semantics"
        (out_dir / "render.json").write_text(json.dumps(summary, indent=1))
        return summary
