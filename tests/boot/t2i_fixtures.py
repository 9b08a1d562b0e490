"""Tiny random text-to-image pipelines written in the layouts of the real hub checkpoints (CPU, offline, seconds).

* :func:`write_sd_pipeline`: a ``StableDiffusionPipeline`` directory as ``stable-diffusion-v1-5`` (epsilon,
  ``PNDMScheduler``) or ``stable-diffusion-2-1`` (v-prediction, ``DDIMScheduler``) have it: ``unet/``, ``vae/``,
  ``text_encoder/`` (``CLIPTextModel``), ``tokenizer/`` (the real CLIP BPE vocabulary as ``vocab.json`` +
  ``merges.txt``), ``scheduler/`` and
  ``model_index.json`` with ``safety_checker`` / ``feature_extractor`` as ``[null, null]``.
* :func:`write_if_pipeline`: a DeepFloyd IF stage-I ``IFPipeline`` directory: ``unet/`` (IF-I's block types, 6 output
  channels for ``variance_type="learned_range"``), ``text_encoder/`` (``T5EncoderModel``), ``tokenizer/`` (a
  ``T5Tokenizer`` over a small word vocabulary), ``scheduler/`` (IF-I-XL's ``DDPMScheduler`` config).

Everything is built offline: the CLIP vocabulary comes from the BPE file that ``open_clip`` ships, the T5 vocabulary
is made up here. The weights are random; only shapes, configs and file layouts are real.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from vkd.models.clip_tokenizer import (
    CLIP_BOS_ID,
    CLIP_EOS_ID,
    CLIP_VOCAB_SIZE,
    clip_bpe_path,
    clip_tokenizer,
    clip_vocab_dir,
)

__all__ = ["CLIP_BOS_ID", "CLIP_EOS_ID", "CLIP_VOCAB_SIZE", "SD15_SCHEDULER", "SD21_SCHEDULER", "IF_I_SCHEDULER",
           "clip_bpe_path", "clip_tokenizer", "clip_vocab_dir", "t5_tokenizer", "write_sd_pipeline", "write_if_pipeline"]

# scheduler/scheduler_config.json of runwayml/stable-diffusion-v1-5 (PNDM) and stabilityai/stable-diffusion-2-1
# (DDIM, v-prediction), as published on the hub.
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
                  "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}
SD21_SCHEDULER = {"_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
                  "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True,
                  "steps_offset": 1, "trained_betas": None}
# scheduler/scheduler_config.json of DeepFloyd/IF-I-XL-v1.0 (checked against the hub mirror
# ckpt/IF-I-XL-v1.0-16bit; its DPM-Solver-only key lambda_min_clipped is left out: DDPMScheduler has no such argument).
IF_I_SCHEDULER = {"_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "squaredcos_cap_v2",
                  "beta_start": 0.0001, "clip_sample": True, "clip_sample_range": 1.0,
                  "dynamic_thresholding_ratio": 0.95, "num_train_timesteps": 1000, "prediction_type": "epsilon",
                  "sample_max_value": 1.5, "thresholding": True, "trained_betas": None,
                  "variance_type": "learned_range"}

# A small English vocabulary for the tiny T5 tokenizer: whole words are single tokens, anything else falls back
# to the single characters below.
_T5_WORDS = ("a an the of in on at with and or to for from by is are this that photo picture painting drawing "
             "image sketch render portrait landscape oil watercolor digital art style of cat dog fox bird horse "
             "cow fish car bicycle bus train plane boat house tree flower forest mountain river lake sea sky sun "
             "moon star city street road bridge castle tower room table chair cup book man woman child person "
             "face hand red green blue yellow black white gray orange purple pink brown golden silver big small "
             "old new young happy sad beautiful dark bright night day morning evening winter summer snow rain "
             "one two three four five six seven eight nine zero digit number handwritten letter written "
             "simple detailed high quality realistic cartoon cute tiny large colorful blurry").split()
_T5_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()/&%+*#@"


def t5_tokenizer(max_length: int = 77):
    """A tiny ``T5Tokenizer`` (Unigram over ``_T5_WORDS`` + single characters), T5's special-token layout.

    ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2 as in T5 and IF; every prompt ends with ``</s>``. Words outside the
    vocabulary are split into characters (``<unk>`` only for characters outside ``_T5_CHARS``). transformers 5's
    ``T5Tokenizer`` is ``tokenizers``-backed and takes the ``(piece, score)`` list directly, so no SentencePiece
    model (nor the ``sentencepiece`` package) is needed; ``save_pretrained`` writes ``tokenizer.json``.
    """
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    seen = {p for p, _ in pieces}
    for word in _T5_WORDS:  # whole words first, cheap (Unigram prefers the segmentation of highest score)
        if "▁" + word not in seen:
            pieces.append(("▁" + word, -3.0))
            seen.add("▁" + word)
    for ch in _T5_CHARS:
        for piece in ("▁" + ch, ch):
            if piece not in seen:
                pieces.append((piece, -8.0))
                seen.add(piece)
    pieces += [(f"<extra_id_{i}>", 0.0) for i in range(99, -1, -1)]  # T5's sentinels, last, in reverse
    return T5Tokenizer(vocab=pieces, model_max_length=max_length, extra_ids=100)


def _tiny_unet_sd(sample_size: int, channels: int, cross_attention_dim: int):
    from diffusers import UNet2DConditionModel

    # SD-1.5's architecture (CrossAttn/Down blocks, its 8 "attention_head_dim" = heads), two tiny levels.
    return UNet2DConditionModel(sample_size=sample_size, in_channels=channels, out_channels=channels,
                                block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=32)


def _tiny_vae(image_size: int):
    from diffusers import AutoencoderKL

    # Two levels: a downsampling factor of 2 (SD's VAE has 4 levels, factor 8); SD's latent channels and scale.
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1,
                         norm_num_groups=16, sample_size=image_size, scaling_factor=0.18215)


def _tiny_clip_text_encoder(hidden_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(hidden_size=hidden_size, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=2, vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=77,
                            bos_token_id=CLIP_BOS_ID, eos_token_id=CLIP_EOS_ID, pad_token_id=CLIP_EOS_ID)
    return CLIPTextModel(config).eval()


def write_sd_pipeline(path: str | Path, prediction_type: str = "epsilon", sample_size: int = 8, seed: int = 0,
                      with_vae: bool = True, cross_attention_dim: int = 32) -> Path:
    """Write a tiny random ``StableDiffusionPipeline`` (``save_pretrained`` layout) and return its directory.

    Args:
        path: the pipeline directory (created).
        prediction_type: ``"epsilon"`` (SD-1.5's ``PNDMScheduler`` config) or ``"v_prediction"`` (SD-2.1's
            ``DDIMScheduler`` config); any other type uses SD-1.5's PNDM config with that ``prediction_type``.
        sample_size: the UNet's (latent) size; images are ``2 * sample_size`` with the VAE.
        seed: seeds the random weights.
        with_vae: ``False`` writes a pixel-space SD-like pipeline (UNet on 3 RGB channels, ``"vae": [null, null]``
            in ``model_index.json``). Stock ``StableDiffusionPipeline.from_pretrained`` rejects it (it expects a
            ``vae``); it is for loaders that accept a missing VAE.
        cross_attention_dim: the UNet's cross-attention width = the text encoder's hidden size.

    Returns:
        ``Path(path)``.
    """
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline

    path = Path(path)
    torch.manual_seed(seed)
    unet = _tiny_unet_sd(sample_size, 4 if with_vae else 3, cross_attention_dim)
    vae = _tiny_vae(2 * sample_size) if with_vae else None
    text_encoder = _tiny_clip_text_encoder(cross_attention_dim)
    if prediction_type == "v_prediction":
        scheduler = DDIMScheduler.from_config(SD21_SCHEDULER)
    else:
        scheduler = PNDMScheduler.from_config({**SD15_SCHEDULER, "prediction_type": prediction_type})
    # vae=None is accepted by the constructor (vae_scale_factor falls back to 8) and saved as [null, null].
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path)
    # SD-1.5's tokenizer/ holds vocab.json + merges.txt (no tokenizer.json): write it so, so that loaders take the
    # path they take for the real checkpoint (transformers builds the fast tokenizer from the two files).
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(clip_vocab_dir() / name, path / "tokenizer" / name)
    (path / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    if not with_vae:  # make sure of the entry whatever save_pretrained wrote for the missing component
        index_path = path / "model_index.json"
        index = json.loads(index_path.read_text())
        index["vae"] = [None, None]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return path


def _tiny_unet_if(sample_size: int, encoder_hid_dim: int):
    from diffusers import UNet2DConditionModel

    # IF-I-XL's architecture at two tiny levels: gelu, scale-shift resnets, simple cross-attention with group norm,
    # T5 states projected by encoder_hid_dim_type="text_proj" and attention-pooled into the time embedding
    # (addition_embed_type="text"); 6 output channels = ε and the learned-range variance.
    return UNet2DConditionModel(sample_size=sample_size, in_channels=3, out_channels=6, layers_per_block=1,
                                block_out_channels=(32, 64),
                                down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
                                mid_block_type="UNetMidBlock2DSimpleCrossAttn",
                                up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
                                cross_attention_dim=64, encoder_hid_dim=encoder_hid_dim,
                                encoder_hid_dim_type="text_proj", attention_head_dim=16,
                                addition_embed_type="text", addition_embed_type_num_heads=2,
                                cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift",
                                act_fn="gelu", norm_num_groups=32)


def write_if_pipeline(path: str | Path, sample_size: int = 8, seed: int = 0) -> Path:
    """Write a tiny random DeepFloyd IF stage-I ``IFPipeline`` (``save_pretrained`` layout); return its directory.

    Args:
        path: the pipeline directory (created).
        sample_size: image size of the pixel-space UNet.
        seed: seeds the random weights.

    Returns:
        ``Path(path)``.
    """
    from diffusers import DDPMScheduler, IFPipeline
    from transformers import T5Config, T5EncoderModel

    path = Path(path)
    tokenizer = t5_tokenizer()
    torch.manual_seed(seed)
    d_model = 32
    unet = _tiny_unet_if(sample_size, d_model)
    # T5 v1.1 (IF's t5-v1_1-xxl) layout: gated-gelu feed-forward, untied embeddings, pad 0 / eos 1.
    config = T5Config(vocab_size=max(1024, len(tokenizer)), d_model=d_model, d_kv=16, d_ff=37, num_layers=2,
                      num_heads=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0,
                      eos_token_id=1, decoder_start_token_id=0)
    text_encoder = T5EncoderModel(config).eval()
    scheduler = DDPMScheduler.from_config(IF_I_SCHEDULER)
    pipe = IFPipeline(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler=scheduler,
                      safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path
