from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keyframes.config.schema import ModelConfig


def tiny_path(name: str = "sdxl") -> str:
    """A tiny model's folder (keyframes.pipeline.tiny_models), written if it is not yet."""
    from keyframes.pipeline.tiny_models import provide_tiny_models, tiny_model_path

    path = str(tiny_model_path(name))
    provide_tiny_models([path])
    return path


def tiny_model_config(**overrides) -> ModelConfig:
    """model=tiny as Python settings (model.family=sd15: model=tiny_sd15)."""
    folder = "sd15" if overrides.get("family") == "sd15" else "sdxl"
    return ModelConfig(**{"name": "tiny", "path": tiny_path(folder), **overrides})


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def default_speed():
    """speed=sdpa, the default, as conf/speed/sdpa.yaml sets it (the values live there)."""
    from omegaconf import OmegaConf

    from keyframes.config.schema import CONF_DIR, SpeedConfig

    return SpeedConfig(**OmegaConf.to_container(OmegaConf.load(CONF_DIR / "speed" / "sdpa.yaml")))


def euler_tiny_pipe():
    """A fresh tiny pipeline on the CPU with the plain Euler sampler: for tests that change
    the pipeline (adapters, processors) and must not share one."""
    from keyframes.config.schema import SamplerConfig
    from keyframes.pipeline.load import apply_sampler, load_pipeline, resolve_placement

    pipe = load_pipeline(tiny_model_config(), resolve_placement("cpu", "float32"))
    apply_sampler(
        pipe, SamplerConfig(name="euler", label="Euler", scheduler="EulerDiscreteScheduler")
    )
    return pipe


def demo_jobs(count: int, run_seed: int = 7):
    """The first `count` image jobs of the demo shotlist, with the bare style."""
    from keyframes.shotlist.jobs import plan_jobs
    from keyframes.shotlist.load import load_shotlist

    return plan_jobs(load_shotlist("demo"), "{prompt}", "", "", run_seed, "derived", 1)[:count]


# Float results on a CPU depend on the instruction set, the kernel chosen for a tensor's layout
# and the thread count. So pixels are asserted equal to the bit only for the same computation
# repeated in the same process. Two computations that should make the same picture (another
# batch size, a reloaded copy of the model, a pipeline that shares nothing with this one) are
# compared within FLOAT_NOISE, which tests/test_models.py shows to be far below a real bug:
# a wrong seed, one step fewer or cfg 5 -> 5.5 each miss it by orders of magnitude.
@dataclass(frozen=True)
class PixelGap:
    max_levels: int  # largest difference of one value, in levels of 255
    share: float  # share of values that differ at all
    mean: float  # mean absolute difference, in levels

    def within(self, limit: PixelGap) -> bool:
        return (
            self.max_levels <= limit.max_levels
            and self.share <= limit.share
            and self.mean <= limit.mean
        )


FLOAT_NOISE = PixelGap(max_levels=2, share=0.002, mean=0.004)


def pixel_gap(a, b) -> PixelGap:
    a, b = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = np.abs(a - b)
    return PixelGap(int(diff.max()), float((diff > 0).mean()), float(diff.mean()))


def assert_same_picture(a, b, what: str = "") -> None:
    """The same picture up to CPU float noise (see FLOAT_NOISE)."""
    gap = pixel_gap(a, b)
    assert gap.within(FLOAT_NOISE), f"{what}: {gap} exceeds {FLOAT_NOISE}"


def check_settings(cfg, controlled: bool = False):
    """What a run checks before anything loads: the plan (values, sizes, paths), then every
    conditioning method's checks on the jobs of the config's shotlist (controlled: each with a
    canny control). Returns (width, height)."""
    from dataclasses import replace

    from keyframes.conditioning.base import methods_for, prepare_all
    from keyframes.config.plan import make_plan
    from keyframes.generation.recipe import KeyframesRecipe
    from keyframes.shotlist.jobs import plan_for
    from keyframes.shotlist.load import load_shotlist

    recipe = KeyframesRecipe()
    recipe.plan = make_plan(cfg)
    shotlist = load_shotlist(cfg.shotlist, True)
    jobs = plan_for(shotlist, recipe.job_settings)
    if controlled:
        jobs = [replace(job, control=("canny", "edges.png")) for job in jobs]
    prepare_all(methods_for(recipe.method_settings, recipe.method_context), jobs, shotlist)
    return recipe.plan.width, recipe.plan.height


def image_record(**fields):
    """A complete ImageRecord with plain values; `fields` replace them."""
    from keyframes.outputs.records import ImageRecord

    values = {
        "index": 0,
        "scene_id": "a",
        "scene_index": 1,
        "take": 1,
        "file": "keyframes/001_a_t1.png",
        "status": "ok",
        "seed": 123,
        "prompt": "film still, a harbor",
        "negative_prompt": "blurry, text",
        "prompt_tokens": 7,
        "negative_prompt_tokens": 5,
        "description": "a harbor",
        "scene_prompt": "a harbor",
        "steps": 30,
        "cfg_scale": 7.0,
        "sampler": "dpmpp_2m_karras",
        "sampler_label": "DPM++ 2M Karras",
        "width": 1344,
        "height": 768,
        "model": "sdxl_base",
        "style": "cinematic",
        "negative": "default",
        "seconds": 1.0,
        "vram_peak_gb": None,
        "rss_peak_gb": 1.0,
        "clip_score": None,
        "clip_score_prompt": None,
        "clip_truncated": None,
    }
    return ImageRecord.from_json(values | fields)


