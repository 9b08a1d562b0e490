"""SKT losses: shapes, zero loss at identity, per-sample dense FSP, reference formula, float64 gradcheck."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from vkd.skt.losses import (
    CosineTransferLoss,
    DenseFSPLoss,
    DensityLoss,
    SKTLoss,
    cosine_transfer_loss,
    dense_fsp_loss,
    density_loss,
    fsp_matrix,
    instance_normalize,
    scale_to_eighth,
)

# Shapes of the 7 items of a 32x32 input at the teacher's widths scaled down (1/1, 1/2, 1/4, 1/8 x4).
SHAPES = [(4, 32, 32), (4, 16, 16), (6, 8, 8), (8, 4, 4), (10, 4, 4), (8, 4, 4), (1, 4, 4)]


def _items(batch: int, seed: int, dtype=torch.float32, positive: bool = True) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    items = [torch.randn(batch, *s, generator=gen, dtype=dtype) for s in SHAPES]
    # Post-ReLU taps are non-negative; strictly positive avoids all-zero pixel vectors (cosine undefined).
    return [t.abs() + 0.1 for t in items] if positive else items


def test_zero_loss_for_identical_features():
    t = _items(2, 0)
    s = [x.clone() for x in t]
    assert cosine_transfer_loss(s[:-1], t[:-1]).item() == pytest.approx(0.0, abs=1e-4)
    assert dense_fsp_loss(s, t).item() == pytest.approx(0.0, abs=1e-8)
    assert density_loss(s[-1], t[-1]).item() == 0.0
    # Scale invariance of both structured terms: a student with 3x the teacher's magnitude is not penalised.
    s3 = [3 * x for x in t]
    assert cosine_transfer_loss(s3[:-1], t[:-1]).item() == pytest.approx(0.0, abs=1e-4)
    assert dense_fsp_loss(s3, t).item() == pytest.approx(0.0, abs=1e-5)


def test_cosine_matches_formula_and_reductions():
    s, t = _items(3, 1), _items(3, 2)
    ref = sum((1 - F.cosine_similarity(a, b, dim=1)).sum() for a, b in zip(s[:-1], t[:-1], strict=True))
    assert torch.allclose(cosine_transfer_loss(s[:-1], t[:-1]), ref, rtol=1e-5)
    per = cosine_transfer_loss(s[:-1], t[:-1], reduction="none")
    assert per.shape == (3,)
    assert torch.allclose(per.sum(), ref, rtol=1e-5)
    mean = cosine_transfer_loss(s[:-1], t[:-1], reduction="mean")
    ref_mean = sum((1 - F.cosine_similarity(a, b, dim=1)).mean() for a, b in zip(s[:-1], t[:-1], strict=True))
    assert torch.allclose(mean, ref_mean, rtol=1e-5)
    assert torch.allclose(CosineTransferLoss()(s[:-1], t[:-1]), ref, rtol=1e-5)


def _reference_fsp_batch1(s: list[torch.Tensor], t: list[torch.Tensor]) -> torch.Tensor:
    """The reference: MaxPool(8/4/2), InstanceNorm, gram of element 0, MSE(sum) over all pairs, written out."""
    def prep(items):
        pooled = [F.max_pool2d(x, k, k, ceil_mode=True) if k > 1 else x for x, k in zip(items, (8, 4, 2, 1, 1, 1, 1), strict=True)]
        return [F.instance_norm(x, eps=1e-5) for x in pooled]

    def gram(a, b):
        a0, b0 = a[0].reshape(a.shape[1], -1), b[0].reshape(b.shape[1], -1)
        return a0 @ b0.T / a0.shape[1]

    ps, pt = prep(s), prep(t)
    return sum(((gram(ps[i], ps[j]) - gram(pt[i], pt[j])) ** 2).sum() for i, j in itertools.combinations(range(7), 2))


def test_fsp_equals_reference_formula_at_batch_1():
    s, t = _items(1, 3, positive=False), _items(1, 4, positive=False)
    assert torch.allclose(dense_fsp_loss(s, t), _reference_fsp_batch1(s, t), rtol=1e-5)
    assert torch.allclose(DenseFSPLoss()(s, t), _reference_fsp_batch1(s, t), rtol=1e-5)


def test_fsp_is_per_sample():
    s, t = _items(3, 5), _items(3, 6)
    per = dense_fsp_loss(s, t, reduction="none")
    assert per.shape == (3,)
    singles = torch.stack([dense_fsp_loss([x[b:b + 1] for x in s], [x[b:b + 1] for x in t]) for b in range(3)])
    assert torch.allclose(per, singles, rtol=1e-5)
    assert torch.allclose(dense_fsp_loss(s, t), singles.sum(), rtol=1e-5)
    # Sample 2 changes only its own term.
    s2 = [x.clone() for x in s]
    s2[3][2] = torch.rand_like(s2[3][2])  # (a common spatial flip would leave every Gram matrix unchanged)
    per2 = dense_fsp_loss(s2, t, reduction="none")
    assert torch.allclose(per2[:2], per[:2]) and not torch.allclose(per2[2], per[2])
    # The reference bug (element 0 only) is available and differs at batch > 1.
    ref = dense_fsp_loss(s, t, per_sample=False)
    assert torch.allclose(ref, singles[0], rtol=1e-5)


def test_gram_after_instance_norm_is_correlation():
    x = instance_normalize(torch.randn(2, 5, 6, 7))
    g = fsp_matrix(x, x)
    assert g.shape == (2, 5, 5)
    assert torch.allclose(g, g.transpose(1, 2), atol=1e-6)
    assert torch.allclose(torch.diagonal(g, dim1=1, dim2=2), torch.ones(2, 5), atol=1e-3)
    assert (g.abs() <= 1 + 1e-3).all()


def test_scale_to_eighth_shapes():
    pooled = scale_to_eighth(_items(2, 7))
    assert all(p.shape[-2:] == (4, 4) for p in pooled)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(0)
    shapes = [(2, 4, 4), (2, 2, 2), (1, 2, 2)]
    s = [(torch.rand(1, *sh, generator=gen, dtype=torch.float64) + 0.1).requires_grad_() for sh in shapes]
    t = [torch.rand(1, *sh, generator=gen, dtype=torch.float64) + 0.1 for sh in shapes]
    factors = (2, 1, 1)
    assert torch.autograd.gradcheck(lambda *a: cosine_transfer_loss(list(a), t), s)
    assert torch.autograd.gradcheck(lambda *a: dense_fsp_loss(list(a), t, factors=factors), s)
    assert torch.autograd.gradcheck(lambda a: density_loss(a, t[-1]), (s[-1],))


def test_teacher_side_gets_no_gradient():
    s = [x.requires_grad_() for x in _items(1, 8)]
    t = [x.requires_grad_() for x in _items(1, 9)]
    dense_fsp_loss(s, t).backward()
    assert all(x.grad is not None for x in s) and all(x.grad is None for x in t)


def test_density_loss_reductions():
    a, b = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4)
    assert torch.allclose(density_loss(a, b), ((a - b) ** 2).sum())
    assert torch.allclose(density_loss(a, b, "mean"), F.mse_loss(a, b))
    assert density_loss(a, b, "none").shape == (2,)
    assert torch.allclose(DensityLoss()(a, b), ((a - b) ** 2).sum())
    with pytest.raises(ValueError, match="differ"):
        density_loss(a, b[:, :, :2])


def test_skt_loss_total_and_weights():
    s, t = _items(2, 10), _items(2, 11)
    gt = torch.rand(2, 1, 4, 4)
    out = SKTLoss()(s, t, gt)
    assert set(out) == {"loss", "loss_gt", "loss_teacher", "loss_cos", "loss_fsp"}
    assert all(v.ndim == 0 for v in out.values())
    expected = out["loss_gt"] + out["loss_teacher"] + 0.5 * out["loss_fsp"] + 0.5 * out["loss_cos"]
    assert torch.allclose(out["loss"], expected)
    # Batch mean of per-sample sums: equals the reference sum at batch 1.
    one = SKTLoss()([x[:1] for x in s], [x[:1] for x in t], gt[:1])
    ref = (density_loss(s[-1][:1], gt[:1]) + density_loss(s[-1][:1], t[-1][:1])
           + 0.5 * dense_fsp_loss([x[:1] for x in s], [x[:1] for x in t])
           + 0.5 * cosine_transfer_loss([x[:1] for x in s[:-1]], [x[:1] for x in t[:-1]]))
    assert torch.allclose(one["loss"], ref, rtol=1e-5)
    only_gt = SKTLoss(teacher_weight=0, cos_weight=0, fsp_weight=0)(s, None, gt)
    assert torch.allclose(only_gt["loss"], only_gt["loss_gt"])


def test_mismatched_shapes_raise():
    s, t = _items(1, 0), _items(1, 1)
    with pytest.raises(ValueError, match="feature 0"):
        cosine_transfer_loss([s[0][:, :2]], [t[0]])
    with pytest.raises(ValueError, match="student"):
        dense_fsp_loss(s[:3], t)
