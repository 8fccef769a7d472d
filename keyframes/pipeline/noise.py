"""The starting noise: one CPU generator per image, so an image does not depend on its batch
or on the device it runs on."""

from __future__ import annotations

import torch


def seeded_generators(seeds: list[int]) -> list[torch.Generator]:
    """A fresh CPU generator per image, seeded with the image's seed."""
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
