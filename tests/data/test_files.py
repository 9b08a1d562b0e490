"""Safe readers: broken images, decompression bombs, manifest path escapes, non-finite arrays."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from vkd.data.files import (
    SkipLog,
    check_finite_array,
    image_size,
    list_images,
    read_image,
    read_images,
    resolve_inside,
)
from vkd.errors import DataError


@pytest.fixture
def corpus(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.full((6, 5, 3), 200, np.uint8)).save(good)
    Image.fromarray(np.full((6, 5), 50, np.uint8)).save(tmp_path / "grey.png")
    Image.fromarray(np.zeros((4, 4, 4), np.uint8), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.full((64, 64, 3), 9, np.uint8)).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    png = good.read_bytes()
    (tmp_path / "truncated.png").write_bytes(png[: len(png) - 20])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is not an image")
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "really_png.jpg", format="PNG")
    return tmp_path


def test_good_images_convert_to_rgb(corpus):
    assert read_image(corpus / "good.png").shape == (6, 5, 3)
    assert read_image(corpus / "grey.png").shape == (6, 5, 3)
    assert read_image(corpus / "rgba.png").shape == (4, 4, 3)
    assert read_image(corpus / "really_png.jpg").shape == (2, 2, 3)  # content decides, not the extension


@pytest.mark.parametrize(("name", "message"), [
    ("truncated.jpg", "cannot decode"), ("truncated.png", "cannot decode"), ("empty.png", "empty"),
    ("text.png", "not a readable image"), ("missing.png", "not found"),
])
def test_broken_images_are_one_line_data_errors(corpus, name, message):
    with pytest.raises(DataError, match=message) as info:
        read_image(corpus / name)
    assert "\n" not in str(info.value)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("L", (4000, 3000)).save(path)  # 12 MP of zeros compresses to a few kB
    assert os.path.getsize(path) < 100_000
    with pytest.raises(DataError, match="decompression bomb"):
        read_image(path, max_pixels=10_000_000)


def test_read_images_counts_skips(corpus):
    skips = SkipLog()
    images = read_images(list_images(corpus), skips=skips)
    assert {p.name for p, _ in images} == {"good.png", "grey.png", "rgba.png", "full.jpg", "really_png.jpg"}
    assert {os.path.basename(p) for p, _ in skips.skipped} == {"truncated.jpg", "truncated.png", "empty.png",
                                                               "text.png"}
    assert "skipped 4 unreadable file(s)" in skips.summary()


def test_manifest_paths_cannot_escape_root(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "secret").write_text("x")
    assert resolve_inside(root, "sub/a.png") == (root / "sub" / "a.png").resolve()
    for bad in ("../secret", "sub/../../secret", str(tmp_path / "secret"), "/etc/passwd"):
        with pytest.raises(DataError, match="outside the dataset root"):
            resolve_inside(root, bad)
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(DataError, match="outside the dataset root"):
        resolve_inside(root, "link/secret")
    # checked as written (scene files): a folder the dataset links elsewhere is kept, escapes are not
    assert resolve_inside(root, "link/secret", follow_symlinks=False) == root.absolute() / "link" / "secret"
    for bad in ("../secret", "sub/../../secret", str(tmp_path / "secret"), "/etc/passwd"):
        with pytest.raises(DataError, match="outside the dataset root"):
            resolve_inside(root, bad, follow_symlinks=False)


def test_image_size_reads_the_header_with_the_same_guards(corpus, tmp_path):
    assert image_size(corpus / "good.png") == (5, 6)
    assert image_size(corpus / "truncated.png") == (5, 6)  # the header is intact; decoding fails later
    with pytest.raises(DataError, match="empty"):
        image_size(corpus / "empty.png")
    with pytest.raises(DataError, match="not a readable image"):
        image_size(corpus / "text.png")
    path = tmp_path / "wide.png"
    Image.new("L", (5000, 3000)).save(path)
    with pytest.raises(DataError, match="decompression bomb"):
        image_size(path, max_pixels=10_000_000)


def test_non_finite_arrays_are_refused():
    check_finite_array(np.ones(3), "points")
    with pytest.raises(DataError, match="points contains 1 non-finite"):
        check_finite_array(np.array([1.0, np.nan, 2.0]), "points")
