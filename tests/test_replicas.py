"""Every preset and README model command, run offline from replicas of the real hub repos:
the exact repo ids, subfolders, fp16 variants and weight names the code uses for the real
thing, in the Hugging Face cache layout, with tiny random weights (full-size for the ViT-L-14
scorer, which open_clip builds at its one size)."""

import json
from pathlib import Path

import pytest
from PIL import Image

from keyframes.pipeline import replicas
from tests.conftest import read_manifest
from tests.helpers import write_json

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


@pytest.mark.slow
def test_the_readme_default_command_runs_offline_from_the_replicas(run_cli, scorer_home):
    result = run_cli(*SMALL, env=offline(scorer_home))
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
}


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_loads_from_its_real_repo_offline(run_cli, replica_home, preset):
    steps = () if "lightning" in preset or "turbo" in preset else ("steps=2",)
    result = run_cli(
        preset, "width=64", "height=64", *steps, "scorer=tiny", env=offline(replica_home)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_manifest(result.run_dir)
    assert PRESETS[preset](manifest)
    assert all(r["status"] == "ok" for r in manifest["images"])


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["controlnet=canny_sdxl", "controlnet=depth_sdxl"])
def test_each_sdxl_controlnet_loads_from_its_real_repo_offline(
    run_cli, replica_home, tmp_path, preset
):
    kind = preset.split("=")[1].split("_")[0]
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
        preset, f"shotlist={shotlist}", *SMALL, "scorer=tiny", env=offline(replica_home)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    images = read_manifest(result.run_dir)["images"]
    assert images[0]["control"]["controlnet"] == preset.split("=")[1]
    assert images[1]["control"] is None


@pytest.mark.slow
def test_an_empty_cache_offline_names_every_missing_repo_before_loading(run_cli, tmp_path):
    result = run_cli(
        *SMALL, "model=sdxl_lightning", "upscale=refiner", "consistency=ip_adapter",
        "controlnet=canny_sdxl", env=offline(tmp_path / "empty"),
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    for repo in (replicas.SDXL_BASE, replicas.CLIP_L14_OPENAI, replicas.IP_ADAPTER,
                 replicas.SDXL_REFINER, replicas.SDXL_LIGHTNING, replicas.LIGHTNING_UNET,
                 "diffusers/controlnet-canny-sdxl-1.0"):  # fmt: skip
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
