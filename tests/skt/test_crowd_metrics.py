"""NAE and GAME(0-3): hand-computable cases, a brute-force reference, and their place in evaluate_model / eval.json."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from test_evaluate import _SumPoolCounter  # density = 8×8 sum-pool of (channel 0 + 3)

from vkd.skt.datasets import CrowdEvalDataset, list_records
from vkd.skt.evaluate import count_metrics, evaluate_model, game_errors, grid_counts


def test_nae_leaves_out_images_without_people():
    m = count_metrics([12, 3, 4, 9], [10, 0, 4, 6])
    assert m["nae"] == pytest.approx((2 / 10 + 0 / 4 + 3 / 6) / 3)
    assert m["nae_images"] == 3
    assert m["mae"] == pytest.approx((2 + 3 + 0 + 3) / 4)  # MAE / RMSE keep every image
    assert m["rmse"] == pytest.approx(math.sqrt((4 + 9 + 0 + 9) / 4))
    empty = count_metrics([1.0, 2.0], [0.0, 0.0])
    assert math.isnan(empty["nae"]) and empty["nae_images"] == 0


def test_game_two_heads_in_one_quadrant_predicted_in_another():
    points = np.array([[3.0, 3.0], [5.5, 6.2]])  # both in the top-left quadrant of a 16x16 image
    pred = torch.zeros(16, 16)
    pred[12, 12] = 2.0  # the right total, all in the bottom-right quadrant
    # level 0: |2 - 2| = 0; levels 1-3: the two heads are missed where they are and 2 are counted elsewhere
    assert game_errors(pred, points=points).tolist() == [0.0, 4.0, 4.0, 4.0]
    pred[3, 3] = 1.0  # now one head is found in its 2x2 cell, and the total is 3
    assert game_errors(pred, points=points).tolist() == [1.0, 3.0, 3.0, 3.0]
    m = count_metrics([3.0], [2.0], game=[game_errors(pred, points=points)])
    assert (m["game0"], m["game1"], m["game3"]) == (1.0, 3.0, 3.0)


def test_grid_cells_of_points_and_of_a_density_agree_on_odd_sizes():
    rng = np.random.default_rng(1)
    h, w = 13, 7  # not divisible by 8: cells of unequal size, and empty ones at level 3 (7 columns < 8)
    points = rng.uniform([0, 0], [w, h], size=(40, 2))
    points[:3] = [[0.0, 0.0], [w - 1e-6, h - 1e-6], [3.999, 6.5]]
    deltas = np.zeros((h, w))
    np.add.at(deltas, (np.floor(points[:, 1]).astype(int), np.floor(points[:, 0]).astype(int)), 1.0)
    for level in range(4):
        from_points = grid_counts(h, w, level, points=points)
        assert from_points.shape == (2**level, 2**level) and from_points.sum() == 40
        assert np.array_equal(from_points, grid_counts(h, w, level, density=deltas))
    assert game_errors(torch.from_numpy(deltas), points=points).tolist() == [0.0] * 4


def _game_reference(pred: np.ndarray, gt: np.ndarray, level: int) -> float:
    """GAME(L) by brute force: every pixel is put in its cell independently (cell k of n holds rows r with
    ⌊k·H/n⌋ <= r < ⌊(k+1)·H/n⌋)."""
    n = 2**level
    h, w = pred.shape
    cell_of_row = [max(k for k in range(n) if (k * h) // n <= r) for r in range(h)]
    cell_of_col = [max(k for k in range(n) if (k * w) // n <= c) for c in range(w)]
    diff = np.zeros((n, n))
    for r in range(h):
        for c in range(w):
            diff[cell_of_row[r], cell_of_col[c]] += pred[r, c] - gt[r, c]
    return float(np.abs(diff).sum())


def test_game_matches_a_brute_force_reference():
    rng = np.random.default_rng(0)
    pred = rng.gamma(0.3, 0.2, size=(37, 53))
    gt = rng.gamma(0.3, 0.2, size=(37, 53))
    fast = game_errors(torch.from_numpy(pred), density=gt)
    slow = [_game_reference(pred, gt, level) for level in range(4)]
    assert fast == pytest.approx(slow, rel=1e-9, abs=1e-9)
    assert fast[0] == pytest.approx(abs(pred.sum() - gt.sum()))
    assert all(fast[i] <= fast[i + 1] + 1e-12 for i in range(3))  # finer grids never hide errors


class _ChannelCounter(_SumPoolCounter):
    """Density = 8×8 sum-pool of (channel 0 + 3) / 100: positive and spread over the whole image."""

    def forward(self, x):
        return super().forward(x) / 100


def test_evaluate_model_reports_nae_and_game_and_keeps_mae(tmp_path):
    root = tmp_path / "g" / "test"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, points in (("a", [[2.0, 3.0], [60.0, 40.0], [61.0, 41.0]]), ("b", []), ("c", [[10.0, 30.0]])):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / f"{name}.png")
        (root / f"{name}.json").write_text(json.dumps(points))
    dataset = CrowdEvalDataset(list_records(tmp_path / "g", "generic", "test"))
    metrics, rows = evaluate_model(_ChannelCounter(), dataset, tile_size=32)  # tiled: 2 x 3 tiles
    preds = np.array([r["pred"] for r in rows])
    gts = np.array([r["gt"] for r in rows])
    assert gts.tolist() == [3.0, 0.0, 1.0]
    assert metrics["mae"] == pytest.approx(float(np.abs(preds - gts).mean()))
    assert metrics["game0"] == pytest.approx(metrics["mae"], rel=1e-6)  # GAME(0) is the MAE
    assert metrics["nae"] == pytest.approx(float(np.mean(np.abs(preds - gts)[[0, 2]] / gts[[0, 2]])))
    assert metrics["nae_images"] == 2
    assert all(len(r["game"]) == 4 for r in rows)
    assert metrics["game3"] == pytest.approx(float(np.mean([r["game"][3] for r in rows])))
    assert metrics["game3"] >= metrics["game2"] >= metrics["game1"] >= metrics["game0"] - 1e-9


def test_game0_is_the_mae_for_density_sum_counts(tmp_path):
    root = tmp_path / "g" / "test"
    root.mkdir(parents=True)
    Image.fromarray(np.zeros((40, 56, 3), np.uint8)).save(root / "a.png")
    (root / "a.json").write_text(json.dumps([[0.5, 0.5], [20.0, 20.0], [55.0, 39.0]]))  # corner heads lose mass
    dataset = CrowdEvalDataset(list_records(tmp_path / "g", "generic", "test"), gt_count="density_sum",
                               downsample="bicubic_x64")
    metrics, rows = evaluate_model(_ChannelCounter(), dataset, tile_size=0)
    assert rows[0]["gt"] != 3.0  # the reference's count: the sum of the bicubic 1/8 map
    assert metrics["game0"] == pytest.approx(metrics["mae"], rel=1e-5)
