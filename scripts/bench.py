"""Benchmark: seconds per image, images per hour, VRAM peak and achieved TFLOP/s of
(a) a bare diffusers pipeline call and (b) keyframes' own generation path, on the same
pipeline, prompts, seeds and settings; prints `ratio: (b)/(a)` on a line of its own and
writes every figure to JSON.

    uv run python scripts/bench.py model=tiny steps=8 width=512 height=512   # CPU, ~30 s
    uv run python scripts/bench.py model=sdxl_random speed=compile --batch-sizes 1,2,4

Overrides are the main command's (model=, memory=, speed=, steps=, width=, ...). Each batch
size gets a warm-up (for speed=compile: the compile, reported as compile_seconds and never
counted per image), then --repeats rounds that time both paths over --images images, in
alternating order; the figures are medians of the rounds. Imports neither MLflow nor the
scorer: it runs where only torch, diffusers, transformers and Hydra are installed.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import statistics
import sys
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `python scripts/bench.py` from anywhere, without installing

from keyframes.errors import KeyframesError  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for keyframes.run")
    parser.add_argument("--images", type=int, default=8, help="images per timed round")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per path")
    parser.add_argument("--batch-sizes", help="e.g. 1,2,4 (default: the config's batch_size)")
    parser.add_argument("--json", type=Path, help="default: outputs/bench/bench-<time>.json")
    args = parser.parse_args(argv)
    if args.images < 1 or args.repeats < 1:
        parser.error("--images and --repeats must be at least 1")
    return args


def batch_sizes(text: str | None, default: int) -> list[int]:
    if not text:
        return [default]
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise KeyframesError(f"--batch-sizes={text}: expected positive integers, e.g. 1,2,4")
    return sizes


class Timer:
    """Wall time and VRAM peak of a block; synchronises CUDA on both ends."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start
        self.vram_gb = torch.cuda.max_memory_allocated() / 1e9 if self.cuda else None
        self.reserved_gb = torch.cuda.max_memory_reserved() / 1e9 if self.cuda else None


def bare_call(pipe, jobs, settings) -> list:
    """What a diffusers user writes: one pipeline call per batch, PIL images out."""
    size, images = settings.batch_size, []
    for start in range(0, len(jobs), size):
        batch = jobs[start : start + size]
        images += pipe(
            prompt=[j.prompt for j in batch],
            negative_prompt=[j.negative_prompt for j in batch],
            num_inference_steps=settings.steps,
            guidance_scale=settings.cfg_scale,
            width=settings.width,
            height=settings.height,
            generator=[torch.Generator("cpu").manual_seed(j.seed) for j in batch],
            output_type="pil",
        ).images
    return images


def project_path(pipe, jobs, settings) -> tuple[list, list[str], list[tuple[float, float]]]:
    """keyframes' generation path (KeyframeGenerator, as `keyframes.run` uses it); returns
    the images, the notes and errors it reported (so a benchmark on NaN-prone weights says
    so), and the base-UNet evaluations each image cost (whole, shallow branch only)."""
    from keyframes.generation.generator import KeyframeGenerator

    images, notes, evaluations = [], [], []
    for batch in KeyframeGenerator(pipe, settings).run(jobs):
        for generation in batch:
            images.append(generation.image)
            notes += generation.notes + ([generation.error] if generation.error else [])
            if generation.unet_evaluations is not None:  # None: the image failed
                shallow = generation.unet_shallow_evaluations or 0
                evaluations.append((generation.unet_evaluations, shallow))
    return images, notes, evaluations


def pixel_difference(ours: list, theirs: list) -> dict | None:
    """Mean and largest absolute difference in 8-bit RGB values between the two paths' images
    of the same jobs (a failed image leaves the comparison out)."""
    import numpy as np

    pairs = [(a, b) for a, b in zip(ours, theirs, strict=True) if a is not None]
    if not pairs:
        return None
    gaps = [np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)) for a, b in pairs]
    return {"mean": round(float(np.mean(gaps)), 3), "max": int(max(g.max() for g in gaps))}


