"""Bad-data corpus through every loader and the CLI: a clear one-line error or a counted, reported skip, never a
traceback or a hang.

The corpus (:func:`corpus`) holds truncated PNG/JPEG files, zero-byte files, text files named ``.png``,
decompression-bomb headers (one PIL refuses itself, one only vkd's pixel limit catches), NaN-containing ``.npy``
and ``.mat`` annotations, annotations with missing keys, and a malformed ``.npy``. Scene tests mutate a valid
COLMAP / ``transforms.json`` scene one fault at a time (inconsistent ids, missing frames, missing file paths,
missing images, paths escaping the scene root, non-finite poses). The loaders are: the SKT crowd datasets
(generic, ShanghaiTech, UCF-QNRF layouts), the Feature 3DGS scene loaders, the HeLlO ImageFolder reader and
the FID image folders and statistics files; the CLI commands are ``vkd distill skt-teacher|skt|feature3dgs|
hello-teacher``, ``vkd fid`` and ``vkd count``, run in process (fast) and, in one test, as real child processes
with timeouts (no ``Traceback`` in their stderr, no hang).
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run_cli as _cli
from cli_helpers import set_args as _sets
from PIL import Image

from vkd.errors import DataError

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.timeout(180)]


# ------------------------------------------------------------------------------------------------------------
# The corpus
# ------------------------------------------------------------------------------------------------------------


def png_bytes(w: int = 32, h: int = 32, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def jpg_bytes(w: int = 32, h: int = 32, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def png_header(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims ``w × h`` pixels (a decompression bomb's first bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


# name -> (bytes, the fragment of the one-line error)
BAD_IMAGES: dict[str, tuple[bytes, str]] = {
    "truncated.png": (png_bytes()[: len(png_bytes()) // 2], "cannot decode"),
    "truncated.jpg": (jpg_bytes()[: len(jpg_bytes()) // 2], "cannot decode"),
    "empty.png": (b"", "empty"),
    "empty.jpg": (b"", "empty"),
    "text.png": (b"this is not an image\n", "not a readable image"),
    "bomb.png": (png_header(100_000, 100_000), "decompression bomb"),  # PIL's own guard raises
    "big.png": (png_header(9000, 9000), "decompression bomb"),  # below PIL's limit: only vkd's catches it
}
# SKT reads crowd photos up to PIL's own limit (~179 MP, vkd count tiles any size): the 81 MP header passes the
# size check and its missing pixel data fails to decode
SKT_FRAGMENT = {**{k: v[1] for k, v in BAD_IMAGES.items()}, "big.png": "cannot decode"}
# a file whose extension lies but whose content is a fine image: accepted (the content decides)
WRONG_EXTENSION_OK = ("jpeg_named.png", jpg_bytes(12, 12, seed=3))


def bad_image_ids() -> list[str]:
    return list(BAD_IMAGES)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """One directory with every broken input (tests copy what their layout needs)."""
    from scipy.io import savemat

    root = tmp_path_factory.mktemp("bad_corpus")
    for name, (data, _) in BAD_IMAGES.items():
        (root / name).write_bytes(data)
    (root / WRONG_EXTENSION_OK[0]).write_bytes(WRONG_EXTENSION_OK[1])
    (root / "good.png").write_bytes(png_bytes(seed=1))
    nan_points = np.array([[1.0, 2.0], [np.nan, 3.0], [4.0, np.inf]])
    np.save(root / "nan.npy", nan_points)
    savemat(root / "nan_ann.mat", {"annPoints": nan_points})
    savemat(root / "nokey.mat", {"something": np.zeros((2, 2))})
    savemat(root / "noloc.mat", {"image_info": np.zeros((1, 1))})
    (root / "empty.npy").write_bytes(b"")
    (root / "empty.mat").write_bytes(b"")
    np.save(root / "pickled.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    (root / "nokey.json").write_text('{"people": [[1, 2]]}')
    (root / "badpoint.json").write_text('[{"x": 1}]')
    (root / "binary.json").write_bytes(png_bytes())
    (root / "empty.json").write_bytes(b"")
    (root / "nocols.csv").write_text("a,b\nq,r\n")
    (root / "bad.txt").write_text("1\n")
    return root


def one_line_error(code: int, err: str, fragment: str) -> None:
    """Exit code 2, exactly one ``vkd: error:`` line containing ``fragment``, and no traceback."""
    errors = [line for line in err.splitlines() if line.startswith("vkd: error:")]
    assert code == 2, err
    assert len(errors) == 1, err
    assert fragment in errors[0], errors[0]
    assert "Traceback" not in err


def assert_data_error(info: pytest.ExceptionInfo, fragment: str) -> None:
    assert fragment in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------------------
# SKT crowd datasets
# ------------------------------------------------------------------------------------------------------------


def _generic_root(tmp_path: Path, extra: dict[str, bytes | Path] | None = None, split: str = "train") -> Path:
    """A generic-layout crowd data set with two good images (+ ``extra`` files in ``split``)."""
    root = tmp_path / "crowds"
    for sp in ("train", "test"):
        (root / sp).mkdir(parents=True, exist_ok=True)
        for k in range(2):
            (root / sp / f"good{k}.png").write_bytes(png_bytes(seed=k))
            (root / sp / f"good{k}.json").write_text(json.dumps([[3.0, 4.0], [10.0, 12.0]]))
    for name, data in (extra or {}).items():
        target = root / split / name
        if isinstance(data, Path):
            shutil.copyfile(data, target)
        else:
            target.write_bytes(data)
    return root


def _skt_items(root: Path, split: str = "train") -> None:
    from vkd.skt.datasets import CrowdEvalDataset, CrowdTrainDataset, list_records
    from vkd.skt.density import DensityCache, KernelSpec

    records = list_records(root, "generic", split)
    train = CrowdTrainDataset(records, KernelSpec(), DensityCache(None), crop="none")
    evals = CrowdEvalDataset(records)
    for i in range(len(records)):
        train[i]
        evals[i]


@pytest.mark.parametrize("name", bad_image_ids())
def test_skt_bad_images(tmp_path, corpus, name):
    root = _generic_root(tmp_path, {name: corpus / name, Path(name).stem + ".json": b"[[1, 2]]"})
    with pytest.raises(DataError) as info:
        _skt_items(root)
    assert_data_error(info, SKT_FRAGMENT[name])


def test_skt_wrong_extension_image_is_read_by_content(tmp_path, corpus):
    root = _generic_root(tmp_path, {"jpeg_named.png": corpus / "jpeg_named.png", "jpeg_named.json": b"[[1, 2]]"})
    _skt_items(root)


@pytest.mark.parametrize(("ann", "fragment"), [
    ("nokey.json", "expected a list of [x, y]"), ("badpoint.json", "numeric 'x' and 'y'"),
    ("binary.json", "cannot read annotation"), ("empty.json", "cannot read annotation"),
    ("nocols.csv", "numeric x and y"), ("bad.txt", "'x y' pair"), ("empty.npy", "cannot read annotation"),
    ("pickled.npy", "cannot read annotation"), ("nokey.mat", "no head points"), ("empty.mat", "cannot read"),
])
def test_skt_bad_annotations(tmp_path, corpus, ann, fragment):
    suffix = Path(ann).suffix
    root = _generic_root(tmp_path, {"img.png": png_bytes(), f"img{suffix}": corpus / ann})
    with pytest.raises(DataError) as info:
        _skt_items(root)
    assert_data_error(info, fragment)


def test_skt_missing_annotation(tmp_path):
    root = _generic_root(tmp_path, {"lonely.png": png_bytes()})
    with pytest.raises(DataError, match="no annotation for"):
        _skt_items(root)


@pytest.mark.parametrize("ann", ["nan.npy", "nan_ann.mat"])
def test_skt_non_finite_points_are_dropped_and_counted(tmp_path, corpus, ann, caplog):
    from vkd.skt.datasets import list_records

    root = _generic_root(tmp_path, {"img.png": png_bytes(), f"img{Path(ann).suffix}": corpus / ann})
    with caplog.at_level(logging.WARNING):
        records = {r.image_path.name: r for r in list_records(root, "generic", "train")}
    assert records["img.png"].count == 1 and records["img.png"].dropped == 2
    assert "dropped 2 head points" in caplog.text


def test_skt_shanghaitech_and_qnrf_layouts(tmp_path, corpus):
    from vkd.skt.datasets import list_records

    sha = tmp_path / "sha" / "train_data"
    (sha / "images").mkdir(parents=True)
    (sha / "ground_truth").mkdir()
    (sha / "images" / "IMG_1.jpg").write_bytes(jpg_bytes())
    with pytest.raises(DataError, match="missing annotation"):
        list_records(tmp_path / "sha", "shanghaitech", "train")
    shutil.copyfile(corpus / "noloc.mat", sha / "ground_truth" / "GT_IMG_1.mat")
    with pytest.raises(DataError, match="no 'location' field"):
        list_records(tmp_path / "sha", "shanghaitech", "train")
    shutil.copyfile(corpus / "empty.mat", sha / "ground_truth" / "GT_IMG_1.mat")
    with pytest.raises(DataError, match="cannot read annotation"):
        list_records(tmp_path / "sha", "shanghaitech", "train")

    qnrf = tmp_path / "qnrf" / "Train"
    qnrf.mkdir(parents=True)
    (qnrf / "img_0001.jpg").write_bytes(jpg_bytes())
    shutil.copyfile(corpus / "nokey.mat", qnrf / "img_0001_ann.mat")
    with pytest.raises(DataError, match="'annPoints'"):
        list_records(tmp_path / "qnrf", "ucf-qnrf", "train")
    shutil.copyfile(corpus / "nan_ann.mat", qnrf / "img_0001_ann.mat")
    (record,) = list_records(tmp_path / "qnrf", "ucf-qnrf", "train")
    assert record.count == 1 and record.dropped == 2
    (qnrf / "img_0001.jpg").write_bytes(BAD_IMAGES["bomb.png"][0])
    with pytest.raises(DataError, match="decompression bomb"):
        list_records(tmp_path / "qnrf", "ucf-qnrf", "train")


# ------------------------------------------------------------------------------------------------------------
# Feature 3DGS scenes
# ------------------------------------------------------------------------------------------------------------


def _transforms_scene(root: Path, frames: int = 4) -> Path:
    from vkd.feature3dgs.ply import write_ply

    (root / "images").mkdir(parents=True)
    meta = {"camera_angle_x": 0.8, "w": 16, "h": 16, "ply_file_path": "points.ply", "frames": []}
    for k in range(frames):
        (root / "images" / f"f{k}.png").write_bytes(png_bytes(16, 16, seed=k))
        c2w = np.eye(4)
        c2w[:3, 3] = [0.5 * k, 0.0, 4.0]
        meta["frames"].append({"file_path": f"images/f{k}.png", "transform_matrix": c2w.tolist()})
    rng = np.random.default_rng(0)
    write_ply(root / "points.ply", {n: rng.normal(size=20).astype(np.float32) for n in "xyz"})
    (root / "transforms.json").write_text(json.dumps(meta))
    return root


def _edit_transforms(root: Path, edit) -> None:
    meta = json.loads((root / "transforms.json").read_text())
    edit(meta)
    (root / "transforms.json").write_text(json.dumps(meta))


def _nan_ply(root: Path) -> None:
    from vkd.feature3dgs.ply import write_ply

    xyz = np.zeros(5, np.float32)
    xyz[2] = np.nan
    write_ply(root / "points.ply", {"x": xyz, "y": xyz, "z": xyz})


def _no_wh(meta: dict) -> None:
    del meta["w"], meta["h"]


TRANSFORMS_FAULTS = {
    "no_frames_key": (lambda r: _edit_transforms(r, lambda m: m.pop("frames")), "no 'frames' list"),
    "frames_empty": (lambda r: _edit_transforms(r, lambda m: m.update(frames=[])), "lists no frames"),
    "frames_not_objects": (lambda r: _edit_transforms(r, lambda m: m.update(frames=[1, 2])), "needs file_path"),
    "frame_without_file_path": (lambda r: _edit_transforms(r, lambda m: m["frames"][1].pop("file_path")),
                                "needs file_path"),
    "frame_missing_image": (lambda r: (r / "images" / "f2.png").unlink(), "missing"),
    "frame_missing_image_no_size": (lambda r: ((r / "images" / "f2.png").unlink(), _edit_transforms(r, _no_wh)),
                                    "image not found"),
    "path_escapes_root": (lambda r: _edit_transforms(r, lambda m: m["frames"][0].update(file_path="../secret.png")),
                          "outside the dataset root"),
    "absolute_path": (lambda r: _edit_transforms(r, lambda m: m["frames"][0].update(
        file_path=str(r.parent / "secret.png"))), "outside the dataset root"),
    "ply_escapes_root": (lambda r: _edit_transforms(r, lambda m: m.update(ply_file_path="../../points.ply")),
                         "outside the dataset root"),
    "empty_json": (lambda r: (r / "transforms.json").write_bytes(b""), "not valid JSON"),
    "binary_json": (lambda r: (r / "transforms.json").write_bytes(png_bytes()), "cannot read"),
    "nan_pose": (lambda r: _edit_transforms(r, lambda m: m["frames"][0]["transform_matrix"][0].__setitem__(
        3, float("nan"))), "finite 4x4"),
    "bad_focal": (lambda r: _edit_transforms(r, lambda m: m.update(camera_angle_x="wide")), "malformed camera"),
    "nan_ply": (_nan_ply, "non-finite"),
    "bomb_image_no_size": (lambda r: ((r / "images" / "f1.png").write_bytes(BAD_IMAGES["bomb.png"][0]),
                                      _edit_transforms(r, _no_wh)), "decompression bomb"),
    "text_image_no_size": (lambda r: ((r / "images" / "f1.png").write_text("nope"), _edit_transforms(r, _no_wh)),
                           "not a readable image"),
}


@pytest.mark.parametrize("fault", list(TRANSFORMS_FAULTS))
def test_transforms_scene_faults(tmp_path, fault):
    from vkd.feature3dgs.data import load_scene

    (tmp_path / "secret.png").write_bytes(png_bytes(16, 16))  # exists: an escape must not reach it
    root = _transforms_scene(tmp_path / "scene")
    load_scene(root)  # the intact scene loads
    make, fragment = TRANSFORMS_FAULTS[fault]
    make(root)
    with pytest.raises(DataError) as info:
        load_scene(root)
    assert_data_error(info, fragment)


@pytest.mark.parametrize("name", bad_image_ids())
def test_scene_images_that_fail_to_decode(tmp_path, corpus, name):
    """With w/h in transforms.json the loader reads no pixels; decoding the broken view is a DataError."""
    from vkd.feature3dgs.data import load_scene

    root = _transforms_scene(tmp_path / "scene")
    shutil.copyfile(corpus / name, root / "images" / "f1.png")
    scene = load_scene(root)
    scene.load_image(0)
    with pytest.raises(DataError) as info:
        for i in range(len(scene)):
            scene.load_image(i)
    assert_data_error(info, BAD_IMAGES[name][1])


def _colmap_scene(root: Path, points: str = "1 0.1 0.2 0.3 255 0 0 0.5 1 0 2 0\n2 0.3 0.1 0.2 0 255 0 0.5 3 1\n"
                  ) -> Path:
    sparse = root / "sparse" / "0"
    sparse.mkdir(parents=True)
    (root / "images").mkdir()
    (sparse / "cameras.txt").write_text("# id model w h params\n1 PINHOLE 16 16 20 20 8 8\n")
    lines = []
    for k in range(3):
        (root / "images" / f"v{k}.png").write_bytes(png_bytes(16, 16, seed=k))
        lines += [f"{k + 1} 1 0 0 0 {0.5 * k} 0 4 1 v{k}.png", ""]
    (sparse / "images.txt").write_text("\n".join(lines) + "\n")
    (sparse / "points3D.txt").write_text(points)
    return root


def _colmap_bin(root: Path) -> None:
    """cameras.bin with one PINHOLE camera, cut in the middle of its parameters."""
    data = struct.pack("<Q", 1) + struct.pack("<iiQQ", 1, 1, 16, 16) + struct.pack("<dddd", 20, 20, 8, 8)
    (root / "sparse" / "0" / "cameras.bin").write_bytes(data[:-12])


def _sub(path: Path, old: str, new: str) -> None:
    path.write_text(path.read_text().replace(old, new))


COLMAP_FAULTS = {
    "image_refers_to_missing_camera": (lambda r: _sub(r / "sparse/0/images.txt", "0 4 1 v1.png", "0 4 7 v1.png"),
                                       "unknown camera 7"),
    "all_points_refer_to_unknown_images": (
        lambda r: (r / "sparse/0/points3D.txt").write_text("1 0.1 0.2 0.3 255 0 0 0.5 9 0\n"), "is empty"),
    "image_name_escapes_root": (lambda r: _sub(r / "sparse/0/images.txt", "v1.png", "../../secret.png"),
                                "outside the dataset root"),
    "truncated_cameras_bin": (_colmap_bin, "truncated"),
    "nan_pose": (lambda r: _sub(r / "sparse/0/images.txt", "2 1 0 0 0", "2 nan 0 0 0"), "non-finite"),
    "too_few_camera_params": (lambda r: _sub(r / "sparse/0/cameras.txt", "20 20 8 8", "20 8"), "4 parameters"),
    "non_numeric_camera": (lambda r: _sub(r / "sparse/0/cameras.txt", "16 16", "sixteen 16"), "cannot parse"),
    "empty_images_txt": (lambda r: (r / "sparse/0/images.txt").write_bytes(b""), "no registered images"),
    "missing_image_file": (lambda r: (r / "images" / "v2.png").unlink(), "missing"),
    "missing_points3d": (lambda r: (r / "sparse/0/points3D.txt").unlink(), "no points3D"),
}


@pytest.mark.parametrize("fault", list(COLMAP_FAULTS))
def test_colmap_scene_faults(tmp_path, fault):
    from vkd.feature3dgs.data import load_scene

    (tmp_path / "secret.png").write_bytes(png_bytes(16, 16))
    root = _colmap_scene(tmp_path / "scene")
    load_scene(root)
    make, fragment = COLMAP_FAULTS[fault]
    make(root)
    with pytest.raises(DataError) as info:
        load_scene(root)
    assert_data_error(info, fragment)


def test_colmap_points_with_unknown_images_are_dropped_and_counted(tmp_path, caplog):
    from vkd.feature3dgs.data import load_scene

    # point 2 is seen by image 3 (exists) and image 42 (does not)
    root = _colmap_scene(tmp_path / "scene", "1 0.1 0.2 0.3 255 0 0 0.5 1 0 2 0\n2 0.3 0.1 0.2 0 255 0 0.5 3 1 42 0\n")
    with caplog.at_level(logging.WARNING):
        scene = load_scene(root)
    assert scene.points.shape == (1, 3)
    assert "dropped 1 of 2 points3D entries" in caplog.text


# ------------------------------------------------------------------------------------------------------------
# HeLlO ImageFolder
# ------------------------------------------------------------------------------------------------------------


def _imagefolder(tmp_path: Path, corpus: Path, bad_in: str = "a") -> Path:
    root = tmp_path / "folder"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for k in range(3):
            (root / cls / f"{k}.png").write_bytes(png_bytes(12, 12, seed=k))
    for name in BAD_IMAGES:
        shutil.copyfile(corpus / name, root / bad_in / name)
    shutil.copyfile(corpus / WRONG_EXTENSION_OK[0], root / bad_in / WRONG_EXTENSION_OK[0])
    return root


def test_hello_imagefolder_skips_and_counts(tmp_path, corpus, caplog):
    from vkd.hello.data import load_imagefolder

    with caplog.at_level(logging.WARNING):
        data = load_imagefolder(_imagefolder(tmp_path, corpus), 8)
    assert data.skipped == len(BAD_IMAGES) and len(data) == 7  # 3 + 3 good + the mislabelled JPEG
    assert {Path(p).name for p in data.skipped_files} == set(BAD_IMAGES)
    assert f"skipped {len(BAD_IMAGES)} unreadable file(s)" in caplog.text


def test_hello_imagefolder_class_without_readable_images(tmp_path, corpus):
    from vkd.hello.data import load_imagefolder

    root = _imagefolder(tmp_path, corpus)
    (root / "c").mkdir()
    shutil.copyfile(corpus / "truncated.png", root / "c" / "x.png")
    with pytest.raises(DataError, match="no image of class 'c'"):
        load_imagefolder(root, 8)


# ------------------------------------------------------------------------------------------------------------
# FID image folders and statistics
# ------------------------------------------------------------------------------------------------------------


def test_fid_image_folder_skips_and_counts(tmp_path, corpus):
    from vkd.metrics.fid import scan_image_dir

    root = _imagefolder(tmp_path, corpus) / "a"
    scan = scan_image_dir(root)
    assert {n for n, _ in scan.skipped} == set(BAD_IMAGES)  # each with its reason
    assert all(why for _, why in scan.skipped)
    assert len(scan.files) == 3 + 1 and scan.size == (12, 12)


def _npz(path: Path, **arrays) -> Path:
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return path


@pytest.fixture
def bad_stats(tmp_path) -> dict[str, tuple[Path, str]]:
    good = {"mu": np.zeros(3), "sigma": np.eye(3), "num": np.asarray(10)}
    out = {
        "empty": (tmp_path / "empty.npz", "cannot read reference statistics"),
        "truncated": (tmp_path / "truncated.npz", "cannot read reference statistics"),
        "no_sigma": (_npz(tmp_path / "no_sigma.npz", mu=np.zeros(3)), "needs 'mu' and 'sigma'"),
        "nan_mu": (_npz(tmp_path / "nan.npz", **{**good, "mu": np.array([0.0, np.nan, 1.0])}), "non-finite"),
        "pickled": (_npz(tmp_path / "pickled.npz", mu=np.array([{}], dtype=object), sigma=np.eye(1)),
                    "cannot read reference statistics"),
        "text": (tmp_path / "text.npz", "cannot read reference statistics"),
    }
    out["empty"][0].write_bytes(b"")
    data = _npz(tmp_path / "whole.npz", **good).read_bytes()
    out["truncated"][0].write_bytes(data[: len(data) // 2])
    out["text"][0].write_text("mu, sigma")
    return out


def test_fid_bad_statistics_files(bad_stats):
    from vkd.metrics.fid import load_reference

    for key, (path, fragment) in bad_stats.items():
        with pytest.raises(DataError) as info:
            load_reference(path)
        assert fragment in str(info.value), (key, str(info.value))


# ------------------------------------------------------------------------------------------------------------
# The CLI, in process (fast)
# ------------------------------------------------------------------------------------------------------------




SKT_TINY = ["train.steps=2", "train.batch_size=2", "train.log_every=1", "model.width_div=4", "eval.tile_size=0",
            "data.dataset=generic", "data.crop=none"]




@pytest.mark.parametrize("name", bad_image_ids())
def test_cli_distill_skt_teacher_bad_images(tmp_path, corpus, capsys, name):
    root = _generic_root(tmp_path, {name: corpus / name, Path(name).stem + ".json": b"[[1, 2]]"})
    code, err = _cli(capsys, "distill", "skt-teacher",
                     *_sets(f"run.output_dir={tmp_path / 'runs'}", f"data.root={root}", *SKT_TINY))
    one_line_error(code, err, SKT_FRAGMENT[name])


@pytest.mark.parametrize("ann", ["nokey.json", "empty.npy", "nokey.mat", "nocols.csv"])
def test_cli_distill_skt_bad_annotations(tmp_path, corpus, capsys, ann):
    from safetensors.torch import save_file

    from vkd.skt.models import CSRNet

    save_file({k: v.contiguous() for k, v in CSRNet(4).state_dict().items()}, str(tmp_path / "t.safetensors"))
    root = _generic_root(tmp_path, {"img.png": png_bytes(), f"img{Path(ann).suffix}": corpus / ann})
    code, err = _cli(capsys, "distill", "skt", *_sets(
        f"run.output_dir={tmp_path / 'runs'}", f"data.root={root}", f"teacher.run={tmp_path / 't.safetensors'}",
        "teacher.width_div=4", *[s for s in SKT_TINY if not s.startswith("model.")]))
    one_line_error(code, err, str(root / "train" / f"img{Path(ann).suffix}"))


@pytest.mark.parametrize("fault", ["frame_missing_image", "path_escapes_root", "frames_empty", "nan_pose"])
def test_cli_distill_feature3dgs_bad_transforms(tmp_path, capsys, fault):
    (tmp_path / "secret.png").write_bytes(png_bytes(16, 16))
    root = _transforms_scene(tmp_path / "scene")
    make, fragment = TRANSFORMS_FAULTS[fault]
    make(root)
    code, err = _cli(capsys, "distill", "feature3dgs", *_sets(f"run.output_dir={tmp_path / 'runs'}",
                                                               f"data.path={root}", "train.steps=2"))
    one_line_error(code, err, fragment)


@pytest.mark.parametrize("fault", ["image_refers_to_missing_camera", "truncated_cameras_bin",
                                   "image_name_escapes_root"])
def test_cli_distill_feature3dgs_bad_colmap(tmp_path, capsys, fault):
    (tmp_path / "secret.png").write_bytes(png_bytes(16, 16))
    root = _colmap_scene(tmp_path / "scene")
    make, fragment = COLMAP_FAULTS[fault]
    make(root)
    code, err = _cli(capsys, "distill", "feature3dgs", *_sets(f"run.output_dir={tmp_path / 'runs'}",
                                                               f"data.path={root}", "train.steps=2"))
    one_line_error(code, err, fragment)


HELLO_TINY = ["model.width=4", "model.depth=1", "train.steps=2", "train.batch_size=4", "extra.num_snapshots=1",
              "data.source=imagefolder", "data.image_size=8"]


def test_cli_distill_hello_teacher_bad_folder(tmp_path, corpus, capsys):
    root = _imagefolder(tmp_path, corpus)
    common = [f"run.output_dir={tmp_path / 'runs'}", f"data.train_dir={root}", f"data.val_dir={root}", *HELLO_TINY]
    # unreadable files among readable ones: skipped, counted, and training goes on
    code, err = _cli(capsys, "distill", "hello-teacher", *_sets(*common))
    assert code == 0, err
    meta = json.loads((tmp_path / "runs" / "hello-teacher" / "default" / "teacher.json").read_text())
    assert meta["skipped_images"] == 2 * len(BAD_IMAGES)  # the train and the val split read the same folder
    # a class whose files are all unreadable: a one-line error
    (root / "c").mkdir()
    shutil.copyfile(corpus / "text.png", root / "c" / "x.png")
    code, err = _cli(capsys, "distill", "hello-teacher", "--overwrite", *_sets(*common))
    one_line_error(code, err, "no image of class 'c'")


@pytest.fixture(scope="module")
def extractor_file(tmp_path_factory) -> Path:
    class Feat(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x.mean(dim=(1, 2, 3))[:, None], x[:, 0, :2, :2].flatten(1)], 1)

    path = tmp_path_factory.mktemp("extractor") / "feat.pt"
    torch.jit.script(Feat()).save(str(path))
    return path


def test_cli_fid_bad_inputs(tmp_path, corpus, capsys, extractor_file, bad_stats):
    folder = _imagefolder(tmp_path, corpus)
    # unreadable files are skipped and reported; the score is still computed
    code, err = _cli(capsys, "fid", "--real", folder / "a", "--fake", folder / "b", "--extractor", extractor_file,
                     "--device", "cpu")
    assert code == 0, err
    assert f"vkd: warning: skipped {len(BAD_IMAGES)} unreadable real image(s)" in err and "Traceback" not in err
    # nothing readable: a one-line error
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    for name in BAD_IMAGES:
        shutil.copyfile(corpus / name, only_bad / name)
    code, err = _cli(capsys, "fid", "--real", only_bad, "--fake", folder / "b", "--extractor", extractor_file,
                     "--device", "cpu")
    one_line_error(code, err, "at least 2 readable images")
    for path, fragment in bad_stats.values():
        code, err = _cli(capsys, "fid", "--real", path, "--fake", folder / "b", "--extractor", extractor_file,
                         "--device", "cpu")
        one_line_error(code, err, fragment)


@pytest.fixture(scope="module")
def skt_run(tmp_path_factory) -> Path:
    """A minimal exported skt-teacher run (random 1/4 CSRNet) for ``vkd count``."""
    from vkd.config import load_config, save_config
    from vkd.skt.config import SKTTeacherConfig
    from vkd.skt.distiller import export_model
    from vkd.skt.models import CSRNet

    out = tmp_path_factory.mktemp("skt_run")
    cfg = load_config(SKTTeacherConfig, None, [f"run.output_dir={out}", "model.width_div=4", "eval.tile_size=0"],
                      task="skt-teacher")
    save_config(cfg, cfg.run_dir() / "config.yaml")
    torch.manual_seed(0)
    export_model(CSRNet(4), cfg.run_dir())
    return cfg.run_dir()


def test_cli_count_bad_images(tmp_path, corpus, capsys, skt_run):
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes(seed=2))
    for name, fragment in SKT_FRAGMENT.items():
        code, err = _cli(capsys, "count", "--run", skt_run, corpus / name, "--out", tmp_path / "out1")
        one_line_error(code, err, fragment)
    # among readable images: skipped, counted and reported; the counts of the others are written
    code, err = _cli(capsys, "count", "--run", skt_run, good, *[corpus / n for n in BAD_IMAGES], "--out",
                     tmp_path / "out2")
    assert code == 0 and "Traceback" not in err, err
    assert err.count("vkd: warning: skipping") == len(BAD_IMAGES)
    rows = (tmp_path / "out2" / "counts.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith(str(good))
    # a corrupt exported model is refused with one line
    broken = tmp_path / "broken_run"
    shutil.copytree(skt_run, broken)
    (broken / "export" / "model.safetensors").write_bytes(b"\x00" * 10)
    code, err = _cli(capsys, "count", "--run", broken, good)
    one_line_error(code, err, "model.safetensors")


# ------------------------------------------------------------------------------------------------------------
# The CLI as child processes: real stderr, timeouts
# ------------------------------------------------------------------------------------------------------------


def test_cli_child_processes_never_trace_back_or_hang(tmp_path, corpus, skt_run, extractor_file):
    """One bad input per command, run as ``python -m vkd.cli`` children in parallel with a timeout each."""
    (tmp_path / "secret.png").write_bytes(png_bytes(16, 16))
    crowds = _generic_root(tmp_path, {"t.png": corpus / "truncated.png", "t.json": b"[[1, 2]]"})
    scene = _transforms_scene(tmp_path / "scene")
    TRANSFORMS_FAULTS["path_escapes_root"][0](scene)
    folder = _imagefolder(tmp_path, corpus)
    (folder / "c").mkdir()
    shutil.copyfile(corpus / "empty.png", folder / "c" / "x.png")
    runs = tmp_path / "runs"
    cases = {
        "skt": (["distill", "skt-teacher", *_sets(f"run.output_dir={runs}", f"data.root={crowds}", *SKT_TINY)],
                "cannot decode image"),
        "feature3dgs": (["distill", "feature3dgs", *_sets(f"run.output_dir={runs}", f"data.path={scene}")],
                        "outside the dataset root"),
        "hello": (["distill", "hello-teacher", *_sets(f"run.output_dir={runs}", f"data.train_dir={folder}",
                                                      f"data.val_dir={folder}", *HELLO_TINY)],
                  "no image of class 'c'"),
        "fid": (["fid", "--real", str(folder / "c"), "--fake", str(folder / "b"), "--extractor",
                 str(extractor_file), "--device", "cpu"], "at least 2 readable images"),
        "count": (["count", "--run", str(skt_run), str(corpus / "bomb.png")], "decompression bomb"),
    }
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    procs = {}
    for key, (args, _) in cases.items():
        log = open(tmp_path / f"{key}.err", "w")  # noqa: SIM115 - closed below
        procs[key] = (subprocess.Popen([sys.executable, "-m", "vkd.cli", *args], env=env, stdout=subprocess.DEVNULL,
                                       stderr=log), log)
    try:
        for key, (proc, log) in procs.items():
            code = proc.wait(timeout=150)
            log.close()
            one_line_error(code, (tmp_path / f"{key}.err").read_text(), cases[key][1])
    finally:
        for proc, log in procs.values():
            if proc.poll() is None:
                proc.kill()
            log.close()
