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
NO_VAE = "sdxl_single_file_no_vae.safetensors"  # the SDXL single file, its VAE left out


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
def default_run(tmp_path_factory, scorer_home):
    """The README's default command, offline on the replicas (the real ViT-L-14 layout)."""
    return run_keyframes(tmp_path_factory.mktemp("default"), SMALL, env=offline(scorer_home))


def pictures(run_dir: Path) -> list[np.ndarray]:
    images = read_manifest(run_dir)["images"]
    return [np.asarray(Image.open(run_dir / r["file"]), dtype=np.int16) for r in images]


@pytest.mark.slow
def test_the_readme_default_command_runs_offline_from_the_replicas(default_run):
    result = default_run
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


# Every other preset and model path is one job of a single sweep: the CLI's start-up (about
# 10 s of imports) is paid once, and each job loads its repos from the replicas by their real
# ids, as a run of its own would. The jobs are experiment files in a test-only config folder:
# case -> (config groups chosen, other settings, control type of the shotlist, manifest check).
CASES = {
    "sdxl_turbo": (
        {"model": "sdxl_turbo"},
        {},
        None,
        lambda m: m["run"]["model_source"] == replicas.SDXL_TURBO,
    ),
    "sdxl_lightning": (
        {"model": "sdxl_lightning"},
        {},
        None,
        lambda m: m["run"]["model"] == "sdxl_lightning",
    ),
    "sd15": ({"model": "sd15"}, {}, None, lambda m: m["run"]["model_family"] == "sd15"),
    "refiner": (
        {"upscale": "refiner"},
        {},
        None,
        lambda m: m["images"][0]["upscale"]["model"] == replicas.SDXL_REFINER,
    ),
    "ip_adapter": (
        {"consistency": "ip_adapter"},
        {},
        None,
        lambda m: m["images"][1]["consistency"] == "ip_adapter",
    ),
    "vae_fp16_fix": (
        {},
        {"model": {"vae": replicas.SDXL_VAE_FP16_FIX}},
        None,
        lambda m: m["run"]["model"] == "sdxl_base",
    ),
    **{
        f"{kind}_{family}": (
            {"controlnet": f"{kind}_{family}", **({"model": "sd15"} if family == "sd15" else {})},
            {},
            kind,
            lambda m, name=f"{kind}_{family}": (
                m["images"][0]["control"]["controlnet"] == name
                and m["images"][1]["control"] is None
            ),
        )
        for kind in ("canny", "depth")
        for family in ("sdxl", "sd15")
    },
    "sdxl_single_file": (
        {"model": "local"},
        {"model": {"path": replicas.SDXL_SINGLE_FILE}, "shotlist": "demo"},
        None,  # as the default command
        lambda m: m["run"]["model_family"] == "sdxl",
    ),
    "sd15_single_file": (
        {"model": "local"},
        {"model": {"path": replicas.SD15_SINGLE_FILE}},
        None,
        lambda m: m["run"]["model_family"] == "sd15",
    ),
    # a checkpoint shared without its VAE, and the VAE as its own file (sdxl_vae.safetensors)
    "sdxl_vae_file": (
        {"model": "local"},
        {"model": {"path": NO_VAE, "vae": replicas.SDXL_VAE_FILE}, "shotlist": "demo"},
        None,
        lambda m: m["run"]["model_family"] == "sdxl",
    ),
}


def _case_configs(folder: Path, files: Path) -> Path:
    """One experiment file per case (like conf/experiment/smoke.yaml), and the shotlists."""
    from safetensors.torch import load_file, save_file

    state = load_file(files / replicas.SDXL_SINGLE_FILE)
    save_file(
        {k: v for k, v in state.items() if not k.startswith("first_stage_model.")}, files / NO_VAE
    )
    (folder / "experiment").mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 200, 200)).save(folder / "control.png")
    for case, (groups, values, control, _) in CASES.items():
        # two scenes (IP-Adapter shows the first to the second); a control on the first
        scenes = [
            {"id": "a", "description": "a harbor at dawn"},
            {"id": "b", "description": "a lighthouse"},
        ]
        if control:
            scenes[0] = {**scenes[0], "control": {"type": control, "image": "control.png"}}
        shotlist = write_json(
            folder / f"{control or 'plain'}.json", {"title": "replicas", "scenes": scenes}
        )
        values = {"shotlist": str(shotlist), **values}
        if "path" in values.get("model", {}):
            values = {**values, "model": {k: str(files / v) for k, v in values["model"].items()}}
        config = {
            "defaults": [{f"override /{g}": option} for g, option in groups.items()],
            **values,
        }
        text = "# @package _global_\n" + json.dumps(config)  # JSON is YAML
        (folder / "experiment" / f"replica_{case}.yaml").write_text(text)
    return folder


