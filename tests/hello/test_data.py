"""Data loading and bad input: ImageFolder decode failures, empty classes, class mismatches, manifests."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vkd.errors import DataError
from vkd.hello.config import ClassifierConfig, HelloDataConfig
from vkd.hello.data import (
    class_subset,
    load_imagefolder,
    load_split,
    prompt_names,
    read_distilled_set,
    write_distilled_set,
)
from vkd.hello.model import build_classifier
from vkd.hello.teacher import load_teacher, load_teacher_run, save_teacher


def _tree(root, classes=("cat", "golden_retriever"), n=3, size=20):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_imagefolder_streams_and_skips_undecodable(tmp_path):
    root = _tree(tmp_path / "train")
    (root / "cat" / "broken.jpg").write_bytes(b"not a jpeg at all")
    verified = load_imagefolder(root, image_size=16)  # default: one decoding pass now, nothing kept
    assert verified.streamed and verified.images is None  # only the index is in RAM
    assert len(verified) == 6 and verified.skipped == 1 and verified.skipped_files[0].endswith("broken.jpg")
    data = load_imagefolder(root, image_size=16, verify=False)
    assert data.class_names == ("cat", "golden_retriever") and data.labels.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert data.skipped == 0  # nothing decoded yet
    mem = data.materialize()  # one streaming pass
    assert mem.images.shape == (6, 3, 16, 16) and mem.images.dtype == torch.uint8
    assert mem.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.skipped == 1 and data.skipped_files[0].endswith("broken.jpg")
    assert "broken.jpg" in data.skip_summary() and "skipped 1" in data.skip_summary()
    assert prompt_names(data.class_names) == ["cat", "golden retriever"]
    assert mem.float_images().max() <= 1.0


def test_imagefolder_bad_input(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_imagefolder(tmp_path / "nope", 16)
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="class sub-folders"):
        load_imagefolder(tmp_path / "flat", 16)
    root = _tree(tmp_path / "t")
    (root / "empty_class").mkdir()
    with pytest.raises(DataError, match="contain no images: empty_class"):
        load_imagefolder(root, 16)
    bad = tmp_path / "bad"
    (bad / "a").mkdir(parents=True)
    (bad / "a" / "x.png").write_bytes(b"garbage")
    (bad / "a" / "y.png").write_bytes(b"garbage too")
    with pytest.raises(DataError, match="no image of class 'a' .* could be decoded"):
        load_imagefolder(bad, 16)
    data = load_imagefolder(bad, 16, verify=False)  # no pass yet: the error comes when a pass meets the class
    with pytest.raises(DataError, match="no image of class 'a' .* could be decoded"):
        data.fetch(torch.tensor([0]))  # a training pass substitutes within the class: none is left


def test_train_val_class_mismatch(tmp_path):
    _tree(tmp_path / "train", classes=("a", "b"))
    _tree(tmp_path / "val", classes=("a", "b", "c"))
    cfg = HelloDataConfig(source="imagefolder", train_dir=str(tmp_path / "train"), val_dir=str(tmp_path / "val"),
                          image_size=8)
    assert load_split(cfg, "train").num_classes == 2
    with pytest.raises(DataError, match="differ"):
        load_split(cfg, "test")
    with pytest.raises(DataError, match="class_names"):
        load_split(HelloDataConfig(class_names=["x", "y"]), "train")  # digits have 10 classes


def test_digits_split_and_class_subset():
    data = load_split(HelloDataConfig(), "train")
    assert data.images.shape[1:] == (3, 16, 16) and data.num_classes == 10
    assert data.class_names[3] == "three"
    idx = class_subset(data, 5, torch.Generator().manual_seed(0))
    assert data.labels[idx].tolist() == sorted(list(range(10)) * 5)
    with pytest.raises(DataError, match="fewer than"):
        class_subset(data, 10_000, torch.Generator())


def test_teacher_class_count_mismatch(tmp_path):
    cfg = ClassifierConfig(width=8, depth=2)
    model = build_classifier(cfg, 4, 16)
    save_teacher(model, tmp_path / "teacher.safetensors", {})
    with pytest.raises(DataError, match="predicts 4 classes but the dataset has 10"):
        load_teacher(tmp_path / "teacher.safetensors", cfg, 10, 16)
    run = tmp_path / "run"
    save_teacher(model, run / "teacher.safetensors", {"num_classes": 4, "class_names": list("abcd"),
                                                       "image_size": 16, "model": cfg.__dict__})
    (run / "teacher.safetensors").with_suffix(".json").rename(run / "teacher.json")
    with pytest.raises(DataError, match="4 classes but the dataset has 10"):
        load_teacher_run(run, 10)
    with pytest.raises(DataError, match="class order"):
        load_teacher_run(run, 4, ("a", "b", "d", "c"))
    bundle = load_teacher_run(run, 4, ("a", "b", "c", "d"), 16)
    assert bundle.final.num_classes == 4 and bundle.snapshots == []


def test_distilled_set_roundtrip_and_manifest_escape(tmp_path):
    x = torch.rand(4, 3, 8, 8)
    y = torch.tensor([0, 0, 1, 1])
    write_distilled_set(tmp_path / "d", x, y, ("cat", "dog/../../evil"))
    images, labels, manifest = read_distilled_set(tmp_path / "d")
    assert torch.equal(labels, y)
    assert (images - x).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit PNG quantisation only
    assert all(".." not in e["path"] for e in manifest["entries"])

    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    m["entries"][0]["path"] = "../../etc/passwd"
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="outside the dataset root"):
        read_distilled_set(tmp_path / "d")
    m["entries"][0]["path"] = str(tmp_path / "elsewhere.png")  # absolute, outside the root
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="outside the dataset root"):
        read_distilled_set(tmp_path / "d")
    m["entries"][0] = {"path": m["entries"][1]["path"], "label": 7}
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="label"):
        read_distilled_set(tmp_path / "d")
