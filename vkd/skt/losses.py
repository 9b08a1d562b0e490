"""SKT losses (spec §3-5), functional and module forms.

* :func:`cosine_transfer_loss` — Intra-Layer Pattern Transfer: ``Σ_l Σ_{b,x,y} 1 − cos(T_l, A_l(S_l))`` along
  channels.
* :func:`dense_fsp_loss` — Inter-Layer Relation Transfer: every tap pooled to 1/8, instance-normalised, the
  FSP matrix ``G_ij = F̂_i F̂_jᵀ / (h·w)`` of all 21 pairs ``i < j`` **per sample** (``torch.bmm``; the reference
  keeps only batch element 0), squared Frobenius distance.
* :func:`density_loss` — ``‖D_S − D‖²`` summed over pixels, against the ground truth or the teacher.

The terms of the SKT objective are one table, :data:`SKT_LOSS_TERMS`: :class:`SKTLoss`, the config's
``uses_teacher`` / ``needs_adapters`` and its validation all derive from it, so a new term is one entry there
plus its weight field in :class:`vkd.skt.config.SKTLossConfig`.

Reductions: ``"sum"`` is the reference (sums over pixels, taps, pairs and the batch; it trains at batch 1),
``"mean"`` (non-reference) divides each term by its number of summed elements per sample and averages over
the batch, and ``"none"`` returns per-sample sums ``[B]`` (the distiller averages them over the batch so the
loss does not grow with the batch size, which equals the reference at batch 1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DEFAULT_POOL_FACTORS",
    "cosine_transfer_loss",
    "scale_to_eighth",
    "instance_normalize",
    "fsp_matrix",
    "dense_fsp_loss",
    "density_loss",
    "CosineTransferLoss",
    "DenseFSPLoss",
    "DensityLoss",
    "SKTLossTerm",
    "SKT_LOSS_TERMS",
    "SKTLoss",
]

Reduction = Literal["sum", "mean", "none"]
# Max-pool kernels bringing the 7 items (taps at 1, 1/2, 1/4, 1/8 ×3, density) to the 1/8 grid.
DEFAULT_POOL_FACTORS = (8, 4, 2, 1, 1, 1, 1)


def _check_pairs(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], name: str) -> None:
    if len(student) != len(teacher):
        raise ValueError(f"{name}: got {len(student)} student and {len(teacher)} teacher features")
    for i, (s, t) in enumerate(zip(student, teacher, strict=True)):
        if s.shape != t.shape or s.ndim != 4:
            raise ValueError(f"{name}: feature {i} must be matching [B, C, H, W] tensors, got student "
                             f"{tuple(s.shape)} and teacher {tuple(t.shape)}")


def _reduce(per_sample: torch.Tensor, reduction: Reduction, numel: int | None = None) -> torch.Tensor:
    """``per_sample [B]`` sums → scalar (``sum``/``mean``) or ``[B]`` (``none``)."""
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":
        return per_sample.mean() / max(numel or 1, 1)
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be 'sum', 'mean' or 'none', got {reduction!r}")


def cosine_transfer_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                         reduction: Reduction = "sum", eps: float = 1e-8) -> torch.Tensor:
    """Intra-layer pattern transfer: ``Σ_l Σ_{x,y} [1 − cos(T_l[b,:,x,y], S_l[b,:,x,y])]``.

    Args:
        student: adapted student taps, each ``[B, C_l, H_l, W_l]``.
        teacher: teacher taps with the same shapes (detach them: the teacher is frozen).
        reduction: ``sum`` (reference), ``mean`` (per-tap mean over pixels, summed over taps, batch mean) or
            ``none`` (``[B]`` per-sample sums).
        eps: ``F.cosine_similarity``'s eps. Two all-zero vectors have cosine 0 there (loss 1, zero gradient),
            as in the reference.

    Returns:
        Scalar, or ``[B]`` for ``reduction="none"``.
    """
    _check_pairs(student, teacher, "cosine_transfer_loss")
    total = None
    for s, t in zip(student, teacher, strict=True):
        per_pixel = 1.0 - F.cosine_similarity(s, t, dim=1, eps=eps)  # [B, H, W]
        term = per_pixel.flatten(1).sum(1)
        if reduction == "mean":
            term = term / per_pixel[0].numel()
        total = term if total is None else total + term
    assert total is not None
    return total.mean() if reduction == "mean" else _reduce(total, reduction)


def scale_to_eighth(features: Sequence[torch.Tensor], factors: Sequence[int] = DEFAULT_POOL_FACTORS) -> list[torch.Tensor]:
    """Max-pool each item by its factor (``ceil_mode=True``) so all items share the 1/8 grid."""
    if len(features) != len(factors):
        raise ValueError(f"got {len(features)} features but {len(factors)} pool factors")
    return [f if k == 1 else F.max_pool2d(f, kernel_size=k, stride=k, ceil_mode=True) for f, k in zip(features, factors, strict=True)]


def instance_normalize(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per sample and channel over H×W, no affine: ``[B, C, H, W]`` → same."""
    return F.instance_norm(x, eps=eps)


