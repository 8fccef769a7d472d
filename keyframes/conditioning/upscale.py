"""Second passes after the first: the hires fix and the SDXL refiner.

Hires: the generated image, upscaled (bicubic, x1.5-2), goes through an img2img pass of the
same model at a low strength, which redraws the detail the larger size can hold. The img2img
pipeline is made with `from_pipe` (the class matching the model's: SDXL or SD 1.5), so it
shares every component (and memory) with the text-to-image one.

Refiner: the "ensemble of experts" of the SDXL report. The base model runs the first
high_noise_frac of the noise schedule (`denoising_end`), and the SDXL refiner, an expert in
the last, low-noise steps, finishes those same latents (`denoising_start`). The refiner shares
the base's second text encoder and VAE, as in the refiner's own model card.

Both stop at latents: keyframes decodes them itself, with the same NaN check as the first pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from keyframes.config.schema import UpscaleConfig, upscaled_size
from keyframes.errors import ModelUnavailableError, first_line
from keyframes.pipeline.long_prompts import text_inputs
from keyframes.pipeline.noise import seeded_generators


class Hires:
    def __init__(self, pipe, upscale: UpscaleConfig):
        from diffusers import AutoPipelineForImage2Image

        self.pipe = AutoPipelineForImage2Image.from_pipe(pipe)
        self.pipe.set_progress_bar_config(disable=True)
        self.upscale = upscale

    def refine(
        self,
        pixels: torch.Tensor,
        conditioning: dict,
        seeds: list[int],
        steps: int,
        cfg_scale: float,
    ) -> torch.Tensor:
        """Decoded images in [-1, 1] -> latents of the upscaled, refined images, with the
        first pass's prompts (or embeddings) and image prompt."""
        height, width = pixels.shape[-2:]
        size = upscaled_size(width, height, self.upscale.factor)[::-1]
        images = (pixels.float() / 2 + 0.5).clamp(0, 1)
        images = F.interpolate(images, size=size, mode="bicubic", antialias=True).clamp(0, 1)
        return self.pipe(
            **conditioning,
            image=images,
            strength=self.upscale.strength,
            num_inference_steps=self.upscale.steps or steps,
            guidance_scale=cfg_scale,
            generator=seeded_generators(seeds),
            output_type="latent",
        ).images


def refiner_source(upscale: UpscaleConfig) -> str:
    """What the refiner is, as logs and records name it."""
    return "tiny" if upscale.tiny else upscale.path or upscale.id or "?"


def load_refiner(base, upscale: UpscaleConfig):
    """The SDXL refiner pipeline, sharing the base's text encoder 2 and VAE, on its device."""
    if upscale.tiny:  # tests and smoke runs: random weights shaped like the refiner
        from keyframes.pipeline.tiny import build_tiny_refiner

        return build_tiny_refiner(base)
    from diffusers import StableDiffusionXLImg2ImgPipeline

    source = upscale.path or upscale.id
    kwargs = {"variant": upscale.variant} if upscale.variant and not upscale.path else {}
    try:
        refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
            source,
            text_encoder_2=base.text_encoder_2,
            vae=base.vae,
            dtype=base.unet.dtype,
            use_safetensors=True,
            **kwargs,
        )
    except (OSError, ValueError) as e:
        raise ModelUnavailableError(
            f"upscale=refiner ({source}) is not available: {first_line(e)}\n"
            f"  Download it: uv run hf download {upscale.id or source} --include "
            '"*.json" "*.txt" "unet/*.fp16.safetensors" (or set upscale.path to a local folder).'
        ) from None
    return refiner


class Refiner:
    """Finishes the base model's partly denoised latents with the SDXL refiner."""

    def __init__(self, pipe, upscale: UpscaleConfig, long_prompts: str):
        self.pipe = pipe
        self.pipe.set_progress_bar_config(disable=True)
        self.upscale = upscale
        self.long_prompts = long_prompts

    @property
    def denoising_end(self) -> float:
        return self.upscale.high_noise_frac

    def refine(
        self,
        latents: torch.Tensor,
        prompts: list[str],
        negatives: list[str],
        seeds: list[int],
        steps: int,
        cfg_scale: float,
    ) -> torch.Tensor:
        """Noisy latents at high_noise_frac -> finished latents. The prompts are encoded again:
        the refiner reads text encoder 2 alone, so the base's embeddings do not fit it."""
        conditioning = text_inputs(self.pipe, prompts, negatives, self.long_prompts)
        return self.pipe(
            **conditioning,
            image=latents,
            denoising_start=self.upscale.high_noise_frac,
            num_inference_steps=steps,
            guidance_scale=cfg_scale,
            generator=seeded_generators(seeds),
            output_type="latent",
        ).images
