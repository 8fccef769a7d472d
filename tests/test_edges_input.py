"""Hostile and careless input through the real command line: special files, runaway nesting,
repeated keys, huge style files, unusable run folders and sampler options. Each is one message
and exit code 2 before anything loads, never a traceback, a hang or a crash after loading."""

import json
import os
import signal
from pathlib import Path

import pytest

from tests.helpers import write_json

SCENE = {"id": "a", "description": "a harbor at dawn"}


@pytest.fixture
def deadline():
    """A test that would hang before its fix fails after 60 s instead."""

    def expire(signum, frame):
        raise TimeoutError("hung: the command never returned")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def assert_refused(result, *expected: str) -> str:
    """Exit 2, one `error:` message holding each expected text, no traceback, nothing left."""
    assert result.returncode == 2, result.output[-3000:]
    assert "Traceback" not in result.output
    assert result.stderr.count("error:") == 1 and result.stderr.startswith("error: ")
    for text in expected:
        assert text in result.stderr, result.stderr
    assert not result.run_dir.exists() and not result.store.exists()
    return result.stderr


def test_a_fifo_as_the_shotlist_is_refused_not_waited_on(refused_cli, tmp_path, deadline):
    fifo = tmp_path / "shots.json"
    os.mkfifo(fifo)
    assert_refused(refused_cli(f"shotlist={fifo}"), f"shotlist {fifo} is not a regular file")


def test_an_endless_device_as_the_shotlist_is_refused_not_read(refused_cli, deadline):
    assert_refused(refused_cli("shotlist=/dev/zero"), "shotlist /dev/zero is not a regular file")


def test_a_shotlist_nested_hundreds_deep_is_refused_before_loading(refused_cli, tmp_path):
    deep = current = {}
    for _ in range(600):  # under Python's recursion limit for json, over anything sensible
        current["x"] = {}
        current = current["x"]
    path = write_json(tmp_path / "deep.json", {"scenes": [dict(SCENE, music=deep)]})
    assert_refused(refused_cli(f"shotlist={path}"), "scenes[0].music.x.x", "nested over 32")


def test_repeated_json_keys_are_refused_not_silently_dropped(refused_cli, tmp_path):
    path = tmp_path / "shots.json"
    path.write_text(
        '{"scenes": [{"id": "a", "description": "one"}, {"id": "b", "description": "two"}],'
        ' "scenes": [{"id": "c", "description": "three", "seed": 1, "seed": 2}]}'
    )
    err = assert_refused(refused_cli(f"shotlist={path}"))
    assert "top level: key 'scenes' appears more than once (JSON keeps only the last one)" in err
    assert "scenes[0]: key 'seed' appears more than once" in err


@pytest.mark.parametrize(
    "content, expected",
    [
        ("[" * 5000 + "]" * 5000, "nested too deeply to be a style file"),
        (json.dumps([{"name": "x", "prompt": 5}]), "preset 1 (x).prompt: expected text"),
        (json.dumps([{"name": "x", "negative_prompt": ["a"]}, 7]), "preset 2: expected an object"),
        ('[{"name": "x", "name": "y"}]', "[0]: key 'name' appears more than once"),
    ],
)
def test_broken_style_files_are_one_message(refused_cli, tmp_path, content, expected):
    path = tmp_path / "styles.json"
    path.write_text(content)
    assert_refused(refused_cli("style=file", f"style.file={path}", "style.name=x"), expected)


def test_a_huge_style_file_with_a_nameless_preset_gets_a_short_message(refused_cli, tmp_path):
    presets = [{"name": f"s{i}", "prompt": "{prompt}"} for i in range(100_000)]
    presets[5]["name"] = ""
    path = write_json(tmp_path / "styles.json", presets)
    err = assert_refused(refused_cli("style=file", f"style.file={path}", "style.name=s1"))
    assert "preset 6: no name" in err and len(err) < 400

    presets[5]["name"] = "s5"
    write_json(path, presets)
    err = assert_refused(refused_cli("style=file", f"style.file={path}", "style.name=zzz"))
    assert "(presets: s0, s1, s2, s3, s4, s5, s6, s7, s8, s9 and 99990 more)" in err
    assert len(err) < 600


