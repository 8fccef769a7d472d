"""Every preset and README model command, run offline from replicas of the real hub repos:
the exact repo ids, subfolders, fp16 variants and weight names the code uses for the real
thing, in the Hugging Face cache layout, with tiny random weights (full-size for the ViT-L-14
scorer, which open_clip builds at its one size)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from keyframes.pipeline import replicas
from tests.conftest import read_manifest, run_keyframes
from tests.helpers import assert_same_picture, pixel_gap, write_json

SMALL = ("width=64", "height=64", "steps=2")  # the README's command, only these lowered


@pytest.fixture(scope="session")
def replica_home(tmp_path_factory) -> Path:
    """Written by the command users run (python -m keyframes.replicas), once per session."""
    from keyframes.replicas import main

    home = tmp_path_factory.mktemp("hf_home")
    assert main([str(home), "--no-scorer"]) == 0
    return home


@pytest.fixture(scope="session")
def scorer_home(replica_home) -> Path:
    replicas.write_scorer_replica(replica_home)
    return replica_home


def test_the_replicas_are_a_cache_huggingface_hub_reads_as_its_own(replica_home):
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    hub = replica_home / "hub"
    report = scan_cache_dir(hub)
    assert report.warnings == []
    found = {repo.repo_id for repo in report.repos}
    assert {replicas.SDXL_BASE, replicas.SD15, replicas.IP_ADAPTER, *replicas.CONTROLNETS} <= found
    for repo, file in (
        (replicas.SDXL_BASE, "model_index.json"),
        (replicas.SDXL_BASE, "unet/diffusion_pytorch_model.fp16.safetensors"),
        (replicas.SDXL_BASE, "text_encoder_2/model.fp16.safetensors"),
        (replicas.SDXL_BASE, "tokenizer_2/vocab.json"),
        (replicas.SDXL_LIGHTNING, replicas.LIGHTNING_UNET),
        (replicas.IP_ADAPTER, replicas.IP_ADAPTER_SDXL),
        (replicas.IP_ADAPTER, "sdxl_models/image_encoder/config.json"),
        (replicas.SDXL_REFINER, "unet/diffusion_pytorch_model.fp16.safetensors"),
    ):
        path = try_to_load_from_cache(repo, file, cache_dir=hub)
        assert isinstance(path, str) and Path(path).is_file(), (repo, file)
        assert Path(path).resolve().parent.name == "blobs"  # a link into blobs/, as downloaded


def offline(home: Path) -> dict:
    return {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="session")
def replica_run(tmp_path_factory, scorer_home):
    """The CLI offline on the replicas; each distinct command runs once per session (the
    round trips compare against the preset runs)."""
    made = {}

    def run(*overrides: str):
        if overrides not in made:
            tmp = tmp_path_factory.mktemp("replica_run")
            made[overrides] = run_keyframes(tmp, overrides, env=offline(scorer_home))
        return made[overrides]

    return run


def pictures(result) -> list[np.ndarray]:
    assert result.returncode == 0, result.stderr[-3000:]
    images = read_manifest(result.run_dir)["images"]
    return [np.asarray(Image.open(result.run_dir / r["file"]), dtype=np.int16) for r in images]


@pytest.mark.slow
def test_the_readme_default_command_runs_offline_from_the_replicas(replica_run):
    result = replica_run(*SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    run = read_manifest(result.run_dir)["run"]
    assert run["model"] == "sdxl_base"
    assert run["model_source"] == replicas.SDXL_BASE
    assert run["scorer"] == "ViT-L-14/openai"
    images = read_manifest(result.run_dir)["images"]
    assert len(images) == 7 and all(r["status"] == "ok" for r in images)
    assert all(r["clip_score"] is not None for r in images)
    with Image.open(result.run_dir / images[0]["file"]) as png:
        assert png.size == (64, 64)
    assert result.store.is_file()


PRESETS = {  # what each manifest shows of the preset
    "model=sdxl_turbo": lambda m: m["run"]["model_source"] == replicas.SDXL_TURBO,
    "model=sdxl_lightning": lambda m: m["run"]["model"] == "sdxl_lightning",
    "model=sd15": lambda m: m["run"]["model_family"] == "sd15",
    "upscale=refiner": lambda m: m["images"][0]["upscale"]["model"] == replicas.SDXL_REFINER,
    "consistency=ip_adapter": lambda m: m["images"][1]["consistency"] == "ip_adapter",
    f"model.vae={replicas.SDXL_VAE_FP16_FIX}": lambda m: m["run"]["model"] == "sdxl_base",
}


def preset_command(preset: str) -> tuple[str, ...]:
    steps = () if "lightning" in preset or "turbo" in preset else ("steps=2",)
    return (preset, "width=64", "height=64", *steps, "scorer=tiny")


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_loads_from_its_real_repo_offline(replica_run, preset):
    result = replica_run(*preset_command(preset))
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_manifest(result.run_dir)
    assert PRESETS[preset](manifest)
    assert all(r["status"] == "ok" for r in manifest["images"])


@pytest.mark.slow
@pytest.mark.parametrize("kind, preset_run", [
    ("SDXL", lambda run: run(*SMALL)),  # the README's default command: sdxl_base
    ("SD 1.5", lambda run: run(*preset_command("model=sd15"))),
], ids=["sdxl", "sd15"])  # fmt: skip
def test_a_single_file_checkpoint_loads_offline_and_makes_the_pipelines_pixels(
    replica_run, scorer_home, kind, preset_run
):
    """model=local model.path=<original-layout file>: the family is read from the tensor names
    and the configs come from the family's cached base repo. The file holds the replica's fp16
    weights, so the images are those of the preset that loads the repo."""
    name = replicas.SDXL_SINGLE_FILE if kind == "SDXL" else replicas.SD15_SINGLE_FILE
    single = replica_run("model=local", f"model.path={scorer_home / 'files' / name}",
                         *SMALL, "scorer=tiny")  # fmt: skip
    preset = preset_run(replica_run)
    run = read_manifest(single.run_dir)["run"] if single.returncode == 0 else {}
    assert run.get("model_family") == ("sdxl" if kind == "SDXL" else "sd15"), single.stderr[-3000:]
    for a, b in zip(pictures(single), pictures(preset), strict=True):
        assert_same_picture(a, b, f"{kind} single file vs its repo")


def test_a_kohya_lora_makes_the_pixels_of_the_same_lora_in_diffusers_format(replica_home):
    """UNet blocks in the original numbering, both text encoders, alpha = rank / 2."""
    from safetensors.torch import load_file, save_file

    from keyframes.config.schema import LoraConfig
    from tests.helpers import demo_jobs, euler_tiny_pipe
    from tests.test_loras import image, with_loras

    files = replica_home / "files"
    keys = load_file(files / replicas.LORA_KOHYA)
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)
    assert any(k.startswith("lora_te2_text_model_") for k in keys)
    no_alpha = files.parent / "kohya_without_alpha.safetensors"
    save_file({k: v for k, v in keys.items() if not k.endswith(".alpha")}, no_alpha)

    pipe, job = euler_tiny_pipe(), demo_jobs(1)[0]
    plain = image(pipe, job)
    made = {
        path.name: with_loras(pipe, job, [LoraConfig(path=str(path), scale=1.0)])
        for path in (files / replicas.LORA_DIFFUSERS, files / replicas.LORA_KOHYA, no_alpha)
    }
    diffusers, kohya = made[replicas.LORA_DIFFUSERS], made[replicas.LORA_KOHYA]
    assert_same_picture(kohya, diffusers, "kohya vs diffusers")
    # how far a real bug would be: the LoRA itself, and the alphas ignored (updates doubled)
    assert pixel_gap(diffusers, plain).mean > 0.5
    assert pixel_gap(made[no_alpha.name], diffusers).mean > 0.5


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["controlnet=canny_sdxl", "controlnet=depth_sdxl",
                                    "controlnet=canny_sd15", "controlnet=depth_sd15"])  # fmt: skip
def test_each_controlnet_loads_from_its_real_repo_offline(run_cli, replica_home, tmp_path, preset):
    kind, family = preset.split("=")[1].split("_")
    model = ("model=sd15",) if family == "sd15" else ()
    Image.new("RGB", (64, 64), (200, 200, 200)).save(tmp_path / "control.png")
    shotlist = write_json(
        tmp_path / "shots.json",
        {
            "title": "control",
            "scenes": [
                {"id": "a", "description": "a harbor at dawn",
                 "control": {"type": kind, "image": "control.png"}},
                {"id": "b", "description": "a lighthouse"},
            ],
        },
    )  # fmt: skip
    result = run_cli(
        *model, preset, f"shotlist={shotlist}", *SMALL, "scorer=tiny", env=offline(replica_home)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    images = read_manifest(result.run_dir)["images"]
    assert images[0]["control"]["controlnet"] == preset.split("=")[1]
    assert images[1]["control"] is None


@pytest.mark.slow
def test_an_empty_cache_offline_names_every_missing_repo_before_loading(run_cli, tmp_path):
    result = run_cli(
        *SMALL, "model=sdxl_lightning", "upscale=refiner", "consistency=ip_adapter",
        "controlnet=canny_sdxl", f"model.vae={replicas.SDXL_VAE_FP16_FIX}",
        env=offline(tmp_path / "empty"),
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    for repo in (replicas.SDXL_BASE, replicas.CLIP_L14_OPENAI, replicas.IP_ADAPTER,
                 replicas.SDXL_REFINER, replicas.SDXL_LIGHTNING, replicas.LIGHTNING_UNET,
                 "diffusers/controlnet-canny-sdxl-1.0", replicas.SDXL_VAE_FP16_FIX):  # fmt: skip
        assert repo in result.stderr, result.stderr
    assert not (result.run_dir / "keyframes").exists()


def test_a_repo_is_written_as_blobs_a_snapshot_and_refs_main(tmp_path):
    snapshot = replicas.write_repo(tmp_path / "hub", "org/name", _folder(tmp_path / "src"))
    root = replicas.repo_folder(tmp_path / "hub", "org/name")
    assert (root / "refs" / "main").read_text() == snapshot.name
    assert json.loads((snapshot / "sub" / "config.json").read_text()) == {"a": 1}


def _folder(path: Path) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "sub" / "config.json").write_text('{"a": 1}')
    return path
