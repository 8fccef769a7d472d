"""The composed settings -> the frozen plan a run follows, in one pass that changes nothing it
was given: the style a style file names, the size an aspect typed on the command line asks
for, what a distilled model was made for (steps, guidance, size), the model family read from
the weights, every value and path checked. config.yaml, the MLflow params, the manifest and
the config hash are all written from the plan, so they say what made the images."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any

from omegaconf import OmegaConf

from keyframes.config.model_source import check_source, resolve_family, resolve_prediction
from keyframes.config.schema import Config
from keyframes.config.styles import resolve_style
from keyframes.config.validate import resolve_size, validate

# Settings that do not change what an existing image is: left out of the config hash that
# resume matches on, so a run that ran out of memory can go on with memory=low_vram, and a
# run can be given more takes (each image's own recipe is still checked).
NOT_IN_HASH = (
    "resume",
    "remake",
    "batch_size",
    "device",
    "mlflow",
    "memory",
    "speed",
    "takes",
    "objective",
)


@dataclass(frozen=True)
class RunPlan:
    config: Config  # the settings that run: a resolved copy, never changed after this
    width: int  # the generated size (a second pass may enlarge it)
    height: int
    model_fit: tuple[str, ...] = ()  # values changed to fit a distilled model, as warned
    notes: tuple[str, ...] = ()  # every warning the planning gave (size, model fit)
    resolved: dict[str, Any] = field(default_factory=dict, compare=False)  # config.yaml

    @property
    def config_hash(self) -> str:
        return config_hash(self.resolved)

    @property
    def yaml(self) -> str:
        """config.yaml: the resolved settings, as Hydra would write them."""
        return OmegaConf.to_yaml(OmegaConf.create(self.resolved))


def make_plan(composed: Config, typed: set[str] = frozenset()) -> RunPlan:
    """The plan for composed settings; `typed` are the keys given on the command line (they
    win over presets). Raises ConfigError listing every problem."""
    styled = replace(composed, style=resolve_style(composed.style))
    cfg, size_notes = typed_aspect_wins(styled, typed)
    cfg, fit_notes = fit_to_model(cfg)
    width, height = validate(cfg)
    check_source(cfg.model)
    cfg = with_model_read(cfg)
    resolved = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    notes = tuple(size_notes + fit_notes)
    return RunPlan(cfg, width, height, tuple(fit_notes), notes, resolved)


def with_model_read(cfg: Config) -> Config:
    """What the weights say, written into the plan: family, prediction type and zero terminal
    SNR, and the guidance rescale a zero-SNR model needs (0.7, from Lin et al. 2024, "Common
    Diffusion Noise Schedules and Sample Steps are Flawed") unless one was given."""
    prediction, zero_snr = resolve_prediction(cfg.model)
    model = replace(
        cfg.model, family=resolve_family(cfg.model), prediction=prediction, zero_snr=zero_snr
    )
    rescale = cfg.guidance_rescale
    if rescale is None:
        rescale = 0.7 if zero_snr else 0.0
    return replace(cfg, model=model, guidance_rescale=rescale)


def fit_to_model(cfg: Config) -> tuple[Config, list[str]]:
    """Steps, guidance and size within what a distilled model (turbo, lightning) was made for:
    (the settings with them, one warning per value changed, naming the value used)."""
    model, notes, changes = cfg.model, [], {}
    if model.steps_range:
        low, high = model.steps_range
        if not low <= cfg.steps <= high:
            changes["steps"] = min(max(cfg.steps, low), high)
            notes.append(
                f"steps={cfg.steps} does not fit {model.name} ({low}-{high}): "
                f"using {changes['steps']}"
            )
    if model.cfg_scale is not None and cfg.cfg_scale != model.cfg_scale:
        notes.append(
            f"cfg_scale={cfg.cfg_scale:g} does not fit {model.name} (distilled for "
            f"{model.cfg_scale:g}): using {model.cfg_scale:g}"
        )
        changes["cfg_scale"] = model.cfg_scale
    if model.base_size and cfg.quality.base_size != model.base_size and not cfg.width:
        notes.append(
            f"quality {cfg.quality.name} sizes for {cfg.quality.base_size} px; {model.name} "
            f"is made for {model.base_size}: using {model.base_size}"
        )
        changes["quality"] = replace(cfg.quality, base_size=model.base_size)
    if model.sampler and cfg.sampler.name != model.sampler:
        notes.append(
            f"sampler={cfg.sampler.name}: {model.name} is made for sampler={model.sampler}; "
            f"keeping {cfg.sampler.name} as asked"
        )
    return replace(cfg, **changes), notes


def typed_aspect_wins(cfg: Config, typed: set[str]) -> tuple[Config, list[str]]:
    """The command line wins over presets. An aspect typed there, over a preset's width and
    height (experiment=smoke sets both), keeps the preset's width (or a typed height) and
    follows the typed aspect; with width and height typed too, those win. Returns the
    settings with the size to use and a warning naming it."""
    if "aspect" not in typed or not (cfg.width and cfg.height):
        return cfg, []
    if {"width", "height"} <= typed:
        return cfg, [
            f"aspect={cfg.aspect} is not used: width={cfg.width} and "
            f"height={cfg.height} were given too"
        ]
    before = f"{cfg.width}x{cfg.height}"
    cfg = replace(cfg, width=None) if "height" in typed else replace(cfg, height=None)
    width, height = resolve_size(cfg.aspect, cfg.quality.base_size, cfg.width, cfg.height)
    return cfg, [
        f"aspect={cfg.aspect} from the command line replaces the preset's size "
        f"{before}: using {width}x{height}"
    ]


def config_hash(resolved: dict[str, Any]) -> str:
    recipe = {k: v for k, v in resolved.items() if k not in NOT_IN_HASH}
    speed = resolved.get("speed") or {}
    if speed.get("deepcache_interval", 1) > 1:  # the one speed setting that changes the picture
        recipe["deepcache"] = [speed["deepcache_interval"], speed.get("deepcache_branch", 0)]
    text = json.dumps(recipe, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{'model': {'id': 'x'}} -> {'model.id': 'x'}; lists and None as JSON."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out
