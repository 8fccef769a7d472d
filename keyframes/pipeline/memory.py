"""Memory modes: what to trade for VRAM, chosen before the model loads. A mode is data
(conf/memory/<mode>.yaml: offload, VAE slicing and tiling, attention slicing):

    none      everything on the GPU
    balanced  + VAE slicing and tiling (no full-size decode spike)
    low_vram  model CPU offload + VAE tiling + attention slicing
    minimal   sequential CPU offload + VAE tiling
    auto      the first of none, balanced, low_vram whose estimate fits the free VRAM

The estimate is weights (parameter count x bytes per parameter, exact) plus the larger of
the UNet's activations and the VAE decode (they never coexist: the denoising loop's tensors
are freed before the decode). The per-megapixel figures were measured (below); the estimate
then matched four measured peaks within 14 %, never under them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from keyframes.config.schema import MemoryConfig, ModelConfig, memory_mode, memory_settings
from keyframes.errors import ConfigError

# Measured on an NVIDIA H200 (SDXL architecture, bfloat16, SDPA, torch 2.11, diffusers
# 0.42.1, 1024x1024, 30 steps, CFG; scripts/cuda_paths.py, 2026-11-26), peaks of
# torch.cuda.max_memory_allocated, weights 6.94 GB:
#   memory=none batch 1: 9.65 GB, batch 4: 15.69 GB; balanced batch 4: 9.67 GB;
#   low_vram batch 1: 5.97 GB (the UNet's 5.13 GB of weights + 0.84 GB).
UNET_GB_PER_MEGAPIXEL = 0.8  # per image, both guidance halves: low_vram's 0.84 GB at 1.05 MP
VAE_GB_PER_MEGAPIXEL = 2.6  # one image's decode in 16-bit: none batch 1's 2.71 GB at 1.05 MP
# (float32 decodes, as float16 models do, are counted twice that: not measured)
TILE_MEGAPIXELS = 1024 * 1024 / 1e6  # the SDXL VAE tiles images larger than 1024 px
HEADROOM_GB = 1.0  # CUDA context, allocator fragmentation
# upscale=refiner adds the SDXL refiner's UNet (it shares the base's text encoder 2 and VAE):
# counted on the meta device from keyframes/data/sdxl_refiner/unet.json (tests recount it)
REFINER_UNET_PARAMETERS = 2_259_526_660


@dataclass(frozen=True)
class MemoryPlan:
    requested: str
    mode: str
    reason: str
    free_vram_gb: float | None = None
    estimate_gb: float | None = None  # the estimate for the chosen mode
    settings: MemoryConfig | None = None  # the chosen mode's (None: as its name says)

    @property
    def applied(self) -> MemoryConfig:
        return self.settings or memory_mode(self.mode)

    def as_record(self) -> dict:
        fields = {k: v for k, v in asdict(self).items() if k != "settings"}
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in fields.items()}


def weights_gb(
    model: ModelConfig, dtype: torch.dtype, refiner: bool = False
) -> tuple[float, float]:
    """(all weights, the largest component) in GB for the model about to load, and the SDXL
    refiner's UNet with it where `refiner`."""
    from keyframes.pipeline.architectures import packaged_counts

    # every model is counted SDXL base-sized (SD 1.5 and the tiny ones are smaller: an
    # over-estimate, so auto errs toward the careful mode)
    counts = list(packaged_counts(model.architecture or "sdxl_base")["parameters"].values())
    if refiner:
        counts.append(REFINER_UNET_PARAMETERS)
    size = torch.finfo(dtype).bits // 8
    return sum(counts) * size / 1e9, max(counts) * size / 1e9


