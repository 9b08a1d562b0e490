"""Dense 2D teachers of Feature 3DGS: the kinds table, the builders, and the per-run feature cache.

A teacher is a module ``images [B, 3, H, W] in [0, 1] -> features [B, D, h, w]`` with a ``key`` (its cache
identity); text-aligned ones also have ``encode_text(prompts) -> [K, D]``. ``teacher.kind`` picks a builder from
:data:`TEACHER_KINDS` (``auto``: ``tiny_clip`` for scenes with label maps, else ``maskclip``):

* ``maskclip`` — MaskCLIP on an open_clip ViT (:mod:`vkd.feature3dgs.maskclip`), weights from open_clip's
  ``pretrained=`` (local file or cache).
* ``tiny_clip`` — vkd's tiny CLIP pretrained on captioned crops of the scene's training views (offline default).
* ``callable`` — any ``"pkg.module:function"`` returning dense maps (any teacher's features).
* ``files`` — per-image feature files in ``teacher.features_dir`` (:mod:`vkd.feature3dgs.feature_files`), with an
  optional ``teacher.text_encoder`` (an open_clip text tower or ``"pkg.module:function"``).

:func:`prepare_teacher` computes each view's features once into an fp16 :class:`FeatureCache` (``files``: copies
them in); :func:`export_teacher_features` (``vkd features``) writes any teacher's maps as feature files.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vkd.engine import torch_threads
from vkd.engine.runs import resolve_device
from vkd.errors import DataError, UserError
from vkd.feature3dgs.config import Feature3DGSConfig, TeacherConfig, cache_root
from vkd.feature3dgs.data import Scene
from vkd.feature3dgs.data.prepare import prepare_scene
from vkd.feature3dgs.feature_cache import FeatureCache, scene_fingerprint
from vkd.feature3dgs.feature_files import FeatureFiles, export_cache
from vkd.feature3dgs.maskclip import MaskCLIPTeacher
from vkd.feature3dgs.query import PROMPT_TEMPLATE
from vkd.models.tiny_clip import load_clip, pretrain_tiny_clip, tiny_clip_name

__all__ = ["TEACHER_KINDS", "CallableTeacher", "synthetic_crops", "build_teacher", "prepare_teacher",
           "teacher_cache_dir", "save_teacher_for_queries", "load_text_encoder", "text_encoder_from_spec",
           "export_teacher_features", "RANDOM_INIT_WARNING"]

log = logging.getLogger(__name__)

RANDOM_INIT_WARNING = (
    "!!! WARNING: the CLIP teacher is RANDOMLY INITIALISED (teacher.allow_random_init=true): its features and text "
    "queries carry no semantics; metrics only measure how well the field copies a meaningless teacher !!!"
)


class CallableTeacher(nn.Module):
    """Wrap any ``images [B, 3, H, W] -> features [B, D, h, w]`` callable (optionally with ``encode_text``)."""

    def __init__(self, fn: Callable[[Tensor], Tensor], key: str = "callable"):
        super().__init__()
        self.fn = fn
        self._key = key
        self.text_aligned = callable(getattr(fn, "encode_text", None))
        self.random_init = False

    @property
    def key(self) -> str:
        return self._key

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        out = self.fn(images)
        if not isinstance(out, Tensor) or out.ndim != 4 or out.shape[0] != images.shape[0]:
            raise DataError(f"teacher callable {self._key} must return [B, D, h, w] for [B, 3, H, W] images, got "
                            f"{getattr(out, 'shape', type(out))}")
        return out.float()

    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        if not self.text_aligned:
            raise UserError(f"teacher {self._key} has no text encoder: text queries need a text-aligned teacher")
        return F.normalize(self.fn.encode_text(list(prompts)).float(), dim=-1)


def load_callable(target: str, option: str = "teacher.target") -> Callable:
    """Import ``"pkg.module:attr"`` (the value of config ``option``); raises UserError when it cannot be found."""
    module_name, _, attr = target.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise UserError(f"cannot import {option} '{target}': {err}") from None
    if not callable(obj):
        raise UserError(f"{option} '{target}' is not callable")
    return obj


def text_encoder_from_spec(spec: str, model: str | None, pretrained: str | None, dim: int | None = None
                           ) -> Callable[[Sequence[str]], Tensor]:
    """``teacher.text_encoder`` as ``prompts -> [K, D]``, L2-normalised.

    Args:
        spec: ``"open_clip"`` (the text tower of open_clip ``model`` / ``pretrained``, loaded on first use) or
            ``"pkg.module:function"`` (prompts -> ``[K, D]`` tensor or array).
        dim: the feature width D the embeddings must have (``None``: not checked).

    Raises:
        UserError: the callable cannot be imported or the open_clip weights cannot be loaded.
        DataError: the encoder returns something other than ``[K, D]`` for K prompts.
    """
    if spec == "open_clip":
        bundle = functools.cache(lambda: load_clip(model, pretrained))
        where = f"open_clip {model} / {pretrained}"

        def raw(prompts: list[str]) -> Tensor:
            return bundle().encode_text(prompts, normalize=True)
    else:
        raw, where = load_callable(spec, "teacher.text_encoder"), spec

    def encode(prompts: Sequence[str]) -> Tensor:
        with torch.no_grad():
            out = raw(list(prompts))
        out = torch.as_tensor(out).float().cpu()  # [K, D]
        if out.ndim != 2 or out.shape[0] != len(prompts):
            raise DataError(f"teacher.text_encoder {where} must return [K, D] for K={len(prompts)} prompts, got "
                            f"{tuple(out.shape)}")
        if dim is not None and out.shape[1] != dim:
            raise DataError(f"teacher.text_encoder {where} gives {out.shape[1]}-d embeddings but the features are "
                            f"{dim}-d")
        return F.normalize(out, dim=-1)

    return encode


def _caption(name: str) -> str:
    return PROMPT_TEMPLATE.format(name)  # eval.prompt_template=auto labels with the same template


def synthetic_crops(scene: Scene, crops_per_view: int, size: int, seed: int = 0, min_frac: float = 0.12,
                    max_frac: float = 0.6) -> tuple[Tensor, list[str]]:
    """Random square crops of the training views, captioned with the name of their dominant label.

    The dominant label is the one with the largest centre-weighted pixel count (Gaussian weight, sigma = side/4),
    so small crops name what is in their middle. Background (id 0) never names a crop.

    Returns:
        crops ``[N, 3, size, size]`` in [0, 1], N captions.
    """
    if not scene.label_names:
        raise DataError("tiny CLIP pretraining needs a scene with per-pixel label maps (the synthetic scene)")
    gen = torch.Generator().manual_seed(seed)
    crops, captions = [], []
    num_labels = len(scene.label_names)
    for i in scene.train_ids:
        img = scene.load_image(i)
        labels = scene.load_labels(i)
        if labels is None:
            raise DataError(f"training view {scene.cameras[i].name} has no label map")
        H, W = labels.shape
        for _ in range(crops_per_view):
            frac = min_frac + (max_frac - min_frac) * torch.rand((), generator=gen).item()
            side = max(4, int(round(frac * min(H, W))))
            y0 = int(torch.randint(0, H - side + 1, (), generator=gen))
            x0 = int(torch.randint(0, W - side + 1, (), generator=gen))
            lab = labels[y0:y0 + side, x0:x0 + side]
            r = torch.arange(side, dtype=torch.float32) - (side - 1) / 2
            wgt = torch.exp(-(r[:, None] ** 2 + r[None] ** 2) / (2 * (side / 4) ** 2))
            score = torch.zeros(num_labels).index_add_(0, lab.flatten(), wgt.flatten())
            score[0] = 0
            if score.max() <= 0:
                continue
            crop = img[:, y0:y0 + side, x0:x0 + side][None]
            crops.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False,
                                       antialias=side > size)[0])
            captions.append(_caption(scene.label_names[int(score.argmax())]))
    if len(crops) < 2:
        raise DataError("the synthetic scene produced too few labelled crops for tiny CLIP pretraining")
    return torch.stack(crops).clamp(0, 1), captions


def _random_clip(model_name: str, seed: int = 0):
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # random text/image towers must be identical when rebuilt for queries
    try:
        return load_clip(model_name, None)
    finally:
        torch.random.set_rng_state(state)


# ----------------------------------------------------------------------------------------------------------------
# Teacher kinds: teacher.kind -> builder(teacher config, scene, cache root, progress) -> (teacher, info)
# ----------------------------------------------------------------------------------------------------------------


def _build_callable(tcfg: TeacherConfig, scene: Scene, cache_dir: Path, progress: bool) -> tuple[nn.Module, dict]:
    teacher = CallableTeacher(load_callable(tcfg.target), key=f"callable:{tcfg.target}")
    return teacher, {"target": tcfg.target, "text_aligned": teacher.text_aligned}


def _build_tiny_clip(tcfg: TeacherConfig, scene: Scene, cache_dir: Path, progress: bool) -> tuple[nn.Module, dict]:
    t = tcfg.tiny
    clip_cfg = t.clip_config()
    crops, captions = synthetic_crops(scene, t.crops_per_view, t.image_size, seed=t.seed)
    path = pretrain_tiny_clip(crops, captions, clip_cfg, cache_dir=cache_dir, progress=progress)
    bundle = load_clip(tiny_clip_name(path))
    stats = json.loads((Path(path) / "vkd_tiny_clip.json").read_text())
    dense = tcfg.dense if tcfg.dense != "auto" else ("tokens" if t.pool_type == "avg" else "maskclip")
    info = {"model": "tiny_clip", "pretrained": None, "tiny_clip_dir": str(path), "num_crops": len(captions),
            "tiny_clip_zero_shot": stats.get("train_zero_shot_accuracy"), "dense": dense}
    return MaskCLIPTeacher(bundle, tcfg.input_size, dense=dense), info


def _build_maskclip(tcfg: TeacherConfig, scene: Scene, cache_dir: Path, progress: bool) -> tuple[nn.Module, dict]:
    info: dict[str, Any] = {"random_init": False}
    try:
        bundle = load_clip(tcfg.model, tcfg.pretrained)
    except UserError as err:
        if not tcfg.allow_random_init:
            raise UserError(f"{err}. Pre-download the weights, or set teacher.allow_random_init=true to run with a "
                            "randomly initialised CLIP (meaningless features)") from None
        log.warning(RANDOM_INIT_WARNING)
        bundle = _random_clip(tcfg.model)
        info.update(random_init=True, warning=RANDOM_INIT_WARNING)
    dense = "maskclip" if tcfg.dense == "auto" else tcfg.dense
    info.update(model=tcfg.model, pretrained=None if info["random_init"] else tcfg.pretrained, dense=dense)
    return MaskCLIPTeacher(bundle, tcfg.input_size, random_init=info["random_init"], dense=dense), info


def _build_files(tcfg: TeacherConfig, scene: Scene, cache_dir: Path, progress: bool) -> tuple[nn.Module, dict]:
    files = FeatureFiles(tcfg.features_dir, [c.name for c in scene.cameras],
                         [(c.height, c.width) for c in scene.cameras], tcfg.features_layout, tcfg.features_key)
    info: dict[str, Any] = {"features_dir": str(files.features_dir.resolve()), "features_layout": files.layout,
                            "features_key": tcfg.features_key or None, "text_encoder": tcfg.text_encoder or None,
                            "text_aligned": bool(tcfg.text_encoder)}
    if tcfg.text_encoder:
        files.text_encoder = text_encoder_from_spec(tcfg.text_encoder, tcfg.model, tcfg.pretrained, files.dim)
        if tcfg.text_encoder == "open_clip":
            info.update(model=tcfg.model, pretrained=tcfg.pretrained)
    return files, info


TeacherBuilder = Callable[[TeacherConfig, Scene, Path, bool], tuple[nn.Module, dict]]
# teacher.kind -> builder; "auto" resolves to tiny_clip (scenes with label maps) or maskclip.
TEACHER_KINDS: dict[str, TeacherBuilder] = {
    "maskclip": _build_maskclip,
    "tiny_clip": _build_tiny_clip,
    "callable": _build_callable,
    "files": _build_files,
}


def build_teacher(tcfg: TeacherConfig, scene: Scene, cache_root: str | Path, progress: bool = True
                  ) -> tuple[nn.Module, dict]:
    """Build the configured teacher.

    Args:
        tcfg: the ``teacher`` section of the config.
        scene: the loaded scene (its training views pretrain the tiny CLIP).
        cache_root: where tiny-CLIP weights are cached.

    Returns:
        (teacher module, info dict: kind, model, pretrained, random_init, text_aligned, tiny_clip_dir, warning).

    Raises:
        UserError: an unknown kind, missing weights (without ``allow_random_init``), or a bad callable target.
    """
    kind = tcfg.kind
    if kind == "auto":
        kind = "tiny_clip" if scene.label_names else "maskclip"
    if kind not in TEACHER_KINDS:
        raise UserError(f"unknown teacher.kind {kind!r}; use auto or one of: {', '.join(TEACHER_KINDS)}")
    teacher, extra = TEACHER_KINDS[kind](tcfg, scene, Path(cache_root), progress)
    return teacher, {"kind": kind, "random_init": False, "text_aligned": True, **extra}


def teacher_cache_dir(cfg: Feature3DGSConfig, scene: Scene, teacher_key: str) -> Path:
    """``teacher.cache_dir``, or a folder under the config's cache root named by the scene and teacher identity."""
    if cfg.teacher.cache_dir:
        return Path(cfg.teacher.cache_dir)
    h = hashlib.sha1(f"{scene_fingerprint(scene)}|{teacher_key}".encode()).hexdigest()[:12]
    return cache_root(cfg) / "teacher" / h


