"""Write an SDXL LoRA in kohya's layout (sd-scripts, the form most community LoRAs come in):

    lora_unet_<module>.lora_down.weight / .lora_up.weight / .alpha   the UNet, in the original
        (SGM) block numbering, "_" for ".", e.g. lora_unet_input_blocks_4_1_proj_in
    lora_te1_<module>...   the first text encoder (CLIP ViT-L), transformers' names
    lora_te2_<module>...   the second (OpenCLIP bigG), transformers' names too

A module's update is up @ down * alpha / rank. The input is PEFT's state dict (lora_A = down,
lora_B = up, scale 1, as diffusers saves a LoRA without alphas)."""

from __future__ import annotations

from pathlib import Path

import torch

from keyframes.pipeline.sgm_layout import clip_full_name, unet_original_name

PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def kohya_name(part: str, module: str, unet_config) -> str:
    """kohya's name for a LoRA-wrapped module of one part of the pipeline."""
    if part == "unet":
        module = unet_original_name(module, unet_config)
    else:
        module = clip_full_name(module)
    return PREFIXES[part] + module.replace(".", "_")


def kohya_state_dict(
    layers: dict[str, dict[str, torch.Tensor]], unet_config, alpha_ratio: float = 0.5
) -> dict[str, torch.Tensor]:
    """layers: part ("unet", "text_encoder", "text_encoder_2") -> PEFT state dict of that part.
    alpha = rank * alpha_ratio, as trainers often set it (rank 4, alpha 2); up is scaled by
    1 / alpha_ratio so that the update is the same as the PEFT LoRA's."""
    state = {}
    for part, peft_state in layers.items():
        for key, down in peft_state.items():
            if ".lora_A." not in key:
                continue
            module = key.split(".lora_A.")[0]
            up = peft_state[key.replace(".lora_A.", ".lora_B.")]
            name = kohya_name(part, module, unet_config)
            rank = down.shape[0]
            state[f"{name}.lora_down.weight"] = down.contiguous()
            state[f"{name}.lora_up.weight"] = (up / alpha_ratio).contiguous()
            state[f"{name}.alpha"] = torch.tensor(rank * alpha_ratio, dtype=down.dtype)
    return state


def write_kohya_lora(layers, unet_config, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file(
        kohya_state_dict(layers, unet_config), path, metadata={"ss_network_module": "networks.lora"}
    )
    return path
