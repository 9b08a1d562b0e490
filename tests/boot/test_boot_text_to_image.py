"""Text-to-image BOOT teachers on tiny random pipelines in the community layouts (t2i_fixtures): SD-1.5-style latent
ε (PNDM), SD-2.1-style latent v (DDIM), DeepFloyd-IF-stage-I-style pixel T5 with learned-range outputs. The stock
diffusers pipelines are the oracle for prompt encoding, guidance, thresholding and decoding."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import t2i_fixtures as fx
import torch
from PIL import Image

from vkd.boot.commands import run_boot, sample
from vkd.boot.config import BootConfig, BootDataConfig, BootTeacherRef
from vkd.boot.sample import noise_batches
from vkd.boot.student import BootStudent, load_student
from vkd.boot.teacher import build_teacher, dynamic_threshold, resolve_teacher_kind
from vkd.config import load_config
from vkd.engine import latest_checkpoint, load_checkpoint_weights
from vkd.errors import ConfigError, DataError, UserError

PROMPTS = ["a handwritten seven", "the digit one, thick strokes", "a red bicycle", "two"]


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    (root / "prompts.txt").write_text("\n".join([PROMPTS[0], "", *PROMPTS[1:]]) + "\n")
    return {"sd15": fx.write_sd_pipeline(root / "sd15", "epsilon"), "sd21": fx.write_sd_pipeline(root / "sd21", "v_prediction"),
            "if": fx.write_if_pipeline(root / "if"), "prompts": root / "prompts.txt", "root": root}


def _teacher(pipelines, name, **ref):
    return build_teacher(BootTeacherRef(path=str(pipelines[name]), **ref), BootDataConfig(prompts=str(pipelines["prompts"])))


def test_sd_layout_is_a_latent_text_teacher_with_the_stock_prompt_encoding_and_decoding(pipelines):
    from diffusers import StableDiffusionPipeline

    ref = BootTeacherRef(path=str(pipelines["sd15"]))
    assert resolve_teacher_kind(ref) == "text-to-image"
    teacher = _teacher(pipelines, "sd15")
    assert teacher.latent and teacher.sample_shape == (4, 8, 8) and teacher.prediction_type == "epsilon"
    assert teacher.num_classes == 4 and teacher.null_class == 4  # the empty line was skipped; index 4 is ""
    assert teacher.prompt_info == {"num_prompts": 4, "skipped_empty": 1, "truncated": 0, "max_tokens": 77,
                                   "clean_captions": False, "changed_by_cleaning": 0, "emptied_by_cleaning": 0}
    pipe = StableDiffusionPipeline.from_pretrained(str(pipelines["sd15"]))
    cond, uncond = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=[""] * 4)
    ours = teacher.net.prompts(torch.arange(5))
    torch.testing.assert_close(ours[:4], cond, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[4:], uncond[:1], rtol=0, atol=1e-6)
    z = torch.randn(2, 4, 8, 8)
    images = teacher.decode(z)
    assert images.shape == (2, 3, 16, 16)
    torch.testing.assert_close(images, pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample, rtol=0, atol=1e-6)


def test_text_guidance_is_folded_against_the_negative_prompt(pipelines):
    from diffusers import StableDiffusionPipeline

    teacher = _teacher(pipelines, "sd15", guidance_scale=3.0, negative_prompt="blurry")
    pipe = StableDiffusionPipeline.from_pretrained(str(pipelines["sd15"]))
    cond, uncond = pipe.encode_prompt([PROMPTS[2], PROMPTS[0]], "cpu", 1, True, negative_prompt=["blurry"] * 2)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([700.0, 40.0], dtype=torch.float64)
    with torch.no_grad():
        out_c = pipe.unet(x, t.float(), encoder_hidden_states=cond).sample
        out_u = pipe.unet(x, t.float(), encoder_hidden_states=uncond).sample
        guided = teacher.raw(x, t, torch.tensor([2, 0]))
    torch.testing.assert_close(guided, out_u + 3.0 * (out_c - out_u), rtol=0, atol=1e-5)


def test_sd21_v_teacher_student_shares_the_frozen_text_encoder(pipelines):
    teacher = _teacher(pipelines, "sd21")
    assert teacher.prediction_type == "v_prediction" and teacher.latent
    assert BootStudent.from_teacher(teacher).parameterization == "sample"  # auto: an x0 head
    student = BootStudent.from_teacher(teacher, "preconditioned")  # exact at step 0 inside its band
    assert student.parameterization == "preconditioned"
    assert student.net.prompts is teacher.net.prompts and student.decoder is teacher.decoder  # shared, not copied
    n_unet = sum(p.numel() for p in teacher.net.unet.parameters())
    assert sum(p.numel() for p in student.parameters()) == n_unet  # only the UNet is the student's
    assert not any(k.startswith(("prompt", "_")) or "text_encoder" in k for k in student.state_dict())
    eps, labels = torch.randn(3, 4, 8, 8), torch.tensor([0, 1, 3])
    torch.testing.assert_close(student(eps, torch.full((3,), 300.0), labels),
                               teacher(eps, torch.full((3,), 300.0, dtype=torch.float64), labels), rtol=1e-5, atol=1e-5)


def test_if_layout_is_a_pixel_t5_teacher_with_learned_range_and_dynamic_thresholding(pipelines):
    from diffusers import DDPMScheduler, IFPipeline

    teacher = _teacher(pipelines, "if")
    assert not teacher.latent and teacher.sample_shape == (3, 8, 8)
    assert teacher.threshold == (0.95, 1.5) and teacher.net.prompts.use_attention_mask
    pipe = IFPipeline.from_pretrained(str(pipelines["if"]))
    cond, uncond = pipe.encode_prompt(PROMPTS[:2], True, negative_prompt=None, clean_caption=True)
    ours = teacher.net.prompts(torch.tensor([0, 1, 4]))
    torch.testing.assert_close(ours[:2], cond, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[2:], uncond[:1], rtol=0, atol=1e-6)
    x = torch.randn(2, 3, 8, 8)
    raw = teacher.raw(x, torch.tensor([500.0, 20.0], dtype=torch.float64), torch.tensor([0, 1]))
    assert raw.shape == (2, 3, 8, 8)  # ε: the first 3 of the UNet's 6 channels
    sched = DDPMScheduler.from_pretrained(str(pipelines["if"]), subfolder="scheduler")
    big = 3.0 * torch.randn(4, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(dynamic_threshold(big, 0.95, 1.5), sched._threshold_sample(big), rtol=0, atol=1e-12)


def test_if_prompts_are_cleaned_as_the_if_pipeline_cleans_them(pipelines, tmp_path):
    """``teacher.clean_captions=auto`` cleans an IF teacher's prompts (and negative prompt) with diffusers' IF
    preprocessing, counts what changed and drops prompts it empties; SD teachers and ``false`` keep them."""
    from diffusers import IFPipeline

    dirty = ["A <b>Red</b> bicycle https://example.org/img.png", "The DIGIT “one”", "@user #123", "two"]
    (tmp_path / "dirty.txt").write_text("\n".join(dirty) + "\n")
    data = BootDataConfig(prompts=str(tmp_path / "dirty.txt"))
    pipe = IFPipeline.from_pretrained(str(pipelines["if"]))
    expected = pipe._text_preprocessing(dirty, clean_caption=True)
    assert expected[2] == "" and expected[0] != dirty[0].lower()  # the fixture exercises cleaning and emptying
    teacher = build_teacher(BootTeacherRef(path=str(pipelines["if"]), negative_prompt="<i>Blurry</i>"), data)
    enc = teacher.net.prompts
    assert enc.prompts == tuple(p for p in expected if p) and enc.clean_captions
    assert enc.negative_prompt == "blurry"
    assert teacher.prompt_info["changed_by_cleaning"] == 3 and teacher.prompt_info["emptied_by_cleaning"] == 1
    cond, uncond = pipe.encode_prompt(dirty[:2], True, negative_prompt=["<i>Blurry</i>"] * 2, clean_caption=True)
    ours = teacher.net.prompts(torch.tensor([0, 1, 3]))
    torch.testing.assert_close(ours[:2], cond, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[2:], uncond[:1], rtol=0, atol=1e-6)
    raw = build_teacher(BootTeacherRef(path=str(pipelines["if"]), clean_captions="false"), data)
    assert raw.net.prompts.prompts == tuple(dirty) and not raw.net.prompts.clean_captions
    sd = build_teacher(BootTeacherRef(path=str(pipelines["sd15"])), data)
    assert sd.net.prompts.prompts == tuple(dirty)
    forced = build_teacher(BootTeacherRef(path=str(pipelines["sd15"]), clean_captions="true"), data)
    assert forced.net.prompts.prompts == tuple(p for p in expected if p)


def test_if_caption_cleaning_without_its_libraries_names_the_extra(pipelines, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ftfy" else real(name, *a))
    (tmp_path / "p.txt").write_text("a cat\n")
    with pytest.raises(UserError, match=r"needs ftfy: pip install 'vkd\[if\]'"):
        build_teacher(BootTeacherRef(path=str(pipelines["if"])), BootDataConfig(prompts=str(tmp_path / "p.txt")))


def test_prompt_cache_truncation_count_and_per_batch_encoding(pipelines, tmp_path):
    long = " ".join(["seven"] * 120)
    (tmp_path / "p.txt").write_text(f"{PROMPTS[0]}\n{long}\n")
    data = BootDataConfig(prompts=str(tmp_path / "p.txt"))
    cached = build_teacher(BootTeacherRef(path=str(pipelines["sd15"])), data)
    uncached = build_teacher(BootTeacherRef(path=str(pipelines["sd15"]), prompt_cache_mb=0.0), data)
    assert cached.prompt_info["truncated"] == 1
    idx = torch.tensor([1, 0, 2, 1])
    torch.testing.assert_close(cached.net.prompts(idx), uncached.net.prompts(idx), rtol=0, atol=1e-6)
    assert cached.net.prompts._cache is not None and uncached.net.prompts._cache is None


_LOAD_TEXT_PIPELINE = """
import sys, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)  # pipeline_boot.py
eps, prompts = torch.load(sys.argv[2])
images = pipe(prompts, latents=eps, num_inference_steps=1, output_type="pt").images
assert type(pipe).__name__ == "BootPipeline" and len(pipe("a handwritten seven").images) == 1
assert not any(m == "vkd" or m.startswith("vkd.") for m in sys.modules), "vkd was imported"
assert pipe.config.clean_caption == (sys.argv[4] == "clean")
# an IF student cleans its prompts as IFPipeline does (HTML, URLs, case); others read them as given
dirty = pipe("A <b>Handwritten</b> SEVEN https://example.org/x", latents=eps[:1], output_type="pt").images
plain = pipe("a handwritten seven", latents=eps[:1], output_type="pt").images
assert torch.equal(dirty, plain) == pipe.config.clean_caption, "caption cleaning"
torch.save(images, sys.argv[3])
"""


@pytest.mark.parametrize("name", ["sd15", "if"])
def test_text_run_trains_only_the_unet_and_exports_a_pipeline_that_takes_prompts(pipelines, tmp_path, name):
    """``vkd distill boot --set teacher.path=PIPELINE --set data.prompts=FILE`` with no other teacher setting; the
    export loads in a fresh process without vkd and ``pipe(prompts)`` gives ``vkd sample boot``'s images."""
    sets = [f"teacher.path={pipelines[name]}", f"data.prompts={pipelines['prompts']}", f"run.output_dir={tmp_path}",
            "run.name=t2i", "train.steps=2", "train.batch_size=3", "train.checkpoint_every=2", "train.device=cpu",
            "sample.num=4", "sample.teacher_steps=2", "train.ema_decay=0.9"]
    run_boot(load_config(BootConfig, None, sets, task="boot"))
    run_dir = tmp_path / "boot" / "t2i"
    for file in ("model.safetensors", "ema.safetensors"):
        keys = load_checkpoint_weights(latest_checkpoint(run_dir), file)
        assert keys and not [k for k in keys if "text_encoder" in k or "vae" in k or "prompt" in k]
    export = run_dir / "pipeline"
    index = json.loads((export / "model_index.json").read_text())
    assert index["text_encoder"][0] == "transformers" and (index["vae"][1] == "AutoencoderKL") == (name == "sd15")
    sample(run_dir, 5, tmp_path / "s", None, 0, 5)  # vkd sample boot: sample i reads prompt i % 4
    student, _ = load_student(export, tuple(PROMPTS))
    shape = (4, 8, 8) if name == "sd15" else (3, 8, 8)
    _, eps, labels = next(noise_batches(5, 0, shape, 4, 5))
    torch.save((eps, [PROMPTS[i] for i in labels.tolist()]), tmp_path / "noise.pt")
    assert index["clean_caption"] == (name == "if")  # teacher.clean_captions=auto: IF pipelines only
    subprocess.run([sys.executable, "-c", _LOAD_TEXT_PIPELINE, str(export), str(tmp_path / "noise.pt"),
                    str(tmp_path / "images.pt"), "clean" if name == "if" else "raw"], check=True, cwd=tmp_path,
                   timeout=300)
    images = torch.load(tmp_path / "images.pt")
    torch.testing.assert_close(images, student.generate(eps, labels), rtol=0, atol=1e-5)
    u8 = ((images.clamp(-1, 1) + 1.0) * 127.5 + 0.5).floor().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for k in range(5):
        with Image.open(tmp_path / "s" / f"{k:06d}.png") as im:
            assert np.abs(np.asarray(im).astype(int) - u8[k].astype(int)).max() <= 1, k


