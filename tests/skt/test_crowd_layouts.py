"""JHU-Crowd++, NWPU-Crowd, UCF_CC_50 (folds), CSRNet-pytorch JSON lists and .h5 densities, the evaluation
resolution, and the presets, on tiny fixtures written here in each data set's own layout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import run_cli, set_args
from PIL import Image
from scipy.io import savemat

from vkd.config import load_config, repo_root
from vkd.errors import ConfigError, DataError, UserError
from vkd.skt.config import CrowdDataConfig, SKTConfig, SKTTeacherConfig
from vkd.skt.datasets import (
    CrowdEvalDataset,
    build_eval_dataset,
    build_eval_sets,
    build_train_dataset,
    list_records,
    load_density,
    read_density,
)
from vkd.skt.layouts import csrnet_density_path, pair_files

try:
    import h5py
except ImportError:  # an optional extra (vkd[h5], part of dev)
    h5py = None
needs_h5py = pytest.mark.skipif(h5py is None, reason="needs h5py: pip install 'vkd[h5]'")


def _image(path: Path, w: int = 40, h: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(path.name))
    Image.fromarray(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)).save(path)
    return path


def _ann_mat(path: Path, points) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, {"annPoints": np.asarray(points, np.float64).reshape(-1, 2)})


def _h5(path: Path, density: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:  # CSRNet-pytorch's make_dataset: hf['density'] = k
        handle["density"] = density


# ------------------------------------------------------------------------------------------------------------
# JHU-Crowd++ v2.0
# ------------------------------------------------------------------------------------------------------------


def test_jhu_crowd_layout(tmp_path):
    root = tmp_path / "jhu_crowd_v2.0"
    for split in ("train", "val", "test"):
        _image(root / split / "images" / "0001.jpg")
        _image(root / split / "images" / "0002.jpg")
        # x y w h o b: head centre, box size, occlusion (1-3), blur (0/1)
        (root / split / "gt").mkdir(parents=True)
        (root / split / "gt" / "0001.txt").write_text("10 12 4 5 1 0\n30 20 6 6 2 1\n5 30 3 3 3 0\n")
        (root / split / "gt" / "0002.txt").write_text("")  # a distractor image: no people
        (root / split / "image_labels.txt").write_text("0001,3,stadium,0,0\n0002,0,street,2,1\n")
    recs = list_records(root, "jhu-crowd", "val")
    assert [r.image_path.name for r in recs] == ["0001.jpg", "0002.jpg"]
    assert [r.count for r in recs] == [3, 0]
    assert np.array_equal(recs[0].points, [[10, 12], [30, 20], [5, 30]])  # only x y are read
    (root / "test" / "gt" / "0002.txt").unlink()
    with pytest.raises(DataError, match="missing annotation .*0002.txt"):
        list_records(root, "jhu-crowd", "test")
    with pytest.raises(DataError, match="no JHU-Crowd\\+\\+ split 'dev'"):
        list_records(root, "jhu-crowd", "dev")


# ------------------------------------------------------------------------------------------------------------
# NWPU-Crowd
# ------------------------------------------------------------------------------------------------------------


def _nwpu(root: Path) -> Path:
    # images_part1/ as downloaded (images/ once merged), jsons/ with points and boxes, mats/ with annPoints
    _image(root / "images_part1" / "0001.jpg")
    _image(root / "images_part1" / "0002.jpg")
    _image(root / "images" / "0003.jpg")
    _image(root / "images" / "0004.jpg")
    (root / "jsons").mkdir(parents=True)
    for image_id, points in (("0001", [[3.5, 4.0], [20.0, 10.0]]), ("0003", [[1.0, 1.0]])):
        (root / "jsons" / f"{image_id}.json").write_text(json.dumps(
            {"img_id": f"{image_id}.jpg", "human_num": len(points), "points": points,
             "boxes": [[x - 2, y - 2, x + 2, y + 2] for x, y in points]}))
    _ann_mat(root / "mats" / "0002.mat", [[5, 5], [6, 6], [7, 7]])  # no JSON: the .mat is read
    (root / "train.txt").write_text("0001 1 2\n0002 0 3\n")  # id, then the image's attributes
    (root / "val.txt").write_text("0003 2 1\n")
    (root / "test.txt").write_text("0004 1 0\n")
    return root


def test_nwpu_crowd_layout_and_private_test_labels(tmp_path):
    root = _nwpu(tmp_path / "NWPU-Crowd")
    train = list_records(root, "nwpu-crowd", "train")
    assert [(r.image_path.name, r.count) for r in train] == [("0001.jpg", 2), ("0002.jpg", 3)]
    assert np.allclose(train[0].points, [[3.5, 4.0], [20.0, 10.0]])
    assert [r.count for r in list_records(root, "nwpu-crowd", "val")] == [1]
    with pytest.raises(DataError, match="test labels are not public.*data.test_split=val"):
        list_records(root, "nwpu-crowd", "test")
    (root / "val.txt").write_text("0003 2 1\n0009 1 1\n")
    with pytest.raises(DataError, match="1 of 2 images not found \\(first: 0009.jpg"):
        list_records(root, "nwpu-crowd", "val")


# ------------------------------------------------------------------------------------------------------------
# UCF_CC_50: 5-fold cross validation
# ------------------------------------------------------------------------------------------------------------


def test_ucf_cc_50_folds_are_consecutive_in_numeric_order(tmp_path):
    root = tmp_path / "UCF_CC_50"
    for n in range(1, 11):  # image N has N heads, so counts name the images
        _image(root / f"{n}.jpg")
        _ann_mat(root / f"{n}_ann.mat", [[1.0 + k, 2.0] for k in range(n)])
    seen = []
    for fold in range(5):
        test = [r.count for r in list_records(root, "ucf-cc-50", "test", fold=fold)]
        train = [r.count for r in list_records(root, "ucf-cc-50", "train", fold=fold)]
        assert test == [2 * fold + 1, 2 * fold + 2]  # 10 images: folds of 2 (of the 50: 1-10, 11-20, ...)
        assert sorted(test + train) == list(range(1, 11))
        seen += test
    assert sorted(seen) == list(range(1, 11))  # every image is tested exactly once
    with pytest.raises(DataError, match="splits are 'train'"):
        list_records(root, "ucf-cc-50", "val")
    with pytest.raises(ConfigError, match="data.fold must be in 0..4"):
        CrowdDataConfig(dataset="ucf-cc-50", root=str(root), fold=5)
    with pytest.raises(ConfigError, match="UCF_CC_50"):
        CrowdDataConfig(dataset="generic", root=str(root), fold=1)
    cfg = CrowdDataConfig(dataset="ucf-cc-50", root=str(root), fold=3, test_split="test")
    assert [r.count for r in build_eval_dataset(cfg).records] == [7, 8]


# ------------------------------------------------------------------------------------------------------------
# CSRNet-pytorch: JSON image lists and .h5 density maps
# ------------------------------------------------------------------------------------------------------------


def _csrnet_shanghaitech(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """part_A_final as CSRNet-pytorch leaves it: GT_IMG_1.mat points + IMG_k.h5 densities (IMG_2 has only the .h5)."""
    root = tmp_path / "part_A_final"
    base = root / "train_data"
    for k in (1, 2, 3):
        _image(base / "images" / f"IMG_{k}.jpg", w=40, h=32)
    info = np.empty((1, 1), dtype=object)
    info[0, 0] = {"location": np.array([[4.0, 5.0], [30.0, 20.0]]), "number": np.array([[2.0]])}
    (base / "ground_truth").mkdir()
    savemat(base / "ground_truth" / "GT_IMG_1.mat", {"image_info": info})
    density = np.zeros((32, 40), np.float32)
    density[10:14, 8:12] = 0.25  # 4 people
    density[30, 39] = 1.5
    for k in (1, 2, 3):
        _h5(base / "ground_truth" / f"IMG_{k}.h5", density * k)
    return root, density


@needs_h5py
def test_csrnet_json_list_reroots_paths_and_reads_h5_densities(tmp_path):
    root, density = _csrnet_shanghaitech(tmp_path)
    # the released lists name paths on the author's machine; relative entries work too
    listing = root / "part_A_train.json"
    listing.write_text(json.dumps(["/home/someone/Shanghai/part_A_final/train_data/images/IMG_2.jpg",
                                   "train_data/images/IMG_1.jpg"]))
    recs = list_records(root, "shanghaitech", "part_A_train.json")
    assert [r.image_path for r in recs] == [root / "train_data/images/IMG_2.jpg", root / "train_data/images/IMG_1.jpg"]
    img2, img1 = recs
    assert img1.density_path is None and img1.count == 2  # points are preferred where both exist
    assert img2.density_path == root / "train_data/ground_truth/IMG_2.h5"
    assert img2.count == pytest.approx(2 * float(density.sum()))  # the count of a density record is its sum
    assert np.array_equal(load_density(img2), 2 * density)
    # data.annotations=h5: CSRNet-pytorch's own targets even where the points exist
    h5 = list_records(root, "shanghaitech", str(listing), annotations="h5")
    assert all(r.density_path is not None for r in h5) and h5[1].count == pytest.approx(float(density.sum()))
    # the layout itself falls back to the .h5 where GT_IMG_k.mat is missing
    by_layout = {r.image_path.name: r for r in list_records(root, "shanghaitech", "train")}
    assert by_layout["IMG_1.jpg"].density_path is None and by_layout["IMG_3.jpg"].density_path is not None
    assert csrnet_density_path(Path("/d/train_data/images/IMG_9.jpg")) == Path("/d/train_data/ground_truth/IMG_9.h5")


@needs_h5py
def test_h5_density_is_resized_with_its_mass_and_used_by_the_eval_set(tmp_path):
    root, density = _csrnet_shanghaitech(tmp_path)
    (rec,) = [r for r in list_records(root, "shanghaitech", "train", max_side=20, annotations="h5")
              if r.image_path.name == "IMG_1.jpg"]
    assert (rec.height, rec.width) == (16, 20)
    small = load_density(rec)
    assert small.shape == (16, 20) and float(small.sum()) == pytest.approx(float(density.sum()), rel=1e-5)
    ds = CrowdEvalDataset([rec])
    assert float(ds[0]["count"]) == pytest.approx(float(density.sum()), rel=1e-5)
    assert ds[0]["image"].shape == (3, 16, 20)
    # training targets are the .h5 maps, sum-pooled to 1/8 (no kernel)
    train = build_train_dataset(CrowdDataConfig(dataset="shanghaitech", root=str(root), annotations="h5",
                                                crop="none", flip_prob=0.0))
    by_name = {r.image_path.name: k for k, r in enumerate(train.records)}
    item = train[by_name["IMG_3.jpg"]]
    assert item["density"].shape == (1, 4, 5)
    assert float(item["count"]) == pytest.approx(3 * float(density.sum()), rel=1e-5)


@needs_h5py
def test_list_naming_missing_files_is_one_line(tmp_path, capsys):
    root, _ = _csrnet_shanghaitech(tmp_path)
    listing = tmp_path / "part_A_val.json"
    listing.write_text(json.dumps(["/x/part_A_final/train_data/images/IMG_1.jpg", "/x/train_data/images/IMG_77.jpg",
                                   "train_data/images/IMG_78.jpg"]))
    with pytest.raises(DataError) as info:
        pair_files(root, "shanghaitech", str(listing))
    assert "2 of 3 listed images not found (first: /x/train_data/images/IMG_77.jpg" in str(info.value)
    code, err = run_cli(capsys, "distill", "skt-teacher", *set_args(
        f"run.output_dir={tmp_path / 'runs'}", "data.dataset=shanghaitech", f"data.root={root}",
        f"data.train_split={listing}", "train.steps=1", "model.width_div=4"))
    errors = [line for line in err.splitlines() if line.startswith("vkd: error:")]
    assert code == 2 and len(errors) == 1 and "2 of 3 listed images not found" in errors[0], err
    assert "Traceback" not in err
    listing.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="expected a JSON list of image paths"):
        pair_files(root, "shanghaitech", str(listing))
    with pytest.raises(DataError, match="image list nope.json not found"):
        pair_files(root, "shanghaitech", "nope.json")


@needs_h5py
def test_bad_h5_files_and_missing_h5py(tmp_path, monkeypatch):
    with h5py.File(tmp_path / "a.h5", "w") as handle:
        handle["dens"] = np.zeros((4, 4))
    with pytest.raises(DataError, match="no dataset 'density'.*dens"):
        read_density(tmp_path / "a.h5")
    (tmp_path / "b.h5").write_bytes(b"not hdf5")
    with pytest.raises(DataError, match="cannot read density map"):
        read_density(tmp_path / "b.h5")
    _h5(tmp_path / "c.h5", np.full((4, 4), np.nan))
    with pytest.raises(DataError, match="non-finite"):
        read_density(tmp_path / "c.h5")
    root, _ = _csrnet_shanghaitech(tmp_path / "shape")
    _h5(root / "train_data/ground_truth/IMG_2.h5", np.zeros((8, 8), np.float32))
    with pytest.raises(DataError, match="density map is 8x8 but image .*IMG_2.jpg is 40x32"):
        list_records(root, "shanghaitech", "train")
    monkeypatch.setitem(sys.modules, "h5py", None)  # as if h5py were not installed
    with pytest.raises(UserError, match=r"pip install 'vkd\[h5\]'"):
        read_density(tmp_path / "c.h5")


# ------------------------------------------------------------------------------------------------------------
# Evaluation resolution and presets
# ------------------------------------------------------------------------------------------------------------


def test_evaluation_is_full_resolution_unless_eval_max_side(tmp_path):
    root = tmp_path / "UCF-QNRF_ECCV18"
    for split in ("Train", "Test"):
        for k in (1, 2):
            _image(root / split / f"img_000{k}.jpg", w=64, h=48)
            _ann_mat(root / split / f"img_000{k}_ann.mat", [[10, 10], [60, 40]])
    overrides = ["data.dataset=ucf-qnrf", f"data.root={root}", "data.max_side=32", "data.val_fraction=1"]
    cfg = load_config(SKTTeacherConfig, None, overrides, task="skt-teacher")
    sets = build_eval_sets(cfg)
    assert {(r.height, r.width) for ds in sets.values() for r in ds.records} == {(48, 64)}  # SKT: full resolution
    cfg = load_config(SKTTeacherConfig, None, [*overrides, "eval.max_side=32"], task="skt-teacher")
    sets = build_eval_sets(cfg)
    assert {(r.height, r.width) for ds in sets.values() for r in ds.records} == {(24, 32)}  # downscaled protocol
    assert [r.count for r in sets["test"].records] == [2, 2]


@pytest.mark.parametrize("name", ["jhu-crowd", "nwpu-crowd", "ucf-cc-50", "ucf-qnrf"])
def test_presets_load(name):
    presets = repo_root() / "configs" / "skt"
    teacher = load_config(SKTTeacherConfig, presets / f"{name}-teacher.yaml", task="skt-teacher")
    student = load_config(SKTConfig, presets / f"{name}.yaml", task="skt")
    for cfg in (teacher, student):
        assert cfg.data.dataset == name and cfg.eval.max_side == 0  # full-resolution, tiled evaluation
    if name == "nwpu-crowd":
        assert student.data.test_split == "val"
