"""Bring your own features: teacher.kind=files (layouts, formats, dtypes, cache key), vkd features round trip,
training and text queries from files, and the bad-input errors through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from f3d_helpers import tiny_cfg
from safetensors.numpy import save_file as save_safetensors_np
from safetensors.torch import save_file as save_safetensors

from vkd.config import dump_config
from vkd.errors import DataError, UserError
from vkd.feature3dgs.commands import render, run
from vkd.feature3dgs.data.prepare import prepare_scene
from vkd.feature3dgs.distiller import build_task
from vkd.feature3dgs.feature_files import FeatureFiles, feature_stems
from vkd.feature3dgs.teacher import (
    export_teacher_features,
    load_text_encoder,
    prepare_teacher,
    save_teacher_for_queries,
    text_encoder_from_spec,
)
from vkd.models.tiny_clip import TinyClipConfig, load_clip, pretrain_tiny_clip, tiny_clip_name

ROOT = Path(__file__).resolve().parents[2]


def _files_cfg(tmp_path, features_dir, name="files", extra=()):
    return tiny_cfg(tmp_path, name, ["teacher.kind=files", f"teacher.features_dir={features_dir}", *extra])


def _write(path: Path, value: torch.Tensor, fmt: str, key: str | None = None) -> None:
    """One feature file written with the format's own library (numpy / torch / safetensors)."""
    if fmt == "npy":
        np.save(path.with_suffix(".npy"), value.numpy())
    elif fmt == "pt":
        torch.save({key: value} if key else value, path.with_suffix(".pt"))
    else:
        save_safetensors({key or "features": value.contiguous()}, str(path.with_suffix(".safetensors")))


def test_feature_stems():
    assert feature_stems(["images/a.jpg", "b.png"]) == ["a", "b"]
    # A shared bare stem falls back to the path without suffix, for both images.
    assert feature_stems(["train/r_0.png", "test/r_0.png", "train/r_1.png"]) == ["train/r_0", "test/r_0", "r_1"]
    with pytest.raises(DataError, match="stem 'a'"):
        feature_stems(["a.png", "a.jpg"])


def test_layouts_formats_dtypes(tmp_path):
    # 12 images of 30x40 (H x W): every format x dtype x layout, features [D=5, h=3, w=4] (the image's aspect).
    gen = torch.Generator().manual_seed(0)
    cases = [(fmt, dt, lay) for fmt in ("npy", "pt", "safetensors") for dt in (torch.float16, torch.float32)
             for lay in ("chw", "hwc")]
    refs, names = [], []
    for k, (fmt, dt, lay) in enumerate(cases):
        ref = torch.randn(5, 3, 4, generator=gen).to(dt)  # [D, h, w]
        stored = ref.permute(1, 2, 0) if lay == "hwc" else ref
        _write(tmp_path / f"view_{k:02d}", stored, fmt, key="feat" if fmt == "pt" and k % 2 else None)
        refs.append(ref.float())
        names.append(f"images/view_{k:02d}.jpg")
    files = FeatureFiles(tmp_path, names, [(30, 40)] * len(names))
    assert files.dim == 5 and files.layout == "auto" and not files.text_aligned
    got = dict(files.stored_maps())
    for k, case in enumerate(cases):
        assert got[k].dtype == torch.float32 and got[k].shape == (5, 3, 4), case
        assert torch.equal(got[k], refs[k]), case  # fp16 values are exact in fp32


def test_explicit_layout_key_and_single_channel(tmp_path):
    cube = torch.arange(6 * 6 * 6, dtype=torch.float32).reshape(6, 6, 6)
    np.save(tmp_path / "a.npy", cube.numpy())
    # A cube fits both readings equally: auto reads [D, h, w]; hwc is an explicit choice.
    assert torch.equal(FeatureFiles(tmp_path, ["a.png"], [(6, 6)]).read(0), cube)
    assert torch.equal(FeatureFiles(tmp_path, ["a.png"], [(6, 6)], layout="hwc").read(0), cube.permute(2, 0, 1))
    # ... and a folder's features.json decides auto.
    (tmp_path / "features.json").write_text(json.dumps({"layout": "hwc"}))
    assert torch.equal(FeatureFiles(tmp_path, ["a.png"], [(6, 6)]).read(0), cube.permute(2, 0, 1))

    other = tmp_path / "sub"
    other.mkdir()
    two = {"mask": np.zeros((2, 2), np.float32), "feat": np.full((3, 2, 2), 2.5, np.float16)}
    save_safetensors_np(two, str(other / "b.safetensors"))
    with pytest.raises(DataError, match="holds 2 tensors"):
        FeatureFiles(other, ["b.png"], [(2, 2)])
    assert torch.equal(FeatureFiles(other, ["b.png"], [(2, 2)], key="feat").read(0), torch.full((3, 2, 2), 2.5))
    np.save(other / "c.npy", np.ones((4, 5), np.float32))  # a single-channel map [h, w]
    assert FeatureFiles(other, ["c.png"], [(4, 5)]).read(0).shape == (1, 4, 5)

    # Bad files, one clear message each.
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save([torch.zeros(2, 2, 2)], bad / "list.pt")
    np.save(bad / "ints.npy", np.zeros((2, 2, 2), np.int64))
    np.save(bad / "two.npy", np.zeros((2, 2, 2), np.float32))
    torch.save(torch.zeros(2, 2, 2), bad / "two.pt")
    for name, message in [("list", "holds a list, not a tensor"), ("ints", "int64 values"),
                          ("two", "2 feature files"), ("none", "no feature file for image none.png")]:
        with pytest.raises(DataError, match=message):
            FeatureFiles(bad, [f"{name}.png"], [(2, 2)])


