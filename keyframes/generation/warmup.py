"""The warm-up: first-call costs (lazy set-up, kernel choice, torch.compile) kept out of every
image's seconds."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from keyframes.generation.generator import GenerationSettings, KeyframeGenerator
from keyframes.pipeline.load import LoadedPipeline
from keyframes.shotlist.jobs import ImageJob

log = logging.getLogger("keyframes")


def warm_up(
    loaded: LoadedPipeline,
    settings: GenerationSettings,
    job: ImageJob,
    reference: ImageJob | None = None,
) -> tuple[float, list[dict]]:
    """A short throwaway generation at this batch shape: the first call's one-off costs (lazy
    set-up, kernel choice, and for speed=compile the compile) land here, kept out of every
    image's seconds, so that the first job of a sweep compares fairly with the others. Free
    when this pipeline has run the shape already. Returns (seconds, the out-of-memory steps
    it took: they are the run's, to record and to undo)."""
    rows = settings.batch_size + (reference is not None)
    shape = (rows, settings.width, settings.height)
    if shape in loaded.warmed_up:
        return 0.0, []
    what = "compiling" if settings.fixed_batch else "warming up"
    log.info("%s for batch %d at %dx%d (one-off)", what, *shape)
    start = time.perf_counter()
    short = replace(settings, steps=min(settings.steps, 2))
    generator = KeyframeGenerator(loaded.pipe, short, reference)
    for batch in generator.run([job]):
        if batch[0].error:
            log.warning("warm-up failed: %s", batch[0].error)
    loaded.warmed_up.add(shape)
    seconds = time.perf_counter() - start
    log.info("%s took %.1f s", what, seconds)
    return seconds, [f | {"detail": f"{f['detail']} (warm-up)"} for f in generator.fallbacks]
