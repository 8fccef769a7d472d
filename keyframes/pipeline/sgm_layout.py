"""Write a diffusers SDXL or SD 1.x pipeline as one original-layout checkpoint: the single
`.safetensors` file most community models come as (Stability's generative-models "SGM" layout
for SDXL, CompVis' latent-diffusion layout for SD 1.x).

    SDXL:   model.diffusion_model.*               the UNet, in the original block numbering
            conditioner.embedders.0.transformer.* CLIP ViT-L text model, transformers' names
            conditioner.embedders.1.model.*       OpenCLIP ViT-bigG text tower, open_clip's names
            first_stage_model.*                   the VAE, in the original numbering
    SD 1.x: model.diffusion_model.*, cond_stage_model.transformer.*, first_stage_model.*

The mappings are written from those layouts (the original UNet's input_blocks / middle_block /
output_blocks, open_clip's resblocks with one fused in_proj). `unet_original_name` is shared
with the kohya LoRA writer, whose SDXL names follow the same numbering."""

from __future__ import annotations

from pathlib import Path

import torch

# ResBlock parts: diffusers name -> original name
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
# the VAE's mid-block attention: linear layers in diffusers, 1x1 convolutions in the original
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
# OpenCLIP text tower: transformers' name (under text_model.encoder.layers.N) -> open_clip's
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
LOGIT_SCALE = 4.6052  # ln(100), what open_clip's trained towers hold; unused for text encoding


def _unet_blocks(config) -> dict[str, tuple[str, dict]]:
    """diffusers module path -> (original module path, renames of the parts inside it)."""
    per_block = config.layers_per_block  # SDXL 2, SD 1.x 2; the tiny models 1
    blocks = {
        "conv_in": ("input_blocks.0.0", {}),
        "time_embedding.linear_1": ("time_embed.0", {}),
        "time_embedding.linear_2": ("time_embed.2", {}),
        "add_embedding.linear_1": ("label_emb.0.0", {}),  # SDXL's size and pooled-text input
        "add_embedding.linear_2": ("label_emb.0.2", {}),
        "conv_norm_out": ("out.0", {}),
        "conv_out": ("out.2", {}),
        "mid_block.resnets.0": ("middle_block.0", _UNET_RESNET),
        "mid_block.attentions.0": ("middle_block.1", {}),
        "mid_block.resnets.1": ("middle_block.2", _UNET_RESNET),
    }
    for b in range(len(config.down_block_types)):
        first = 1 + b * (per_block + 1)  # input_blocks.0 is conv_in; each level adds a downsampler
        for n in range(per_block):
            blocks[f"down_blocks.{b}.resnets.{n}"] = (f"input_blocks.{first + n}.0", _UNET_RESNET)
            blocks[f"down_blocks.{b}.attentions.{n}"] = (f"input_blocks.{first + n}.1", {})
        downsampler = f"input_blocks.{first + per_block}.0.op"
        blocks[f"down_blocks.{b}.downsamplers.0.conv"] = (downsampler, {})
    for b, kind in enumerate(config.up_block_types):
        first = b * (per_block + 1)  # up blocks have one layer more than down blocks
        for n in range(per_block + 1):
            blocks[f"up_blocks.{b}.resnets.{n}"] = (f"output_blocks.{first + n}.0", _UNET_RESNET)
            blocks[f"up_blocks.{b}.attentions.{n}"] = (f"output_blocks.{first + n}.1", {})
        after = 2 if "CrossAttn" in kind else 1  # after the attention, where there is one
        upsampler = f"output_blocks.{first + per_block}.{after}.conv"
        blocks[f"up_blocks.{b}.upsamplers.0.conv"] = (upsampler, {})
    return blocks


def _vae_blocks(config) -> dict[str, tuple[str, dict]]:
    levels = len(config.down_block_types)
    blocks = {}
    for half in ("encoder", "decoder"):
        blocks[f"{half}.conv_norm_out"] = (f"{half}.norm_out", {})
        blocks[f"{half}.mid_block.resnets.0"] = (f"{half}.mid.block_1", _VAE_RESNET)
        blocks[f"{half}.mid_block.resnets.1"] = (f"{half}.mid.block_2", _VAE_RESNET)
        blocks[f"{half}.mid_block.attentions.0"] = (f"{half}.mid.attn_1", _VAE_ATTENTION)
    for b in range(levels):
        down = f"encoder.down.{b}"
        up = f"decoder.up.{levels - 1 - b}"  # the original numbers from the lowest resolution
        blocks[f"encoder.down_blocks.{b}.downsamplers.0.conv"] = (f"{down}.downsample.conv", {})
        blocks[f"decoder.up_blocks.{b}.upsamplers.0.conv"] = (f"{up}.upsample.conv", {})
        for n in range(config.layers_per_block + 1):  # the decoder's count (encoder: one less)
            blocks[f"encoder.down_blocks.{b}.resnets.{n}"] = (f"{down}.block.{n}", _VAE_RESNET)
            blocks[f"decoder.up_blocks.{b}.resnets.{n}"] = (f"{up}.block.{n}", _VAE_RESNET)
    return blocks


