"""Colouring of feature maps (PCA fitted once per scene), depth and relevancy maps, and image/video writing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = ["PCAColorizer", "colormap", "to_uint8", "save_png", "VideoWriter", "write_video"]


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
        idx = cls.sample_indices(x.shape[0], weights, max_samples, seed)
        if idx is not None:
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

    @staticmethod
    def sample_indices(num: int, weights: Tensor | None = None, max_samples: int = 20000, seed: int = 0
                       ) -> Tensor | None:
        """The rows :meth:`fit` keeps of ``num`` samples: ``None`` (all) when ``num <= max_samples``, else
        ``max_samples`` drawn without replacement (weighted by ``weights [num]`` when given), reproducibly."""
        if num <= max_samples:
            return None
        g = torch.Generator().manual_seed(seed)
        if weights is not None:
            return torch.multinomial(weights.float().clamp_min(1e-8), max_samples, generator=g)
        return torch.randperm(num, generator=g)[:max_samples]

    def pull_back(self, components: Tensor) -> PCAColorizer:
        """The same colouring on other coordinates ``x`` of the features: ``components [X, 3]`` must satisfy
        ``x·components = f·self.components`` (e.g. :meth:`~vkd.feature3dgs.query.DecodedSpace.vectors` of
        ``self.components.T``, transposed). The mean's projection moves into the ranges."""
        shift = self.mean @ self.components  # [3]: (f - μ)·C = x·C' - μ·C
        return PCAColorizer(torch.zeros(components.shape[0], dtype=components.dtype), components,
                            self.lo + shift, self.hi + shift)

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


class VideoWriter:
    """Frame-by-frame MP4 (imageio-ffmpeg, libx264) or GIF writer, chosen by the suffix.

    MP4 frames stream to ffmpeg as they come; Pillow writes a GIF at :meth:`close`, so GIF frames are held until
    then. Use as a context manager.
    """

    def __init__(self, path: str | Path, fps: int = 24):
        import imageio.v2 as imageio  # on use: only videos need imageio (and its ffmpeg)

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._gif = self.path.suffix == ".gif"
        if self._gif:
            self._writer = imageio.get_writer(self.path, mode="I", duration=1000 / fps, loop=0)
        else:
            self._writer = imageio.get_writer(self.path, fps=fps, codec="libx264", quality=8, macro_block_size=1)

    def append(self, frame: np.ndarray) -> None:
        """Add one uint8 ``[H, W, 3]`` frame."""
        if not self._gif:
            # libx264 with yuv420p needs even sizes; pad by edge replication.
            ph, pw = frame.shape[0] % 2, frame.shape[1] % 2
            if ph or pw:
                frame = np.pad(frame, ((0, ph), (0, pw), (0, 0)), mode="edge")
        self._writer.append_data(frame)

    def close(self) -> Path:
        self._writer.close()
        return self.path

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_video(frames: list[np.ndarray], path: str | Path, fps: int = 24) -> Path:
    """Write uint8 ``[H, W, 3]`` frames as MP4 (imageio-ffmpeg, libx264) or GIF, chosen by the suffix."""
    with VideoWriter(path, fps) as writer:
        for frame in frames:
            writer.append(frame)
    return writer.path