def run_record(**fields):
    """A complete RunInfo with plain values; `fields` replace them."""
    from keyframes.outputs.records import RunInfo

    values = {
        "title": "T",
        "shotlist": "shotlist.json",
        "shotlist_sha256": "0" * 64,
        "shotlist_extra": {},
        "characters": {},
        "config_hash": "0" * 16,
        "model": "tiny",
        "model_source": "built in memory",
        "style": "cinematic",
        "style_template": "{prompt}",
        "negative": "default",
        "sampler": "euler",
        "quality": "draft",
        "scorer": None,
        "device": "cpu",
        "dtype": "float32",
        "versions": {},
        "overrides": [],
        "command": "uv run python -m keyframes.run",
        "started_at": "2026-11-25T00:00:00+00:00",
        "status": "running",
    }
    return RunInfo.from_json(values | fields)


# Shared by several test modules (moved here from the module that first needed each)
CONF = Path(__file__).resolve().parent.parent / "conf"
SMALL = ("width=64", "height=64")  # faults do not depend on the size; small images are quick
LONG = ", ".join(f"detail number {n} of the old lighthouse keeper's coat" for n in range(20))
DEMO_FILES = [
    "001_opening_t1.png",
    "002_lamp-room_t1.png",
    "003_the-boat_t1.png",
    "004_signal_t1.png",
    "005_rescue_t1.png",
    "006_kitchen_t1.png",
    "007_morning-after_t1.png",
]


def settings(*overrides: str):
    """The typed settings these overrides compose to, as the command would get them."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return OmegaConf.to_object(cfg)


def store_runs(store: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def mlflow_runs(store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiments = client.search_experiments()
    return client, client.search_runs([e.experiment_id for e in experiments])


@functools.cache
def _smoke_model():
    """experiment=smoke's model settings as the run resolves them, its folder written as the
    run's setup would (composed once per process: tiny_pipe is called by many tests)."""
    from keyframes.config.plan import make_plan

    tiny_path()
    return make_plan(settings("experiment=smoke")).config.model


def tiny_pipe():
    """The process's cached tiny pipeline, as an in-process smoke run with the fault tests'
    settings gets it (speed.warm_up=false)."""
    from dataclasses import replace

    from keyframes.pipeline.load import cached_pipeline, resolve_placement

    return cached_pipeline(
        _smoke_model(),
        resolve_placement("cpu", "auto"),
        "none",
        replace(default_speed(), warm_up=False),  # as FAULTS asks: the same cached pipeline
    )[0].pipe


def image(pipe, job):
    """One keyframe of `job`: 2 steps, cfg 5, 64 px, as int16 pixels."""
    from keyframes.generation.generator import GenerationSettings, KeyframeGenerator

    settings = GenerationSettings(2, 5.0, 64, 64, 1)
    return np.asarray(next(KeyframeGenerator(pipe, settings).run([job]))[0].image, dtype=np.int16)


def with_loras(pipe, job, loras, fuse=False):
    from keyframes.conditioning.loras import apply_loras, remove_loras

    merged = apply_loras(pipe, loras, fuse)
    try:
        return image(pipe, job)
    finally:
        remove_loras(pipe, fuse, merged)


def load_pixels(path):
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def square(path, box):
    """A 64 px black image with a white rectangle: a control image with edges."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64))
    ImageDraw.Draw(image).rectangle(box, fill=(255, 255, 255))
    image.save(path)
    return path


def tiny_control(scale):
    from keyframes.config.schema import ControlNetConfig

    return ControlNetConfig(
        name="tiny",
        type="canny",
        family="sdxl",
        path=tiny_path("controlnet-sdxl"),
        conditioning_scale=scale,
        canny_low=100,
        canny_high=200,
    )


KILLER = Path(__file__).resolve().parent / "kill_during.py"


def killed_run(tmp_path: Path, stage: str, *overrides: str) -> tuple[Path, Path]:
    """`python tests/kill_during.py STAGE experiment=smoke SMALL OVERRIDES` into tmp_path/run,
    checked to have died by SIGKILL. Returns (run dir, store)."""
    run_dir, store = tmp_path / "run", tmp_path / "mlflow.db"
    proc = subprocess.run(
        [
            sys.executable,
            str(KILLER),
            stage,
            "experiment=smoke",
            *SMALL,
            *overrides,
            f"hydra.run.dir={run_dir}",
            f"mlflow.tracking_uri=sqlite:///{store}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    return run_dir, store


@contextlib.contextmanager
def mlflow_server(store_uri: str, folder: Path):
    """`mlflow server` on this store, on 127.0.0.1 at a free port, serving artifacts from
    folder/mlartifacts; yields its address once /health answers, stops it after."""
    from keyframes.errors import KeyframesError
    from keyframes.review import free_port, wait_until_up

    port = free_port("127.0.0.1")
    log = open(folder / "server.log", "w")
    mlflow = Path(sys.executable).parent / "mlflow"
    command = [str(mlflow), "server", "--backend-store-uri", store_uri, "--host", "127.0.0.1"]
    proc = subprocess.Popen(
        [*command, "--port", str(port), "--workers", "1"],
        cwd=folder,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_up(base, proc, timeout=180)
        except KeyframesError as e:
            raise AssertionError(f"{e}\n{open(log.name).read()[-2000:]}") from None
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
