"""Typed settings. Types live here, values live in conf/*.yaml (Hydra composes them).

Every stage takes its own sub-config, never the whole tree. `validate` checks ranges and
consistency that a type cannot express, so bad values fail before any model loads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from keyframes.errors import ConfigError

DEVICES = ("auto", "cuda", "mps", "cpu")
MAX_PIXELS = 4096 * 4096  # far beyond SDXL's 1 MP training size; larger is a typo or an OOM
MAX_SIDE = 8192
MAX_TAKES = 1000
DTYPES = ("auto", "float16", "bfloat16", "float32")
SEED_MODES = ("derived", "fixed")
OBJECTIVES = ("clip_score_mean", "clip_score_per_second")
MEMORY_MODES = ("auto", "none", "balanced", "low_vram", "minimal")
OFFLOAD_MODES = ("low_vram", "minimal")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
ARCHITECTURES = ("sdxl_base",)
FAMILIES = ("auto", "sdxl", "sd15")
CONSISTENCY_METHODS = ("none", "style_aligned", "ip_adapter")
LONG_PROMPT_MODES = ("chunk", "truncate")
UPSCALERS = ("none", "hires", "refiner")
CONTROL_TYPES = ("canny", "depth")
MAX_SEED = 2**32 - 1  # seeds are 32-bit, as in other SD front ends
# The Hydra configs: inside the package where it is installed from a wheel (which ships conf/
# as keyframes/conf), else the checkout's conf/ beside the package.
_PACKAGE = Path(__file__).resolve().parent.parent
CONF_DIR = _PACKAGE / "conf" if (_PACKAGE / "conf").is_dir() else _PACKAGE.parent / "conf"


@dataclass
class ModelConfig:
    name: str = MISSING  # label used in tags, metadata and the A1111 "Model:" field
    id: str | None = None  # Hugging Face hub repo id
    path: str | None = None  # local diffusers folder or single .safetensors file; wins over id
    config: str | None = None  # single files only: folder or hub id holding the pipeline configs
    variant: str | None = None  # weight variant to prefer, e.g. fp16
    dtype: str = "auto"  # auto: bfloat16 on CUDA where supported, else float16; CPU float32
    family: str = "auto"  # sdxl | sd15 | auto: read from the weights (the pipeline class follows)
    tiny: bool = False  # build the tiny random-weight test model instead of loading weights
    architecture: str | None = None  # build this packaged architecture with random weights
    vae: str | None = None  # replacement VAE (hub id or folder), e.g. the fp16-fix SDXL VAE
    unet: str | None = None  # replacement UNet weights: .safetensors file or hub org/repo/file
    timestep_spacing: str | None = None  # scheduler override the weights need, e.g. trailing
    # What a distilled model was made for; other values get a warning and these are used:
    steps_range: list[int] | None = None  # [min, max] steps
    cfg_scale: float | None = None  # guidance the model was distilled for (0: none)
    base_size: int | None = None  # training resolution (the aspect buckets scale to it)
    sampler: str | None = None  # the sampler it is made for (another one gets a warning)
    allow_pickle: bool = False  # load .ckpt/.bin/.pt (pickle: can run code) - only if trusted


@dataclass
class StyleConfig:
    name: str = MISSING
    prompt: str = MISSING  # template; {prompt} is replaced by the scene prompt
    negative_prompt: str = ""
    file: str | None = None  # style=file: read the preset `name` from this .json/.csv file


@dataclass
class NegativeConfig:
    name: str = MISSING
    prompt: str = ""  # comma-separated terms added to every negative prompt


@dataclass
class SamplerConfig:
    name: str = MISSING
    label: str = MISSING  # the name AUTOMATIC1111-style metadata readers know
    scheduler: str = MISSING  # diffusers scheduler class name
    options: dict[str, Any] = field(default_factory=dict)  # passed to from_config


@dataclass
class QualityConfig:
    name: str = MISSING
    steps: int = MISSING
    cfg_scale: float = MISSING
    base_size: int = MISSING  # side of the square the resolution buckets are scaled to


@dataclass
class ScorerConfig:
    name: str = MISSING
    model: str | None = None  # open_clip architecture, "tiny", or null for no scoring
    pretrained: str | None = None  # open_clip pretrained tag, e.g. openai


@dataclass
class LoraConfig:
    path: str = MISSING  # a .safetensors file, a folder holding one, or a hub id
    scale: float = 1.0
    name: str | None = None  # default: the file's stem or the repo's name
    weight_name: str | None = None  # the file inside a folder or hub repo, if it has several


@dataclass
class ControlNetConfig:
    name: str = MISSING  # none | canny_sdxl | depth_sdxl | canny_sd15 | depth_sd15
    type: str | None = None  # the scene control type it follows: canny | depth
    family: str = "sdxl"  # the model family it was trained with: sdxl | sd15
    id: str | None = None  # hub repo of the ControlNet
    path: str | None = None  # local diffusers ControlNet folder; wins over id
    tiny: bool = False  # tests: a ControlNet copied from the tiny UNet, random weights
    conditioning_scale: float = 0.5  # how strongly the control steers (0: not at all)
    canny_low: int = 100  # canny thresholds (OpenCV), as the canny ControlNets were trained
    canny_high: int = 200


@dataclass
class UpscaleConfig:
    name: str = MISSING  # none | hires | refiner
    factor: float = 1.5  # hires: output size / generated size
    strength: float = 0.35  # hires: how much of the upscaled image the img2img pass redraws
    steps: int | None = None  # hires: img2img steps (null: the run's steps)
    high_noise_frac: float = 0.8  # refiner: share of the steps the base model runs
    id: str | None = None  # refiner: hub repo of the SDXL refiner
    path: str | None = None  # refiner: local diffusers folder; wins over id
    variant: str | None = None  # refiner: weight variant to prefer, e.g. fp16
    tiny: bool = False  # refiner: a tiny random-weight refiner for the tiny model (tests, smoke)


@dataclass
class ConsistencyConfig:
    name: str = MISSING  # none | style_aligned | ip_adapter
    reference: str | None = None  # style_aligned: scene id of the reference; null: the first
    image: str | None = None  # ip_adapter: the run's reference image; null: the first keyframe
    ip_adapter_id: str = "h94/IP-Adapter"
    ip_adapter_path: str | None = None  # a local copy of the repo; wins over the id
    ip_adapter_subfolder: str = "sdxl_models"
    ip_adapter_weight: str = "ip-adapter_sdxl.safetensors"
    ip_adapter_scale: float = 0.6  # how strongly the reference image steers
    style_only: bool = False  # InstantStyle: only the style block reads the image


@dataclass
class MemoryConfig:
    name: str = MISSING  # auto | none | balanced | low_vram | minimal (keyframes/memory.py)


@dataclass
class SpeedConfig:
    name: str = MISSING
    compile: bool = False  # torch.compile the UNet (its repeated blocks) and the VAE decoder
    compile_mode: str = "default"  # torch.compile mode, e.g. max-autotune-no-cudagraphs
    channels_last: bool = False  # NHWC memory layout for the convolutions
    fuse_qkv: bool = False  # one projection for query, key and value
    tf32: bool = True  # TF32 tensor cores for float32 matmuls and convolutions (CUDA)
    warm_up: bool = True  # a throwaway generation per batch shape (always on with compile)


@dataclass
class TrackingConfig:
    tracking_uri: str = MISSING  # sqlite file (no server) or http(s) server
    experiment_name: str | None = None  # null: derived from the shotlist title
    artifact_root: str | None = None  # null: beside a local store, or the server's default


@dataclass
class Config:
    shotlist: str = MISSING  # path to a shotlist JSON file, or "demo" for the bundled film
    steps: int = MISSING
    cfg_scale: float = MISSING
    seed: int = MISSING
    seed_mode: str = MISSING  # derived: per scene from seed + scene id; fixed: same seed for all
    takes: int = MISSING  # images per scene (a scene's own "takes" wins)
    max_images: int = MISSING  # a run making more images than this stops before it starts
    batch_size: int = MISSING  # images per pipeline call, across scenes and takes
    objective: str = MISSING  # the value a run returns to a sweeper (Optuna maximises it)
    long_prompts: str = "chunk"  # over 77 CLIP tokens: chunk (encode it all) | truncate
    resume: bool = MISSING  # continue the newest unfinished run with the same settings
    remake: bool = False  # a run folder made with other settings is made again, not refused
    allow_external_paths: bool = MISSING  # shotlist image paths may point outside its folder
    device: str = MISSING
    aspect: str = MISSING  # W:H, mapped to an SDXL training resolution
    width: int | None = None  # explicit size wins over aspect
    height: int | None = None
    loras: list[LoraConfig] = field(default_factory=list)  # LoRA adapters, all applied at once
    fuse_loras: bool = False  # fold the LoRAs into the weights: faster steps, slower to swap
    model: ModelConfig = field(default_factory=ModelConfig)
    style: StyleConfig = field(default_factory=StyleConfig)
    negative: NegativeConfig = field(default_factory=NegativeConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    upscale: UpscaleConfig = field(default_factory=UpscaleConfig)
    controlnet: ControlNetConfig = field(default_factory=ControlNetConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    mlflow: TrackingConfig = field(default_factory=TrackingConfig)


# Resolutions SDXL was trained on (width, height), from the SDXL report's bucket table.
SDXL_BUCKETS = (
    (1024, 1024),
    (1152, 896),
    (896, 1152),
    (1216, 832),
    (832, 1216),
    (1344, 768),
    (768, 1344),
    (1536, 640),
    (640, 1536),
)


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


def parse_aspect(aspect: str) -> float:
    """'16:9' -> 1.777...; raises ConfigError for anything else."""
    try:
        w, h = (float(x) for x in aspect.split(":"))
    except ValueError:
        raise ConfigError(f"aspect={aspect!r}: expected W:H, e.g. 16:9") from None
    if not (w > 0 and h > 0 and math.isfinite(w / h)):
        raise ConfigError(f"aspect={aspect!r}: both sides must be positive")
    return w / h


def resolve_size(
    aspect: str, base_size: int, width: int | None = None, height: int | None = None
) -> tuple[int, int]:
    """Explicit width/height win; a missing side follows the aspect; otherwise the SDXL
    training bucket closest to the aspect, scaled so its long side fits base_size/1024."""
    ratio = parse_aspect(aspect)
    if width and height:
        return width, height
    if width:
        return width, _multiple_of_8(width / ratio)
    if height:
        return _multiple_of_8(height * ratio), height
    bw, bh = min(SDXL_BUCKETS, key=lambda b: abs(math.log(b[0] / b[1]) - math.log(ratio)))
    scale = base_size / 1024
    return _multiple_of_8(bw * scale), _multiple_of_8(bh * scale)


def upscaled_size(width: int, height: int, factor: float) -> tuple[int, int]:
    return _multiple_of_8(width * factor), _multiple_of_8(height * factor)


def _multiple_of_8(x: float) -> int:
    return max(8, int(round(x / 8)) * 8)


def fit_to_model(cfg: Config) -> list[str]:
    """Bring steps, guidance and size within what a distilled model (turbo, lightning) was made
    for. Changes cfg; returns one warning per value changed, naming the value used."""
    model, notes = cfg.model, []
    if model.steps_range:
        low, high = model.steps_range
        if not low <= cfg.steps <= high:
            used = min(max(cfg.steps, low), high)
            notes.append(
                f"steps={cfg.steps} does not fit {model.name} ({low}-{high}): using {used}"
            )
            cfg.steps = used
    if model.cfg_scale is not None and cfg.cfg_scale != model.cfg_scale:
        notes.append(
            f"cfg_scale={cfg.cfg_scale:g} does not fit {model.name} (distilled for "
            f"{model.cfg_scale:g}): using {model.cfg_scale:g}"
        )
        cfg.cfg_scale = model.cfg_scale
    if model.base_size and cfg.quality.base_size != model.base_size and not cfg.width:
        notes.append(
            f"quality {cfg.quality.name} sizes for {cfg.quality.base_size} px; {model.name} "
            f"is made for {model.base_size}: using {model.base_size}"
        )
        cfg.quality.base_size = model.base_size
    if model.sampler and cfg.sampler.name != model.sampler:
        notes.append(
            f"sampler={cfg.sampler.name}: {model.name} is made for sampler={model.sampler}; "
            f"keeping {cfg.sampler.name} as asked"
        )
    return notes


def typed_aspect_wins(cfg: Config, typed: set[str]) -> list[str]:
    """The command line wins over presets. An aspect typed there, over a preset's width and
    height (experiment=smoke sets both), keeps the preset's width (or a typed height) and
    follows the typed aspect; with width and height typed too, those win. Changes cfg;
    returns one warning naming the size used."""
    if "aspect" not in typed or not (cfg.width and cfg.height):
        return []
    if {"width", "height"} <= typed:
        return [f"aspect={cfg.aspect} is not used: width={cfg.width} and height={cfg.height} "
                "were given too"]  # fmt: skip
    before = f"{cfg.width}x{cfg.height}"
    if "height" in typed:
        cfg.width = None
    else:
        cfg.height = None
    width, height = resolve_size(cfg.aspect, cfg.quality.base_size, cfg.width, cfg.height)
    return [f"aspect={cfg.aspect} from the command line replaces the preset's size {before}: "
            f"using {width}x{height}"]  # fmt: skip


def check_family(cfg: Config, family: str, controlled: bool) -> None:
    """Parts made for one model family (sdxl, sd15: as resolved) do not run on another."""
    problems = []
    if cfg.upscale.name == "refiner" and family != "sdxl":
        problems.append(
            f"upscale=refiner: the SDXL refiner finishes SDXL latents; {cfg.model.name} is "
            f"{family}. Use upscale=hires or upscale=none."
        )
    if controlled and cfg.controlnet.family != family:
        problems.append(
            f"controlnet={cfg.controlnet.name} is a {cfg.controlnet.family} ControlNet; "
            f"{cfg.model.name} is {family} (controlnet=canny_{family} or depth_{family} fits)"
        )
    if cfg.consistency.name == "ip_adapter" and family != "sdxl":
        problems.append(
            f"consistency=ip_adapter loads SDXL IP-Adapters; {cfg.model.name} is {family}. "
            "Use consistency=style_aligned or none."
        )
    if problems:
        raise ConfigError("settings that do not fit the model:", problems)


def validate(cfg: Config) -> tuple[int, int]:
    """Check every value a type cannot; report all problems at once. Returns (width, height)."""
    problems = []
    if cfg.steps < 1:
        problems.append(f"steps={cfg.steps}: must be at least 1")
    if not (cfg.cfg_scale >= 0 and math.isfinite(cfg.cfg_scale)):
        problems.append(f"cfg_scale={cfg.cfg_scale}: must be a number >= 0")
    if not 0 <= cfg.seed <= MAX_SEED:
        problems.append(f"seed={cfg.seed}: must be between 0 and {MAX_SEED}")
    if not 1 <= cfg.takes <= MAX_TAKES:
        problems.append(f"takes={cfg.takes}: must be between 1 and {MAX_TAKES}")
    if cfg.max_images < 1:
        problems.append(f"max_images={cfg.max_images}: must be at least 1")
    if cfg.batch_size < 1:
        problems.append(f"batch_size={cfg.batch_size}: must be at least 1")
    for key, value, allowed in (
        ("device", cfg.device, DEVICES),
        ("seed_mode", cfg.seed_mode, SEED_MODES),
        ("objective", cfg.objective, OBJECTIVES),
        ("model.dtype", cfg.model.dtype, DTYPES),
        ("memory", cfg.memory.name, MEMORY_MODES),
        ("consistency", cfg.consistency.name, CONSISTENCY_METHODS),
        ("long_prompts", cfg.long_prompts, LONG_PROMPT_MODES),
        ("upscale", cfg.upscale.name, UPSCALERS),
        ("controlnet.type", cfg.controlnet.type or CONTROL_TYPES[0], CONTROL_TYPES),
        ("speed.compile_mode", cfg.speed.compile_mode, COMPILE_MODES),
        ("model.architecture", cfg.model.architecture or ARCHITECTURES[0], ARCHITECTURES),
        ("model.family", cfg.model.family, FAMILIES),
        ("controlnet.family", cfg.controlnet.family, FAMILIES[1:]),
    ):
        if value not in allowed:
            problems.append(f"{key}={value}: must be one of {', '.join(allowed)}")
    for key, value in (("width", cfg.width), ("height", cfg.height)):
        if value is not None and (value < 64 or value % 8):
            problems.append(f"{key}={value}: must be a multiple of 8 and at least 64")
    if "{prompt}" not in cfg.style.prompt:
        problems.append(f"style.prompt: the template of style {cfg.style.name!r} lacks {{prompt}}")
    if cfg.speed.compile and cfg.memory.name in OFFLOAD_MODES:
        problems.append(
            f"speed.compile with memory={cfg.memory.name}: a compiled model stays on the GPU, "
            "offloading moves it away; use memory=balanced (or auto) with compile"
        )
    if not (cfg.model.tiny or cfg.model.architecture or cfg.model.id or cfg.model.path):
        problems.append(
            "model: set model.path=/path/to/folder-or-file.safetensors (or model.id=org/repo)"
        )
    if not cfg.controlnet.conditioning_scale >= 0:
        problems.append(
            f"controlnet.conditioning_scale={cfg.controlnet.conditioning_scale}: must be >= 0"
        )
    if cfg.upscale.name == "hires":
        if not 1 < cfg.upscale.factor <= 4:
            problems.append(f"upscale.factor={cfg.upscale.factor}: must be above 1, at most 4")
        if not 0 < cfg.upscale.strength <= 1:
            problems.append(f"upscale.strength={cfg.upscale.strength}: must be in (0, 1]")
        if cfg.upscale.steps is not None and cfg.upscale.steps < 1:
            problems.append(f"upscale.steps={cfg.upscale.steps}: must be at least 1")
        steps = cfg.upscale.steps or cfg.steps
        if steps >= 1 and 0 < cfg.upscale.strength <= 1 and int(steps * cfg.upscale.strength) < 1:
            problems.append(
                f"upscale=hires: strength {cfg.upscale.strength:g} of {steps} steps redraws no "
                "step at all; raise upscale.steps (or upscale.strength)"
            )
    if cfg.upscale.name == "refiner":
        if not 0 < cfg.upscale.high_noise_frac < 1:
            problems.append(
                f"upscale.high_noise_frac={cfg.upscale.high_noise_frac}: must be between 0 and 1"
            )
        if not (cfg.upscale.tiny or cfg.upscale.id or cfg.upscale.path):
            problems.append("upscale=refiner: set upscale.id (hub repo) or upscale.path (folder)")
    size = None
    try:
        size = resolve_size(cfg.aspect, cfg.quality.base_size, cfg.width, cfg.height)
    except ConfigError as e:
        problems.append(str(e))
    final = size
    if size and cfg.upscale.name == "hires" and 1 < cfg.upscale.factor <= 4:
        final = upscaled_size(*size, cfg.upscale.factor)
    if final and (max(final) > MAX_SIDE or final[0] * final[1] > MAX_PIXELS):
        problems.append(
            f"size {final[0]}x{final[1]} ({final[0] * final[1] / 1e6:.1f} MP): at most {MAX_SIDE} "
            f"per side and {MAX_PIXELS / 1e6:.1f} MP; SDXL is made for about 1 MP"
        )
    if problems:
        raise ConfigError("invalid settings:", problems)
    return size
