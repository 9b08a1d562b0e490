"""Pure-PyTorch Gaussian rasterizer following gsplat 1.5.3's projection and compositing rules.

Pipeline (spec ``render.md`` §6-7):

1. :func:`project_gaussians` — EWA projection with gsplat's Jacobian clamps, ``eps2d`` blur, antialiased
   compensation, near/far cull, opacity-aware radii and frustum cull (autograd-differentiable).
2. :func:`build_tile_schedule` — (tile, Gaussian) pair lists on 8×8 tiles built with vectorised torch ops: visible
   Gaussians are sorted by depth once, expanded over the tiles their box overlaps (gsplat's ``isect_tiles`` rule),
   pairs whose α stays below 1/255 on the whole tile are dropped (exact ellipse-rectangle test), and the rest are
   stably sorted by tile, so each tile's list is in front-to-back order. Tiles are grouped by list length into work
   items whose blocks ``[B, P, chunk]`` hold at most ``DEFAULT_BLOCK_ELEMENTS`` elements.
3. :class:`_Composite` — a custom autograd function that composites each work item front to back in chunks of
   ``CHUNK`` Gaussians (tiles whose pixels have all stopped skip the rest) with a closed-form backward. It keeps
   the blocks' weights for the backward pass when they total at most ``SAVE_MAX_ELEMENTS``, else recomputes them.

Tile-local quadratic form: with pixel centres taken relative to the tile centre, the exponent of Gaussian ``g`` at
pixel ``p`` is ``n = log(o) - σ = φ(p)·k_g`` with ``φ = (x², xy, y², x, y, 1)`` and per-(tile, Gaussian) coefficients
``k``. So the whole ``[B, P, G]`` exponent block is one batched matrix product, and in the backward pass the gradient
w.r.t. all per-Gaussian 2D parameters is again one product ``φᵀ · ∂L/∂n``.

Compositing gradient (front to back, ``w_k = α_k T_k``, ``T_k = Π_{j<k}(1-α_j)``, ``v_k = ∂L/∂w_k``)::

    ∂L/∂α_k = v_k T_k - S_k / (1 - α_k),     S_k = Σ_{j>k} v_j w_j
    ∂L/∂n_k = α_k ∂L/∂α_k = v_k w_k - S_k α_k / (1 - α_k)      (0 where α is clamped at 0.999 or skipped)

Known deviation from the CUDA kernel: gsplat also skips a Gaussian when ``σ < 0``; for a valid conic this only happens
through rounding, and in the quadratic form rounding near ``σ = 0`` would wrongly skip the brightest pixel, so the
test is not applied.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

ALPHA_THRESHOLD = 1.0 / 255.0
ALPHA_MAX = 0.999
T_EPS = 1e-4
# Compositing tile of the torch backend: 8x8 blocks waste less work than gsplat's 16x16 on CPU.
TORCH_TILE_SIZE = 8
# Elements of one dense [B, P, G] block: bounds memory and keeps blocks cache-friendly.
DEFAULT_BLOCK_ELEMENTS = 1 << 19
# Gaussians per compositing chunk: tiles are walked front to back in chunks of this many Gaussians, and a tile
# whose pixels have all stopped (T ≤ 1e-4) or whose list has ended skips the remaining chunks.
CHUNK = 64
# Blocks kept from the forward for the backward pass (w and α/(1-α)): at most this many elements each.
SAVE_MAX_ELEMENTS = 1 << 25

__all__ = ["project_gaussians", "quat_to_rotmat", "build_tile_schedule", "composite_tiles", "composite_adjoint",
           "TileSchedule"]


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices from wxyz quaternions (normalised here).

    Args:
        quats: ``[..., 4]`` (w, x, y, z).

    Returns:
        ``[..., 3, 3]``.
    """
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z),
            2 * (x * y - w * z),
            2 * (x * z + w * y),
            2 * (x * y + w * z),
            1 - 2 * (x * x + z * z),
            2 * (y * z - w * x),
            2 * (x * z - w * y),
            2 * (y * z + w * x),
            1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(quats.shape[:-1] + (3, 3))


