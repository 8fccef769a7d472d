from __future__ import annotations

import json
from pathlib import Path

from keyframes.config import ModelConfig


def tiny_model_config(**overrides) -> ModelConfig:
    return ModelConfig(name="tiny", tiny=True, **overrides)


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def default_speed():
    from keyframes.config import SpeedConfig

    return SpeedConfig(name="sdpa")


def euler_tiny_pipe():
    """A fresh tiny pipeline on the CPU with the plain Euler sampler: for tests that change
    the pipeline (adapters, processors) and must not share one."""
    from keyframes.config import SamplerConfig
    from keyframes.models import apply_sampler, load_pipeline, resolve_placement

    pipe = load_pipeline(tiny_model_config(), resolve_placement("cpu", "float32"))
    apply_sampler(
        pipe, SamplerConfig(name="euler", label="Euler", scheduler="EulerDiscreteScheduler")
    )
    return pipe


def demo_jobs(count: int, run_seed: int = 7):
    """The first `count` image jobs of the demo shotlist, with the bare style."""
    from keyframes.plan import plan_jobs
    from keyframes.shotlist import load_shotlist

    return plan_jobs(load_shotlist("demo"), "{prompt}", "", "", run_seed, "derived", 1)[:count]
