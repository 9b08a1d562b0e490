"""Additive 2D Gaussian splatting of points (crowd density maps).

A density map is ``Σ_i gaussian_filter(δ_i, σ_i)`` where ``δ_i`` is a unit delta image at head ``i``. Filtering a
delta with a separable kernel gives an outer product of two 1-D profiles, so the whole map is one matrix product
``G_yᵀ · diag(w) · G_x`` with ``G_y [P, H]`` and ``G_x [P, W]`` (one row per point). This costs milliseconds for
thousands of heads, where the per-head ``scipy.ndimage.gaussian_filter`` reference costs seconds.

Conventions (the reference pipelines, e.g. CSRNet's ``make_dataset``, do the same):

* A point ``(x, y)`` in pixel coordinates (x = column, y = row) becomes a delta at pixel
  ``(row, col) = (floor(y), floor(x))``, clipped into the image. Points outside the image are therefore moved to the
  nearest border pixel, not dropped: filter them out first if you want them dropped.
* The 1-D kernel is scipy's: radius ``r = int(truncate·σ + 0.5)``, weights ``exp(-t²/(2σ²))`` for ``t = -r..r``,
  normalised to sum 1. ``σ ≤ 1e-15`` leaves the delta untouched (scipy skips such axes).
* ``border`` selects how mass that falls outside the image is treated, as scipy's ``mode`` of the same name:

  =============== ============================= =====================================================
  border          scipy extension               effect on a point's mass
  =============== ============================= =====================================================
  ``constant``    ``(0 0 | a b c d | 0 0)``     mass outside the image is lost
  ``reflect``     ``(b a | a b c d | d c)``     folded back about the pixel edge: sums to 1
  ``mirror``      ``(c b | a b c d | c b)``     about the border pixel centre: not mass-preserving
  ``wrap``        ``(c d | a b c d | a b)``     periodic: sums to 1
  ``renormalize`` ``constant``, then rescaled   each point's profile sums to exactly 1 inside
  =============== ============================= =====================================================

  ``reflect``, ``mirror`` and ``wrap`` match scipy for any kernel length, including kernels longer than the image
  (the extension is applied periodically, as scipy does).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

Border = Literal["constant", "reflect", "mirror", "wrap", "renormalize"]
_BORDERS = ("constant", "reflect", "mirror", "wrap", "renormalize")
# Elements of one [points, pixels] float64 block; bounds memory for huge point sets.
_CHUNK_ELEMENTS = 1 << 23

__all__ = ["gaussian_kernel_1d", "splat_points_2d", "splat_profiles_1d", "geometry_adaptive_sigmas"]


def gaussian_kernel_1d(
    sigma: float, truncate: float = 4.0, radius: int | None = None, dtype: torch.dtype = torch.float64
) -> Tensor:
    """scipy's normalised, sampled 1-D Gaussian kernel.

    Args:
        sigma: standard deviation in pixels (≥ 0). ``sigma ≤ 1e-15`` returns ``[1.]`` (identity).
        truncate: the kernel radius is ``int(truncate * sigma + 0.5)``, as in ``scipy.ndimage.gaussian_filter``.
        radius: explicit radius overriding ``truncate``.
        dtype: output dtype (weights are computed in float64).

    Returns:
        ``[2r+1]`` weights summing to 1, centre at index ``r``.
    """
    sigma = float(sigma)
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be finite and >= 0, got {sigma}")
    if sigma <= 1e-15:
        return torch.ones(1, dtype=dtype)
    r = int(truncate * sigma + 0.5) if radius is None else int(radius)
    if r < 0:
        raise ValueError(f"radius must be >= 0, got {r}")
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    w = torch.exp(-0.5 / (sigma * sigma) * t * t)
    return (w / w.sum()).to(dtype)


def _check_border(border: str) -> None:
    if border not in _BORDERS:
        raise ValueError(f"border must be one of {_BORDERS}, got {border!r}")


def splat_profiles_1d(
    centres: Tensor, sigmas: Tensor, n: int, truncate: float = 4.0, border: Border = "constant"
) -> Tensor:
    """1-D profiles of ``gaussian_filter1d`` applied to unit deltas, one row per point.

    Args:
        centres: ``[P]`` integer pixel indices in ``[0, n)``.
        sigmas: ``[P]`` standard deviations (float).
        n: length of the axis.
        truncate: scipy's ``truncate``.
        border: see the module docstring.

    Returns:
        ``[P, n]`` float64 profiles: row i equals ``gaussian_filter1d(delta(centres[i]), sigmas[i], mode=border)``.
    """
    _check_border(border)
    centres = centres.to(torch.int64)
    sig = sigmas.to(torch.float64)
    P = centres.shape[0]
    device = centres.device
    out = torch.zeros(P, n, dtype=torch.float64, device=device)
    if P == 0 or n == 0:
        return out
    ident = sig <= 1e-15
    sig_safe = torch.where(ident, torch.ones_like(sig), sig)
    # scipy: lw = int(truncate * sd + 0.5) (truncation toward zero; argument is positive).
    radii = torch.where(ident, torch.zeros_like(centres), torch.floor(truncate * sig + 0.5).to(torch.int64))
    inv2s2 = 0.5 / (sig_safe * sig_safe)  # [P]

    # Normaliser Z_i = Σ_{t=-r_i..r_i} exp(-t²/(2σ_i²)), summed in point chunks to bound memory.
    Z = torch.empty(P, dtype=torch.float64, device=device)
    r_max = int(radii.max())
    t = torch.arange(-r_max, r_max + 1, dtype=torch.float64, device=device)
    step = max(1, _CHUNK_ELEMENTS // t.numel())
    for s in range(0, P, step):
        e = slice(s, s + step)
        k = torch.exp(-inv2s2[e, None] * t * t) * (t.abs() <= radii[e, None])
        Z[e] = k.sum(-1)

    if n == 1 and border in ("reflect", "mirror", "wrap"):
        # Every extended sample is the single pixel: the whole kernel lands on it.
        out.fill_(1.0)
        return out

    mode = "constant" if border == "renormalize" else border
    # Images m of the centre p under the boundary extension: out[y] = Σ_m K(y - m).
    if mode == "constant":
        families, period = [centres], 0
    elif mode == "wrap":
        families, period = [centres], n
    elif mode == "reflect":
        families, period = [centres, -1 - centres], 2 * n
    else:  # mirror
        # p and -p coincide (mod 2n-2) for p in {0, n-1}: count those images once.
        dup = (centres == 0) | (centres == n - 1)
        families, period = [centres, torch.where(dup, torch.full_like(centres, 10**12), -centres)], 2 * n - 2

    y = torch.arange(n, dtype=torch.float64, device=device)
    if period == 0:
        shifts = [0]
    else:
        k_lo = math.floor((-r_max - n) / period) - 1
        k_hi = math.ceil((n - 1 + r_max + n) / period) + 1
        shifts = [k * period for k in range(k_lo, k_hi + 1)]
    for base in families:
        for sh in shifts:
            m = base + sh  # [P]
            # Only the points whose window [m - r, m + r] meets [0, n) contribute for this image.
            hit = ((m + radii) >= 0) & ((m - radii) <= n - 1)
            idx = hit.nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            step = max(1, _CHUNK_ELEMENTS // n)
            for s in range(0, idx.numel(), step):
                ii = idx[s : s + step]
                d = y[None, :] - m[ii, None].to(torch.float64)  # [p, n]
                k = torch.exp(-inv2s2[ii, None] * d * d) * (d.abs() <= radii[ii, None])
                out.index_add_(0, ii, k / Z[ii, None])
    if border == "renormalize":
        out = out / out.sum(-1, keepdim=True)
    return out


def splat_points_2d(
    points: Tensor,
    sigmas: Tensor | float,
    height: int,
    width: int,
    truncate: float = 4.0,
    border: Border = "constant",
    weights: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Sum of Gaussian-filtered unit deltas, one per point, as one matrix product.

    Equals ``Σ_i w_i · scipy.ndimage.gaussian_filter(δ_i, σ_i, mode=border, truncate=truncate)`` where ``δ_i`` has a
    single 1 at ``(floor(y_i), floor(x_i))`` clipped into the image (see the module docstring for the conventions).

    Args:
        points: ``[P, 2]`` ``(x, y)`` pixel coordinates (x = column, y = row); a tensor or array-like.
        sigmas: ``[P]`` per-point standard deviations in pixels (tensor or array-like), or one float for all.
        height: output rows ``H`` (> 0).
        width: output columns ``W`` (> 0).
        truncate: kernel radius in standard deviations, scipy's ``truncate``.
        border: ``"constant" | "reflect" | "mirror" | "wrap" | "renormalize"``.
        weights: optional ``[P]`` mass per point (default 1).
        dtype: output dtype; profiles are computed in float64 and cast before the product.

    Returns:
        ``[H, W]`` density map on ``points.device``.
    """
    _check_border(border)
    if not isinstance(points, Tensor):
        try:  # numpy arrays and nested lists
            points = (
                torch.as_tensor(points, dtype=torch.float64).reshape(-1, 2)
                if len(points) == 0
                else (torch.as_tensor(points, dtype=torch.float64))
            )
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"points must be a [P, 2] tensor of (x, y), got {type(points).__name__}") from e
    if sigmas is not None and not isinstance(sigmas, (Tensor, float, int)):
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if points.ndim != 2 or points.shape[-1] != 2:
        raise ValueError(f"points must be a [P, 2] tensor of (x, y), got shape {tuple(points.shape)}")
    if int(height) <= 0 or int(width) <= 0:
        raise ValueError(f"height and width must be > 0, got height={height}, width={width}")
    height, width = int(height), int(width)
    P = points.shape[0]
    device = points.device
    if not torch.isfinite(points).all():
        raise ValueError(f"points [{P}, 2] contains non-finite values")
    if isinstance(sigmas, Tensor):
        if sigmas.ndim == 0:
            sigmas = sigmas.expand(P)
        elif sigmas.shape != (P,):
            raise ValueError(f"sigmas must be a float or a [P]=[{P}] tensor, got shape {tuple(sigmas.shape)}")
        sig = sigmas.to(device=device, dtype=torch.float64)
    else:
        sig = torch.full((P,), float(sigmas), dtype=torch.float64, device=device)
    if not (torch.isfinite(sig).all() and (sig >= 0).all()):
        raise ValueError(f"sigmas [{P}] must be finite and >= 0")
    if weights is not None:
        if not isinstance(weights, Tensor):
            weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (P,):
            shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
            raise ValueError(f"weights must be a [P]=[{P}] tensor, got shape {shape}")
    if P == 0:
        return torch.zeros(height, width, dtype=dtype, device=device)
    pts = points.to(torch.float64)
    col = torch.floor(pts[:, 0]).clamp(0, width - 1).to(torch.int64)
    row = torch.floor(pts[:, 1]).clamp(0, height - 1).to(torch.int64)
    gx = splat_profiles_1d(col, sig, width, truncate, border)  # [P, W]
    gy = splat_profiles_1d(row, sig, height, truncate, border)  # [P, H]
    if weights is not None:
        gx = gx * weights.to(device=device, dtype=torch.float64)[:, None]
    return gy.to(dtype).T @ gx.to(dtype)  # [H, W]


