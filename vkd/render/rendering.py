"""``vkd.render.rasterization``: gsplat's ``rasterization`` API on two backends (torch on any device, gsplat on CUDA).

Conventions are gsplat's (spec ``render.md`` §2): wxyz quaternions (normalised internally), activated scales and
opacities, world-to-camera ``viewmats`` in OpenCV camera axes (x right, y down, +z forward), pinhole ``Ks`` in pixels,
pixel centres at ``+0.5``. Only the unbatched, unpacked, pinhole subset is supported.
"""

from __future__ import annotations

import numbers
from typing import Literal

import torch
from torch import Tensor

from vkd.render import gsplat_backend as _gs
from vkd.render.sh import sh_to_color
from vkd.render.torch_backend import (
    TORCH_TILE_SIZE,
    build_tile_schedule,
    composite_adjoint,
    composite_tiles,
    project_gaussians,
)

__all__ = ["rasterization", "rasterization_adjoint", "RENDER_MODES", "RASTERIZE_MODES", "BACKENDS"]

RENDER_MODES = ("RGB", "D", "ED", "RGB+D", "RGB+ED")
RASTERIZE_MODES = ("classic", "antialiased")
BACKENDS = ("auto", "torch", "gsplat")


def _shape(t) -> str:
    return str(list(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def _validate(
    means,
    quats,
    scales,
    opacities,
    colors,
    viewmats,
    Ks,
    width,
    height,
    sh_degree,
    backgrounds,
    render_mode,
    rasterize_mode,
    backend,
    tile_size,
) -> tuple[int, int, int]:
    """Checks shapes, dtypes and values; returns (N, C, D) where D is the colour width before depth is appended."""
    for name, t in [
        ("means", means),
        ("quats", quats),
        ("scales", scales),
        ("opacities", opacities),
        ("colors", colors),
        ("viewmats", viewmats),
        ("Ks", Ks),
    ]:
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if means.ndim != 2 or means.shape[-1] != 3:
        raise ValueError(f"means must be [N, 3] (batch dims are not supported), got shape {_shape(means)}")
    N = means.shape[0]
    if quats.shape != (N, 4):
        raise ValueError(f"quats must be [N, 4]=[{N}, 4] (wxyz), got shape {_shape(quats)}")
    if scales.shape != (N, 3):
        raise ValueError(f"scales must be [N, 3]=[{N}, 3], got shape {_shape(scales)}")
    if opacities.shape != (N,):
        raise ValueError(f"opacities must be [N]=[{N}], got shape {_shape(opacities)}")
    if viewmats.ndim != 3 or viewmats.shape[1:] != (4, 4) or viewmats.shape[0] < 1:
        raise ValueError(f"viewmats must be [C, 4, 4] with C >= 1, got shape {_shape(viewmats)}")
    C = viewmats.shape[0]
    if Ks.shape != (C, 3, 3):
        raise ValueError(f"Ks must be [C, 3, 3]=[{C}, 3, 3], got shape {_shape(Ks)}")
    if not means.is_floating_point():
        raise ValueError(f"means must be floating point, got dtype {means.dtype}")
    for name, t in [("quats", quats), ("scales", scales), ("opacities", opacities), ("colors", colors)]:
        if t.dtype != means.dtype:
            raise ValueError(
                f"{name} must have the dtype of means ({means.dtype}), got {t.dtype} (shape {_shape(t)})"
            )
    if sh_degree is None:
        if colors.ndim == 2 and colors.shape[0] == N:
            D = colors.shape[1]
        elif colors.ndim == 3 and colors.shape[:2] == (C, N):
            D = colors.shape[2]
        else:
            raise ValueError(
                f"colors must be [N, D]=[{N}, D] or [C, N, D]=[{C}, {N}, D], got shape {_shape(colors)}"
            )
        if D < 1:
            raise ValueError(f"colors must have D >= 1 channels, got shape {_shape(colors)}")
    else:
        if not isinstance(sh_degree, int) or not 0 <= sh_degree <= 4:
            raise ValueError(f"sh_degree must be None or an int in 0..4, got {sh_degree!r}")
        K = (sh_degree + 1) ** 2
        ok = (colors.ndim == 3 and colors.shape[0] == N) or (colors.ndim == 4 and colors.shape[:2] == (C, N))
        if not ok or colors.shape[-1] != 3 or colors.shape[-2] < K:
            raise ValueError(
                f"colors must be SH coefficients [N, K, 3] or [C, N, K, 3] with K >= {K} for sh_degree={sh_degree}, "
                f"got shape {_shape(colors)}"
            )
        D = 3
    if isinstance(width, bool) or not isinstance(width, numbers.Integral):
        raise ValueError(f"width must be an int, got {width!r}")
    if isinstance(height, bool) or not isinstance(height, numbers.Integral):
        raise ValueError(f"height must be an int, got {height!r}")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got width={width}, height={height}")
    if backgrounds is not None:
        if not isinstance(backgrounds, Tensor) or backgrounds.shape != (C, D):
            raise ValueError(f"backgrounds must be [C, D]=[{C}, {D}], got shape {_shape(backgrounds)}")
    if render_mode not in RENDER_MODES:
        raise ValueError(f"render_mode must be one of {RENDER_MODES}, got {render_mode!r}")
    if rasterize_mode not in RASTERIZE_MODES:
        raise ValueError(f"rasterize_mode must be one of {RASTERIZE_MODES}, got {rasterize_mode!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(f"tile_size must be a positive int, got {tile_size!r}")
    for name, t in [
        ("means", means),
        ("quats", quats),
        ("scales", scales),
        ("opacities", opacities),
        ("colors", colors),
        ("viewmats", viewmats),
        ("Ks", Ks),
        ("backgrounds", backgrounds),
    ]:
        if t is not None and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} (shape {_shape(t)}) contains non-finite values")
    return N, C, D


def rasterization(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4]
    scales: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    colors: Tensor,  # [N, D] or [C, N, D], or SH [N, K, 3] / [C, N, K, 3]
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    eps2d: float = 0.3,
    sh_degree: int | None = None,
    packed: bool = False,
    tile_size: int = 16,
    backgrounds: Tensor | None = None,  # [C, D]
    render_mode: Literal["RGB", "D", "ED", "RGB+D", "RGB+ED"] = "RGB",
    sparse_grad: bool = False,
    absgrad: bool = False,
    rasterize_mode: Literal["classic", "antialiased"] = "classic",
    channel_chunk: int = 32,
    camera_model: str = "pinhole",
    backend: Literal["auto", "torch", "gsplat"] = "auto",
) -> tuple[Tensor, Tensor, dict]:
    """Rasterize 3D Gaussians into ``C`` images (gsplat-compatible).

    Args:
        means: ``[N, 3]`` world-space centres.
        quats: ``[N, 4]`` wxyz rotations (normalised internally).
        scales: ``[N, 3]`` activated (positive) scales.
        opacities: ``[N]`` activated opacities in [0, 1].
        colors: ``[N, D]`` or ``[C, N, D]`` post-activation features of any width ``D ≥ 1``; with ``sh_degree``,
            SH coefficients ``[N, K, 3]`` or ``[C, N, K, 3]`` giving ``max(SH + 0.5, 0)`` as in gsplat.
        viewmats: ``[C, 4, 4]`` world-to-camera matrices (OpenCV axes).
        Ks: ``[C, 3, 3]`` pinhole intrinsics (not differentiated).
        width: image width W (> 0).
        height: image height H (> 0).
        near_plane: Gaussians with camera ``z < near_plane`` are culled.
        far_plane: Gaussians with camera ``z > far_plane`` are culled.
        radius_clip: Gaussians whose 2D radii are both ``≤ radius_clip`` pixels are culled.
        eps2d: blur added to the 2D covariance diagonal.
        sh_degree: None for plain features, else the SH degree (0..4).
        packed: must be False (the unpacked layout is the only one supported).
        tile_size: tile size in pixels (gsplat: tiling; torch backend: also its compositing block).
        backgrounds: ``[C, D]`` colour added as ``T_final · bg``.
        render_mode: ``RGB | D | ED | RGB+D | RGB+ED`` (depth appended as the last channel).
        sparse_grad: must be False.
        absgrad: must be False (``means2d.absgrad`` is not implemented).
        rasterize_mode: ``classic`` or ``antialiased`` (Mip-Splatting opacity compensation).
        channel_chunk: gsplat's channels per pass (gsplat backend only).
        camera_model: must be ``"pinhole"``.
        backend: ``auto`` (gsplat when eligible, see :mod:`vkd.render.gsplat_backend`), ``torch`` or ``gsplat``.

    Returns:
        ``render_colors [C, H, W, X]`` (X = D, 1 or D+1 by render mode), ``render_alphas [C, H, W, 1]`` and ``meta``
        in gsplat's unpacked layout (``means2d [C, N, 2]`` on the autograd path, ``radii [C, N, 2]`` int32,
        ``depths``, ``conics``, ``opacities``, ``gaussian_ids=None``, ``width``, ``height``, ``n_cameras``,
        ``tile_size``, ...), so ``gsplat.strategy.DefaultStrategy`` works unchanged. ``meta["backend"]`` names the
        backend that rendered.

    Examples:
        >>> import torch
        >>> from vkd.render import c2w_to_viewmat, intrinsics_from_fov, look_at, rasterization
        >>> g = torch.Generator().manual_seed(0)
        >>> means = 0.3 * torch.randn(100, 3, generator=g)  # [N, 3]
        >>> quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(100, 1)  # [N, 4]
        >>> scales, opacities = torch.full((100, 3), 0.05), torch.full((100,), 0.8)  # [N, 3], [N]
        >>> colors = torch.rand(100, 3, generator=g)  # [N, 3]
        >>> viewmats = c2w_to_viewmat(look_at(torch.tensor([0.0, -3.0, 0.0]), torch.zeros(3)))[None]  # [1, 4, 4]
        >>> Ks = intrinsics_from_fov(64, 48, fov_x=60.0)[None]  # [1, 3, 3]
        >>> rgb, alpha, meta = rasterization(means, quats, scales, opacities, colors, viewmats, Ks, 64, 48,
        ...                                  backend="torch")
        >>> rgb.shape, alpha.shape, meta["backend"]
        (torch.Size([1, 48, 64, 3]), torch.Size([1, 48, 64, 1]), 'torch')
    """
    if packed:
        raise ValueError("packed=True is not supported by vkd.render.rasterization; use packed=False")
    if absgrad:
        raise ValueError(
            "absgrad=True is not supported by vkd.render.rasterization (means2d.absgrad is not computed)"
        )
    if sparse_grad:
        raise ValueError("sparse_grad=True is not supported by vkd.render.rasterization")
    if camera_model != "pinhole":
        raise ValueError(f"camera_model must be 'pinhole', got {camera_model!r}")
    # Both backends composite in the parameters' precision (gsplat's kernels and the torch compositor's
    # accumulators are float32): inside a bf16/fp16 autocast region, colours computed under autocast are cast back
    # and autocast is off for the rasterization itself.
    low = (torch.bfloat16, torch.float16)
    if isinstance(means, Tensor) and means.dtype not in low:
        if isinstance(colors, Tensor) and colors.dtype in low:
            colors = colors.to(means.dtype)
        if isinstance(backgrounds, Tensor) and backgrounds.dtype in low:
            backgrounds = backgrounds.to(means.dtype)
    N, C, D = _validate(
        means,
        quats,
        scales,
        opacities,
        colors,
        viewmats,
        Ks,
        width,
        height,
        sh_degree,
        backgrounds,
        render_mode,
        rasterize_mode,
        backend,
        tile_size,
    )
    width, height = int(width), int(height)
    args = dict(
        means=means,
        quats=quats,
        scales=scales,
        opacities=opacities,
        colors=colors,
        viewmats=viewmats,
        Ks=Ks,
        width=width,
        height=height,
        near_plane=near_plane,
        far_plane=far_plane,
        radius_clip=radius_clip,
        eps2d=eps2d,
        sh_degree=sh_degree,
        tile_size=tile_size,
        backgrounds=backgrounds,
        render_mode=render_mode,
        rasterize_mode=rasterize_mode,
    )
    with torch.autocast(means.device.type, enabled=False):
        return _dispatch(backend, channel_chunk, args)


def _dispatch(backend: str, channel_chunk: int, args: dict) -> tuple[Tensor, Tensor, dict]:
    """gsplat when asked for or eligible, else torch; CUDA inputs that gsplat cannot render stop ``auto``."""
    tensors = [args[k] for k in ("means", "quats", "scales", "opacities", "colors", "viewmats", "Ks", "backgrounds")]
    if backend in ("auto", "gsplat"):
        ok, why = _gs.gsplat_eligible(tensors)
        if backend == "gsplat":
            if not ok:
                raise RuntimeError(f"backend='gsplat' is not usable: {why}")
            if not 1 <= channel_chunk <= 513:
                raise ValueError(
                    f"channel_chunk must be in 1..513 for the gsplat backend, got {channel_chunk}"
                )
            try:
                out = _gs.gsplat_rasterize(channel_chunk=channel_chunk, **args)
            except _gs.GSPLAT_BUILD_ERRORS as e:
                raise RuntimeError(f"gsplat.rasterization failed: {type(e).__name__}: {e}") from e
            out[2]["backend"] = "gsplat"
            return out
        if ok and 1 <= channel_chunk <= 513:
            try:
                out = _gs.gsplat_rasterize(channel_chunk=channel_chunk, **args)
                out[2]["backend"] = "gsplat"
                return out
            except torch.cuda.OutOfMemoryError:
                raise  # out of memory is not a broken build: the torch backend would need more
            except _gs.GSPLAT_BUILD_ERRORS as e:
                if _gs.gsplat_status() is True:
                    raise  # gsplat worked before in this process: a real error of this call
                _gs.disable_gsplat(e)
                raise _gs.GsplatUnavailable(_gs.unavailable_message(e)) from e
        if ok is False and _gs.cuda_inputs(tensors):  # CUDA tensors, yet gsplat cannot run: say why, do not crawl
            raise _gs.GsplatUnavailable(_gs.unavailable_message(why))
    return _torch_rasterization(**args)


def _torch_rasterization(
    means,
    quats,
    scales,
    opacities,
    colors,
    viewmats,
    Ks,
    width,
    height,
    near_plane,
    far_plane,
    radius_clip,
    eps2d,
    sh_degree,
    tile_size,
    backgrounds,
    render_mode,
    rasterize_mode,
) -> tuple[Tensor, Tensor, dict]:
    C = viewmats.shape[0]
    dtype = means.dtype
    viewmats = viewmats.to(dtype)
    Ks = Ks.to(dtype).detach()
    proj = project_gaussians(
        means,
        quats,
        scales,
        opacities,
        viewmats,
        Ks,
        width,
        height,
        near_plane=near_plane,
        far_plane=far_plane,
        radius_clip=radius_clip,
        eps2d=eps2d,
        antialiased=rasterize_mode == "antialiased",
    )
    means2d, conics, depths, opac, radii = (
        proj["means2d"],
        proj["conics"],
        proj["depths"],
        proj["opacities"],
        proj["radii"],
    )
    if sh_degree is not None:
        campos = torch.linalg.inv(viewmats)[:, :3, 3]  # [C, 3]
        dirs = means[None, :, :] - campos[:, None, :]  # [C, N, 3]
        coeffs = colors if colors.ndim == 4 else colors[None].expand((C,) + tuple(colors.shape))
        feats = sh_to_color(sh_degree, dirs, coeffs)  # [C, N, 3]
    else:
        feats = colors  # [N, D] or [C, N, D]
    bg = backgrounds.to(dtype) if backgrounds is not None else None
    if render_mode in ("RGB+D", "RGB+ED"):
        if feats.ndim == 2:
            feats = feats[None].expand(C, -1, -1)
        feats = torch.cat([feats, depths[..., None]], dim=-1)
        if bg is not None:
            bg = torch.cat([bg, bg.new_zeros(C, 1)], dim=-1)
    elif render_mode in ("D", "ED"):
        feats = depths[..., None]
        if bg is not None:
            bg = bg.new_zeros(C, 1)
    sched = build_tile_schedule(
        means2d, radii, depths, width, height, TORCH_TILE_SIZE, conics=conics, opacities=opac
    )
    img, alpha = composite_tiles(means2d, conics, opac, feats, sched, width, height)
    if bg is not None:
        img = img + (1.0 - alpha) * bg[:, None, None, :]
    if render_mode in ("ED", "RGB+ED"):
        img = torch.cat([img[..., :-1], img[..., -1:] / alpha.clamp(min=1e-10)], dim=-1)
    meta = {
        "batch_ids": None,
        "camera_ids": None,
        "gaussian_ids": None,
        "radii": radii,
        "means2d": means2d,
        "depths": depths,
        "conics": conics,
        "opacities": opac,
        "tile_width": sched.tile_width,
        "tile_height": sched.tile_height,
        "tiles_per_gauss": sched.tiles_per_gauss,
        "isect_ids": None,
        "flatten_ids": sched.pair_gauss.to(torch.int32),
        "isect_offsets": sched.tile_offsets.to(torch.int32).reshape(C, sched.tile_height, sched.tile_width),
        "width": width,
        "height": height,
        "tile_size": TORCH_TILE_SIZE,
        "n_batches": 1,
        "n_cameras": C,
        "backend": "torch",
    }
    return img, alpha, meta


@torch.no_grad()
def rasterization_adjoint(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4]
    scales: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    viewmats: Tensor,  # [C, 4, 4]
    Ks: Tensor,  # [C, 3, 3]
    grad: Tensor,  # [C, H, W, D]
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    radius_clip: float = 0.0,
    eps2d: float = 0.3,
    rasterize_mode: Literal["classic", "antialiased"] = "classic",
) -> Tensor:
    """``Σ_c Σ_p w_i(c, p)·grad(c, p)`` for every Gaussian i: the transpose of rendering plain colours, ``[N, D]``.

    ``w_i = α_i·T_i`` are the blending weights of the torch backend's ``rasterization`` (same projection, culling,
    tiles and early stop), so the result equals the colour gradient of ``(rasterization(...)[0] * grad).sum()``
    for shared ``[N, D]`` colours without a background (the test oracle), at the cost of one pass over the tiles
    that composites nothing. Feature lifting (``vkd lift``) uses it with ``grad`` = the teacher's map.

    Args:
        means, quats, scales, opacities, viewmats, Ks, near_plane, far_plane, radius_clip, eps2d, rasterize_mode:
            as :func:`rasterization`.
        grad: ``[C, H, W, D]`` the per-pixel values to splat back (the image size is its ``H x W``).

    Returns:
        ``[N, D]`` in the dtype of ``means``.
    """
    C = viewmats.shape[0]
    if grad.ndim != 4 or grad.shape[0] != C:
        raise ValueError(f"grad must be [C, H, W, D] with C={C}, got {_shape(grad)}")
    height, width = int(grad.shape[1]), int(grad.shape[2])
    dtype = means.dtype
    proj = project_gaussians(means, quats, scales, opacities, viewmats.to(dtype), Ks.to(dtype), width, height,
                             near_plane=near_plane, far_plane=far_plane, radius_clip=radius_clip, eps2d=eps2d,
                             antialiased=rasterize_mode == "antialiased")
    sched = build_tile_schedule(proj["means2d"], proj["radii"], proj["depths"], width, height, TORCH_TILE_SIZE,
                                conics=proj["conics"], opacities=proj["opacities"])
    return composite_adjoint(proj["means2d"], proj["conics"], proj["opacities"], sched, grad)
