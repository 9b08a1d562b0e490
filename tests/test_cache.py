"""Build-once caches from an empty cache: any grad mode, inference mode, thread count, working directory, and two
processes at once (``vkd.cache`` and every builder that uses it)."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vkd import cache
from vkd.cache import build_once, cache_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("VKD_CACHE_DIR", str(root))
    return root


def test_cache_dir_precedence_and_absolute(tmp_path, monkeypatch):
    monkeypatch.delenv("VKD_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "vkd"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "vkd"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VKD_CACHE_DIR", "rel/cache")  # relative: fixed at the first call's working directory
    assert cache_dir() == tmp_path / "rel" / "cache"
    from vkd.models.tiny_clip import default_cache_dir

    assert default_cache_dir() == cache_dir()  # one cache root for every builder


def test_no_module_computes_its_own_cache_root():
    """SKT read ``$VKD_CACHE`` and the tiny CLIP ignored ``$XDG_CACHE_HOME``: every cache root goes through
    ``vkd.cache.cache_dir``."""
    offenders = []
    for path in sorted((REPO / "vkd").rglob("*.py")):
        if path.name == "cache.py" and path.parent.name == "vkd":
            continue
        text = path.read_text()
        if re.search(r"""Path\.home\(\)|environ[^\n]*["'](VKD_CACHE|XDG_CACHE_HOME|TORCH_HOME|HF_HOME)""", text):
            offenders.append(str(path.relative_to(REPO)))
    assert not offenders, f"cache root computed outside vkd/cache.py: {offenders}"


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_build_once_trains_under_the_callers_no_grad(tmp_path, mode):
    target = tmp_path / "w.pt"

    def build():
        w = torch.zeros(3, requires_grad=True)
        (w - 1).square().sum().backward()
        cache.atomic_torch_save({"grad": w.grad}, target)
        return "built"

    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        assert build_once(target, target.is_file, build) == "built"
        assert build_once(target, target.is_file, build) is None  # second call: reused
        assert not torch.is_grad_enabled()  # the caller's mode is restored
    assert torch.load(target)["grad"].tolist() == [-2.0, -2.0, -2.0]
    assert not list(tmp_path.glob("*.tmp*"))


CONCURRENT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from vkd.cache import atomic_write_text, build_once

    target, log = Path(sys.argv[1]), Path(sys.argv[2])

    def build():
        with open(log, "a") as f:
            f.write("build\\n")
        time.sleep(1.0)  # long enough that the other process arrives while this one builds
        atomic_write_text(target, "done")

    build_once(target, target.is_file, build)
    assert target.read_text() == "done"
""")


def test_two_processes_build_once(tmp_path):
    script = tmp_path / "builder.py"
    script.write_text(CONCURRENT)
    target, log = tmp_path / "out" / "artefact.txt", tmp_path / "builds.log"
    procs = [subprocess.Popen([sys.executable, str(script), str(target), str(log)], stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    assert log.read_text().splitlines() == ["build"]  # the second process waited and reused the result


def test_digits_extractor_from_empty_cache_in_inference_mode(empty_cache, monkeypatch, single_thread):
    """The last review's cold-start bug: the first use of the digits CNN was inside a ``no_grad`` evaluation."""
    from vkd.metrics import extractors

    # the real training code, one epoch instead of thirty (the cached file name is the same, in a throwaway cache)
    monkeypatch.setattr(extractors, "train_digits_cnn", functools.partial(extractors.train_digits_cnn, epochs=1))
    with torch.inference_mode():
        ext = extractors.digits_extractor()
        feats = ext(torch.randint(0, 255, (2, 1, 16, 16), dtype=torch.uint8))
    assert feats.shape == (2, 128) and torch.isfinite(feats).all()
    ckpt = torch.load(empty_cache / "digits-cnn-v1.pt", weights_only=True)
    assert ckpt["test_accuracy"] > 0.5  # it did learn in its one epoch


def test_tiny_clip_pretrain_from_inference_tensors(empty_cache, single_thread):
    from vkd.models.tiny_clip import TinyClipConfig, load_clip, pretrain_tiny_clip, tiny_clip_name

    cfg = TinyClipConfig(width=16, layers=1, heads=2, text_width=16, text_heads=2, embed_dim=16, steps=3,
                         batch_size=4, image_size=16, warmup_steps=1)
    with torch.inference_mode():
        images = torch.rand(6, 3, 16, 16)  # an inference tensor, as a user's no-grad loader would give
        path = pretrain_tiny_clip(images, ["a", "b", "c"] * 2, cfg, progress=False)
    assert path.parent == empty_cache / "tiny_clip"
    info = json.loads((path / "vkd_tiny_clip.json").read_text())
    assert info["num_images"] == 6 and info["final_loss"] == info["final_loss"]  # finite
    bundle = load_clip(tiny_clip_name(path))
    assert bundle.model is not None


def test_synthetic_scene_under_inference_mode_and_one_thread(tmp_path, single_thread):
    from vkd.feature3dgs.synthetic import ensure_synthetic_scene

    with torch.inference_mode():
        out = ensure_synthetic_scene(tmp_path, num_views=4, resolution=16, supersample=1, num_points=50)
    meta = json.loads((out / "transforms.json").read_text())
    assert len(meta["frames"]) == 4 and all((out / f["file_path"]).is_file() for f in meta["frames"])
    mtime = (out / "transforms.json").stat().st_mtime_ns
    assert ensure_synthetic_scene(tmp_path, num_views=4, resolution=16, supersample=1, num_points=50) == out
    assert (out / "transforms.json").stat().st_mtime_ns == mtime  # reused, not rebuilt


CROWDS = textwrap.dedent("""
    import sys
    from vkd.skt.crowds import CrowdSpec, write_crowd_dataset
    write_crowd_dataset(sys.argv[1], 6, 2, CrowdSpec(height=32, width=32, count_min=2, count_max=10, min_person=8))
""")


def test_crowds_built_by_two_processes_at_once(tmp_path):
    """Two ranks generating the same synthetic crowds used to delete each other's files."""
    root = tmp_path / "crowds"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", CROWDS, str(root)], env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    from vkd.skt.datasets import list_records, read_points

    for split, n in (("train", 6), ("test", 2)):  # read back through the loader users' data goes through
        records = list_records(root, "generic", split)
        assert len(records) == n == len(list((root / split).glob("img_*.png")))
        for ann in (root / split).glob("img_*.json"):
            assert read_points(ann).shape[1] == 2
    assert json.loads((root / "meta.json").read_text())["num_train"] == 6


def test_feature_cache_build_under_inference_mode(tmp_path):
    from vkd.feature3dgs.feature_cache import FeatureCache

    images = [torch.rand(3, 8, 8) for _ in range(3)]
    cache_obj = FeatureCache(tmp_path / "feats")
    with torch.inference_mode():
        cache_obj.build(lambda x: x[:, :2, ::2, ::2], lambda i: images[i], ["a.png", "b.png", "c.png"],
                        {"teacher": "t"}, batch_size=2, progress=False)
    again = FeatureCache(tmp_path / "feats")
    assert again.is_complete({"teacher": "t"}) and again.shape == (2, 4, 4)
    torch.testing.assert_close(again.get(1), images[1][:2, ::2, ::2], atol=1e-3, rtol=1e-3)  # fp16 on disk
    assert not list((tmp_path / "feats").glob("*.tmp*"))
