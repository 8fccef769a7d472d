"""A1111 prompt weighting: `(words:1.3)`, `((words))`, `[words]`, `\\(` escapes and BREAK,
parsed as A1111 parses them and applied to the token embeddings of every text encoder as A1111
applies them ("Original" emphasis: each token's vector times its weight, then the chunk scaled
back to its mean). The references here are written out by hand from that published rule."""

import numpy as np
import pytest
import torch

from keyframes.errors import ConfigError
from keyframes.generation.generator import GenerationSettings, KeyframeGenerator
from keyframes.generation.preflight import check_prompt_syntax
from keyframes.pipeline.long_prompts import prompt_tokens, text_inputs
from keyframes.shotlist.weighting import Fragment, parse_weights, plain_text
from tests.helpers import (
    FLOAT_NOISE,
    assert_same_picture,
    demo_jobs,
    euler_tiny_pipe,
    pixel_gap,
    tiny_model_config,
)

BREAK = "BREAK"
# prompt -> its runs as A1111 weighs them, worked out by hand: ( ) x1.1, [ ] /1.1, (x:w) xw
CASES = {
    "a red door": [("a red door", 1.0)],
    "a (red:1.3) door": [("a ", 1.0), ("red", 1.3), (" door", 1.0)],
    "((masterpiece)), rain": [("masterpiece", 1.1 * 1.1), (", rain", 1.0)],
    "[blurry] sky": [("blurry", 1 / 1.1), (" sky", 1.0)],
    "[[grain]]": [("grain", 1 / 1.1 / 1.1)],
    "(a [b] c:1.5) d": [("a ", 1.5), ("b", 1.5 / 1.1), (" c", 1.5), (" d", 1.0)],
    "((fog:1.2))": [("fog", 1.2 * 1.1)],
    r"\(escaped\) (x)": [("(escaped) ", 1.0), ("x", 1.1)],
    "dawn BREAK (dusk:0.8)": [("dawn", 1.0), BREAK, ("dusk", 0.8)],
    "(unclosed words": [("unclosed words", 1.1)],
    "stray) end": [("stray) end", 1.0)],
    "at 10:30 (ok:1.2)": [("at 10:30 ", 1.0), ("ok", 1.2)],
}


def as_runs(fragments: list[Fragment]) -> list:
    return [BREAK if f.breaks else (f.text, f.weight) for f in fragments]


@pytest.mark.parametrize("prompt", CASES)
def test_the_parser_weighs_as_a1111(prompt):
    runs = as_runs(parse_weights(prompt))
    expected = CASES[prompt]
    assert [r if r == BREAK else r[0] for r in runs] == [
        e if e == BREAK else e[0] for e in expected
    ]
    for got, want in zip(runs, expected, strict=True):
        if want != BREAK:
            assert got[1] == pytest.approx(want[1], rel=1e-12)


def test_plain_text_drops_the_syntax():
    assert plain_text("a (red:1.3) door, ((rain)) BREAK [blur]") == "a red door, rain blur"


@pytest.fixture(scope="module")
def pipe():
    return euler_tiny_pipe()


def reference_embeddings(pipe, runs: list, count: int) -> torch.Tensor:
    """Hidden states of every encoder (penultimate layer, side by side) for these runs: each
    run tokenized on its own, 75 tokens per chunk, BREAK closing a chunk, each chunk between
    start and end tokens and padded; every token's vector times its weight, then each chunk
    scaled back to the mean it had."""
    hidden = []
    for tokenizer, encoder in (
        (pipe.tokenizer, pipe.text_encoder),
        (pipe.tokenizer_2, pipe.text_encoder_2),
    ):
        chunks = [[]]
        for run in runs:
            if run == BREAK:
                chunks.append([])
                continue
            text, weight = run
            for token in tokenizer(text, add_special_tokens=False).input_ids:
                if len(chunks[-1]) == 75:
                    chunks.append([])
                chunks[-1].append((token, weight))
        chunks += [[]] * (count - len(chunks))
        parts = []
        for chunk in chunks:
            ids = [tokenizer.bos_token_id] + [t for t, _ in chunk] + [tokenizer.eos_token_id]
            ids += [tokenizer.pad_token_id] * (77 - len(ids))
            weights = torch.tensor([1.0] + [w for _, w in chunk] + [1.0] * (76 - len(chunk)))
            with torch.no_grad():
                z = encoder(torch.tensor([ids]), output_hidden_states=True).hidden_states[-2]
            weighted = z * weights[None, :, None]
            parts.append(weighted * (z.mean() / weighted.mean()))
        hidden.append(torch.cat(parts, dim=1))
    return torch.cat(hidden, dim=-1)


