"""Storage arithmetic: SRe2L-style stored soft labels vs projector adapters (hello.md §1, §8)."""

import pytest

from vkd.hello.evaluate import label_bytes, storage_report

MiB, GiB = 2**20, 2**30


def test_imagenet_ipc1_is_572_mib():
    b = label_bytes(300, 1000, 1000, "fp16")
    assert b == 600_000_000
    assert round(b / MiB) == 572


def test_imagenet_ipc10_50_200():
    assert label_bytes(300, 10_000, 1000) == 6.0e9
    assert label_bytes(300, 50_000, 1000) == 3.0e10
    assert round(label_bytes(300, 200_000, 1000) / GiB) == 112


def test_crops_and_dtype_multiply():
    base = label_bytes(10, 20, 5, "fp16")
    assert base == 10 * 20 * 5 * 2
    assert label_bytes(10, 20, 5, "fp32") == 2 * base
    assert label_bytes(10, 20, 5, "fp16", crops=4) == 4 * base
    with pytest.raises(ValueError):
        label_bytes(1, 1, 1, "int3")


def test_storage_report_ratio():
    # spec §8 toy: 5,288 fp32 floats of factors vs 300 epochs × 20 images × 10 classes of fp16 labels
    rep = storage_report({"params": 5288, "bytes": 5288 * 4}, num_images=20, num_classes=10, epochs=300)
    assert rep["soft_label_bytes"] == 300 * 20 * 10 * 2
    assert rep["storage_ratio"] == pytest.approx(5288 * 4 / 120_000)
    # the paper's headline: 0.8 MB vs ImageNet-1K IPC50 labels (28.3 GB) ≈ 2.8e-5
    rep = storage_report({"params": 400_000, "bytes": 800_000}, num_images=50_000, num_classes=1000)
    assert rep["storage_ratio"] == pytest.approx(2.67e-5, rel=0.01)
