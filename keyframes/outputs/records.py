"""The manifest's records, typed: `RunInfo` (one per run) and `ImageRecord` (one per image),
the contract with the next pipeline stage. manifest.json, its journal, the PNGs' JSON and
MLflow are all written from these, and everything that reads a manifest back (resume, sync,
sweep tables, compare, merging process parts) reads these. docs/manifest.md documents every
field; tests/test_manifest_docs.py keeps the two in step.

JSON keys are the field names. Keys are only ever added: fields added after the first
manifest have defaults, so older manifests still read. Keys this version does not know (a
conditioning method's own fields, or a newer keyframes') are kept in `extra` and written back
unchanged.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import socket
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, ClassVar

from keyframes.conditioning.base import record_fields
from keyframes.pipeline.load import describe_source
from keyframes.pipeline.long_prompts import prompt_encoding

MANIFEST_VERSION = 1


class _JsonRecord:
    """Field names are the JSON keys; unknown keys round-trip through `extra`."""

    OMITTED_WHEN_NONE: ClassVar[frozenset[str]] = frozenset()
    extra: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "extra" and not (value is None and f.name in self.OMITTED_WHEN_NONE):
                out[f.name] = value
        return out | self.extra

    @classmethod
    def own_and_extra(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Keywords for the record: its own fields, and the keys it does not know in `extra`."""
        names = {f.name for f in fields(cls)} - {"extra"}
        own = {k: v for k, v in data.items() if k in names}
        return own | {"extra": {k: v for k, v in data.items() if k not in names}}

    @classmethod
    def from_json(cls, data: dict[str, Any]):
        """ValueError where a field every manifest has is missing, or data is no object."""
        if not isinstance(data, dict):
            raise ValueError(f"a {cls.__name__} is a JSON object, not {type(data).__name__}")
        try:
            return cls(**cls.own_and_extra(data))
        except TypeError as e:  # a missing required field
            raise ValueError(f"not a keyframes {cls.__name__}: {e}") from None


@dataclass(frozen=True, kw_only=True)
class ImageRecord(_JsonRecord):
    index: int
    scene_id: str
    scene_index: int
    take: int
    file: str
    status: str  # "ok" | "failed"
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    seed: int
    prompt: str
    negative_prompt: str
    prompt_tokens: int
    negative_prompt_tokens: int
    prompt_encoding: str | None = None
    description: str
    scene_prompt: str
    steps: int
    cfg_scale: float
    sampler: str
    sampler_label: str
    width: int
    height: int
    model: str
    style: str
    negative: str
    consistency: str = "none"
    consistency_reference: str | None = None
    loras: list[dict[str, Any]] = field(default_factory=list)
    embeddings: list[dict[str, Any]] = field(default_factory=list)
    upscale: dict[str, Any] | None = None
    control: dict[str, Any] | None = None
    freeu: list[float] | None = None  # [s1, s2, b1, b2] where FreeU was on
    pag: dict[str, Any] | None = None  # perturbed-attention guidance: scale, adaptive, layers
    seconds: float
    vram_peak_gb: float | None
    rss_peak_gb: float
    clip_score: float | None
    clip_score_prompt: float | None
    clip_truncated: dict[str, bool] | None
    aesthetic_score: float | None = None  # LAION aesthetic predictor, about 1-10
    guidance_interval: list[float] | None = None  # guided share of the steps; None: all
    prediction: str = "epsilon"  # what the UNet predicts: epsilon | v_prediction
    zero_snr: bool = False  # zero terminal SNR noise schedule (v-prediction models)
    guidance_rescale: float = 0.0  # rescaled classifier-free guidance; 0: plain CFG
    unet_evaluations: float | None = None  # the base UNet's, one per sample; batch share
    deepcache: list[int] | None = None  # [interval, branch] of UNet feature reuse; None: off
    unet_shallow_evaluations: float | None = None  # DeepCache: shallow branch only
    tflops: float | None = None  # TFLOP spent, counted from the evaluations made
    scene_extra: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(kw_only=True)
class RunInfo(_JsonRecord):
    """Filled in as the run goes: status, timings, fallbacks, then summary and finished_at."""

    OMITTED_WHEN_NONE: ClassVar[frozenset[str]] = frozenset(
        {"finished_at", "summary", "processes", "error", "replaces_run_key", "mlflow"}
    )
    title: str
    shotlist: str
    shotlist_sha256: str
    shotlist_extra: dict[str, Any]
    characters: dict[str, str]
    config_hash: str
    model: str
    model_source: str
    model_family: str | None = None
    model_fit: list[str] = field(default_factory=list)
    style: str
    style_template: str
    negative: str
    loras: list[dict[str, Any]] = field(default_factory=list)
    embeddings: list[dict[str, Any]] = field(default_factory=list)
    sampler: str
    quality: str
    scorer: str | None
    device: str
    dtype: str
    memory: dict[str, Any] | None = None
    versions: dict[str, str]
    overrides: list[str]
    command: str
    started_at: str
    experiment: str | None = None
    sweep: dict[str, Any] | None = None
    git_commit: str | None = None
    host: str | None = None
    pid: int | None = None
    run_key: str | None = None
    status: str = "finished"  # manifests older than the status field were written at the end
    pipeline_cache: str | None = None
    speed: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    fallbacks: list[dict[str, Any]] = field(default_factory=list)
    processes: int | None = None
    error: str | None = None
    replaces_run_key: str | None = None
    finished_at: str | None = None
    summary: dict[str, float] | None = None
    mlflow: dict[str, str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mlflow_run_id(self) -> str | None:
        return (self.mlflow or {}).get("run_id")


@dataclass
class Manifest:
    run: RunInfo
    images: list[ImageRecord]
    version: int = MANIFEST_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "run": self.run.to_json(),
            "images": [r.to_json() for r in self.images],
        }

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        if not isinstance(data, dict) or "run" not in data or "images" not in data:
            raise ValueError("not a keyframes manifest: no run and images")
        return cls(
            RunInfo.from_json(data["run"]),
            [ImageRecord.from_json(r) for r in data["images"]],
            data.get("version", MANIFEST_VERSION),
        )


