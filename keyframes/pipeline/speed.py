"""Speed settings applied to a loaded pipeline: SDPA attention, fused QKV projections,
channels_last, TF32, torch.compile. Which ones took effect is returned, for the manifest."""

from __future__ import annotations

import torch

from keyframes.config.schema import SpeedConfig
from keyframes.errors import ConfigError


def check_speed(speed: SpeedConfig, device: str) -> None:
    """Fail before anything loads where a setting cannot work on this device."""
    if speed.compile and device != "cuda":
        raise ConfigError(
            f"speed={speed.name} compiles the model for a CUDA GPU (this run is on {device}). "
            "Use speed=sdpa or speed=fast, or run on a GPU."
        )


def apply_speed(pipe, speed: SpeedConfig, device: str) -> dict:
    """Apply the settings in place; returns what was applied. Call after the memory mode, on
    the pipeline's final device."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    check_speed(speed, device)
    applied: dict = {"attention": "sdpa"}
    offloaded = _offloaded(pipe)
    if _attention_sliced(pipe):
        applied["attention"] = "sliced"  # memory=low_vram asked for it: keep it
    elif speed.fuse_qkv and not offloaded:
        pipe.fuse_qkv_projections()  # sets the fused SDPA processor itself
        applied["fuse_qkv"] = True
    else:
        pipe.unet.set_attn_processor(AttnProcessor2_0())
        pipe.vae.set_attn_processor(AttnProcessor2_0())
    if speed.channels_last and not offloaded:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        applied["channels_last"] = True
    if offloaded and (speed.fuse_qkv or speed.channels_last):
        applied["skipped"] = "fuse_qkv/channels_last: not applied to CPU-offloaded weights"
    if speed.tf32 and device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        applied["tf32"] = True
    if speed.compile:
        options = dict(fullgraph=True, dynamic=False, mode=speed.compile_mode)
        if getattr(pipe.unet, "_repeated_blocks", None):
            # one compile of the transformer block, reused by all 70 of them in SDXL
            pipe.unet.compile_repeated_blocks(**options)
            applied["compile"] = "unet repeated blocks + vae decoder"
        else:
            pipe.unet.compile(**options)
            applied["compile"] = "unet + vae decoder"
        pipe.vae.decoder.compile(**options)
        applied["compile_mode"] = speed.compile_mode
    return applied


def _attention_sliced(pipe) -> bool:
    from diffusers.models.attention_processor import SlicedAttnProcessor

    return any(isinstance(p, SlicedAttnProcessor) for p in pipe.unet.attn_processors.values())


def _offloaded(pipe) -> bool:
    return getattr(pipe.unet, "_hf_hook", None) is not None
