"""Replicas of the Hugging Face repos keyframes names, for running every documented model path
offline: the real repo ids, file names, subfolders and fp16 variants, laid out as the Hugging
Face cache lays them out (`hub/models--org--name/` with `blobs/`, `snapshots/<rev>/` and
`refs/main`), holding random weights.

A replica proves loading, placement and the pipeline path exactly as a user's machine runs
them; its weights are random, so its images are noise and say nothing about quality.

    python -m keyframes.replicas DIR           # tiny: the tests' fixtures, seconds, a few MB
    python -m keyframes.replicas DIR --full    # SDXL base at full size, 6.5 GB
    HF_HOME=DIR HF_HUB_OFFLINE=1 uv run python -m keyframes.run width=64 height=64 steps=2
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_TURBO = "stabilityai/sdxl-turbo"
SDXL_LIGHTNING = "ByteDance/SDXL-Lightning"
LIGHTNING_UNET = "sdxl_lightning_4step_unet.safetensors"
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL_REFINER = "stabilityai/stable-diffusion-xl-refiner-1.0"
IP_ADAPTER = "h94/IP-Adapter"
IP_ADAPTER_SDXL = "sdxl_models/ip-adapter_sdxl.safetensors"
CONTROLNETS = {
    "diffusers/controlnet-canny-sdxl-1.0": "sdxl",
    "diffusers/controlnet-depth-sdxl-1.0": "sdxl",
    "lllyasviel/control_v11p_sd15_canny": "sd15",
    "lllyasviel/control_v11f1p_sd15_depth": "sd15",
}
SDXL_VAE_FP16_FIX = "madebyollin/sdxl-vae-fp16-fix"  # the README's model.vae example
CLIP_L14_OPENAI = "timm/vit_large_patch14_clip_224.openai"
AESTHETIC = "metric-space/aesthetic"  # conf/scorer/clip.yaml's aesthetic head
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
CLIP_WEIGHTS = "open_clip_model.safetensors"


def repo_folder(hub_cache: Path, repo_id: str) -> Path:
    return hub_cache / ("models--" + repo_id.replace("/", "--"))


def write_repo(hub_cache: Path, repo_id: str, source: Path) -> Path:
    """Move the files under `source` into the cache layout of `repo_id`, the way
    huggingface_hub stores a download: each file a blob named by its hash, linked from the
    snapshot of one revision that refs/main names. Returns the snapshot folder."""
    root = repo_folder(hub_cache, repo_id)
    revision = hashlib.sha1(repo_id.encode()).hexdigest()  # a fixed, commit-like name
    snapshot = root / "snapshots" / revision
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        blob = root / "blobs" / _sha256(file)
        blob.parent.mkdir(parents=True, exist_ok=True)
        if blob.exists():
            file.unlink()
        else:
            shutil.move(file, blob)
        link = snapshot / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    return snapshot


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _staged(hub_cache: Path, repo_id: str, write: Callable[[Path], None]) -> Path:
    """write(folder) into a temporary folder beside the cache, then into the repo's layout."""
    hub_cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=hub_cache) as tmp:
        write(Path(tmp))
        return write_repo(hub_cache, repo_id, Path(tmp))


def _save_with_fp16_variant(pipe_or_model, folder: Path, full_precision: bool = True) -> None:
    """As the SDXL repos ship: full-precision files and `.fp16.safetensors` ones beside them,
    and the CLIP tokenizers as the slow-tokenizer files the real repos hold. Without
    full_precision, only the fp16 files (what the presets load; the model is already fp16)."""
    if full_precision:
        pipe_or_model.save_pretrained(folder)
        pipe_or_model = copy.deepcopy(pipe_or_model).to(torch.float16)
    pipe_or_model.save_pretrained(folder, variant="fp16")
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        if (folder / name).is_dir():
            shutil.rmtree(folder / name)
            write_clip_tokenizer(folder / name, pad)