def estimate_gb(
    mode: str | MemoryConfig,
    batch_size: int,
    width: int,
    height: int,
    weights: tuple[float, float],
    float32_vae: bool = False,
    held_gb: float = 0.0,
) -> float:
    """Estimated VRAM peak of a mode (its name or its settings), in GB; `held_gb`: what
    methods keep on the card throughout, on top."""
    settings = memory_settings(mode)
    total, largest = weights
    megapixels = width * height / 1e6
    unet = batch_size * megapixels * UNET_GB_PER_MEGAPIXEL
    per_megapixel = VAE_GB_PER_MEGAPIXEL * (2 if float32_vae else 1)
    one_tile = min(megapixels, TILE_MEGAPIXELS) * per_megapixel  # slicing + tiling: the most
    if settings.offload == "sequential":
        return held_gb + one_tile  # one layer's weights at a time
    if settings.offload == "model":  # one component on the GPU at a time
        return held_gb + max(largest + unet, one_tile)
    one_image = one_tile if settings.vae_tiling else megapixels * per_megapixel
    decode = one_image if settings.vae_slicing else batch_size * one_image
    return held_gb + total + max(unet, decode)


def choose_mode(
    free_gb: float,
    batch_size: int,
    width: int,
    height: int,
    weights: tuple[float, float],
    float32_vae: bool = False,
    held_gb: float = 0.0,
) -> MemoryPlan:
    """memory=auto on a CUDA device with free_gb of free VRAM."""
    held = f" ({held_gb:.1f} GB of it kept by methods)" if held_gb >= 0.05 else ""
    for mode in ("none", "balanced", "low_vram"):
        need = estimate_gb(mode, batch_size, width, height, weights, float32_vae, held_gb)
        if need + HEADROOM_GB <= free_gb:
            reason = (
                f"estimated {need:.1f} GB{held} for batch {batch_size} at {width}x{height} "
                f"fits {free_gb:.1f} GB free"
            )
            return MemoryPlan("auto", mode, reason, free_gb, need)
    need = estimate_gb("minimal", batch_size, width, height, weights, float32_vae, held_gb)
    reason = f"only {free_gb:.1f} GB free: not even low_vram is estimated to fit"
    return MemoryPlan("auto", "minimal", reason, free_gb, need)


def plan_memory(
    requested: MemoryConfig,
    device: str,
    dtype: torch.dtype,
    model: ModelConfig,
    batch_size: int,
    width: int,
    height: int,
    refiner: bool = False,  # upscale=refiner: its UNet is on the card too
    held_gb: float = 0.0,  # what methods keep on the card (consistency=story's anchor tokens)
) -> MemoryPlan:
    """Resolve the memory setting for this device, or say why it cannot work here."""
    if requested.offload != "none":
        if device != "cuda":
            raise ConfigError(
                f"memory={requested.name} moves weights between CPU and GPU memory: it needs "
                f"device=cuda (this run is on {device}). Use memory=auto or memory=none."
            )
        from diffusers.utils import is_accelerate_available

        if not is_accelerate_available():
            raise ConfigError(
                f"memory={requested.name} needs the accelerate package for CPU offload "
                "(uv sync installs it); or use memory=balanced"
            )
    if requested.name != "auto":
        return MemoryPlan(requested.name, requested.name, "asked for", settings=requested)
    if device != "cuda":
        return MemoryPlan("auto", "none", f"{device}: no GPU memory to save")
    free, _ = torch.cuda.mem_get_info()
    float32_vae = dtype == torch.float16  # the SDXL VAE decodes in float32 under float16
    return choose_mode(
        free / 1e9,
        batch_size,
        width,
        height,
        weights_gb(model, dtype, refiner),
        float32_vae,
        held_gb,
    )


def apply_memory_mode(pipe, mode: MemoryConfig, device: str):
    """Place the pipeline as the mode says; returns it."""
    if device == "cuda":  # this process's GPU (accelerate sets it); offload would take GPU 0
        device = f"cuda:{torch.cuda.current_device()}"
    if mode.offload == "none":
        pipe = pipe.to(device)
    if mode.vae_slicing:
        pipe.vae.enable_slicing()
    if mode.vae_tiling:
        pipe.vae.enable_tiling()
    if mode.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    if mode.attention_slicing:
        pipe.enable_attention_slicing()
    if mode.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    return pipe