def test_round_trip_cache_key_and_text_encoder(tmp_path, stub_teacher):
    cfg = tiny_cfg(tmp_path)
    scene = prepare_scene(cfg)
    teacher, _, cache = prepare_teacher(cfg, scene, progress=False)
    out = tmp_path / "feats"
    summary = export_teacher_features(cfg, out, progress=False)
    meta = json.loads((out / "features.json").read_text())
    assert summary["dim"] == meta["dim"] == 6 and meta["size"] == [6, 6] and meta["layout"] == "chw"
    assert meta["dtype"] == "float16" and meta["teacher"]["target"] == "f3d_stub_teacher:teacher"
    stems = [Path(c.name).stem for c in scene.cameras]
    assert sorted(meta["files"].values()) == sorted(f"{s}.npy" for s in stems)
    for i, stem in enumerate(stems):
        arr = np.load(out / f"{stem}.npy")
        oracle = teacher(scene.load_image(i)[None])[0].numpy().astype(np.float16)  # the teacher, run here
        assert arr.dtype == np.float16 and np.array_equal(arr, oracle)

    cfg_files = _files_cfg(tmp_path, out)
    files, info, cache_files = prepare_teacher(cfg_files, scene, progress=False)
    assert info["kind"] == "files" and info["text_aligned"] is False and cache_files.root != cache.root
    assert cache_files.shape == cache.shape
    for i in range(len(scene.cameras)):
        assert np.array_equal(np.load(cache_files.file(i)), np.load(cache.file(i)))

    # Changed files are a new cache (the key holds every file's name, size and mtime).
    new = torch.rand(6, 6, 6)
    np.save(out / f"{stems[3]}.npy", new.numpy())  # fp32 now: another size
    _, _, cache_new = prepare_teacher(cfg_files, scene, progress=False)
    assert cache_new.root != cache_files.root
    torch.testing.assert_close(cache_new.get(3), new.half().float(), rtol=0, atol=0)

    # Without a text encoder: no label metrics, and text queries stop with one line.
    np.save(out / f"{stems[3]}.npy", cache.get(3).half().numpy())
    task, _, prep = build_task(cfg_files, progress=False)
    assert task.evaluator.text is None
    metrics = task.evaluator.evaluate(task.student, fps=False)
    assert "feature_cosine" in metrics and "teacher_label_acc" not in metrics
    run_dir = tmp_path / "run_notext"
    save_teacher_for_queries(prep.teacher_info, run_dir)
    assert json.loads((run_dir / "teacher" / "teacher.json").read_text())["text_aligned"] is False
    with pytest.raises(UserError, match="text-aligned"):
        load_text_encoder(run_dir, cfg_files.teacher)

    # A callable text encoder (the stub's colour words): the same embeddings as the teacher's own encode_text.
    (stub_teacher / "f3d_text.py").write_text("from f3d_stub_teacher import teacher\nencode = teacher.encode_text\n")
    cfg_text = _files_cfg(tmp_path, out, extra=["teacher.text_encoder=f3d_text:encode"])
    task, _, prep = build_task(cfg_text, progress=False)
    oracle = F.normalize(teacher.fn.encode_text(task.evaluator.labels).float(), dim=-1)
    torch.testing.assert_close(task.evaluator.text, oracle)
    run_dir = tmp_path / "run_text"
    save_teacher_for_queries(prep.teacher_info, run_dir)
    torch.testing.assert_close(load_text_encoder(run_dir, cfg_text.teacher)(["red sphere"]),
                               F.normalize(teacher.fn.encode_text(["red sphere"]), dim=-1))
    # An encoder of the wrong width is refused.
    (stub_teacher / "f3d_text3.py").write_text("import torch\nencode = lambda p: torch.ones(len(p), 3)\n")
    with pytest.raises(DataError, match="3-d embeddings but the features are 6-d"):
        text_encoder_from_spec("f3d_text3:encode", None, None, dim=6)(["a"])


