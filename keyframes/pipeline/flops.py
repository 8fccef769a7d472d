"""Analytical FLOP counts for an SDXL-style image, to turn seconds into achieved TFLOP/s.

The counts come from torch.utils.flop_counter run on the `meta` device (shapes only: no
memory, no weights): it counts matrix multiplies, convolutions and attention, 2 FLOPs per
multiply-add. For the SDXL base architecture they are counted once, by
scripts/count_architecture.py, and kept in keyframes/data/sdxl_base/counts.json; any other
model (the tiny one) is counted on the fly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from keyframes.pipeline.architectures import architecture_configs, build_components, packaged_counts

TEXT_TOKENS = 77

# Dense (no sparsity) bf16/fp16 tensor-core peaks with float32 accumulation, as PyTorch runs
# them, from the vendors' datasheets, in TFLOP/s. Matched against torch's device name.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
)


@dataclass(frozen=True)
class ImageFlops:
    unet_per_sample_step: float  # one UNet forward, one sample (CFG runs two per step)
    vae_decode: float  # one image
    text_encoders: float  # one prompt through both text encoders
    unet_shallow_per_sample_step: float | None = None  # DeepCache's shallow branch, if counted

    def per_image(self, steps: int, cfg_scale: float) -> float:
        """FLOPs to make one image: guidance > 1 runs the UNet and the text encoders on the
        prompt and the negative prompt (classifier-free guidance), as diffusers does."""
        guided = 2 if cfg_scale > 1 else 1
        return self.spent(guided * steps, cfg_scale)

    def spent(self, unet_evaluations: float, cfg_scale: float, shallow: float = 0) -> float:
        """FLOPs one image cost, from the base-UNet evaluations it really made (a guidance
        interval or feature reuse makes fewer than steps x 2) and the shallow-branch ones."""
        prompts = 2 if cfg_scale > 1 else 1  # the negative prompt is encoded when guiding
        return (
            unet_evaluations * self.unet_per_sample_step
            + shallow * (self.unet_shallow_per_sample_step or 0)
            + prompts * self.text_encoders
            + self.vae_decode
        )


def count_flops(unet, vae, text_encoders, width: int, height: int) -> ImageFlops:
    """Count the FLOPs of one sample through each component at this size. Works on modules
    on any device; on `meta` it is free."""
    from torch.utils.flop_counter import FlopCounterMode

    first = next(unet.parameters())
    inputs = unet_inputs(unet, width, height)
    latent = inputs["sample"]
    ids = torch.zeros(1, TEXT_TOKENS, dtype=torch.long, device=first.device)

    def flops(call) -> float:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            call()
        return float(counter.get_total_flops())

    return ImageFlops(
        unet_per_sample_step=flops(lambda: unet(**inputs)),
        vae_decode=flops(lambda: vae.decode(latent.to(vae.dtype))),
        text_encoders=sum(flops(lambda e=e: e(ids)) for e in text_encoders),
    )


def unet_inputs(unet, width: int, height: int) -> dict:
    """One sample's UNet arguments at this size, SDXL's added conditioning included (SD 1.5
    has none)."""
    first = next(unet.parameters())
    c, like = unet.config, dict(device=first.device, dtype=first.dtype)
    inputs = dict(
        sample=torch.zeros(1, c.in_channels, height // 8, width // 8, **like),
        timestep=torch.tensor(500.0),
        encoder_hidden_states=torch.zeros(1, TEXT_TOKENS, c.cross_attention_dim, **like),
    )
    if c.addition_embed_type == "text_time":
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.zeros(1, pooled, **like),
            "time_ids": torch.zeros(1, 6, **like),
        }
    return inputs


def count_architecture(name: str, width: int, height: int) -> ImageFlops:
    unet, vae, text_encoder, text_encoder_2 = build_components(name, "meta")
    return count_flops(unet, vae, (text_encoder, text_encoder_2), width, height)


def packaged_flops(name: str, width: int, height: int) -> ImageFlops | None:
    entry = packaged_counts(name)["flops"].get(f"{width}x{height}")
    return ImageFlops(**entry) if entry else None


def architecture_of(pipe) -> str | None:
    """The packaged architecture this pipeline's UNet has, if any (its weights may be real)."""
    config = dict(pipe.unet.config)
    for name in ("sdxl_base",):
        published = architecture_configs(name)["unet"]
        keys = ("block_out_channels", "transformer_layers_per_block", "cross_attention_dim")
        if all(list(_as_list(config.get(k))) == _as_list(published[k]) for k in keys):
            return name
    return None


def _as_list(value):
    return list(value) if isinstance(value, list | tuple) else [value]


def image_flops(pipe, width: int, height: int) -> tuple[ImageFlops, str]:
    """(FLOPs, where the numbers come from) for this pipeline at this size. Counted on fresh
    meta-device copies built from the configs: the useful work, not the extra of VAE tiles'
    overlap or of a patched attention."""
    name = architecture_of(pipe)
    if name:
        packaged = packaged_flops(name, width, height)
        if packaged:
            return packaged, f"packaged counts ({name}, {width}x{height})"
        return count_architecture(name, width, height), f"counted now on meta ({name})"
    encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e]
    key = json.dumps(
        [dict(pipe.unet.config), dict(pipe.vae.config), *(e.config.to_dict() for e in encoders)],
        sort_keys=True,
        default=str,
    )
    if (key, width, height) not in _COUNTED:
        _COUNTED[key, width, height] = _count_on_meta(pipe, encoders, width, height)
    return _COUNTED[key, width, height], "counted now on meta (this model)"


# once per process for each set of configurations and size: every run counts the model it
# loaded, and a process (the tests, a sweep) makes many runs of one model
_COUNTED: dict[tuple[str, int, int], ImageFlops] = {}


def _count_on_meta(pipe, encoders: list, width: int, height: int) -> ImageFlops:
    with torch.device("meta"):
        unet = type(pipe.unet).from_config(pipe.unet.config)
        vae = type(pipe.vae).from_config(pipe.vae.config)
        encoders = [type(e)(e.config) for e in encoders]
    return count_flops(unet, vae, encoders, width, height)


def peak_tflops(device_name: str) -> float | None:
    for key, peak in PEAK_TFLOPS:
        if key in device_name:
            return peak
    return None
