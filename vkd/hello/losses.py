"""HeLlO losses: the projector-fit objective (teacher logits → projector logits) and the student's soft-label loss.

Each loss comes as a function and as an ``nn.Module`` (a registered unit, as in torchdistill); ``LOSSES`` names them.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FIT_TARGETS", "projector_fit_loss", "ProjectorFitLoss", "soft_label_loss", "SoftLabelLoss", "LOSSES"]

FitTarget = Literal["logits", "probs", "centered_logits"]
FIT_TARGETS = ("logits", "probs", "centered_logits")


def projector_fit_loss(logits: torch.Tensor, target: torch.Tensor, labels: torch.Tensor,
                       fit_target: FitTarget = "logits", lambda_ce: float = 0.0) -> dict[str, torch.Tensor]:
    """MSE between projector and teacher outputs plus λ·CE on the true labels (HeLlO §4).

    Args:
        logits: projector logits ``[B, K]``.
        target: teacher logits ``[B, K]`` (no gradient).
        labels: true classes ``[B]``.
        fit_target: compare ``logits``, softmax ``probs``, or ``centered_logits`` (each row minus its mean: a
            teacher's logits are defined up to a per-sample constant).
        lambda_ce: weight of the cross-entropy term.

    Returns:
        ``{"loss", "mse", "ce"}`` scalars.

    Examples:
        >>> out = projector_fit_loss(torch.zeros(4, 10), torch.randn(4, 10), torch.arange(4), "centered_logits", 0.1)
        >>> sorted(out)
        ['ce', 'loss', 'mse']
    """
    if fit_target == "probs":
        mse = F.mse_loss(logits.softmax(-1), target.softmax(-1))
    elif fit_target == "centered_logits":
        mse = F.mse_loss(logits - logits.mean(-1, keepdim=True), target - target.mean(-1, keepdim=True))
    else:
        mse = F.mse_loss(logits, target)
    ce = F.cross_entropy(logits, labels)
    return {"loss": mse + lambda_ce * ce, "mse": mse, "ce": ce}


class ProjectorFitLoss(nn.Module):
    """Module form of :func:`projector_fit_loss`."""

    def __init__(self, fit_target: FitTarget = "logits", lambda_ce: float = 0.0):
        super().__init__()
        self.fit_target, self.lambda_ce = fit_target, lambda_ce

    def forward(self, logits: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return projector_fit_loss(logits, target, labels, self.fit_target, self.lambda_ce)


def soft_label_loss(student_logits: torch.Tensor, target_logits: torch.Tensor, kind: Literal["kl", "mse_ce"] = "kl",
                    temperature: float = 4.0) -> torch.Tensor:
    """The soft-label term of a student trained on online labels ``[B, K]``: ``T²·KL(softmax(z_t/T) ‖ softmax(z_s/T))``
    for ``kind="kl"``, else the logit MSE (the cross-entropy half of ``mse_ce`` is added by the caller).

    Examples:
        >>> z = torch.randn(8, 10)
        >>> float(soft_label_loss(z, z)) == 0.0
        True
    """
    if kind == "kl":
        t = temperature
        return F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(target_logits / t, -1),
                        log_target=True, reduction="batchmean") * t * t
    return F.mse_loss(student_logits, target_logits)


class SoftLabelLoss(nn.Module):
    """Module form of :func:`soft_label_loss`."""

    def __init__(self, kind: Literal["kl", "mse_ce"] = "kl", temperature: float = 4.0):
        super().__init__()
        self.kind, self.temperature = kind, temperature

    def forward(self, student_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
        return soft_label_loss(student_logits, target_logits, self.kind, self.temperature)


LOSSES: dict[str, type[nn.Module]] = {"projector_fit": ProjectorFitLoss, "soft_label": SoftLabelLoss}
