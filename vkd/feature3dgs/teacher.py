"""Dense 2D teacher features: MaskCLIP on open_clip ViTs, any plugged-in callable, and an fp16 on-disk cache.

MaskCLIP (spec §8.1) turns a CLIP ViT into a dense, text-aligned feature extractor: run every block but the last
unchanged, then take only the last block's *value* path (``ln_1`` -> value projection -> ``out_proj``; no q·k
attention, no residual, no MLP), drop the CLS token, apply ``ln_post`` per token and ``proj``. Positional embeddings
are interpolated bicubically to the input's patch grid, so any image size (multiple of the patch) works.

Teachers are callables ``images [B, 3, H, W] in [0, 1] -> features [B, D, h, w]``; text-aligned ones also have
``encode_text(prompts) -> [K, D]``. Features are computed once per image and cached as fp16 ``.npy`` files read
through ``np.load(mmap_mode="r")``, so a scene's maps are never all held in RAM.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from vkd.cache import atomic_write_text, build_lock, tmp_path
from vkd.errors import DataError, UserError

__all__ = [
    "interpolate_pos_embed",
    "maskclip_dense_features",
    "token_dense_features",
    "MaskCLIPTeacher",
    "CallableTeacher",
    "FeatureCache",
    "synthetic_crops",
    "build_teacher",
    "RANDOM_INIT_WARNING",
]

log = logging.getLogger(__name__)

RANDOM_INIT_WARNING = (
    "!!! WARNING: the CLIP teacher is RANDOMLY INITIALISED (teacher.allow_random_init=true): its features and text "
    "queries carry no semantics; metrics only measure how well the field copies a meaningless teacher !!!"
)


# ----------------------------------------------------------------------------------------------------------------
# MaskCLIP
# ----------------------------------------------------------------------------------------------------------------


def interpolate_pos_embed(pos_embed: Tensor, grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """Resize a ViT positional embedding to another patch grid.

    Args:
        pos_embed: ``[1 + g0h * g0w, d]`` (CLS row first).
        grid: the native grid ``(g0h, g0w)``.
        new_grid: the target grid ``(gh, gw)``.

    Returns:
        ``[1 + gh * gw, d]``: the CLS row unchanged, the patch rows resized bicubically (``align_corners=False``).
    """
    if pos_embed.ndim != 2 or pos_embed.shape[0] != 1 + grid[0] * grid[1]:
        raise ValueError(f"pos_embed must be [1 + {grid[0]}*{grid[1]}, d], got {tuple(pos_embed.shape)}")
    if tuple(new_grid) == tuple(grid):
        return pos_embed
    cls, patches = pos_embed[:1], pos_embed[1:]
    d = patches.shape[-1]
    patches = patches.reshape(1, grid[0], grid[1], d).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=tuple(new_grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], d).to(pos_embed.dtype)
    return torch.cat([cls, patches], 0)


def _check_maskclip_visual(visual: nn.Module) -> None:
    if not all(hasattr(visual, a) for a in ("conv1", "class_embedding", "positional_embedding", "transformer",
                                            "ln_post", "proj")):
        raise UserError(f"MaskCLIP needs an open_clip VisionTransformer image tower, got {type(visual).__name__} "
                        "(ResNet/ConvNeXt/timm towers are not supported)")
    if getattr(visual, "attn_pool", None) is not None:
        raise UserError("MaskCLIP does not support ViTs with attentional pooling (e.g. CoCa)")
    if visual.proj is None:
        raise UserError("MaskCLIP needs a ViT with an output projection (visual.proj)")


def _value_path(block: nn.Module, x: Tensor) -> Tensor:
    """Last block's value path: ``ls_1(out_proj(v(ln_1(x))))`` with no attention mixing and no residual."""
    y = block.ln_1(x)
    attn = block.attn
    d = y.shape[-1]
    if isinstance(attn, nn.MultiheadAttention):
        if attn._qkv_same_embed_dim:
            w_v = attn.in_proj_weight[2 * d:]
        else:
            w_v = attn.v_proj_weight
        b_v = attn.in_proj_bias[2 * d:] if attn.in_proj_bias is not None else None
        z = attn.out_proj(F.linear(y, w_v, b_v))
    elif hasattr(attn, "in_proj_weight") and hasattr(attn, "out_proj"):  # open_clip's custom Attention
        b = attn.in_proj_bias[2 * d:] if attn.in_proj_bias is not None else None
        v = F.linear(y, attn.in_proj_weight[2 * d:], b)
        if getattr(attn, "head_scale", None) is not None:
            n, length, _ = v.shape
            v = (v.reshape(n, length, attn.num_heads, -1).transpose(1, 2) * attn.head_scale)
            v = v.transpose(1, 2).reshape(n, length, d)
        z = attn.out_proj(attn.ln_inner(v) if hasattr(attn, "ln_inner") else v)
        if hasattr(block, "ln_attn"):
            z = block.ln_attn(z)
    else:
        raise UserError(f"MaskCLIP: unsupported attention module {type(attn).__name__}")
    return block.ls_1(z)