@pytest.fixture(scope="session")
def case_runs(tmp_path_factory, scorer_home) -> dict:
    """case -> (exit code of the sweep, the job's manifest or None)."""
    tmp = tmp_path_factory.mktemp("cases")
    configs = _case_configs(tmp / "conf", scorer_home / "files")
    overrides = [
        "-m",
        f"hydra.searchpath=[file://{configs}]",
        f"hydra.sweep.dir={tmp / 'sweep'}",
        "experiment=" + ",".join(f"replica_{case}" for case in CASES),
        *SMALL,
        "scorer=tiny",
    ]
    result = run_keyframes(tmp, overrides, env=offline(scorer_home))
    assert result.returncode == 0, result.stderr[-5000:]
    jobs = {}
    for manifest in (tmp / "sweep").glob("*/manifest.json"):
        run_dir = manifest.parent
        case = next(
            o for o in read_manifest(run_dir)["run"]["overrides"] if o.startswith("experiment=")
        ).removeprefix("experiment=replica_")
        jobs[case] = run_dir
    return jobs


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_each_preset_and_model_file_loads_from_its_real_repo_offline(case_runs, case):
    manifest = read_manifest(case_runs[case])
    assert CASES[case][3](manifest)
    assert all(r["status"] == "ok" for r in manifest["images"])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_a_single_file_checkpoint_makes_the_pixels_of_the_repo_it_was_written_from(
    case_runs, default_run, family
):
    """model=local model.path=<original-layout file>: the family is read from the tensor names
    and the configs come from the family's cached base repo. The file holds the replica's fp16
    weights, so the images are those of the preset that loads the repo (for SDXL the README's
    default command: sdxl_base)."""
    single = pictures(case_runs[f"{family}_single_file"])
    preset = pictures(default_run.run_dir if family == "sdxl" else case_runs["sd15"])
    for a, b in zip(single, preset, strict=True):
        assert_same_picture(a, b, f"{family} single file vs its repo")
    if family == "sdxl":  # the same weights, the VAE given as a file of its own
        for a, b in zip(pictures(case_runs["sdxl_vae_file"]), single, strict=True):
            assert_same_picture(a, b, "checkpoint + model.vae file vs the whole checkpoint")


