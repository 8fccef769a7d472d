"""The manifest: manifest.json and its journal, written as a run goes and read back.

Files are written to a temporary name and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from keyframes.conditioning.base import record_fields
from keyframes.pipeline.load import describe_source
from keyframes.pipeline.long_prompts import prompt_encoding

MANIFEST_VERSION = 1


def write_manifest(
    run_dir: Path, run: dict[str, Any], images: list[dict[str, Any]], name: str = "manifest.json"
) -> Path:
    """The whole manifest; its journal (see ManifestWriter) is then redundant and removed."""
    path = run_dir / name
    doc = {"version": MANIFEST_VERSION, "run": run, "images": images}
    text = json.dumps(doc, indent=2, ensure_ascii=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))
    journal_of(path).unlink(missing_ok=True)
    return path


def journal_of(manifest: Path) -> Path:
    """manifest.json -> manifest.journal.jsonl: the image records written since the last
    full manifest, one JSON line each."""
    return manifest.with_suffix(".journal.jsonl")


class ManifestWriter:
    """Keeps a growing run's bookkeeping linear in its images. After each batch its records
    are appended to the journal; the manifest itself is rewritten (and the journal dropped)
    only when the run's image count has doubled since the last full write, and whenever the
    caller asks (start, end, any stop). A kill between two full writes loses nothing:
    load_manifest reads the journal too."""

    def __init__(self, path: Path):
        self.path = path
        self.full_at = 0  # images in the last full write

    def due(self, images: int) -> bool:
        return images >= 2 * max(self.full_at, 1)

    def full(self, run: dict[str, Any], images: list[dict[str, Any]]) -> None:
        write_manifest(self.path.parent, run, images, self.path.name)
        self.full_at = len(images)

    def append(self, records: list[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with open(journal_of(self.path), "a", encoding="utf-8") as f:
            f.write(lines)


def load_manifest(path: Path) -> dict[str, Any]:
    """A manifest with the records of its journal added (a record there replaces the one with
    the same file). A journal line cut off by a kill is skipped. Raises OSError or ValueError
    where there is no readable manifest."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    journal = journal_of(path)
    if not journal.is_file():
        return doc
    images = {r["file"]: r for r in doc["images"]}
    for line in journal.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        images[record["file"]] = record
    return {**doc, "images": sorted(images.values(), key=lambda r: r["index"])}


def atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk, an interrupt: no half-written temp file stays behind
        tmp.unlink(missing_ok=True)
        raise


def image_record(plan, g, scores: tuple, tokens: dict[str, int], scene_extra: dict[str, Any],
                 methods: list, planned) -> dict[str, Any]:  # fmt: skip
    """One manifest entry (g: a generation.Generation; scores: its two CLIP TextScores;
    planned: its job as planned). The key set is the contract with the next stage: keep it
    stable, and docs/manifest.md with it."""
    cfg, job = plan.config, g.job
    conditioning = record_fields(methods, planned)
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
        "width": plan.width,
        "height": plan.height,
        "model": cfg.model.name,
        "style": cfg.style.name,
        "negative": cfg.negative.name,
        "consistency": conditioning.pop("consistency"),
        "consistency_reference": conditioning.pop("consistency_reference"),
        "loras": conditioning.pop("loras"),  # [{name, path, scale, sha256}]
        "upscale": conditioning.pop("upscale"),
        "control": conditioning.pop("control"),
        **conditioning,  # a method's own fields
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


def run_info(ctx, session) -> dict[str, Any]:
    """The manifest's run record (ctx: a generation.render.RunContext; session: its set-up
    generation.session.Session)."""
    cfg, scorer, loaded = ctx.plan.config, session.scorer, session.loaded
    return {
        "title": ctx.shotlist.title,
        "shotlist": ctx.shotlist.path,
        "shotlist_sha256": ctx.shotlist.sha256,
        "shotlist_extra": ctx.shotlist.extra,
        "characters": {c.name: c.description for c in ctx.shotlist.characters.values()},
        "config_hash": ctx.plan.config_hash,
        "model": cfg.model.name,
        "model_source": describe_source(cfg.model),
        "model_family": cfg.model.family,
        "model_fit": list(ctx.plan.model_fit),
        "style": cfg.style.name,
        "style_template": cfg.style.prompt,
        "negative": cfg.negative.name,
        "loras": [],
        "sampler": cfg.sampler.name,
        "quality": cfg.quality.name,
        "scorer": scorer.name if scorer else None,
        "device": ctx.placement.device,
        "dtype": str(ctx.placement.dtype).removeprefix("torch."),
        "memory": ctx.memory.as_record(),
        "versions": ctx.versions,
        "overrides": ctx.overrides,
        "command": "uv run python -m keyframes.run " + " ".join(map(shlex.quote, ctx.overrides)),
        "started_at": iso(ctx.started),
        "experiment": ctx.experiment,
        "sweep": ctx.sweep,
        "git_commit": ctx.git_commit,
        "host": socket.gethostname(),  # where it ran: sweeps may spread over machines
        "pid": os.getpid(),
        "run_key": run_key(ctx),
        "status": "running",
        "pipeline_cache": "hit" if session.cache_hit else "miss",
        "speed": {"preset": cfg.speed.name, **loaded.speed},
        "timings": dict(session.timings),
    } | {k: v for m in ctx.methods for k, v in m.run_record().items()}


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def run_key(ctx) -> str:
    """Names this run in MLflow, so logging the same run directory twice changes nothing."""
    text = f"{ctx.plan.config_hash}:{ctx.shotlist.sha256}:{ctx.started}:{ctx.run_dir.resolve()}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]
