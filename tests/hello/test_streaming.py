"""Streamed data: ImageFolder / file lists / tar shards decoded per batch in DataLoader workers, equal to the same
images held in RAM; undecodable files skipped and counted; bad lists and shards as one-line errors."""

import numpy as np
import pytest
import torch
from hello_helpers import image_tree, write_shard
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms.functional import center_crop, resize

from vkd.cli import main
from vkd.errors import DataError
from vkd.hello.config import ClassifierConfig, HelloDataConfig
from vkd.hello.data import expand_shards, load_filelist, load_imagefolder, load_shards, load_split
from vkd.hello.evaluate import accuracy
from vkd.hello.images import rded_select
from vkd.hello.model import build_classifier


def _reference(paths, size):
    """The images as the former in-RAM loader decoded them (PIL → shorter side resized → centre crop), uint8."""
    out = []
    for p in paths:
        x = torch.from_numpy(np.asarray(Image.open(p).convert("RGB")).copy()).permute(2, 0, 1)
        out.append(center_crop(resize(x, size, antialias=True), [size, size]))
    return torch.stack(out)


def _teacher():
    torch.manual_seed(0)
    return build_classifier(ClassifierConfig(width=4, depth=2), 3, 16).eval()


@pytest.mark.parametrize("strategy", ["lowest_ce", "cluster"])
def test_streamed_selection_equals_in_ram(tmp_path, strategy):
    paths = image_tree(tmp_path / "train", n=10)
    streamed = load_imagefolder(tmp_path / "train", 16, num_workers=2)
    mem = streamed.materialize()
    # the in-RAM copy holds exactly what the former whole-set loader decoded, in the same order
    ref = _reference([p for c in sorted(paths) for p in paths[c]], 16)
    assert torch.equal(mem.images, ref) and torch.equal(mem.labels, streamed.labels)
    teacher = _teacher()
    kwargs = dict(ipc=2, factor=2, mipc=8, num_crop=3, crop_scale=(0.3, 1.0), seed=3, strategy=strategy,
                  batch_size=5)  # 5: batches straddle class boundaries
    a = rded_select(streamed, None, teacher, 3, **kwargs)
    b = rded_select(mem.images, mem.labels, teacher, 3, **kwargs)
    assert torch.equal(a.patches, b.patches) and torch.equal(a.scores, b.scores)
    assert torch.equal(a.source_index, b.source_index) and torch.equal(a.source_boxes, b.source_boxes)
    assert torch.equal(a.sources, b.sources) and a.sources.shape == (24, 3, 16, 16)
    # the engine's training items (student/teacher training data) are the same images
    loader = DataLoader(streamed.dataset(), batch_size=7, num_workers=2)
    xs = torch.cat([x for x, _ in loader])
    assert xs.dtype == torch.uint8 and torch.equal(xs, mem.images)
    assert accuracy(teacher, streamed) == accuracy(teacher, mem.images, mem.labels)


