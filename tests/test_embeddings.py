"""Textual-inversion embeddings on the tiny SDXL: loaded into both encoders, they change the
image where a prompt names their token, leave the model plain when removed, are refused before
anything loads when they cannot fit, and are recorded in the manifest, PNG and MLflow."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from keyframes.conditioning.embeddings import check_embeddings, load_embeddings, unload_embeddings
from keyframes.config.schema import EmbeddingConfig
from keyframes.errors import ModelUnavailableError
from keyframes.outputs.png import read_png_metadata
from keyframes.pipeline.long_prompts import prompt_tokens
from keyframes.pipeline.replicas import write_sdxl_embedding
from tests.conftest import read_manifest
from tests.helpers import (
    assert_same_picture,
    demo_jobs,
    euler_tiny_pipe,
    image,
    pixel_gap,
    tiny_model_config,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pipe = euler_tiny_pipe()
    path = write_sdxl_embedding(pipe, tmp_path_factory.mktemp("emb") / "kfneg.safetensors")
    return pipe, path


def job_with(negative: str):
    job = demo_jobs(1)[0]
    return job.__class__(**{**job.__dict__, "negative_prompt": negative})


def test_an_embedding_in_the_negative_prompt_changes_the_image_and_unloads_cleanly(setup):
    pipe, path = setup
    plain = image(pipe, job_with("blurry, kfneg"))  # not loaded: "kfneg" is ordinary text
    load_embeddings(pipe, [EmbeddingConfig(path=str(path))])
    try:
        assert len(pipe.tokenizer_2.encode("kfneg", add_special_tokens=False)) == 1
        # two vectors: the token expands to "kfneg kfneg_1" in both encoders
        assert pipe.maybe_convert_prompt("kfneg", pipe.tokenizer_2) == "kfneg kfneg_1"
        assert prompt_tokens(pipe, "kfneg") == 4  # counted (and chunked) as the vectors it is
        with_embedding = image(pipe, job_with("blurry, kfneg"))
        unused = image(pipe, job_with("blurry"))
    finally:
        unload_embeddings(pipe)
    assert pixel_gap(with_embedding, plain).mean > 0.5
    assert (image(pipe, job_with("blurry")) == unused).all()  # other prompts: untouched
    again = image(pipe, job_with("blurry, kfneg"))
    assert (again == plain).all()  # unloaded: the tokenizers and encoders are plain again


def test_an_sd15_embedding_in_a1111s_form_loads_into_its_one_encoder(tmp_path):
    from keyframes.pipeline.load import load_pipeline, resolve_placement

    pipe = load_pipeline(tiny_model_config(family="sd15"), resolve_placement("cpu", "float32"))
    path = tmp_path / "kfsd.safetensors"
    save_file({"emb_params": torch.randn(3, pipe.text_encoder.config.hidden_size)}, path)
    plain = image(pipe, job_with("kfsd"))
    load_embeddings(pipe, [EmbeddingConfig(path=str(path))])
    try:
        assert pipe.maybe_convert_prompt("kfsd", pipe.tokenizer) == "kfsd kfsd_1 kfsd_2"
        loaded = image(pipe, job_with("kfsd"))
    finally:
        unload_embeddings(pipe)
    assert pixel_gap(loaded, plain).mean > 0.5
    assert (image(pipe, job_with("kfsd")) == plain).all()


def test_clip_l_and_clip_g_go_to_their_own_encoders(setup, tmp_path):
    """The encoders differ in width (as in SDXL), so swapped tensors cannot load."""
    pipe, path = setup
    tensors = load_file(path)
    swapped = tmp_path / "swapped.safetensors"
    save_file({"clip_l": tensors["clip_g"], "clip_g": tensors["clip_l"]}, swapped)
    plain = image(pipe, job_with("kfneg"))
    with pytest.raises(ModelUnavailableError, match="swapped.safetensors could not be loaded"):
        load_embeddings(pipe, [EmbeddingConfig(path=str(swapped))])
    assert (image(pipe, job_with("kfneg")) == plain).all()  # nothing left half-loaded


def test_files_that_cannot_fit_are_all_named_before_anything_loads(setup, tmp_path):
    _, path = setup
    (tmp_path / "old.pt").write_bytes(b"pickle")
    sd15_file = tmp_path / "sd15.safetensors"  # A1111's SD 1.x form: one tensor
    save_file({"emb_params": load_file(path)["clip_l"]}, sd15_file)
    problems = check_embeddings(
        [
            EmbeddingConfig(path=str(tmp_path / "missing.safetensors")),
            EmbeddingConfig(path=str(tmp_path / "old.pt")),
            EmbeddingConfig(path=str(tmp_path / "sd15.safetensors")),
            EmbeddingConfig(path=str(path), token="sd15"),
        ],
        "sdxl",
    )
    assert problems == [
        "embeddings: two embeddings share a token (missing, old, sd15, sd15); set token=",
        f"embeddings: {tmp_path}/missing.safetensors: no such file",
        f"embeddings: {tmp_path}/old.pt: only .safetensors embeddings are loaded",
        f"embeddings: {tmp_path}/sd15.safetensors: an SD 1.x embedding (no clip_l and clip_g), "
        "but the model is SDXL",
    ]
    assert check_embeddings([EmbeddingConfig(path=str(path))], "sd15") == [
        f"embeddings: {path}: an SDXL embedding (clip_l, clip_g), but the model is SD 1.5"
    ]


def test_a_run_records_the_embedding_in_manifest_png_and_mlflow(setup, cli_in_process):
    import mlflow

    _, path = setup
    code, err, run_dir, store = cli_in_process(
        f"+embeddings=[{{path: {path}}}]", "negative.prompt=kfneg", "takes=1"
    )
    assert code == 0, err
    manifest = read_manifest(run_dir)
    record = manifest["images"][0]["embeddings"][0]
    assert record["token"] == "kfneg" and record["vectors"] == 2
    assert len(record["sha256"]) == 12 and manifest["run"]["embeddings"] == [record]
    assert "kfneg" in manifest["images"][0]["negative_prompt"]
    png = read_png_metadata(run_dir / manifest["images"][0]["file"])
    assert f'TI hashes: "kfneg: {record["sha256"]}"' in png["parameters"]
    assert json.loads(png["keyframes"])["record"]["embeddings"] == [record]
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    run = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    assert run.data.tags["keyframes.embeddings"] == f"kfneg ({record['sha256']})"


def test_an_sdxl_embedding_for_an_sd15_model_stops_with_exit_2(setup, cli_in_process):
    _, path = setup
    code, err, run_dir, _ = cli_in_process("model=tiny_sd15", f"+embeddings=[{{path: {path}}}]")
    assert code == 2 and "an SDXL embedding (clip_l, clip_g), but the model is SD 1.5" in err
    assert not run_dir.exists()


END_TOKEN = 49407  # <|endoftext|> in CLIP's vocabulary (the published configs say 2)


def reference_conditioning(pipe, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's conditioning computed here by the rule A1111, ComfyUI and kohya follow: each
    encoder's penultimate hidden states side by side, and the pooled vector of encoder 2 at
    the first end token, through its projection. Not through transformers' pooling."""
    hidden, pooled = [], None
    for tokenizer, encoder in (
        (pipe.tokenizer, pipe.text_encoder),
        (pipe.tokenizer_2, pipe.text_encoder_2),
    ):
        words = pipe.maybe_convert_prompt(text, tokenizer)
        ids = tokenizer(
            words, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        end = int((ids[0] == END_TOKEN).nonzero()[0])
        pooled = out.last_hidden_state[:, end]
    with torch.no_grad():
        return torch.cat(hidden, dim=-1), pipe.text_encoder_2.text_projection(pooled)


def test_the_published_configs_pool_an_embedding_prompt_at_the_end_token(setup, monkeypatch):
    """The published text-encoder configs carry eos_token_id 2, with which transformers pools
    at the highest token id: an added embedding token. The pooled vector must come from the
    end token, in the prompt, the negative prompt and a prompt longer than 75 tokens."""
    from keyframes.generation import generator
    from keyframes.pipeline.long_prompts import encode

    pipe, path = setup
    assert pipe.text_encoder_2.config.eos_token_id == 2  # as published: the trap is armed
    prompt, negative = "a red door at dusk, kfneg", "kfneg, blurry"
    long_prompt = prompt + ", " + ", ".join(["rain on the glass"] * 20)
    load_embeddings(pipe, [EmbeddingConfig(path=str(path))])
    try:
        embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt, negative_prompt=negative, device="cpu"
        )
        reference, reference_pooled = reference_conditioning(pipe, prompt)
        negative_reference, negative_reference_pooled = reference_conditioning(pipe, negative)
        torch.testing.assert_close(embeds, reference)
        torch.testing.assert_close(pooled, reference_pooled)
        torch.testing.assert_close(negative_pooled, negative_reference_pooled)
        _, long_pooled = encode(pipe, [long_prompt], count=2)  # chunks: the first's end token
        torch.testing.assert_close(long_pooled, reference_conditioning(pipe, long_prompt)[1])
        # how far the bug is: the vector at the embedding's token, as eos_token_id 2 gave it
        at_token = pooled_at_highest_id(pipe, prompt)
        assert (at_token - reference_pooled).abs().mean() > 100 * (
            pooled - reference_pooled
        ).abs().mean()
        job = job_with(negative).__class__(**{**job_with(negative).__dict__, "prompt": prompt})
        made = image(pipe, job)
        conditioning = {
            "prompt_embeds": reference,
            "pooled_prompt_embeds": reference_pooled,
            "negative_prompt_embeds": negative_reference,
            "negative_pooled_prompt_embeds": negative_reference_pooled,
        }
        monkeypatch.setattr(generator, "text_inputs", lambda *args: conditioning)
        from_reference = image(pipe, job)
    finally:
        unload_embeddings(pipe)
    assert_same_picture(made, from_reference, "the reference conditioning")


def pooled_at_highest_id(pipe, text: str) -> torch.Tensor:
    words = pipe.maybe_convert_prompt(text, pipe.tokenizer_2)
    ids = pipe.tokenizer_2(
        words, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        out = pipe.text_encoder_2(ids, output_hidden_states=True)
        return pipe.text_encoder_2.text_projection(out.last_hidden_state[:, ids[0].argmax()])
