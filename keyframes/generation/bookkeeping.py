"""Each batch as it finishes: scored, recorded (the image record filled by keyword from the
plan's settings, the generation and the methods' fields), saved as a PNG carrying its recipe,
and added to the manifest's journal (see outputs.manifest.ManifestWriter), so a crash keeps
everything already made."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from keyframes.conditioning.base import Method, record_fields
from keyframes.generation.generator import Generation
from keyframes.outputs.manifest import ManifestWriter
from keyframes.outputs.png import save_png
from keyframes.outputs.processes import Processes
from keyframes.outputs.records import ImageRecord, RunInfo
from keyframes.pipeline.long_prompts import prompt_encoding
from keyframes.scoring.clip import ClipScorer
from keyframes.shotlist.jobs import ImageJob
from keyframes.shotlist.load import Scene
from keyframes.shotlist.weighting import plain_text


@dataclass(frozen=True)
class RecordInputs:
    """What every image record of a run takes besides its generation."""

    settings: dict[str, Any]  # the plan's ImageRecord fields (steps, sampler, size, ...)
    long_prompts: str
    prompt_weighting: str
    planned: list[ImageJob]  # every job as planned, with the methods' per-job inputs
    methods: list[Method]
    scenes: dict[str, Scene]
    tokens: dict[str, int]  # CLIP tokens of every prompt the run uses


class Bookkeeping:
    """Scores, records and saves each batch as it arrives; keeps the manifest current.
    `records`: the images already done (resume), by job index; `run`: the run's record, whose
    timings and fallbacks it keeps up to date."""

    def __init__(
        self,
        run_dir: Path,
        run: RunInfo,
        inputs: RecordInputs,
        scorer: ClipScorer | None,
        processes: Processes,
        records: dict[int, ImageRecord],
    ):
        self.run_dir, self.run, self.inputs, self.scorer = run_dir, run, inputs, scorer
        self.processes = processes
        self.records = dict(records)
        self.done = len(records)
        # several processes: each keeps its own part; the main process merges them at the end
        name = "manifest.json" if processes.count == 1 else processes.part_name()
        self.manifest = ManifestWriter(run_dir / name)
        self.seconds = 0.0

    @property
    def images(self) -> list[ImageRecord]:
        return [self.records[i] for i in sorted(self.records)]

    def write_now(self, fallbacks: list[dict]) -> None:
        self.run.fallbacks = fallbacks
        self.manifest.full(self.run, self.images)

    def run_all(self, batches: Iterable[list[Generation]], total: int) -> None:
        procs, single = self.processes, self.processes.count == 1
        with (
            logging_redirect_tqdm(),
            tqdm(
                total=total if single else None,  # a share: its size shows as it goes
                initial=self.done if single else 0,
                unit="image",
                desc="keyframes" if single else f"keyframes, process 1 of {procs.count}",
                disable=not procs.main,  # one bar on the terminal
            ) as bar,
        ):
            for batch in batches:
                self.add(batch)
                bar.update(len(batch))

    def add(self, batch: list[Generation]) -> None:
        start, made = time.perf_counter(), []
        scored = score_batch(self.scorer, batch, self.inputs.prompt_weighting)
        for generation, scores in zip(batch, scored, strict=True):
            record = image_record(generation, scores, self.inputs)
            if generation.image is not None:
                scene = self.inputs.scenes.get(generation.job.scene_id)
                provenance = {
                    "record": record.to_json(),
                    "scene": asdict(scene) if scene else {"id": record.scene_id},
                    # the run as it stands, less its status: "running" would be false tomorrow
                    "run": {k: v for k, v in self.run.to_json().items() if k != "status"},
                }
                save_png(generation.image, self.run_dir / record.file, record, provenance)
            self.records[generation.job.index] = record
            made.append(record)
        if self.manifest.due(len(self.records)):
            self.manifest.full(self.run, self.images)
        else:
            self.manifest.append(made)
        self.seconds += time.perf_counter() - start  # scoring, PNGs, manifest
        self.run.timings["bookkeeping_seconds"] = round(self.seconds, 3)


def image_record(g: Generation, scores: tuple, inputs: RecordInputs) -> ImageRecord:
    """One image's record (scores: its two CLIP TextScores and its aesthetic score)."""
    job, tokens = g.job, inputs.tokens
    longest = max(tokens[job.prompt], tokens[job.negative_prompt])
    planned = inputs.planned[job.index]  # the same record when a run is resumed
    # keywords, not a dict: a misspelt field fails here instead of landing in `extra`
    return ImageRecord(
        index=job.index,
        scene_id=job.scene_id,
        scene_index=job.scene_index,
        take=job.take,
        file=job.file,
        status="ok" if g.image is not None else "failed",
        error=g.error,
        notes=g.notes,
        seed=job.seed,
        prompt=job.prompt,
        negative_prompt=job.negative_prompt,
        prompt_tokens=tokens[job.prompt],  # over 77: see prompt_encoding
        negative_prompt_tokens=tokens[job.negative_prompt],
        prompt_encoding=prompt_encoding(longest, inputs.long_prompts),
        description=job.description,
        scene_prompt=job.scene_prompt,
        **inputs.settings,
        **_measured_fields(g, scores),
        # fields the format does not know (a method's own job, e.g. a portrait, has no scene)
        scene_extra=scene.extra if (scene := inputs.scenes.get(job.scene_id)) else {},
        **ImageRecord.own_and_extra(record_fields(inputs.methods, planned)),  # loras...
    )


def _measured_fields(g: Generation, scores: tuple) -> dict[str, Any]:
    """What making the image took and how it scored."""
    asked, styled, aesthetic = scores
    return {
        "seconds": round(g.seconds, 4),
        "vram_peak_gb": _rounded(g.vram_peak_gb, 3),
        "rss_peak_gb": round(g.rss_peak_gb, 3),
        "clip_score": None if asked is None else round(asked.score, 4),
        "clip_score_prompt": None if styled is None else round(styled.score, 4),
        "clip_truncated": None
        if asked is None
        else {"description": asked.truncated, "prompt": styled.truncated},
        "aesthetic_score": _rounded(aesthetic, 4),
        "unet_evaluations": _rounded(g.unet_evaluations, 2),
        "unet_shallow_evaluations": _rounded(g.unet_shallow_evaluations, 2),
        "tflops": None if g.tflops is None else float(f"{g.tflops:.4g}"),
    }


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def score_batch(
    scorer: ClipScorer | None, batch: list[Generation], weighting: str = "none"
) -> list[tuple]:
    """Per image: (CLIP score vs the scene description, vs the full styled prompt, aesthetic
    score); one image embedding serves all three. The prompt is scored as words: A1111's
    weighting syntax is not text to CLIP (weighting=a1111)."""
    made = [g for g in batch if g.image is not None]
    if scorer is None or not made:
        return [(None, None, None)] * len(batch)
    images = [g.image for g in made]
    asked, styled = scorer.score(
        images,
        [g.job.description for g in made],
        [plain_text(g.job.prompt) if weighting == "a1111" else g.job.prompt for g in made],
    )
    aesthetic = scorer.aesthetic(images) or [None] * len(made)
    triples = zip(asked, styled, aesthetic, strict=True)
    scores = dict(zip(map(id, made), triples, strict=True))
    return [scores.get(id(g), (None, None, None)) for g in batch]
