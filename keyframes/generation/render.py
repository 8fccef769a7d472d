"""A run's keyframes: the session's generations scored, recorded and saved as each batch
finishes, then the contact sheet, summary and final manifest.

Every batch's records reach the manifest's journal as the batch finishes (see
outputs.records.ManifestWriter), so a crash keeps everything already made.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from keyframes.conditioning.base import Method, record_fields
from keyframes.config.plan import RunPlan
from keyframes.errors import DiskFull, Interrupted, is_disk_full
from keyframes.generation.generator import Generation
from keyframes.generation.session import Session
from keyframes.outputs.contact_sheet import write_contact_sheets
from keyframes.outputs.manifest import ManifestWriter, write_manifest
from keyframes.outputs.parts import merge_parts
from keyframes.outputs.png import save_png
from keyframes.outputs.processes import Processes
from keyframes.outputs.records import ImageRecord, Manifest, RunInfo, image_record, iso, run_info
from keyframes.outputs.resume import Earlier, previous_images
from keyframes.outputs.summary import summarize
from keyframes.pipeline.load import Placement
from keyframes.pipeline.long_prompts import count_tokens
from keyframes.pipeline.memory import MemoryPlan
from keyframes.scoring.clip import ClipScorer
from keyframes.scoring.consistency import consistency_of
from keyframes.shotlist.jobs import ImageJob
from keyframes.shotlist.load import Shotlist
from keyframes.shotlist.weighting import plain_text

log = logging.getLogger("keyframes")


@dataclass
class RunContext:
    plan: RunPlan
    shotlist: Shotlist
    jobs: list[ImageJob]  # as planned, with the methods' per-job inputs
    methods: list[Method]
    placement: Placement
    memory: MemoryPlan
    run_dir: Path
    versions: dict[str, str]
    overrides: list[str]
    started: float  # time.time() at the start of the job
    experiment: str  # MLflow experiment name
    sweep: dict[str, Any] | None = None  # parent_run_id, sweep_dir, job_num in a sweep
    git_commit: str | None = None
    processes: Processes = field(default_factory=Processes)  # accelerate launch: the group
    earlier: Earlier | None = None  # the run this folder already holds (resume or remake)


@dataclass
class RenderResult:
    run_dir: Path
    run: RunInfo
    images: list[ImageRecord] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)

    def write_manifest(self, name: str = "manifest.json") -> Path:
        return write_manifest(self.run_dir, Manifest(self.run, self.images), name)


def render(ctx: RunContext) -> RenderResult:
    """Make every keyframe of the plan not already on disk; returns what the run made."""
    with Session(ctx.plan, ctx.placement, ctx.memory, ctx.methods, ctx.processes) as session:
        result = RenderResult(ctx.run_dir, run_info(ctx, session))
        done = previous_images(
            ctx.run_dir, ctx.jobs, ctx.earlier, result.run, lambda job: recipe(ctx, job)
        )
        todo = [job for job in ctx.jobs if job.index not in done]
        ctx.processes.wait()  # every process has read the same finished work before any adds
        if done:
            log.info(
                "resuming %s: %d of %d images already done", ctx.run_dir, len(done), len(ctx.jobs)
            )
        cfg = ctx.plan.config
        if todo and (cfg.speed.warm_up or cfg.speed.compile):
            session.warm_up(todo[0])
            result.run.timings = dict(session.timings)
        tokens = count_tokens(session.pipe, todo, cfg.long_prompts, cfg.prompt_weighting)
        book = Bookkeeping(ctx, session, result, done, tokens)
        try:
            book.run(session.generate(todo, ctx.jobs, ctx.run_dir))
        except KeyboardInterrupt:
            result.run.status = "interrupted"
            book.write_now()
            if ctx.processes.main:  # what every process has finished; resume reads parts too
                merge_parts(ctx.run_dir, ctx.processes, result)
                finish(ctx, result, session.scorer)
            raise Interrupted(result) from None
        except OSError as e:
            if not is_disk_full(e):
                raise
            raise disk_full(ctx, result, book, e) from None
        book.write_now()
    return conclude(ctx, result, session.scorer)


class Bookkeeping:
    """Scores, records and saves each batch as it arrives; keeps the manifest current."""

    def __init__(self, ctx, session: Session, result: RenderResult, done, tokens):
        procs = ctx.processes
        self.ctx, self.session, self.result, self.tokens = ctx, session, result, tokens
        self.records = dict(done)
        self.done = len(done)
        # several processes: each keeps its own part; the main process merges them at the end
        name = "manifest.json" if procs.count == 1 else procs.part_name()
        self.manifest = ManifestWriter(ctx.run_dir / name)
        self.scenes = {scene.id: scene for scene in ctx.shotlist.scenes}
        self.seconds = 0.0
        self.write_now()  # from the start, the folder says what it is

    def write_now(self) -> None:
        self.result.images = [self.records[i] for i in sorted(self.records)]
        self.result.run.fallbacks = self.session.fallbacks
        self.manifest.full(self.result.run, self.result.images)

    def run(self, batches) -> None:
        procs, single = self.ctx.processes, self.ctx.processes.count == 1
        with (
            logging_redirect_tqdm(),
            tqdm(
                total=len(self.ctx.jobs) if single else None,  # a share: its size shows as it goes
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
        ctx, start, made = self.ctx, time.perf_counter(), []
        weighting = self.ctx.plan.config.prompt_weighting
        scored = score_batch(self.session.scorer, batch, weighting)
        for generation, scores in zip(batch, scored, strict=True):
            scene = self.scenes[generation.job.scene_id]
            planned = ctx.jobs[generation.job.index]  # the same record when a run is resumed
            record = image_record(
                ctx.plan, generation, scores, self.tokens, scene.extra, ctx.methods, planned
            )
            if generation.image is not None:
                provenance = {
                    "record": record.to_json(),
                    "scene": asdict(scene),
                    "run": self.result.run.to_json(),
                }
                save_png(generation.image, ctx.run_dir / record.file, record, provenance)
            self.records[generation.job.index] = record
            made.append(record)
        if self.manifest.due(len(self.records)):
            self.write_now()
        else:
            self.manifest.append(made)
        self.seconds += time.perf_counter() - start  # scoring, PNGs, manifest
        self.result.run.timings["bookkeeping_seconds"] = round(self.seconds, 3)


def conclude(ctx: RunContext, result: RenderResult, scorer) -> RenderResult:
    """After every process has written its part: the main process merges and finishes."""
    ctx.processes.wait()  # every part is written
    if not ctx.processes.main:
        return result
    merge_parts(ctx.run_dir, ctx.processes, result)
    failed = [r for r in result.images if not r.ok]
    result.run.status = "failed" if failed else "finished"
    finish(ctx, result, scorer)
    log.info(
        "%d keyframes in %s (%.2f s/image)%s",
        len(result.images) - len(failed),
        ctx.run_dir,
        result.summary.get("seconds_per_image_mean") or 0.0,
        f"; {len(failed)} failed" if failed else "",
    )
    return result


def disk_full(ctx: RunContext, result: RenderResult, book: Bookkeeping, error: OSError):
    """What a full disk leaves: the manifest with every keyframe on disk, status failed (the
    small manifest fits where the half-written PNG was), summary for MLflow, no contact sheet;
    and an estimate of the space the rest needs."""
    logging.raiseExceptions = False  # run.log cannot grow either: no traceback per log line
    result.run.status = "failed"
    result.run.error = f"disk full: {error.filename or ctx.run_dir}"
    try:
        book.write_now()
        if ctx.processes.main:
            merge_parts(ctx.run_dir, ctx.processes, result)
            finish(ctx, result, sheets=False)
    except OSError as again:  # not even that: the last manifest written stays as it was
        log.error("could not record the stop in the manifest either (%s)", again)
    pngs = [ctx.run_dir / r.file for r in book.records.values() if r.ok]
    sizes = [p.stat().st_size for p in pngs if p.is_file()]
    per_image = sum(sizes) / len(sizes) if sizes else ctx.plan.width * ctx.plan.height * 3
    left = len(ctx.jobs) - len(sizes)
    needed = int(per_image * left * 1.1)  # + manifest and contact sheet
    return DiskFull(result, str(error.filename or ctx.run_dir), needed, left)


def finish(
    ctx: RunContext, result: RenderResult, scorer: ClipScorer | None = None, sheets: bool = True
) -> None:
    """Contact sheet, summary and the final manifest, for whatever images exist."""
    cfg, timings = ctx.plan.config, result.run.timings
    if sheets and result.images:
        title = f"{ctx.shotlist.title} · {cfg.style.name} · {cfg.model.name}"
        write_contact_sheets(ctx.run_dir, result.images, title, ctx.plan.width, ctx.plan.height)
    result.summary = summarize(
        result.images, timings["model_load_seconds"], time.time() - ctx.started
    )
    if scorer is not None:
        made = [(ctx.run_dir / r.file, r.scene_id) for r in result.images if r.ok]
        result.summary |= consistency_of(made, scorer)
    for key in ("warmup_seconds", "compile_seconds"):
        if key in timings:
            result.summary[key] = timings[key]
    result.run.finished_at = iso(time.time())
    result.run.summary = result.summary
    result.write_manifest()


def recipe(ctx: RunContext, job: ImageJob) -> dict[str, Any]:
    """What must match for an image on disk to count as done when a run is resumed."""
    cfg = ctx.plan.config
    fields = record_fields(ctx.methods, ctx.jobs[job.index])
    return {
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "seed": job.seed,
        "steps": cfg.steps,
        "cfg_scale": cfg.cfg_scale,
        "sampler": cfg.sampler.name,
        "width": ctx.plan.width,
        "height": ctx.plan.height,
        "model": cfg.model.name,
        **fields,
    }


def score_batch(scorer: ClipScorer | None, batch: list[Generation], weighting: str = "none"):
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