# ---- bad input: one line, exit code 2 -----------------------------------------------------------------------------


def _copy(pipelines, name, tmp_path):
    return shutil.copytree(pipelines[name], tmp_path / name)


def test_a_pipeline_missing_a_component_is_named(pipelines, tmp_path):
    broken = _copy(pipelines, "sd15", tmp_path)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(UserError, match="lists text_encoder, but the pipeline has no text_encoder/ directory"):
        _teacher({**pipelines, "x": broken}, "x")
    index = json.loads((broken / "model_index.json").read_text())
    index["tokenizer"] = [None, None]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="has no tokenizer"):
        build_teacher(BootTeacherRef(path=str(broken), kind="text-to-image"), BootDataConfig(prompts=str(pipelines["prompts"])))


def test_tokenizer_text_encoder_and_unet_mismatches_are_refused(pipelines, tmp_path):
    mixed = _copy(pipelines, "sd15", tmp_path)  # keeps SD's CLIP tokenizer (49408 tokens)
    shutil.rmtree(mixed / "text_encoder")
    shutil.copytree(pipelines["if"] / "text_encoder", mixed / "text_encoder")  # IF's T5: 1024 tokens, width 32
    index = json.loads((mixed / "model_index.json").read_text())
    index["text_encoder"] = ["transformers", "T5EncoderModel"]
    (mixed / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="tokenizer/text-encoder mismatch"):
        _teacher({**pipelines, "x": mixed}, "x")
    wide = _copy(pipelines, "sd21", tmp_path)
    shutil.rmtree(wide / "text_encoder")
    shutil.copytree(fx.write_sd_pipeline(tmp_path / "w", cross_attention_dim=64) / "text_encoder", wide / "text_encoder")
    with pytest.raises(UserError, match="width is 64 but the UNet expects 32"):
        _teacher({**pipelines, "x": wide}, "x")