def project_gaussians(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4]
    scales: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    eps2d: float = 0.3,
    antialiased: bool = False,
) -> dict[str, Tensor]:
    """EWA projection of 3D Gaussians (gsplat's pinhole ``fully_fused_projection`` with opacity-aware radii).

    Returns:
        dict with ``means2d [C, N, 2]``, ``conics [C, N, 3]`` (a, b, c of the inverse 2D covariance), ``depths
        [C, N]``, ``opacities [C, N]`` (compensation applied in antialiased mode), ``radii [C, N, 2]`` int32 and
        ``valid [C, N]`` bool. Culled entries have ``radii = 0`` and zero means2d/conics/depths/opacities; all
        outputs are finite and differentiable (culled entries get zero gradient).
    """
    R = quat_to_rotmat(quats)  # [N, 3, 3]
    M = R * scales[:, None, :]  # R·diag(s)
    cov = M @ M.transpose(-1, -2)  # [N, 3, 3]
    Rv = viewmats[:, :3, :3]  # [C, 3, 3]
    tv = viewmats[:, :3, 3]  # [C, 3]
    mc = torch.einsum("cij,nj->cni", Rv, means) + tv[:, None, :]  # [C, N, 3]
    cc = torch.einsum("cij,njk,clk->cnil", Rv, cov, Rv)  # [C, N, 3, 3]
    x, y, z = mc.unbind(-1)
    valid = (z >= near_plane) & (z <= far_plane)
    zs = torch.where(valid, z, torch.ones_like(z))  # finite everywhere, also in backward

    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]  # [C, 1]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    rz = 1.0 / zs
    u = fx * x * rz + cx
    v = fy * y * rz + cy
    # gsplat clamps the point used in the Jacobian to 1.3x the field of view.
    tanx, tany = 0.5 * width / fx, 0.5 * height / fy
    lim_xp, lim_xn = (width - cx) / fx + 0.3 * tanx, cx / fx + 0.3 * tanx
    lim_yp, lim_yn = (height - cy) / fy + 0.3 * tany, cy / fy + 0.3 * tany
    tx = zs * torch.minimum(lim_xp, torch.maximum(-lim_xn, x * rz))
    ty = zs * torch.minimum(lim_yp, torch.maximum(-lim_yn, y * rz))
    j00, j02 = fx * rz, -fx * tx * rz * rz
    j11, j12 = fy * rz, -fy * ty * rz * rz
    s00, s01, s02 = cc[..., 0, 0], cc[..., 0, 1], cc[..., 0, 2]
    s11, s12, s22 = cc[..., 1, 1], cc[..., 1, 2], cc[..., 2, 2]
    cxx = j00 * j00 * s00 + 2 * j00 * j02 * s02 + j02 * j02 * s22
    cxy = j00 * j11 * s01 + j00 * j12 * s02 + j02 * j11 * s12 + j02 * j12 * s22
    cyy = j11 * j11 * s11 + 2 * j11 * j12 * s12 + j12 * j12 * s22
    det0 = cxx * cyy - cxy * cxy
    cxx = cxx + eps2d
    cyy = cyy + eps2d
    det = cxx * cyy - cxy * cxy
    valid = valid & (det > 0)
    dets = torch.where(valid, det, torch.ones_like(det))
    conics = torch.stack([cyy / dets, -cxy / dets, cxx / dets], dim=-1)  # [C, N, 3]

    opac = opacities[None, :].expand_as(z)
    if antialiased:
        ratio = det0 / dets
        pos = valid & (ratio > 0)
        comp = torch.where(
            pos, torch.sqrt(torch.where(pos, ratio, torch.ones_like(ratio))), torch.zeros_like(ratio)
        )
        opac = opac * comp

    with torch.no_grad():
        o = opac.detach()
        valid = valid & (o >= ALPHA_THRESHOLD)
        extend = torch.sqrt(2.0 * torch.log(torch.where(valid, o, torch.ones_like(o)) / ALPHA_THRESHOLD))
        extend = torch.clamp(extend, max=3.33)
        rx = torch.ceil(extend * torch.sqrt(torch.where(valid, cxx, torch.ones_like(cxx)).detach()))
        ry = torch.ceil(extend * torch.sqrt(torch.where(valid, cyy, torch.ones_like(cyy)).detach()))
        valid = valid & ~((rx <= radius_clip) & (ry <= radius_clip))
        ud, vd = u.detach(), v.detach()
        valid = valid & ~((ud + rx <= 0) | (ud - rx >= width) | (vd + ry <= 0) | (vd - ry >= height))
        radii = torch.stack([rx, ry], dim=-1) * valid[..., None]
        radii = radii.to(torch.int32)

    vf = valid.to(means.dtype)
    means2d = torch.stack([u, v], dim=-1) * vf[..., None]
    return {
        "means2d": means2d,
        "conics": conics * vf[..., None],
        "depths": z * vf,
        "opacities": opac * vf,
        "radii": radii,
        "valid": valid,
    }