LONG = ", ".join(f"(detail {n}:1.2) of the keeper's [old] coat" for n in range(12))
LONG_RUNS = [
    r
    for n in range(12)
    for r in (
        (", " if n else "", 1.0),
        (f"detail {n}", 1.2),
        (" of the keeper's ", 1.0),
        ("old", 1 / 1.1),
        (" coat", 1.0),
    )
][1:]


@pytest.mark.parametrize(
    "prompt, runs, count",
    [
        ("a (red:1.3) door", CASES["a (red:1.3) door"], 1),
        ("((masterpiece)), rain", CASES["((masterpiece)), rain"], 1),
        ("dawn BREAK (dusk:0.8)", CASES["dawn BREAK (dusk:0.8)"], 2),
        (LONG, LONG_RUNS, 2),
    ],
    ids=["weighted", "nested", "break", "longer-than-75"],
)
def test_the_weighted_embeddings_are_a1111s(pipe, prompt, runs, count):
    assert prompt_tokens(pipe, LONG, "a1111") > 77  # two chunks
    inputs = text_inputs(pipe, [prompt], ["[blurry] sky"], "chunk", "a1111")
    assert inputs["prompt_embeds"].shape[1] == 77 * count
    torch.testing.assert_close(inputs["prompt_embeds"], reference_embeddings(pipe, runs, count))
    negative = reference_embeddings(pipe, CASES["[blurry] sky"], count)
    torch.testing.assert_close(inputs["negative_prompt_embeds"], negative)
    # the pooled vector is unweighted: that of the words without the syntax, first chunk
    first_chunk = prompt.split(" BREAK ")[0]
    _, _, pooled, _ = pipe.encode_prompt(
        plain_text(first_chunk), device="cpu", do_classifier_free_guidance=False
    )
    torch.testing.assert_close(inputs["pooled_prompt_embeds"], pooled)


def test_a_weight_changes_the_picture_and_none_passes_the_text_as_before(pipe):
    job = demo_jobs(1)[0]
    assert "lighthouse" in job.prompt
    weighted = job.__class__(
        **{**job.__dict__, "prompt": job.prompt.replace("lighthouse", "(lighthouse:3)")}
    )

    def picture(job, weighting):
        settings = GenerationSettings(2, 5.0, 64, 64, 1, prompt_weighting=weighting)
        made = next(KeyframeGenerator(pipe, settings).run([job]))[0].image
        return np.asarray(made, dtype=np.int16)

    plain = picture(job, "none")
    assert (picture(job, "a1111") == plain).all()  # no syntax: the text, as before
    # the random tiny model's cross-attention barely feels one token's scale (0.15 levels
    # here, while a changed word moves 3): beyond float noise is what it can show
    assert not pixel_gap(picture(weighted, "a1111"), plain).within(FLOAT_NOISE)
    as_text = picture(weighted, "none")  # none: the brackets and number are words to CLIP
    assert text_inputs(pipe, [weighted.prompt], [""], "chunk", "none") == {
        "prompt": [weighted.prompt],
        "negative_prompt": [""],
    }
    assert pixel_gap(as_text, plain).mean > 0.5
    # a weight of 1 everywhere is the plain prompt, through the embeddings path
    one = job.__class__(
        **{**job.__dict__, "prompt": job.prompt.replace("lighthouse", "(lighthouse:1)")}
    )
    assert_same_picture(picture(one, "a1111"), plain, "weight 1")


