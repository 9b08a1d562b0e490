"""The tiny text-to-image fixtures are real pipelines: stock diffusers classes load and run them offline."""

from __future__ import annotations

import json

import pytest
import t2i_fixtures as fx
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The module-scoped pipelines are built outside the function-scoped single_thread fixture.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return fx.write_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipe")


@pytest.fixture(scope="module")
def if_dir(tmp_path_factory):
    return fx.write_if_pipeline(tmp_path_factory.mktemp("if") / "pipe")


def _index(path):
    return json.loads((path / "model_index.json").read_text())


def _params(module, skip_embeddings: bool = False) -> int:
    """Parameter count; ``skip_embeddings`` leaves out the token embeddings (CLIP's is 49408 x D)."""
    embeddings = ("token_embedding", "embed_tokens", "shared")
    return sum(p.numel() for name, p in module.named_parameters()
               if not (skip_embeddings and any(e in name for e in embeddings)))


# --- tokenizers ---------------------------------------------------------------------------------------------


def test_clip_tokenizer_matches_open_clip_and_openai_ids(tmp_path, monkeypatch):
    from open_clip.tokenizer import SimpleTokenizer

    monkeypatch.setenv("VKD_CACHE_DIR", str(tmp_path / "cold"))  # build the vocabulary from the .gz file
    tok = fx.clip_tokenizer()
    assert (tmp_path / "cold" / "clip-bpe-tokenizer-v1" / "merges.txt").is_file()
    assert len(tok) == fx.CLIP_VOCAB_SIZE == 49408
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert tok.model_max_length == 77
    reference = SimpleTokenizer()
    for text in ["a handwritten seven", "A Photo of an astronaut riding a horse, 4k!!", "naïve café, 東京の夜",
                 "it's   a   dog's life's   work", "x-ray 2024 (red)"]:
        ids = tok(text).input_ids
        assert ids[0] == 49406 and ids[-1] == 49407
        assert ids[1:-1] == reference.encode(text), text
    padded = tok("a handwritten seven", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[:5] == [49406, 320, 35192, 5757, 49407] and set(padded[5:]) == {49407}
    ref = reference("a handwritten seven")[0].tolist()  # open_clip pads with 0 instead: compare up to eot
    assert ref[:5] == padded[:5]


def test_t5_tokenizer_layout():
    tok = fx.t5_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("a handwritten seven").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["▁a", "▁handwritten", "▁seven", "</s>"]
    assert tok.unk_token_id not in tok("a zebra, 42!").input_ids  # unknown words spell out
    assert tok.decode(tok("a zebra").input_ids, skip_special_tokens=True) == "a zebra"
    assert len(tok) < 1024 and tok.model_max_length == 77


# --- Stable Diffusion ----------------------------------------------------------------------------------------


def test_sd_layout_and_model_index(sd_dir):
    index = _index(sd_dir)
    assert index["_class_name"] == "StableDiffusionPipeline"
    expected = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "PNDMScheduler"], "safety_checker": [None, None],
                "feature_extractor": [None, None]}
    assert {k: index[k] for k in expected} == expected
    assert index["requires_safety_checker"] is False
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (sd_dir / sub).is_dir(), sub
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {p.name for p in (sd_dir / "tokenizer").iterdir()}
    sched = json.loads((sd_dir / "scheduler" / "scheduler_config.json").read_text())
    for key, value in fx.SD15_SCHEDULER.items():
        assert sched[key] == value, key
    assert sched["prediction_type"] == "epsilon"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sd_loads_with_stock_pipeline_and_runs(tmp_path, sd_dir, prediction_type):
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline

    path = sd_dir if prediction_type == "epsilon" else fx.write_sd_pipeline(tmp_path / "sd21", prediction_type)
    pipe = StableDiffusionPipeline.from_pretrained(path)
    assert isinstance(pipe.scheduler, PNDMScheduler if prediction_type == "epsilon" else DDIMScheduler)
    assert pipe.scheduler.config.prediction_type == prediction_type
    if prediction_type == "v_prediction":
        assert dict(pipe.scheduler.config)["steps_offset"] == 1 and _index(path)["scheduler"][1] == "DDIMScheduler"
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe.unet.config.in_channels == pipe.unet.config.out_channels == 4 and pipe.unet.config.sample_size == 8
    assert pipe.vae.config.latent_channels == 4 and pipe.vae.config.scaling_factor == 0.18215
    assert pipe.vae_scale_factor == 2
    te = pipe.text_encoder.config
    assert (te.hidden_size, te.num_hidden_layers, te.vocab_size, te.max_position_embeddings) == (32, 2, 49408, 77)
    assert pipe.tokenizer("a handwritten seven").input_ids == [49406, 320, 35192, 5757, 49407]
    # tiny: a few hundred K parameters each, beyond the 49408 x 32 token embedding
    assert _params(pipe.unet) < 1_000_000 and _params(pipe.vae) < 300_000
    assert _params(pipe.text_encoder, skip_embeddings=True) < 60_000
    out = pipe("a handwritten seven", num_inference_steps=2, output_type="pt",
               generator=torch.Generator().manual_seed(0))
    images = out.images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1


