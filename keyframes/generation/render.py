"""Load the models once, then generate, score and save every image as its batch finishes.

Every batch's records reach the manifest's journal as the batch finishes (see
records.ManifestWriter), so a crash keeps everything already made.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shlex
import socket
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from keyframes.conditioning.controlnet import Control, load_controlnet
from keyframes.conditioning.ip_adapter import load_adapter
from keyframes.conditioning.loras import apply_loras, prompt_tags, remove_loras
from keyframes.conditioning.style_aligned import share_attention
from keyframes.conditioning.upscale import Hires, Refiner, load_refiner, refiner_source
from keyframes.config.schema import Config, upscaled_size
from keyframes.errors import DiskFull, Interrupted, is_disk_full
from keyframes.generation.generator import Generation, GenerationSettings, KeyframeGenerator
from keyframes.outputs.processes import PART_GLOB, Processes, manifest_paths
from keyframes.outputs.records import (
    SHEET_PAGE,
    ManifestWriter,
    contact_sheet,
    journal_of,
    load_font,
    load_manifest,
    save_contact_sheet,
    save_png,
    sheet_name,
    write_manifest,
)
from keyframes.outputs.resume import Earlier
from keyframes.pipeline.load import (
    LoadedPipeline,
    Placement,
    apply_sampler,
    cached_pipeline,
    describe_source,
    prompt_tokens,
    release_pipeline,
)
from keyframes.pipeline.long_prompts import chunk_count
from keyframes.pipeline.memory import MemoryPlan
from keyframes.scoring.clip import ClipScorer, TextScore, cached_scorer, style_consistency
from keyframes.shotlist.jobs import ImageJob
from keyframes.shotlist.load import Shotlist

log = logging.getLogger("keyframes")

THUMB_WIDTH = 384  # contact sheet cell width
CLIP_TOKENS = 77


@dataclass
class RunContext:
    cfg: Config
    shotlist: Shotlist
    jobs: list[ImageJob]
    reference: ImageJob | None  # consistency=style_aligned: the image all others align to
    loras: list[dict]  # lora_records(cfg.loras): name, path, scale, file hash
    model_fit: list[str]  # settings changed to fit a distilled model, as warned
    placement: Placement
    memory: MemoryPlan
    width: int
    height: int
    run_dir: Path
    config_hash: str
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
    manifest_run: dict[str, Any]
    images: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)

    def write_manifest(self, name: str = "manifest.json") -> Path:
        return write_manifest(self.run_dir, self.manifest_run, self.images, name)


def render(ctx: RunContext) -> RenderResult:
    cfg = ctx.cfg
    start = time.perf_counter()
    loaded, hit = cached_pipeline(cfg.model, ctx.placement, ctx.memory.mode, cfg.speed)
    pipe = loaded.pipe
    apply_sampler(pipe, cfg.sampler, loaded.scheduler_config)
    model_load_seconds = time.perf_counter() - start

    start = time.perf_counter()
    scorer = cached_scorer(cfg.scorer, ctx.placement.device)
    scorer_load_seconds = time.perf_counter() - start
    log.info(
        "model %s (%s) %s in %.1f s%s",
        cfg.model.name, describe_source(cfg.model), "reused" if hit else "loaded",
        model_load_seconds,
        f", scorer {scorer.name} in {scorer_load_seconds:.1f} s" if scorer else ", no scorer",
    )  # fmt: skip

    result = RenderResult(ctx.run_dir, manifest_run=run_info(ctx, scorer))
    result.manifest_run["pipeline_cache"] = "hit" if hit else "miss"
    result.manifest_run["speed"] = {"preset": cfg.speed.name, **loaded.speed}
    result.manifest_run["timings"] = {
        "model_load_seconds": round(model_load_seconds, 3),
        "scorer_load_seconds": round(scorer_load_seconds, 3),
    }
    done = previous_images(ctx, result)  # resume: job index -> record already on disk
    todo = [job for job in ctx.jobs if job.index not in done]
    procs = ctx.processes
    single = procs.count == 1
    procs.wait()  # every process has read the same finished work before any adds to it
    if done:
        log.info("resuming %s: %d of %d images already done", ctx.run_dir, len(done), len(ctx.jobs))
    settings = GenerationSettings(
        steps=cfg.steps,
        cfg_scale=cfg.cfg_scale,
        width=ctx.width,
        height=ctx.height,
        batch_size=cfg.batch_size,
        fixed_batch=cfg.speed.compile,
        long_prompts=cfg.long_prompts,
    )
    if todo and (cfg.speed.warm_up or cfg.speed.compile):  # first-call costs: timed apart
        seconds = round(warm_up(loaded, settings, todo[0], ctx.reference), 3)
        result.manifest_run["timings"]["warmup_seconds"] = seconds
        if cfg.speed.compile:
            result.manifest_run["timings"]["compile_seconds"] = seconds
    controlnet = None
    if cfg.controlnet.type and any(job.control for job in todo):
        controlnet = load_controlnet(cfg.controlnet, pipe.unet, pipe.unet.dtype).to(pipe.device)
    refiner = None
    if cfg.upscale.name == "refiner":
        refiner = Refiner(cached_refiner(loaded, cfg.upscale, ctx), cfg.upscale, cfg.long_prompts)
    generators: list[KeyframeGenerator] = []

    def make_generator(ip_adapter: bool = False) -> KeyframeGenerator:
        # made per stage: from_pipe copies the components there are at that moment
        hires = Hires(pipe, cfg.upscale) if cfg.upscale.name == "hires" else None
        control = None
        if controlnet is not None:
            control = Control(pipe, controlnet, cfg.controlnet, ctx.width, ctx.height)
        generators.append(KeyframeGenerator(
            pipe, settings, ctx.reference, hires, refiner, control, ip_adapter=ip_adapter,
            shard=(procs.index, procs.count),
        ))  # fmt: skip
        return generators[-1]

    adapter_loaded = False

    def generate_all():
        """All batches; under ip_adapter the first keyframe, if it is everyone's reference,
        is made before the adapter loads."""
        nonlocal adapter_loaded
        if cfg.consistency.name != "ip_adapter":
            yield from make_generator().run(todo)
            return
        first = ctx.jobs[0]
        plain = [j for j in todo if j.index == first.index and j.reference is None]
        yield from make_generator().run(plain)
        procs.wait()  # the first keyframe is on disk for every process to use
        load_adapter(pipe, cfg.consistency)
        adapter_loaded = True
        fallback = str(ctx.run_dir / first.file)
        rest = [replace(j, reference=j.reference or fallback) for j in todo if j not in plain]
        yield from make_generator(ip_adapter=True).run(rest)

    tokens = count_tokens(pipe, todo, cfg.long_prompts)
    scenes = {scene.id: scene for scene in ctx.shotlist.scenes}
    records = dict(done)
    # several processes: each keeps its own part; the main process merges them at the end
    manifest = ManifestWriter(ctx.run_dir / ("manifest.json" if single else procs.part_name()))

    def write_manifest_now():
        result.images = [records[i] for i in sorted(records)]
        result.manifest_run["fallbacks"] = [f for g in generators for f in g.fallbacks]
        manifest.full(result.manifest_run, result.images)

    write_manifest_now()  # from the start, the folder says what it is
    bookkeeping = 0.0

    if cfg.loras:
        apply_loras(pipe, cfg.loras, cfg.fuse_loras)
        log.info("LoRA: %s%s", prompt_tags(ctx.loras), " (fused)" if cfg.fuse_loras else "")
    restore = None
    if ctx.reference is not None:
        restore, shared = share_attention(pipe.unet)
        for processor in shared:  # diffusers doubles the batch for guidance above 1
            processor.groups = 2 if cfg.cfg_scale > 1 else 1
        log.info("style_aligned: every image shares attention with %s", ctx.reference.file)
    try:
        with (
            logging_redirect_tqdm(),
            tqdm(
                total=len(ctx.jobs) if single else None,  # a share: its size shows as it goes
                initial=len(done) if single else 0,
                unit="image",
                desc="keyframes" if single else f"keyframes, process 1 of {procs.count}",
                disable=not procs.main,  # one bar on the terminal
            ) as bar,
        ):
            for batch in generate_all():
                made, start = [], time.perf_counter()
                for generation, scores in zip(batch, score_batch(scorer, batch), strict=True):
                    scene = scenes[generation.job.scene_id]
                    record = image_record(ctx, generation, scores, tokens, scene.extra)
                    if generation.image is not None:
                        provenance = {
                            "record": record,
                            "scene": asdict(scene),
                            "run": result.manifest_run,
                        }
                        save_png(generation.image, ctx.run_dir / record["file"], record, provenance)
                    records[generation.job.index] = record
                    made.append(record)
                if manifest.due(len(records)):
                    write_manifest_now()
                else:
                    manifest.append(made)
                bookkeeping += time.perf_counter() - start  # scoring, PNGs, manifest
                result.manifest_run["timings"]["bookkeeping_seconds"] = round(bookkeeping, 3)
                bar.update(len(batch))
    except KeyboardInterrupt:
        result.manifest_run["status"] = "interrupted"
        write_manifest_now()
        if procs.main:  # what every process has finished so far; resume reads the parts too
            merge_parts(ctx, result)
            finish(ctx, result, model_load_seconds, scorer)
        raise Interrupted(result) from None
    except OSError as e:
        if not is_disk_full(e):
            raise
        raise disk_full(ctx, result, records, e, model_load_seconds, write_manifest_now) from None
    finally:  # the cached pipeline serves the next job of a sweep: leave it plain
        if restore is not None:
            pipe.unet.set_attn_processor(restore)
        if cfg.loras:
            remove_loras(pipe, cfg.fuse_loras)
        if adapter_loaded:
            pipe.unload_ip_adapter()
        undo_memory_fallbacks(pipe, [f["action"] for g in generators for f in g.fallbacks])
    write_manifest_now()
    procs.wait()  # every part is written
    if not procs.main:
        return result
    merge_parts(ctx, result)
    failed = [r for r in result.images if r["status"] != "ok"]
    result.manifest_run["status"] = "failed" if failed else "finished"
    finish(ctx, result, model_load_seconds, scorer)
    log.info(
        "%d keyframes in %s (%.2f s/image)%s",
        len(result.images) - len(failed),
        ctx.run_dir,
        result.summary.get("seconds_per_image_mean") or 0.0,
        f"; {len(failed)} failed" if failed else "",
    )
    return result


def undo_memory_fallbacks(pipe, actions: list[str]) -> None:
    """Out-of-memory savers switched on during this job are this job's: the next job of a
    sweep gets the pipeline in its configured memory mode. Offload hooks cannot be taken off
    cleanly, so an offloaded pipeline leaves the cache and is loaded afresh."""
    if "vae_tiling" in actions:
        pipe.vae.disable_tiling()
    if "model_cpu_offload" in actions:
        release_pipeline()


def disk_full(ctx, result, records, error: OSError, model_load_seconds, write_manifest_now):
    """What a full disk leaves: the manifest with every keyframe on disk, status failed (the
    small manifest fits where the half-written PNG was), summary for MLflow, no contact sheet;
    and an estimate of the space the rest needs."""
    logging.raiseExceptions = False  # run.log cannot grow either: no traceback per log line
    result.manifest_run["status"] = "failed"
    result.manifest_run["error"] = f"disk full: {error.filename or ctx.run_dir}"
    try:
        write_manifest_now()
        if ctx.processes.main:
            merge_parts(ctx, result)
            finish(ctx, result, model_load_seconds, sheets=False)
    except OSError as again:  # not even that: the last manifest written stays as it was
        log.error("could not record the stop in the manifest either (%s)", again)
    pngs = [ctx.run_dir / r["file"] for r in records.values() if r["status"] == "ok"]
    sizes = [p.stat().st_size for p in pngs if p.is_file()]
    per_image = sum(sizes) / len(sizes) if sizes else ctx.width * ctx.height * 3
    left = len(ctx.jobs) - len(sizes)
    needed = int(per_image * left * 1.1)  # + manifest and contact sheet
    return DiskFull(result, str(error.filename or ctx.run_dir), needed, left)


def cached_refiner(loaded: LoadedPipeline, upscale, ctx: RunContext):
    """The SDXL refiner for this base pipeline, loaded once per process and placed like it."""
    from keyframes.pipeline.memory import apply_memory_mode

    key = (upscale.tiny, upscale.path, upscale.id, upscale.variant)
    if key not in loaded.refiners:
        start = time.perf_counter()
        refiner = load_refiner(loaded.pipe, upscale)
        loaded.refiners = {key: apply_memory_mode(refiner, ctx.memory.mode, ctx.placement.device)}
        log.info("refiner %s loaded in %.1f s", refiner_source(upscale),
                 time.perf_counter() - start)  # fmt: skip
    return loaded.refiners[key]


def merge_parts(ctx: RunContext, result: RenderResult) -> None:
    """Main process: the images and fallbacks of every process's manifest part into the run's
    manifest; the parts are removed once manifest.json holds them."""
    parts = sorted(ctx.run_dir.glob(PART_GLOB))
    if not parts:
        return
    records = {r["index"]: r for r in result.images}
    fallbacks = list(result.manifest_run.get("fallbacks", []))
    for part in parts:
        try:
            doc = load_manifest(part)
        except (OSError, ValueError, KeyError):
            log.warning("%s is unreadable; its images are left out", part)
            continue
        for record in doc["images"]:  # this process's own records win over a leftover part's
            records.setdefault(record["index"], record)
        if part.name != ctx.processes.part_name():
            fallbacks += doc["run"].get("fallbacks", [])
    result.images = [records[i] for i in sorted(records)]
    result.manifest_run["fallbacks"] = fallbacks
    result.manifest_run["processes"] = ctx.processes.count
    result.write_manifest()
    for part in parts:
        part.unlink()
        journal_of(part).unlink(missing_ok=True)


def warm_up(
    loaded: LoadedPipeline,
    settings: GenerationSettings,
    job: ImageJob,
    reference: ImageJob | None = None,
) -> float:
    """A short throwaway generation at this batch shape: the first call's one-off costs (lazy
    set-up, kernel choice, and for speed=compile the compile) land here, kept out of every
    image's seconds, so that the first job of a sweep compares fairly with the others. Free
    when this pipeline has run the shape already."""
    rows = settings.batch_size + (reference is not None)
    shape = (rows, settings.width, settings.height)
    if shape in loaded.warmed_up:
        return 0.0
    what = "compiling" if settings.fixed_batch else "warming up"
    log.info("%s for batch %d at %dx%d (one-off)", what, *shape)
    start = time.perf_counter()
    short = replace(settings, steps=min(settings.steps, 2))
    for batch in KeyframeGenerator(loaded.pipe, short, reference).run([job]):
        if batch[0].error:
            log.warning("warm-up failed: %s", batch[0].error)
    loaded.warmed_up.add(shape)
    seconds = time.perf_counter() - start
    log.info("%s took %.1f s", what, seconds)
    return seconds


def finish(
    ctx: RunContext,
    result: RenderResult,
    model_load_seconds: float,
    scorer: ClipScorer | None = None,
    sheets: bool = True,
) -> None:
    """Contact sheet, summary and the final manifest, for whatever images exist."""
    if sheets and result.images:
        title = f"{ctx.shotlist.title} · {ctx.cfg.style.name} · {ctx.cfg.model.name}"
        write_contact_sheets(ctx.run_dir, result.images, title, ctx.width, ctx.height)
    result.summary = summarize(result.images, model_load_seconds, time.time() - ctx.started)
    if scorer is not None:
        result.summary |= consistency_of(ctx.run_dir, result.images, scorer)
    for key in ("warmup_seconds", "compile_seconds"):
        if key in result.manifest_run["timings"]:
            result.summary[key] = result.manifest_run["timings"][key]
    result.manifest_run["finished_at"] = _iso(time.time())
    result.manifest_run["summary"] = result.summary
    result.write_manifest()


def write_contact_sheets(
    run_dir: Path, images: list[dict[str, Any]], title: str, width: int, height: int
) -> list[Path]:
    """The contact sheet in pages of SHEET_PAGE keyframes, one page in memory at a time, so a
    run of thousands makes pictures a viewer can open (and stays under Pillow's limits)."""
    pages = math.ceil(len(images) / SHEET_PAGE)
    written = []
    for page in range(1, pages + 1):
        records = images[(page - 1) * SHEET_PAGE : page * SHEET_PAGE]
        thumbs = [_thumbnail(run_dir / r["file"], r, width, height) for r in records]
        heading = title if pages == 1 else f"{title} · page {page} of {pages}"
        sheet = contact_sheet(thumbs, [_label(r) for r in records], heading, thumbs[0].width)
        written.append(run_dir / sheet_name(page))
        save_contact_sheet(sheet, written[-1])
    for stale in run_dir.glob("contact_sheet_*.png"):  # pages of an earlier, longer make
        if stale not in written:
            stale.unlink()
    return written


def consistency_of(run_dir: Path, images: list[dict[str, Any]], scorer: ClipScorer):
    """style_consistency (across scenes) and style_consistency_takes (within a scene) of the
    run's keyframes on disk, resumed ones included."""
    ok = [r for r in images if r["status"] == "ok" and (run_dir / r["file"]).is_file()]
    features = []
    for start in range(0, len(ok), 16):
        opened = [Image.open(run_dir / r["file"]) for r in ok[start : start + 16]]
        features.append(scorer.image_features(opened))
        for image in opened:
            image.close()
    if not features:
        return {}
    figures = style_consistency(torch.cat(features), [r["scene_id"] for r in ok])
    return {k: round(v, 4) for k, v in figures.items()}


def previous_images(ctx: RunContext, result: RenderResult) -> dict[int, dict[str, Any]]:
    """Records of a manifest already in the run directory whose file exists and whose recipe
    matches the job: those images are not made again. A continued run keeps its first start
    time and key, so its MLflow run is replaced rather than doubled, also when no image was
    finished before it stopped; a remade run names the key of the run it replaces."""
    earlier = ctx.earlier
    if earlier is not None and earlier.remade:
        result.manifest_run["replaces_run_key"] = earlier.run.get("run_key")
        return {}
    if earlier is not None:
        for key in ("started_at", "run_key"):
            result.manifest_run[key] = earlier.run.get(key, result.manifest_run[key])
    old_images = {}
    for path in manifest_paths(ctx.run_dir):
        if not path.is_file():
            continue
        try:
            old = load_manifest(path)
            old_images |= {r["file"]: r for r in old["images"] if r.get("status") == "ok"}
        except (ValueError, KeyError, TypeError):
            log.warning("%s is unreadable; generating its images again", path)
    done = {}
    for job in ctx.jobs:
        record = old_images.get(job.file)
        if (
            record
            and record.get("status") == "ok"
            and (ctx.run_dir / job.file).is_file()
            and all(record.get(k) == v for k, v in _recipe(ctx, job).items())
        ):
            done[job.index] = {**record, "index": job.index}
    return done


def _recipe(ctx: RunContext, job: ImageJob) -> dict[str, Any]:
    """What must match for an image on disk to count as done when a run is resumed."""
    cfg = ctx.cfg
    return {
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "seed": job.seed,
        "steps": cfg.steps,
        "cfg_scale": cfg.cfg_scale,
        "sampler": cfg.sampler.name,
        "width": ctx.width,
        "height": ctx.height,
        "model": cfg.model.name,
        "consistency": cfg.consistency.name,
        "consistency_reference": consistency_reference(ctx, job),
        "loras": ctx.loras,
        "upscale": upscale_record(ctx),
        "control": control_record(ctx, job),
    }


def count_tokens(pipe, jobs: list[ImageJob], long_prompts: str) -> dict[str, int]:
    """Token count of every distinct prompt; one note per prompt longer than SDXL's 77."""
    counts = {}
    for job in jobs:
        for kind, text in (("prompt", job.prompt), ("negative prompt", job.negative_prompt)):
            if text in counts:
                continue
            counts[text] = prompt_tokens(pipe, text)
            if counts[text] <= CLIP_TOKENS:
                continue
            if long_prompts == "chunk":
                log.info(
                    "scene %s: %s is %d CLIP tokens; encoded in full, in %d chunks of 75",
                    job.scene_id, kind, counts[text], chunk_count(pipe, text),
                )  # fmt: skip
            else:
                log.warning(
                    "scene %s: %s is %d CLIP tokens; SDXL reads the first %d, the rest is cut "
                    "(long_prompts=chunk reads it all)",
                    job.scene_id, kind, counts[text], CLIP_TOKENS,
                )  # fmt: skip
    return counts


def prompt_encoding(tokens: int, long_prompts: str) -> str:
    """How a prompt of this many CLIP tokens (start and end included) reached the UNet."""
    if tokens <= CLIP_TOKENS:
        return "whole"
    return "chunked" if long_prompts == "chunk" else f"cut to {CLIP_TOKENS} tokens"


def score_batch(scorer: ClipScorer | None, batch: list[Generation]):
    """Per image: (score vs the scene description, score vs the full styled prompt)."""
    made = [g for g in batch if g.image is not None]
    if scorer is None or not made:
        return [(None, None)] * len(batch)
    images = [g.image for g in made]
    asked = scorer.score(images, [g.job.description for g in made])
    styled = scorer.score(images, [g.job.prompt for g in made])
    scores = dict(zip(map(id, made), zip(asked, styled, strict=True), strict=True))
    return [scores.get(id(g), (None, None)) for g in batch]


def image_record(
    ctx: RunContext,
    g: Generation,
    scores: tuple[TextScore | None, TextScore | None],
    tokens: dict[str, int],
    scene_extra: dict[str, Any],
) -> dict[str, Any]:
    """One manifest entry. The key set is the contract with the next stage: keep it stable."""
    cfg, job = ctx.cfg, g.job
    asked, styled = scores
    return {
        "index": job.index,
        "scene_id": job.scene_id,
        "scene_index": job.scene_index,
        "take": job.take,
        "file": job.file,
        "status": "ok" if g.image is not None else "failed",
        "error": g.error,
        "notes": g.notes,  # e.g. vae_fp32_redecode: NaN/Inf seen, batch decoded again in float32
        "seed": job.seed,
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "prompt_tokens": tokens[job.prompt],  # over 77: see prompt_encoding
        "negative_prompt_tokens": tokens[job.negative_prompt],
        "prompt_encoding": prompt_encoding(
            max(tokens[job.prompt], tokens[job.negative_prompt]), cfg.long_prompts
        ),
        "description": job.description,
        "scene_prompt": job.scene_prompt,
        "steps": cfg.steps,
        "cfg_scale": cfg.cfg_scale,
        "sampler": cfg.sampler.name,
        "sampler_label": cfg.sampler.label,
        "width": ctx.width,
        "height": ctx.height,
        "model": cfg.model.name,
        "style": cfg.style.name,
        "negative": cfg.negative.name,
        "consistency": cfg.consistency.name,
        "consistency_reference": consistency_reference(ctx, job),
        "loras": ctx.loras,  # [{name, path, scale, sha256}]
        "upscale": upscale_record(ctx),
        "control": control_record(ctx, job),
        "seconds": round(g.seconds, 4),
        "vram_peak_gb": None if g.vram_peak_gb is None else round(g.vram_peak_gb, 3),
        "rss_peak_gb": round(g.rss_peak_gb, 3),
        "clip_score": None if asked is None else round(asked.score, 4),
        "clip_score_prompt": None if styled is None else round(styled.score, 4),
        "clip_truncated": None
        if asked is None
        else {"description": asked.truncated, "prompt": styled.truncated},
        "scene_extra": scene_extra,  # fields the shotlist format does not know, passed through
    }


def consistency_reference(ctx: RunContext, job: ImageJob) -> str | None:
    """style_aligned: the reference keyframe's file; ip_adapter: the image prompt's path (the
    run's first keyframe where nothing else was given)."""
    job = ctx.jobs[job.index]  # as planned: the same answer when the run is resumed
    if ctx.reference is not None:
        return ctx.reference.file
    if ctx.cfg.consistency.name != "ip_adapter" or job.reference:
        return job.reference
    return None if job.index == ctx.jobs[0].index else ctx.jobs[0].file


def control_record(ctx: RunContext, job: ImageJob) -> dict[str, Any] | None:
    """The ControlNet input that steered this image (None: none did)."""
    control = ctx.cfg.controlnet
    if not (job.control and control.type):
        return None
    return {"type": job.control[0], "image": job.control[1], "controlnet": control.name,
            "scale": control.conditioning_scale}  # fmt: skip


def upscale_record(ctx: RunContext) -> dict[str, Any] | None:
    """How the generated image was enlarged (None: it was not); width/height are the output's."""
    up = ctx.cfg.upscale
    if up.name == "none":
        return None
    if up.name == "refiner":
        return {"name": "refiner", "model": refiner_source(up),
                "high_noise_frac": up.high_noise_frac,
                "width": ctx.width, "height": ctx.height}  # fmt: skip
    width, height = upscaled_size(ctx.width, ctx.height, up.factor)
    steps = up.steps or ctx.cfg.steps
    return {"name": up.name, "factor": up.factor, "strength": up.strength, "steps": steps,
            "width": width, "height": height}  # fmt: skip


def run_info(ctx: RunContext, scorer: ClipScorer | None) -> dict[str, Any]:
    cfg = ctx.cfg
    return {
        "title": ctx.shotlist.title,
        "shotlist": ctx.shotlist.path,
        "shotlist_sha256": ctx.shotlist.sha256,
        "shotlist_extra": ctx.shotlist.extra,
        "characters": {c.name: c.description for c in ctx.shotlist.characters.values()},
        "config_hash": ctx.config_hash,
        "model": cfg.model.name,
        "model_source": describe_source(cfg.model),
        "model_family": cfg.model.family,
        "model_fit": ctx.model_fit,
        "style": cfg.style.name,
        "style_template": cfg.style.prompt,
        "negative": cfg.negative.name,
        "loras": ctx.loras,
        "sampler": cfg.sampler.name,
        "quality": cfg.quality.name,
        "scorer": scorer.name if scorer else None,
        "device": ctx.placement.device,
        "dtype": str(ctx.placement.dtype).removeprefix("torch."),
        "memory": ctx.memory.as_record(),
        "versions": ctx.versions,
        "overrides": ctx.overrides,
        "command": "uv run python -m keyframes.run " + " ".join(map(shlex.quote, ctx.overrides)),
        "started_at": _iso(ctx.started),
        "experiment": ctx.experiment,
        "sweep": ctx.sweep,
        "git_commit": ctx.git_commit,
        "host": socket.gethostname(),  # where it ran: sweeps may spread over machines
        "pid": os.getpid(),
        "run_key": run_key(ctx),
        "status": "running",
    }


def run_key(ctx: RunContext) -> str:
    """Names this run in MLflow, so logging the same run directory twice changes nothing."""
    text = f"{ctx.config_hash}:{ctx.shotlist.sha256}:{ctx.started}:{ctx.run_dir.resolve()}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def summarize(images: list[dict[str, Any]], model_load_seconds: float, total: float):
    ok = [r for r in images if r["status"] == "ok"]

    def mean(key):
        values = [r[key] for r in ok if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    vram = [r["vram_peak_gb"] for r in ok if r.get("vram_peak_gb") is not None]
    clip, seconds = mean("clip_score"), mean("seconds")
    summary = {
        "images": len(ok),
        "images_failed": len(images) - len(ok),
        "clip_score_mean": clip,
        # what a sweep trades off: prompt adherence per second of generation
        "clip_score_per_second": clip / seconds if clip is not None and seconds else None,
        "clip_score_prompt_mean": mean("clip_score_prompt"),
        "seconds_per_image_mean": seconds,
        "vram_peak_gb_max": max(vram) if vram else None,  # absent on CPU, never 0
        "rss_peak_gb": max((r["rss_peak_gb"] for r in images), default=None),
        "vae_fp32_redecodes": sum("vae_fp32_redecode" in r.get("notes", []) for r in images),
        "model_load_seconds": model_load_seconds,
        "total_seconds": total,
    }
    return {k: round(v, 4) for k, v in summary.items() if v is not None}


def _thumbnail(path: Path, record: dict[str, Any], width: int, height: int) -> Image.Image:
    """The image scaled to the contact sheet's cell, or a dark cell saying why it is missing."""
    w = min(THUMB_WIDTH, width)
    h = max(1, round(w * height / width))
    if record["status"] == "ok" and path.is_file():
        with Image.open(path) as image:
            return image.convert("RGB").resize((w, h), Image.Resampling.LANCZOS)
    cell = Image.new("RGB", (w, h), (60, 20, 20))
    ImageDraw.Draw(cell).text((8, 8), "failed", fill=(255, 180, 180), font=load_font(14))
    return cell


def _label(record: dict[str, Any]) -> str:
    """Two lines, so that a 256 px thumbnail shows all of it: the scene, then seed and score."""
    label = (
        f"{record['scene_index']:02d} {record['scene_id']} t{record['take']}\nseed {record['seed']}"
    )
    if record["clip_score"] is not None:
        label += f" · CLIP {record['clip_score']:.1f}"
    return label


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")