def teacher_device(cfg: Feature3DGSConfig) -> torch.device:
    """Where the teacher runs: ``teacher.device``, ``auto`` = the training device (``train.device``), on CUDA this
    process's GPU (``LOCAL_RANK`` under torchrun / accelerate)."""
    name = cfg.teacher.device if cfg.teacher.device != "auto" else cfg.train.device
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def prepare_teacher(cfg: Feature3DGSConfig, scene: Scene, progress: bool = True
                    ) -> tuple[nn.Module, dict, FeatureCache]:
    """Build the teacher and fill the fp16 feature cache for every view.

    Returns:
        (teacher module, teacher info, cache).
    """
    teacher, info = build_teacher(cfg.teacher, scene, cache_root(cfg), progress=progress)
    key = teacher.key
    if info.get("tiny_clip_dir"):
        key += ":" + Path(info["tiny_clip_dir"]).name
    cache = FeatureCache(teacher_cache_dir(cfg, scene, key))
    expected = {"teacher": key, "scene": str(scene.root.resolve()), "fingerprint": scene_fingerprint(scene),
                "num_images": len(scene.cameras), "random_init": bool(info.get("random_init"))}
    stored = getattr(teacher, "stored_maps", None)
    if stored is not None:  # kind=files: the maps exist already, nothing runs on a device
        cache.fill(stored(), [c.name for c in scene.cameras], expected, progress=progress)
    elif not cache.is_complete(expected):
        device = teacher_device(cfg)
        teacher.to(device)
        try:
            cache.build(teacher, scene.load_image, [c.name for c in scene.cameras], expected,
                        batch_size=cfg.teacher.batch_size, device=device, progress=progress)
        finally:
            teacher.to("cpu")  # training reads the cache: the GPU is the field's
        info["cache_device"] = str(device)
    info["cache_dir"] = str(cache.root)
    info["feature_shape"] = list(cache.shape)
    return teacher, info, cache


