"""Colouring of feature maps (PCA fitted once per scene), depth and relevancy maps, and image/video writing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = ["PCAColorizer", "colormap", "to_uint8", "save_png", "write_video"]


@dataclass
class PCAColorizer:
    """Linear map ``[..., M] -> RGB`` from the top-3 principal components, with fixed per-channel ranges.

    Fitted once (e.g. on the per-Gaussian features of a field, or on teacher maps) so colours are stable across
    frames: a rendered map is a convex combination of per-Gaussian features, so it maps inside the fitted range.
    """

    mean: Tensor  # [M]
    components: Tensor  # [M, 3]
    lo: Tensor  # [3]
    hi: Tensor  # [3]

    @classmethod
    def fit(cls, samples: Tensor, weights: Tensor | None = None, max_samples: int = 20000, seed: int = 0
            ) -> PCAColorizer:
        """Fit on ``samples [P, M]`` (optionally weighted, e.g. by opacity); ranges are the 1st/99th percentiles."""
        x = samples.detach().float().reshape(-1, samples.shape[-1])
        if x.shape[0] > max_samples:
            g = torch.Generator().manual_seed(seed)
            idx = torch.multinomial(weights.float().clamp_min(1e-8), max_samples, generator=g) if weights is not None \
                else torch.randperm(x.shape[0], generator=g)[:max_samples]
            x = x[idx]
        mean = x.mean(0)
        xc = x - mean
        if x.shape[1] >= 3:
            _, _, v = torch.pca_lowrank(xc, q=min(3, x.shape[1]), center=False, niter=4)
            comps = v[:, :3]
        else:
            comps = torch.eye(x.shape[1], 3)
        # Deterministic signs: largest-magnitude entry of each component positive.
        signs = torch.sign(comps.gather(0, comps.abs().argmax(0, keepdim=True)))
        comps = comps * torch.where(signs == 0, torch.ones_like(signs), signs)
        proj = xc @ comps
        lo, hi = torch.quantile(proj, 0.01, dim=0), torch.quantile(proj, 0.99, dim=0)
        return cls(mean, comps, lo, torch.maximum(hi, lo + 1e-6))

    def __call__(self, features: Tensor, channel_dim: int = 1) -> Tensor:
        """``[B, M, H, W]`` (or channel-last with ``channel_dim=-1``) -> RGB ``[B, H, W, 3]`` in [0, 1]."""
        f = features.movedim(channel_dim, -1).float()
        proj = (f - self.mean) @ self.components
        return ((proj - self.lo) / (self.hi - self.lo)).clamp(0, 1)


def colormap(values: Tensor, lo: float | None = None, hi: float | None = None, name: str = "turbo") -> Tensor:
    """Scalar map ``[..., H, W]`` -> RGB ``[..., H, W, 3]`` with a matplotlib colormap over ``[lo, hi]``."""
    import matplotlib  # on use: matplotlib is slow to import and only colormaps need it

    v = values.detach().float()
    lo = float(v.min()) if lo is None else lo
    hi = float(v.max()) if hi is None else hi
    t = ((v - lo) / max(hi - lo, 1e-12)).clamp(0, 1)
    cmap = matplotlib.colormaps[name]
    return torch.from_numpy(cmap(t.cpu().numpy())[..., :3].astype(np.float32))


def to_uint8(image: Tensor) -> np.ndarray:
    """``[H, W, 3]`` float in [0, 1] -> uint8 array."""
    return (image.detach().float().clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def save_png(image: Tensor, path: str | Path) -> Path:
    """Write ``[H, W, 3]`` in [0, 1] as PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(image)).save(path)
    return path


def write_video(frames: list[np.ndarray], path: str | Path, fps: int = 24) -> Path:
    """Write uint8 ``[H, W, 3]`` frames as MP4 (imageio-ffmpeg, libx264) or GIF, chosen by the suffix."""
    import imageio.v2 as imageio  # on use: only videos need imageio (and its ffmpeg)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gif":
        imageio.mimsave(path, frames, duration=1000 / fps, loop=0)
    else:
        # libx264 with yuv420p needs even sizes; pad by edge replication.
        h, w = frames[0].shape[:2]
        ph, pw = h % 2, w % 2
        if ph or pw:
            frames = [np.pad(f, ((0, ph), (0, pw), (0, 0)), mode="edge") for f in frames]
        imageio.mimsave(path, frames, fps=fps, codec="libx264", quality=8, macro_block_size=1)
    return path
