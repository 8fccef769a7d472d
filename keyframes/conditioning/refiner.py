"""upscale=refiner: the "ensemble of experts" of the SDXL report. The base model runs the first
high_noise_frac of the noise schedule (`denoising_end`), and the SDXL refiner, an expert in the
last, low-noise steps, finishes those same latents (`denoising_start`). The refiner shares the
base's second text encoder and VAE, as in the refiner's own model card, and stops at latents:
keyframes decodes them itself, with the same NaN check as the first pass.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from keyframes.conditioning.base import BatchHook, Method, register
from keyframes.config.schema import RefinerConfig
from keyframes.errors import ConfigError, ModelUnavailableError, first_line
from keyframes.pipeline.load import quiet_loading
from keyframes.pipeline.long_prompts import text_inputs
from keyframes.pipeline.memory import apply_memory_mode
from keyframes.pipeline.noise import seeded_generators

log = logging.getLogger("keyframes")


def refiner_source(upscale: RefinerConfig) -> str:
    """What the refiner is, as logs and records name it."""
    return upscale.path or upscale.id or "?"


def load_refiner(base, upscale: RefinerConfig, allow_pickle: bool = False):
    """The SDXL refiner pipeline, sharing the base's text encoder 2 and VAE, on its device."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    source = str(Path(upscale.path).expanduser()) if upscale.path else upscale.id
    kwargs = {"variant": upscale.variant} if upscale.variant and not upscale.path else {}
    try:
        with quiet_loading():
            refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
                source,
                text_encoder_2=base.text_encoder_2,
                vae=base.vae,
                dtype=base.unet.dtype,
                use_safetensors=None if allow_pickle else True,  # the README's pickle rule
                **kwargs,
            )
    except (OSError, ValueError) as e:
        raise ModelUnavailableError(
            f"upscale=refiner ({source}) is not available: {first_line(e)}\n"
            f"  Download it: uv run hf download {upscale.id or source} --include "
            '"*.json" "*.txt" "unet/*.fp16.safetensors" (or set upscale.path to a local folder).'
        ) from None
    return refiner


class Refiner(BatchHook):
    """Finishes the base model's partly denoised latents with the SDXL refiner."""

    def __init__(self, pipe, upscale: RefinerConfig, long_prompts: str, weighting: str = "none"):
        self.pipe = pipe
        self.pipe.set_progress_bar_config(disable=True)
        self.upscale = upscale
        self.long_prompts = long_prompts
        self.weighting = weighting

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
        conditioning = text_inputs(self.pipe, prompts, negatives, self.long_prompts, self.weighting)
        return self.pipe(
            **conditioning,
            image=latents,
            denoising_start=self.upscale.high_noise_frac,
            num_inference_steps=steps,
            guidance_scale=cfg_scale,
            generator=seeded_generators(seeds),
            output_type="latent",
        ).images

    def call(self, pipe, batch: list, conditioning: dict, arguments: dict):
        arguments["denoising_end"] = self.denoising_end  # the base stops there
        return pipe

    def after_latents(self, latents: torch.Tensor, batch: list, inputs: dict) -> torch.Tensor:
        return self.refine(
            latents,
            inputs["prompts"],
            inputs["negatives"],
            inputs["seeds"],
            inputs["steps"],
            inputs["cfg_scale"],
        )


def cached_refiner(loaded, upscale: RefinerConfig, allow_pickle: bool = False):
    """The SDXL refiner for this base pipeline, loaded once per process and placed like it."""
    key = (upscale.path, upscale.id, upscale.variant)
    if key not in loaded.refiners:
        start = time.perf_counter()
        refiner = load_refiner(loaded.pipe, upscale, allow_pickle)
        loaded.refiners = {key: apply_memory_mode(refiner, loaded.memory, loaded.placement.device)}
        log.info(
            "refiner %s loaded in %.1f s", refiner_source(upscale), time.perf_counter() - start
        )
    return loaded.refiners[key]


@register("upscale", "refiner", "tiny_refiner")  # tiny_refiner: the tiny one, by its path
class SdxlRefiner(Method):
    """upscale=refiner: the SDXL refiner runs the last 1 - high_noise_frac of the steps."""

    second_model = True  # its UNet is on the card beside the base's

    def prepare(self, jobs: list, shotlist) -> list:
        up, model = self.settings, self.run.model
        problems = []
        if not 0 < up.high_noise_frac < 1:
            problems.append(
                f"upscale.high_noise_frac={up.high_noise_frac}: must be between 0 and 1"
            )
        if not (up.id or up.path):
            problems.append("upscale=refiner: set upscale.id (hub repo) or upscale.path (folder)")
        if problems:
            raise ConfigError("invalid settings:", problems)
        if model.family != "sdxl":
            raise ConfigError(
                "settings that do not fit the model:",
                [
                    f"upscale=refiner: the SDXL refiner finishes SDXL latents; {model.name} is "
                    f"{model.family}. Use upscale=hires or upscale=none."
                ],
            )
        return jobs

    def missing_weights(self) -> str | None:
        from keyframes.pipeline import hub

        up = self.settings
        if up.path:
            return None  # a local folder: the loader names what it lacks
        files = f'"unet/*.{up.variant}.safetensors"' if up.variant else '"unet/*.safetensors"'
        return hub.missing(
            up.id, "model_index.json", "upscale=refiner", f'--include "*.json" "*.txt" {files}'
        )

    def install(self, loaded, todo: list) -> None:
        run = self.run
        refiner = cached_refiner(loaded, self.settings, run.model.allow_pickle)
        self.hook = Refiner(refiner, self.settings, run.long_prompts, run.prompt_weighting)

    def begin_stage(self, pipe, stage: int) -> BatchHook:
        return self.hook

    def record(self, job) -> dict:
        up = self.settings
        return {
            "upscale": {
                "name": self.name,
                "model": refiner_source(up),
                "high_noise_frac": up.high_noise_frac,
                "width": self.run.width,
                "height": self.run.height,
            }
        }

    @classmethod
    def png_settings(cls, record: dict) -> list[str]:
        up = record.get("upscale")
        if not up or up["name"] != cls.name:
            return []
        # A1111's own names for its refiner switch
        return [f"Refiner: {up['model']}, Refiner switch at: {up['high_noise_frac']:g}"]