def _rename(name: str, blocks: dict[str, tuple[str, dict]]) -> str:
    """A module path or parameter name in diffusers' numbering, in the original's: the longest
    mapped block that contains it, then the part inside the block. Unmapped names stay."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        block = ".".join(parts[:cut])
        if block in blocks:
            original, parts_inside = blocks[block]
            rest = ".".join(parts[cut:])
            for old, new in parts_inside.items():
                if rest == old or rest.startswith(old + "."):
                    rest = new + rest[len(old) :]
                    break
            return f"{original}.{rest}" if rest else original
    return name


def unet_original_name(name: str, config) -> str:
    """A UNet module or parameter name, as the original UNet (and kohya's SDXL LoRAs) name it."""
    return _rename(name, _unet_blocks(config))


def _vae_state(vae) -> dict[str, torch.Tensor]:
    blocks = _vae_blocks(vae.config)
    state = {}
    for key, value in vae.state_dict().items():
        original = _rename(key, blocks)
        if ".mid.attn_1." in original and value.ndim == 2:
            value = value[:, :, None, None]  # a 1x1 convolution's weight
        state[original] = value
    return state


def clip_full_name(name: str) -> str:
    """A CLIP text model's module or parameter name in full (text_model.*), as the originals
    and kohya's LoRAs have them: recent transformers drop that level from CLIPTextModel."""
    if name.startswith(("text_model.", "text_projection")):
        return name
    return "text_model." + name


def _clip_state(encoder) -> dict[str, torch.Tensor]:
    return {clip_full_name(key): value for key, value in encoder.state_dict().items()}


def _open_clip_state(encoder) -> dict[str, torch.Tensor]:
    """transformers' CLIPTextModelWithProjection in open_clip's names: one fused in_proj per
    attention (q, k, v stacked), the projection as a matrix applied on the right."""
    clip = _clip_state(encoder)
    state = {
        "token_embedding.weight": clip.pop("text_model.embeddings.token_embedding.weight"),
        "positional_embedding": clip.pop("text_model.embeddings.position_embedding.weight"),
        "ln_final.weight": clip.pop("text_model.final_layer_norm.weight"),
        "ln_final.bias": clip.pop("text_model.final_layer_norm.bias"),
        "text_projection": clip.pop("text_projection.weight").T.contiguous(),
        "logit_scale": torch.tensor(LOGIT_SCALE, dtype=encoder.dtype),
    }
    for layer in range(encoder.config.num_hidden_layers):
        ours, theirs = f"text_model.encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            q, k, v = (clip.pop(f"{ours}self_attn.{p}_proj.{kind}") for p in "qkv")
            state[f"{theirs}attn.in_proj_{kind}"] = torch.cat([q, k, v])
            for old, new in _OPEN_CLIP_LAYER.items():
                state[f"{theirs}{new}.{kind}"] = clip.pop(f"{ours}{old}.{kind}")
    clip.pop("text_model.embeddings.position_ids", None)  # a buffer, not a weight
    if clip:
        raise ValueError(f"text encoder 2: no open_clip name for {sorted(clip)[:3]}")
    return state


def original_state_dict(pipe) -> dict[str, torch.Tensor]:
    """The pipeline's weights under the original single-file names (SDXL when it has a second
    text encoder, else SD 1.x)."""
    blocks = _unet_blocks(pipe.unet.config)
    state = {
        f"model.diffusion_model.{_rename(k, blocks)}": v for k, v in pipe.unet.state_dict().items()
    }
    state |= {f"first_stage_model.{k}": v for k, v in _vae_state(pipe.vae).items()}
    if getattr(pipe, "text_encoder_2", None) is not None:
        state |= {
            f"conditioner.embedders.0.transformer.{k}": v
            for k, v in _clip_state(pipe.text_encoder).items()
        }
        state |= {
            f"conditioner.embedders.1.model.{k}": v
            for k, v in _open_clip_state(pipe.text_encoder_2).items()
        }
    else:
        state |= {
            f"cond_stage_model.transformer.{k}": v
            for k, v in _clip_state(pipe.text_encoder).items()
        }
    return state


def write_single_file(pipe, path: Path, dtype: torch.dtype = torch.float16) -> Path:
    """The pipeline as one original-layout .safetensors file, in float16 as most are shared."""
    from safetensors.torch import save_file

    state = {k: v.to(dtype).contiguous() for k, v in original_state_dict(pipe).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, path)
    return path


def write_vae_file(vae, path: Path, dtype: torch.dtype = torch.float16) -> Path:
    """A VAE on its own as the SDXL VAE is shared (stabilityai/sdxl-vae's sdxl_vae.safetensors,
    the fp16-fix's): the original layout's names, without the checkpoint's first_stage_model."""
    from safetensors.torch import save_file

    state = {k: v.to(dtype).contiguous() for k, v in _vae_state(vae).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, path)
    return path
