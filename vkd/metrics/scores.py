"""KID, precision/recall, Inception Score and CLIP score on extracted features, with torch-fidelity's conventions.

Each function reproduces its reference implementation on the same inputs (the tests compare them to 1e-4 relative,
in practice to float64 rounding), in float64 where sums of many terms are formed:

- :func:`kid`: torch-fidelity's ``kid_features_to_metric`` (Bińkowski et al. 2018): unbiased MMD² with the cubic
  polynomial kernel ``(xᵀy / d + 1)³`` averaged over ``subsets`` random subsets of ``subset_size`` rows, drawn
  (without replacement, fake set first) by ``numpy.random.RandomState(seed)``; torch-fidelity's seed is 2020.
- :func:`precision_recall`: Kynkäänniemi et al. 2019 with k = 3: precision = the share of fake samples inside the
  real manifold (some real sample's ball of radius = distance to its k-th nearest real neighbour), recall = the
  share of real samples inside the fake manifold. torch-fidelity's ``prc_features_to_metric`` gives the same when
  called as ``(fake, real)``; its released 0.4.0 expects that order, older sources the opposite (torch-fidelity
  issue #58), so vkd never relies on an argument order: the arguments here are named.
- :func:`inception_score`: torch-fidelity's ``isc_features_to_metric``: logits shuffled by
  ``RandomState(seed).permutation``, ``splits`` chunks, ``exp(E KL(p(y|x) ‖ p(y)))`` per chunk, mean and
  (population) std.
- :func:`clip_score`: ``100 · max(cos(E_img, E_text), 0)`` averaged over the images (the per-image clamp of Hessel
  et al. 2021, who scale by 2.5; 100 is the scale of torchmetrics and of text-to-image papers).
  torchmetrics' ``CLIPScore`` clamps the *mean* instead (``max(mean 100·cos, 0)``); the two agree when no cosine is
  negative, which is the case for real CLIP models on their prompts.
"""

from __future__ import annotations

import numpy as np
import torch

from vkd.errors import DataError

__all__ = ["KID_SUBSETS", "KID_SUBSET_SIZE", "PR_K", "IS_SPLITS", "METRIC_SEED", "kid", "precision_recall",
           "inception_score", "clip_score", "check_counts"]

KID_SUBSETS = 100  # torch-fidelity's defaults
KID_SUBSET_SIZE = 1000
PR_K = 3
IS_SPLITS = 10
METRIC_SEED = 2020


def check_counts(metrics: set[str], n_real: int | None, n_fake: int | None, kid_subset_size: int = KID_SUBSET_SIZE,
                 pr_k: int = PR_K, is_splits: int = IS_SPLITS) -> None:
    """Refuse (``DataError``, one line) sample counts a metric cannot work with, before any network runs."""
    def low(what: str, need: int, have: int | None, fix: str) -> None:
        if have is not None and have < need:
            raise DataError(f"{what} needs at least {need} images, got {have}; {fix}")

    if "kid" in metrics:
        fix = "lower --kid-subset-size or give more images"
        low(f"KID (subsets of {kid_subset_size}) on the real set", kid_subset_size, n_real, fix)
        low(f"KID (subsets of {kid_subset_size}) on the fake set", kid_subset_size, n_fake, fix)
    if "pr" in metrics:
        low(f"precision/recall (k = {pr_k}) on the real set", pr_k + 1, n_real, "give more images or a lower --pr-k")
        low(f"precision/recall (k = {pr_k}) on the fake set", pr_k + 1, n_fake, "give more images or a lower --pr-k")
    if "is" in metrics:
        low(f"the Inception Score ({is_splits} splits) on the fake set", is_splits, n_fake,
            "give more images or fewer --is-splits")


def _power(k: np.ndarray, degree: int) -> np.ndarray:
    """``k ** degree``; by repeated products for small integer degrees (numpy's generic ``pow`` was most of KID's
    time)."""
    if isinstance(degree, int) and 1 <= degree <= 4:
        out = k.copy()
        for _ in range(degree - 1):
            out *= k
        return out
    return k ** degree


def _poly_mmd2(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> float:
    """Unbiased MMD² of two equal-size samples ``[m, d]`` with the polynomial kernel (torch-fidelity's ``mmd2``)."""
    m = x.shape[0]
    k_xx = _power(x @ x.T * gamma + coef0, degree)
    k_yy = _power(y @ y.T * gamma + coef0, degree)
    k_xy = _power(x @ y.T * gamma + coef0, degree)
    sum_xx = k_xx.sum() - np.trace(k_xx)
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return float((sum_xx + sum_yy) / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m))


