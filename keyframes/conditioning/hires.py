"""upscale=hires, the hires fix: the generated image, upscaled (bicubic, x1.5-2), goes through
an img2img pass of the same model at a low strength, which redraws the detail the larger size
can hold. The img2img pipeline is made with `from_pipe` (the class matching the model's: SDXL
or SD 1.5), so it shares every component (and memory) with the text-to-image one. It stops at
latents: keyframes decodes them itself, with the same NaN check as the first pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from keyframes.conditioning.base import BatchHook, Method, register
from keyframes.config.schema import HiresConfig
from keyframes.config.validate import size_problems, upscaled_size
from keyframes.errors import ConfigError
from keyframes.pipeline.noise import seeded_generators


class Hires(BatchHook):
    """The img2img pass at the larger size, sharing every component with the base."""

    def __init__(self, pipe, upscale: HiresConfig):
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

    def second_pass(self, pixels: torch.Tensor, batch: list, inputs: dict) -> torch.Tensor:
        return self.refine(
            pixels, inputs["conditioning"], inputs["seeds"], inputs["steps"], inputs["cfg_scale"]
        )


@register("upscale", "hires")
class HiresFix(Method):
    """upscale=hires: a second, img2img pass at upscale.factor times the size."""

    def prepare(self, jobs: list, shotlist) -> list:
        up, problems = self.settings, []
        if not 1 < up.factor <= 4:
            problems.append(f"upscale.factor={up.factor}: must be above 1, at most 4")
        if not 0 < up.strength <= 1:
            problems.append(f"upscale.strength={up.strength}: must be in (0, 1]")
        if up.steps is not None and up.steps < 1:
            problems.append(f"upscale.steps={up.steps}: must be at least 1")
        steps = up.steps or self.run.steps
        if steps >= 1 and 0 < up.strength <= 1 and int(steps * up.strength) < 1:
            problems.append(
                f"upscale=hires: strength {up.strength:g} of {steps} steps redraws no step at "
                "all; raise upscale.steps (or upscale.strength)"
            )
        if 1 < up.factor <= 4:
            problems += size_problems(*upscaled_size(self.run.width, self.run.height, up.factor))
        if problems:
            raise ConfigError("invalid settings:", problems)
        return jobs

    def begin_stage(self, pipe, stage: int) -> BatchHook:
        # made per stage: from_pipe copies the components there are at that moment
        return Hires(pipe, self.settings)

    def record(self, job) -> dict:
        """How the image was enlarged; width/height are the output's."""
        up = self.settings
        width, height = upscaled_size(self.run.width, self.run.height, up.factor)
        return {
            "upscale": {
                "name": self.name,
                "factor": up.factor,
                "strength": up.strength,
                "steps": up.steps or self.run.steps,
                "width": width,
                "height": height,
            }
        }

    @classmethod
    def png_settings(cls, record: dict) -> list[str]:
        up = record.get("upscale")
        if not up or up["name"] != cls.name:
            return []
        return [
            f"Hires upscale: {up['factor']:g}, Hires steps: {up['steps']}, "
            f"Denoising strength: {up['strength']:g}"
        ]
