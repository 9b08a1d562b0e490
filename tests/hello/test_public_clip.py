"""The embedded default's tiny CLIP plays a public model: pretrained on printed digits, never on the target task's
images; its cache entry follows its pretraining data; the projector's LoRA init comes from run.seed alone."""

import pytest
import torch

from vkd.config import apply_overrides
from vkd.data.digits import DIGIT_NAMES, load_digits
from vkd.errors import ConfigError
from vkd.hello.config import HelloConfig, HelloTeacherConfig
from vkd.hello.data import LabelledImages, load_split
from vkd.hello.printed_digits import render_printed_digits
from vkd.hello.projector import (
    adapter_state_dict,
    build_clip,
    count_shared_images,
    tiny_clip_data,
    tiny_clip_pretraining_set,
)

# a 1-step tiny CLIP: these tests check data and cache keys, not accuracy
TINY = ["clip.tiny.width=16", "clip.tiny.layers=1", "clip.tiny.heads=1", "clip.tiny.text_width=16",
        "clip.tiny.text_heads=1", "clip.tiny.embed_dim=16", "clip.tiny.steps=1", "clip.tiny.batch_size=8",
        "clip.printed_per_font=1"]


def test_printed_digits_share_no_image_with_the_target_training_set():
    cfg = apply_overrides(HelloConfig(), ["clip.printed_per_font=2"])
    train = load_split(cfg.data, "train")
    images, captions, info = tiny_clip_pretraining_set(cfg, train)
    assert info["source"] == "printed_digits" and tiny_clip_data(cfg, train) == "printed_digits"  # auto on digits
    assert images.shape == (10 * len(info["fonts"]) * 2, 3, 16, 16) and len(info["fonts"]) >= 10
    assert info["target_train_images_seen"] == 0
    target = load_digits("train", size=16, channels=3, value_range="unit").images
    assert count_shared_images(target, images) == 0
    assert count_shared_images(target, torch.cat([images, target[:5]])) == 5  # the counter does see shared images
    # no rendered image is even close to a target digit (nearest L2 distance per pixel)
    nearest = torch.cdist(images.flatten(1), target.flatten(1)).min() / images[0].numel() ** 0.5
    assert nearest > 0.05, nearest
    # captions carry the prompt template and the digit of each rendered image; all ten digits, equally often
    assert set(captions) == {cfg.clip.prompt_template.format(n) for n in DIGIT_NAMES}
    assert len({captions.count(c) for c in set(captions)}) == 1
    # the task's own split is the other choice, and it is reported as seen
    own = apply_overrides(HelloConfig(), ["clip.tiny_data=train"])
    x, _, own_info = tiny_clip_pretraining_set(own, train)
    assert own_info["target_train_images_seen"] == len(train) == x.shape[0]


def test_rendering_is_deterministic_per_seed():
    a, b = render_printed_digits(per_font=1, seed=3), render_printed_digits(per_font=1, seed=3)
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
    assert not torch.equal(a.images, render_printed_digits(per_font=1, seed=4).images)
    assert a.images.min() >= 0 and a.images.max() <= 1 and a.labels[:10].tolist() == list(range(10))


def test_printed_digits_need_digit_classes():
    cfg = apply_overrides(HelloConfig(), ["clip.tiny_data=printed_digits"])
    other = LabelledImages(torch.rand(3, 3, 16, 16), torch.arange(3), ("cat", "dog", "bird"))
    with pytest.raises(ConfigError, match="printed_digits"):
        tiny_clip_data(cfg, other)
    folder = apply_overrides(HelloConfig(), ["data.source=imagefolder", "data.train_dir=unused"])
    assert tiny_clip_data(folder, other) == "train"  # auto off the embedded digits


def test_cache_entry_changes_with_the_pretraining_data(tmp_path, monkeypatch):
    """From an empty cache ($VKD_CACHE_DIR): one entry per pretraining set, reused when the set is the same."""
    monkeypatch.setenv("VKD_CACHE_DIR", str(tmp_path / "cache"))
    train = load_split(HelloConfig().data, "train")

    def clip_dir(*extra):
        clip = build_clip(apply_overrides(HelloConfig(), TINY + list(extra)), train, progress=False)
        return clip.model_name.removeprefix("local-dir:")

    printed = clip_dir("clip.tiny_data=printed_digits")
    assert printed.startswith(str(tmp_path / "cache" / "tiny_clip"))
    stamp = (tmp_path / "cache" / "tiny_clip" / printed.rsplit("/", 1)[1] / "open_clip_model.safetensors").stat()
    assert clip_dir("clip.tiny_data=auto") == printed  # auto is printed_digits on the digits: same data, reused
    assert (tmp_path / "cache" / "tiny_clip" / printed.rsplit("/", 1)[1] / "open_clip_model.safetensors"
            ).stat().st_mtime_ns == stamp.st_mtime_ns
    dirs = {printed, clip_dir("clip.tiny_data=train"), clip_dir("clip.printed_per_font=2")}
    assert len(dirs) == 3


def test_lora_init_comes_from_run_seed(tmp_path):
    """Two fits with the same run.seed start from identical adapters, whatever the process drew before and whether
    the tiny CLIP was just pretrained (first call) or found in the cache (second call)."""
    from vkd.hello.commands import run_teacher
    from vkd.hello.distiller import prepare_fit

    out = str(tmp_path / "runs")
    run_teacher(apply_overrides(HelloTeacherConfig(), [
        f"run.output_dir={out}", "model.width=8", "extra.num_snapshots=1", "train.steps=2",
        "train.checkpoint_every=1000", "train.log_every=1000"]))

    def adapters(seed):
        cfg = apply_overrides(HelloConfig(), TINY + [f"run.output_dir={out}", f"clip.cache_dir={tmp_path / 'cache'}",
                                                     f"run.seed={seed}", "selection.ipc=1"])
        task, _, _ = prepare_fit(cfg, progress=False)
        return adapter_state_dict(task.projector)

    first = adapters(0)  # pretrains the tiny CLIP (which seeds torch's global RNG on its own)
    torch.manual_seed(12345)
    torch.rand(100)
    again = adapters(0)  # cached CLIP, another global RNG state
    other = adapters(1)
    a_keys = [k for k in first if "lora_A" in k]
    assert a_keys and all(first[k].abs().sum() > 0 for k in a_keys)  # random factors, not zeros
    assert first.keys() == again.keys()
    for k in first:
        torch.testing.assert_close(again[k], first[k], rtol=0, atol=0)
    assert any(not torch.equal(other[k], first[k]) for k in a_keys)
