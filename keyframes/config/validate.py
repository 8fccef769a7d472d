"""Checks of the composed settings that a type cannot express (ranges, consistency, sizes),
all at once, before any model loads; and the size rules."""

from __future__ import annotations

import math

from keyframes.config.schema import (
    ARCHITECTURES,
    COMPILE_MODES,
    DEVICES,
    DTYPES,
    FAMILIES,
    LONG_PROMPT_MODES,
    MAX_PIXELS,
    MAX_SEED,
    MAX_SIDE,
    MAX_TAKES,
    OBJECTIVES,
    OFFLOADS,
    PREDICTIONS,
    PROMPT_WEIGHTINGS,
    SEED_MODES,
    Config,
)
from keyframes.errors import ConfigError

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


def size_problems(width: int, height: int) -> list[str]:
    """An output size beyond what any machine should be asked for."""
    if max(width, height) <= MAX_SIDE and width * height <= MAX_PIXELS:
        return []
    return [
        f"size {width}x{height} ({width * height / 1e6:.1f} MP): at most {MAX_SIDE} per side "
        f"and {MAX_PIXELS / 1e6:.1f} MP; SDXL is made for about 1 MP"
    ]


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
    problems += _choice_problems(cfg)
    for key, value in (("width", cfg.width), ("height", cfg.height)):
        if value is not None and (value < 64 or value % 8):
            problems.append(f"{key}={value}: must be a multiple of 8 and at least 64")
    if cfg.objective.startswith("aesthetic") and not (cfg.scorer.model and cfg.scorer.aesthetic):
        problems.append(f"objective={cfg.objective}: needs a scorer with scorer.aesthetic set")
    elif cfg.scorer.model is None and cfg.objective != OBJECTIVES[0]:
        problems.append(f"objective={cfg.objective}: needs a scorer (scorer=none scores nothing)")
    problems += _interval_problems(cfg) + _deepcache_problems(cfg) + _noise_problems(cfg)
    if "{prompt}" not in cfg.style.prompt:
        problems.append(f"style.prompt: the template of style {cfg.style.name!r} lacks {{prompt}}")
    if cfg.speed.compile and cfg.memory.offload != "none":
        problems.append(
            f"speed.compile with memory={cfg.memory.name}: a compiled model stays on the GPU, "
            "offloading moves it away; use memory=balanced (or auto) with compile"
        )
    if not (cfg.model.architecture or cfg.model.id or cfg.model.path):
        problems.append(
            "model: set model.path=/path/to/folder-or-file.safetensors (or model.id=org/repo)"
        )
    size = None
    try:
        size = resolve_size(cfg.aspect, cfg.quality.base_size, cfg.width, cfg.height)
    except ConfigError as e:
        problems.append(str(e))
    if size:
        problems += size_problems(*size)
    if problems:
        raise ConfigError("invalid settings:", problems)
    return size


def _deepcache_problems(cfg: Config) -> list[str]:
    interval, branch = cfg.speed.deepcache_interval, cfg.speed.deepcache_branch
    deepest = 1  # SDXL's UNet has three levels, SD 1.5's four (the tiny ones too)
    problems = []
    if interval < 1:
        problems.append(f"speed.deepcache_interval={interval}: must be at least 1 (1: off)")
    if not 0 <= branch <= deepest:
        problems.append(
            f"speed.deepcache_branch={branch}: must be 0..{deepest} for this model "
            "(0: the shallowest branch, the most saved)"
        )
    return problems


def _choice_problems(cfg: Config) -> list[str]:
    """A value outside the options of a setting, for every such setting."""
    problems = []
    # Choices checked here rather than by Enum fields in the schema: OmegaConf would stop at
    # the first bad value (this lists every problem at once), and enum members would reach
    # config.yaml, the hash and MLflow as names (`reduce-overhead` cannot even be one).
    for key, value, allowed in (
        ("device", cfg.device, DEVICES),
        ("seed_mode", cfg.seed_mode, SEED_MODES),
        ("objective", cfg.objective, OBJECTIVES),
        ("model.dtype", cfg.model.dtype, DTYPES),
        ("memory.offload", cfg.memory.offload, OFFLOADS),
        ("long_prompts", cfg.long_prompts, LONG_PROMPT_MODES),
        ("prompt_weighting", cfg.prompt_weighting, PROMPT_WEIGHTINGS),
        ("speed.compile_mode", cfg.speed.compile_mode or COMPILE_MODES[0], COMPILE_MODES),
        ("model.architecture", cfg.model.architecture or ARCHITECTURES[0], ARCHITECTURES),
        ("model.family", cfg.model.family, FAMILIES),
    ):
        if value not in allowed:
            problems.append(f"{key}={value}: must be one of {', '.join(allowed)}")
    return problems


def _noise_problems(cfg: Config) -> list[str]:
    """What the model predicts, its noise schedule and the guidance rescale."""
    problems = []
    if cfg.model.prediction not in PREDICTIONS:
        problems.append(
            f"model.prediction={cfg.model.prediction}: must be one of {', '.join(PREDICTIONS)}"
        )
    if cfg.guidance_rescale is not None and not 0 <= cfg.guidance_rescale <= 1:
        problems.append(f"guidance_rescale={cfg.guidance_rescale}: must be between 0 and 1")
    if cfg.model.zero_snr and cfg.model.prediction == "epsilon":
        problems.append(
            "model.zero_snr=true with model.prediction=epsilon: at zero terminal SNR "
            "the noise cannot be predicted; zero SNR needs v_prediction"
        )
    return problems


def _interval_problems(cfg: Config) -> list[str]:
    interval = cfg.guidance_interval
    if interval is None:
        return []
    if len(interval) != 2 or not 0 <= interval[0] <= interval[1] <= 1:
        return [
            f"guidance_interval={list(interval)}: must be [start, end] with "
            "0 <= start <= end <= 1 (shares of the steps)"
        ]
    if cfg.consistency.name == "style_aligned":
        return [
            "guidance_interval with consistency=style_aligned: its shared attention reads the "
            "reference from each guidance half of the batch; use one or the other"
        ]
    return []