def run_benchmark(args: argparse.Namespace) -> dict:
    from keyframes.config.compose import compose
    from keyframes.config.schema import ScorerConfig
    from keyframes.generation.feature_reuse import run_flops
    from keyframes.generation.recipe import KeyframesRecipe
    from keyframes.pipeline.flops import peak_tflops
    from keyframes.shotlist.jobs import cycle_jobs

    composed = compose(args.overrides)
    sizes = batch_sizes(args.batch_sizes, composed.batch_size)
    # as keyframes.run sets up, with memory planned for the largest batch and no scorer
    unscored = replace(composed, batch_size=max(sizes), scorer=ScorerConfig(name="none"))
    recipe = KeyframesRecipe().setup(unscored, announce=False)
    plan, placement, memory = recipe.plan, recipe.placement, recipe.memory
    cfg, width, height = plan.config, plan.width, plan.height
    first_takes = [job for job in recipe.jobs if job.take == 1]
    session = recipe.session().setup(scorer=False)
    pipe, speed = session.pipe, session.loaded.speed
    load_seconds = session.timings["model_load_seconds"]

    cuda = placement.device == "cuda"
    device_name = torch.cuda.get_device_name() if cuda else _cpu_name()
    flops, flops_source = run_flops(pipe, width, height, cfg.speed.deepcache)
    per_image_flops = flops.per_image(cfg.steps, cfg.cfg_scale)
    peak = peak_tflops(device_name) if cuda else None
    report = {
        "command": "uv run python scripts/bench.py " + " ".join(map(shlex.quote, sys.argv[1:])),
        "device": placement.device,
        "device_name": device_name,
        "dtype": str(placement.dtype).removeprefix("torch."),
        "versions": _versions(),
        "model": cfg.model.name,
        "width": width,
        "height": height,
        "steps": cfg.steps,
        "cfg_scale": cfg.cfg_scale,
        "sampler": cfg.sampler.name,
        "memory": memory.as_record(),
        "speed": {"preset": cfg.speed.name, **speed},
        "model_load_seconds": round(load_seconds, 3),
        "flops_per_image": per_image_flops,
        "unet_shallow_flops_per_sample_step": flops.unet_shallow_per_sample_step,
        "flops_source": flops_source,
        "peak_tflops": peak,
        "results": [],
    }
    print(
        f"keyframes bench: {cfg.model.name} on {device_name} ({placement.device}, "
        f"{report['dtype']}), {width}x{height}, {cfg.steps} steps, cfg {cfg.cfg_scale:g}, "
        f"memory {memory.mode} ({memory.reason}), speed {cfg.speed.name}",
        flush=True,
    )
    print(
        f"FLOPs per image: {per_image_flops / 1e12:.4g} TFLOP ({flops_source}), every step guided",
        flush=True,
    )
    for size in sizes:
        settings = replace(session.settings, batch_size=size)  # what keyframes.run would use
        count = math.ceil(args.images / size) * size  # whole batches: one shape for compile
        jobs = cycle_jobs(first_takes, count)
        with Timer(cuda) as warm:
            bare_call(pipe, jobs[:size], settings)
            project_path(pipe, jobs[:size], settings)
        print(f"batch {size}: warm-up {warm.seconds:.1f} s", flush=True)
        timings = {"bare": [], "keyframes": []}
        vram = {"bare": [], "keyframes": []}
        notes, evaluations, pictures = [], [], {}
        for round_ in range(args.repeats):
            order = ("bare", "keyframes") if round_ % 2 == 0 else ("keyframes", "bare")
            for path in order:
                with Timer(cuda) as t:
                    if path == "bare":
                        pictures[path] = bare_call(pipe, jobs, settings)
                    else:
                        pictures[path], more_notes, more_evaluations = project_path(
                            pipe, jobs, settings
                        )
                        notes, evaluations = notes + more_notes, evaluations + more_evaluations
                timings[path].append(t.seconds / count)
                vram[path].append(t.vram_gb)
        result = {"batch_size": size, "images": count, "repeats": args.repeats}
        result["compile_seconds" if cfg.speed.compile else "warmup_seconds"] = round(
            warm.seconds, 3
        )
        # the bare call guides every step; the keyframes path spends what it evaluated
        unet_evaluations = statistics.mean(e for e, _ in evaluations) if evaluations else None
        shallow = statistics.mean(s for _, s in evaluations) if evaluations else 0
        spent = {
            "bare": per_image_flops,
            "keyframes": flops.spent(unet_evaluations, cfg.cfg_scale, shallow)
            if evaluations
            else per_image_flops,
        }
        result["unet_evaluations_per_image"] = unet_evaluations and round(unet_evaluations, 3)
        result["unet_shallow_evaluations_per_image"] = round(shallow, 3)
        # 0 where keyframes reproduces the bare call; a guidance interval or feature reuse
        # changes the picture, and this says by how much (on random weights: not quality)
        result["pixel_difference"] = pixel_difference(pictures["keyframes"], pictures["bare"])
        for path in ("bare", "keyframes"):
            seconds = statistics.median(timings[path])
            tflops = spent[path] / seconds / 1e12
            result[path] = {
                "flops_per_image": spent[path],
                "seconds_per_image": round(seconds, 6),
                "seconds_per_image_rounds": [round(s, 6) for s in timings[path]],
                "images_per_hour": round(3600 / seconds, 1),
                "vram_peak_gb": round(max(vram[path]), 3) if cuda else None,
                "tflops_per_second": float(f"{tflops:.6g}"),
                "share_of_peak": round(tflops / peak, 4) if peak else None,
            }
            print("  " + _row(path, result[path], peak), flush=True)
        result["ratio"] = round(
            result["keyframes"]["seconds_per_image"] / result["bare"]["seconds_per_image"], 4
        )
        result["notes"] = sorted(set(notes))
        if notes:
            print(f"  note: the keyframes path reported {sorted(set(notes))}", flush=True)
        print(
            f"UNet evaluations per image (keyframes path): {unet_evaluations} whole, "
            f"{shallow:g} shallow branch only",
            flush=True,
        )
        print(f"pixels, keyframes path vs bare call: {result['pixel_difference']}", flush=True)
        print(f"ratio: {result['ratio']:.2f}", flush=True)
        report["results"].append(result)
    return report


def _row(path: str, figures: dict, peak: float | None) -> str:
    name = "bare diffusers call" if path == "bare" else "keyframes path"
    vram = figures["vram_peak_gb"]
    share = f" ({figures['share_of_peak']:.0%} of {peak:g})" if peak else ""
    return (
        f"{name:<20} {figures['seconds_per_image']:8.4f} s/image "
        f"{figures['images_per_hour']:10.1f} images/h   "
        f"VRAM peak {f'{vram:.2f} GB' if vram is not None else 'n/a (no CUDA)'}   "
        f"{figures['tflops_per_second']:.4g} TFLOP/s{share}"
    )


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def _versions() -> dict[str, str]:
    from keyframes.generation.preflight import package_versions

    return {**package_versions(), "torch CUDA build": torch.version.cuda or "none"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from hydra.errors import HydraException

    try:
        report = run_benchmark(args)
    except KeyframesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except HydraException as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = args.json or ROOT / "outputs" / "bench" / f"bench-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
