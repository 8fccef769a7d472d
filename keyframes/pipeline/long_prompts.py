"""Prompts longer than CLIP's 77 tokens, encoded in full instead of cut.

The usual approach of SD front ends: the prompt's tokens are split into chunks of 75, each
chunk is encoded on its own as <start> chunk <end> (padded to 77), and the chunks' hidden
states are concatenated along the sequence; the pooled embedding SDXL also needs comes from
the first chunk. The same code serves SDXL base (two encoders, penultimate layer, side by
side), the SDXL refiner (the second encoder only) and SD 1.5 (one encoder, last layer).
Prompt and negative prompt are padded with empty chunks to the same length, since guidance
runs them as one batch. A prompt of at most 75 tokens is one chunk, encoded
exactly as diffusers does. With A1111 weighting (`(words:1.3)`, BREAK; shotlist/weighting.py)
each chunk's hidden states are weighted per token and scaled back to their mean, per encoder.
"""

from __future__ import annotations

import logging

import torch

from keyframes.shotlist.weighting import Fragment, is_plain, parse_weights

CHUNK = 75  # tokens per chunk, between the start and end tokens


def text_encoders(pipe) -> list[tuple]:
    """(tokenizer, encoder) pairs the pipeline has: two for SDXL base, one for the SDXL refiner
    (encoder 2 only) and for SD 1.5."""
    pairs = [
        (getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)),
        (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None)),
    ]
    return [(tokenizer, encoder) for tokenizer, encoder in pairs if encoder is not None]


def chunk_count(pipe, text: str, weighting: str = "none") -> int:
    tokenizer = text_encoders(pipe)[0][0]
    return len(_token_chunks(pipe, tokenizer, text, weighting))


def expand_embeddings(pipe, tokenizer, text: str) -> str:
    """A multi-vector textual-inversion token as the run of tokens it stands for ("neg" ->
    "neg neg_1 neg_2"), as diffusers' own encode_prompt does before tokenizing."""
    convert = getattr(pipe, "maybe_convert_prompt", None)
    return convert(text, tokenizer) if convert is not None else text


def _ids(pipe, tokenizer, text: str) -> list[int]:
    text = expand_embeddings(pipe, tokenizer, text)
    return tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids


def _token_chunks(pipe, tokenizer, text: str, weighting: str) -> list[tuple[list, list]]:
    """(token ids, weights) of each chunk of at most 75 tokens. With A1111 weighting each run
    of the parsed prompt is tokenized on its own, as A1111 does, and BREAK starts a chunk."""
    fragments = parse_weights(text) if weighting == "a1111" else [Fragment(text, 1.0)]
    chunks: list[tuple[list, list]] = [([], [])]
    for fragment in fragments:
        if fragment.breaks:
            chunks.append(([], []))
            continue
        for token in _ids(pipe, tokenizer, fragment.text) if fragment.text else []:
            if len(chunks[-1][0]) == CHUNK:
                chunks.append(([], []))
            chunks[-1][0].append(token)
            chunks[-1][1].append(fragment.weight)
    if len(chunks) > 1 and not chunks[-1][0]:
        chunks.pop()  # a BREAK at the end starts nothing
    return chunks


def _rows(chunks: list[tuple[list, list]], count: int, tokenizer) -> tuple[torch.Tensor, ...]:
    """(count, 77) token ids (start, up to 75 tokens, end, padding; empty chunks at the end)
    and their weights (1 for start, end and padding)."""
    ids, weights = [], []
    for n in range(count):
        tokens, token_weights = chunks[n] if n < len(chunks) else ([], [])
        pad = CHUNK - len(tokens)
        ids.append(
            [tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id]
            + [tokenizer.pad_token_id] * pad
        )
        weights.append([1.0, *token_weights, 1.0] + [1.0] * pad)
    return torch.tensor(ids), torch.tensor(weights)


