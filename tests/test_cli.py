"""End to end: the command a user types, in a subprocess, against a temp folder and store."""

import json

import pytest
from PIL import Image

from tests.conftest import read_manifest
from tests.helpers import DEMO_FILES, mlflow_runs, write_json

MANIFEST_KEYS = {
    "scene_id",
    "take",
    "file",
    "seed",
    "prompt",
    "negative_prompt",
    "steps",
    "cfg_scale",
    "sampler",
    "width",
    "height",
    "model",
    "style",
    "seconds",
    "vram_peak_gb",
    "clip_score",
}


def test_smoke_run_writes_keyframes_manifest_and_contact_sheet(smoke_run):
    run_dir = smoke_run.run_dir
    assert sorted(p.name for p in (run_dir / "keyframes").iterdir()) == DEMO_FILES
    manifest = read_manifest(run_dir)
    assert len(manifest["images"]) == 7
    for record in manifest["images"]:
        assert MANIFEST_KEYS <= set(record)
        assert (run_dir / record["file"]).is_file()
        assert (record["width"], record["height"], record["steps"]) == (256, 144, 4)
        assert record["vram_peak_gb"] is None and record["rss_peak_gb"] > 0  # CPU: no VRAM figure
        assert 0 <= record["clip_score"] <= 100 and 0 <= record["clip_score_prompt"] <= 100
        assert record["prompt"].startswith("cinematic film still, ")
        assert Image.open(run_dir / record["file"]).size == (256, 144)
    assert manifest["run"]["title"] == "Salt and Signal"
    assert manifest["run"]["summary"]["images"] == 7
    assert manifest["run"][
        "command"
    ] == "uv run python -m keyframes.run experiment=smoke " + " ".join(
        manifest["run"]["overrides"][1:]
    )
    sheet = Image.open(run_dir / "contact_sheet.png")
    assert sheet.width > 4 * 256 and sheet.height > 2 * 144  # 4 columns, 2 rows of keyframes
    assert (run_dir / "config.yaml").is_file()
    assert not list(run_dir.rglob("*.tmp"))


def test_each_png_carries_its_recipe(smoke_run):
    manifest = read_manifest(smoke_run.run_dir)
    record = manifest["images"][2]
    text = Image.open(smoke_run.run_dir / record["file"]).text
    lines = text["parameters"].splitlines()
    assert lines[0] == record["prompt"]
    assert lines[1] == f"Negative prompt: {record['negative_prompt']}"
    assert lines[2].startswith(
        f"Steps: 4, Sampler: DPM++ 2M Karras, CFG scale: 5, Seed: {record['seed']}, Size: 256x144, Model: tiny"
    )
    provenance = json.loads(text["keyframes"])
    assert provenance["record"]["seed"] == record["seed"]
    assert (
        provenance["scene"]["id"] == "the-boat"
        and provenance["scene"]["negative_prompt"] == "calm water"
    )
    assert provenance["run"]["config_hash"] == manifest["run"]["config_hash"]
    assert set(provenance["run"]["versions"]) >= {"torch", "diffusers", "transformers"}
    assert provenance["run"]["device"] == "cpu" and provenance["run"]["dtype"] == "float32"
    assert provenance["run"]["timings"]["model_load_seconds"] > 0