def test_a_kohya_lora_makes_the_pixels_of_the_same_lora_in_diffusers_format(replica_home):
    """UNet blocks in the original numbering, both text encoders, alpha = rank / 2."""
    from safetensors.torch import load_file, save_file

    from keyframes.config.schema import LoraConfig
    from tests.helpers import demo_jobs, euler_tiny_pipe, image, with_loras

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
@pytest.mark.parametrize(
    "overrides, repos",
    [
        (
            (
                "model=sdxl_lightning",
                "upscale=refiner",
                "consistency=ip_adapter",
                "controlnet=canny_sdxl",
                f"model.vae={replicas.SDXL_VAE_FP16_FIX}",
            ),
            (
                replicas.SDXL_BASE,
                replicas.CLIP_L14_OPENAI,
                replicas.AESTHETIC,
                replicas.IP_ADAPTER,
                replicas.SDXL_REFINER,
                replicas.SDXL_LIGHTNING,
                replicas.LIGHTNING_UNET,
                "diffusers/controlnet-canny-sdxl-1.0",
                replicas.SDXL_VAE_FP16_FIX,
            ),
        ),
        (
            ("model=sd15", "controlnet=depth_sd15"),
            (
                replicas.SD15,
                replicas.CLIP_L14_OPENAI,
                replicas.AESTHETIC,
                "lllyasviel/control_v11f1p_sd15_depth",
            ),
        ),
    ],
    ids=["sdxl", "sd15"],
)
def test_an_empty_cache_offline_names_every_missing_repo_before_loading(
    run_cli, tmp_path, overrides, repos
):
    result = run_cli(*SMALL, *overrides, env=offline(tmp_path / "empty"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert result.stderr.count("error:") == 1  # one message, every missing repo in it
    for repo in repos:
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


def test_the_full_size_replica_holds_only_fp16_variant_files(tmp_path, monkeypatch):
    """write_full_replicas on the tiny components (the full ones take a minute and 8 GB; that
    run is in docs/benchmarks.md): the repo's layout with fp16 files only, built in fp16."""
    import torch

    from keyframes.pipeline import architectures
    from keyframes.pipeline.tiny import build_tiny_pipeline

    built = []

    def tiny_components(name, device, dtype):
        built.append((name, device, dtype))
        pipe = build_tiny_pipeline().to(dtype=dtype)
        return pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2

    monkeypatch.setattr(architectures, "build_components", tiny_components)
    hub = replicas.write_full_replicas(tmp_path)
    assert built == [("sdxl_base", "cpu", torch.float16)]  # drawn in fp16: one copy in memory
    snapshot = replicas.repo_folder(hub, replicas.SDXL_BASE) / "snapshots"
    files = {p.relative_to(p.parents[1]).as_posix() for p in snapshot.glob("*/*/*")}
    assert {
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/config.json",
        "text_encoder_2/model.fp16.safetensors",
        "tokenizer_2/merges.txt",
    } <= files
    assert not any(f.endswith(".safetensors") and ".fp16." not in f for f in files)


# What a tiny model may change in a published config: widths, depths and counts, nothing else.
SIZES = {
    "unet": {
        "block_out_channels",
        "layers_per_block",
        "attention_head_dim",
        "norm_num_groups",
        "transformer_layers_per_block",
        "sample_size",
        "cross_attention_dim",
        "addition_time_embed_dim",
        "projection_class_embeddings_input_dim",
    },
    "vae": {"block_out_channels", "layers_per_block", "norm_num_groups", "sample_size"},
    "text_encoder": {
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "projection_dim",
    },
    "scheduler": set(),
}
SIZES["text_encoder_2"] = SIZES["text_encoder"]
WRITER_NOTES = {
    "_diffusers_version",
    "_name_or_path",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "use_cache",
}
REPLICA_CONFIGS = [  # (repo, its published configs under keyframes/data/, components)
    (
        replicas.SDXL_BASE,
        "sdxl_base",
        ["unet", "vae", "text_encoder", "text_encoder_2", "scheduler"],
    ),
    (replicas.SD15, "sd15", ["unet", "vae", "text_encoder", "scheduler"]),
    (replicas.SDXL_REFINER, "sdxl_refiner", ["unet"]),
    (replicas.SDXL_REFINER, "sdxl_base", ["text_encoder_2", "vae", "scheduler"]),  # shared
]


def class_defaults(component: str, config: dict) -> dict:
    """What a loader assumes for a field a config file leaves out: the class's default."""
    import inspect

    import diffusers
    from transformers import CLIPTextConfig

    if component.startswith("text_encoder"):
        return CLIPTextConfig().to_dict()
    cls = getattr(diffusers, config["_class_name"])
    parameters = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def as_json(value):
    return json.loads(json.dumps(value))  # tuples as lists, as the files hold them


@pytest.mark.parametrize(
    "repo, published, components",
    REPLICA_CONFIGS,
    ids=["sdxl_base", "sd15", "refiner_unet", "refiner_shared"],
)
def test_every_replica_config_is_the_published_one_but_for_sizes(
    replica_home, repo, published, components
):
    """Token ids, activations, block types, prediction type and scheduler settings as
    published: the tiny models once used eos_token_id 49407 and hid a pooling bug that the
    published eos_token_id 2 shows (tests/test_embeddings.py)."""
    from huggingface_hub import try_to_load_from_cache

    data = Path(replicas.__file__).parent.parent / "data" / published
    for component in components:
        name = "scheduler_config.json" if component == "scheduler" else "config.json"
        path = try_to_load_from_cache(repo, f"{component}/{name}", cache_dir=replica_home / "hub")
        replica = json.loads(Path(path).read_text())
        real = json.loads((data / f"{component}.json").read_text())
        defaults = class_defaults(component, real)
        differ = {
            key: (real.get(key, defaults.get(key, "(no default)")), replica.get(key))
            for key in (set(real) | set(replica)) - SIZES[component] - WRITER_NOTES
            if as_json(real.get(key, defaults.get(key)))
            != as_json(replica.get(key, real.get(key, defaults.get(key))))
        }
        assert differ == {}, f"{repo} {component}: (published, replica) {differ}"


@pytest.mark.parametrize("repo", replicas.CONTROLNETS)
def test_a_controlnet_replica_shares_its_base_unets_published_settings(replica_home, repo):
    """A ControlNet's config repeats its base UNet's (diffusers makes it from the UNet): every
    field the two share, sizes aside, is the published UNet's. (The ControlNet repos' own
    files are not packaged; their extra fields are diffusers' defaults here.)"""
    from huggingface_hub import try_to_load_from_cache

    base = "sd15" if replicas.CONTROLNETS[repo] == "sd15" else "sdxl_base"
    real = json.loads(
        (Path(replicas.__file__).parent.parent / "data" / base / "unet.json").read_text()
    )
    path = try_to_load_from_cache(repo, "config.json", cache_dir=replica_home / "hub")
    replica = json.loads(Path(path).read_text())
    shared = (set(real) & set(replica)) - SIZES["unet"] - WRITER_NOTES - {"_class_name"}
    assert {"act_fn", "down_block_types", "flip_sin_to_cos", "in_channels"} <= shared
    differ = {k: (real[k], replica[k]) for k in shared if as_json(real[k]) != as_json(replica[k])}
    assert differ == {}, f"{repo}: (published UNet, replica) {differ}"


@pytest.mark.slow
def test_a_sweep_over_the_consistency_methods_is_one_table(tmp_path, replica_home):
    """The README's way to choose a method, offline: the tiny model, the IP-Adapter from its
    h94/IP-Adapter replica. One table with both consistency figures, adherence, seconds,
    UNet evaluations, TFLOP and VRAM (empty on a CPU) per method."""
    import csv

    methods = ["none", "style_aligned", "story", "character_ref"]
    sweep_dir = tmp_path / "sweep"
    overrides = ["experiment=smoke", *SMALL, "-m", f"consistency={','.join(methods)}"]
    result = run_keyframes(
        tmp_path, [*overrides, f"hydra.sweep.dir={sweep_dir}"], env=offline(replica_home)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {
        r["consistency"]: r for r in csv.DictReader(open(sweep_dir / "summary" / "summary.csv"))
    }
    assert sorted(rows) == sorted(methods)
    for column in ("character_consistency", "style_consistency", "clip_score_mean"):
        assert all(0 < abs(float(r[column])) <= 100 for r in rows.values()), column
    for column in (
        "seconds_per_image_mean",
        "unet_evaluations_per_image_mean",
        "tflops_per_image_mean",
    ):
        assert all(float(r[column]) > 0 for r in rows.values()), column
    assert "vram_peak_gb_max" in rows["none"]
    assert "character_consistency" in result.stdout + result.stderr  # the printed table
    # story's extra attention is counted in the work an image cost, not in UNet evaluations
    jobs = {r["consistency"]: sweep_dir / r["job"] for r in rows.values()}
    records = {m: {r["scene_id"]: r for r in read_manifest(jobs[m])["images"]} for m in methods}
    anchor = records["story"]["lamp-room"]
    assert anchor["story"] == {"anchor_of": "Mara", "reads": []}
    assert anchor["unet_evaluations"] == records["none"]["lamp-room"]["unet_evaluations"]
    assert anchor["tflops"] > records["none"]["lamp-room"]["tflops"]
    # character_ref made a portrait for each character of the demo's sheet
    assert {"character-Mara", "character-Ilo"} <= set(records["character_ref"])
