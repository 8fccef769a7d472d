"""freeu.enabled=true: FreeU (Si et al., CVPR 2024), diffusers' `enable_freeu`. The UNet's
decoder scales its backbone features up (b1, b2) and the low frequencies of its skip features
down (s1, s2): no weights, no extra UNet evaluations. On for the whole run, second passes
included; off again afterwards."""

from __future__ import annotations

import logging

from keyframes.conditioning.base import Method, register
from keyframes.errors import ConfigError

log = logging.getLogger("keyframes")


@register("freeu", "freeu")
class FreeU(Method):
    def factors(self) -> list[float]:
        s = self.settings
        return [s.s1, s.s2, s.b1, s.b2]

    def prepare(self, jobs: list, shotlist) -> list:
        bad = [
            f"freeu.{k}={v}"
            for k, v in zip(("s1", "s2", "b1", "b2"), self.factors(), strict=True)
            if not 0 <= v <= 10
        ]
        if bad:
            raise ConfigError(f"{', '.join(bad)}: FreeU's factors are between 0 and 10")
        return jobs

    def install(self, loaded, todo) -> None:
        s = self.settings
        loaded.pipe.enable_freeu(s1=s.s1, s2=s.s2, b1=s.b1, b2=s.b2)
        log.info("FreeU: s1 %g, s2 %g, b1 %g, b2 %g", *self.factors())

    def remove(self, pipe) -> None:
        pipe.disable_freeu()

    def record(self, job) -> dict:
        return {"freeu": self.factors()}

    @classmethod
    def png_settings(cls, record: dict) -> list[str]:
        if not record.get("freeu"):
            return []
        s1, s2, b1, b2 = record["freeu"]
        return [f"FreeU: s1 {s1:g} s2 {s2:g} b1 {b1:g} b2 {b2:g}"]
