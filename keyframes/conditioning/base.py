"""The one interface every conditioning method implements, and the registry that finds them.

A method (StyleAligned, IP-Adapter, ControlNet, LoRAs, embeddings, the hires and refiner passes) is
one module in this package holding a `Method` subclass registered under its config group and
option name (`consistency=style_aligned` -> ("consistency", "style_aligned")). Its life in a
run, in order:

    prepare(jobs)         before anything loads: check the plan, set per-job inputs (ConfigError)
    missing_weights()     in the pre-flight pass over every weight the run needs
    install(loaded, todo) once the pipeline is loaded
    stages(todo)          the jobs in stages (IP-Adapter: the first keyframe before the rest)
    begin_stage(pipe, k)  before stage k; returns the BatchHook the generator calls per batch
    remove(pipe)          after the run, also after a failure: the cached pipeline is left plain
    record(job)           its fields of the image's manifest record (and PNG metadata)

Adding a method is a new module here (or anywhere, imported before the run) and a YAML file
in its config group: no other module changes. See the README's "Add a conditioning method".
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from keyframes.config.schema import OPTION_SCHEMAS, ModelConfig
from keyframes.errors import ConfigError
from keyframes.shotlist.jobs import JobSettings

# Config groups whose option selects a method; "none" selects none.
GROUPS = ("consistency", "controlnet", "upscale")
# Settings nodes that switch a method on (their `on` property): freeu.enabled, pag.scale > 0
SWITCHED = ("freeu", "pag")
# Settings nodes that hold files, one method each when the list is not empty
LISTED = ("loras", "embeddings")
# Every settings node a method may be chosen by, in the order methods run
METHOD_SETTINGS = (*LISTED, *SWITCHED, *GROUPS)
_REGISTRY: dict[tuple[str, str], type[Method]] = {}
_discovered = False


class BatchHook:
    """What a method adds to each pipeline call of a stage. Every hook is optional."""

    whole_groups = False  # a batch holds every job of one split key, whatever the batch size
    every_process = False  # every process makes this stage (only the main one reports it)

    def split_key(self, job) -> Hashable:
        """Jobs with different keys never share a batch (one pipeline call serves them all)."""
        return None

    def call(self, pipe, batch: list, conditioning: dict, arguments: dict) -> Any:
        """The pipeline to call for this batch (default: `pipe`). May add to `conditioning`
        (the second passes reuse it, e.g. an image prompt) or to `arguments` (this call only)."""
        return pipe

    def after_latents(self, latents, batch: list, inputs: dict):
        """Latents of the first pass -> latents to decode (e.g. the refiner finishes them)."""
        return latents

    def second_pass(self, pixels, batch: list, inputs: dict):
        """Decoded first-pass images -> latents of a second pass to decode instead, or None."""
        return None


@dataclass(frozen=True)
class MethodContext:
    """What a method may know of the run beyond its own settings (the recipe fills it)."""

    model: ModelConfig
    width: int  # the generated size, before any second pass
    height: int
    steps: int
    cfg_scale: float
    long_prompts: str = "chunk"
    prompt_weighting: str = "none"
    fuse_loras: bool = False
    chosen: Mapping[str, str] = field(default_factory=dict)  # each group's option (GROUPS)
    guidance_interval: bool = False  # guidance limited to an interval of the steps
    deepcache: bool = False  # UNet feature reuse across steps
    compile: bool = False  # speed=compile: the UNet is compiled
    jobs: JobSettings = field(default_factory=JobSettings)  # style, negatives, run seed


class Method:
    """A conditioning method for one run. `settings` is its config group's node (for LoRAs
    the list), `run` what it may know of the rest of the run."""

    group: ClassVar[str]
    name: ClassVar[str]
    second_model: ClassVar[bool] = False  # loads a second model beside the base (memory plan)

    def __init__(self, settings: Any, run: MethodContext):
        self.settings = settings
        self.run = run

    def prepare(self, jobs: list, shotlist) -> list:
        return jobs

    def missing_weights(self) -> str | None:
        return None

    def install(self, loaded, todo: list) -> None:
        """`loaded`: the pipeline.load.LoadedPipeline; `todo`: the jobs this run still makes."""

    def stages(self, todo: list, planned: list, run_dir) -> list[list]:
        return [todo]

    def begin_stage(self, pipe, stage: int) -> BatchHook | None:
        return None

    def lead(self):
        """A job every batch starts with (StyleAligned's reference), or None."""
        return None

    def remove(self, pipe) -> None:
        pass

    def record(self, job) -> dict[str, Any]:
        return {}

    def run_record(self) -> dict[str, Any]:
        """Its fields of the manifest's run record."""
        return {}

    def memory_gb(self, bytes_per_value: int) -> float:
        """GPU memory it holds beyond the pipeline's (memory=auto counts it)."""
        return 0.0

    def extra_flops(self, job, evaluations: float) -> float:
        """FLOPs it added to an image beyond its UNet evaluations (counted in its record)."""
        return 0.0

    def references(self) -> dict[str, str]:
        """Reference images it made, per character (files in the run folder)."""
        return {}

    @classmethod
    def png_settings(cls, record: dict[str, Any]) -> list[str]:
        """AUTOMATIC1111 `parameters` entries, where the image record (as JSON: the fields
        `record` wrote, among the others) shows this method ran."""
        return []


def register(group: str, *names: str, schema: type | None = None):
    """Class decorator: the method for `group=<name>` (several names: presets of one method).
    `schema`: its settings' dataclass, a subclass of the group's (a YAML file of the option
    names `<name>_schema` first in its defaults), as keyframes' own options have theirs."""

    def add(cls: type[Method]) -> type[Method]:
        for name in names:
            _REGISTRY[(group, name)] = cls
            if schema is not None:
                OPTION_SCHEMAS.setdefault(group, {})[name] = schema
        cls.group = group
        cls.name = cls.__dict__.get("name", names[0])
        return cls

    return add


def method_class(group: str, name: str) -> type[Method] | None:
    _discover()
    return _REGISTRY.get((group, name))


def methods_for(settings_of: Mapping[str, Any], run: MethodContext) -> list[Method]:
    """The methods the settings select (settings_of: the node of each of METHOD_SETTINGS), in
    a fixed order: LoRAs, embeddings, the switched ones (SWITCHED), then the groups of GROUPS."""
    _discover()
    chosen = []
    for listed in LISTED:  # lists of files rather than one option
        if settings_of[listed]:
            chosen.append(_REGISTRY[(listed, listed)](settings_of[listed], run))
    for switched in SWITCHED:
        if settings_of[switched].on:
            chosen.append(_REGISTRY[(switched, switched)](settings_of[switched], run))
    for group in GROUPS:
        settings = settings_of[group]
        cls = _REGISTRY.get((group, settings.name))
        if cls is None and settings.name == "none":
            continue
        if cls is None:
            known = sorted(name for g, name in _REGISTRY if g == group)
            raise ConfigError(
                f"{group}={settings.name}: no conditioning method is registered under that "
                f"name (registered: none, {', '.join(known)})"
            )
        chosen.append(cls(settings, run))
    return chosen


def prepare_all(methods: list[Method], jobs: list, shotlist) -> list:
    """Every method's checks and per-job inputs, before anything loads; the problems of all
    methods in one ConfigError."""
    errors: list[ConfigError] = []
    for method in methods:
        try:
            jobs = method.prepare(jobs, shotlist)
        except ConfigError as e:
            errors.append(e)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        problems = [p for e in errors for p in (e.problems or [str(e)])]
        raise ConfigError("settings that do not fit together:", problems)
    return jobs


# An image record's conditioning fields where no method fills them (the manifest's contract).
RECORD_DEFAULTS = {
    "consistency": "none",
    "consistency_reference": None,
    "loras": [],
    "embeddings": [],
    "upscale": None,
    "control": None,
    "freeu": None,
    "pag": None,
}


def record_fields(methods: list[Method], job) -> dict[str, Any]:
    """The conditioning fields of one image's record (job: as planned)."""
    fields = dict(RECORD_DEFAULTS)
    for method in methods:
        fields.update(method.record(job))
    return fields


def png_settings(record: dict[str, Any]) -> list[str]:
    """The AUTOMATIC1111 `parameters` entries of the methods an image record shows."""
    _discover()
    entries: list[str] = []
    for cls in dict.fromkeys(_REGISTRY.values()):
        entries += cls.png_settings(record)
    return entries


def _discover() -> None:
    """Import every module of this package once: each registers its methods as it loads."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = importlib.import_module(__package__)
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{__package__}.{module.name}")