def write_clip_tokenizer(folder: Path, pad_token: str) -> None:
    """vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json: the files of
    the SDXL and SD 1.5 repos' tokenizer folders (SDXL's second one pads with "!")."""
    from keyframes.pipeline.tiny import clip_tokenizer_files

    clip_tokenizer_files(folder)
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": pad_token,
        "unk_token": "<|endoftext|>",
    }
    config = special | {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "errors": "replace",
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def write_tiny_replicas(hf_home: Path) -> Path:
    """Every repo a preset or README command names, with the tiny configs, and the community
    files of the same models in HF_HOME/files (see write_community_files). Returns the hub
    cache folder (HF_HOME/hub)."""
    from keyframes.pipeline.tiny import build_tiny_pipeline, build_tiny_refiner, build_tiny_sd15

    hub_cache = hf_home / "hub"
    base = build_tiny_pipeline()
    for repo in (SDXL_BASE, SDXL_TURBO):
        _staged(hub_cache, repo, lambda folder: _save_with_fp16_variant(base, folder))
    _staged(hub_cache, SDXL_LIGHTNING, lambda folder: _save_unet_file(base.unet, folder))
    _staged(hub_cache, SDXL_VAE_FP16_FIX, lambda folder: base.vae.save_pretrained(folder))
    sd15 = build_tiny_sd15()
    _staged(hub_cache, SD15, lambda folder: _save_with_fp16_variant(sd15, folder))
    refiner = build_tiny_refiner(base)
    _staged(hub_cache, SDXL_REFINER, lambda folder: _save_with_fp16_variant(refiner, folder))
    _staged(hub_cache, IP_ADAPTER, lambda folder: save_tiny_ip_adapter(folder, base.unet))
    for repo, family in CONTROLNETS.items():
        unet = base.unet if family == "sdxl" else sd15.unet
        _staged(hub_cache, repo, lambda folder, unet=unet: _save_controlnet(unet, folder))
    write_community_files(hf_home / "files", base, sd15)
    return hub_cache


def write_full_replicas(hf_home: Path) -> Path:
    """stabilityai/stable-diffusion-xl-base-1.0 at full size (the published configs packaged in
    keyframes/data/sdxl_base), random weights drawn directly in float16 and written as the
    repo's fp16 variant files only: one 7 GB copy in memory, 7 GB on disk, minutes on 2 cores.
    The other repos' full configs are not packaged; their tiny replicas serve for loading."""
    from diffusers import EulerDiscreteScheduler

    from keyframes.pipeline.architectures import architecture_configs, build_components
    from keyframes.pipeline.tiny import assemble_sdxl

    scheduler = EulerDiscreteScheduler.from_config(architecture_configs("sdxl_base")["scheduler"])
    pipe = assemble_sdxl(*build_components("sdxl_base", "cpu", torch.float16), scheduler)
    write = lambda folder: _save_with_fp16_variant(pipe, folder, full_precision=False)  # noqa: E731
    _staged(hf_home / "hub", SDXL_BASE, write)
    return hf_home / "hub"


# The files of the forms users have on disk, made from the replicas' own models
SDXL_SINGLE_FILE = "sdxl_single_file.safetensors"  # original (SGM) layout, float16
SD15_SINGLE_FILE = "sd15_single_file.safetensors"
LORA_KOHYA = "sdxl_lora_kohya.safetensors"  # the same LoRA in kohya's layout ...
LORA_DIFFUSERS = "sdxl_lora_diffusers.safetensors"  # ... and in diffusers'
EMBEDDING = "sdxl_embedding.safetensors"  # textual inversion: clip_l and clip_g, 2 vectors
SDXL_VAE_FILE = "sdxl_vae.safetensors"  # a VAE alone, original layout (as stabilityai/sdxl-vae)


def write_community_files(folder: Path, base, sd15) -> None:
    """Single-file checkpoints of the SDXL and SD 1.5 replicas (their weights are those of the
    repos' fp16 files), the SDXL VAE as a file of its own, one LoRA in kohya's and diffusers'
    layouts, an SDXL embedding."""
    from keyframes.pipeline.sgm_layout import write_single_file, write_vae_file

    folder.mkdir(parents=True, exist_ok=True)
    write_single_file(base, folder / SDXL_SINGLE_FILE)
    write_vae_file(base.vae, folder / SDXL_VAE_FILE)
    write_single_file(sd15, folder / SD15_SINGLE_FILE)
    _write_lora_pair(base, folder)
    write_sdxl_embedding(base, folder / EMBEDDING)


UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def _write_lora_pair(base, folder: Path) -> None:
    """A random rank-4 LoRA of the UNet and both text encoders, saved by diffusers and by the
    kohya writer from the same tensors."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from keyframes.pipeline.kohya_layout import write_kohya_lora

    layers = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        for part, targets in (
            ("unet", UNET_LORA_TARGETS),
            ("text_encoder", TEXT_LORA_TARGETS),
            ("text_encoder_2", TEXT_LORA_TARGETS),
        ):
            model = inject_adapter_in_model(
                LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False),
                copy.deepcopy(getattr(base, part)),
            )
            # small updates, as trained LoRAs make: the image changes but stays an image
            layers[part] = {k: v * 0.3 for k, v in get_peft_model_state_dict(model).items()}
    StableDiffusionXLPipeline.save_lora_weights(  # PEFT's names (lora_A / lora_B): today's format
        folder,
        weight_name=LORA_DIFFUSERS,
        **{f"{part}_lora_layers": state for part, state in layers.items()},
    )
    write_kohya_lora(layers, base.unet.config, folder / LORA_KOHYA)


def write_sdxl_embedding(base, path: Path, vectors: int = 2, seed: int = 4) -> Path:
    """An SDXL textual-inversion file as A1111 and diffusers read it: `clip_l` for the first
    text encoder, `clip_g` for the second, one row per vector."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    widths = {
        "clip_l": base.text_encoder.config.hidden_size,
        "clip_g": base.text_encoder_2.config.hidden_size,
    }
    save_file(
        {name: torch.randn(vectors, width, generator=generator) for name, width in widths.items()},
        path,
    )
    return path