def _embed_tokens(visual: nn.Module, pixels: Tensor) -> tuple[Tensor, int, int]:
    """Patch embedding + CLS + interpolated positional embedding + ``ln_pre``: ``[B, 1 + gh*gw, d]``."""
    _check_maskclip_visual(visual)
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be [B, 3, H, W], got {tuple(pixels.shape)}")
    ph, pw = visual.conv1.kernel_size
    if pixels.shape[-2] % ph or pixels.shape[-1] % pw:
        raise ValueError(f"pixels H, W must be multiples of the patch size {ph}x{pw}, got {tuple(pixels.shape[-2:])}")
    B = pixels.shape[0]
    x = visual.conv1(pixels.to(visual.conv1.weight.dtype))  # [B, d, gh, gw]
    gh, gw = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)  # [B, gh*gw, d]
    cls = visual.class_embedding.to(x.dtype).reshape(1, 1, -1).expand(B, 1, -1)
    x = torch.cat([cls, x], 1)
    if hasattr(visual, "grid_size"):
        grid = tuple(visual.grid_size)
    else:
        g = int(round((visual.positional_embedding.shape[0] - 1) ** 0.5))
        grid = (g, g)
    x = x + interpolate_pos_embed(visual.positional_embedding, grid, (gh, gw)).to(x.dtype)
    x = visual.patch_dropout(x) if hasattr(visual, "patch_dropout") else x
    return visual.ln_pre(x), gh, gw


def _run_blocks(visual: nn.Module, x: Tensor, blocks: Any) -> Tensor:
    batch_first = getattr(visual.transformer, "batch_first", True)
    if not batch_first:
        x = x.transpose(0, 1)
    for block in blocks:
        x = block(x)
    return x.transpose(0, 1) if not batch_first else x


def _project(visual: nn.Module, z: Tensor, gh: int, gw: int, normalize: bool) -> Tensor:
    z = visual.ln_post(z) @ visual.proj  # [B, gh*gw, E]
    if normalize:
        z = F.normalize(z, dim=-1)
    return z.transpose(1, 2).reshape(z.shape[0], -1, gh, gw)


def maskclip_dense_features(visual: nn.Module, pixels: Tensor, normalize: bool = True) -> Tensor:
    """MaskCLIP dense features of an open_clip ``VisionTransformer`` (spec §8.1).

    Args:
        visual: ``clip.visual`` (an open_clip ViT).
        pixels: ``[B, 3, H, W]`` images already normalised with the model's mean/std; H and W multiples of the
            patch size.
        normalize: L2-normalise each patch feature.

    Returns:
        ``[B, E, H/p, W/p]`` features in CLIP's joint (text-aligned) space.
    """
    x, gh, gw = _embed_tokens(visual, pixels)
    blocks = visual.transformer.resblocks
    x = _run_blocks(visual, x, blocks[:-1])
    z = _value_path(blocks[-1], x)[:, 1:]  # last block: value path only; drop CLS
    return _project(visual, z, gh, gw, normalize)


