"""The Feature 3DGS distillation task: a Gaussian feature field trained against cached dense teacher features.

``forward`` renders RGB and features in one rasterizer call, resizes the feature map to the teacher's grid
(bilinear, ``align_corners=True``), decodes it (1x1 conv) and returns ``(1-λ)·L1 + λ·(1-SSIM) + γ·L_feat``.
Optimisation follows 3DGS: one Adam per Gaussian attribute (eps 1e-15; the means' lr scaled by the scene extent and
decayed exponentially), a separate Adam for the decoder, SH degree raised every ``sh_degree_interval`` steps, and
densification by ``gsplat.strategy.DefaultStrategy`` fed with :func:`vkd.render.rasterization`'s ``meta``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from vkd.engine import torch_threads, train_task
from vkd.engine.task import DistillationTask
from vkd.errors import ConfigError
from vkd.feature3dgs.config import Feature3DGSConfig
from vkd.feature3dgs.data import Scene
from vkd.feature3dgs.data.prepare import prepare_scene
from vkd.feature3dgs.evaluate import Evaluator
from vkd.feature3dgs.export import export_field
from vkd.feature3dgs.feature_cache import FeatureCache
from vkd.feature3dgs.losses import Feature3DGSLoss, resize_features
from vkd.feature3dgs.model import GaussianField
from vkd.feature3dgs.teacher import RANDOM_INIT_WARNING, prepare_teacher, save_teacher_for_queries

__all__ = ["SceneDataset", "Feature3DGSTask", "Prepared", "build_field", "build_task", "distill"]

log = logging.getLogger(__name__)


class SceneDataset(Dataset):
    """Training views: image, cached teacher features and camera.

    Items: ``{"index": int, "image": [3, H, W], "features": [M, h, w], "viewmat": [4, 4], "K": [3, 3]}``.
    Teacher maps are read from the fp16 memory-mapped cache on access.
    """

    def __init__(self, scene: Scene, cache: FeatureCache, indices: list[int]):
        self.scene, self.cache, self.indices = scene, cache, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i = self.indices[k]
        cam = self.scene.cameras[i]
        return {"index": i, "image": self.scene.load_image(i), "features": self.cache.get(i),
                "viewmat": cam.viewmat, "K": cam.K}


# ----------------------------------------------------------------------------------------------------------------
# The initial field
# ----------------------------------------------------------------------------------------------------------------


def build_field(cfg: Feature3DGSConfig, scene: Scene, teacher_dim: int) -> GaussianField:
    """Initialise the Gaussians from the scene's points (3DGS) or at random."""
    m = cfg.model
    if not m.decoder and m.render_dim != teacher_dim:
        raise ConfigError(f"model.render_dim={m.render_dim} must equal the teacher width {teacher_dim} when "
                          "model.decoder=false")
    # The 1x1 decoder takes its default init from the global RNG: seed it here, so that the initial field is a
    # function of run.seed alone (not of whatever the process drew before, e.g. generating the scene).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        return _init_field(cfg, scene, teacher_dim)


def _init_field(cfg: Feature3DGSConfig, scene: Scene, teacher_dim: int) -> GaussianField:
    m = cfg.model
    gen = torch.Generator().manual_seed(cfg.run.seed)
    use_points = m.init == "points" or (m.init == "auto" and scene.points is not None)
    if use_points:
        pts, cols = scene.points, scene.point_colors
        if cfg.data.max_points and pts.shape[0] > cfg.data.max_points:
            keep = torch.randperm(pts.shape[0], generator=gen)[:cfg.data.max_points]
            pts, cols = pts[keep], (cols[keep] if cols is not None else None)
        return GaussianField.from_points(pts, cols, m.render_dim, teacher_dim, m.sh_degree, m.decoder,
                                         m.init_opacity, m.init_scale, generator=gen)
    center = scene.points.mean(0) if scene.points is not None else scene.center()
    half = scene.extent() / 2.2
    return GaussianField.random(m.num_random_points, center, half, m.render_dim, teacher_dim, m.sh_degree,
                                m.decoder, m.init_opacity, m.init_scale, generator=gen)


# ----------------------------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """Everything a run builds before training (also reused by eval and render)."""

    scene: Scene
    teacher: nn.Module
    teacher_info: dict
    cache: FeatureCache


