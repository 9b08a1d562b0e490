"""SKT: efficient crowd counting via structured knowledge transfer (Liu et al., ACM MM 2020).

A CSRNet teacher is distilled into a 1/4-width CSRNet (6 % of the parameters) with intra-layer pattern
transfer (cosine between adapted student and teacher features) and inter-layer relation transfer (dense
FSP matrices between all pairs of tapped layers).

Parts: :mod:`~vkd.skt.models` (CSRNet family), :mod:`~vkd.skt.density` (ground-truth maps),
:mod:`~vkd.skt.datasets` (ShanghaiTech, UCF-QNRF, generic), :mod:`~vkd.skt.crowds` (synthetic crowds),
:mod:`~vkd.skt.losses`, :mod:`~vkd.skt.distiller` (training tasks), :mod:`~vkd.skt.evaluate` (MAE/RMSE,
tiling), :mod:`~vkd.skt.count` (``vkd count``), :mod:`~vkd.skt.commands` (CLI entry points).
"""

from vkd.skt.losses import CosineTransferLoss, DenseFSPLoss, DensityLoss, SKTLoss
from vkd.skt.models import CSRNet, make_adapters

__all__ = ["CSRNet", "make_adapters", "CosineTransferLoss", "DenseFSPLoss", "DensityLoss", "SKTLoss"]
