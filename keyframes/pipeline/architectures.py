"""Full-size architectures from the published configs packaged in keyframes/data/<name>/,
built with random weights (`model=sdxl_random`) or on the `meta` device, where only shapes
exist: parameter counts and FLOP counts cost no memory and no download.

Random weights make noise, not pictures: the point is a real-size run for speed and memory.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch

from keyframes.config.schema import ARCHITECTURES

DATA = Path(__file__).resolve().parent.parent / "data"
INIT_SEED = 0


def architecture_configs(name: str) -> dict[str, dict]:
    """{component: config} as published, e.g. unet, vae, text_encoder, text_encoder_2."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; packaged: {', '.join(ARCHITECTURES)}")
    return published_configs(name)


def published_configs(model: str) -> dict[str, dict]:
    """{component: config} of a model as its repo publishes them: sdxl_base, sdxl_refiner
    (its UNet; the rest is the base's), sd15. The full-size architectures and the tiny models
    are both built from these."""
    folder = DATA / model
    return {
        path.stem: json.loads(path.read_text())
        for path in sorted(folder.glob("*.json"))
        if path.stem != "counts"
    }


def build_components(name: str, device: str | torch.device = "meta", dtype=torch.float32):
    """(unet, vae, text_encoder, text_encoder_2) of the architecture, random weights drawn
    from a fixed seed, created on `device` in `dtype` (no float32 copy on the way)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = architecture_configs(name)
    device = torch.device(device)
    makers = {
        "unet": lambda c: UNet2DConditionModel.from_config(c),
        "vae": lambda c: AutoencoderKL.from_config(c),
        "text_encoder": lambda c: CLIPTextModel(CLIPTextConfig(**c)),
        "text_encoder_2": lambda c: CLIPTextModelWithProjection(CLIPTextConfig(**c)),
    }
    built = {}
    cuda = [device] if device.type == "cuda" else []
    default_dtype = torch.get_default_dtype()
    try:
        with torch.random.fork_rng(devices=cuda), torch.device(device):
            torch.set_default_dtype(dtype)
            torch.manual_seed(INIT_SEED)
            for component, make in makers.items():
                built[component] = make(configs[component]).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    return built["unet"], built["vae"], built["text_encoder"], built["text_encoder_2"]


def build_random_pipeline(name: str, device: str, dtype: torch.dtype):
    """A StableDiffusionXLPipeline of the full-size architecture with random weights and the
    real CLIP tokenizer, built directly on the device (seconds on a GPU; minutes on a CPU)."""
    from diffusers import EulerDiscreteScheduler

    from keyframes.pipeline.tiny import assemble_sdxl

    scheduler = EulerDiscreteScheduler.from_config(architecture_configs(name)["scheduler"])
    return assemble_sdxl(*build_components(name, device, dtype), scheduler)


def count_parameters(name: str) -> dict[str, int]:
    """Parameters per component, counted on the meta device (no memory, no weights)."""
    modules = build_components(name, "meta")
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    return {n: sum(p.numel() for p in m.parameters()) for n, m in zip(names, modules, strict=True)}


def counts_path(name: str) -> Path:
    """Parameter and FLOP counts of the architecture, written by scripts/count_architecture.py."""
    return DATA / name / "counts.json"


@cache
def packaged_counts(name: str) -> dict:
    return json.loads(counts_path(name).read_text())