def test_sd15_weighs_its_one_encoders_last_layer():
    from keyframes.pipeline.load import load_pipeline, resolve_placement

    sd15 = load_pipeline(tiny_model_config(family="sd15"), resolve_placement("cpu", "float32"))
    inputs = text_inputs(sd15, ["a (red:1.3) door"], [""], "chunk", "a1111")
    ids = sd15.tokenizer(
        "a red door", padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        z = sd15.text_encoder(ids)[0]  # the last layer, final layer norm applied
    red = len(sd15.tokenizer("a ", add_special_tokens=False).input_ids) + 1  # after start
    weights = torch.ones(77)
    weights[red] = 1.3
    weighted = z * weights[None, :, None]
    torch.testing.assert_close(inputs["prompt_embeds"], weighted * (z.mean() / weighted.mean()))


@pytest.mark.parametrize(
    "prompt, problem",
    [
        ("a [cat:dog:0.5] runs", "'[cat:dog:0.5]' is A1111's prompt editing or alternation"),
        ("a [cat|dog] runs", "'[cat|dog]' is A1111's prompt editing or alternation"),
        ("a cat AND a dog", "AND is A1111's composable diffusion"),
    ],
)
def test_syntax_that_changes_the_prompt_while_sampling_is_refused_by_name(prompt, problem):
    job = demo_jobs(1)[0]
    with pytest.raises(ConfigError, match=problem.replace("[", r"\[").replace("|", r"\|")):
        check_prompt_syntax([job.__class__(**{**job.__dict__, "prompt": prompt})])
    escaped = prompt.replace("[", r"\[").replace("]", r"\]").replace("AND", "and")
    check_prompt_syntax([job.__class__(**{**job.__dict__, "prompt": escaped})])


def test_a_run_keeps_the_prompt_as_written_and_refuses_prompt_editing(cli_in_process, tmp_path):
    import json

    from keyframes.outputs.png import read_png_metadata
    from tests.conftest import read_manifest

    shots = tmp_path / "shots.json"
    shots.write_text(json.dumps([{"id": "a", "description": "a (red:1.3) door, ((rain))"}]))
    code, err, run_dir, _ = cli_in_process(f"shotlist={shots}", "style=none")
    assert code == 0, err[-2000:]
    record = read_manifest(run_dir)["images"][0]
    parameters = read_png_metadata(run_dir / record["file"])["parameters"]
    assert parameters.startswith("a (red:1.3) door, ((rain))\n")  # A1111 reads the same back
    assert record["prompt_tokens"] == 7  # a red door , rain (the syntax not counted) + 2
    shots.write_text(json.dumps([{"id": "b", "description": "a [cat:dog:0.5] runs"}]))
    code, err, run_dir, _ = cli_in_process(f"shotlist={shots}", run_dir=tmp_path / "refused")
    assert code == 2 and "'[cat:dog:0.5]' is A1111's prompt editing" in err, err[-2000:]
    assert not (tmp_path / "refused").exists()


def test_the_styled_prompt_is_scored_as_words_not_syntax():
    from PIL import Image

    from keyframes.config.schema import ScorerConfig
    from keyframes.generation.bookkeeping import score_batch
    from keyframes.generation.generator import Generation
    from keyframes.scoring.clip import load_scorer

    scorer = load_scorer(ScorerConfig(name="tiny", model="tiny"), "cpu")
    job = demo_jobs(1)[0]
    weighted = job.__class__(**{**job.__dict__, "prompt": "a ((red:1.3) door) BREAK [rain]"})
    made = [Generation(weighted, Image.new("RGB", (64, 36), (255, 255, 255)), 1.0, None, 0.1)]
    ((_, styled, _),) = score_batch(scorer, made, "a1111")
    _, (as_words,) = scorer.score([made[0].image], [job.description], ["a red door rain"])
    assert styled.score == pytest.approx(as_words.score, abs=1e-3) and styled.score > 1  # noise
    ((_, literal, _),) = score_batch(scorer, made, "none")  # none: the brackets are text
    assert abs(literal.score - styled.score) > 1e-3
