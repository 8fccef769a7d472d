"""What a model setting points at, checked without loading weights: the file or folder exists,
is not a pickle unless allowed, and which family (sdxl, sd15) it is, read from a folder's
model_index.json, a single file's tensor names or a cached hub index."""

from __future__ import annotations

import json
from pathlib import Path

from keyframes.config.schema import ModelConfig
from keyframes.config.weights import PICKLE_SUFFIXES, pickle_problem, safetensors_keys
from keyframes.errors import ConfigError

PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "sd15": "StableDiffusionPipeline"}
# Where a single-file checkpoint's pipeline configs (not weights) come from unless model.config
# says otherwise: the family's base repo, the one diffusers itself infers for full-size files.
CONFIG_REPOS = {
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
}


def check_source(model: ModelConfig) -> None:
    """Cheap checks that need no weights: run before anything is written. Every local file
    the model settings name is looked at (format, pickles, the parts a checkpoint holds)."""
    if model.architecture:
        return
    problems = []
    if model.path:
        problems += _path_problems(model)
    if model.vae and _local(model.vae):
        problems += _vae_problems(model)
    if model.unet and _local(model.unet):
        problems += _read_file(Path(model.unet).expanduser(), "model.unet", model)[0]
    if problems:
        raise ConfigError.listing("the model's files cannot be used:", problems)


def _local(spec: str) -> bool:
    """A path rather than a hub id (org/repo, org/repo/file)."""
    path = Path(spec).expanduser()
    return path.exists() or path.is_symlink() or spec.startswith((".", "/", "~"))


def _read_file(path: Path, what: str, model: ModelConfig) -> tuple[list[str], list[str] | None]:
    """(problems, tensor names) of a weights file: there, and a safetensors file (names read
    from its header) or an allowed pickle (no names: it is not opened before loading)."""
    if not path.is_file():
        return [f"{what}={path}: no such file"], None
    refused = pickle_problem(path, what, model.allow_pickle)
    if refused or path.suffix.lower() in PICKLE_SUFFIXES:
        return ([refused] if refused else []), None
    try:
        return [], safetensors_keys(path, what)
    except ConfigError as e:
        return [str(e)], None


def _path_problems(model: ModelConfig) -> list[str]:
    path = Path(model.path).expanduser()
    if not path.exists():
        return [f"model.path={model.path}: no such file or folder"]
    if path.is_dir():
        return []
    problems, keys = _read_file(path, "model.path", model)
    if problems or keys is None:
        return problems
    missing = missing_parts(keys, _family_from_keys(keys, path), vae_given=bool(model.vae))
    if missing:
        return [
            f"model.path={model.path}: this checkpoint holds no {' and no '.join(missing)}"
            + (
                ". Give the VAE with model.vae=/path/to/sdxl_vae.safetensors"
                if missing == [PARTS["vae"][1]]
                else ""
            )
        ]
    return []


def _vae_problems(model: ModelConfig) -> list[str]:
    path = Path(model.vae).expanduser()
    if path.is_dir():
        return []
    problems, keys = _read_file(path, "model.vae", model)
    if problems or keys is None:
        return problems
    parts = [
        any(k.startswith((p, f"first_stage_model.{p}")) for k in keys)
        for p in ("encoder.", "decoder.")
    ]
    if not all(parts):
        return [f"model.vae={model.vae}: not a VAE (no encoder.* and decoder.* tensors)"]
    return []


# What a single-file checkpoint holds, by the prefix of its tensor names: (prefix, as said)
PARTS = {
    "unet": ("model.diffusion_model.", "UNet (model.diffusion_model.*)"),
    "vae": ("first_stage_model.", "VAE (first_stage_model.*)"),
    "te1_sdxl": (
        "conditioner.embedders.0.transformer.",
        "first text encoder (conditioner.embedders.0.transformer.*)",
    ),
    "te2_sdxl": (
        "conditioner.embedders.1.model.",
        "second text encoder (conditioner.embedders.1.model.*)",
    ),
    "te_sd15": ("cond_stage_model.transformer.", "text encoder (cond_stage_model.transformer.*)"),
}


def missing_parts(keys: list[str], family: str, vae_given: bool) -> list[str]:
    """The parts an original-layout checkpoint of `family` lacks, as a message names them.
    Files in diffusers' own names are left to the loader."""
    if not any(
        k.startswith(
            ("model.diffusion_model.", "conditioner.", "cond_stage_model.", "first_stage_model.")
        )
        for k in keys
    ):
        return []
    needed = ["unet", "te1_sdxl", "te2_sdxl"] if family == "sdxl" else ["unet", "te_sd15"]
    needed += [] if vae_given else ["vae"]
    return [PARTS[p][1] for p in needed if not any(k.startswith(PARTS[p][0]) for k in keys)]