def test_a_thousand_problems_are_listed_twenty_and_counted(refused_cli, tmp_path):
    path = write_json(tmp_path / "shots.json", [{"id": f"s{i}"} for i in range(1000)])
    err = assert_refused(refused_cli(f"shotlist={path}"), "  ... and 980 more")
    assert err.count("\n") == 22  # the head, 20 problems, the count


def test_a_run_folder_that_cannot_be_written_is_one_line(refused_cli, tmp_path):
    taken = tmp_path / "taken"
    (taken / "keyframes").parent.mkdir()
    (taken / "keyframes").write_text("not a folder")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    cases = [
        (taken, f"{taken / 'keyframes'} is not a folder; the run writes its keyframes in a folder"),
        (dangling, f"{dangling} is a link to {tmp_path / 'nowhere'}, which does not exist"),
        (Path("/proc/keyframes-run"), "cannot write in /proc"),  # a read-only place
    ]
    for folder, expected in cases:
        result = refused_cli("experiment=smoke", f"hydra.run.dir={folder}")
        assert result.returncode == 2 and "Traceback" not in result.output
        assert result.stderr.startswith(f"error: hydra.run.dir={folder}: {expected}")
        assert result.stderr.count("\n") == 1
    assert (taken / "keyframes").read_text() == "not a folder"  # nothing touched


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "+sampler.options.beta_schedule=nope",
            "DPMSolverMultistepScheduler refuses them: nope is not",
        ),
        (
            "+sampler.options.solver_ordr=3",
            "sampler.options.solver_ordr: DPMSolverMultistepScheduler "
            "has no such option (the closest is solver_order)",
        ),
    ],
)
def test_sampler_options_are_checked_before_the_model_loads(
    refused_cli, override, expected, monkeypatch
):
    import keyframes.pipeline.load

    def no_loading(*args, **kwargs):
        raise AssertionError("the model loaded before the options were checked")

    monkeypatch.setattr(keyframes.pipeline.load, "load_pipeline", no_loading)
    assert_refused(refused_cli("experiment=smoke", override), expected)


# --- names that clean up alike ------------------------------------------------------------


def test_ids_that_clean_up_alike_keep_their_own_files_keys_and_grids(tmp_path):
    from keyframes.shotlist.jobs import plan_jobs
    from keyframes.shotlist.load import parse_shotlist
    from keyframes.tracking.report import write_grids
    from keyframes.tracking.results import JobResult
    from keyframes.tracking.review import image_keys
    from tests.helpers import image_record

    ids = ["a/b", "a_b", "a\u200bb", "x", "x_t2", "A_B"]
    shotlist = parse_shotlist({"scenes": [{"id": i, "description": "d"} for i in ids]})
    jobs = plan_jobs(shotlist, "{prompt}", "", "", 1, "derived", 2)
    assert len({job.file.lower() for job in jobs}) == len(jobs) == 12

    records = [image_record(index=j.index, scene_id=j.scene_id, take=j.take) for j in jobs]
    keys = image_keys(records)
    assert len(set(keys.values())) == 12  # x take 2 and x_t2 take 1 too
    assert keys[0] == "keyframes/a_b" and keys[2] == "keyframes/a_b-2"  # shotlist order
    assert image_keys(records[::-1]) == keys  # the same keys whatever order they come in

    from PIL import Image

    pngs = []
    for n in range(len(ids)):
        pngs.append(tmp_path / f"{n}.png")
        Image.new("RGB", (8, 8), (n * 40, 0, 0)).save(pngs[-1])
    job = JobResult("0", {}, {}, None, scenes=ids, keyframes=dict(zip(ids, pngs, strict=True)))
    grids = write_grids([job], [], tmp_path / "grids")
    assert len({p.name.lower() for p in grids}) == len(ids)


def test_unique_names_cost_no_more_when_every_id_cleans_up_alike():
    """10,000 CJK ids all clean up to `scene`: counted in name comparisons, not seconds."""
    from keyframes.shotlist import jobs

    calls = []

    def fold(name):
        calls.append(1)
        return name.lower()

    names = jobs.make_unique(["scene"] * 10_000, fold=fold)
    assert len(set(names)) == 10_000 and names[:3] == ["scene", "scene-2", "scene-3"]
    assert len(calls) < 6 * 10_000  # quadratic was about 50 million
    ids = [chr(0x4E00 + i) for i in range(10_000)]  # 一, 丁, ...
    assert len(set(jobs.unique_safe_names(ids).values())) == 10_000


