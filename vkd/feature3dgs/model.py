"""The Gaussian feature field: 3D Gaussians with SH colour and a view-independent feature, plus the 1x1 decoder.

Parameters live in one ``nn.ParameterDict`` (gsplat's layout, so ``gsplat.strategy.DefaultStrategy`` densifies and
prunes every entry, features included):

=============  ===============  ================================================
key            shape            stored as
=============  ===============  ================================================
``means``      ``[G, 3]``       world coordinates
``scales``     ``[G, 3]``       log scales (activated with ``exp``)
``quats``      ``[G, 4]``       wxyz, unnormalised
``opacities``  ``[G]``          logits (activated with ``sigmoid``)
``sh0``        ``[G, 1, 3]``    SH DC coefficient
``shN``        ``[G, K-1, 3]``  higher SH bands (absent when ``sh_degree == 0``)
``features``   ``[G, N]``       the rendered feature fᵢ (zero-initialised, no SH)
=============  ===============  ================================================

RGB and features are rendered in ONE rasterizer call (``colors = cat([rgb, f], -1)``, ``sh_degree=None``): the SH
colour is evaluated here as gsplat does (``max(SH + 0.5, 0)``) and the background only touches the RGB channels.

The optional decoder is ``Conv2d(N, M, 1)``, i.e. ``W·F + b`` per pixel. Because it is affine, it folds into
per-Gaussian teacher-space features ``gᵢ = W·fᵢ + b`` (spec §3), which text queries use.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vkd.render import project_gaussians, rasterization
from vkd.render.sh import num_sh_bases, rgb_to_sh, sh_to_color

__all__ = ["GaussianField", "knn_scales", "row_bands", "PARAM_KEYS"]

PARAM_KEYS = ("means", "scales", "quats", "opacities", "sh0", "shN", "features")
# A row band of a banded render takes every Gaussian whose radius box comes within this many pixels of it: both
# backends composite a Gaussian at most one tile (torch 8 px, gsplat 16 px) beyond its box, so the band's pixels
# see exactly the Gaussians, in the same depth order, of a whole-frame render.
BAND_MARGIN = 16
# Tile of the pair estimate that sizes the bands: the torch backend's, whose per-pair working set dominates memory.
BAND_ESTIMATE_TILE = 8


def row_bands(means2d: Tensor, radii: Tensor, width: int, height: int, max_pairs: int,
              tile: int = BAND_ESTIMATE_TILE) -> list[tuple[int, int]]:
    """Split the image rows into bands of at most ``max_pairs`` estimated (tile, Gaussian) pairs each.

    The estimate is the rasterizers' box rule on ``tile``-pixel tiles, counted per tile row; a band holds at least
    one tile row, so a single row with more pairs than ``max_pairs`` is still one band.

    Args:
        means2d: ``[C, G, 2]`` projected centres (pixels).
        radii: ``[C, G, 2]`` integer radii (0: culled), as :func:`vkd.render.project_gaussians` returns them.
        width, height: image size.
        max_pairs: pair budget of one band.
        tile: tile size of the estimate.

    Returns:
        ``[(y0, y1), ...]`` pixel row ranges covering ``[0, height)`` in order.
    """
    tw, th = math.ceil(width / tile), math.ceil(height / tile)
    r = radii.reshape(-1, 2).double()
    m = means2d.detach().reshape(-1, 2).double()
    vis = (r > 0).all(-1)
    r, m = r[vis], m[vis]
    x0 = torch.floor((m[:, 0] - r[:, 0]) / tile).clamp(0, tw)
    x1 = torch.ceil((m[:, 0] + r[:, 0]) / tile).clamp(0, tw)
    y0 = torch.floor((m[:, 1] - r[:, 1]) / tile).clamp(0, th).long()
    y1 = torch.ceil((m[:, 1] + r[:, 1]) / tile).clamp(0, th).long()
    nx = (x1 - x0).cpu()  # [V] tiles per covered tile row
    diff = torch.zeros(th + 1, dtype=torch.float64)
    diff.index_add_(0, y0.cpu(), nx)
    diff.index_add_(0, y1.cpu(), -nx)
    per_row = torch.cumsum(diff, 0)[:th].tolist()  # [th] pairs per tile row
    bands, start, acc = [], 0, 0.0
    for row, pairs in enumerate(per_row):
        if row > start and acc + pairs > max_pairs:
            bands.append((start * tile, row * tile))
            start, acc = row, 0.0
        acc += pairs
    bands.append((start * tile, height))
    return bands


def knn_scales(points: Tensor, k: int = 3) -> Tensor:
    """3DGS initial scale: ``sqrt(mean squared distance to the k nearest neighbours)`` per point.

    Args:
        points: ``[P, 3]``.
        k: neighbours.

    Returns:
        ``[P]`` positive distances.
    """
    from scipy.spatial import (
        cKDTree,  # on use: slow to import; only point init needs it
    )

    pts = points.detach().double().cpu().numpy()
    if len(pts) < 2:
        return torch.full((len(pts),), 0.01, dtype=points.dtype)
    k_eff = min(k, len(pts) - 1)
    dist, _ = cKDTree(pts).query(pts, k=k_eff + 1)
    d2 = np.mean(np.asarray(dist).reshape(len(pts), -1)[:, 1:] ** 2, axis=1)
    d = np.sqrt(np.maximum(d2, 1e-14))
    d = np.where(np.isfinite(d) & (d > 0), d, np.median(d[d > 0]) if (d > 0).any() else 0.01)
    return torch.from_numpy(d).to(points.dtype)


class GaussianField(nn.Module):
    """Gaussians with SH colour and a ``render_dim``-wide feature, and an optional 1x1 decoder to ``teacher_dim``.

    Args:
        num: number of Gaussians G.
        render_dim: rendered feature width N.
        teacher_dim: teacher feature width M (the decoder's output); ``None`` or equal to N without a decoder.
        sh_degree: maximum SH degree (0..3).
        decoder: build the 1x1 conv decoder ``N -> M``.
    """

    def __init__(self, num: int, render_dim: int, teacher_dim: int | None = None, sh_degree: int = 3,
                 decoder: bool = True):
        super().__init__()
        if render_dim < 1:
            raise ValueError(f"render_dim must be >= 1, got {render_dim}")
        teacher_dim = render_dim if teacher_dim is None else int(teacher_dim)
        if not decoder and teacher_dim != render_dim:
            raise ValueError(f"without a decoder render_dim ({render_dim}) must equal teacher_dim ({teacher_dim})")
        self.render_dim = int(render_dim)
        self.teacher_dim = teacher_dim
        self.sh_degree = int(sh_degree)
        self.active_sh_degree = 0
        # Render settings of the run (plain attributes, like the active SH degree): every render that does not pass
        # its own uses them, so evaluation, samples and `vkd render` draw the field the way it was trained.
        self.rasterize_mode = "classic"
        self.backend = "auto"
        k = num_sh_bases(self.sh_degree)
        params = {
            "means": torch.zeros(num, 3),
            "scales": torch.full((num, 3), math.log(0.01)),
            "quats": torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(num, 1),
            "opacities": torch.full((num,), -2.0),
            "sh0": torch.zeros(num, 1, 3),
            "features": torch.zeros(num, self.render_dim),
        }
        if k > 1:
            params["shN"] = torch.zeros(num, k - 1, 3)
        self.params = nn.ParameterDict({name: nn.Parameter(v) for name, v in params.items()})
        self.decoder = nn.Conv2d(self.render_dim, teacher_dim, kernel_size=1) if decoder else None

    # ---- construction ----------------------------------------------------------------------------------------
    @classmethod
    def from_points(cls, points: Tensor, colors: Tensor | None, render_dim: int, teacher_dim: int | None = None,
                    sh_degree: int = 3, decoder: bool = True, init_opacity: float = 0.1, init_scale: float = 1.0,
                    generator: torch.Generator | None = None) -> GaussianField:
        """3DGS initialisation: one Gaussian per point, isotropic scale from 3-NN distances, identity rotation.

        Args:
            points: ``[P, 3]`` positions.
            colors: ``[P, 3]`` RGB in [0, 1] (``None``: random colours).
            render_dim, teacher_dim, sh_degree, decoder: see the class.
            init_opacity: initial opacity in (0, 1).
            init_scale: multiplier on the NN scale.
        """
        if points.ndim != 2 or points.shape[-1] != 3 or points.shape[0] == 0:
            raise ValueError(f"points must be a non-empty [P, 3], got {tuple(points.shape)}")
        field = cls(points.shape[0], render_dim, teacher_dim, sh_degree, decoder)
        if colors is None:
            colors = torch.rand(points.shape[0], 3, generator=generator)
        with torch.no_grad():
            p = field.params
            p["means"].copy_(points.float())
            p["scales"].copy_(torch.log(knn_scales(points.float()) * init_scale)[:, None].expand(-1, 3))
            p["opacities"].fill_(math.log(init_opacity / (1 - init_opacity)))
            p["sh0"].copy_(rgb_to_sh(colors.float().clamp(0, 1))[:, None, :])
        return field

    @classmethod
    def random(cls, num: int, center: Tensor, half_extent: float, render_dim: int, teacher_dim: int | None = None,
               sh_degree: int = 3, decoder: bool = True, init_opacity: float = 0.1, init_scale: float = 1.0,
               generator: torch.Generator | None = None) -> GaussianField:
        """Random initialisation (3DGS on NeRF-synthetic): ``num`` points uniform in a cube, random colours."""
        pts = center.float() + (torch.rand(num, 3, generator=generator) * 2 - 1) * half_extent
        return cls.from_points(pts, torch.rand(num, 3, generator=generator), render_dim, teacher_dim, sh_degree,
                               decoder, init_opacity, init_scale)

    @classmethod
    def from_gaussians(cls, gaussians: dict[str, Tensor], render_dim: int, teacher_dim: int | None = None,
                       sh_degree: int = 3, decoder: bool = True) -> GaussianField:
        """A field whose Gaussians are given (an imported 3DGS scene, :func:`~vkd.feature3dgs.ply.read_gaussian_ply`).

        The SH bands are fitted to ``sh_degree``: missing higher bands are zeros (the colours are unchanged), bands
        above it are dropped (the view-dependent colour loses them). Features start at zero, as in every init; the
        active SH degree is the source's (capped at ``sh_degree``), since the scene was trained with it.

        Args:
            gaussians: ``means [G, 3]``, ``scales [G, 3]`` (log), ``quats [G, 4]`` (wxyz), ``opacities [G]``
                (logits), ``sh0 [G, 1, 3]`` and ``shN [G, K'-1, 3]`` (may be ``[G, 0, 3]``); arrays or tensors.
            render_dim, teacher_dim, sh_degree, decoder: see the class.
        """
        g = {k: torch.as_tensor(np.asarray(gaussians[k]), dtype=torch.float32)
             for k in ("means", "scales", "quats", "opacities", "sh0", "shN")}
        num = g["means"].shape[0]
        expected = {"means": (num, 3), "scales": (num, 3), "quats": (num, 4), "opacities": (num,), "sh0": (num, 1, 3)}
        for key, shape in expected.items():
            if tuple(g[key].shape) != shape:
                raise ValueError(f"gaussians[{key!r}] must be {list(shape)}, got {list(g[key].shape)}")
        source_bases = g["shN"].shape[1] + 1  # K' = (d' + 1)^2
        source_degree = math.isqrt(source_bases) - 1
        if g["shN"].ndim != 3 or g["shN"].shape[0] != num or g["shN"].shape[2] != 3 or \
                (source_degree + 1) ** 2 != source_bases:
            raise ValueError(f"gaussians['shN'] must be [G, (d + 1)^2 - 1, 3], got {list(g['shN'].shape)}")
        field = cls(num, render_dim, teacher_dim, sh_degree, decoder)
        with torch.no_grad():
            p = field.params
            for key in ("means", "scales", "quats", "opacities", "sh0"):
                p[key].copy_(g[key])
            if "shN" in p:
                keep = min(p["shN"].shape[1], g["shN"].shape[1])  # bands both have; the rest stays zero
                p["shN"][:, :keep].copy_(g["shN"][:, :keep])
        field.active_sh_degree = min(source_degree, field.sh_degree)
        return field

    # ---- accessors -------------------------------------------------------------------------------------------
    @property
    def num_gaussians(self) -> int:
        return int(self.params["means"].shape[0])

    def sh_coeffs(self) -> Tensor:
        """``[G, K, 3]`` all SH coefficients."""
        if "shN" in self.params:
            return torch.cat([self.params["sh0"], self.params["shN"]], 1)
        return self.params["sh0"]

    def activated(self, opacity_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(means, quats, scales, opacities) in rasterizer form; ``opacity_mask [G]`` multiplies opacities."""
        p = self.params
        opac = torch.sigmoid(p["opacities"])
        if opacity_mask is not None:
            opac = opac * opacity_mask.to(opac.dtype)
        return p["means"], p["quats"], torch.exp(p["scales"]), opac

    def colors(self, viewmats: Tensor, sh_degree: int | None = None) -> Tensor:
        """SH colours ``max(SH + 0.5, 0)``: ``[G, 3]`` at degree 0, else ``[C, G, 3]`` (one per camera)."""
        deg = self.active_sh_degree if sh_degree is None else min(sh_degree, self.sh_degree)
        coeffs = self.sh_coeffs()
        if deg == 0:
            return sh_to_color(0, torch.ones_like(self.params["means"]), coeffs[:, :1])
        R, t = viewmats[:, :3, :3], viewmats[:, :3, 3]
        cam_centers = -(R.transpose(1, 2) @ t[..., None])[..., 0]  # [C, 3]
        dirs = self.params["means"][None] - cam_centers[:, None]  # [C, G, 3]
        return sh_to_color(deg, dirs, coeffs[None].expand(dirs.shape[0], -1, -1, -1))

    # ---- rendering -------------------------------------------------------------------------------------------
    def render(self, viewmats: Tensor, Ks: Tensor, width: int, height: int, background: Tensor | None = None,
               features: Tensor | None | bool = True, depth: bool = False, sh_degree: int | None = None,
               opacity_mask: Tensor | None = None, backend: str | None = None, rasterize_mode: str | None = None,
               max_pairs: int | None = None) -> dict[str, Tensor | dict]:
        """Render RGB (and features, and expected depth) in one rasterizer call (or one per row band).

        Args:
            viewmats: ``[C, 4, 4]`` world-to-camera (OpenCV).
            Ks: ``[C, 3, 3]`` intrinsics.
            width, height: image size.
            background: ``[3]`` or ``[C, 3]`` RGB background (features get none).
            features: ``True`` renders ``params["features"]``; a ``[G, D]`` tensor renders those per-Gaussian
                values instead (e.g. folded teacher-space features); ``False``/``None`` renders RGB only.
            depth: also return the expected depth ``Σwz/Σw`` (``render_mode="RGB+ED"``).
            sh_degree: SH degree to evaluate (default: the active degree).
            opacity_mask: ``[G]`` multiplier on opacities (extraction / deletion).
            backend: rasterizer backend (default: the field's :attr:`backend`).
            rasterize_mode: ``classic`` or ``antialiased`` (default: the field's :attr:`rasterize_mode`).
            max_pairs: without autograd, bound the rasterizer's working memory (which grows with the number of
                (tile, Gaussian) pairs) by rendering row bands of at most this many estimated pairs
                (:func:`row_bands`), each with only the Gaussians that reach it (see ``BAND_MARGIN``): the image
                is that of one call up to rounding. ``None`` (and any render with autograd): one call.

        Returns:
            dict with ``rgb [C, H, W, 3]``, ``alpha [C, H, W, 1]``, ``meta``, and ``features [C, H, W, D]`` /
            ``depth [C, H, W, 1]`` when requested. A banded render's ``meta`` only holds ``bands``.
        """
        if viewmats.ndim != 3 or viewmats.shape[-2:] != (4, 4):
            raise ValueError(f"viewmats must be [C, 4, 4], got {tuple(viewmats.shape)}")
        C = viewmats.shape[0]
        means, quats, scales, opac = self.activated(opacity_mask)
        rgb = self.colors(viewmats, sh_degree)  # [G, 3] or [C, G, 3]
        feat = None
        if features is True:
            feat = self.params["features"]
        elif isinstance(features, Tensor):
            if features.ndim != 2 or features.shape[0] != self.num_gaussians:
                raise ValueError(f"features must be [G, D] with G={self.num_gaussians}, got {tuple(features.shape)}")
            feat = features
        if feat is not None:
            if rgb.ndim == 3:
                feat = feat[None].expand(C, -1, -1)
            colors = torch.cat([rgb, feat.to(rgb.dtype)], -1)
        else:
            colors = rgb
        bg = None
        if background is not None:
            bg_rgb = background.to(rgb.dtype).reshape(-1, 3).expand(C, 3)
            bg = torch.cat([bg_rgb, bg_rgb.new_zeros(C, colors.shape[-1] - 3)], -1)
        mode = rasterize_mode or self.rasterize_mode
        settings = dict(sh_degree=None, backgrounds=bg, render_mode="RGB+ED" if depth else "RGB", packed=False,
                        rasterize_mode=mode, backend=backend or self.backend)
        bands = None
        if max_pairs is not None and not torch.is_grad_enabled():
            proj = project_gaussians(means, quats, scales, opac, viewmats.to(means.dtype), Ks.to(means.dtype),
                                     width, height, antialiased=mode == "antialiased")
            bands = row_bands(proj["means2d"], proj["radii"], width, height, max_pairs)
        if bands is None or len(bands) == 1:
            out, alpha, meta = rasterization(means, quats, scales, opac, colors, viewmats, Ks, width, height,
                                             **settings)
        else:
            out, alpha = self._render_bands(bands, proj, means, quats, scales, opac, colors, bg, viewmats, Ks,
                                            width, height, depth, settings)
            meta = {"bands": bands}
        result: dict[str, Tensor | dict] = {"rgb": out[..., :3], "alpha": alpha, "meta": meta}
        if feat is not None:
            result["features"] = out[..., 3:3 + feat.shape[-1]]
        if depth:
            result["depth"] = out[..., -1:]
        return result

    @staticmethod
    def _render_bands(bands: list[tuple[int, int]], proj: dict[str, Tensor], means: Tensor, quats: Tensor,
                      scales: Tensor, opac: Tensor, colors: Tensor, bg: Tensor | None, viewmats: Tensor, Ks: Tensor,
                      width: int, height: int, depth: bool, settings: dict) -> tuple[Tensor, Tensor]:
        """One whole-frame rasterization per row band, with the Gaussians whose box reaches the band; the band's
        rows are kept. Returns ``out [C, H, W, D (+1)]`` and ``alpha [C, H, W, 1]``."""
        C, D = viewmats.shape[0], colors.shape[-1]
        out = colors.new_zeros(C, height, width, D + int(depth))
        alpha = colors.new_zeros(C, height, width, 1)
        if bg is not None:
            out[..., :D] = bg[:, None, None, :]  # rows no Gaussian reaches: background, alpha 0, depth 0
        v, ry = proj["means2d"][..., 1], proj["radii"][..., 1].to(means.dtype)  # [C, G]
        seen = (proj["radii"] > 0).all(-1)  # [C, G]
        for y0, y1 in bands:
            near = seen & (v + ry > y0 - BAND_MARGIN) & (v - ry < y1 + BAND_MARGIN)
            idx = near.any(0).nonzero().squeeze(1)  # [g]
            if idx.numel() == 0:
                continue
            o, a, _ = rasterization(means[idx], quats[idx], scales[idx], opac[idx], colors.index_select(-2, idx),
                                    viewmats, Ks, width, height, **settings)
            out[:, y0:y1], alpha[:, y0:y1] = o[:, y0:y1], a[:, y0:y1]
            del o, a
        return out, alpha

    # ---- decoder ---------------------------------------------------------------------------------------------
    def decode(self, feature_maps: Tensor) -> Tensor:
        """Apply the 1x1 decoder to ``[B, N, h, w]`` rendered maps -> ``[B, M, h, w]`` (identity without one)."""
        if self.decoder is None:
            return feature_maps
        return self.decoder(feature_maps)

    def folded_features(self) -> Tensor:
        """Per-Gaussian teacher-space features ``gᵢ = W·fᵢ + b`` ``[G, M]`` (``fᵢ`` without a decoder)."""
        f = self.params["features"]
        if self.decoder is None:
            return f
        W = self.decoder.weight[:, :, 0, 0]  # [M, N]
        b = self.decoder.bias if self.decoder.bias is not None else torch.zeros(W.shape[0], dtype=f.dtype)
        return F.linear(f, W, b)

    # ---- shape changes (densification, checkpoints) ----------------------------------------------------------
    def resize_to(self, state: dict[str, Tensor], prefix: str = "params.") -> None:
        """Re-create the parameters with the shapes found in a state dict (before ``load_state_dict``)."""
        for name in list(self.params.keys()):
            key = prefix + name
            if key in state and state[key].shape != self.params[name].shape:
                self.params[name] = nn.Parameter(torch.empty(state[key].shape, dtype=self.params[name].dtype,
                                                             device=self.params[name].device))
