"""What a model setting points at, checked without loading weights: the file or folder exists,
is not a pickle unless allowed, and which family (sdxl, sd15) it is, read from a folder's
model_index.json, a single file's tensor names or a cached hub index."""

from __future__ import annotations

import json
from pathlib import Path

from keyframes.config.schema import ModelConfig
from keyframes.errors import ConfigError

SAFE_SUFFIXES = (".safetensors",)
PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "sd15": "StableDiffusionPipeline"}
# Where a single-file checkpoint's pipeline configs (not weights) come from unless model.config
# says otherwise: the family's base repo, the one diffusers itself infers for full-size files.
CONFIG_REPOS = {
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
}


def check_source(model: ModelConfig) -> None:
    """Cheap checks that need no weights: run before anything is written."""
    if model.tiny or model.architecture or not model.path:
        return
    path = Path(model.path).expanduser()
    if not path.exists():
        raise ConfigError(f"model.path={model.path}: no such file or folder")
    if path.is_file() and path.suffix.lower() not in SAFE_SUFFIXES and not model.allow_pickle:
        raise ConfigError(
            f"model.path={model.path}: only .safetensors checkpoints are loaded "
            f"(a {path.suffix or 'suffix-less'} file is a pickle, which can run code when loaded). "
            "Convert it to safetensors, or set model.allow_pickle=true if you trust its source."
        )


def resolve_family(model: ModelConfig) -> str:
    """sdxl or sd15: model.family where given, else what the weights are, found without
    loading them (a folder's model_index.json, a single file's tensor names, the cached
    model_index.json of a hub id). Anything else is a ConfigError."""
    if model.family != "auto":
        return model.family
    if model.tiny or model.architecture:
        return "sdxl"
    path = Path(model.path).expanduser() if model.path else None
    if path is not None and path.is_dir():
        return _family_of_index(path / "model_index.json", model.path)
    if path is not None and path.suffix.lower() in SAFE_SUFFIXES:
        return _family_of_checkpoint(path)
    if path is None and model.id:
        try:
            from huggingface_hub import hf_hub_download

            index = hf_hub_download(model.id, "model_index.json", local_files_only=True)
        except Exception:  # noqa: BLE001 - not cached: the loader says what is missing
            return "sdxl"
        return _family_of_index(Path(index), model.id)
    return "sdxl"


def _family_of_index(index: Path, source: str) -> str:
    try:
        name = json.loads(index.read_text())["_class_name"]
    except (OSError, ValueError, KeyError):
        return "sdxl"  # not a pipeline folder: the loader explains
    for family, pipeline in PIPELINES.items():
        if name == pipeline:
            return family
    hint = " (an SDXL refiner: use it as upscale=refiner)" if "Img2Img" in name else ""
    raise ConfigError(
        f"model {source}: a {name}{hint}; keyframes runs SDXL and SD 1.5 text-to-image "
        f"pipelines ({', '.join(PIPELINES.values())})"
    )


def _family_of_checkpoint(path: Path) -> str:
    """The original (non-diffusers) checkpoint layouts: SD 1.x keeps its CLIP text model under
    cond_stage_model.transformer, SDXL two encoders under conditioner.embedders.0/1."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception:  # noqa: BLE001 - unreadable: the loader gives the full message
        return "sdxl"
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd15"
    if any(k.startswith(("conditioner.", "cond_stage_model.model.")) for k in keys):
        raise ConfigError(
            f"model.path={path}: an SDXL refiner or SD 2.x checkpoint; keyframes runs SDXL "
            "and SD 1.5 text-to-image checkpoints (the SDXL refiner goes in upscale=refiner)"
        )
    return "sdxl"  # diffusers-named tensors or unknown: the SDXL loader tries
