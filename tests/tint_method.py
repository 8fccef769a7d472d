"""A conditioning method defined outside keyframes, as "Add a conditioning method" in
docs/development.md shows: it shifts the first latent channel by `consistency.options.shift`
before decoding."""

from keyframes.conditioning.base import BatchHook, Method, register


class Shift(BatchHook):
    def __init__(self, shift: float):
        self.shift = shift

    def after_latents(self, latents, batch, inputs):
        latents = latents.clone()
        latents[:, 0] += self.shift
        return latents


@register("consistency", "tint")
class Tint(Method):
    def begin_stage(self, pipe, stage):
        return Shift(self.settings.options["shift"])

    def record(self, job):
        return {"consistency": "tint", "tint_shift": self.settings.options["shift"]}