def save_teacher_for_queries(info: dict, run_dir: Path) -> dict:
    """Copy what a run needs to rebuild its text encoder (tiny CLIP weights) into ``run_dir/teacher``."""
    out = dict(info)
    if info.get("tiny_clip_dir"):
        dst = run_dir / "teacher" / "tiny_clip"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(info["tiny_clip_dir"], dst)
        out["tiny_clip_dir"] = str(Path("teacher") / "tiny_clip")
    (run_dir / "teacher").mkdir(parents=True, exist_ok=True)
    (run_dir / "teacher" / "teacher.json").write_text(json.dumps(out, indent=1))
    return out


def load_text_encoder(run_dir: Path, tcfg: TeacherConfig) -> Callable[[Sequence[str]], Tensor]:
    """Rebuild a run's text encoder ``prompts -> [K, E]`` (L2-normalised).

    Raises:
        UserError: the run's teacher has no text tower (a plain callable), or its weights cannot be loaded.
    """
    path = run_dir / "teacher" / "teacher.json"
    if not path.is_file():
        raise UserError(f"{run_dir} has no teacher/teacher.json; was it trained by vkd distill feature3dgs?")
    info = json.loads(path.read_text())
    kind = info.get("kind")
    if not info.get("text_aligned", True):
        raise UserError(f"the run {run_dir} was distilled from a teacher without a text encoder "
                        f"({info.get('target') or kind}): text queries need text-aligned (CLIP) features")
    if kind == "files":
        dim = (info.get("feature_shape") or [None])[0]
        return text_encoder_from_spec(info["text_encoder"], info.get("model"), info.get("pretrained"), dim)
    if kind == "callable":
        fn = load_callable(info["target"])
        teacher = CallableTeacher(fn, key=info["target"])
        if not teacher.text_aligned:
            raise UserError(f"the run {run_dir} was distilled from '{info['target']}', which has no text encoder: "
                            "text queries need text-aligned (CLIP) features")
        return teacher.encode_text
    if kind == "tiny_clip":
        bundle = load_clip(tiny_clip_name(run_dir / info["tiny_clip_dir"]))
    elif info.get("random_init"):
        log.warning(RANDOM_INIT_WARNING)
        bundle = _random_clip(info["model"])
    else:
        bundle = load_clip(info["model"], info.get("pretrained"))
    return lambda prompts: bundle.encode_text(list(prompts), normalize=True).float()


