"""Run image jobs through the pipeline in batches; time and measure each batch.

Imports neither Hydra nor MLflow: this is the core a benchmark can run on a bare machine.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from PIL import Image

from keyframes.plan import ImageJob


@dataclass(frozen=True)
class GenerationSettings:
    steps: int
    cfg_scale: float
    width: int
    height: int
    batch_size: int


@dataclass
class Generation:
    job: ImageJob
    image: Image.Image
    seconds: float  # batch wall time / images in the batch
    vram_peak_gb: float | None  # None where there is no CUDA device, never 0
    rss_peak_gb: float  # peak resident memory of this process so far


def batches(jobs: list[ImageJob], size: int) -> Iterator[list[ImageJob]]:
    for start in range(0, len(jobs), size):
        yield jobs[start : start + size]


def generate(
    pipe, jobs: list[ImageJob], settings: GenerationSettings
) -> Iterator[list[Generation]]:
    """Yield one list of Generations per batch, as soon as the batch is done.

    Each image gets its own CPU generator seeded with its job's seed, so an image does not
    depend on the batch it lands in or on the device the model runs on."""
    cuda = pipe.device.type == "cuda"
    for batch in batches(jobs, settings.batch_size):
        generators = [torch.Generator("cpu").manual_seed(job.seed) for job in batch]
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        images = pipe(
            prompt=[job.prompt for job in batch],
            negative_prompt=[job.negative_prompt for job in batch],
            num_inference_steps=settings.steps,
            guidance_scale=settings.cfg_scale,
            width=settings.width,
            height=settings.height,
            generator=generators,
            output_type="pil",
        ).images
        if cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / len(batch)
        vram = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
        rss = peak_rss_gb()
        yield [
            Generation(job, image, seconds, vram, rss)
            for job, image in zip(batch, images, strict=True)
        ]


def peak_rss_gb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9