def test_ids_with_invisible_or_look_alike_characters_are_warned_about():
    from keyframes.shotlist.load import parse_shotlist

    ids = ["a_b", "a\u200bb", "ｂoat", "Boat", "fine"]
    shotlist = parse_shotlist({"scenes": [{"id": i, "description": "d"} for i in ids]})
    assert shotlist.notes == (
        "scenes[1].id 'a\\u200bb' holds invisible characters (U+200B)",
        "scenes[3].id 'Boat' looks like scenes[2].id 'ｂoat'",
    )


def test_browser_and_slurm_tests_that_cannot_run_are_said_loudly_at_the_end(pytester):
    pytester.makepyfile(
        "import pytest\n\n"
        'def test_ui():\n    pytest.skip("Chromium is not installed")\n\n'
        'def test_slurm():\n    pytest.skip("no local SLURM cluster: needs root")\n'
    )
    result = pytester.runpytest("-p", "tests.loud_skips")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(
        [
            "*the MLflow UI was NOT tested*",
            "1 browser tests were skipped*",
            "*SLURM sweeps were NOT tested*",
            "1 SLURM tests were skipped*",
        ]
    )


# --- model files as users have them -------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny SDXL pipeline as an original-layout single file (header and names are what
    these checks read; the weights' size does not matter)."""
    from keyframes.pipeline.sgm_layout import write_single_file
    from tests.helpers import euler_tiny_pipe

    return write_single_file(
        euler_tiny_pipe(), tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    )


def without(checkpoint: Path, prefix: str, folder: Path) -> Path:
    from safetensors.torch import load_file, save_file

    path = folder / f"no_{prefix.rstrip('.').replace('.', '_')}.safetensors"
    save_file({k: v for k, v in load_file(checkpoint).items() if not k.startswith(prefix)}, path)
    return path


def refuse_before_loading(refused_cli, monkeypatch, *overrides: str, expected: str) -> str:
    import keyframes.pipeline.load

    def no_loading(*args, **kwargs):
        raise AssertionError("a model loaded before the files were checked")

    monkeypatch.setattr(keyframes.pipeline.load, "load_pipeline", no_loading)
    return assert_refused(refused_cli("experiment=smoke", *overrides), expected)


@pytest.mark.parametrize(
    "prefix, expected",
    [
        (
            "first_stage_model.",
            "this checkpoint holds no VAE (first_stage_model.*). Give the VAE "
            "with model.vae=/path/to/sdxl_vae.safetensors",
        ),
        (
            "conditioner.embedders.1.",
            "this checkpoint holds no second text encoder (conditioner.embedders.1.model.*)",
        ),
        (
            "conditioner.embedders.0.",
            "this checkpoint holds no first text encoder (conditioner.embedders.0.transformer.*)",
        ),
        ("model.diffusion_model.", "this checkpoint holds no UNet (model.diffusion_model.*)"),
    ],
)
def test_a_checkpoint_missing_a_part_says_which(
    refused_cli, monkeypatch, checkpoint, tmp_path, prefix, expected
):
    path = without(checkpoint, prefix, tmp_path)
    refuse_before_loading(
        refused_cli,
        monkeypatch,
        "model=local",
        f"model.path={path}",
        expected=f"model.path={path}: {expected}",
    )


def test_files_that_are_not_what_their_names_say_are_named_for_what_they_are(
    refused_cli, monkeypatch, checkpoint, tmp_path
):
    import torch

    renamed = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(2)}, renamed)  # a .ckpt given a new name
    refuse_before_loading(
        refused_cli,
        monkeypatch,
        "model=local",
        f"model.path={renamed}",
        expected=f"{renamed} is not a safetensors file but a PyTorch pickle archive",
    )
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(checkpoint.read_bytes()[:5000])  # a download that broke off
    refuse_before_loading(
        refused_cli,
        monkeypatch,
        "model=local",
        f"model.path={cut}",
        expected="is a damaged safetensors file",
    )