def test_prompts_are_required_for_text_teachers_and_refused_for_unet2d_teachers(pipelines, tmp_path):
    from boot_helpers import save_tiny_teacher

    with pytest.raises(UserError, match="needs prompts"):
        build_teacher(BootTeacherRef(path=str(pipelines["sd15"])))
    pixel = save_tiny_teacher(tmp_path / "pixel", "epsilon", num_classes=3)
    with pytest.raises(ConfigError, match="prompts apply to text-to-image teachers only"):
        build_teacher(BootTeacherRef(path=str(pixel)), BootDataConfig(prompts=str(pipelines["prompts"])))
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="has no prompts"):
        build_teacher(BootTeacherRef(path=str(pipelines["sd15"])), BootDataConfig(prompts=str(tmp_path / "empty.txt")))


def test_sdxl_style_pipelines_are_named_as_unsupported(pipelines, tmp_path):
    xl = _copy(pipelines, "sd15", tmp_path)
    index = json.loads((xl / "model_index.json").read_text())
    index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    (xl / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="SDXL-style pipelines .* not supported yet"):
        _teacher({**pipelines, "x": xl}, "x")


def test_cli_bad_prompt_file_is_one_line_exit_2(pipelines, tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    proc = subprocess.run([sys.executable, "-m", "vkd.cli", "distill", "boot", "--set", f"teacher.path={pipelines['sd15']}",
                           "--set", f"data.prompts={tmp_path / 'bad.txt'}", "--set", f"run.output_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("vkd: error:")]
    assert len(lines) == 1 and "not a UTF-8 text file" in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.parametrize(("preset", "fixture", "prediction_type", "latent"),
                         [("sd15", "sd15", "epsilon", True), ("sd21", "sd21", "v_prediction", True),
                          ("if-stage1", "if", "epsilon", False)])
def test_real_teacher_presets_load_and_train_on_a_tiny_pipeline_of_their_layout(pipelines, preset, fixture,
                                                                                 prediction_type, latent):
    """The preset as shipped, with only the teacher path, prompts and the GPU-only settings replaced: one BOOT step
    on the tiny pipeline of the same layout gives a finite loss and gradients on the student's UNet only."""
    from pathlib import Path

    from vkd.boot.distiller import BootTask

    path = Path(__file__).resolve().parents[2] / "configs" / "boot" / f"{preset}.yaml"
    with pytest.raises(UserError, match="needs prompts"):  # as shipped: the user must bring prompts
        BootTask(load_config(BootConfig, path, [f"teacher.path={pipelines[fixture]}"], task="boot"))
    cfg = load_config(BootConfig, path, [f"teacher.path={pipelines[fixture]}", f"data.prompts={pipelines['prompts']}",
                                         "teacher.dtype=float32", "train.device=cpu", "train.mixed_precision=no"],
                      task="boot")
    assert cfg.teacher.guidance_scale > 1.0
    task = BootTask(cfg)
    assert task.teacher.prediction_type == prediction_type and task.teacher.latent == latent
    losses = task(torch.arange(2))
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    assert all(p.grad is not None for p in task.student.net.unet.parameters() if p.requires_grad)
    assert all(p.grad is None for p in task.teacher.parameters())