def test_training_from_files_with_text_encoder(tmp_path, stub_teacher):
    cfg = tiny_cfg(tmp_path)
    out = tmp_path / "feats"
    export_teacher_features(cfg, out, progress=False)
    (stub_teacher / "f3d_text.py").write_text("from f3d_stub_teacher import teacher\nencode = teacher.encode_text\n")
    cfg_files = _files_cfg(tmp_path, out, extra=["teacher.text_encoder=f3d_text:encode", "train.steps=4",
                                                 "train.checkpoint_every=4", "densify.enabled=false"])
    summary = run(cfg_files)
    assert summary["teacher"]["kind"] == "files" and summary["steps"] == 4
    assert {"feature_cosine", "teacher_label_acc", "teacher_label_miou"} <= set(summary["eval"])
    info = json.loads((cfg_files.run_dir() / "teacher" / "teacher.json").read_text())
    assert info["text_aligned"] is True and info["text_encoder"] == "f3d_text:encode"
    out = render(cfg_files.run_dir(), "test", 1, "red sphere", None, None, tmp_path / "r", "png")
    assert out["label_set"][0] == "red sphere" and (tmp_path / "r" / "relevancy" / "frame_00000.png").is_file()


def test_open_clip_text_encoder(tmp_path):
    """teacher.text_encoder=open_clip loads teacher.model / teacher.pretrained as the maskclip teacher does."""
    clip_cfg = TinyClipConfig(image_size=8, patch_size=2, width=32, layers=1, heads=2, embed_dim=16, text_width=32,
                              text_layers=1, text_heads=2, context_length=12, steps=1)
    path = pretrain_tiny_clip(torch.rand(4, 3, 8, 8), ["a", "b", "a", "b"], clip_cfg, cache_dir=tmp_path,
                              progress=False)
    model = tiny_clip_name(path)
    encode = text_encoder_from_spec("open_clip", model, None, dim=16)
    torch.testing.assert_close(encode(["red", "blue"]), load_clip(model).encode_text(["red", "blue"], normalize=True))
    with pytest.raises(DataError, match="16-d embeddings but the features are 8-d"):
        text_encoder_from_spec("open_clip", model, None, dim=8)(["red"])


def _cli(args: list[str], pythonpath: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(pythonpath), str(ROOT)])}
    return subprocess.Popen([sys.executable, "-m", "vkd.cli", *args], cwd=pythonpath, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_bad_feature_files_cli(tmp_path, stub_teacher):
    cfg = tiny_cfg(tmp_path)
    good = tmp_path / "feats"
    export_teacher_features(cfg, good, progress=False)
    config = tmp_path / "cfg.yaml"
    config.write_text(dump_config(cfg))
    stems = sorted(p.stem for p in good.glob("*.npy"))

    def variant(name: str, content) -> Path:
        d = tmp_path / name
        d.mkdir()
        for s in stems:
            if s != stems[5]:  # the 6th image is the bad one: five maps are cached before it fails
                (d / f"{s}.npy").write_bytes((good / f"{s}.npy").read_bytes())
        if content is not None:
            content(d / stems[5])
        return d

    cases = {
        "missing": (variant("missing", None), f"no feature file for image images/{stems[5]}.png"),
        "width": (variant("width", lambda p: np.save(p.with_suffix(".npy"), np.zeros((4, 6, 6), np.float16))),
                  "feature widths differ across files"),
        "garbage": (variant("garbage", lambda p: p.with_suffix(".pt").write_bytes(b"not a tensor file")),
                    "cannot read feature file"),
        "ndim": (variant("ndim", lambda p: torch.save(torch.zeros(1, 6, 6, 6), p.with_suffix(".pt"))),
                 "holds a 4-D tensor"),
    }
    procs = {}
    for name, (d, _) in cases.items():
        if name == "missing":  # vkd features reading files: nothing is written to --out
            args = ["features", "--scene", str(tmp_path / "scene"), "--teacher", "files", "--config", str(config),
                    "--set", f"teacher.features_dir={d}", "--out", str(tmp_path / "out_missing")]
        else:
            args = ["distill", "feature3dgs", "--config", str(config), "--set", "teacher.kind=files",
                    "--set", f"teacher.features_dir={d}", "--set", f"run.name={name}"]
        procs[name] = _cli(args, stub_teacher)
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        lines = stderr.strip().splitlines()
        assert proc.returncode == 2, (name, stderr)
        assert len(lines) == 1 and lines[0].startswith("vkd: error: ") and cases[name][1] in lines[0], (name, stderr)
        assert not (tmp_path / "runs" / "feature3dgs" / name).exists()  # no run directory
    assert not (tmp_path / "out_missing").exists()
    # Nothing half-written: the three builds that failed mid-way removed the maps they had cached.
    caches = [d for d in (tmp_path / "runs" / "feature3dgs" / "_cache" / "teacher").iterdir() if d.is_dir()]
    failed = [d for d in caches if not (d / "manifest.json").is_file()]
    assert len(failed) == 3 and all(not list(d.glob("*.npy")) for d in failed), caches
