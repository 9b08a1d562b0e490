"""The Feature 3DGS distillation task: a Gaussian feature field trained against cached dense teacher features.

``forward`` renders RGB and features in one rasterizer call, resizes the feature map to the teacher's grid
(bilinear, ``align_corners=True``), decodes it (1x1 conv) and returns ``(1-λ)·L1 + λ·(1-SSIM) + γ·L_feat``.
Optimisation follows 3DGS: one Adam per Gaussian attribute (eps 1e-15; the means' lr scaled by the scene extent and
decayed exponentially), a separate Adam for the decoder, SH degree raised every ``sh_degree_interval`` steps, and
densification by :class:`vkd.render.strategy.DensifyStrategy` (gsplat's surgery, vkd's schedule) fed with
:func:`vkd.render.rasterization`'s ``meta``.

``model.init_ply`` starts from a trained 3DGS scene (:func:`load_init_ply`); ``train.freeze_geometry`` then trains
only the features and the decoder (:data:`FROZEN_KEYS` get neither gradients nor optimizers, and no densification).
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
from vkd.errors import ConfigError, DataError
from vkd.feature3dgs.config import Feature3DGSConfig
from vkd.feature3dgs.data import Scene
from vkd.feature3dgs.data.prepare import prepare_scene
from vkd.feature3dgs.evaluate import Evaluator
from vkd.feature3dgs.export import export_field
from vkd.feature3dgs.feature_cache import FeatureCache
from vkd.feature3dgs.losses import Feature3DGSLoss, resize_features
from vkd.feature3dgs.model import GaussianField
from vkd.feature3dgs.ply import read_gaussian_ply
from vkd.feature3dgs.teacher import RANDOM_INIT_WARNING, prepare_teacher, save_teacher_for_queries

__all__ = ["SceneDataset", "Feature3DGSTask", "Prepared", "build_field", "build_task", "distill", "load_init_ply",
           "count_gaussians_in_views", "centres_in_view", "FROZEN_KEYS"]

log = logging.getLogger(__name__)

# Parameters that train.freeze_geometry keeps fixed: everything but the features (and the decoder, not listed here).
FROZEN_KEYS = ("means", "scales", "quats", "opacities", "sh0", "shN")


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


def centres_in_view(means: Tensor, cam: Any) -> Tensor:
    """``[G]`` bool: which Gaussian centres project in front of camera ``cam`` and inside its image (pinhole ``K``,
    no distortion)."""
    xc = means.float() @ cam.viewmat[:3, :3].T + cam.viewmat[:3, 3]  # [G, 3] camera coordinates (OpenCV: +z forward)
    uvw = xc @ cam.K.T  # [G, 3]
    z = xc[:, 2]
    u, v = uvw[:, 0] / z.clamp_min(1e-6), uvw[:, 1] / z.clamp_min(1e-6)
    return (z > 1e-6) & (u >= 0) & (u < cam.width) & (v >= 0) & (v < cam.height)


def count_gaussians_in_views(means: Tensor, scene: Scene) -> int:
    """How many Gaussian centres project inside at least one of the scene's views (in front of the camera).

    A cheap sanity check of an imported scene's coordinate frame: only the centres are projected (pinhole ``K``,
    no distortion), one camera at a time, so it costs ``O(G·C)`` and ``[G]`` memory.

    Args:
        means: ``[G, 3]`` world positions.
        scene: the scene whose cameras are used (all of them, train and test).
    """
    seen = torch.zeros(means.shape[0], dtype=torch.bool)  # [G]
    for cam in scene.cameras:
        seen |= centres_in_view(means, cam)
    return int(seen.sum())


def load_init_ply(cfg: Feature3DGSConfig, scene: Scene) -> dict[str, Tensor] | None:
    """The Gaussians of ``model.init_ply`` (``None`` when it is not set), checked against the scene's cameras.

    Returns:
        ``means [G, 3]``, ``scales [G, 3]``, ``quats [G, 4]``, ``opacities [G]``, ``sh0 [G, 1, 3]``,
        ``shN [G, K-1, 3]`` as :func:`~vkd.feature3dgs.ply.read_gaussian_ply` reads them (its SH degree is that of
        ``shN``).

    Raises:
        DataError: the file is missing or not a 3DGS PLY, or none of its Gaussian centres projects into any view of
            the scene (the PLY belongs to another scene or coordinate frame).
    """
    path = cfg.model.init_ply
    if not path:
        return None
    if not Path(path).is_file():
        raise DataError(f"model.init_ply: file not found: {path}")
    arrays, degree = read_gaussian_ply(path)
    gaussians = {k: torch.from_numpy(v) for k, v in arrays.items()}
    num = gaussians["means"].shape[0]
    inside = count_gaussians_in_views(gaussians["means"], scene)
    if inside == 0:
        raise DataError(f"model.init_ply {path}: none of its {num} Gaussians projects into any of the scene's "
                        f"{len(scene.cameras)} views; the PLY and the scene ({scene.root}) do not match")
    if inside < num / 2:
        log.warning("model.init_ply %s: only %d of %d Gaussians project into any of the scene's %d views; is it "
                    "the same scene in the same coordinate frame?", path, inside, num, len(scene.cameras))
    if degree > cfg.model.sh_degree:  # loses view-dependent colour: say so loudly
        log.warning("model.init_ply %s: SH degree %d > model.sh_degree=%d: its bands above %d are dropped", path,
                    degree, cfg.model.sh_degree, cfg.model.sh_degree)
    elif degree < cfg.model.sh_degree:  # exact: the extra bands start at zero
        log.info("model.init_ply %s: SH degree %d < model.sh_degree=%d: the higher bands start at zero", path,
                 degree, cfg.model.sh_degree)
    log.info("model.init_ply: %d Gaussians of SH degree %d from %s (%d in the scene's views)", num, degree, path,
             inside)
    return gaussians


def build_field(cfg: Feature3DGSConfig, scene: Scene, teacher_dim: int,
                gaussians: dict[str, Tensor] | None = None) -> GaussianField:
    """Initialise the Gaussians from ``model.init_ply``, the scene's points (3DGS) or at random.

    Args:
        cfg, scene: the run's config and scene.
        teacher_dim: the teacher feature width M.
        gaussians: ``model.init_ply`` already read by :func:`load_init_ply` (read here when ``None``).
    """
    m = cfg.model
    if not m.decoder and m.render_dim != teacher_dim:
        raise ConfigError(f"model.render_dim={m.render_dim} must equal the teacher width {teacher_dim} when "
                          "model.decoder=false")
    # The 1x1 decoder takes its default init from the global RNG: seed it here, so that the initial field is a
    # function of run.seed alone (not of whatever the process drew before, e.g. generating the scene).
    if m.init_ply and gaussians is None:
        gaussians = load_init_ply(cfg, scene)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        return _init_field(cfg, scene, teacher_dim, gaussians)


def _init_field(cfg: Feature3DGSConfig, scene: Scene, teacher_dim: int,
                gaussians: dict[str, Tensor] | None) -> GaussianField:
    m = cfg.model
    if gaussians is not None:
        return GaussianField.from_gaussians(gaussians, m.render_dim, teacher_dim, m.sh_degree, m.decoder)
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
        self.freeze_geometry = cfg.train.freeze_geometry  # the config has switched densification off with it
        if self.freeze_geometry and lc.feature_weight == 0:
            raise ConfigError("train.freeze_geometry with loss.feature_weight=0 leaves nothing to train")
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
        """One Adam per Gaussian attribute and one for the decoder (3DGS's schedule for the means).

        With ``train.freeze_geometry`` the :data:`FROZEN_KEYS` parameters stop requiring gradients and get no
        optimizer: rather than an lr of 0, so that backward skips them, no Adam moments are allocated, and they stay
        bit-identical. (Done here, after any checkpoint has been loaded into the field.)
        """
        o, bs = self.cfg.optim, train_cfg.batch_size
        scale = math.sqrt(bs)  # gsplat's batch-size lr scaling
        lrs = {"means": o.means_lr * self.scene_extent, "scales": o.scales_lr, "quats": o.quats_lr,
               "opacities": o.opacities_lr, "sh0": o.sh0_lr, "shN": o.shN_lr, "features": o.features_lr}
        optimizers: dict[str, torch.optim.Optimizer] = {}
        for name, param in self.student.params.items():
            if self.freeze_geometry and name in FROZEN_KEYS:
                param.requires_grad_(False)
                continue
            optimizers[name] = torch.optim.Adam([{"params": [param], "lr": lrs[name] * scale, "name": name}],
                                                eps=1e-15 / scale, betas=(1 - bs * (1 - 0.9), 1 - bs * (1 - 0.999)))
        schedulers: dict[str, Any] = {}
        if self.student.decoder is not None:
            optimizers["decoder"] = torch.optim.Adam(self.student.decoder.parameters(), lr=o.decoder_lr)
        decay_steps = max(1, o.means_lr_decay_steps or train_cfg.steps)
        # 3DGS's expon_lr_func (no delay), held at the final lr afterwards
        if "means" in optimizers and o.means_lr > 0 and o.means_lr_final > 0:
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
    gaussians = load_init_ply(cfg, scene)  # before the teacher: a bad PLY fails before the feature cache is built
    teacher, info, cache = prepare_teacher(cfg, scene, progress=progress)
    teacher_dim = cache.shape[0]
    field = build_field(cfg, scene, teacher_dim, gaussians)
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
