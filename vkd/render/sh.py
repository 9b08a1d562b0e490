"""Real spherical harmonics up to degree 4, in the 3DGS / gsplat convention.

``eval_sh(degree, dirs, coeffs)`` returns ``Σ_k Y_k(d̂) c_k``; gsplat's ``rasterization(sh_degree=...)`` then adds 0.5
and clamps at 0 (``sh_to_color``). The basis is the usual real SH with the sign convention of the 3DGS code
(``Y_1 = (-C1·y, C1·z, -C1·x)``), evaluated on the normalised direction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["eval_sh", "sh_to_color", "num_sh_bases", "rgb_to_sh", "sh_to_rgb"]

C0 = 0.28209479177387814
C1 = 0.4886025119029199
C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
C3 = (
    -0.5900435899266435,
    2.890611442640554,
    -0.4570457994644658,
    0.3731763325901154,
    -0.4570457994644658,
    1.445305721320277,
    -0.5900435899266435,
)
C4 = (
    2.5033429417967046,
    -1.7701307697799304,
    0.9461746957575601,
    -0.6690465435572892,
    0.10578554691520431,
    -0.6690465435572892,
    0.47308734787878004,
    -1.7701307697799304,
    0.6258357354491761,
)


def num_sh_bases(degree: int) -> int:
    """Number of SH coefficients ``(degree + 1)²`` per channel."""
    return (degree + 1) ** 2


def _bases(degree: int, d: Tensor) -> Tensor:
    """``[..., (degree+1)²]`` basis values at unit directions ``d [..., 3]``."""
    x, y, z = d.unbind(-1)
    out = [torch.full_like(x, C0)]
    if degree >= 1:
        out += [-C1 * y, C1 * z, -C1 * x]
    if degree >= 2:
        xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
        out += [
            C2[0] * xy,
            C2[1] * yz,
            C2[2] * (2.0 * zz - xx - yy),
            C2[3] * xz,
            C2[4] * (xx - yy),
        ]
    if degree >= 3:
        out += [
            C3[0] * y * (3 * xx - yy),
            C3[1] * xy * z,
            C3[2] * y * (4 * zz - xx - yy),
            C3[3] * z * (2 * zz - 3 * xx - 3 * yy),
            C3[4] * x * (4 * zz - xx - yy),
            C3[5] * z * (xx - yy),
            C3[6] * x * (xx - 3 * yy),
        ]
    if degree >= 4:
        out += [
            C4[0] * xy * (xx - yy),
            C4[1] * yz * (3 * xx - yy),
            C4[2] * xy * (7 * zz - 1),
            C4[3] * yz * (7 * zz - 3),
            C4[4] * (zz * (35 * zz - 30) + 3),
            C4[5] * xz * (7 * zz - 3),
            C4[6] * (xx - yy) * (7 * zz - 1),
            C4[7] * xz * (xx - 3 * yy),
            C4[8] * (xx * (xx - 3 * yy) - yy * (3 * xx - yy)),
        ]
    return torch.stack(out, dim=-1)


def eval_sh(degree: int, dirs: Tensor, coeffs: Tensor) -> Tensor:
    """Evaluate SH colours.

    Args:
        degree: SH degree to use, 0..4. Only the first ``(degree+1)²`` coefficients are read.
        dirs: ``[..., 3]`` view directions (need not be normalised).
        coeffs: ``[..., K, 3]`` coefficients with ``K ≥ (degree+1)²``.

    Returns:
        ``[..., 3]`` raw SH value (no +0.5 offset, no clamp).
    """
    if not 0 <= degree <= 4:
        raise ValueError(f"sh_degree must be in 0..4, got {degree}")
    k = num_sh_bases(degree)
    if coeffs.shape[-1] != 3 or coeffs.shape[-2] < k:
        raise ValueError(
            f"coeffs must be [..., K>={k}, 3] for sh_degree={degree}, got shape {tuple(coeffs.shape)}"
        )
    b = _bases(degree, F.normalize(dirs, dim=-1))  # [..., k]
    return (b[..., None] * coeffs[..., :k, :]).sum(-2)


def sh_to_color(degree: int, dirs: Tensor, coeffs: Tensor) -> Tensor:
    """gsplat's SH colour: ``max(eval_sh + 0.5, 0)``, shape ``[..., 3]``."""
    return torch.clamp_min(eval_sh(degree, dirs, coeffs) + 0.5, 0.0)


def rgb_to_sh(rgb: Tensor) -> Tensor:
    """DC coefficient that renders ``rgb`` at degree 0: ``(rgb - 0.5) / C0``."""
    return (rgb - 0.5) / C0


def sh_to_rgb(sh_dc: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_sh`."""
    return sh_dc * C0 + 0.5
