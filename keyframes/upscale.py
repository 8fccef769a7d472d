"""Hires fix: the generated image, upscaled (bicubic, x1.5-2), goes through an img2img pass of
the same model at a low strength, which redraws the detail the larger size can hold.

The img2img pipeline is made with `from_pipe`, so it shares every component (and memory) with
the text-to-image one, and it stops at latents: keyframes decodes them itself, with the same
NaN check as the first pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from keyframes.config import UpscaleConfig, upscaled_size


class Hires:
    def __init__(self, pipe, upscale: UpscaleConfig):
        from diffusers import StableDiffusionXLImg2ImgPipeline

        self.pipe = StableDiffusionXLImg2ImgPipeline.from_pipe(pipe)
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
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
            output_type="latent",
        ).images
