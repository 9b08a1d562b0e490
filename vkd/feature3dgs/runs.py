"""Reopen a finished (or checkpointed) Feature 3DGS run for evaluation, rendering and queries."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vkd.config import load_config
from vkd.engine import latest_checkpoint, load_checkpoint_weights, load_training_state
from vkd.engine.runs import resolve_device
from vkd.errors import UserError
from vkd.feature3dgs.config import Feature3DGSConfig, cache_root
from vkd.feature3dgs.data import Scene
from vkd.feature3dgs.data.prepare import prepare_scene
from vkd.feature3dgs.feature_cache import FeatureCache
from vkd.feature3dgs.model import GaussianField
from vkd.feature3dgs.teacher import RANDOM_INIT_WARNING, build_teacher, load_text_encoder, prepare_teacher

__all__ = ["LoadedRun", "load_run", "field_from_state"]

log = logging.getLogger(__name__)


def field_from_state(state: dict[str, torch.Tensor], sh_degree: int, prefix: str = "student.") -> GaussianField:
    """Rebuild a :class:`GaussianField` of the right size from a task state dict."""
    key = prefix + "params.features"
    if key not in state:
        raise UserError("checkpoint holds no Feature 3DGS field (no student.params.features)")
    num, render_dim = state[key].shape
    dec = prefix + "decoder.weight"
    teacher_dim = int(state[dec].shape[0]) if dec in state else int(render_dim)
    f = GaussianField(int(num), int(render_dim), teacher_dim, sh_degree, decoder=dec in state)
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    f.resize_to(sub, prefix="params.")
    f.load_state_dict(sub, strict=True)
    return f.eval()


@dataclass
class LoadedRun:
    """A run's config, scene, teacher cache and trained field."""

    run_dir: Path
    cfg: Feature3DGSConfig
    scene: Scene
    field: GaussianField
    teacher_info: dict
    checkpoint: Path
    _cache: FeatureCache | None = None
    _teacher: nn.Module | None = field(default=None, repr=False)

    def cache(self) -> FeatureCache:
        """The teacher feature cache (recomputed when it was deleted)."""
        if self._cache is None:
            cache = FeatureCache(self.teacher_info.get("cache_dir", ""))
            if len(cache) != len(self.scene.cameras):
                self._teacher, info, cache = prepare_teacher(self.cfg, self.scene)
            self._cache = cache
        return self._cache

    def teacher(self) -> nn.Module:
        """The teacher (rebuilt on demand; tiny CLIP weights come from the run's cache)."""
        if self._teacher is None:
            self._teacher, _ = build_teacher(self.cfg.teacher, self.scene, cache_root(self.cfg))
        return self._teacher

    def text_encoder(self) -> Callable[[Sequence[str]], torch.Tensor]:
        """``prompts -> [K, M]`` of the run's teacher (raises UserError when it has no text tower)."""
        return load_text_encoder(self.run_dir, self.cfg.teacher)


def load_run(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> LoadedRun:
    """Load ``run_dir/config.yaml`` (+ overrides), the scene and the latest checkpoint's field.

    The field carries the run's render settings: ``model.rasterize_mode``, ``model.backend`` and the SH degree
    training reached (``model.sh_degree`` when the checkpoint does not record it).

    Raises:
        UserError: not a Feature 3DGS run directory, or no checkpoint.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = load_config(Feature3DGSConfig, run_dir / "config.yaml", list(overrides), task="feature3dgs")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise UserError(f"{run_dir} has no checkpoint yet")
    state = load_checkpoint_weights(ckpt)
    field = field_from_state(state, cfg.model.sh_degree)
    try:
        extra = load_training_state(ckpt).get("extra", {})
        active = int(extra.get("active_sh_degree", cfg.model.sh_degree))
    except (UserError, OSError, RuntimeError):
        active = cfg.model.sh_degree
    # Every later render (eval, samples, `vkd render`, queries) draws the field as it was trained.
    field.active_sh_degree = min(active, field.sh_degree)
    field.rasterize_mode, field.backend = cfg.model.rasterize_mode, cfg.model.backend
    info_path = run_dir / "teacher" / "teacher.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if info.get("random_init"):
        log.warning(RANDOM_INIT_WARNING)
    scene = prepare_scene(cfg)
    return LoadedRun(run_dir, cfg, scene, field.to(resolve_device(cfg.train.device)), info, ckpt)
