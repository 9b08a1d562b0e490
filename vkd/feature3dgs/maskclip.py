"""MaskCLIP dense features of an open_clip ViT (spec §8.1), and the dense CLIP teacher module built on them.

MaskCLIP turns a CLIP ViT into a dense, text-aligned feature extractor: run every block but the last unchanged, then
take only the last block's *value* path (``ln_1`` -> value projection -> ``out_proj``; no q·k attention, no
residual, no MLP), drop the CLS token, apply ``ln_post`` per token and ``proj``. Positional embeddings are
interpolated bicubically to the input's patch grid, so any image size (multiple of the patch) works.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vkd.errors import UserError
from vkd.models.tiny_clip import ClipBundle

__all__ = ["interpolate_pos_embed", "maskclip_dense_features", "token_dense_features", "MaskCLIPTeacher"]


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


def _run_blocks(visual: nn.Module, x: Tensor, blocks: Iterable[nn.Module]) -> Tensor:
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

    def __init__(self, bundle: ClipBundle, input_size: int = 224, random_init: bool = False, dense: str = "maskclip"):
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
