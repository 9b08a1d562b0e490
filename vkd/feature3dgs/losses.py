"""Feature 3DGS losses (spec §4): ``L = (1-λ)·L1(I, Î) + λ·(1-SSIM(I, Î)) + γ·L_feat(F_t, F_s)``.

Functional and module forms (kornia style). SSIM is kornia's (11x11 Gaussian window, σ = 1.5), as in 3DGS.
"""

from __future__ import annotations

import torch.nn.functional as F
from kornia.metrics import ssim as kornia_ssim
from torch import Tensor, nn

__all__ = ["rgb_loss", "feature_loss", "resize_features", "feature3dgs_loss", "RGBLoss", "FeatureLoss",
           "Feature3DGSLoss"]


def _check_pair(name: str, a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"{name}: prediction and target must both be [B, C, H, W] of the same shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")


def rgb_loss(pred: Tensor, target: Tensor, ssim_lambda: float = 0.2, window: int = 11) -> Tensor:
    """3DGS photometric loss ``(1-λ)·L1 + λ·(1-SSIM)``.

    Args:
        pred: ``[B, 3, H, W]`` rendered RGB.
        target: ``[B, 3, H, W]`` ground truth in [0, 1].
        ssim_lambda: λ.
        window: SSIM window size (odd).

    Returns:
        scalar loss.
    """
    _check_pair("rgb_loss", pred, target)
    l1 = (pred - target).abs().mean()
    if ssim_lambda == 0:
        return l1
    s = kornia_ssim(pred, target, window, max_val=1.0).mean()
    return (1 - ssim_lambda) * l1 + ssim_lambda * (1 - s)


def resize_features(features: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize (``align_corners=True``, spec §2) of ``[B, D, H, W]`` maps to the teacher's ``(h, w)``."""
    if tuple(features.shape[-2:]) == tuple(size):
        return features
    return F.interpolate(features, size=tuple(size), mode="bilinear", align_corners=True)


def feature_loss(pred: Tensor, target: Tensor, kind: str = "l1", mask: Tensor | None = None) -> Tensor:
    """Feature distillation loss.

    Args:
        pred: ``[B, D, h, w]`` student features (rendered, resized, decoded).
        target: ``[B, D, h, w]`` teacher features.
        kind: ``"l1"`` (mean absolute error over channels and pixels) or ``"cosine"`` (mean of ``1 - cos``).
        mask: optional ``[B, 1, h, w]`` weights.

    Returns:
        scalar loss.
    """
    _check_pair("feature_loss", pred, target)
    if kind == "l1":
        err = (pred - target).abs()
    elif kind == "cosine":
        err = 1 - F.cosine_similarity(pred, target, dim=1, eps=1e-8)[:, None]
    else:
        raise ValueError(f"kind must be 'l1' or 'cosine', got {kind!r}")
    if mask is None:
        return err.mean()
    w = mask.expand_as(err).to(err.dtype)
    return (err * w).sum() / w.sum().clamp_min(1e-12)


def feature3dgs_loss(rgb: Tensor, rgb_target: Tensor, features: Tensor, feature_target: Tensor,
                     ssim_lambda: float = 0.2, feature_weight: float = 1.0, kind: str = "l1",
                     window: int = 11) -> dict[str, Tensor]:
    """The full objective.

    Args:
        rgb, rgb_target: ``[B, 3, H, W]``.
        features: ``[B, D, h, w]`` student features at teacher resolution; feature_target the same shape.

    Returns:
        dict with ``loss``, ``rgb`` and ``feature`` scalars.
    """
    l_rgb = rgb_loss(rgb, rgb_target, ssim_lambda, window)
    l_feat = feature_loss(features, feature_target, kind)
    return {"loss": l_rgb + feature_weight * l_feat, "rgb": l_rgb.detach(), "feature": l_feat.detach()}


class RGBLoss(nn.Module):
    """Module form of :func:`rgb_loss`."""

    def __init__(self, ssim_lambda: float = 0.2, window: int = 11):
        super().__init__()
        self.ssim_lambda, self.window = ssim_lambda, window

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        return rgb_loss(pred, target, self.ssim_lambda, self.window)


class FeatureLoss(nn.Module):
    """Module form of :func:`feature_loss`."""

    def __init__(self, kind: str = "l1"):
        super().__init__()
        self.kind = kind

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        return feature_loss(pred, target, self.kind, mask)


class Feature3DGSLoss(nn.Module):
    """Module form of :func:`feature3dgs_loss`."""

    def __init__(self, ssim_lambda: float = 0.2, feature_weight: float = 1.0, kind: str = "l1", window: int = 11):
        super().__init__()
        self.ssim_lambda, self.feature_weight, self.kind, self.window = ssim_lambda, feature_weight, kind, window

    def forward(self, rgb: Tensor, rgb_target: Tensor, features: Tensor, feature_target: Tensor
                ) -> dict[str, Tensor]:
        return feature3dgs_loss(rgb, rgb_target, features, feature_target, self.ssim_lambda, self.feature_weight,
                                self.kind, self.window)