@dataclass
class TileSchedule:
    """(tile, Gaussian) pairs in per-tile front-to-back order and the work items that composite them."""

    tile_size: int
    tile_width: int
    tile_height: int
    n_images: int
    pair_gauss: Tensor  # [M] flat index c*N + g of each pair's Gaussian, grouped by tile, depth-sorted inside
    pair_tile: Tensor  # [M] flat tile id c*TH*TW + ty*TW + tx
    tile_offsets: Tensor  # [n_tiles] first pair of each tile
    tile_counts: Tensor  # [n_tiles]
    tiles_per_gauss: Tensor  # [C, N] int32
    items: list  # (tile ids [B] long, G, p0, p1, may_clamp)

    @property
    def n_tiles(self) -> int:
        return self.n_images * self.tile_width * self.tile_height


def _min_sigma_on_rect(u, v, a, b, c, x0, x1, y0, y1):
    """Minimum of σ = ½(a dx² + 2b dx dy + c dy²), d = p - (u, v), over the rectangle [x0, x1] × [y0, y1].

    The quadratic form is positive definite, so the minimum is 0 when (u, v) is inside and otherwise lies on an edge;
    on each edge σ is a parabola whose minimiser is clamped to the edge. All arguments are 1-D and contiguous.
    """
    dx0, dx1, dy0, dy1 = x0 - u, x1 - u, y0 - v, y1 - v
    ah, ch = 0.5 * a, 0.5 * c
    ty, tx = (
        -b / c,
        -b / a,
    )  # unconstrained minimiser along a vertical / horizontal line: dy = ty·dx, dx = tx·dy
    best = None
    for dx in (dx0, dx1):
        dy = torch.clamp(ty * dx, min=dy0, max=dy1)
        sig = ah * dx * dx + dy * (b * dx + ch * dy)
        best = sig if best is None else torch.minimum(best, sig)
    for dy in (dy0, dy1):
        dx = torch.clamp(tx * dy, min=dx0, max=dx1)
        best = torch.minimum(best, ah * dx * dx + dy * (b * dx + ch * dy))
    inside = (dx0 <= 0) & (dx1 >= 0) & (dy0 <= 0) & (dy1 >= 0)
    return best.masked_fill_(inside, 0.0)


