"""The tiny models are folders, written once per machine and loaded by the normal path: no
test switch in the loader, the methods or the run."""

import json
import re
from pathlib import Path

import torch

from keyframes.pipeline.tiny_models import (
    STAMP,
    provide_tiny_models,
    tiny_model_path,
    tiny_models_root,
)
from tests.helpers import assert_same_picture, image, pixel_gap, settings

PACKAGE = Path(__file__).resolve().parent.parent / "keyframes"


def test_a_named_tiny_model_is_written_once_and_again_only_when_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("KEYFRAMES_TINY_MODELS", str(tmp_path / "tiny"))
    folder = tiny_model_path("sdxl")
    assert folder == tmp_path / "tiny" / "sdxl" and tiny_models_root() == tmp_path / "tiny"
    provide_tiny_models([None, "/elsewhere/sdxl", str(tmp_path / "other" / "sdxl")])
    assert not (tmp_path / "tiny").exists()  # only folders under the tiny root are written

    provide_tiny_models([str(folder)])
    assert (folder / "model_index.json").is_file() and (folder / "unet").is_dir()
    assert [p.name for p in (tmp_path / "tiny").iterdir() if not p.name.startswith(".")] == [
        "sdxl"
    ]  # what was named, and no temporary folder left
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    written = weights.stat().st_mtime_ns
    provide_tiny_models([str(folder)])
    assert weights.stat().st_mtime_ns == written  # once per machine

    stamp = json.loads((folder / STAMP).read_text())
    (folder / STAMP).write_text(json.dumps({**stamp, "digest": "built-by-older-code"}))
    provide_tiny_models([str(folder)])
    assert json.loads((folder / STAMP).read_text())["digest"] == stamp["digest"]


def test_the_tiny_folder_gives_the_builders_pixels():
    """Loaded from its folder by the normal path, the tiny model is the one the builder makes:
    the same weights and configs, so the same picture up to CPU float noise (the loaded
    tensors sit elsewhere in memory, and kernels may differ by a level). A real difference,
    one of the UNet's 1.7 million weights changed, is far outside that."""
    from dataclasses import replace

    from keyframes.config.plan import make_plan
    from keyframes.pipeline.load import load_pipeline, pool_at_end_token, resolve_placement
    from keyframes.pipeline.tiny import build_tiny_pipeline
    from keyframes.shotlist.jobs import JobSettings, plan_for
    from keyframes.shotlist.load import load_shotlist

    cfg = settings("experiment=smoke")
    provide_tiny_models([cfg.model.path])
    loaded = load_pipeline(make_plan(cfg).config.model, resolve_placement("cpu", "float32"))
    built = build_tiny_pipeline()
    pool_at_end_token(built)  # as the loader does to every SDXL pipeline
    built.scheduler = type(loaded.scheduler).from_config(loaded.scheduler.config)
    job = plan_for(load_shotlist("demo"), JobSettings())[0]
    job = replace(job, seed=7)
    weights = {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert all(
        torch.equal(value, getattr(built, part).state_dict()[key])
        for part in weights
        for key, value in getattr(loaded, part).state_dict().items()
    )
    assert_same_picture(image(loaded, job), image(built, job), "folder vs builder")
    with torch.no_grad():
        built.unet.conv_in.weight[0, 0, 0, 0] += 1.0
    assert pixel_gap(image(loaded, job), image(built, job)).mean > 1


def test_no_test_switch_is_left_in_the_loader_the_methods_or_the_run():
    """`grep -rn "\\.tiny\\b" keyframes/generation keyframes/conditioning keyframes/pipeline/
    load.py` finds nothing: the tiny models take the path every local folder takes."""
    files = [
        *(PACKAGE / "generation").glob("*.py"),
        *(PACKAGE / "conditioning").glob("*.py"),
        PACKAGE / "pipeline" / "load.py",
    ]
    found = [
        f"{path.name}:{number}"
        for path in files
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\.tiny\b", line)
    ]
    assert found == []