def test_smoke_run_is_logged_to_mlflow(smoke_run):
    client, runs = mlflow_runs(smoke_run.store)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "smoke"
    assert read_manifest(smoke_run.run_dir)["run"]["mlflow"]["run_id"] == run.info.run_id
    params = run.data.params
    assert (
        params["steps"] == "4"
        and params["model.name"] == "tiny"
        and params["style.name"] == "cinematic"
    )
    assert params["sampler.options.use_karras_sigmas"] == "true"
    assert len(params) > 30
    metrics = run.data.metrics
    assert metrics["images"] == 7
    for key in ("clip_score_mean", "seconds_per_image_mean", "model_load_seconds", "rss_peak_gb"):
        assert key in metrics
    assert "vram_peak_gb_max" not in metrics  # CPU: absent, not 0
    history = client.get_metric_history(run.info.run_id, "clip_score")
    assert sorted(m.step for m in history) == list(range(7))
    tags = run.data.tags
    assert tags["keyframes.model"] == "tiny" and tags["keyframes.style"] == "cinematic"
    assert tags["keyframes.device"] == "cpu" and "version.torch" in tags
    assert tags["keyframes.memory_mode"] == "none" and tags["keyframes.speed"] == "sdpa"
    assert params["memory.name"] == "auto" and "compile_seconds" not in metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"keyframes", "contact_sheet.png", "manifest.json", "config.yaml", "hydra"} <= artifacts
    assert "run.log" in artifacts  # MLflow mirrors the run folder, the log included
    images = {a.path for a in client.list_artifacts(run.info.run_id, "keyframes")}
    assert images == {f"keyframes/{name}" for name in DEMO_FILES}


def test_shotlist_takes_seed_and_cfg_overrides(cli_in_process, tmp_path):
    shots = write_json(
        tmp_path / "shots.json",
        {
            "title": "Two Shots",
            "scenes": [
                {"id": "door", "description": "a red door", "takes": 1, "director_note": "x"},
                {"id": "sea", "description": "a calm sea", "seed": 99},
            ],
        },
    )
    code, err, run_dir, store = cli_in_process(
        f"shotlist={shots}", "cfg_scale=6", "seed=7", "takes=2", "batch_size=2"
    )
    assert code == 0, err[-2000:]
    log = (run_dir / "run.log").read_text()
    assert "unknown fields kept as metadata: scenes[*].director_note" in log
    images = read_manifest(run_dir)["images"]
    assert [(r["scene_id"], r["take"], r["seed"]) for r in images][1:] == [
        ("sea", 1, 99),
        ("sea", 2, 100),
    ]
    assert [r["file"] for r in images] == [
        "keyframes/001_door_t1.png",
        "keyframes/002_sea_t1.png",
        "keyframes/002_sea_t2.png",
    ]
    assert all(r["cfg_scale"] == 6 for r in images)
    assert images[0]["scene_extra"] == {"director_note": "x"} and images[1]["scene_extra"] == {}
    assert "CFG scale: 6," in Image.open(run_dir / images[0]["file"]).text["parameters"]
    _, runs = mlflow_runs(store)
    assert runs[0].data.metrics["images"] == 3


def assert_nothing_written(result):
    assert result.returncode == 2, result.output[-2000:]
    assert "Traceback" not in result.output
    assert not result.run_dir.exists()
    assert not result.store.exists()


def scene(i, **fields):
    return {"id": f"s{i}", "description": f"scene {i}", **fields}


BAD_SHOTLISTS = {
    "invalid_json": (
        '{"scenes": [\n  {"id": "a"\n]}',
        "is not valid JSON: Expecting ',' delimiter at line 3, column 1",
    ),
    "schema": (json.dumps({"scenes": [scene(0), {"id": "x"}]}), "scenes[1].description: missing"),
    "duplicate_ids": (
        json.dumps([scene(1), scene(1)]),
        "scenes[1].id: duplicate id 's1' (first used by scenes[0])",
    ),
    "no_scenes": (
        json.dumps({"title": "t", "scenes": []}),
        "scenes: empty, a shotlist needs at least one scene",
    ),
    "unknown_character": (
        json.dumps([scene(1, characters=["Zed"])]),
        "scenes[0].characters[0]: unknown character 'Zed'",
    ),
    "bad_seed": (
        json.dumps([scene(1, seed="x")]),
        "scenes[0].seed: expected an integer, got a string",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SHOTLISTS))
def test_bad_shotlist_fails_with_one_message_and_writes_nothing(refused_cli, tmp_path, case):
    text, message = BAD_SHOTLISTS[case]
    path = tmp_path / "shots.json"
    path.write_text(text)
    result = refused_cli("experiment=smoke", f"shotlist={path}")
    assert_nothing_written(result)
    assert result.stderr.startswith(f"error: shotlist {path}")
    assert message in result.stderr