def _emphasis(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's weighting of one chunk's hidden states: each token's vector times its weight,
    then the whole chunk rescaled to the mean it had ("Original" emphasis). Per chunk of each
    prompt (A1111 takes the mean over its batch, which holds one prompt)."""
    if bool((weights == 1).all()):
        return states
    means = states.mean(dim=(1, 2), keepdim=True)
    weighted = states * weights.to(states.dtype)[..., None]
    return weighted * (means / weighted.mean(dim=(1, 2), keepdim=True))


@torch.no_grad()
def encode(
    pipe, texts: list[str], count: int, weighting: str = "none"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states (batch, 77 * count, width), pooled (batch, width_2) or None) as the
    pipeline's own encode_prompt makes them: SDXL reads the penultimate layer of each encoder
    (side by side) and a pooled embedding; SD 1.5 the last layer and no pooled one. Weights
    (weighting=a1111) scale each encoder's hidden states; the pooled embedding is unweighted,
    as in A1111."""
    device = pipe._execution_device
    sdxl = hasattr(pipe, "text_encoder_2")  # the SDXL pipelines, refiner included
    hidden, pooled = [], None
    encoders = text_encoders(pipe)
    for tokenizer, encoder in encoders:
        rows = [
            _rows(_token_chunks(pipe, tokenizer, t, weighting), count, tokenizer) for t in texts
        ]
        ids, weights = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
        out = encoder(ids.to(device), output_hidden_states=True)
        states = out.hidden_states[-2] if sdxl else out[0]  # (batch * count, 77, width)
        states = _emphasis(states, weights.to(device))
        hidden.append(states.reshape(len(texts), count * (CHUNK + 2), -1))
        if sdxl and out[0].ndim == 2:  # the projected, pooled output of the second encoder
            pooled = out[0].reshape(len(texts), count, -1)[:, 0]
    dtype = encoders[-1][1].dtype
    return torch.cat(hidden, dim=-1).to(dtype), None if pooled is None else pooled.to(dtype)


def text_inputs(
    pipe, prompts: list[str], negatives: list[str], mode: str, weighting: str = "none"
) -> dict:
    """Pipeline keyword arguments for these prompts: the texts themselves where everything fits
    in 77 tokens (or mode is truncate) and nothing is weighted, else the embeddings (the full
    length, or the first chunk where mode is truncate)."""
    texts = [*prompts, *negatives]
    weighted = weighting == "a1111" and not all(is_plain(t) for t in texts)
    count = max(chunk_count(pipe, t, weighting) for t in texts)
    if not weighted and (mode == "truncate" or count == 1):
        return {"prompt": prompts, "negative_prompt": negatives}
    count = 1 if mode == "truncate" else count
    embeds, pooled = encode(pipe, prompts, count, weighting)
    negative_embeds, negative_pooled = encode(pipe, negatives, count, weighting)
    inputs = {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds}
    if pooled is not None:
        inputs |= {"pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": negative_pooled}
    return inputs


log = logging.getLogger("keyframes")
CLIP_TOKENS = 77


def prompt_tokens(pipe, text: str, weighting: str = "none") -> int:
    """CLIP tokens in text, start and end included (the weighting syntax not counted); SDXL's
    text encoders read 77."""
    chunks = _token_chunks(pipe, pipe.tokenizer, text, weighting)
    return sum(len(ids) for ids, _ in chunks) + 2


def count_tokens(pipe, jobs: list, long_prompts: str, weighting: str = "none") -> dict[str, int]:
    """Token count of every distinct prompt; one note per prompt longer than SDXL's 77."""
    counts = {}
    for job in jobs:
        for kind, text in (("prompt", job.prompt), ("negative prompt", job.negative_prompt)):
            if text in counts:
                continue
            counts[text] = prompt_tokens(pipe, text, weighting)
            if counts[text] <= CLIP_TOKENS:
                continue
            if long_prompts == "chunk":
                log.info(
                    "scene %s: %s is %d CLIP tokens; encoded in full, in %d chunks of 75",
                    job.scene_id,
                    kind,
                    counts[text],
                    chunk_count(pipe, text, weighting),
                )
            else:
                log.warning(
                    "scene %s: %s is %d CLIP tokens; SDXL reads the first %d, the rest is cut "
                    "(long_prompts=chunk reads it all)",
                    job.scene_id,
                    kind,
                    counts[text],
                    CLIP_TOKENS,
                )
    return counts


def prompt_encoding(tokens: int, long_prompts: str) -> str:
    """How a prompt of this many CLIP tokens (start and end included) reached the UNet."""
    if tokens <= CLIP_TOKENS:
        return "whole"
    return "chunked" if long_prompts == "chunk" else f"cut to {CLIP_TOKENS} tokens"
