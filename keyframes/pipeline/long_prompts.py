"""Prompts longer than CLIP's 77 tokens, encoded in full instead of cut.

The usual approach of SD front ends: the prompt's tokens are split into chunks of 75, each
chunk is encoded on its own as <start> chunk <end> (padded to 77), and the chunks' hidden
states are concatenated along the sequence; the pooled embedding SDXL also needs comes from
the first chunk. The same code serves SDXL base (two encoders, penultimate layer, side by
side), the SDXL refiner (the second encoder only) and SD 1.5 (one encoder, last layer).
Prompt and negative prompt are padded with empty chunks to the same length, since guidance
runs them as one batch. A prompt of at most 75 tokens is one chunk, encoded
exactly as diffusers does.
"""

from __future__ import annotations

import logging
import math

import torch

CHUNK = 75  # tokens per chunk, between the start and end tokens


def text_encoders(pipe) -> list[tuple]:
    """(tokenizer, encoder) pairs the pipeline has: two for SDXL base, one for the SDXL refiner
    (encoder 2 only) and for SD 1.5."""
    pairs = [
        (getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)),
        (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None)),
    ]
    return [(tokenizer, encoder) for tokenizer, encoder in pairs if encoder is not None]


def chunk_count(pipe, text: str) -> int:
    tokenizer = text_encoders(pipe)[0][0]
    return max(1, math.ceil(len(_ids(pipe, tokenizer, text)) / CHUNK))


def expand_embeddings(pipe, tokenizer, text: str) -> str:
    """A multi-vector textual-inversion token as the run of tokens it stands for ("neg" ->
    "neg neg_1 neg_2"), as diffusers' own encode_prompt does before tokenizing."""
    convert = getattr(pipe, "maybe_convert_prompt", None)
    return convert(text, tokenizer) if convert is not None else text


def _ids(pipe, tokenizer, text: str) -> list[int]:
    text = expand_embeddings(pipe, tokenizer, text)
    return tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids


def _chunks(pipe, tokenizer, text: str, count: int) -> torch.Tensor:
    """(count, 77) token ids: start, up to 75 tokens, end, padding; empty chunks at the end."""
    ids = _ids(pipe, tokenizer, text)
    rows = []
    for n in range(count):
        part = [tokenizer.bos_token_id, *ids[n * CHUNK : (n + 1) * CHUNK], tokenizer.eos_token_id]
        rows.append(part + [tokenizer.pad_token_id] * (CHUNK + 2 - len(part)))
    return torch.tensor(rows)


@torch.no_grad()
def encode(pipe, texts: list[str], count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states (batch, 77 * count, width), pooled (batch, width_2) or None) as the
    pipeline's own encode_prompt makes them: SDXL reads the penultimate layer of each encoder
    (side by side) and a pooled embedding; SD 1.5 the last layer and no pooled one."""
    device = pipe._execution_device
    sdxl = hasattr(pipe, "text_encoder_2")  # the SDXL pipelines, refiner included
    hidden, pooled = [], None
    encoders = text_encoders(pipe)
    for tokenizer, encoder in encoders:
        ids = torch.cat([_chunks(pipe, tokenizer, text, count) for text in texts])
        out = encoder(ids.to(device), output_hidden_states=True)
        states = out.hidden_states[-2] if sdxl else out[0]  # (batch * count, 77, width)
        hidden.append(states.reshape(len(texts), count * (CHUNK + 2), -1))
        if sdxl and out[0].ndim == 2:  # the projected, pooled output of the second encoder
            pooled = out[0].reshape(len(texts), count, -1)[:, 0]
    dtype = encoders[-1][1].dtype
    return torch.cat(hidden, dim=-1).to(dtype), None if pooled is None else pooled.to(dtype)


def text_inputs(pipe, prompts: list[str], negatives: list[str], mode: str) -> dict:
    """Pipeline keyword arguments for these prompts: the texts themselves where everything fits
    in 77 tokens (or mode is truncate), else the full-length embeddings."""
    count = max(chunk_count(pipe, t) for t in [*prompts, *negatives])
    if mode == "truncate" or count == 1:
        return {"prompt": prompts, "negative_prompt": negatives}
    embeds, pooled = encode(pipe, prompts, count)
    negative_embeds, negative_pooled = encode(pipe, negatives, count)
    inputs = {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds}
    if pooled is not None:
        inputs |= {"pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": negative_pooled}
    return inputs


log = logging.getLogger("keyframes")
CLIP_TOKENS = 77


def prompt_tokens(pipe, text: str) -> int:
    """CLIP tokens in text, start and end included; SDXL's text encoders read 77."""
    text = expand_embeddings(pipe, pipe.tokenizer, text)
    return len(pipe.tokenizer(text, truncation=False, verbose=False).input_ids)


def count_tokens(pipe, jobs: list, long_prompts: str) -> dict[str, int]:
    """Token count of every distinct prompt; one note per prompt longer than SDXL's 77."""
    counts = {}
    for job in jobs:
        for kind, text in (("prompt", job.prompt), ("negative prompt", job.negative_prompt)):
            if text in counts:
                continue
            counts[text] = prompt_tokens(pipe, text)
            if counts[text] <= CLIP_TOKENS:
                continue
            if long_prompts == "chunk":
                log.info(
                    "scene %s: %s is %d CLIP tokens; encoded in full, in %d chunks of 75",
                    job.scene_id, kind, counts[text], chunk_count(pipe, text),
                )  # fmt: skip
            else:
                log.warning(
                    "scene %s: %s is %d CLIP tokens; SDXL reads the first %d, the rest is cut "
                    "(long_prompts=chunk reads it all)",
                    job.scene_id, kind, counts[text], CLIP_TOKENS,
                )  # fmt: skip
    return counts


def prompt_encoding(tokens: int, long_prompts: str) -> str:
    """How a prompt of this many CLIP tokens (start and end included) reached the UNet."""
    if tokens <= CLIP_TOKENS:
        return "whole"
    return "chunked" if long_prompts == "chunk" else f"cut to {CLIP_TOKENS} tokens"
