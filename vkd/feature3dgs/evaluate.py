"""Evaluation at held-out views (spec §9 and issue 5 §6).

* RGB PSNR / SSIM (kornia) against the held-out images.
* Feature cosine similarity and L1 against the teacher at the teacher's resolution (student rendered, resized with
  ``align_corners=True`` and decoded, exactly as in training).
* The Feature 3DGS segmentation protocol: student and teacher maps labelled against the same text label set (per-pixel
  L2 norm, dot with normalised text embeddings, argmax, label merges); pixel accuracy and mIoU over the ``top_k``
  most frequent labels of each view (NaN-ignoring mean), averaged over views. Maps wider than ``max_width`` are first
  resized to ``max_width`` wide and labels nearest-downsampled by 3, as the reference does for Replica.
* For scenes with true label maps (the synthetic scene): accuracy / mIoU of the student's full-resolution labels and
  of the teacher's (nearest-upsampled) labels against the truth.
* Render FPS of the field (RGB + features + decoder) at the scene's resolution on the current device.
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
from vkd.feature3dgs.query import ADE20K_LABELS, ADE20K_MERGES, label_map, prompts
from vkd.feature3dgs.runs import LoadedRun, load_run
from vkd.feature3dgs.visualize import PCAColorizer, save_png

__all__ = ["segmentation_metrics", "true_label_confusion", "render_fps", "Evaluator", "evaluate_run"]


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


@torch.no_grad()
def render_fps(field: Any, viewmats: Tensor, Ks: Tensor, width: int, height: int, repeats: int = 3,
               decode: bool = True, backend: str = "auto") -> float:
    """Frames per second of a full feature-field render (RGB + features (+ decoder)) of one view at a time.

    One untimed warm-up render, then ``repeats`` passes over the given views.
    """
    def one(i: int) -> None:
        out = field.render(viewmats[i:i + 1], Ks[i:i + 1], width, height, features=True, backend=backend)
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
    """

    def __init__(self, scene: Scene, cache: FeatureCache, views: list[int], text: Tensor | None, labels: list[str],
                 merges: dict[int, int] | None = None, background: tuple[float, ...] = (0.0, 0.0, 0.0),
                 top_k: int = 7, max_width: int = 480, fps_repeats: int = 3, backend: str = "auto"):
        self.scene, self.cache, self.views = scene, cache, list(views)
        self.text, self.labels, self.merges = text, labels, merges or {}
        self.background = torch.tensor(background, dtype=torch.float32)
        self.top_k, self.max_width, self.fps_repeats, self.backend = top_k, max_width, fps_repeats, backend
        # Text index -> scene label id, when the label set names the scene's semantic classes.
        self.true_ids: list[int] | None = None
        if scene.label_names and text is not None and all(lab in scene.label_names for lab in labels):
            self.true_ids = [scene.label_names.index(lab) for lab in labels]

    @classmethod
    def build(cls, cfg: Feature3DGSConfig, scene: Scene, cache: FeatureCache, teacher: Any, info: dict) -> Evaluator:
        """The evaluator of a config: its label set, held-out views and, for a text-aligned ``teacher`` (anything
        with ``text_aligned`` and ``encode_text``), the labels' text embeddings."""
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
            text = teacher.encode_text(prompts(labels)).float().cpu()
        views = scene.test_ids or scene.train_ids[:1]
        if e.max_views:
            views = views[:e.max_views]
        bg = cfg.model.background if cfg.model.background is not None else scene.background
        return cls(scene, cache, views, text, labels, merges, bg, e.top_k, e.max_width, e.fps_repeats,
                   cfg.model.backend)

    def _protocol_resize(self, f: Tensor) -> tuple[Tensor, bool]:
        h, w = f.shape[-2:]
        if w <= self.max_width:
            return f, False
        return F.interpolate(f, size=(int(round(self.max_width * h / w)), self.max_width), mode="bilinear",
                             align_corners=True), True

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
        for i in self.views:
            cam = self.scene.cameras[i]
            gt = self.scene.load_image(i)[None].to(device)
            out = field.render(cam.viewmat[None].to(device), cam.K[None].to(device), cam.width, cam.height,
                               background=self.background.to(device), features=True, backend=self.backend)
            rgb = out["rgb"].permute(0, 3, 1, 2).clamp(0, 1)
            add("psnr", float(kornia_psnr(rgb, gt, 1.0)))
            add("ssim", float(kornia_ssim(rgb, gt, 11).mean()))
            teacher = self.cache.get(i)[None].to(device)  # [1, M, h, w]
            fmap = out["features"].permute(0, 3, 1, 2)
            student = field.decode(resize_features(fmap, teacher.shape[-2:]))
            add("feature_cosine", float(F.cosine_similarity(student, teacher, dim=1, eps=1e-8).mean()))
            add("feature_l1", float((student - teacher).abs().mean()))
            if self.text is None:
                continue
            text = self.text.to(device)
            s_p, resized = self._protocol_resize(student)
            t_p, _ = self._protocol_resize(teacher)
            s_lab, t_lab = label_map(s_p, text, self.merges)[0], label_map(t_p, text, self.merges)[0]
            if resized:
                s_lab, t_lab = s_lab[::3, ::3], t_lab[::3, ::3]
            acc, miou = segmentation_metrics(s_lab, t_lab, self.top_k)
            add("teacher_label_acc", acc)
            add("teacher_label_miou", miou)
            truth = self.scene.load_labels(i) if self.true_ids is not None else None
            if truth is not None:
                ids = torch.tensor(self.true_ids)
                full = field.decode(fmap)  # student labels at full image resolution
                s_true = ids[label_map(full, text)[0].cpu()]
                t_up = F.interpolate(t_lab[None, None].float(), size=truth.shape, mode="nearest")[0, 0].long()
                conf_student += true_label_confusion(s_true, truth, num_true)
                conf_teacher += true_label_confusion(ids[t_up.cpu()], truth, num_true)
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
                                        backend=self.backend)
        metrics["num_gaussians"] = float(field.num_gaussians)
        metrics["num_views"] = float(len(self.views))
        return metrics

    @torch.no_grad()
    def save_samples(self, field: GaussianField, path: Path, max_views: int = 3) -> Path:
        """Grid per held-out view: ground truth | render | teacher PCA | student PCA (teacher res) | student PCA."""
        views = self.views[:max_views]
        device = field.params["means"].device
        teachers = [self.cache.get(i) for i in views]
        pca = PCAColorizer.fit(torch.cat([t.flatten(1).T for t in teachers]))
        rows = []
        for i, t in zip(views, teachers, strict=True):
            cam = self.scene.cameras[i]
            H, W = cam.height, cam.width
            out = field.render(cam.viewmat[None].to(device), cam.K[None].to(device), W, H,
                               background=self.background.to(device), features=True, backend=self.backend)
            fmap = out["features"].permute(0, 3, 1, 2)
            low = field.decode(resize_features(fmap, t.shape[-2:]))

            def up(x: Tensor, size: tuple[int, int] = (H, W)) -> Tensor:
                return F.interpolate(x.permute(0, 3, 1, 2), size=size, mode="nearest").permute(0, 2, 3, 1)[0]

            tiles = [self.scene.load_image(i).permute(1, 2, 0), out["rgb"][0].clamp(0, 1).cpu(),
                     up(pca(t[None])), up(pca(low.cpu())), pca(field.decode(fmap).cpu())[0]]
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