def check_ranks_agree(params: nn.ParameterDict) -> None:
    """On several processes: stop if the ranks' Gaussians differ (count, or the sum of every parameter).

    Densification must apply the same refine on every rank (:class:`vkd.render.strategy.DensifyStrategy`); this
    cheap check after each refine turns a silent divergence into an error.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() == 1:
        return
    first = next(iter(params.values()))
    local = torch.stack([torch.tensor(float(first.shape[0]), dtype=torch.float64, device=first.device),
                         *[p.detach().double().sum() for p in params.values()]])  # [1 + P]
    lo, hi = local.clone(), local.clone()
    torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError(f"densification diverged across processes: Gaussian counts {lo[0]:.0f}..{hi[0]:.0f}, "
                           f"parameter sums differ by up to {float((hi - lo)[1:].abs().max()):.3g}")


class Feature3DGSTask(DistillationTask):
    """Gaussian feature field (student) distilled from cached teacher maps.

    Args:
        cfg: the task config.
        field: the initialised :class:`GaussianField`.
        scene_extent: 3DGS ``cameras_extent`` (scales the means' lr and the densification thresholds).
        evaluator: optional :class:`Evaluator` used by :meth:`evaluate`.
    """

    frozen_modules = ("teacher",)

    def __init__(self, cfg: Feature3DGSConfig, field: GaussianField, scene_extent: float,
                 evaluator: Evaluator | None = None,
                 background: tuple[float, float, float] = (0.0, 0.0, 0.0)):
        super().__init__()
        self.cfg = cfg
        self.student = field
        self.scene_extent = float(scene_extent)
        lc = cfg.loss
        self.loss_fn = Feature3DGSLoss(lc.ssim_lambda, lc.feature_weight, lc.feature_loss, lc.ssim_window)
        bg = cfg.model.background if cfg.model.background is not None else background
        self.register_buffer("background", torch.tensor(bg, dtype=torch.float32), persistent=False)
        self.strategy = None
        self.strategy_state: dict[str, Any] = {}
        if cfg.densify.enabled:
            from vkd.render.strategy import (
                DensifyStrategy,  # imported on use: gsplat's import probes CUDA (slow)
            )

            d = cfg.densify
            self.strategy = DensifyStrategy(prune_opa=d.prune_opa, grow_grad2d=d.grow_grad2d,
                                            grow_scale3d=d.grow_scale3d, prune_scale3d=d.prune_scale3d,
                                            refine_start_iter=d.refine_start, refine_stop_iter=d.refine_stop,
                                            reset_every=d.reset_every, refine_every=d.refine_every, seed=cfg.run.seed)
            self.strategy_state = self.strategy.initialize_state(scene_scale=self.scene_extent)
            self.manual_gradient_sync = True  # the Gaussians change in number: DDP cannot hold them
        self._meta: dict | None = None
        self.evaluator = evaluator  # plain attributes: not modules, not checkpointed

    # ---- training --------------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        images = batch["image"]  # [B, 3, H, W]
        target = batch["features"]  # [B, M, h, w]
        H, W = images.shape[-2:]
        out = self.student.render(batch["viewmat"], batch["K"], W, H, background=self.background, features=True,
                                  backend=self.cfg.model.backend, rasterize_mode=self.cfg.model.rasterize_mode)
        rgb = out["rgb"].permute(0, 3, 1, 2)
        feats = resize_features(out["features"].permute(0, 3, 1, 2), target.shape[-2:])
        feats = self.student.decode(feats)
        losses = self.loss_fn(rgb, images, feats, target)
        if self.training and self.strategy is not None and torch.is_grad_enabled():
            out["meta"]["means2d"].retain_grad()  # DefaultStrategy.step_pre_backward
            self._meta = out["meta"]
        losses["num_gaussians"] = torch.tensor(float(self.student.num_gaussians), device=images.device)
        return losses

    def configure_optimizers(self, train_cfg: Any) -> tuple[dict, dict]:
        o, bs = self.cfg.optim, train_cfg.batch_size
        scale = math.sqrt(bs)  # gsplat's batch-size lr scaling
        lrs = {"means": o.means_lr * self.scene_extent, "scales": o.scales_lr, "quats": o.quats_lr,
               "opacities": o.opacities_lr, "sh0": o.sh0_lr, "shN": o.shN_lr, "features": o.features_lr}
        optimizers: dict[str, torch.optim.Optimizer] = {}
        for name, param in self.student.params.items():
            optimizers[name] = torch.optim.Adam([{"params": [param], "lr": lrs[name] * scale, "name": name}],
                                                eps=1e-15 / scale, betas=(1 - bs * (1 - 0.9), 1 - bs * (1 - 0.999)))
        schedulers: dict[str, Any] = {}
        if self.student.decoder is not None:
            optimizers["decoder"] = torch.optim.Adam(self.student.decoder.parameters(), lr=o.decoder_lr)
        decay_steps = max(1, o.means_lr_decay_steps or train_cfg.steps)
        if o.means_lr > 0 and o.means_lr_final > 0:  # 3DGS's expon_lr_func (no delay), held at the final lr after
            gamma = (o.means_lr_final / o.means_lr) ** (1.0 / decay_steps)
            floor = o.means_lr_final / o.means_lr
            schedulers["means"] = torch.optim.lr_scheduler.LambdaLR(
                optimizers["means"], lambda step: max(gamma ** step, floor))
        return optimizers, schedulers

    def on_step_end(self, step: int, outputs: dict[str, Tensor], optimizers: dict[str, Any]) -> None:
        field = self.student
        if field.active_sh_degree < field.sh_degree and step % self.cfg.model.sh_degree_interval == 0:
            field.active_sh_degree += 1
        if self.strategy is None or self._meta is None or self._meta["means2d"].grad is None:
            self._meta = None
            return
        gaussian_opts = {k: optimizers[k] for k in field.params.keys()}
        cap = self.cfg.densify.max_gaussians
        saved = self.strategy.grow_grad2d
        if cap and field.num_gaussians >= cap:
            self.strategy.grow_grad2d = float("inf")  # at the cap: prune only, never grow
        n_before = field.num_gaussians
        try:
            self.strategy.step_post_backward(field.params, gaussian_opts, self.strategy_state, step - 1, self._meta,
                                             packed=False)
        finally:
            self.strategy.grow_grad2d = saved
            self._meta = None
        if field.num_gaussians != n_before:
            check_ranks_agree(field.params)

    # ---- evaluation / samples / export -----------------------------------------------------------------------
    def evaluate(self, step: int) -> dict[str, float]:
        if self.evaluator is None:
            return {}
        was = self.training
        self.eval()
        try:
            return self.evaluator.evaluate(self.student)
        finally:
            self.train(was)

    def save_samples(self, step: int, out_dir: Path) -> None:
        if self.evaluator is not None:
            self.evaluator.save_samples(self.student, Path(out_dir) / f"step_{step:06d}.png")

    def export(self, run_dir: Path) -> None:
        export_field(self.student, Path(run_dir) / "export", self.cfg)

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def load_checkpoint_state_dict(self, state: dict[str, Tensor]) -> None:
        self.student.resize_to(state, prefix="student.params.")
        super().load_checkpoint_state_dict(state)

    def extra_state_dict(self) -> dict[str, Any]:
        st = {k: v for k, v in self.strategy_state.items()}
        return {"active_sh_degree": self.student.active_sh_degree, "strategy_state": st}

    def load_extra_state_dict(self, state: dict[str, Any]) -> None:
        self.student.active_sh_degree = int(state.get("active_sh_degree", 0))
        if self.strategy is not None and state.get("strategy_state"):
            self.strategy_state.update(state["strategy_state"])


def build_task(cfg: Feature3DGSConfig, progress: bool = True, with_evaluator: bool = True
               ) -> tuple[Feature3DGSTask, SceneDataset, Prepared]:
    """Scene + teacher cache + field + task + dataset for ``cfg``."""
    scene = prepare_scene(cfg)
    teacher, info, cache = prepare_teacher(cfg, scene, progress=progress)
    teacher_dim = cache.shape[0]
    field = build_field(cfg, scene, teacher_dim)
    evaluator = None
    if with_evaluator:
        evaluator = Evaluator.build(cfg, scene, cache, teacher, info)
    task = Feature3DGSTask(cfg, field, scene.extent(), evaluator, scene.background)
    dataset = SceneDataset(scene, cache, scene.train_ids)
    if len({(scene.cameras[i].width, scene.cameras[i].height) for i in scene.train_ids}) > 1 and \
            cfg.train.batch_size > 1:
        raise ConfigError("train.batch_size > 1 needs training images of one size; set train.batch_size=1")
    log.info("feature3dgs: %d train / %d test views, %d Gaussians, teacher %s %s", len(scene.train_ids),
             len(scene.test_ids), field.num_gaussians, info.get("kind"), json.dumps(info.get("feature_shape")))
    return task, dataset, Prepared(scene, teacher, info, cache)


def distill(cfg: Feature3DGSConfig, resume: str | None = None) -> dict:
    """Build scene, teacher cache and Gaussian field, train with the shared engine, return the summary.

    The run directory gets the teacher's description (and tiny CLIP weights) under ``teacher/`` first, so that a
    run interrupted mid-training still answers text queries.

    The summary adds ``teacher`` (kind, model, whether it is randomly initialised), ``timings_s`` (scene, teacher,
    training) and, for a random teacher, a loud ``warning``.

    Examples:
        >>> from vkd.config import load_config
        >>> cfg = load_config(Feature3DGSConfig, "configs/feature3dgs/synthetic.yaml", ["train.steps=50"])
        >>> summary = distill(cfg)  # doctest: +SKIP
        >>> summary["num_gaussians"], summary["final"]["loss"]  # doctest: +SKIP
    """
    with torch_threads(cfg.compute.cpu_threads):  # restored afterwards: the setting is process-wide
        t0 = time.perf_counter()
        task, dataset, prep = build_task(cfg)
        t_prep = time.perf_counter() - t0
        run_dir = cfg.run_dir()
        run_dir.mkdir(parents=True, exist_ok=True)
        info = save_teacher_for_queries(prep.teacher_info, run_dir)
        if info.get("random_init"):
            log.warning(RANDOM_INIT_WARNING)
        t1 = time.perf_counter()
        summary = train_task(cfg, task, dataset, resume=resume)
        summary["teacher"] = {k: info.get(k) for k in ("kind", "model", "pretrained", "random_init", "feature_shape",
                                                       "tiny_clip_zero_shot")}
        summary["timings_s"] = {"scene_and_teacher": t_prep, "training": time.perf_counter() - t1}
        summary["num_gaussians"] = task.student.num_gaussians
        if info.get("random_init"):
            summary["warning"] = RANDOM_INIT_WARNING
            log.warning(RANDOM_INIT_WARNING)
        path = run_dir / "summary.json"
        if path.is_file():
            path.write_text(json.dumps(summary, indent=2, default=str))
        return summary
