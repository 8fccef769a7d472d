"""Build or load the text-to-image pipeline: hub id, local diffusers folder (the tiny
random-weight models are such folders), single .safetensors file, or a packaged architecture
with random weights. Weights load from safetensors only.

The pipeline class follows the model family: SDXL (StableDiffusionXLPipeline) or SD 1.5
(StableDiffusionPipeline), read from model.family, a folder's model_index.json or a single
file's tensor names, before anything loads."""

from __future__ import annotations

import contextlib
import gc
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from keyframes.config.model_source import (
    CONFIG_REPOS,
    PIPELINES,
    check_source,
    resolve_family,
    resolve_prediction,
)
from keyframes.config.schema import (
    MemoryConfig,
    ModelConfig,
    SamplerConfig,
    SpeedConfig,
    memory_settings,
)
from keyframes.errors import ConfigError, ModelUnavailableError, first_line
from keyframes.pipeline.memory import apply_memory_mode
from keyframes.pipeline.speed import apply_speed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    device: str  # cuda | mps | cpu
    dtype: torch.dtype


def resolve_placement(device: str, dtype: str) -> Placement:
    """'auto' picks CUDA, then MPS, then CPU; 16-bit on accelerators (bfloat16 where the GPU
    has it: float16's range lets the SDXL VAE overflow), float32 on CPU."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if device == "auto":
        device = "cuda" if cuda else "mps" if mps else "cpu"
    elif device == "cuda" and not cuda:
        raise ConfigError(
            "device=cuda: no CUDA device is visible to torch "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}). "
            "Use device=auto or device=cpu."
        )
    elif device == "mps" and not mps:
        raise ConfigError("device=mps: the Apple MPS backend is not available. Use device=auto.")
    if dtype == "auto":
        if device == "cuda" and torch.cuda.is_bf16_supported():
            dtype = "bfloat16"
        else:
            dtype = "float32" if device == "cpu" else "float16"
    if device == "cpu" and dtype == "float16":
        raise ConfigError("model.dtype=float16 is not supported on CPU; use float32 or bfloat16.")
    return Placement(device=device, dtype=getattr(torch, dtype))


def describe_source(model: ModelConfig) -> str:
    if model.architecture:
        return f"{model.architecture} architecture, random weights"
    return model.path or model.id or "?"


def load_pipeline(model: ModelConfig, placement: Placement, memory: MemoryConfig | str = "none"):
    """The model's text-to-image pipeline placed as the memory mode (its settings, or the name
    of one in conf/memory/) says, progress bars off."""
    memory = memory_settings(memory)
    check_source(model)  # the gate for every caller; the CLI also calls it early, to fail fast
    _quiet_library_notes()
    family = resolve_family(model)
    if model.architecture:
        from keyframes.pipeline.architectures import build_random_pipeline

        build_on = placement.device if memory.offload == "none" else "cpu"
        pipe = build_random_pipeline(model.architecture, build_on, placement.dtype)
    else:
        with quiet_loading():
            pipe = _load_weights(model, family, placement.dtype)
    if model.unet:
        _replace_unet_weights(pipe, model.unet)
    pool_at_end_token(pipe)
    schedule = {k: v for k, v in model_schedule(model).items() if pipe.scheduler.config.get(k) != v}
    if schedule:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **schedule)
    pipe = apply_memory_mode(pipe, memory, placement.device)
    pipe.set_progress_bar_config(disable=True)  # the run has one overall bar
    return pipe


def model_schedule(model: ModelConfig) -> dict:
    """The scheduler settings the weights need, over their scheduler config: the prediction
    type and zero terminal SNR (a v-prediction file says so only by its marker tensors, which
    diffusers does not read), with trailing timesteps so that sampling starts at the zero-SNR
    end (unless model.timestep_spacing says otherwise)."""
    prediction, zero_snr = resolve_prediction(model)
    settings = {"prediction_type": prediction}
    if zero_snr:
        settings |= {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    if model.timestep_spacing:
        settings["timestep_spacing"] = model.timestep_spacing
    return settings


def pool_at_end_token(pipe) -> None:
    """The pooled text embedding (SDXL's second conditioning) taken at the first end token, as
    A1111, ComfyUI and kohya take it. The published SDXL and SD 1.5 text-encoder configs carry
    eos_token_id 2, from before transformers fixed CLIP's ids; with it transformers pools at
    the highest token id, which is an added embedding's token wherever a prompt has one. The
    hidden states do not depend on it, nor do prompts without an added token."""
    from keyframes.pipeline.long_prompts import text_encoders

    for tokenizer, encoder in text_encoders(pipe):
        # transformers 5: CLIPTextModel is the text transformer; the projected one wraps it
        getattr(encoder, "text_model", encoder).eos_token_id = tokenizer.eos_token_id


NOISE = (
    "truncated because CLIP",
    "Token indices sequence length",
    "No LoRA keys associated",  # a LoRA for the UNet only: normal, and said per encoder
    "should be kept in float32: [].",  # said at every VAE cast (img2img passes), of no module
    "offline mode is enabled",  # HF_HUB_OFFLINE: the cache is meant; said twice per repo
    "The new embeddings will be initialized",  # an embedding's rows, overwritten as it loads
)


class _DropLibraryNotes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in NOISE)


def _quiet_library_notes() -> None:
    """The run reports long prompts once per scene (and in the manifest); the libraries would
    repeat it for every image, through the progress bar. Likewise LoRA loading notes, and the
    hub's "could not reach" when offline mode is what the user asked for."""
    for name in (
        "huggingface_hub.hf_api",
        "diffusers.pipelines.pipeline_utils",
        "transformers.modeling_utils",
        "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl",
        "transformers.tokenization_utils_base",
        "diffusers.loaders.lora_base",
        "diffusers.loaders.lora_pipeline",
        "diffusers.loaders.peft",
        "diffusers.models.modeling_utils",
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLibraryNotes) for f in logger.filters):
            logger.addFilter(_DropLibraryNotes())


