"""Evaluation at held-out views (spec §9 and issue 5 §6).

* RGB PSNR / SSIM (kornia) against the held-out images.
* Feature cosine similarity and L1 against the teacher at the teacher's resolution (student rendered, resized with
  ``align_corners=True`` and decoded, exactly as in training).
* The Feature 3DGS segmentation protocol (``eval.segmentation="render"``, the default), as the reference's
  ``segmentation_metric.py`` evaluates it: student and teacher maps at the rendered resolution, labelled against the
  same text label set (per-pixel L2 norm, dot with normalised text embeddings, argmax, label merges); pixel accuracy
  and mIoU over the ``top_k`` most frequent labels of each view (NaN-ignoring mean), averaged over views. The
  reference's teacher (LSeg) gives maps at the image resolution, its features bilinearly upsampled
  (``align_corners=True``); vkd's cached teacher maps are on the patch grid, so they are upsampled the same way, as
  features, before labelling. Maps wider than ``max_width`` are resized (bilinear, ``align_corners=True``) to
  ``max_width`` wide first, as the reference does (360x480 for Replica). Differences from the reference: the
  teacher map is resized once, straight to that size (the reference goes through the image size); the student's
  ``render_dim``-wide map is resized before the (affine, so commuting) decoder, and labelled in
  :class:`~vkd.feature3dgs.query.DecodedSpace` coordinates (the same cosines without a ``[M, H, W]`` map). Prompts
  are ``eval.prompt_template`` filled with the label names; ``auto`` (default) is the teacher's own prompt: the
  caption template the embedded tiny CLIP was pretrained with, raw names (as the reference with LSeg) otherwise.
  ``eval.segmentation="teacher_grid"`` (with ``eval.prompt_template="a photo of the {}."``) gives vkd's earlier
  figures: labels on the teacher's patch grid, wide maps' labels subsampled by 3.
* For scenes with true label maps (the synthetic scene): accuracy / mIoU of the student's and of the teacher's
  labels at the image resolution against the truth (``teacher_grid``: the teacher's patch labels,
  nearest-upsampled).
* Render FPS of the field (RGB + features + decoder) at the scene's resolution on the current device.

Every render uses the run's ``model.rasterize_mode`` and ``model.backend`` (and the field's active SH degree).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from kornia.metrics import psnr as kornia_psnr
from kornia.metrics import ssim as kornia_ssim
from torch import Tensor

from vkd.engine import torch_threads
from vkd.feature3dgs.config import Feature3DGSConfig
from vkd.feature3dgs.data import Scene
from vkd.feature3dgs.feature_cache import FeatureCache
from vkd.feature3dgs.losses import resize_features
from vkd.feature3dgs.model import GaussianField
from vkd.feature3dgs.query import (
    ADE20K_LABELS,
    ADE20K_MERGES,
    DecodedSpace,
    label_map,
    label_prompt_template,
    prompts,
)
from vkd.feature3dgs.runs import LoadedRun, load_run
from vkd.feature3dgs.visualize import PCAColorizer, save_png

__all__ = ["segmentation_metrics", "true_label_confusion", "protocol_size", "upsample_teacher", "protocol_labels",
           "render_fps", "Evaluator", "evaluate_run"]

SEGMENTATION_MODES = ("render", "teacher_grid")


def segmentation_metrics(student_labels: Tensor, teacher_labels: Tensor, top_k: int = 7) -> tuple[float, float]:
    """Feature 3DGS protocol for one view.

    Args:
        student_labels, teacher_labels: ``[H, W]`` int label maps.
        top_k: mIoU over the k most frequent labels counted over both maps.

    Returns:
        (pixel accuracy, mIoU).
    """
    acc = float((student_labels == teacher_labels).float().mean())
    both = torch.cat([student_labels.flatten(), teacher_labels.flatten()])
    ids, counts = torch.unique(both, return_counts=True)
    top = ids[counts.argsort(descending=True)[:top_k]]
    ious = []
    for label in top:
        s, t = student_labels == label, teacher_labels == label
        union = (s | t).sum()
        ious.append(float((s & t).sum()) / float(union) if union > 0 else math.nan)
    valid = [v for v in ious if not math.isnan(v)]
    return acc, (sum(valid) / len(valid) if valid else math.nan)


def true_label_confusion(pred: Tensor, truth: Tensor, num_classes: int) -> Tensor:
    """Confusion matrix ``[num_classes, num_classes]`` (rows: truth) of two ``[H, W]`` label maps."""
    idx = truth.flatten() * num_classes + pred.flatten()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _miou_from_confusion(conf: Tensor, ignore: tuple[int, ...] = ()) -> tuple[float, float]:
    """(pixel accuracy, mIoU over classes with a non-empty union) of a confusion matrix, skipping ``ignore`` ids."""
    conf = conf.double()
    keep = [i for i in range(conf.shape[0]) if i not in ignore]
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    ious = [float(inter[i] / union[i]) for i in keep if union[i] > 0]
    total = float(conf[keep].sum()) if keep else 0.0
    acc = float(sum(inter[i] for i in keep)) / total if total > 0 else math.nan
    return acc, (sum(ious) / len(ious) if ious else math.nan)


def protocol_size(height: int, width: int, max_width: int) -> tuple[int, int]:
    """``(h, w)`` at which the segmentation protocol labels a ``height x width`` view: its own size, or
    ``max_width`` wide (aspect kept, as the reference's 360x480 for 480x640 Replica) when it is wider."""
    if width <= max_width:
        return height, width
    return int(round(max_width * height / width)), max_width


def upsample_teacher(teacher: Tensor, size: tuple[int, int]) -> Tensor:
    """Teacher feature maps ``[B, M, h, w]`` -> ``[B, M, *size]``, bilinear with ``align_corners=True``: how the
    reference's LSeg evaluator brings its maps to the image size (``MultiEvalModule``'s ``up_kwargs``)."""
    if tuple(teacher.shape[-2:]) == tuple(size):
        return teacher
    return F.interpolate(teacher.float(), size=size, mode="bilinear", align_corners=True)


def protocol_labels(features: Tensor, space: DecodedSpace, teacher: Tensor, text: Tensor,
                    merges: dict[int, int] | None = None, max_width: int = 480) -> tuple[Tensor, Tensor]:
    """Student and teacher label maps of one view under the ``render`` protocol (see module docstring).

    Args:
        features: ``[1, N, H, W]`` rendered (undecoded) features at the render size.
        space: the field's :class:`DecodedSpace` (its decoder ``d = W·f + b``).
        teacher: ``[1, M, h, w]`` teacher map (any resolution).
        text: ``[K, M]`` text embeddings of the label set.
        merges: label merges ``{from: to}``.
        max_width: wider views are labelled at :func:`protocol_size`.

    Returns:
        ``(student, teacher)`` int64 label maps ``[h', w']`` at the protocol size.
    """
    size = protocol_size(features.shape[-2], features.shape[-1], max_width)
    f = features if tuple(features.shape[-2:]) == size else F.interpolate(
        features, size=size, mode="bilinear", align_corners=True)  # resize ∘ decode = decode ∘ resize (affine)
    student = label_map(space.features(f, dim=1), space.vectors(text.to(f.dtype)), merges)[0]
    t = upsample_teacher(teacher.to(text.device), size)
    return student, label_map(t, text.to(t.dtype), merges)[0]


@torch.no_grad()
def render_fps(field: Any, viewmats: Tensor, Ks: Tensor, width: int, height: int, repeats: int = 3,
               decode: bool = True, backend: str | None = None, rasterize_mode: str | None = None) -> float:
    """Frames per second of a full feature-field render (RGB + features (+ decoder)) of one view at a time.

    One untimed warm-up render, then ``repeats`` passes over the given views. ``backend`` / ``rasterize_mode``
    default to the field's.
    """
    def one(i: int) -> None:
        out = field.render(viewmats[i:i + 1], Ks[i:i + 1], width, height, features=True, backend=backend,
                           rasterize_mode=rasterize_mode)
        if decode and field.decoder is not None:
            field.decode(out["features"].permute(0, 3, 1, 2))

    one(0)
    if viewmats.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 0
    for _ in range(repeats):
        for i in range(viewmats.shape[0]):
            one(i)
            n += 1
    if viewmats.is_cuda:
        torch.cuda.synchronize()
    return n / max(time.perf_counter() - t0, 1e-9)


class Evaluator:
    """Held-out evaluation of a field against the scene and the cached teacher maps.

    Args:
        scene: the :class:`~vkd.feature3dgs.data.Scene`.
        cache: the teacher :class:`~vkd.feature3dgs.feature_cache.FeatureCache`.
        views: indices of the evaluated (held-out) views.
        text: ``[K, M]`` text embeddings of ``labels`` (``None``: the teacher is not text-aligned).
        labels: label names for the protocol.
        merges: protocol label merges ``{from_index: to_index}``.
        background: RGB background.
        top_k, max_width, fps_repeats: protocol / timing options.
        backend, rasterize_mode: render settings of every render (the run's ``model.backend`` /
            ``model.rasterize_mode``).
        segmentation: ``render`` (the reference protocol) or ``teacher_grid`` (vkd's earlier one), see the module.
    """

    def __init__(self, scene: Scene, cache: FeatureCache, views: list[int], text: Tensor | None, labels: list[str],
                 merges: dict[int, int] | None = None, background: tuple[float, ...] = (0.0, 0.0, 0.0),
                 top_k: int = 7, max_width: int = 480, fps_repeats: int = 3, backend: str = "auto",
                 rasterize_mode: str = "classic", segmentation: str = "render"):
        if segmentation not in SEGMENTATION_MODES:
            raise ValueError(f"segmentation must be one of {SEGMENTATION_MODES}, got {segmentation!r}")
        self.scene, self.cache, self.views = scene, cache, list(views)
        self.text, self.labels, self.merges = text, labels, merges or {}
        self.background = torch.tensor(background, dtype=torch.float32)
        self.top_k, self.max_width, self.fps_repeats, self.backend = top_k, max_width, fps_repeats, backend
        self.rasterize_mode, self.segmentation = rasterize_mode, segmentation
        # Text index -> scene label id, when the label set names the scene's semantic classes.
        self.true_ids: list[int] | None = None
        if scene.label_names and text is not None and all(lab in scene.label_names for lab in labels):
            self.true_ids = [scene.label_names.index(lab) for lab in labels]

    @classmethod
    def build(cls, cfg: Feature3DGSConfig, scene: Scene, cache: FeatureCache, teacher: Any, info: dict) -> Evaluator:
        """The evaluator of a config: its label set, held-out views and, for a text-aligned ``teacher`` (anything
        with ``text_aligned`` and ``encode_text``), the labels' text embeddings (prompts from
        ``eval.prompt_template``)."""
        e = cfg.eval
        if e.labels:
            labels = list(e.labels)
        elif scene.label_names:
            labels = [n for n in scene.label_names if n != "background"]
        else:
            labels = list(ADE20K_LABELS)
        merges = None
        if labels == list(ADE20K_LABELS):
            merges = {labels.index(a): labels.index(b) for a, b in ADE20K_MERGES.items()}
        text = None
        if getattr(teacher, "text_aligned", False):
            text = teacher.encode_text(prompts(labels, label_prompt_template(e.prompt_template, info))).float().cpu()
        views = scene.test_ids or scene.train_ids[:1]
        if e.max_views:
            views = views[:e.max_views]
        bg = cfg.model.background if cfg.model.background is not None else scene.background
        return cls(scene, cache, views, text, labels, merges, bg, e.top_k, e.max_width, e.fps_repeats,
                   cfg.model.backend, cfg.model.rasterize_mode, e.segmentation)

    def _render(self, field: GaussianField, i: int) -> dict[str, Any]:
        """RGB + features of view ``i`` with the run's render settings."""
        cam = self.scene.cameras[i]
        device = field.params["means"].device
        return field.render(cam.viewmat[None].to(device), cam.K[None].to(device), cam.width, cam.height,
                            background=self.background.to(device), features=True, backend=self.backend,
                            rasterize_mode=self.rasterize_mode)

    def _protocol_resize(self, f: Tensor) -> tuple[Tensor, bool]:
        h, w = f.shape[-2:]
        if w <= self.max_width:
            return f, False
        return F.interpolate(f, size=protocol_size(h, w, self.max_width), mode="bilinear",
                             align_corners=True), True

    def _teacher_grid_labels(self, student: Tensor, teacher: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
        """vkd's earlier protocol: labels on the teacher's grid (``student`` decoded at it), wide maps subsampled."""
        s_p, resized = self._protocol_resize(student)
        t_p, _ = self._protocol_resize(teacher)
        s_lab, t_lab = label_map(s_p, text, self.merges)[0], label_map(t_p, text, self.merges)[0]
        if resized:
            s_lab, t_lab = s_lab[::3, ::3], t_lab[::3, ::3]
        return s_lab, t_lab

    @torch.no_grad()
    def evaluate(self, field: GaussianField, fps: bool = True) -> dict[str, float]:
        """All metrics averaged over ``views`` (see module docstring)."""
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}

        def add(key: str, value: float) -> None:
            if not math.isnan(value):
                sums[key] = sums.get(key, 0.0) + value
                counts[key] = counts.get(key, 0) + 1

        num_true = len(self.scene.label_names) if self.scene.label_names else 0
        conf_student = torch.zeros(num_true, num_true, dtype=torch.long)
        conf_teacher = torch.zeros(num_true, num_true, dtype=torch.long)
        device = field.params["means"].device
        space = DecodedSpace.of_field(field)
        for i in self.views:
            gt = self.scene.load_image(i)[None].to(device)
            out = self._render(field, i)
            rgb = out["rgb"].permute(0, 3, 1, 2).clamp(0, 1)
            add("psnr", float(kornia_psnr(rgb, gt, 1.0)))
            add("ssim", float(kornia_ssim(rgb, gt, 11).mean()))
            teacher = self.cache.get(i)[None].to(device)  # [1, M, h, w]
            fmap = out["features"].permute(0, 3, 1, 2)  # [1, N, H, W]
            student = field.decode(resize_features(fmap, teacher.shape[-2:]))
            add("feature_cosine", float(F.cosine_similarity(student, teacher, dim=1, eps=1e-8).mean()))
            add("feature_l1", float((student - teacher).abs().mean()))
            if self.text is None:
                continue
            text = self.text.to(device)
            if self.segmentation == "render":
                s_lab, t_lab = protocol_labels(fmap, space, teacher, text, self.merges, self.max_width)
            else:
                s_lab, t_lab = self._teacher_grid_labels(student, teacher, text)
            acc, miou = segmentation_metrics(s_lab, t_lab, self.top_k)
            add("teacher_label_acc", acc)
            add("teacher_label_miou", miou)
            truth = self.scene.load_labels(i) if self.true_ids is not None else None
            if truth is not None:
                ids = torch.tensor(self.true_ids)
                text_d = space.vectors(text)
                s_full = label_map(space.features(fmap, dim=1), text_d)[0]  # student labels at the image size
                if self.segmentation == "render":
                    t_full = t_lab if tuple(t_lab.shape) == tuple(truth.shape) else label_map(
                        upsample_teacher(teacher, tuple(truth.shape)), text)[0]
                else:
                    t_full = F.interpolate(t_lab[None, None].float(), size=truth.shape, mode="nearest")[0, 0].long()
                conf_student += true_label_confusion(ids[s_full.cpu()], truth, num_true)
                conf_teacher += true_label_confusion(ids[t_full.cpu()], truth, num_true)
        metrics = {k: sums[k] / counts[k] for k in sums}
        if num_true and conf_student.sum() > 0:
            metrics["true_label_acc"], metrics["true_label_miou"] = _miou_from_confusion(conf_student, ignore=(0,))
            metrics["teacher_true_label_acc"], metrics["teacher_true_label_miou"] = _miou_from_confusion(
                conf_teacher, ignore=(0,))
        if fps and self.views:
            cams = [self.scene.cameras[i] for i in self.views]
            vm = torch.stack([c.viewmat for c in cams]).to(device)
            Ks = torch.stack([c.K for c in cams]).to(device)
            metrics["fps"] = render_fps(field, vm, Ks, cams[0].width, cams[0].height, self.fps_repeats,
                                        backend=self.backend, rasterize_mode=self.rasterize_mode)
        metrics["num_gaussians"] = float(field.num_gaussians)
        metrics["num_views"] = float(len(self.views))
        return metrics

    @torch.no_grad()
    def save_samples(self, field: GaussianField, path: Path, max_views: int = 3) -> Path:
        """Grid per held-out view: ground truth | render | teacher PCA | student PCA (teacher res) | student PCA."""
        views = self.views[:max_views]
        space = DecodedSpace.of_field(field)
        teachers = [self.cache.get(i) for i in views]
        pca = PCAColorizer.fit(torch.cat([t.flatten(1).T for t in teachers]))
        pca_full = pca.pull_back(space.vectors(pca.components.T).T.cpu())  # colours DecodedSpace coordinates
        rows = []
        for i, t in zip(views, teachers, strict=True):
            cam = self.scene.cameras[i]
            H, W = cam.height, cam.width
            out = self._render(field, i)
            fmap = out["features"].permute(0, 3, 1, 2)
            low = field.decode(resize_features(fmap, t.shape[-2:]))

            def up(x: Tensor, size: tuple[int, int] = (H, W)) -> Tensor:
                return F.interpolate(x.permute(0, 3, 1, 2), size=size, mode="nearest").permute(0, 2, 3, 1)[0]

            tiles = [self.scene.load_image(i).permute(1, 2, 0), out["rgb"][0].clamp(0, 1).cpu(),
                     up(pca(t[None])), up(pca(low.cpu())), pca_full(space.features(out["features"][0]).cpu(),
                                                                   channel_dim=-1)]
            rows.append(torch.cat(tiles, 1))
        return save_png(torch.cat(rows, 0), path)


class _TextOnly:
    """Teacher stand-in for the evaluator of a finished run: text embeddings from the run's saved text tower."""

    def __init__(self, run: LoadedRun):
        self.text_aligned = bool(run.teacher_info.get("text_aligned", True))
        self._run = run
        self._enc = None

    def encode_text(self, prompts: list[str]) -> Tensor:
        if self._enc is None:
            self._enc = self._run.text_encoder()
        return self._enc(prompts)


def run_evaluator(run: LoadedRun) -> Evaluator:
    """The evaluator of a reopened run (its teacher cache rebuilt when it was deleted; text from the saved tower)."""
    return Evaluator.build(run.cfg, run.scene, run.cache(), _TextOnly(run), run.teacher_info)


def evaluate_run(run_dir: Path, overrides: list[str], out_dir: Path | None) -> dict:
    """``vkd eval feature3dgs --run RUN``: rebuild the run's field from its latest checkpoint and evaluate it.

    Writes ``eval.json`` under ``out_dir`` (default: the run dir) and returns the metrics.
    """
    run = load_run(run_dir, overrides)
    with torch_threads(run.cfg.compute.cpu_threads):  # restored afterwards: process-wide setting
        metrics = run_evaluator(run).evaluate(run.field)
        if run.teacher_info.get("random_init"):
            metrics["teacher_random_init"] = 1.0
        out = Path(out_dir) if out_dir is not None else Path(run_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(metrics, indent=2))
        return metrics