def export_teacher_features(cfg: Feature3DGSConfig, out: str | Path, progress: bool = True) -> dict:
    """``vkd features``: the configured teacher's maps of every image of ``data.path`` as feature files.

    The teacher fills its feature cache as for training (reused when complete); the cache is then copied to
    ``<out>/<image stem>.npy`` (``[D, h, w]`` float16) plus ``features.json``
    (:func:`vkd.feature3dgs.feature_files.export_cache`), so ``teacher.kind=files`` reads back the same cache.

    Returns:
        a summary: out, num_images, dim, size, layout, dtype, teacher (+ warning for a random CLIP).

    Examples:
        >>> from vkd.config import load_config
        >>> cfg = load_config(Feature3DGSConfig, None, ["data.path=/data/garden", "teacher.kind=maskclip"])
        >>> export_teacher_features(cfg, "/data/garden/features")["dim"]  # doctest: +SKIP
        512
    """
    with torch_threads(cfg.compute.cpu_threads):  # restored afterwards: the setting is process-wide
        scene = prepare_scene(cfg)
        _, info, cache = prepare_teacher(cfg, scene, progress=progress)
        meta = export_cache(cache, [c.name for c in scene.cameras], info, out)
    summary = {"out": str(out), "num_images": meta["num_images"], "dim": meta["dim"], "size": meta["size"],
               "layout": meta["layout"], "dtype": meta["dtype"], "teacher": info["kind"]}
    if info.get("warning"):
        summary["warning"] = info["warning"]
    return summary