def image_record(
    plan,
    g,
    scores: tuple,
    tokens: dict[str, int],
    scene_extra: dict[str, Any],
    methods: list,
    planned,
) -> ImageRecord:
    """One image's record (g: a generation.Generation; scores: its two CLIP TextScores and
    its aesthetic score; planned: its job as planned, with the conditioning methods' inputs)."""
    cfg, job = plan.config, g.job
    longest = max(tokens[job.prompt], tokens[job.negative_prompt])
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
        prompt_encoding=prompt_encoding(longest, cfg.long_prompts),
        description=job.description,
        scene_prompt=job.scene_prompt,
        **_settings_fields(plan),
        **_measured_fields(g, scores),
        scene_extra=scene_extra,  # fields the shotlist format does not know, passed on
        **ImageRecord.own_and_extra(record_fields(methods, planned)),  # consistency, loras...
    )


def _settings_fields(plan) -> dict[str, Any]:
    """What an image's settings were, from the plan."""
    cfg = plan.config
    return {
        "steps": cfg.steps,
        "cfg_scale": cfg.cfg_scale,
        "sampler": cfg.sampler.name,
        "sampler_label": cfg.sampler.label,
        "width": plan.width,
        "height": plan.height,
        "model": cfg.model.name,
        "style": cfg.style.name,
        "negative": cfg.negative.name,
        "guidance_interval": list(cfg.guidance_interval) if cfg.guidance_interval else None,
        "prediction": cfg.model.prediction,
        "zero_snr": bool(cfg.model.zero_snr),
        "guidance_rescale": cfg.guidance_rescale or 0.0,
        "deepcache": list(cfg.speed.deepcache) if cfg.speed.deepcache else None,
    }


def _measured_fields(g, scores: tuple) -> dict[str, Any]:
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


def run_info(ctx, session) -> RunInfo:
    """The run's record as it starts (ctx: a generation.render.RunContext; session: its set-up
    generation.session.Session)."""
    cfg, scorer, loaded = ctx.plan.config, session.scorer, session.loaded
    command = "uv run python -m keyframes.run " + " ".join(map(shlex.quote, ctx.overrides))
    # keywords, not a dict: a misspelt field fails here instead of landing in `extra`
    return RunInfo(
        title=ctx.shotlist.title,
        shotlist=ctx.shotlist.path,
        shotlist_sha256=ctx.shotlist.sha256,
        shotlist_extra=ctx.shotlist.extra,
        characters={c.name: c.description for c in ctx.shotlist.characters.values()},
        config_hash=ctx.plan.config_hash,
        model=cfg.model.name,
        model_source=describe_source(cfg.model),
        model_family=cfg.model.family,
        model_fit=list(ctx.plan.model_fit),
        style=cfg.style.name,
        style_template=cfg.style.prompt,
        negative=cfg.negative.name,
        sampler=cfg.sampler.name,
        quality=cfg.quality.name,
        scorer=scorer.name if scorer else None,
        device=ctx.placement.device,
        dtype=str(ctx.placement.dtype).removeprefix("torch."),
        memory=ctx.memory.as_record(),
        versions=ctx.versions,
        overrides=ctx.overrides,
        command=command,
        started_at=iso(ctx.started),
        experiment=ctx.experiment,
        sweep=ctx.sweep,
        git_commit=ctx.git_commit,
        host=socket.gethostname(),  # where it ran: sweeps may spread over machines
        pid=os.getpid(),
        run_key=run_key(ctx),
        status="running",
        pipeline_cache="hit" if session.cache_hit else "miss",
        speed={"preset": cfg.speed.name, **loaded.speed},
        timings=dict(session.timings),
        **RunInfo.own_and_extra({k: v for m in ctx.methods for k, v in m.run_record().items()}),
    )


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def run_key(ctx) -> str:
    """Names this run in MLflow, so logging the same run directory twice changes nothing."""
    return derive_run_key(ctx.plan.config_hash, ctx.shotlist.sha256, ctx.started, ctx.run_dir)


def derive_run_key(config_hash: str, shotlist_sha256: str, started, run_dir) -> str:
    """A run key from what made the run, when it began and where (also for a manifest of an
    earlier version, written before keys were recorded)."""
    text = f"{config_hash}:{shotlist_sha256}:{started}:{run_dir.resolve()}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]
