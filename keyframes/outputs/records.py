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
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

MANIFEST_VERSION = 1


class _JsonRecord:
    """Field names are the JSON keys; unknown keys round-trip through `extra`."""

    OMITTED_WHEN_NONE: ClassVar[frozenset[str]] = frozenset()
    NESTED: ClassVar[dict[str, type[_JsonRecord]]] = {}  # fields that are records themselves
    extra: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "extra" and not (value is None and f.name in self.OMITTED_WHEN_NONE):
                out[f.name] = value.to_json() if isinstance(value, _JsonRecord) else value
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
        own = cls.own_and_extra(data)
        for name, record in cls.NESTED.items():
            if own.get(name) is not None:
                own[name] = record.from_json(own[name])
        try:
            return cls(**own)
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
    # per character of its scene: CLIP image similarity x 100 to the character's other
    # keyframes ("others") and to its reference image ("reference"), measured at the end
    character_similarity: dict[str, dict[str, float]] | None = None
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
class MemoryRecord(_JsonRecord):
    """The memory mode a run asked for, the one it got and why."""

    requested: str
    mode: str
    reason: str
    free_vram_gb: float | None = None
    estimate_gb: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class SpeedRecord(_JsonRecord):
    """The speed preset and what of it was applied (only what was)."""

    OMITTED_WHEN_NONE: ClassVar[frozenset[str]] = frozenset(
        {"attention", "fuse_qkv", "channels_last", "tf32", "compile", "compile_mode", "skipped"}
    )
    preset: str
    attention: str | None = None
    fuse_qkv: bool | None = None
    channels_last: bool | None = None
    tf32: bool | None = None
    compile: str | None = None
    compile_mode: str | None = None
    skipped: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class SweepRecord(_JsonRecord):
    """A sweep job's place in its sweep."""

    parent_run_id: str | None = None  # None when the store was unreachable as it began
    experiment: str | None = None
    sweep_dir: str
    job_num: int
    swept_keys: list[str] = field(default_factory=list)  # absent in older manifests
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class RunInfo(_JsonRecord):
    """Filled in as the run goes: status, timings, fallbacks, then summary and finished_at."""

    OMITTED_WHEN_NONE: ClassVar[frozenset[str]] = frozenset(
        {"finished_at", "summary", "processes", "error", "replaces_run_key", "mlflow"}
    )
    NESTED: ClassVar[dict[str, type[_JsonRecord]]] = {
        "memory": MemoryRecord,
        "speed": SpeedRecord,
        "sweep": SweepRecord,
    }
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
    memory: MemoryRecord | None = None
    versions: dict[str, str]
    overrides: list[str]
    command: str
    started_at: str
    experiment: str | None = None
    sweep: SweepRecord | None = None
    git_commit: str | None = None
    host: str | None = None
    pid: int | None = None
    run_key: str | None = None
    status: str = "finished"  # manifests older than the status field were written at the end
    pipeline_cache: str | None = None
    speed: SpeedRecord | None = None
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


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def derive_run_key(
    config_hash: str, shotlist_sha256: str, started: float | str, run_dir: Path
) -> str:
    """A run key from what made the run, when it began and where (also for a manifest of an
    earlier version, written before keys were recorded)."""
    text = f"{config_hash}:{shotlist_sha256}:{started}:{run_dir.resolve()}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]