def test_missing_shotlist_file(refused_cli, tmp_path):
    result = refused_cli("experiment=smoke", f"shotlist={tmp_path}/nope.json")
    assert_nothing_written(result)
    assert result.stderr.strip() == f"error: shotlist not found: {tmp_path}/nope.json"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["steps=0"], "steps=0: must be at least 1"),
        (["cfg_scale=-1"], "cfg_scale=-1.0: must be a number >= 0"),
        (["width=100"], "width=100: must be a multiple of 8 and at least 64"),
        (["height=250"], "height=250: must be a multiple of 8 and at least 64"),
        (
            ["takes=0", "batch_size=0"],
            "takes=0: must be between 1 and 1000\n  batch_size=0: must be at least 1",
        ),
        (
            ["model=local", "model.path=/no/such/model"],
            "model.path=/no/such/model: no such file or folder",
        ),
        (
            ["model=tiny_sd15", "upscale=tiny_refiner"],
            "upscale=refiner: the SDXL refiner finishes SDXL latents; tiny_sd15 is sd15",
        ),
    ],
)
def test_bad_numbers_fail_before_any_model_loads(refused_cli, overrides, message):
    result = refused_cli("experiment=smoke", *overrides)
    assert_nothing_written(result)
    assert message in result.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        ("steps=many", "could not be converted to Integer"),
        ("style=vaporwave", "Could not find 'style/vaporwave'"),
    ],
)
def test_config_errors_keep_hydras_message_and_exit_2(refused_cli, override, message):
    result = refused_cli("experiment=smoke", override)
    assert_nothing_written(result)
    assert message in result.output
    # found before Hydra runs: one line of ours, not Hydra's report and its hint
    assert result.stderr.startswith("error: ") and "HYDRA_FULL_ERROR" not in result.output


def test_the_command_line_is_read_as_hydra_reads_it():
    """Hydra's own flags, with their values, are not overrides, wherever they stand."""
    from keyframes.run import hydra_arguments

    argv = ["-cn", "config", "steps=2", "--info", "config", "-m", "seed=1,2", "--cfg", "job"]
    assert hydra_arguments(argv) == (["steps=2", "seed=1,2"], True)
    assert hydra_arguments(["experiment=smoke", "--resolve", "-c", "all"]) == (
        ["experiment=smoke"],
        False,
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ("stepz=40", "stepz: no such setting (the closest known one is steps)"),
        ("+stpes=4", "+stpes: no such setting (the closest known one is steps)"),
        ("++model.pth=x", "++model.pth: no such setting (the closest known one is model.path)"),
        ("+cfg=3", "+cfg: no such setting (the closest known one is cfg_scale)"),
    ],
)
def test_an_unknown_key_is_exit_2_naming_the_closest_known_one(cli_in_process, override, message):
    """Hydra's own hint (add it with +) would make a typo succeed silently."""
    code, err, run_dir, store = cli_in_process(override, fresh_store=True)
    assert code == 2 and message in err, err
    assert not run_dir.exists() and not store.exists()


@pytest.mark.parametrize(
    "text_encoders, kind",
    [
        (["conditioner.embedders.0.transformer.x", "conditioner.embedders.1.model.x"], "SDXL"),
        (["cond_stage_model.transformer.text_model.final_layer_norm.weight"], "SD 1.5"),
    ],
)
def test_single_file_checkpoint_without_configs_offline_says_what_to_set(
    run_cli, tmp_path, text_encoders, kind
):
    """The pipeline class follows the checkpoint: SD 1.x tensor names load as SD 1.5. (One
    tensor per part: the file holds every part, so what it lacks is the configs.)"""
    import torch
    from safetensors.torch import save_file

    checkpoint = tmp_path / "my-model.safetensors"
    tensors = [
        "model.diffusion_model.input_blocks.0.0.weight",
        "first_stage_model.x",
        *text_encoders,
    ]
    save_file({t: torch.zeros(4, 4, 3, 3) for t in tensors}, checkpoint)
    result = run_cli(
        "model=local",
        f"model.path={checkpoint}",
        "scorer=none",
        env={"HF_HOME": str(tmp_path / "empty-hf-home")},
    )
    assert_nothing_written(result)
    assert f"error: model local ({checkpoint}) is not available." in result.stderr
    assert f"set model.config to a local diffusers {kind} folder" in result.stderr


