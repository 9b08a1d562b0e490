"""``BootPipeline``: a one-step BOOT student as a diffusers pipeline.

Self-contained (torch and diffusers only): every BOOT run copies this file into ``RUN/pipeline/`` next to
``model_index.json`` (``"_class_name": ["pipeline_boot", "BootPipeline"]``), so diffusers loads the
student without vkd installed (``trust_remote_code=True``: diffusers runs a pipeline's own code only when
asked). The one-step sample is the student's ``g(ε, t_sample, c)``:
``x0 = to_x0(unet(ε, t_sample, c), x=ε)`` with the coefficients (α̃, σ̃) the student was trained with
(``t_sample = -1`` is BOOT's clean endpoint), then clamped to [-1, 1].

Examples:
    >>> from diffusers import DiffusionPipeline
    >>> pipe = DiffusionPipeline.from_pretrained("runs/boot/digits/pipeline", trust_remote_code=True)  # doctest: +SKIP
    >>> images = pipe(batch_size=8, class_labels=[7] * 8, num_inference_steps=1).images  # doctest: +SKIP
    >>> images = pipe(["a handwritten seven"] * 8, num_inference_steps=1).images  # text-to-image  # doctest: +SKIP
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

__all__ = ["BootPipeline"]


class BootPipeline(DiffusionPipeline):
    """One network evaluation from noise to image.

    Args:
        unet: the student ``UNet2DModel`` or ``UNet2DConditionModel`` (an output with twice the image channels is
            cut to its first half).
        scheduler: the teacher's scheduler (kept for its config; the one step does not call it).
        text_encoder: the teacher's frozen text encoder (text-to-image students), else ``None``.
        tokenizer: its tokenizer.
        vae: the teacher's ``AutoencoderKL`` (latent students), else ``None``.
        prediction_type: ``epsilon`` | ``v_prediction`` | ``sample``: what the student's network outputs.
        t_sample: the timestep the network reads (``-1``: BOOT's clean endpoint).
        alpha: α̃ of the output conversion at ``t_sample``.
        sigma: σ̃ of the output conversion at ``t_sample``.
        max_length: prompt tokens (padding and truncation, as the student was trained).
        use_attention_mask: pass the attention mask to the text encoder (T5 / ``use_attention_mask``).
        clean_caption: clean prompts as DeepFloyd IF's pipeline does (the student's teacher was an IF pipeline and
            its prompts were cleaned so in training; needs ``beautifulsoup4`` and ``ftfy``).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["text_encoder", "tokenizer", "vae"]

    def __init__(self, unet, scheduler, text_encoder=None, tokenizer=None, vae=None, prediction_type: str = "sample",
                 t_sample: float = -1.0, alpha: float = 1.0, sigma: float = 0.0, max_length: int = 77,
                 use_attention_mask: bool = False, clean_caption: bool = False):
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unknown prediction_type {prediction_type!r}")
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae)
        self.register_to_config(prediction_type=prediction_type, t_sample=float(t_sample), alpha=float(alpha),
                                sigma=float(sigma), max_length=int(max_length),
                                use_attention_mask=bool(use_attention_mask), clean_caption=bool(clean_caption))

    def encode_prompt(self, prompt: list[str], device: torch.device) -> torch.Tensor:
        """``[B, L, D]`` text-encoder states: padded to ``max_length``, truncated, ``last_hidden_state``."""
        tok = self.tokenizer(prompt, padding="max_length", max_length=self.config.max_length, truncation=True,
                             return_tensors="pt")
        mask = tok["attention_mask"].to(device) if self.config.use_attention_mask else None
        with torch.autocast(device_type=device.type, enabled=False):
            return self.text_encoder(tok["input_ids"].to(device), attention_mask=mask)[0]

    def _to_x0(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out, x = out.float(), x.float()  # the conversion in float32 whatever the UNet's dtype
        ptype = self.config.prediction_type
        if ptype == "sample":
            return out
        a = torch.tensor(self.config.alpha, dtype=torch.float32, device=x.device)
        s = torch.tensor(self.config.sigma, dtype=torch.float32, device=x.device)
        return (x - s * out) / a if ptype == "epsilon" else a * x - s * out

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, batch_size: int = 1,
                 class_labels: list[int] | torch.Tensor | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, latents: torch.Tensor | None = None,
                 num_inference_steps: int = 1, output_type: str = "pil", return_dict: bool = True):
        """Generate ``batch_size`` images in one step.

        Args:
            prompt: the prompt(s) of a text-to-image student (one image per prompt).
            batch_size: number of images (``len(prompt)``, ``len(class_labels)`` or ``latents.shape[0]`` when given).
            class_labels: ``[B]`` class indices for a class-conditional student.
            generator: seeds the noise when ``latents`` is not given.
            latents: ``[B, C, H, W]`` the noise ε to start from.
            num_inference_steps: must be 1 (the student is a one-step generator).
            output_type: ``pil`` | ``np`` (``[B, H, W, C]`` in [0, 1]) | ``pt`` (``[B, C, H, W]`` in [-1, 1]).
            return_dict: return an :class:`ImagePipelineOutput` (else a tuple).
        """
        if num_inference_steps != 1:
            raise ValueError(f"a BOOT student generates in one step; got num_inference_steps={num_inference_steps}")
        unet = self.unet
        device = self._execution_device
        text_states = None
        if self.text_encoder is not None:
            if prompt is None:
                raise ValueError("this student is text-to-image: pass prompt")
            prompt = [prompt] if isinstance(prompt, str) else list(prompt)
            if self.config.clean_caption:  # as in training: diffusers' IF preprocessing
                from diffusers import IFPipeline

                prompt = IFPipeline.__new__(IFPipeline)._text_preprocessing(prompt, clean_caption=True)
            text_states = self.encode_prompt(prompt, device)
            batch_size = len(prompt)
        elif prompt is not None:
            raise ValueError("this student has no text encoder: it takes no prompt")
        if class_labels is not None:
            class_labels = torch.as_tensor(class_labels, dtype=torch.long, device=device).reshape(-1)
            batch_size = int(class_labels.numel())
        elif getattr(unet, "class_embedding", None) is not None and text_states is None:
            raise ValueError("this student is class-conditional: pass class_labels")
        if latents is None:
            size = unet.config.sample_size
            h, w = (size, size) if isinstance(size, int) else tuple(size)
            latents = randn_tensor((batch_size, unet.config.in_channels, h, w), generator=generator, device=device,
                                   dtype=torch.float32)
        eps = latents.to(device)
        t = torch.full((eps.shape[0],), self.config.t_sample, dtype=torch.float32, device=device)
        if text_states is not None:
            out = unet(eps.to(unet.dtype), t, encoder_hidden_states=text_states.to(unet.dtype)).sample
        else:
            out = unet(eps.to(unet.dtype), t, class_labels=class_labels).sample
        if out.shape[1] == 2 * eps.shape[1]:
            out = out[:, : eps.shape[1]]
        image = self._to_x0(out, eps)
        if self.vae is not None:  # a latent student: decode as the SD pipelines do, in float32
            scale = float(getattr(self.vae.config, "scaling_factor", 1.0) or 1.0)
            shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
            vae_param = next(self.vae.parameters())
            with torch.autocast(device_type=device.type, enabled=False):
                image = self.vae.decode((image / scale + shift).to(vae_param)).sample.float()
        image = image.clamp(-1.0, 1.0)
        if output_type != "pt":
            image = ((image + 1.0) / 2.0).cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