def resolve_family(model: ModelConfig) -> str:
    """sdxl or sd15: model.family where given, else what the weights are, found without
    loading them (a folder's model_index.json, a single file's tensor names, the cached
    model_index.json of a hub id). Anything else is a ConfigError."""
    if model.family != "auto":
        return model.family
    if model.architecture:
        return "sdxl"
    path = Path(model.path).expanduser() if model.path else None
    if path is not None and path.is_dir():
        return _family_of_index(path / "model_index.json", model.path)
    if path is not None and path.suffix.lower() == ".safetensors":
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
    return _family_from_keys(safetensors_keys(path, "model.path"), path)


def _family_from_keys(keys: list[str], path: Path) -> str:
    """The original (non-diffusers) checkpoint layouts: SD 1.x keeps its CLIP text model under
    cond_stage_model.transformer, SDXL two encoders under conditioner.embedders.0/1, the SDXL
    refiner only OpenCLIP bigG (conditioner.embedders.0.model), SD 2.x cond_stage_model.model."""
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("conditioner.embedders.0.model.") and not has("conditioner.embedders.1."):
        raise ConfigError(
            f"model.path={path}: an SDXL refiner checkpoint; keyframes runs SDXL and SD 1.5 "
            "text-to-image checkpoints (the SDXL refiner goes in upscale=refiner)"
        )
    if has("cond_stage_model.model."):
        raise ConfigError(
            f"model.path={path}: an SD 2.x checkpoint (OpenCLIP ViT-H text encoder); keyframes "
            "runs SDXL and SD 1.5 text-to-image checkpoints"
        )
    if has("conditioner.embedders."):
        return "sdxl"
    if has("cond_stage_model.transformer."):
        return "sd15"
    return "sdxl"  # diffusers-named tensors or unknown: the SDXL loader tries


# Marker tensors of v-prediction single files (NoobAI-XL v-pred and other community models),
# read by A1111 and ComfyUI: v_pred (the model predicts v) and ztsnr (zero terminal SNR).
V_PREDICTION_MARKER, ZERO_SNR_MARKER = "v_pred", "ztsnr"


def resolve_prediction(model: ModelConfig) -> tuple[str, bool]:
    """(prediction type, zero terminal SNR) the model was trained for, without loading it:
    model.prediction and model.zero_snr where given, else what the weights say (a single
    file's marker tensors, a folder's or cached hub repo's scheduler config; epsilon where
    nothing says otherwise, as the SDXL and SD 1.5 base models are)."""
    kind, zero_snr = model.prediction, model.zero_snr
    if kind == "auto" or zero_snr is None:  # the plan has both: the weights are read once
        found_kind, found_zero_snr = _prediction_of_weights(model)
        kind = found_kind if kind == "auto" else kind
        zero_snr = found_zero_snr if zero_snr is None else zero_snr
    return kind, zero_snr and kind == "v_prediction"


def _prediction_of_weights(model: ModelConfig) -> tuple[str, bool]:
    if model.architecture:
        return "epsilon", False  # the published SDXL and SD 1.5 schedulers
    path = Path(model.path).expanduser() if model.path else None
    if path is not None and path.suffix.lower() == ".safetensors" and path.is_file():
        keys = set(safetensors_keys(path, "model.path"))
        v = V_PREDICTION_MARKER in keys
        return ("v_prediction" if v else "epsilon"), ZERO_SNR_MARKER in keys
    scheduler = "scheduler/scheduler_config.json"
    if path is not None and path.is_dir():
        return _prediction_of_scheduler(path / scheduler)
    if path is None and model.id:
        try:
            from huggingface_hub import hf_hub_download

            return _prediction_of_scheduler(
                Path(hf_hub_download(model.id, scheduler, local_files_only=True))
            )
        except Exception:  # noqa: BLE001 - not cached: the loader reads it as it loads
            pass
    return "epsilon", False


def _prediction_of_scheduler(config: Path) -> tuple[str, bool]:
    try:
        settings = json.loads(config.read_text())
    except (OSError, ValueError):
        return "epsilon", False
    zero_snr = bool(settings.get("rescale_betas_zero_snr"))
    return settings.get("prediction_type") or "epsilon", zero_snr
