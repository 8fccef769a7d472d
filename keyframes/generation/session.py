"""A generation session, in the spirit of torchtune's generate recipe: `setup` loads the
pipeline and scorer once (memory and speed modes, sampler), `generate` runs jobs through the
run's conditioning methods batch by batch, and `close` (or leaving the `with` block) leaves
the process's cached pipeline exactly as it found it: methods removed, out-of-memory savers
switched off again, an offloaded pipeline dropped from the cache. So the cache key and the
recorded memory mode always describe what ran.

    with Session(models, settings, placement, memory, methods) as session:
        for batch in session.generate(todo, planned, run_dir):
            ...
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property

from keyframes.conditioning.base import Method
from keyframes.config.schema import ModelConfig, SamplerConfig, ScorerConfig, SpeedConfig
from keyframes.generation.feature_reuse import run_flops
from keyframes.generation.generator import Generation, GenerationSettings, KeyframeGenerator
from keyframes.generation.warmup import warm_up
from keyframes.outputs.processes import Processes
from keyframes.pipeline.flops import ImageFlops
from keyframes.pipeline.load import (
    LoadedPipeline,
    Placement,
    apply_sampler,
    cached_pipeline,
    describe_source,
    release_pipeline,
)
from keyframes.pipeline.memory import MemoryPlan
from keyframes.scoring.clip import ClipScorer, cached_scorer

log = logging.getLogger("keyframes")


@dataclass(frozen=True)
class SessionModels:
    """What a session loads: the model with its sampler and speed preset, and the scorer."""

    model: ModelConfig
    sampler: SamplerConfig
    speed: SpeedConfig
    scorer: ScorerConfig


@dataclass
class Session:
    models: SessionModels
    settings: GenerationSettings  # every pipeline call's numbers
    placement: Placement
    memory: MemoryPlan
    methods: list[Method] = field(default_factory=list)
    processes: Processes = field(default_factory=Processes)
    loaded: LoadedPipeline | None = None
    scorer: ClipScorer | None = None
    cache_hit: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    generators: list[KeyframeGenerator] = field(default_factory=list)
    warmup_fallbacks: list[dict] = field(default_factory=list)
    _installed: list[Method] = field(default_factory=list)

    def __enter__(self) -> Session:
        return self.setup()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pipe(self):
        return self.loaded.pipe

    @property
    def fallbacks(self) -> list[dict]:
        """Every out-of-memory step taken so far (halved batches, VAE tiling, offload), the
        warm-up's included."""
        return self.warmup_fallbacks + [f for g in self.generators for f in g.fallbacks]

    def setup(self, scorer: bool = True) -> Session:
        """The pipeline (from the process's cache when the settings match) with the run's
        sampler, and the scorer (scorer=False: none, e.g. for a benchmark)."""
        models = self.models
        start = time.perf_counter()
        self.loaded, self.cache_hit = cached_pipeline(
            models.model, self.placement, self.memory.applied, models.speed
        )
        apply_sampler(self.pipe, models.sampler, self.loaded.scheduler_config)
        self.timings["model_load_seconds"] = round(time.perf_counter() - start, 3)
        start = time.perf_counter()
        self.scorer = cached_scorer(models.scorer, self.placement.device) if scorer else None
        self.timings["scorer_load_seconds"] = round(time.perf_counter() - start, 3)
        log.info(
            "model %s (%s) %s in %.1f s%s",
            models.model.name,
            describe_source(models.model),
            "reused" if self.cache_hit else "loaded",
            self.timings["model_load_seconds"],
            f", scorer {self.scorer.name} in {self.timings['scorer_load_seconds']:.1f} s"
            if self.scorer
            else ", no scorer",
        )
        return self

    def lead(self):
        """The job every batch starts with, if a method asks for one (StyleAligned)."""
        return next((job for m in self.methods if (job := m.lead()) is not None), None)

    def warm_up(self, job) -> float:
        """A throwaway generation at this batch shape; first-call costs are timed apart."""
        seconds, self.warmup_fallbacks = warm_up(self.loaded, self.settings, job, self.lead())
        seconds = round(seconds, 3)
        self.timings["warmup_seconds"] = seconds
        if self.models.speed.compile:
            self.timings["compile_seconds"] = seconds
        return seconds

    def generate(self, todo: list, planned: list, run_dir) -> Iterator[list[Generation]]:
        """Every batch of `todo` as it finishes, in the methods' stages; between stages every
        process waits, so that what one stage made is on disk for all."""
        for method in self.methods:
            method.install(self.loaded, todo)
            self._installed.append(method)
        stages = next(
            (s for m in self.methods if len(s := m.stages(todo, planned, run_dir)) > 1), [todo]
        )
        procs, making = self.processes, {job.index for job in todo}
        for number, jobs in enumerate(stages):
            if number:
                procs.wait()
            hooks = [h for m in self.methods if (h := m.begin_stage(self.pipe, number))]
            # a stage every process makes (what it keeps is for each): the main one reports it
            everywhere = any(hook.every_process for hook in hooks)
            shard = (0, 1) if everywhere else (procs.index, procs.count)
            generator = KeyframeGenerator(self.pipe, self.settings, self.lead(), hooks, shard)
            self.generators.append(generator)
            for batch in generator.run(jobs):
                # jobs made again only for what they pass on (done, or another's) go unreported
                made = [
                    g for g in batch if g.job.index in making and (procs.main or not everywhere)
                ]
                if made:
                    yield [replace(g, tflops=self.tflops_spent(g)) for g in made]

    def tflops_spent(self, g: Generation) -> float | None:
        """TFLOP the image cost: its UNet evaluations (whole and shallow-branch), the prompts
        through the text encoders, one VAE decode, what methods add (consistent
        self-attention's extra keys); second passes are not counted."""
        if g.unet_evaluations is None or self.flops is None:
            return None
        cfg_scale, shallow = self.settings.cfg_scale, g.unet_shallow_evaluations or 0
        extra = sum(m.extra_flops(g.job, g.unet_evaluations) for m in self.methods)
        return (self.flops.spent(g.unet_evaluations, cfg_scale, shallow) + extra) / 1e12

    @cached_property
    def flops(self) -> ImageFlops | None:
        """This model's FLOPs at this size (packaged for SDXL; counted on the meta device,
        once per process, for others), with DeepCache's shallow branch where it is on."""
        size = self.settings
        try:
            return run_flops(self.pipe, size.width, size.height, size.deepcache)[0]
        except Exception as e:  # noqa: BLE001 - a count is a record, never a reason to stop
            log.warning("could not count this model's FLOPs (%s): none recorded", e)
            return None

    def close(self) -> None:
        """The cached pipeline as it was before this session: methods removed (last installed
        first), out-of-memory savers off again."""
        if self.loaded is None:
            return
        pipe = self.pipe
        while self._installed:
            self._installed.pop().remove(pipe)
        undo_memory_fallbacks(pipe, [f["action"] for f in self.fallbacks])


def undo_memory_fallbacks(pipe, actions: list[str]) -> None:
    """Out-of-memory savers switched on during this job are this job's: the next job of a
    sweep gets the pipeline in its configured memory mode. Offload hooks cannot be taken off
    cleanly, so an offloaded pipeline leaves the cache and is loaded afresh."""
    if "vae_tiling" in actions:
        pipe.vae.disable_tiling()
    if "model_cpu_offload" in actions:
        release_pipeline()
