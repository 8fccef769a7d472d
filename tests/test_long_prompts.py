"""Prompts past CLIP's 77 tokens: encoded in 75-token chunks, not cut."""

import numpy as np
import pytest
import torch

from keyframes.generation.generator import GenerationSettings, KeyframeGenerator
from keyframes.pipeline.long_prompts import (
    chunk_count,
    encode,
    prompt_encoding,
    prompt_tokens,
    text_inputs,
)
from keyframes.pipeline.tiny import TEXT_WIDTH, TEXT_WIDTH_2
from tests.helpers import LONG, assert_same_picture, demo_jobs, euler_tiny_pipe


@pytest.fixture(scope="module")
def pipe():
    pipe = euler_tiny_pipe()
    return pipe


def test_long_prompt_embeddings_have_77_tokens_per_75_token_chunk(pipe):
    tokens = prompt_tokens(pipe, LONG) - 2  # without start and end
    chunks = chunk_count(pipe, LONG)
    assert tokens > 150 and chunks == -(-tokens // 75)
    embeds, pooled = encode(pipe, [LONG, "short"], chunks)
    # both tiny encoders side by side; pooled from encoder 2 alone, as in SDXL
    assert embeds.shape == (2, 77 * chunks, TEXT_WIDTH + TEXT_WIDTH_2)
    assert pooled.shape == (2, TEXT_WIDTH_2)


def test_first_chunk_is_what_diffusers_makes_of_the_cut_prompt(pipe):
    embeds, pooled = encode(pipe, [LONG], chunk_count(pipe, LONG))
    own, _, own_pooled, _ = pipe.encode_prompt(LONG, do_classifier_free_guidance=False)
    assert torch.allclose(embeds[:, :77], own, atol=1e-6)
    assert torch.allclose(pooled, own_pooled, atol=1e-6)
    assert not torch.allclose(embeds[:, 77:154], embeds[:, :77])  # the rest is read too


def test_short_prompts_go_to_the_pipeline_as_text(pipe):
    assert text_inputs(pipe, ["a boat"], [""], "chunk") == {
        "prompt": ["a boat"],
        "negative_prompt": [""],
    }
    assert text_inputs(pipe, [LONG], [""], "truncate") == {
        "prompt": [LONG],
        "negative_prompt": [""],
    }
    inputs = text_inputs(pipe, ["a boat", LONG], ["", "blurry"], "chunk")
    length = 77 * chunk_count(pipe, LONG)  # every row padded to the longest
    assert inputs["prompt_embeds"].shape[1] == inputs["negative_prompt_embeds"].shape[1] == length


def test_chunked_long_prompt_changes_the_image_and_truncate_does_not_read_the_tail(pipe):
    job = demo_jobs(1)[0]
    cut = pipe.tokenizer.decode(pipe.tokenizer(LONG, add_special_tokens=False).input_ids[:75])

    def image(prompt, mode):
        settings = GenerationSettings(2, 5.0, 64, 64, 1, long_prompts=mode)
        made = KeyframeGenerator(pipe, settings).run(
            [job.__class__(**{**job.__dict__, "prompt": prompt})]
        )
        return np.asarray(next(made)[0].image, dtype=np.int16)

    truncated, chunked = image(LONG, "truncate"), image(LONG, "chunk")
    assert_same_picture(truncated, image(cut, "truncate"), "cut")  # only 75 tokens mattered
    assert np.abs(chunked - truncated).mean() > 0.1


def test_prompt_encoding_is_recorded_per_image():
    assert prompt_encoding(77, "chunk") == "whole"
    assert prompt_encoding(160, "chunk") == "chunked"
    assert prompt_encoding(160, "truncate") == "cut to 77 tokens"
