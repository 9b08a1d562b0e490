"""Text queries, Gaussian selection rules, the segmentation protocol and PCA colouring."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vkd.feature3dgs.evaluate import _miou_from_confusion, segmentation_metrics, true_label_confusion
from vkd.feature3dgs.query import (
    ADE20K_LABELS,
    ADE20K_MERGES,
    edit_opacity_mask,
    label_map,
    parse_query,
    prompts,
    relevancy,
    select_gaussians,
)
from vkd.feature3dgs.visualize import PCAColorizer, colormap


def test_parse_query_and_prompts():
    assert parse_query("red chair") == ["red chair"]
    assert parse_query(" red chair, table ,, floor ") == ["red chair", "table", "floor"]
    assert prompts(["floor"]) == ["a photo of the floor."]
    assert len(ADE20K_LABELS) == 150 and len(set(ADE20K_LABELS)) == 150
    assert all(a in ADE20K_LABELS and b in ADE20K_LABELS for a, b in ADE20K_MERGES.items())


def test_select_gaussians_rules():
    text = F.normalize(torch.eye(3, 4), dim=-1)  # three labels along axes 0, 1, 2
    folded = torch.tensor([[5.0, 0, 0, 0], [0, 4.0, 0, 0], [1.0, 1.0, 0, 0], [0, 0, 2.0, 0.1]])
    # One query: cosine threshold.
    sel = select_gaussians(folded, text[:1], [0], 0.6, "extract")
    assert sel.tolist() == [True, False, True, False]  # cos = 1, 0, 0.707, 0
    with pytest.raises(ValueError, match="threshold"):
        select_gaussians(folded, text[:1], [0], None, "extract")
    # Label set: softmax over raw cosines; argmax rule without a threshold.
    assert select_gaussians(folded, text, [0], None, "extract").tolist() == [True, False, True, False]
    probs = torch.softmax(F.normalize(folded, dim=-1) @ text.T, -1)
    thr = float(probs[2, 0]) + 1e-6  # just above the tie Gaussian's probability
    assert select_gaussians(folded, text, [0], thr, "extract").tolist() == [True, False, False, False]
    # Deletion: argmax OR probability >= threshold.
    assert select_gaussians(folded, text, [0], thr, "delete").tolist() == [True, False, True, False]
    assert select_gaussians(folded, text, [0, 2], None, "delete").tolist() == [True, False, True, True]
    sel = torch.tensor([True, False, True, False])
    assert edit_opacity_mask(sel, "extract").tolist() == [1.0, 0.0, 1.0, 0.0]
    assert edit_opacity_mask(sel, "delete").tolist() == [0.0, 1.0, 0.0, 1.0]


def test_relevancy_and_label_map():
    text = torch.eye(3, 4)
    feats = torch.zeros(1, 4, 2, 2)
    feats[0, 0, 0, 0] = 1.0
    feats[0, 1, 0, 1] = 1.0
    feats[0, 2, 1, :] = 1.0
    lab = label_map(feats, text)
    assert lab.tolist() == [[[0, 1], [2, 2]]]
    assert label_map(feats, text, merges={2: 0}).tolist() == [[[0, 1], [0, 0]]]
    rel = relevancy(feats, text[0], text[1:], temperature=10.0)
    assert rel.shape == (1, 2, 2)
    assert float(rel[0, 0, 0]) == pytest.approx(math.exp(10) / (math.exp(10) + 2))
    assert float(rel[0, 0, 1]) < 0.01 and bool(((rel >= 0) & (rel <= 1)).all())


def test_segmentation_metrics():
    t = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 3]])
    assert segmentation_metrics(t, t) == (1.0, 1.0)
    s = torch.tensor([[0, 0, 1, 2], [2, 2, 2, 3]])
    acc, miou = segmentation_metrics(s, t, top_k=7)
    assert acc == pytest.approx(7 / 8)
    # IoUs: label 0 -> 1, label 1 -> 1/2, label 2 -> 3/4, label 3 -> 1.
    assert miou == pytest.approx((1 + 0.5 + 0.75 + 1) / 4)
    # top_k=1 keeps only the most frequent label (2: 7 occurrences over both maps).
    assert segmentation_metrics(s, t, top_k=1)[1] == pytest.approx(0.75)
    conf = true_label_confusion(s, t, 4)
    assert int(conf.sum()) == 8 and int(conf[1, 2]) == 1
    acc_true, miou_true = _miou_from_confusion(conf, ignore=(0,))
    assert acc_true == pytest.approx(5 / 6)
    assert miou_true == pytest.approx((0.5 + 0.75 + 1) / 3)


def test_pca_colorizer_is_fixed_and_linear():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(500, 6, generator=g) * torch.tensor([5.0, 3.0, 1.0, 0.1, 0.1, 0.1])
    pca = PCAColorizer.fit(feats)
    assert pca.components.shape == (6, 3)
    torch.testing.assert_close(pca.components.T @ pca.components, torch.eye(3), atol=1e-4, rtol=0)
    img = feats[:4].T.reshape(1, 6, 2, 2)
    rgb = pca(img)
    assert rgb.shape == (1, 2, 2, 3) and float(rgb.min()) >= 0 and float(rgb.max()) <= 1
    again = PCAColorizer.fit(feats)
    torch.testing.assert_close(again.components, pca.components)  # deterministic signs
    cm = colormap(torch.linspace(0, 1, 5).reshape(1, 5), 0.0, 1.0)
    assert cm.shape == (1, 5, 3)