@contextlib.contextmanager
def quiet_loading():
    """diffusers' and transformers' loading and saving bars off while it lasts: the run logs
    what it loaded and how long it took, and keeps one progress bar, its own."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    were_on = [library.is_progress_bar_enabled() for library in libraries]
    for library in libraries:
        library.disable_progress_bar()
    try:
        yield
    finally:
        for library, on in zip(libraries, were_on, strict=True):
            if on:
                library.enable_progress_bar()


def _load_weights(model: ModelConfig, family: str, dtype: torch.dtype):
    import diffusers

    pipeline = getattr(diffusers, PIPELINES[family])
    # a folder named with ~ (as in a YAML file) is the user's, as for every other path
    source = str(Path(model.path).expanduser()) if model.path else model.id
    # use_safetensors=True makes diffusers refuse .bin weights; None lets it fall back
    safe = None if model.allow_pickle else True
    # SD 1.5 repos ship a safety checker that only runs when the pipeline decodes; keyframes
    # decodes the latents itself (NaN checks), as for SDXL, which has none: it is not loaded.
    extra = {"safety_checker": None, "requires_safety_checker": False} if family == "sd15" else {}
    if model.vae:
        extra["vae"] = _load_vae(model, family, dtype, safe)
    try:
        if _single_file(model):
            configs = model.config or CONFIG_REPOS[family]
            return pipeline.from_single_file(
                str(Path(model.path).expanduser()), dtype=dtype, config=configs, **extra
            )
        kwargs = dict(dtype=dtype, use_safetensors=safe, **extra)
        if model.variant and _has_variant(source, model.variant):
            kwargs["variant"] = model.variant
        return pipeline.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelUnavailableError(_unavailable_message(model, e)) from None


def _load_vae(model: ModelConfig, family: str, dtype: torch.dtype, safe: bool | None):
    """model.vae: a single file as most are shared (sdxl_vae.safetensors, in the original
    layout, its config from the model's configs), a diffusers VAE folder or a hub id."""
    from diffusers import AutoencoderKL

    try:
        if Path(model.vae).expanduser().is_file():
            return AutoencoderKL.from_single_file(
                str(Path(model.vae).expanduser()),
                config=vae_configs(model, family),
                subfolder="vae",
                dtype=dtype,
            )
        return AutoencoderKL.from_pretrained(model.vae, dtype=dtype, use_safetensors=safe)
    except (OSError, ValueError) as e:
        raise ModelUnavailableError(
            f"model.vae={model.vae} is not available: {first_line(e)}\n"
            "  Give a VAE .safetensors file, a diffusers VAE folder or a cached hub id "
            "(e.g. madebyollin/sdxl-vae-fp16-fix), or drop model.vae."
        ) from None


def vae_configs(model: ModelConfig, family: str) -> str:
    """Where a single VAE file's config comes from: the model's own folder or repo, else the
    family's base repo (model.config overrides both)."""
    if model.config:
        return model.config
    if model.path and Path(model.path).expanduser().is_dir():
        return str(Path(model.path).expanduser())
    return model.id if model.id and not model.path else CONFIG_REPOS[family]


def _replace_unet_weights(pipe, source: str) -> None:
    """Load UNet weights (a local .safetensors file, or org/repo/file.safetensors on the hub)
    into the pipeline's UNet, e.g. SDXL-Lightning's distilled UNet into SDXL base."""
    from safetensors.torch import load_file

    path = Path(source).expanduser()
    try:
        if not path.is_file():
            from huggingface_hub import hf_hub_download

            repo, _, name = source.rpartition("/")
            path = Path(hf_hub_download(repo, name))
        state = load_file(path)
        pipe.unet.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - hub, file and shape errors all mean "not usable"
        raise ModelUnavailableError(
            f"model.unet={source}: could not be loaded ({first_line(e)}).\n"
            "  Give a local .safetensors file or org/repo/file.safetensors from the hub "
            "(cached, when offline), with weights for this model's UNet."
        ) from None


def _has_variant(source: str, variant: str) -> bool:
    """A local folder may lack the variant files; hub repos of the presets have them."""
    path = Path(source).expanduser()
    if not path.is_dir():
        return True
    return any(path.glob(f"*/*.{variant}.safetensors"))


def _single_file(model: ModelConfig) -> bool:
    return bool(model.path) and Path(model.path).expanduser().is_file()


def missing_model(model: ModelConfig) -> str | None:
    """Pre-flight, for a hub id, a single file's config repo, a hub VAE and a hub UNet file:
    why they cannot be had (None: cached, or the hub answers and the loader downloads them)."""
    from keyframes.pipeline import hub

    problems = []
    if _single_file(model):
        configs = model.config or CONFIG_REPOS[resolve_family(model)]
        local = Path(configs).expanduser().is_dir()
        if not local and hub.cached(configs, "model_index.json") is None and not hub.reachable():
            problems.append(_unavailable_message(model, None))
    if model.unet and not Path(model.unet).expanduser().is_file():  # org/repo/file on the hub
        repo, _, name = model.unet.rpartition("/")
        problems.append(hub.missing(repo, name, f"model.unet of {model.name}", name))
    vae = Path(model.vae).expanduser() if model.vae else None
    if vae is not None and vae.is_file():  # a single file: its config comes from a repo
        configs = vae_configs(model, resolve_family(model))
        local = Path(configs).expanduser().is_dir()
        if not local and hub.cached(configs, "vae/config.json") is None and not hub.reachable():
            problems.append(
                f"model.vae={model.vae}: a single VAE file takes its config from {configs}, "
                f"which is not in {hub.where()}.\n  Download it: uv run hf download {configs} "
                '--include "*.json" "*.txt" (or set model.config to a local diffusers folder).'
            )
    elif vae is not None and not vae.is_dir():  # a hub id
        include = '"*.json" "*.safetensors"'
        problems.append(hub.missing(model.vae, "config.json", "model.vae", include))
    from_hub = model.id and not (model.architecture or model.path)
    if from_hub and hub.cached(model.id, "model_index.json") is None and not hub.reachable():
        problems.append(_unavailable_message(model, None))
    return "\n".join(p for p in problems if p) or None


def _unavailable_message(model: ModelConfig, error: Exception | None) -> str:
    from keyframes.pipeline import hub

    if _single_file(model):
        family = resolve_family(model)
        kind, repo = (
            ("SD 1.5" if family == "sd15" else "SDXL"),
            model.config or CONFIG_REPOS[family],
        )
        where = hub.where()
        fix = (
            f"A single-file {kind} checkpoint takes the pipeline's configs (not its weights) "
            f'from {repo}: uv run hf download {repo} --include "*.json" "*.txt" on a machine '
            f"with network, or set model.config to a local diffusers {kind} folder."
        )
    elif model.path:
        where = f"the local folder {model.path}"
        fix = "Check that it is a diffusers SDXL or SD 1.5 pipeline folder (with model_index.json)."
    else:
        where = hub.where()
        patterns = (
            f'--include "*.json" "*.txt" "*.{model.variant}.safetensors"' if model.variant else ""
        )
        fix = (
            "Download it on a machine with network: "
            f"uv run hf download {model.id} {patterns}".rstrip()
            + " (then copy the cache, or point model.path at a local folder or .safetensors file)."
        )
    return (
        f"model {model.name} ({model.path or model.id}) is not available.\n"
        f"  Looked in {where}.\n"
        + (f"  Loader said: {first_line(error)}\n" if error else "")
        + f"  {fix}\n"
        "  To try keyframes without any weights: uv run python -m keyframes.run experiment=smoke "
        "(offline, CPU, tiny random-weight model)."
    )


def apply_sampler(pipe, sampler: SamplerConfig, base_config=None) -> None:
    """Swap the scheduler, keeping the model's own noise schedule (cheap: no weights).

    base_config is the model's original scheduler config. A reused pipeline must start from it:
    built from the previous job's scheduler, `euler` after `dpmpp_2m_karras` would inherit
    use_karras_sigmas=True and make different images than `euler` alone."""
    cls = scheduler_class(sampler)
    pipe.scheduler = cls.from_config(base_config or pipe.scheduler.config, **sampler.options)


def scheduler_class(sampler: SamplerConfig):
    import diffusers

    cls = getattr(diffusers, sampler.scheduler, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise ConfigError(f"sampler.scheduler={sampler.scheduler}: not a diffusers scheduler class")
    return cls


def check_sampler(sampler: SamplerConfig, steps: int, model: ModelConfig | None = None) -> None:
    """The sampler's class and options, tried on the class's own defaults before any weights
    load (cheap): an option the class does not have (from_config would drop it silently) or a
    value it refuses is a ConfigError naming it; so is a class that cannot sample the model's
    prediction type or zero terminal SNR."""
    import inspect

    cls = scheduler_class(sampler)
    known = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    needs = model_schedule(model) if model else {}
    needs = {k: v for k, v in needs.items() if v not in ("epsilon", None)}
    lacking = sorted(set(needs) - known)
    if lacking:
        raise ConfigError(
            f"sampler={sampler.name}: {cls.__name__} cannot sample this model "
            f"({', '.join(f'{k}={needs[k]}' for k in sorted(needs))}): it has no "
            f"{' and no '.join(lacking)} setting. Use sampler=euler (or euler_a, dpmpp_2m, "
            "ddim, unipc), or set model.prediction if the model was detected wrongly."
        )
    unknown = sorted(set(sampler.options) - known)
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f"the closest is {close[0]}" if close else f"it has: {', '.join(sorted(known))}"
        raise ConfigError(
            f"sampler.options.{unknown[0]}: {cls.__name__} has no such option ({hint})"
        )
    try:
        cls(**{**needs, **sampler.options}).set_timesteps(steps)
    except Exception as e:  # noqa: BLE001 - NotImplementedError, ValueError, TypeError, ...
        given = ", ".join(f"{k}={v}" for k, v in {**needs, **sampler.options}.items())
        raise ConfigError(
            f"sampler.options ({given}): {cls.__name__} refuses them: {first_line(e)}"
        ) from None


@dataclass
class LoadedPipeline:
    pipe: Any
    scheduler_config: Any  # the model's own scheduler config, before any sampler swap
    speed: dict  # what the speed settings did
    key: tuple
    placement: Placement
    memory: MemoryConfig  # the memory mode it was placed with
    warmed_up: set = field(default_factory=set)  # (batch, width, height) already run once
    refiners: dict = field(default_factory=dict)  # upscale=refiner: its source -> pipeline


# One pipeline per process, reused by every job (of a sweep) with the same model settings.
# Only one: two SDXL pipelines do not fit a 24 GB card.
_loaded: LoadedPipeline | None = None


def cached_pipeline(
    model: ModelConfig, placement: Placement, memory: MemoryConfig | str, speed: SpeedConfig
) -> tuple[LoadedPipeline, bool]:
    """(pipeline, cache hit?). Different settings replace the cached one."""
    global _loaded
    memory = memory_settings(memory)
    key = (tuple(sorted(asdict(model).items())), placement, repr(memory), repr(speed))
    if _loaded is not None and _loaded.key == key:
        return _loaded, True
    release_pipeline()
    pipe = load_pipeline(model, placement, memory)
    applied = apply_speed(pipe, speed, placement.device)
    _loaded = LoadedPipeline(pipe, pipe.scheduler.config, applied, key, placement, memory)
    return _loaded, False


def release_pipeline(collect: bool = True) -> None:
    """Drop the cached pipeline; collect=True also frees its memory now (GPU memory above all),
    which costs a garbage collection (about 0.5 s in a process with torch and MLflow loaded)."""
    global _loaded
    _loaded = None
    if collect:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