def geometry_adaptive_sigmas(
    points: Tensor,
    k: int = 3,
    beta: float = 0.3,
    single_sigma: float | None = None,
    image_size: tuple | None = None,
) -> Tensor:
    """Geometry-adaptive kernel widths (MCNN): ``σ_i = β · mean distance to the k nearest other points``.

    Args:
        points: ``[P, 2]`` point coordinates.
        k: neighbours averaged (fewer when ``P - 1 < k``).
        beta: scale factor (0.3 in MCNN / CSRNet).
        single_sigma: σ used when ``P == 1``; if None, ``mean(image_size) / 4`` (CSRNet) when ``image_size`` is
            given, else 15.0.
        image_size: ``(H, W)``, only used for the single-point fallback.

    Returns:
        ``[P]`` float64 sigmas.
    """
    if points.ndim != 2 or points.shape[-1] != 2:
        raise ValueError(f"points must be [P, 2], got shape {tuple(points.shape)}")
    P = points.shape[0]
    if P == 0:
        return torch.zeros(0, dtype=torch.float64, device=points.device)
    if P == 1:
        if single_sigma is None:
            single_sigma = (sum(image_size) / 2.0 / 4.0) if image_size is not None else 15.0
        return torch.full((1,), float(single_sigma), dtype=torch.float64, device=points.device)
    from scipy.spatial import cKDTree  # O(P log P); a dense [P, P] distance matrix is too big for crowds

    pts = points.detach().to("cpu", torch.float64).numpy()
    kk = min(k, P - 1)
    dist, _ = cKDTree(pts).query(pts, k=kk + 1)  # column 0 is the point itself (distance 0)
    sig = torch.from_numpy(dist[:, 1:].mean(-1) * beta)
    return sig.to(points.device)