def build_tile_schedule(
    means2d: Tensor,  # [C, N, 2]
    radii: Tensor,  # [C, N, 2]
    depths: Tensor,  # [C, N]
    width: int,
    height: int,
    tile_size: int = 8,
    block_elements: int | None = None,
    conics: Tensor | None = None,  # [C, N, 3]
    opacities: Tensor | None = None,  # [C, N]
) -> TileSchedule:
    """Vectorised tile intersection (gsplat's ``isect_tiles`` box rule) and work-item batching.

    With ``conics`` and ``opacities``, (tile, Gaussian) pairs whose α is below 1/255 at every pixel centre of the
    tile (exact minimum of the quadratic form over the tile's pixel-centre rectangle, with a safety margin) are
    dropped: they would composite nothing, so the image is unchanged and the blocks get smaller.
    """
    C, N = depths.shape
    device = depths.device
    block_elements = DEFAULT_BLOCK_ELEMENTS if block_elements is None else block_elements
    tw, th = math.ceil(width / tile_size), math.ceil(height / tile_size)
    with torch.no_grad():
        flat_r = radii.reshape(-1, 2)
        vis = ((flat_r > 0).all(-1)).nonzero().squeeze(1)  # [V]
        # Front to back: one global stable depth sort; the stable tile sort below keeps it per tile.
        vis = vis.index_select(
            0, torch.argsort(depths.detach().reshape(-1).index_select(0, vis), stable=True)
        )
        m2 = means2d.detach().reshape(-1, 2).index_select(0, vis)
        r = flat_r.index_select(0, vis).to(torch.float64)
        ts = float(tile_size)
        mx, my = m2[:, 0].double(), m2[:, 1].double()
        x0 = torch.floor((mx - r[:, 0]) / ts).clamp(0, tw).long()
        x1 = torch.ceil((mx + r[:, 0]) / ts).clamp(0, tw).long()
        y0 = torch.floor((my - r[:, 1]) / ts).clamp(0, th).long()
        y1 = torch.ceil((my + r[:, 1]) / ts).clamp(0, th).long()
        nx = x1 - x0
        cnt = nx * (y1 - y0)  # [V]
        tpg = torch.zeros(C * N, dtype=torch.int32, device=device)
        tpg[vis] = cnt.to(torch.int32)
        total = int(cnt.sum())
        g_rep = torch.repeat_interleave(torch.arange(vis.numel(), device=device), cnt)  # [M]
        # One gather of a per-Gaussian integer table (rows: x0, y0, nx, first pair, image tile base).
        itab = torch.stack([x0, y0, nx.clamp_min(1), torch.cumsum(cnt, 0) - cnt, (vis // N) * (th * tw)], 0)
        ig = itab.index_select(1, g_rep)  # [5, M], contiguous rows
        off = torch.arange(total, device=device) - ig[3]
        qy = torch.div(off, ig[2], rounding_mode="floor")
        txx = ig[0] + off - qy * ig[2]
        tyy = ig[1] + qy
        tile = ig[4] + tyy * tw + txx
        if conics is not None and opacities is not None and total:
            fdt = m2.dtype
            cn = conics.detach().reshape(-1, 3).index_select(0, vis)
            lo = torch.log(opacities.detach().reshape(-1).index_select(0, vis))
            ft = torch.cat([m2, cn, lo[:, None]], 1).t().contiguous().index_select(1, g_rep)  # [6, M]
            px0 = txx.to(fdt) * tile_size + 0.5
            py0 = tyy.to(fdt) * tile_size + 0.5
            smin = _min_sigma_on_rect(
                ft[0], ft[1], ft[2], ft[3], ft[4], px0, px0 + (tile_size - 1), py0, py0 + (tile_size - 1)
            )
            # α_max = o·exp(-σ_min) < 1/255 → drop the pair (margin 1e-3 in log space covers float32 rounding).
            keep = ((ft[5] - smin) >= math.log(ALPHA_THRESHOLD) - 1e-3).nonzero().squeeze(1)
            g_rep, tile = g_rep.index_select(0, keep), tile.index_select(0, keep)
        gid = vis.index_select(0, g_rep)
        n_tiles = C * th * tw
        # The narrowest integer key sorts fastest (radix sort).
        key_dtype = torch.int16 if n_tiles < 2**15 else torch.int32 if n_tiles < 2**31 else torch.int64
        perm = torch.argsort(tile.to(key_dtype), stable=True)
        pair_gauss, pair_tile = gid.index_select(0, perm), tile.index_select(0, perm)
        counts = torch.bincount(pair_tile, minlength=n_tiles)
        offsets = torch.cumsum(counts, 0) - counts

        # Work items: non-empty tiles sorted by list length, grouped so that B·P·Gmax stays within budget.
        P = tile_size * tile_size
        nonempty = (counts > 0).nonzero().squeeze(1)
        order = torch.argsort(counts[nonempty], descending=True, stable=True)
        tiles_sorted = nonempty[order]
        cnt_sorted = counts[tiles_sorted].tolist()
        # Tiles holding a Gaussian with opacity > 0.999 need the α clamp (and its gradient mask).
        if opacities is not None:
            hi = (opacities.detach().reshape(-1)[pair_gauss] > ALPHA_MAX).to(torch.int64)
            tile_hi = torch.zeros(n_tiles, dtype=torch.int64, device=device).index_add_(0, pair_tile, hi) > 0
            hi_sorted = torch.cumsum(tile_hi[tiles_sorted].to(torch.int64), 0).tolist()
        else:
            hi_sorted = list(range(1, len(cnt_sorted) + 1))

        def _any_hi(i0: int, i1: int) -> bool:
            return (hi_sorted[i1 - 1] - (hi_sorted[i0 - 1] if i0 > 0 else 0)) > 0

        items = []
        i, T = 0, len(cnt_sorted)
        while i < T:
            G = cnt_sorted[i]
            Gc = min(G, CHUNK)  # a block holds one chunk of Gaussians
            if Gc * P > block_elements:  # tiny budget: split the tile's pixels
                pc = max(1, block_elements // Gc)
                for p0 in range(0, P, pc):
                    items.append((tiles_sorted[i : i + 1], G, p0, min(P, p0 + pc), _any_hi(i, i + 1)))
                i += 1
                continue
            B = min(max(1, block_elements // (Gc * P)), T - i)
            items.append((tiles_sorted[i : i + B], G, 0, P, _any_hi(i, i + B)))
            i += B
    return TileSchedule(
        tile_size, tw, th, C, pair_gauss, pair_tile, offsets, counts, tpg.reshape(C, N), items
    )


def _pixel_features(tile_size: int, dtype: torch.dtype, device) -> Tensor:
    """``[P, 6]`` φ = (x², xy, y², x, y, 1) of pixel centres relative to the tile centre, row-major in the tile."""
    c = torch.arange(tile_size, dtype=dtype, device=device) + 0.5 - tile_size / 2.0
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    x, y = xx.reshape(-1), yy.reshape(-1)
    return torch.stack([x * x, x * y, y * y, x, y, torch.ones_like(x)], dim=-1)


def _alpha_block(phi: Tensor, kb: Tensor, may_clamp: bool = True) -> tuple[Tensor, Tensor | None]:
    """α block ``[B, P, G]`` (clamped at 0.999, zero below 1/255) and the mask of clamped entries (or None).

    ``may_clamp=False`` promises that no opacity in the block exceeds 0.999, which skips the clamp pass.
    """
    a = torch.matmul(phi, kb).exp_()  # exp(log o - σ) = o·exp(-σ)
    clamped = None
    if may_clamp and a.numel() and bool(a.max() > ALPHA_MAX):
        clamped = a > ALPHA_MAX
        a.clamp_(max=ALPHA_MAX)
    # α < 1/255 → 0 (F.threshold keeps x > th, so compare against the next value below 1/255).
    F.threshold(a, _below_threshold(a.dtype), 0.0, inplace=True)
    return a, clamped


@functools.cache
def _below_threshold(dtype: torch.dtype) -> float:
    """The largest value of ``dtype`` below ``ALPHA_THRESHOLD`` (as rounded to ``dtype``)."""
    t = torch.tensor(ALPHA_THRESHOLD, dtype=dtype)
    return torch.nextafter(t, torch.zeros((), dtype=dtype)).item()


def _transmittance(
    a: Tensor, t0: Tensor | None, keep_one_minus: bool
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Transmittance of a chunk and the 1e-4 early stop, applied to ``a`` in place.

    Args:
        a: ``[B, P, G]`` α of the chunk.
        t0: ``[B, P]`` transmittance before the chunk (raw product of all earlier ``1 - α``), or None for 1.
        keep_one_minus: also return ``1 - α`` (before the stop).

    Returns:
        (exclusive T ``[B, P, G]``, α after the stop, ``1 - α`` or None, raw transmittance after the chunk ``[B, P]``).
    """
    B, P, G = a.shape
    om = torch.empty(B, P, G + 1, dtype=a.dtype, device=a.device)
    if t0 is None:
        om[..., 0] = 1.0
    else:
        om[..., 0] = t0
    torch.sub(torch.ones((), dtype=a.dtype), a, out=om[..., 1:])
    if keep_one_minus:
        t = om.cumprod(-1)
        one_minus = om[..., 1:]
    else:
        t = om.cumprod_(-1)
        one_minus = None
    t_incl = t[..., 1:]
    # Raw (unstopped) products never increase along G: a pixel has stopped iff its inclusive T is ≤ 1e-4, and it
    # stays stopped for the rest of its list, which reproduces the CUDA `break` (also across chunks).
    last = t_incl[..., -1].clone()
    if bool((last <= T_EPS).any()):
        a.masked_fill_(t_incl <= T_EPS, 0.0)
    return t[..., :-1], a, one_minus, last


def _chunks(sched: TileSchedule, item, M: int, kpad: Tensor, phi: Tensor, keep: bool):
    """Walk one work item front to back in chunks of ``CHUNK`` Gaussians.

    Yields ``(rows, idx, w, ratio, clamped)`` per chunk: ``rows`` are the item's tiles still active (list not ended,
    some pixel not stopped), ``idx [b, g]`` their pair indices (padded with ``M``), ``w [b, P', g]`` the compositing
    weights and, if ``keep``, ``ratio = α/(1-α)`` after the stop and the clamp mask (or None).
    """
    tiles, G, p0, p1, may_clamp = item
    B = tiles.numel()
    idx_all = _pair_index(sched, tiles, G, M)  # [B, G]
    counts = sched.tile_counts[tiles]  # [B]
    ph = phi[p0:p1]
    t_run = None  # [B, P'] raw transmittance carried between chunks
    rows = None
    for c0 in range(0, G, CHUNK):
        c1 = min(G, c0 + CHUNK)
        if c0 > 0:
            alive = (counts > c0) & (t_run > T_EPS).any(-1)
            rows = alive.nonzero().squeeze(1)
            if rows.numel() == 0:
                return
            if rows.numel() == B:
                rows = None
        idx = idx_all[:, c0:c1] if rows is None else idx_all[rows, c0:c1]
        b, g = idx.shape
        kb = kpad.index_select(0, idx.reshape(-1)).view(b, g, 6).transpose(1, 2)  # [b, 6, g]
        a, clamped = _alpha_block(ph, kb, may_clamp)
        t0 = None if t_run is None else (t_run if rows is None else t_run[rows])
        t_excl, a, one_minus, last = _transmittance(a, t0, keep)
        if keep:
            w = a * t_excl
            ratio = a.div_(one_minus)  # α/(1-α) (α ≤ 0.999; stopped entries have α = 0)
        else:
            w, ratio = a.mul_(t_excl), None
        if t_run is None:
            t_run = last
        elif rows is None:
            t_run = last
        else:
            t_run[rows] = last
        yield rows, idx, w, ratio, clamped


class _Composite(torch.autograd.Function):
    """Front-to-back compositing of all tiles; output ``[n_tiles, P, D+1]`` (last channel: alpha = Σ w).

    The forward pass keeps the per-chunk weights ``w`` and ``α/(1-α)`` for the backward pass when they fit in
    ``SAVE_MAX_ELEMENTS``; otherwise the backward pass recomputes them chunk by chunk.
    """

    @staticmethod
    def forward(ctx, coefs: Tensor, feats: Tensor, pair_feat: Tensor, sched: TileSchedule, phi: Tensor):
        # coefs [M, 6] of n = φ·k per pair; feats [F, D]; pair_feat [M] row of feats used by each pair.
        M = coefs.shape[0]
        Fn, D = feats.shape
        dtype, device = coefs.dtype, coefs.device
        P = phi.shape[0]
        kpad, fe_pad, fpad = _padded_inputs(coefs, feats, pair_feat)
        out = torch.zeros(sched.n_tiles, P, D + 1, dtype=dtype, device=device)
        total = sum(t.numel() * G * (p1 - p0) for t, G, p0, p1, _ in sched.items)
        save = (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]) and total <= SAVE_MAX_ELEMENTS
        saved = []
        for item in sched.items:
            tiles, G, p0, p1, _ = item
            acc = None
            chunks = []
            for rows, idx, w, ratio, clamped in _chunks(sched, item, M, kpad, phi, keep=save):
                b, g = idx.shape
                fb = fe_pad.index_select(0, fpad.index_select(0, idx.reshape(-1))).view(b, g, D + 1)
                res = torch.bmm(w, fb)  # [b, P', D+1]
                if acc is None:
                    acc = res
                elif rows is None:
                    acc += res
                else:
                    acc.index_add_(0, rows, res)
                if save:
                    chunks.append((rows, idx, w, ratio, clamped))
            saved.append(chunks)
            if acc is None:
                continue
            if p0 == 0 and p1 == P:
                out.index_copy_(0, tiles, acc)
            else:
                out[tiles, p0:p1] = acc
        ctx.save_for_backward(coefs, feats, pair_feat, phi)
        ctx.sched = sched
        ctx.blocks = saved if save else None
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        coefs, feats, pair_feat, phi = ctx.saved_tensors
        sched: TileSchedule = ctx.sched
        blocks = ctx.blocks
        ctx.blocks = None
        M = coefs.shape[0]
        Fn, D = feats.shape
        dtype, device = coefs.dtype, coefs.device
        P = phi.shape[0]
        grad_out = grad_out.contiguous()
        kpad, fe_pad, fpad = _padded_inputs(coefs, feats, pair_feat)
        g_coefs = torch.zeros(M + 1, 6, dtype=dtype, device=device)
        g_fe = torch.zeros(Fn + 1, D + 1, dtype=dtype, device=device)
        phi_t = phi.t()
        geometry = ctx.needs_input_grad[0]  # False when only the colours train (frozen geometry, feature lifting)
        for i, item in enumerate(sched.items):
            tiles, G, p0, p1, _ = item
            if blocks is not None:
                chunks = blocks[i]
                blocks[i] = None
            else:
                chunks = list(_chunks(sched, item, M, kpad, phi, keep=True))
            if not chunks:
                continue
            if p0 == 0 and p1 == P:
                g_all = grad_out.index_select(0, tiles)  # [B, P, D+1]
            else:
                g_all = grad_out[tiles, p0:p1]
            s_run = None  # Σ v·w over the later chunks, per pixel [B, P']
            # Back to front: the suffix sums S_k run over the later chunks too.
            for rows, idx, w, ratio, clamped in reversed(chunks):
                b, g = idx.shape
                flat = idx.reshape(-1)
                fidx = fpad.index_select(0, flat)
                fb = fe_pad.index_select(0, fidx).view(b, g, D + 1)
                gg = g_all if rows is None else g_all.index_select(0, rows)
                g_f = torch.bmm(w.transpose(1, 2), gg)  # [b, g, D+1]
                g_fe.index_add_(0, fidx, g_f.reshape(-1, D + 1))
                if not geometry:
                    continue
                # v_k = ∂L/∂w_k = g_c·f_k + g_alpha
                vw = torch.bmm(gg, fb.transpose(1, 2)).mul_(w)  # [b, P', g]
                cs = torch.cumsum(vw, -1)
                tot = cs[..., -1].clone()
                cs.sub_(tot[..., None])  # -(Σ_{j>k in chunk} v_j w_j)
                if s_run is not None:
                    cs.sub_((s_run if rows is None else s_run[rows])[..., None])
                gn = vw.addcmul_(cs, ratio)  # ∂L/∂n = v w - S α/(1-α)
                if clamped is not None:
                    gn.masked_fill_(clamped, 0.0)
                if s_run is None:
                    s_run = torch.zeros(tiles.numel(), p1 - p0, dtype=dtype, device=device)
                if rows is None:
                    s_run += tot
                else:
                    s_run.index_add_(0, rows, tot)
                g_k = torch.matmul(phi_t[:, p0:p1], gn)  # [b, 6, g]
                if p0 == 0 and p1 == P:
                    g_coefs.index_copy_(0, flat, g_k.transpose(1, 2).reshape(-1, 6))
                else:
                    g_coefs.index_add_(0, flat, g_k.transpose(1, 2).reshape(-1, 6))
        return (g_coefs[:M] if geometry else None), g_fe[:Fn, :D], None, None, None


def _padded_inputs(coefs: Tensor, feats: Tensor, pair_feat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Coefficients and features with one padding row each (α = 0, zero features) at index M and F."""
    Fn = feats.shape[0]
    dtype, device = coefs.dtype, coefs.device
    kpad = torch.cat([coefs, torch.tensor([[0, 0, 0, 0, 0, -math.inf]], dtype=dtype, device=device)], 0)
    fe = torch.cat([feats, torch.ones(Fn, 1, dtype=dtype, device=device)], dim=1)  # [F, D+1], ones → alpha
    fe_pad = torch.cat([fe, torch.zeros(1, fe.shape[1], dtype=dtype, device=device)], 0)
    fpad = torch.cat([pair_feat, pair_feat.new_full((1,), Fn)], 0)
    return kpad, fe_pad, fpad


def _pair_index(sched: TileSchedule, tiles: Tensor, G: int, pad: int) -> Tensor:
    """``[B, G]`` pair indices of the tiles' lists, padded with ``pad``."""
    ar = torch.arange(G, device=tiles.device)
    idx = sched.tile_offsets[tiles][:, None] + ar
    return torch.where(ar < sched.tile_counts[tiles][:, None], idx, torch.full_like(idx, pad))


def composite_tiles(
    means2d: Tensor,  # [C, N, 2]
    conics: Tensor,  # [C, N, 3]
    opacities: Tensor,  # [C, N]
    feats: Tensor,  # [C, N, D] or [N, D]
    sched: TileSchedule,
    width: int,
    height: int,
) -> tuple[Tensor, Tensor]:
    """Composite projected Gaussians; returns ``(colors [C, H, W, D], alphas [C, H, W, 1])`` without background."""
    C, N = opacities.shape
    D = feats.shape[-1]
    ts, tw, th = sched.tile_size, sched.tile_width, sched.tile_height
    dtype, device = means2d.dtype, means2d.device
    pg = sched.pair_gauss
    coefs = _pair_coefs(means2d, conics, opacities, sched)  # [M, 6]
    if feats.dim() == 3:
        ff, pair_feat = feats.reshape(C * N, D), pg
    else:
        ff, pair_feat = feats, pg % N
    phi = _pixel_features(ts, dtype, device)
    out = _Composite.apply(coefs, ff, pair_feat, sched, phi)  # [C*TH*TW, P, D+1]
    img = out.view(C, th, tw, ts, ts, D + 1).permute(0, 1, 3, 2, 4, 5).reshape(C, th * ts, tw * ts, D + 1)
    img = img[:, :height, :width]
    return img[..., :D], img[..., D:]


@torch.no_grad()
def composite_adjoint(
    means2d: Tensor,  # [C, N, 2]
    conics: Tensor,  # [C, N, 3]
    opacities: Tensor,  # [C, N]
    sched: TileSchedule,
    grad: Tensor,  # [C, H, W, D]
) -> Tensor:
    """The transpose of compositing: ``Σ_p w_g(p)·grad(p)`` per Gaussian, ``[N, D]`` (summed over the C images).

    Equal to the colour gradient of :func:`composite_tiles` for shared ``[N, D]`` colours and an output gradient
    ``grad`` (the test oracle), but it walks the tiles once, without compositing any colour: the per-chunk weights
    ``w [b, P, g]`` times the tiles' ``grad`` rows, scattered into the Gaussians. Memory: ``[N, D]`` plus ``grad``
    re-tiled, plus one block.
    """
    C, N = opacities.shape
    D = grad.shape[-1]
    ts, tw, th = sched.tile_size, sched.tile_width, sched.tile_height
    dtype, device = means2d.dtype, means2d.device
    H, W = grad.shape[1:3]
    padded = grad.new_zeros(C, th * ts, tw * ts, D)
    padded[:, :H, :W] = grad.to(dtype)
    tiles_grad = padded.view(C, th, ts, tw, ts, D).permute(0, 1, 3, 2, 4, 5).reshape(C * th * tw, ts * ts, D)
    del padded
    coefs = _pair_coefs(means2d, conics, opacities, sched)  # [M, 6]
    M = coefs.shape[0]
    kpad = torch.cat([coefs, torch.tensor([[0, 0, 0, 0, 0, -math.inf]], dtype=dtype, device=device)], 0)
    gauss = torch.cat([sched.pair_gauss % N, sched.pair_gauss.new_full((1,), N)], 0)  # [M+1] padding → row N
    out = torch.zeros(N + 1, D, dtype=dtype, device=device)
    phi = _pixel_features(ts, dtype, device)
    for item in sched.items:
        tiles, _, p0, p1, _ = item
        g_tiles = tiles_grad[tiles, p0:p1]  # [B, P', D]
        for rows, idx, w, _, _ in _chunks(sched, item, M, kpad, phi, keep=False):
            gg = g_tiles if rows is None else g_tiles.index_select(0, rows)
            contrib = torch.bmm(w.transpose(1, 2), gg)  # [b, g, D]
            out.index_add_(0, gauss.index_select(0, idx.reshape(-1)), contrib.reshape(-1, D))
    return out[:N]


def _pair_coefs(means2d: Tensor, conics: Tensor, opacities: Tensor, sched: TileSchedule) -> Tensor:
    """``[M, 6]`` coefficients ``k`` of the tile-local exponent ``n = φ·k`` of every (tile, Gaussian) pair."""
    ts, tw, th = sched.tile_size, sched.tile_width, sched.tile_height
    dtype = means2d.dtype
    pg = sched.pair_gauss
    t_local = sched.pair_tile % (tw * th)
    # Tile centres of each pair, in pixels.
    tcx = (t_local % tw).to(dtype) * ts + ts / 2.0
    tcy = (t_local // tw).to(dtype) * ts + ts / 2.0
    # One gather of a per-Gaussian table (rows u, v, a, b, c, o) for all pairs, contiguous per row.
    tab = torch.cat([means2d.reshape(-1, 2), conics.reshape(-1, 3), opacities.reshape(-1, 1)], 1).t()
    tab = tab.index_select(1, pg)  # [6, M]
    u = tab[0] - tcx
    v = tab[1] - tcy
    a, b, c = tab[2], tab[3], tab[4]
    lo = torch.log(tab[5])
    au_bv = a * u + b * v
    bu_cv = b * u + c * v
    # n(x, y) = log o - σ, σ = ½a(x-u)² + b(x-u)(y-v) + ½c(y-v)²
    return torch.stack(
        [-0.5 * a, -b, -0.5 * c, au_bv, bu_cv, lo - 0.5 * (u * au_bv + v * bu_cv)], dim=-1
    )  # [M, 6]