def test_sd_seed_decides_weights(tmp_path):
    from diffusers import UNet2DConditionModel

    a, b, c = (fx.write_sd_pipeline(tmp_path / name, seed=seed) for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    ua, ub, uc = (UNet2DConditionModel.from_pretrained(p, subfolder="unet").conv_in.weight for p in (a, b, c))
    assert torch.equal(ua, ub) and not torch.equal(ua, uc)


def test_sd_without_vae_is_pixel_space(tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = fx.write_sd_pipeline(tmp_path / "pix", with_vae=False, sample_size=16, cross_attention_dim=48)
    index = _index(path)
    assert index["vae"] == [None, None] and not (path / "vae").exists()
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    assert unet.config.in_channels == unet.config.out_channels == 3 and unet.config.sample_size == 16
    assert unet.config.cross_attention_dim == 48
    assert CLIPTextModel.from_pretrained(path, subfolder="text_encoder").config.hidden_size == 48
    assert CLIPTokenizer.from_pretrained(path, subfolder="tokenizer").eos_token_id == 49407


# --- DeepFloyd IF --------------------------------------------------------------------------------------------


def test_if_layout_and_model_index(if_dir):
    from transformers import AutoTokenizer, T5Tokenizer

    index = _index(if_dir)
    assert index["_class_name"] == "IFPipeline"
    expected = {"unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "T5EncoderModel"],
                "tokenizer": ["transformers", "T5Tokenizer"], "scheduler": ["diffusers", "DDPMScheduler"],
                "safety_checker": [None, None], "feature_extractor": [None, None], "watermarker": [None, None]}
    assert {k: index[k] for k in expected} == expected
    assert index["requires_safety_checker"] is False and "vae" not in index
    sched = json.loads((if_dir / "scheduler" / "scheduler_config.json").read_text())
    for key, value in fx.IF_I_SCHEDULER.items():
        assert sched[key] == value, key
    for tok in (T5Tokenizer.from_pretrained(if_dir / "tokenizer"), AutoTokenizer.from_pretrained(if_dir / "tokenizer")):
        assert isinstance(tok, T5Tokenizer)
        assert (tok.pad_token, tok.eos_token, tok.model_max_length) == ("<pad>", "</s>", 77)
        assert tok("a handwritten seven").input_ids[-1] == tok.eos_token_id == 1


def test_if_loads_with_stock_pipeline_and_runs(if_dir):
    from diffusers import DDPMScheduler, IFPipeline

    pipe = IFPipeline.from_pretrained(if_dir)
    assert isinstance(pipe.scheduler, DDPMScheduler)
    cfg = pipe.scheduler.config
    assert (cfg.variance_type, cfg.beta_schedule, cfg.thresholding, cfg.sample_max_value) == (
        "learned_range", "squaredcos_cap_v2", True, 1.5)
    unet = pipe.unet.config
    assert (unet.in_channels, unet.out_channels, unet.sample_size) == (3, 6, 8)
    assert unet.encoder_hid_dim == pipe.text_encoder.config.d_model == 32
    assert pipe.text_encoder.config.vocab_size >= len(pipe.tokenizer)
    assert pipe.safety_checker is None and pipe.watermarker is None
    assert _params(pipe.unet) < 1_000_000 and _params(pipe.text_encoder, skip_embeddings=True) < 60_000
    embeds, negative = pipe.encode_prompt("a handwritten seven", do_classifier_free_guidance=True,
                                          clean_caption=False)
    assert embeds.shape == negative.shape == (1, 77, 32)
    out = pipe("a handwritten seven", num_inference_steps=2, output_type="pt", clean_caption=False,
               generator=torch.Generator().manual_seed(0))
    images = out.images
    assert images.shape == (1, 3, 8, 8) and torch.isfinite(images).all()
    assert images.abs().max() <= 1.5 + 1e-4  # dynamic thresholding bounds x0 by sample_max_value