def test_missing_sdxl_weights_stop_with_instructions(run_cli, tmp_path):
    result = run_cli(env={"HF_HOME": str(tmp_path / "empty-hf-home"), "HF_HUB_OFFLINE": "1"})
    assert_nothing_written(result)
    err = result.stderr
    assert (
        "error: model sdxl_base (stabilityai/stable-diffusion-xl-base-1.0) is not available." in err
    )
    assert f"Looked in the Hugging Face cache {tmp_path}/empty-hf-home/hub" in err
    assert "HF_HUB_OFFLINE is set" in err
    assert "uv run hf download stabilityai/stable-diffusion-xl-base-1.0" in err
    assert "experiment=smoke" in err
    # the scorer is missing too: named in the same message, found in the same pass
    assert err.count("error:") == 1 and "CLIP scorer ViT-L-14/openai is not available." in err
    assert "uv run hf download timm/vit_large_patch14_clip_224.openai" in err
    assert "Retrying" not in result.output and "could not be reached" not in err


def test_a_missing_scorer_stops_the_run_before_the_model_is_built(
    cli_in_process, monkeypatch, tmp_path
):
    """model=sdxl_random would build 2.5 B parameters (about a minute, 15 GB) first."""
    from huggingface_hub import constants

    import keyframes.pipeline.architectures

    def build(*args, **kwargs):
        raise AssertionError("the model was built before the scorer was checked")

    monkeypatch.setattr(keyframes.pipeline.architectures, "build_random_pipeline", build)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    code, err, run_dir, _ = cli_in_process("model=sdxl_random", "scorer=clip")
    assert code == 2, err[-2000:]
    assert err.startswith("error: CLIP scorer ViT-L-14/openai is not available.\n")
    assert f"in the Hugging Face cache {tmp_path / 'empty-cache'}" in err
    assert "HF_HUB_OFFLINE is set, so nothing is downloaded" in err and "Retrying" not in err
    assert not run_dir.exists()


def test_an_aspect_typed_on_the_command_line_wins_over_the_presets_size(cli_in_process):
    """experiment=smoke sets 256x144; aspect=21:9 typed by the user keeps the width."""
    code, err, run_dir, _ = cli_in_process("aspect=21:9", "steps=1", "scorer=none")
    assert code == 0, err[-2000:]
    record = read_manifest(run_dir)["images"][0]
    assert (record["width"], record["height"]) == (256, 112)
    assert Image.open(run_dir / record["file"]).size == (256, 112)
    log = (run_dir / "run.log").read_text()
    assert (
        "aspect=21:9 from the command line replaces the preset's size 256x144: using 256x112" in log
    )
    config = (run_dir / "config.yaml").read_text()
    assert "width: 256\nheight: null\n" in config  # the recorded recipe makes the same size


def test_width_and_height_typed_with_an_aspect_win_with_a_warning():
    from keyframes.config.plan import typed_aspect_wins
    from keyframes.config.validate import validate
    from tests.helpers import settings

    cfg = settings("experiment=smoke", "aspect=21:9", "width=128", "height=128")
    cfg, notes = typed_aspect_wins(cfg, {"aspect", "width", "height"})
    assert notes == ["aspect=21:9 is not used: width=128 and height=128 were given too"]
    assert validate(cfg) == (128, 128)
    cfg = settings("experiment=smoke", "aspect=1:2", "height=128")
    cfg, _ = typed_aspect_wins(cfg, {"aspect", "height"})
    assert validate(cfg) == (64, 128)