def token_dense_features(visual: nn.Module, pixels: Tensor, normalize: bool = True) -> Tensor:
    """Dense features from the full final patch tokens (every block unchanged, then ``ln_post`` and ``proj``).

    Only text-aligned for CLIPs whose global embedding is the mean of the patch tokens (open_clip
    ``pool_type="avg"``, as vkd's tiny CLIP is pretrained); CLS-pooled CLIPs need :func:`maskclip_dense_features`.

    Args / Returns: as :func:`maskclip_dense_features`.
    """
    x, gh, gw = _embed_tokens(visual, pixels)
    x = _run_blocks(visual, x, visual.transformer.resblocks)
    return _project(visual, x[:, 1:], gh, gw, normalize)


class MaskCLIPTeacher(nn.Module):
    """Dense CLIP teacher: MaskCLIP (or final-token) features of an open_clip ViT plus its text tower.

    Args:
        bundle: a :class:`vkd.models.tiny_clip.ClipBundle` (model, tokenizer, mean/std).
        input_size: the image's short side is resized to this (then H, W rounded to multiples of the patch).
        random_init: the weights are random (recorded; text queries are then meaningless).
        dense: ``"maskclip"`` (value path of the last block) or ``"tokens"`` (full final tokens; avg-pooled CLIPs).
    """

    text_aligned = True

    def __init__(self, bundle: Any, input_size: int = 224, random_init: bool = False, dense: str = "maskclip"):
        super().__init__()
        if dense not in ("maskclip", "tokens"):
            raise ValueError(f"dense must be 'maskclip' or 'tokens', got {dense!r}")
        self.dense = dense
        _check_maskclip_visual(bundle.model.visual)
        self.clip = bundle.model.eval()
        self.bundle = bundle
        self.input_size = int(input_size)
        self.random_init = random_init
        self.patch = tuple(self.clip.visual.conv1.kernel_size)
        self.register_buffer("mean", torch.tensor(bundle.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(bundle.std).view(1, 3, 1, 1), persistent=False)
        for p in self.clip.parameters():
            p.requires_grad_(False)

    @property
    def key(self) -> str:
        return f"{self.dense}:{self.bundle.model_name}:{self.bundle.pretrained}:{self.input_size}"

    @property
    def dim(self) -> int:
        return int(self.clip.visual.proj.shape[1])

    def input_hw(self, height: int, width: int) -> tuple[int, int]:
        """Teacher input size for an image: short side ``input_size``, both sides multiples of the patch."""
        s = self.input_size / min(height, width)
        ph, pw = self.patch
        return max(ph, int(round(height * s / ph)) * ph), max(pw, int(round(width * s / pw)) * pw)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> L2-normalised ``[B, E, h, w]``."""
        h, w = self.input_hw(images.shape[-2], images.shape[-1])
        x = images.float()
        if (h, w) != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False,
                              antialias=h < x.shape[-2])
        x = (x - self.mean) / self.std
        fn = maskclip_dense_features if self.dense == "maskclip" else token_dense_features
        return fn(self.clip.visual, x).float()

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """``[K, E]`` L2-normalised text embeddings of the same model."""
        return self.bundle.encode_text(list(prompts), normalize=True).float()


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


def load_callable(target: str) -> Callable:
    """Import ``"pkg.module:attr"``; raises UserError when it cannot be found."""
    module_name, _, attr = target.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise UserError(f"cannot import teacher.target '{target}': {err}") from None
    if not callable(obj):
        raise UserError(f"teacher.target '{target}' is not callable")
    return obj


# ----------------------------------------------------------------------------------------------------------------
# fp16 memory-mapped cache
# ----------------------------------------------------------------------------------------------------------------


class FeatureCache:
    """One fp16 ``[C, h, w]`` ``.npy`` file per image plus ``manifest.json``; reads are memory-mapped.

    Args:
        root: cache directory.
    """

    VERSION = 1

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest: dict = self._read_manifest()

    def _read_manifest(self) -> dict:
        try:
            return json.loads((self.root / "manifest.json").read_text())
        except (OSError, ValueError):  # absent or torn: the cache is incomplete
            return {}

    def file(self, index: int) -> Path:
        return self.root / self.manifest["files"][index]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["shape"])  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.manifest.get("files", []))

    def get(self, index: int) -> Tensor:
        """Features of image ``index`` as float32 ``[C, h, w]`` (only this file is read)."""
        arr = np.load(self.file(index), mmap_mode="r")
        return torch.from_numpy(np.asarray(arr, dtype=np.float32))

    def is_complete(self, expected: dict) -> bool:
        m = self.manifest
        if not m or m.get("version") != self.VERSION or m.get("complete") is not True:
            return False
        if any(m.get(k) != v for k, v in expected.items()):
            return False
        return all((self.root / f).is_file() for f in m["files"])

    @torch.no_grad()
    def build(self, teacher: Callable[[Tensor], Tensor], load_image: Callable[[int], Tensor], names: list[str],
              expected: dict, batch_size: int = 4, device: str | torch.device = "cpu", progress: bool = True) -> None:
        """Compute and write the features of every image (skips the work when the cache is already complete).

        Args:
            teacher: ``[B, 3, H, W] -> [B, C, h, w]``.
            load_image: ``index -> [3, H, W]`` in [0, 1].
            names: image names (one per index; they name the files).
            expected: identity of the cache (teacher key, scene, sizes); stored in the manifest.
        """
        if self.is_complete(expected):
            return
        with build_lock(self.root):  # a concurrent process may have filled it while this one waited
            self.manifest = self._read_manifest()
            if not self.is_complete(expected):
                self._build(teacher, load_image, names, expected, batch_size, device, progress)

    @torch.no_grad()
    def _build(self, teacher: Callable[[Tensor], Tensor], load_image: Callable[[int], Tensor], names: list[str],
               expected: dict, batch_size: int, device: str | torch.device, progress: bool) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        files = [f"{i:05d}_{_safe_stem(n)}.npy" for i, n in enumerate(names)]
        shape = None
        order = list(range(len(names)))
        bar = tqdm(total=len(order), desc="teacher features", disable=not progress or None, leave=False)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            imgs = [load_image(i) for i in chunk]
            groups: dict[tuple[int, int], list[int]] = {}
            for j, img in enumerate(imgs):
                groups.setdefault(tuple(img.shape[-2:]), []).append(j)
            for members in groups.values():
                batch = torch.stack([imgs[j] for j in members]).to(device)
                feats = teacher(batch).float().cpu()
                if not torch.isfinite(feats).all():
                    raise DataError("teacher produced non-finite features")
                for j, f in zip(members, feats, strict=True):
                    if shape is None:
                        shape = tuple(f.shape)
                    elif f.shape[0] != shape[0]:
                        raise DataError(f"teacher feature width changed between images: {shape} vs {tuple(f.shape)}")
                    tmp = tmp_path(self.root / files[chunk[j]])
                    np.save(tmp, f.numpy().astype(np.float16))
                    os.replace(tmp, self.root / files[chunk[j]])
            bar.update(len(chunk))
        bar.close()
        self.manifest = {"version": self.VERSION, **expected, "files": files, "shape": list(shape or ()),
                         "dtype": "float16", "complete": True}
        atomic_write_text(self.root / "manifest.json", json.dumps(self.manifest, indent=1))


def _safe_stem(name: str) -> str:
    stem = Path(name).with_suffix("").as_posix().replace("/", "_")
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:80]


def scene_fingerprint(scene: Any) -> str:
    """Hash of the scene's images (path, size, mtime) and camera sizes: cache identity."""
    h = hashlib.sha1()
    for cam in scene.cameras:
        try:
            st = cam.image_path.stat()
            h.update(f"{cam.image_path.resolve()}|{st.st_size}|{int(st.st_mtime)}|{cam.width}x{cam.height}".encode())
        except OSError:
            h.update(str(cam.image_path).encode())
    return h.hexdigest()[:12]


# ----------------------------------------------------------------------------------------------------------------
# Teacher construction
# ----------------------------------------------------------------------------------------------------------------


def _caption(name: str) -> str:
    return f"a photo of the {name}."


def synthetic_crops(scene: Any, crops_per_view: int, size: int, seed: int = 0, min_frac: float = 0.12,
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
    from vkd.models.tiny_clip import load_clip

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # random text/image towers must be identical when rebuilt for queries
    try:
        return load_clip(model_name, None)
    finally:
        torch.random.set_rng_state(state)


def build_teacher(tcfg: Any, scene: Any, cache_root: str | Path, progress: bool = True) -> tuple[nn.Module, dict]:
    """Build the configured teacher.

    Args:
        tcfg: :class:`vkd.feature3dgs.config.TeacherConfig`.
        scene: the loaded :class:`vkd.feature3dgs.scene.Scene` (its training views pretrain the tiny CLIP).
        cache_root: where tiny-CLIP weights are cached.

    Returns:
        (teacher module, info dict: kind, model, pretrained, random_init, tiny_clip_dir, warning).
    """
    from vkd.models import tiny_clip as tc

    kind = tcfg.kind
    if kind == "auto":
        kind = "tiny_clip" if scene.label_names else "maskclip"
    info: dict[str, Any] = {"kind": kind, "random_init": False, "text_aligned": True}
    if kind == "callable":
        fn = load_callable(tcfg.target)
        teacher = CallableTeacher(fn, key=f"callable:{tcfg.target}")
        info.update(target=tcfg.target, text_aligned=teacher.text_aligned)
        return teacher, info
    if kind == "tiny_clip":
        t = tcfg.tiny
        clip_cfg = tc.TinyClipConfig(image_size=t.image_size, patch_size=t.patch_size, width=t.width,
                                     layers=t.layers, heads=t.heads, embed_dim=t.embed_dim, pool_type=t.pool_type,
                                     steps=t.steps, batch_size=t.batch_size, lr=t.lr, seed=t.seed,
                                     crop_scale_min=t.crop_scale_min, text_width=t.embed_dim)
        crops, captions = synthetic_crops(scene, t.crops_per_view, t.image_size, seed=t.seed)
        path = tc.pretrain_tiny_clip(crops, captions, clip_cfg, cache_dir=cache_root, progress=progress)
        bundle = tc.load_clip(tc.tiny_clip_name(path))
        stats = json.loads((Path(path) / "vkd_tiny_clip.json").read_text())
        dense = tcfg.dense if tcfg.dense != "auto" else ("tokens" if t.pool_type == "avg" else "maskclip")
        info.update(model="tiny_clip", pretrained=None, tiny_clip_dir=str(path), num_crops=len(captions),
                    tiny_clip_zero_shot=stats.get("train_zero_shot_accuracy"), dense=dense)
        return MaskCLIPTeacher(bundle, tcfg.input_size, dense=dense), info
    # maskclip with an open_clip model
    try:
        bundle = tc.load_clip(tcfg.model, tcfg.pretrained)
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


def load_text_encoder(run_dir: Path, tcfg: Any) -> Callable[[Sequence[str]], Tensor]:
    """Rebuild a run's text encoder ``prompts -> [K, E]`` (L2-normalised).

    Raises:
        UserError: the run's teacher has no text tower (a plain callable), or its weights cannot be loaded.
    """
    from vkd.models import tiny_clip as tc

    path = run_dir / "teacher" / "teacher.json"
    if not path.is_file():
        raise UserError(f"{run_dir} has no teacher/teacher.json; was it trained by vkd distill feature3dgs?")
    info = json.loads(path.read_text())
    kind = info.get("kind")
    if not info.get("text_aligned", True):
        raise UserError(f"the run {run_dir} was distilled from a teacher without a text encoder "
                        f"({info.get('target') or kind}): text queries need text-aligned (CLIP) features")
    if kind == "callable":
        fn = load_callable(info["target"])
        teacher = CallableTeacher(fn, key=info["target"])
        if not teacher.text_aligned:
            raise UserError(f"the run {run_dir} was distilled from '{info['target']}', which has no text encoder: "
                            "text queries need text-aligned (CLIP) features")
        return teacher.encode_text
    if kind == "tiny_clip":
        bundle = tc.load_clip(tc.tiny_clip_name(run_dir / info["tiny_clip_dir"]))
    elif info.get("random_init"):
        log.warning(RANDOM_INIT_WARNING)
        bundle = _random_clip(info["model"])
    else:
        bundle = tc.load_clip(info["model"], info.get("pretrained"))
    return lambda prompts: bundle.encode_text(list(prompts), normalize=True).float()
