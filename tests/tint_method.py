"""A conditioning method defined outside keyframes, as "Add a conditioning method" in
docs/development.md shows: it shifts the first latent channel by `consistency.shift` before
decoding. Its settings are its own dataclass, registered with it."""

from dataclasses import dataclass

from keyframes.conditioning.base import BatchHook, Method, register
from keyframes.config.schema import ConsistencyConfig


@dataclass
class TintConfig(ConsistencyConfig):
    shift: float = 0.0  # added to the first latent channel


class Shift(BatchHook):
    def __init__(self, shift: float):
        self.shift = shift

    def after_latents(self, latents, batch, inputs):
        latents = latents.clone()
        latents[:, 0] += self.shift
        return latents


@register("consistency", "tint", schema=TintConfig)
class Tint(Method):
    def begin_stage(self, pipe, stage):
        return Shift(self.settings.shift)

    def record(self, job):
        return {"consistency": "tint", "tint_shift": self.settings.shift}
