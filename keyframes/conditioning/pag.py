"""pag.scale > 0: perturbed-attention guidance (Ahn et al., ECCV 2024) through diffusers' PAG
pipelines (StableDiffusionXLPAGPipeline, StableDiffusionPAGPipeline), made from the loaded one
without copying weights. Each step runs a third UNet row (a second one without classifier-free
guidance) whose self-attention in `pag.layers` is replaced by the identity, and guides away
from it. The first pass only: a hires or refiner pass runs as before."""

from __future__ import annotations

import logging

from keyframes.conditioning.base import BatchHook, Method, register
from keyframes.errors import ConfigError

log = logging.getLogger("keyframes")
PAG_PIPELINES = {"sdxl": "StableDiffusionXLPAGPipeline", "sd15": "StableDiffusionPAGPipeline"}


class PagHook(BatchHook):
    def __init__(self, pag_pipe, settings):
        self.pag_pipe = pag_pipe
        self.settings = settings

    def call(self, pipe, batch: list, conditioning: dict, arguments: dict):
        arguments |= {
            "pag_scale": self.settings.scale,
            "pag_adaptive_scale": self.settings.adaptive_scale,
        }
        return self.pag_pipe


@register("pag", "pag")
class Pag(Method):
    def prepare(self, jobs: list, shotlist) -> list:
        """What diffusers' PAG pipelines cannot be combined with here, named before loading."""
        run, problems = self.run, []
        if self.settings.scale < 0 or self.settings.adaptive_scale < 0 or not self.settings.layers:
            problems.append("pag: scale and adaptive_scale at least 0, and layers not empty")
        others = {g: run.chosen.get(g, "none") for g in ("controlnet", "consistency")}
        problems += [
            f"pag with {group}={name}: that pipeline has its own attention processors or "
            "pipeline class; use one or the other"
            for group, name in others.items()
            if name != "none"
        ]
        if run.guidance_interval:
            problems.append(
                "pag with guidance_interval: the interval halves two-row batches, "
                "PAG's have three; use one or the other"
            )
        if run.deepcache:
            problems.append(
                "pag with DeepCache (speed.deepcache_interval > 1): its cached "
                "features would mix the perturbed row with the others"
            )
        if problems:
            raise ConfigError.listing("pag cannot run with these settings:", problems)
        return jobs

    def begin_stage(self, pipe, stage: int) -> BatchHook:
        import diffusers

        family = "sd15" if getattr(pipe, "text_encoder_2", None) is None else "sdxl"
        pag_class = getattr(diffusers, PAG_PIPELINES[family])
        pag_pipe = pag_class.from_pipe(pipe, pag_applied_layers=list(self.settings.layers))
        pag_pipe.set_progress_bar_config(disable=True)
        log.info("PAG: scale %g on %s", self.settings.scale, ", ".join(self.settings.layers))
        return PagHook(pag_pipe, self.settings)

    def record(self, job) -> dict:
        s = self.settings
        return {
            "pag": {"scale": s.scale, "adaptive_scale": s.adaptive_scale, "layers": list(s.layers)}
        }

    @classmethod
    def png_settings(cls, record: dict) -> list[str]:
        pag = record.get("pag")
        if not pag:
            return []
        return [f"PAG scale: {pag['scale']:g}", f"PAG layers: {' '.join(pag['layers'])}"]
