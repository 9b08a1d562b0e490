"""Dataset readers and loaders on tiny fixtures written here (.mat via scipy.io.savemat), bad input."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from vkd.errors import DataError
from vkd.skt.crowds import CrowdSpec, generate_crowd, write_crowd_dataset
from vkd.skt.datasets import (
    CrowdEvalDataset,
    CrowdTrainDataset,
    list_records,
    load_image,
    pad_collate,
    read_points,
)
from vkd.skt.density import DensityCache, KernelSpec


def _image(path, w=40, h=32, mode="RGB"):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, size=(h, w, 4 if mode == "RGBA" else 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGBA" if mode == "RGBA" else "RGB")
    if mode == "L":
        img = img.convert("L")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _sha_mat(path, points):
    # MATLAB: image_info = {struct('location', N×2, 'number', N)} — a 1×1 cell holding a struct.
    info = np.empty((1, 1), dtype=object)
    info[0, 0] = {"location": np.asarray(points, np.float64), "number": np.array([[len(points)]], np.float64)}
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, {"image_info": info})


def test_shanghaitech_layout(tmp_path):
    root = tmp_path / "part_A_final"
    for split, pts in (("train", [[3.5, 4.2], [30.0, 20.0], [39.9, 31.9]]), ("test", [[1.0, 1.0]])):
        _image(root / f"{split}_data" / "images" / "IMG_1.jpg")
        _sha_mat(root / f"{split}_data" / "ground_truth" / "GT_IMG_1.mat", pts)
    recs = list_records(root, "shanghaitech", "train")
    assert len(recs) == 1 and recs[0].count == 3 and (recs[0].height, recs[0].width) == (32, 40)
    assert np.allclose(recs[0].points[0], [3.5, 4.2])
    assert list_records(root, "shanghaitech", "test")[0].count == 1
    # The hyphenated directory name of the issue is accepted too.
    (root / "test_data" / "ground_truth").rename(root / "test_data" / "ground-truth")
    assert list_records(root, "shanghaitech", "test")[0].count == 1


def test_ucf_qnrf_layout_and_out_of_image_points(tmp_path, caplog):
    root = tmp_path / "UCF-QNRF_ECCV18"
    _image(root / "Train" / "img_0001.jpg")
    pts = [[5, 5], [-1, 3], [10, 40], [39.5, 31.5], [40.0, 10.0]]  # 3 outside a 40x32 image
    savemat(root / "Train" / "img_0001_ann.mat", {"annPoints": np.asarray(pts, np.float64)})
    with caplog.at_level(logging.WARNING):
        recs = list_records(root, "ucf-qnrf", "train")
    assert recs[0].count == 2 and recs[0].dropped == 3
    assert "dropped 3 head points" in caplog.text


def test_generic_json_csv_txt_npy(tmp_path):
    root = tmp_path / "mine" / "train"
    _image(root / "a.png")
    (root / "a.json").write_text(json.dumps({"points": [[1, 2], [3, 4]]}))
    _image(root / "b.jpg")
    (root / "b.csv").write_text("x,y\n1,2\n3,4\n5,6\n")
    _image(root / "c.png")
    (root / "c.txt").write_text("1 2\n3 4\n")
    _image(root / "d.png")
    np.save(root / "d.npy", np.array([[1.0, 2.0, 7.0]]))  # BL's third column is ignored
    _image(root / "e.png")
    (root / "e.json").write_text(json.dumps([{"x": 1, "y": 2}]))
    recs = list_records(tmp_path / "mine", "generic", "train")
    assert [r.count for r in recs] == [2, 3, 2, 1, 1]


@pytest.mark.parametrize("content,match", [
    ({"wrong": np.zeros((2, 2))}, "expected key 'image_info'"),
    ({"image_info": np.zeros((1, 1))}, "no 'location' field"),
])
def test_mat_without_expected_keys(tmp_path, content, match):
    path = tmp_path / "GT_IMG_1.mat"
    savemat(path, content)
    with pytest.raises(DataError, match=match):
        read_points(path)


def test_bad_annotations(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"heads_wrong": []}))
    with pytest.raises(DataError, match="'points'"):
        read_points(bad)
    bad.write_text("[[1, 2, 3], [4]]")
    with pytest.raises(DataError):
        read_points(bad)
    csv_bad = tmp_path / "x.csv"
    csv_bad.write_text("x,y\n1,a\n")
    with pytest.raises(DataError, match="numeric"):
        read_points(csv_bad)
    with pytest.raises(DataError, match="not found"):
        read_points(tmp_path / "missing.mat")
    _image(tmp_path / "noann" / "train" / "z.png")
    with pytest.raises(DataError, match="no annotation"):
        list_records(tmp_path / "noann", "generic", "train")


def test_grayscale_rgba_converted_and_small_rejected(tmp_path):
    grey, mode = load_image(_image(tmp_path / "g.png", mode="L"))
    assert grey.shape == (32, 40, 3) and mode == "L"
    rgba, mode = load_image(_image(tmp_path / "r.png", mode="RGBA"))
    assert rgba.shape == (32, 40, 3) and mode == "RGBA"
    rgb, mode = load_image(_image(tmp_path / "c.png"))
    assert mode is None
    _image(tmp_path / "tiny" / "train" / "t.png", w=6, h=20)
    (tmp_path / "tiny" / "train" / "t.json").write_text("[[1, 1]]")
    with pytest.raises(DataError, match="at least 8 pixels"):
        list_records(tmp_path / "tiny", "generic", "train")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="not a readable image"):
        load_image(tmp_path / "broken.png")


def test_train_dataset_crops_keep_mass(tmp_path):
    root = tmp_path / "g" / "train"
    _image(root / "a.png", w=64, h=48)
    pts = np.array([[10.0, 10.0], [50.0, 30.0], [32.0, 24.0]])
    (root / "a.json").write_text(json.dumps(pts.tolist()))
    recs = list_records(tmp_path / "g", "generic", "train")
    cache = DensityCache(tmp_path / "cache")
    full = CrowdTrainDataset(recs, KernelSpec(), cache, crop="none", flip_prob=0.0)
    item = full[0]
    assert item["image"].shape == (3, 48, 64) and item["density"].shape == (1, 6, 8)
    assert float(item["count"]) == pytest.approx(3.0, abs=1e-4)
    torch.manual_seed(0)
    ds = CrowdTrainDataset(recs, KernelSpec(), cache, crop="ratio", crop_ratio=(0.5, 1.0), flip_prob=0.5, repeat=4)
    assert len(ds) == 4
    dens_full = np.asarray(cache.get(recs[0].points, 48, 64, KernelSpec(), name="a"))
    for i in range(4):
        it = ds[i]
        h, w = it["image"].shape[-2:]
        assert 24 <= h <= 48 and 32 <= w <= 64
        assert it["density"].shape == (1, -(-h // 8), -(-w // 8))
        assert float(it["count"]) <= dens_full.sum() + 1e-4
    fixed = CrowdTrainDataset(recs, KernelSpec(), cache, crop="fixed", crop_size=32)
    assert fixed[0]["image"].shape == (3, 32, 32)
    batch = pad_collate([ds[0], ds[1], fixed[0]])
    assert batch["image"].shape[-2] % 8 == 0 and batch["density"].shape[-2] == batch["image"].shape[-2] // 8
    assert torch.allclose(batch["density"].sum((1, 2, 3)), batch["count"], atol=1e-4)


def test_eval_dataset_counts(tmp_path):
    root = tmp_path / "g" / "test"
    _image(root / "a.png", w=64, h=48)
    (root / "a.json").write_text(json.dumps([[0.5, 0.5], [63.0, 47.0]]))
    recs = list_records(tmp_path / "g", "generic", "test")
    ds = CrowdEvalDataset(recs)
    assert float(ds[0]["count"]) == 2.0 and ds[0]["image"].shape == (3, 48, 64)
    parity = CrowdEvalDataset(recs, gt_count="density_sum", kernel=KernelSpec(border="constant"))
    assert float(parity[0]["count"]) < 1.5  # constant borders lose mass at corner heads


def test_synthetic_generator(tmp_path):
    spec = CrowdSpec(height=48, width=64, count_min=3, count_max=200)
    img, pts = generate_crowd(np.random.default_rng(1), spec)
    img2, pts2 = generate_crowd(np.random.default_rng(1), spec)
    assert img.size == (64, 48) and np.array_equal(np.asarray(img), np.asarray(img2)) and np.array_equal(pts, pts2)
    assert ((pts[:, 0] >= 0) & (pts[:, 0] < 64) & (pts[:, 1] >= 0) & (pts[:, 1] < 48)).all()
    counts = [len(generate_crowd(np.random.default_rng(s), spec)[1]) for s in range(12)]
    assert min(counts) < 15 and max(counts) > 40  # from a few to many
    root = write_crowd_dataset(tmp_path / "syn", 3, 2, spec, seed=0)
    stamp = (root / "meta.json").stat().st_mtime_ns
    assert write_crowd_dataset(tmp_path / "syn", 3, 2, spec, seed=0) == root
    assert (root / "meta.json").stat().st_mtime_ns == stamp  # reused, not regenerated
    recs = list_records(root, "generic", "train")
    assert len(recs) == 3 and len(list_records(root, "generic", "test")) == 2