def fsp_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample FSP (Gram) matrix ``G = A Bᵀ / (h·w)``.

    Args:
        a: ``[B, C1, h, w]``.
        b: ``[B, C2, h, w]``.

    Returns:
        ``[B, C1, C2]``.
    """
    if a.ndim != 4 or b.ndim != 4 or a.shape[0] != b.shape[0] or a.shape[-2:] != b.shape[-2:]:
        raise ValueError(f"fsp_matrix needs [B, C, h, w] tensors of the same B, h, w; got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    hw = a.shape[-2] * a.shape[-1]
    return torch.bmm(a.flatten(2), b.flatten(2).transpose(1, 2)) / hw


def _fsp_set(features: Sequence[torch.Tensor], factors: Sequence[int], eps: float) -> list[list[torch.Tensor]]:
    normed = [instance_normalize(f, eps) for f in scale_to_eighth(features, factors)]
    n = len(normed)
    return [[fsp_matrix(normed[i], normed[j]) for j in range(i + 1, n)] for i in range(n)]


def dense_fsp_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], reduction: Reduction = "sum",
                   factors: Sequence[int] = DEFAULT_POOL_FACTORS, eps: float = 1e-5,
                   per_sample: bool = True) -> torch.Tensor:
    """Inter-layer relation transfer: ``Σ_{i<j} ‖G_ij^T − G_ij^S‖²_F`` over all pairs of the pooled items.

    Args:
        student: the 7 student items (6 adapted taps + density), ``[B, C_i, H_i, W_i]``.
        teacher: the 7 teacher items with the same shapes (the teacher side is computed without grad).
        reduction: ``sum`` (reference), ``mean`` (per-pair mean over matrix entries, summed over pairs, batch
            mean) or ``none`` (``[B]``).
        factors: max-pool factor of each item to reach 1/8.
        eps: instance-norm eps.
        per_sample: ``True`` (vkd): G per sample. ``False`` reproduces the reference bug: only batch element 0
            is used for both networks (identical at batch 1); the result is then a ``[1]``-batch.

    Returns:
        Scalar, or ``[B]`` for ``reduction="none"``.
    """
    _check_pairs(student, teacher, "dense_fsp_loss")
    if not per_sample:
        student = [s[:1] for s in student]
        teacher = [t[:1] for t in teacher]
    g_s = _fsp_set(student, factors, eps)
    with torch.no_grad():
        g_t = _fsp_set([t.detach() for t in teacher], factors, eps)
    total = None
    for row_s, row_t in zip(g_s, g_t, strict=True):
        for gs, gt in zip(row_s, row_t, strict=True):
            term = (gs - gt).pow(2).flatten(1).sum(1)  # [B]
            if reduction == "mean":
                term = term / gs[0].numel()
            total = term if total is None else total + term
    if total is None:
        raise ValueError("dense_fsp_loss needs at least two items")
    return total.mean() if reduction == "mean" else _reduce(total, reduction)


def density_loss(pred: torch.Tensor, target: torch.Tensor, reduction: Reduction = "sum") -> torch.Tensor:
    """``‖pred − target‖²`` over pixels.

    Args:
        pred: ``[B, 1, h, w]`` predicted density.
        target: same shape (ground truth, or the detached teacher density).
        reduction: ``sum`` (reference), ``mean`` (pixel mean, i.e. ``F.mse_loss``) or ``none`` (``[B]`` sums).
    """
    if pred.shape != target.shape:
        raise ValueError(f"density_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    per_sample = (pred - target).pow(2).flatten(1).sum(1)
    return _reduce(per_sample, reduction, pred[0].numel())


class CosineTransferLoss(nn.Module):
    """Module form of :func:`cosine_transfer_loss`."""

    def __init__(self, reduction: Reduction = "sum", eps: float = 1e-8):
        super().__init__()
        self.reduction, self.eps = reduction, eps

    def forward(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
        return cosine_transfer_loss(student, teacher, self.reduction, self.eps)


class DenseFSPLoss(nn.Module):
    """Module form of :func:`dense_fsp_loss`."""

    def __init__(self, reduction: Reduction = "sum", factors: Sequence[int] = DEFAULT_POOL_FACTORS, eps: float = 1e-5,
                 per_sample: bool = True):
        super().__init__()
        self.reduction, self.factors, self.eps, self.per_sample = reduction, tuple(factors), eps, per_sample

    def forward(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
        return dense_fsp_loss(student, teacher, self.reduction, self.factors, self.eps, self.per_sample)


class DensityLoss(nn.Module):
    """Module form of :func:`density_loss`."""

    def __init__(self, reduction: Reduction = "sum"):
        super().__init__()
        self.reduction = reduction

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return density_loss(pred, target, self.reduction)


# ----------------------------------------------------------------------------------------------
# The SKT objective: one table of terms
# ----------------------------------------------------------------------------------------------

# (student items, teacher items or None, ground-truth density [B, 1, h, w], reduction, per-sample FSP) -> loss
TermFn = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor] | None, torch.Tensor, Reduction, bool],
                  torch.Tensor]


@dataclass(frozen=True)
class SKTLossTerm:
    """One term of the SKT objective.

    Attributes:
        weight_key: the :class:`~vkd.skt.config.SKTLossConfig` field (and :class:`SKTLoss` keyword) of its weight.
        default_weight: the weight when none is given (spec §5).
        needs_teacher: the term compares with the frozen teacher; at weight 0 it is skipped and logged as 0.
        needs_adapters: the term reads the student taps mapped to the teacher's widths by the 1×1 adapters.
        functional: the loss function.
        module: its module form.
        apply: evaluates ``functional`` on the SKT items (see ``TermFn``).
    """

    weight_key: str
    default_weight: float
    needs_teacher: bool
    needs_adapters: bool
    functional: Callable[..., torch.Tensor]
    module: type[nn.Module]
    apply: TermFn


def _gt_term(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor] | None, target: torch.Tensor,
             reduction: Reduction, per_sample_fsp: bool) -> torch.Tensor:
    return density_loss(student[-1], target, reduction)


def _teacher_term(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor] | None, target: torch.Tensor,
                  reduction: Reduction, per_sample_fsp: bool) -> torch.Tensor:
    return density_loss(student[-1], teacher[-1].detach(), reduction)


def _cos_term(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor] | None, target: torch.Tensor,
              reduction: Reduction, per_sample_fsp: bool) -> torch.Tensor:
    return cosine_transfer_loss(student[:-1], [t.detach() for t in teacher[:-1]], reduction)


def _fsp_term(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor] | None, target: torch.Tensor,
              reduction: Reduction, per_sample_fsp: bool) -> torch.Tensor:
    return dense_fsp_loss(student, teacher, reduction, per_sample=per_sample_fsp)


# name -> term, in the order they are computed and summed (the order is part of bitwise reproducibility);
# the logged value of each is ``loss_<name>``.
SKT_LOSS_TERMS: dict[str, SKTLossTerm] = {
    # ‖D_S − D_GT‖²: the ground truth
    "gt": SKTLossTerm("gt_weight", 1.0, needs_teacher=False, needs_adapters=False, functional=density_loss,
                      module=DensityLoss, apply=_gt_term),
    # ‖D_S − D_T‖²: the teacher's density
    "teacher": SKTLossTerm("teacher_weight", 1.0, needs_teacher=True, needs_adapters=False,
                           functional=density_loss, module=DensityLoss, apply=_teacher_term),
    # λ_cos L_intra: intra-layer pattern transfer on the 6 adapted taps
    "cos": SKTLossTerm("cos_weight", 0.5, needs_teacher=True, needs_adapters=True,
                       functional=cosine_transfer_loss, module=CosineTransferLoss, apply=_cos_term),
    # λ_fsp L_inter: inter-layer relation transfer on the 6 adapted taps + density
    "fsp": SKTLossTerm("fsp_weight", 0.5, needs_teacher=True, needs_adapters=True, functional=dense_fsp_loss,
                       module=DenseFSPLoss, apply=_fsp_term),
}


class SKTLoss(nn.Module):
    """The SKT objective ``w_gt‖D_S−D_GT‖² + w_t‖D_S−D_T‖² + λ_cos L_intra + λ_fsp L_inter`` (spec §5), summed
    over the terms of :data:`SKT_LOSS_TERMS`.

    Args:
        reduction: ``sum`` (reference) or ``mean``; per-sample values are averaged over the batch.
        per_sample_fsp: ``False`` reproduces the reference's batch-element-0 FSP.
        **weights: each term's weight by its ``weight_key`` (``gt_weight=1``, ``teacher_weight=1``,
            ``cos_weight=0.5``, ``fsp_weight=0.5`` when not given).

    Forward:
        ``student``: 7 items (6 adapted taps + density); ``teacher``: 7 items, or ``None`` when no weighted term
        needs it; ``target``: ``[B, 1, h, w]``. Returns ``{"loss_gt", "loss_teacher", "loss_cos", "loss_fsp",
        "loss"}`` scalars (the parts unweighted). A teacher term at weight 0 (or without a teacher) is 0.

    Examples:
        >>> shapes = [(64, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 4, 4), (256, 4, 4), (1, 4, 4)]
        >>> student = [torch.rand(2, *s) for s in shapes]  # adapted taps [B, C_l, H_l, W_l] + density [B, 1, h, w]
        >>> teacher = [torch.rand(2, *s) for s in shapes]
        >>> out = SKTLoss(reduction="mean", cos_weight=0.5)(student, teacher, torch.rand(2, 1, 4, 4))
        >>> sorted(out), out["loss"].shape
        (['loss', 'loss_cos', 'loss_fsp', 'loss_gt', 'loss_teacher'], torch.Size([]))
    """

    def __init__(self, *, reduction: Literal["sum", "mean"] = "sum", per_sample_fsp: bool = True,
                 **weights: float):
        super().__init__()
        known = {term.weight_key for term in SKT_LOSS_TERMS.values()}
        unknown = sorted(set(weights) - known)
        if unknown:
            raise TypeError(f"SKTLoss got unknown weights {unknown}; known: {sorted(known)}")
        self.weights = {name: float(weights.get(term.weight_key, term.default_weight))
                        for name, term in SKT_LOSS_TERMS.items()}
        self.reduction, self.per_sample_fsp = reduction, per_sample_fsp

    @classmethod
    def from_weights(cls, weights: Mapping[str, float], reduction: Literal["sum", "mean"] = "sum",
                     per_sample_fsp: bool = True) -> SKTLoss:
        """From ``{weight_key: weight}`` (e.g. :meth:`vkd.skt.config.SKTLossConfig.weights`)."""
        return cls(reduction=reduction, per_sample_fsp=per_sample_fsp, **weights)

    def forward(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor] | None,
                target: torch.Tensor) -> dict[str, torch.Tensor]:
        red: Reduction = "none" if self.reduction == "sum" else "mean"
        zero = student[-1].new_zeros(())
        out: dict[str, torch.Tensor] = {}
        for name, term in SKT_LOSS_TERMS.items():
            if term.needs_teacher and (teacher is None or not self.weights[name]):
                out[f"loss_{name}"] = zero
                continue
            value = term.apply(student, teacher, target, red, self.per_sample_fsp)
            out[f"loss_{name}"] = value.mean() if value.ndim else value  # per-sample [B] -> batch mean
        total = None
        for name in SKT_LOSS_TERMS:  # left to right, as w_gt·gt + w_t·t + λ_cos·cos + λ_fsp·fsp
            weighted = self.weights[name] * out[f"loss_{name}"]
            total = weighted if total is None else total + weighted
        assert total is not None
        out["loss"] = total
        return out
