"""The parts of a diffusers self-attention layer that keyframes' attention processors share:
the tokens a layer attends with, attention over another set of keys and values, and the
layer's output as diffusers' own processor (AttnProcessor2_0) shapes it."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def self_attention_tokens(
    attn, hidden_states: torch.Tensor, temb=None
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """(the layer's input as (batch, tokens, channels), a function turning the attention's
    result into the layer's output: projection, shape, residual, rescale)."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    image_input = hidden_states.ndim == 4
    if image_input:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

    def finish(out: torch.Tensor) -> torch.Tensor:
        out = attn.to_out[1](attn.to_out[0](out.to(hidden_states.dtype)))
        if image_input:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    return hidden_states, finish


class SelfAttentionProcessor:
    """A diffusers attention processor for unmasked self-attention (attn1): a subclass says
    how the layer's tokens attend (`attention`, before the output projection)."""

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        *args,
        **kwargs,
    ):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"{type(self).__name__} is for unmasked self-attention only")
        tokens, finish = self_attention_tokens(attn, hidden_states, temb)
        return finish(self.attention(attn, tokens))

    def attention(self, attn, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def heads(attn, x: torch.Tensor) -> torch.Tensor:
    """(batch, tokens, channels) -> (batch, heads, tokens, head_dim)"""
    return x.view(x.shape[0], -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)


def merged_heads(attn, x: torch.Tensor) -> torch.Tensor:
    """(batch, heads, tokens, head_dim) -> (batch, tokens, channels)"""
    return x.transpose(1, 2).reshape(x.shape[0], -1, attn.heads * x.shape[-1])


def projections(attn, tokens: torch.Tensor, context: torch.Tensor):
    """The layer's queries of `tokens` and keys and values of `context`, by head, normed
    where the layer norms them."""
    q = heads(attn, attn.to_q(tokens))
    k, v = heads(attn, attn.to_k(context)), heads(attn, attn.to_v(context))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return q, k, v


def attend(attn, tokens: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The layer's attention of `tokens`' queries over `context`'s keys and values (both
    (batch, tokens, channels), the same batch), before the output projection."""
    return merged_heads(attn, F.scaled_dot_product_attention(*projections(attn, tokens, context)))