def test_a_vae_file_is_checked_before_loading(refused_cli, monkeypatch, checkpoint, tmp_path):
    from keyframes.pipeline.sgm_layout import write_vae_file
    from tests.helpers import euler_tiny_pipe

    good = write_vae_file(euler_tiny_pipe().vae, tmp_path / "good" / "sdxl_vae.safetensors")
    model = ("model=local", f"model.path={checkpoint}")
    not_a_vae = without(checkpoint, "first_stage_model.", tmp_path)
    refuse_before_loading(
        refused_cli,
        monkeypatch,
        *model,
        f"model.vae={not_a_vae}",
        expected="not a VAE (no encoder.* and decoder.* tensors)",
    )
    missing = tmp_path / "sdxl_vae.safetensors"
    refuse_before_loading(
        refused_cli,
        monkeypatch,
        *model,
        f"model.vae={missing}",
        expected=f"model.vae={missing}: no such file",
    )
    pickled = tmp_path / "vae.bin"
    pickled.write_bytes(b"\x80\x04K.")
    refuse_before_loading(
        refused_cli,
        monkeypatch,
        *model,
        f"model.vae={pickled}",
        expected="is a pickle (.bin), which can run code when loaded",
    )
    from keyframes.config.model_source import check_source
    from keyframes.config.schema import ModelConfig

    # the published layout (stabilityai/sdxl-vae's file) passes; it loads in test_replicas.py
    check_source(ModelConfig(name="local", path=str(checkpoint), vae=str(good)))


def test_a_damaged_aesthetic_head_is_refused_before_loading(refused_cli, monkeypatch, tmp_path):
    bad = tmp_path / "head.pth"
    bad.write_bytes(b"\x80\x04\x95 not really a pickle")
    refuse_before_loading(
        refused_cli,
        monkeypatch,
        f"scorer.aesthetic={bad}",
        expected=f"{bad} is not a readable weights file",
    )


def test_pickles_are_refused_wherever_a_path_takes_weights(refused_cli, monkeypatch, tmp_path):
    """The README's rule, everywhere: .safetensors, or a pickle only with model.allow_pickle."""
    from keyframes.conditioning.loras import check_loras
    from keyframes.config.schema import LoraConfig

    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "pytorch_lora_weights.bin").write_bytes(b"\x80\x04K.")
    refuse_before_loading(
        refused_cli,
        monkeypatch,
        f"+loras=[{{path: {lora}}}]",
        expected="pytorch_lora_weights.bin is a pickle (.bin)",
    )
    check_loras([LoraConfig(path=str(lora))], allow_pickle=True)  # allowed: it loads

    adapter = tmp_path / "ip"
    (adapter / "sdxl_models" / "image_encoder").mkdir(parents=True)
    (adapter / "sdxl_models" / "ip-adapter_sdxl.safetensors").write_bytes(b"x")
    (adapter / "sdxl_models" / "image_encoder" / "pytorch_model.bin").write_bytes(b"x")
    refuse_before_loading(
        refused_cli,
        monkeypatch,
        "consistency=ip_adapter",
        f"consistency.ip_adapter_path={adapter}",
        expected="the image encoder in " + str(adapter) + "/sdxl_models/image_encoder is a pickle",
    )
    refuse_before_loading(
        refused_cli,
        monkeypatch,
        "consistency=ip_adapter",
        f"consistency.ip_adapter_path={adapter}",
        "consistency.ip_adapter_weight=ip-adapter_sdxl.bin",
        expected="consistency.ip_adapter_weight: ip-adapter_sdxl.bin is a pickle (.bin)",
    )
    net = tmp_path / "controlnet"
    net.mkdir()
    (net / "config.json").write_text("{}")
    (net / "diffusion_pytorch_model.bin").write_bytes(b"x")
    refuse_before_loading(
        refused_cli,
        monkeypatch,
        "controlnet=canny_sdxl",
        f"controlnet.path={net}",
        expected="controlnet.path: " + str(net / "diffusion_pytorch_model.bin") + " is a pickle",
    )
