from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keyframes.config.schema import ModelConfig


def tiny_model_config(**overrides) -> ModelConfig:
    return ModelConfig(name="tiny", tiny=True, **overrides)


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def default_speed():
    from keyframes.config.schema import SpeedConfig

    return SpeedConfig(name="sdpa")


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
    from keyframes.shotlist.jobs import plan_for
    from keyframes.shotlist.load import load_shotlist

    plan = make_plan(cfg)
    shotlist = load_shotlist(plan.config.shotlist, True)
    jobs = plan_for(plan.config, shotlist)
    if controlled:
        jobs = [replace(job, control=("canny", "edges.png")) for job in jobs]
    prepare_all(methods_for(plan), jobs, shotlist)
    return plan.width, plan.height