def test_undecodable_files_are_skipped_counted_and_substituted(tmp_path):
    paths = image_tree(tmp_path / "train", n=6)
    good = paths["b"][0].read_bytes()
    (tmp_path / "train" / "b" / "100_truncated.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "train" / "c" / "101_garbage.png").write_bytes(b"\x89PNG not really")
    data = load_imagefolder(tmp_path / "train", 16, num_workers=2, verify=False)  # counted when met
    assert len(data) == 20 and data.skipped == 0
    # a training pass: the flags are written by the DataLoader workers (shared memory), items are substituted
    loader = DataLoader(data.dataset(), batch_size=4, num_workers=2)
    xs, ys = zip(*loader, strict=True)
    xs, ys = torch.cat(xs), torch.cat(ys)
    assert xs.shape[0] == 20 and data.skipped == 2
    assert {n.rsplit("/", 1)[-1] for n in data.skipped_files} == {"100_truncated.jpg", "101_garbage.png"}
    mem = data.materialize()
    assert mem.images.shape[0] == 18
    bad_b = int((data.labels == 1).nonzero()[-1])  # the truncated file is the last of class b
    assert ys[bad_b] == 1 and any(torch.equal(xs[bad_b], x) for x in mem.images[mem.labels == 1])
    # selection never picks an undecodable file
    sel = rded_select(data, None, _teacher(), 3, ipc=1, factor=2, mipc=7, num_crop=1)
    assert not set(sel.source_index.tolist()) & set(data._failed.nonzero().flatten().tolist())
    assert "skipped 2 unreadable file(s)" in data.skip_summary()
    # with the verification pass (the default) both are known and out of the index at once
    verified = load_imagefolder(tmp_path / "train", 16, num_workers=2)
    assert len(verified) == 18 and verified.skipped == 2 and torch.equal(verified.materialize().images, mem.images)
    cfg = HelloDataConfig(source="imagefolder", train_dir=str(tmp_path / "train"), image_size=16, verify=False)
    assert load_split(cfg, "train").skipped == 0 and load_split(HelloDataConfig(
        source="imagefolder", train_dir=str(tmp_path / "train"), image_size=16), "train").skipped == 2


def test_file_lists_and_tar_shards_read_the_same_images(tmp_path):
    paths = image_tree(tmp_path / "train", n=5)
    ref = load_imagefolder(tmp_path / "train", 16).materialize()
    # file list: class names as labels, paths relative to the list's folder, comments skipped
    lines = ["# path label"] + [f"train/{c}/{p.name} {c}" for c in sorted(paths) for p in paths[c]]
    (tmp_path / "train.txt").write_text("\n".join(lines[::-1]) + "\n")  # any order
    listed = load_filelist(tmp_path / "train.txt", 16, num_workers=2)
    assert listed.class_names == ("a", "b", "c")
    got = listed.materialize()
    order = torch.argsort(got.labels, stable=True)
    assert torch.equal(got.labels[order], ref.labels)
    for x in ref.images:  # same images (the list was reversed)
        assert any(torch.equal(x, y) for y in got.images)
    # two shards, webdataset naming <key>.jpg + <key>.cls with class indices
    flat = [(c, p) for c in sorted(paths) for p in paths[c]]
    for s in range(2):
        write_shard(tmp_path / f"train-{s:03d}.tar", [(f"s{s}/{i:04d}", p.read_bytes(), "abc".index(c))
                                                      for i, (c, p) in enumerate(flat) if (i >= 8) == s])
    assert expand_shards([str(tmp_path / "train-{000..001}.tar")]) == expand_shards([str(tmp_path / "train-*.tar")])
    sharded = load_shards([str(tmp_path / "train-{000..001}.tar")], 16, num_workers=2)
    assert sharded.class_names == ("0", "1", "2") and len(sharded) == 15
    got = sharded.materialize()
    assert torch.equal(got.labels, ref.labels)  # class b spans both shards: per class in shard order
    assert torch.equal(got.images, ref.images)
    cfg = HelloDataConfig(source="shards", train_shards=[str(tmp_path / "train-*.tar")], image_size=16,
                          class_names=["cat", "dog", "fox"])
    assert load_split(cfg, "train").class_names == ("cat", "dog", "fox")
    # a corrupt member is skipped and counted like a corrupt file
    write_shard(tmp_path / "bad.tar", [("x", b"garbage", 0), ("y", flat[0][1].read_bytes(), 0)])
    bad = load_shards([str(tmp_path / "bad.tar")], 16, verify=False)
    assert bad.materialize().images.shape[0] == 1 and bad.skipped == 1 and bad.skipped_files[0].endswith(":x")
    verified = load_shards([str(tmp_path / "bad.tar")], 16)
    assert len(verified) == 1 and verified.skipped == 1 and verified.skipped_files[0].endswith(":x")


def _cli_teacher(tmp_path, *sets):
    args = ["distill", "hello-teacher", "--set", f"run.output_dir={tmp_path / 'runs'}", "--set", "train.steps=1"]
    for s in sets:
        args += ["--set", s]
    return main(args)


def test_bad_lists_and_shards_exit_2_with_one_line(tmp_path, capsys):
    paths = image_tree(tmp_path / "train", n=2)
    (tmp_path / "list.txt").write_text(f"train/a/{paths['a'][0].name} 0\ntrain/a/nope.jpg 0\ntrain/b/gone.jpg 1\n")
    code = _cli_teacher(tmp_path, "data.source=filelist", f"data.train_list={tmp_path / 'list.txt'}",
                        f"data.val_list={tmp_path / 'list.txt'}")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "names 2 missing file(s)" in err[0] and "nope.jpg" in err[0]

    data = paths["a"][0].read_bytes()
    write_shard(tmp_path / "no_cls.tar", [("k0", data, 0), ("k1", data, None)])
    write_shard(tmp_path / "no_img.tar", [("k0", data, 0), ("k1", None, 1)])
    for shard, message in (("no_cls.tar", "image but no .cls"), ("no_img.tar", "a .cls but no image"),
                           ("missing-{000..002}.tar", "data shard not found")):
        code = _cli_teacher(tmp_path, "data.source=shards", f"data.train_shards=[{tmp_path / shard}]",
                            f"data.val_shards=[{tmp_path / shard}]")
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("vkd: error:") and message in err[0], err


def test_filelist_labels_must_be_consistent(tmp_path):
    paths = image_tree(tmp_path / "t", n=1)
    (tmp_path / "mixed.txt").write_text(f"t/a/{paths['a'][0].name} 0\nt/b/{paths['b'][0].name} b\n")
    with pytest.raises(DataError, match="mix class indices and class names"):
        load_filelist(tmp_path / "mixed.txt", 16)
    (tmp_path / "gap.txt").write_text(f"t/a/{paths['a'][0].name} 0\nt/b/{paths['b'][0].name} 2\n")
    with pytest.raises(DataError, match="classes \\[1\\] have no image"):
        load_filelist(tmp_path / "gap.txt", 16)
