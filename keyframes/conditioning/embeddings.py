"""Textual-inversion embeddings: a word that prompts and negative prompts use (A1111 users put
SDXL negative embeddings in the negative prompt), standing for vectors learned for the text
encoders. An SDXL file holds `clip_l` (first encoder) and `clip_g` (second); an SD 1.5 file one
tensor. Loaded through diffusers' textual-inversion support, from safetensors only."""

from __future__ import annotations

import logging
from pathlib import Path

from keyframes.conditioning.base import Method, register
from keyframes.conditioning.loras import short_sha256
from keyframes.config.schema import EmbeddingConfig
from keyframes.errors import ConfigError, ModelUnavailableError, first_line

log = logging.getLogger("keyframes")
SDXL_PARTS = ("clip_l", "clip_g")  # -> (tokenizer, text_encoder), (tokenizer_2, text_encoder_2)


def token_of(embedding: EmbeddingConfig) -> str:
    return embedding.token or Path(embedding.path).stem


def _tensors(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes, read from the header without loading the weights."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same problem
        raise ConfigError(f"embeddings: {path}: not a readable safetensors file ({e})") from None


def check_embeddings(embeddings: list[EmbeddingConfig], family: str) -> list[str]:
    """Before anything loads: files exist, are safetensors, fit the model family; distinct
    tokens. Returns the problems (empty: all fine)."""
    problems = []
    tokens = [token_of(e) for e in embeddings]
    if len(set(tokens)) < len(tokens):
        problems.append(f"two embeddings share a token ({', '.join(tokens)}); set token=")
    for embedding in embeddings:
        path = Path(embedding.path).expanduser()
        if not path.is_file():
            problems.append(f"{embedding.path}: no such file")
        elif path.suffix != ".safetensors":
            problems.append(f"{embedding.path}: only .safetensors embeddings are loaded")
        else:
            tensors = _tensors(path)
            sdxl_file = all(part in tensors for part in SDXL_PARTS)
            if sdxl_file != (family == "sdxl"):
                kind = (
                    "an SDXL embedding (clip_l, clip_g)"
                    if sdxl_file
                    else ("an SD 1.x embedding (no clip_l and clip_g)")
                )
                model = "SDXL" if family == "sdxl" else "SD 1.5"
                problems.append(f"{embedding.path}: {kind}, but the model is {model}")
    return [f"embeddings: {p}" for p in problems]


def embedding_records(embeddings: list[EmbeddingConfig]) -> list[dict]:
    """token, path, vectors per token and the file's short SHA-256 (A1111's "TI hashes")."""
    records = []
    for embedding in embeddings:
        path = Path(embedding.path).expanduser()
        shapes = list(_tensors(path).values())
        vectors = shapes[0][0] if shapes and len(shapes[0]) == 2 else 1
        records.append(
            {
                "token": token_of(embedding),
                "path": embedding.path,
                "vectors": vectors,
                "sha256": short_sha256(path),
            }
        )
    return records


def _encoder_pairs(pipe, tensors: dict) -> list[tuple]:
    """(vectors, tokenizer, text encoder) for each encoder the file has vectors for."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return [
            (tensors["clip_l"], pipe.tokenizer, pipe.text_encoder),
            (tensors["clip_g"], pipe.tokenizer_2, pipe.text_encoder_2),
        ]
    return [(tensors, pipe.tokenizer, pipe.text_encoder)]  # diffusers reads the A1111 forms


def load_embeddings(pipe, embeddings: list[EmbeddingConfig]) -> None:
    from safetensors.torch import load_file

    for embedding in embeddings:
        tensors = load_file(Path(embedding.path).expanduser())
        try:
            for vectors, tokenizer, encoder in _encoder_pairs(pipe, tensors):
                pipe.load_textual_inversion(
                    vectors, token=token_of(embedding), tokenizer=tokenizer, text_encoder=encoder
                )
        except (ValueError, RuntimeError) as e:  # a width for another model, a taken token
            unload_embeddings(pipe)
            raise ModelUnavailableError(
                f"embedding {embedding.path} could not be loaded: {first_line(e)}"
            ) from None


def unload_embeddings(pipe) -> None:
    """Every added token out of the tokenizers and encoders: the plain model again."""
    pipe.unload_textual_inversion(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
    if getattr(pipe, "text_encoder_2", None) is not None:
        pipe.unload_textual_inversion(tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2)


@register("embeddings", "embeddings")
class Embeddings(Method):
    """embeddings=[...]: textual inversions, each a token the prompts can use."""

    def prepare(self, jobs: list, shotlist) -> list:
        problems = check_embeddings(self.settings, self.run.model.family)
        if problems:
            raise ConfigError.listing("embeddings that cannot be used:", problems)
        self.records = embedding_records(self.settings)
        texts = " ".join(f"{job.prompt} {job.negative_prompt}" for job in jobs)
        for record in self.records:
            if record["token"] not in texts:
                log.warning(
                    "embedding %s: no prompt or negative prompt uses its token %r",
                    record["path"],
                    record["token"],
                )
        return jobs

    def install(self, loaded, todo) -> None:
        load_embeddings(loaded.pipe, self.settings)
        log.info("embeddings: %s", ", ".join(r["token"] for r in self.records))

    def remove(self, pipe) -> None:
        unload_embeddings(pipe)

    def record(self, job) -> dict:
        return {"embeddings": self.records}

    def run_record(self) -> dict:
        return {"embeddings": self.records}

    @classmethod
    def png_settings(cls, record: dict) -> list[str]:
        hashes = ", ".join(f"{r['token']}: {r['sha256']}" for r in record.get("embeddings", []))
        return [f'TI hashes: "{hashes}"'] if hashes else []
