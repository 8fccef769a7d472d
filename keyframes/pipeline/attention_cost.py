"""What attending to extra tokens costs, counted from a UNet's published config: the size of
every self-attention layer at an image size, the FLOPs of extra keys and values, and the
memory of kept tokens. Analytic, so a plan can be costed before anything loads; the tests
check the layers against a forward pass on the `meta` device and the FLOPs against
torch.utils.flop_counter, for the tiny and the full-size SDXL configs."""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil

VAE_SCALE = 8  # pixels per latent pixel in SD 1.5 and SDXL


@dataclass(frozen=True)
class SelfAttention:
    layer: str  # the attention module's name, e.g. up_blocks.0.attentions.1.transformer_blocks.3
    tokens: int  # its sequence length at this image size
    channels: int


def _per_block(value, blocks: int) -> list:
    return list(value) if isinstance(value, list | tuple) else [value] * blocks


def self_attention_layers(config: dict, width: int, height: int) -> list[SelfAttention]:
    """Every transformer block's self-attention (attn1) of a diffusers UNet2DConditionModel
    with this config, at this image size, in the order the UNet runs them."""
    channels = list(config["block_out_channels"])
    levels = len(channels)
    depth = _per_block(config.get("transformer_layers_per_block", 1), levels)
    up_depth = config.get("reverse_transformer_layers_per_block") or depth[::-1]
    per_level = _per_block(config.get("layers_per_block", 2), levels)
    latent_h, latent_w = height // VAE_SCALE, width // VAE_SCALE  # as the pipelines size latents

    def tokens(level: int) -> int:  # each stride-2 downsample rounds up
        h, w = latent_h, latent_w
        for _ in range(level):
            h, w = ceil(h / 2), ceil(w / 2)
        return h * w

    def blocks(prefix: str, attentions: int, depths, level: int) -> list[SelfAttention]:
        return [
            SelfAttention(
                f"{prefix}.attentions.{a}.transformer_blocks.{t}", tokens(level), channels[level]
            )
            for a in range(attentions)
            for t in range(_per_block(depths, attentions)[a])
        ]

    layers = []
    for i, kind in enumerate(config["down_block_types"]):
        if "CrossAttn" in kind:
            layers += blocks(f"down_blocks.{i}", per_level[i], depth[i], i)
    if (config.get("mid_block_type") or "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn":
        layers += blocks("mid_block", 1, depth[-1], levels - 1)
    for j, kind in enumerate(config["up_block_types"]):
        if "CrossAttn" in kind:
            level = levels - 1 - j
            layers += blocks(f"up_blocks.{j}", per_level[::-1][j] + 1, up_depth[j], level)
    return layers


def shared_layers(layers: list[SelfAttention], prefixes: list[str]) -> list[SelfAttention]:
    return [a for a in layers if a.layer.startswith(tuple(prefixes))]


def kept_count(tokens: int, share: float) -> int:
    """How many of a layer's tokens one image passes on (as conditioning/story.kept_tokens)."""
    return max(1, round(share * tokens))


def extra_attention_flops(layers: list[SelfAttention], extra: dict[str, int]) -> float:
    """FLOPs of one UNet evaluation of one sample attending to `extra[layer]` more tokens
    in each layer: their keys and values (2 projections) and the scores and weighted sum
    over them (2 matrix products), 2 FLOPs per multiply-add."""
    total = 0.0
    for a in layers:
        k = extra.get(a.layer, 0)
        total += 2 * (2 * k * a.channels * a.channels) + 2 * (2 * a.tokens * k * a.channels)
    return total


def kept_values(layers: list[SelfAttention], share: float, images: int) -> int:
    """Values kept per UNet evaluation of one sample when `images` images each pass on
    `share` of every layer's tokens."""
    return sum(images * kept_count(a.tokens, share) * a.channels for a in layers)