def kid(fake: torch.Tensor, real: torch.Tensor, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE,
        seed: int = METRIC_SEED, degree: int = 3, gamma: float | None = None, coef0: float = 1.0) -> tuple[float, float]:
    """Kernel Inception Distance.

    Args:
        fake: ``[n_f, d]`` features of the generated set.
        real: ``[n_r, d]`` features of the reference set.
        subsets: number of random subsets.
        subset_size: rows per subset (from each set).
        seed: ``numpy.random.RandomState`` seed of the subsets.
        degree, gamma, coef0: kernel ``(gamma · xᵀy + coef0)^degree``; ``gamma=None`` is ``1 / d``.

    Returns:
        ``(mean, std)`` of the subset MMD² values (std with ``ddof=0``, as torch-fidelity).
    """
    if fake.ndim != 2 or real.ndim != 2 or fake.shape[1] != real.shape[1]:
        raise ValueError(f"features must be [n, d] with one d, got {tuple(fake.shape)} and {tuple(real.shape)}")
    n_f, n_r = fake.shape[0], real.shape[0]
    if min(n_f, n_r) < subset_size or subset_size < 2:
        raise DataError(f"KID subsets of {subset_size} need at least that many images (fake {n_f}, real {n_r}) "
                        "and a size >= 2; lower --kid-subset-size")
    f = fake.detach().cpu().to(torch.float64).numpy()
    r = real.detach().cpu().to(torch.float64).numpy()
    gamma = 1.0 / f.shape[1] if gamma is None else gamma
    rng = np.random.RandomState(seed)
    mmds = np.zeros(subsets)
    for i in range(subsets):
        a = f[rng.choice(n_f, subset_size, replace=False)]  # fake first: torch-fidelity's input1
        b = r[rng.choice(n_r, subset_size, replace=False)]
        mmds[i] = _poly_mmd2(a, b, degree, gamma, coef0)
    return float(mmds.mean()), float(mmds.std())


def _kth_radii(x: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """``[n]``: distance of every row to its k-th nearest other row (the (k+1)-th smallest, itself included)."""
    return torch.cat([torch.cdist(x[i:i + batch], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), batch)])


def precision_recall(*, fake: torch.Tensor, real: torch.Tensor, k: int = PR_K,
                     batch: int = 4096) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), k-NN manifolds, Euclidean distances in float64.

    Args:
        fake: ``[n_f, d]`` features of the generated set (keyword only: the order matters and is easy to swap).
        real: ``[n_r, d]`` features of the reference set.
        k: neighbourhood size (3 in the paper and torch-fidelity).
        batch: rows per distance block (memory ``batch × max(n_f, n_r)`` float64).

    Returns:
        ``(precision, recall)``: the share of fake samples in the real manifold, of real samples in the fake one.
    """
    if fake.ndim != 2 or real.ndim != 2 or fake.shape[1] != real.shape[1]:
        raise ValueError(f"features must be [n, d] with one d, got {tuple(fake.shape)} and {tuple(real.shape)}")
    if min(len(fake), len(real)) < k + 1:
        raise DataError(f"precision/recall with k = {k} needs at least {k + 1} images per set "
                        f"(fake {len(fake)}, real {len(real)})")
    f, r = fake.detach().to(torch.float64), real.detach().to(torch.float64).to(fake.device)
    r_real, r_fake = _kth_radii(r, k, batch), _kth_radii(f, k, batch)
    in_real = torch.zeros(len(f), dtype=torch.bool, device=f.device)
    in_fake = torch.zeros(len(r), dtype=torch.bool, device=f.device)
    for i in range(0, len(f), batch):  # one fake × real distance pass serves both directions
        d = torch.cdist(f[i:i + batch], r)  # [b, n_r]
        in_real[i:i + batch] = (d <= r_real[None, :]).any(dim=1)
        in_fake |= (d <= r_fake[i:i + batch, None]).any(dim=0)
    return float(in_real.double().mean()), float(in_fake.double().mean())


def inception_score(logits: torch.Tensor, splits: int = IS_SPLITS, seed: int = METRIC_SEED,
                    shuffle: bool = True) -> tuple[float, float]:
    """Inception Score from class logits ``[N, C]`` (Inception's ``logits_unbiased``; any classifier's logits).

    Returns:
        ``(mean, std)`` over the ``splits`` chunks (std with ``ddof=0``, as torch-fidelity).
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, C], got {tuple(logits.shape)}")
    n = logits.shape[0]
    if n < splits:
        raise DataError(f"the Inception Score with {splits} splits needs at least {splits} images, got {n}")
    x = logits.detach().cpu()
    if shuffle:
        x = x[torch.from_numpy(np.random.RandomState(seed).permutation(n))]
    x = x.double()
    p, log_p = x.softmax(dim=1), x.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        q = p[lo:hi].mean(dim=0, keepdim=True)
        kl = (p[lo:hi] * (log_p[lo:hi] - q.log())).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


def clip_score(cosines: torch.Tensor) -> float:
    """CLIP score ``mean(100 · max(cos, 0))`` of per-image cosines ``[N]`` (per-image clamp, scale 100)."""
    if cosines.numel() == 0:
        raise DataError("CLIP score of no images")
    return float((100.0 * cosines.detach().double().clamp(min=0.0)).mean())