def _save_unet_file(unet, folder: Path) -> None:
    """SDXL-Lightning's form: one UNet state dict in a single file at the repo's top level."""
    from safetensors.torch import save_file

    state = {k: v.to(torch.float16).contiguous() for k, v in unet.state_dict().items()}
    save_file(state, folder / LIGHTNING_UNET)


def _save_controlnet(unet, folder: Path) -> None:
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        _save_with_fp16_variant(ControlNetModel.from_unet(unet), folder)


IP_IMAGE_EMBED = 32  # the tiny image encoder's projection width


def save_tiny_ip_adapter(
    folder: Path, unet, subfolder: str = "sdxl_models", weight: str = "ip-adapter_sdxl.safetensors"
) -> Path:
    """h94/IP-Adapter's SDXL layout for a tiny UNet: `<subfolder>/image_encoder/` (a CLIP
    vision model) and `<subfolder>/<weight>` (image projection + per-attention K/V)."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=32,
                patch_size=8,
                projection_dim=IP_IMAGE_EMBED,
            )
        )
        encoder.save_pretrained(folder / subfolder / "image_encoder")
        text_width = unet.config.cross_attention_dim
        weights = {
            "image_proj.proj.weight": torch.randn(text_width * 4, IP_IMAGE_EMBED) * 0.2,
            "image_proj.proj.bias": torch.zeros(text_width * 4),
            "image_proj.norm.weight": torch.ones(text_width),
            "image_proj.norm.bias": torch.zeros(text_width),
        }
        key = 1
        for name in unet.attn_processors:
            if name.endswith("attn2.processor"):
                attn = unet.get_submodule(name.removesuffix(".processor"))
                for kind in ("to_k_ip", "to_v_ip"):
                    weights[f"ip_adapter.{key}.{kind}.weight"] = torch.randn_like(attn.to_k.weight)
                key += 2  # the original numbering: self- and cross-attention alternate
    save_file(weights, folder / subfolder / weight)
    return folder


def write_scorer_replica(hf_home: Path) -> Path:
    """The default scorer's repos: open_clip ViT-L-14 `openai` at full size, since open_clip
    builds ViT-L-14 whatever the file holds, random weights in float16 (0.86 GB, about 20 s
    to write on 2 cores); and the LAION aesthetic head, random, as a .pth like the real one."""
    import open_clip
    from safetensors.torch import save_file

    def write(folder: Path) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = open_clip.create_model("ViT-L-14")
        state = {k: v.to(torch.float16).contiguous() for k, v in model.state_dict().items()}
        del model
        save_file(state, folder / CLIP_WEIGHTS)

    def write_aesthetic(folder: Path) -> None:
        """As published: a torch.save'd state dict of Linear layers at Sequential indices
        0, 2, 4 (dropout between), 6 and 7, from the 768-wide embedding down to one score."""
        sizes, state = (768, 1024, 128, 64, 16, 1), {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for index, (n_in, n_out) in zip(
                (0, 2, 4, 6, 7), itertools.pairwise(sizes), strict=True
            ):
                layer = torch.nn.Linear(n_in, n_out)
                state[f"layers.{index}.weight"], state[f"layers.{index}.bias"] = (
                    layer.weight.detach(),
                    layer.bias.detach(),
                )
        torch.save(state, folder / AESTHETIC_FILE)

    _staged(hf_home / "hub", AESTHETIC, write_aesthetic)
    return _staged(hf_home / "hub", CLIP_L14_OPENAI, write)
