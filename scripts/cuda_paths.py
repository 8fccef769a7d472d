"""The memory modes and the CUDA-only recovery paths, each run once on one pipeline, with what
happened written to JSON (issue 17).

    python scripts/cuda_paths.py model=sdxl_random width=1024 height=1024 --json out.json
    uv run python scripts/cuda_paths.py model=tiny width=64 height=64 steps=2   # CPU: dry run

1. Memory modes, in this order on the same pipeline: none and balanced at batch 4, low_vram
   and minimal at batch 1 (the offload modes need CUDA). Each: a 2-step warm-up, then one
   timed batch at the config's steps: s/image, VRAM peak (allocated and reserved), the image
   checked (finite, not flat), next to memory=auto's estimate for that mode.
2. Out of memory (CUDA): the process is capped with set_per_process_memory_fraction between
   the batch-1 and batch-4 peaks of memory=none, then asked for batch 4: the generator must
   halve the batch and still deliver all four images.
3. The float32 re-decode: the VAE in float16 with force_upcast off (as with fp16-fixed VAEs),
   latents scaled so that float16 overflows inside the decoder; the generator must notice the
   NaN/Inf and decode again in float32 to a finite image.
4. The default dtype the run would use on this device (bfloat16 expected on CUDA).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = (("none", 4), ("balanced", 4), ("low_vram", 1), ("minimal", 1))
OFFLOAD = ("low_vram", "minimal")


def image_ok(image) -> bool:
    """Present, finite and not one flat colour (random weights make noise, never a flat)."""
    if image is None:
        return False
    pixels = np.asarray(image, dtype=np.float32)
    return bool(np.isfinite(pixels).all() and pixels.std() > 1.0)


def reset_memory_mode(pipe) -> None:
    """Undo the savers a previous mode switched on (offload hooks are removed by the next
    offload call itself, which moves the pipeline to the CPU first)."""
    pipe.vae.disable_slicing()
    pipe.vae.disable_tiling()
    pipe.disable_attention_slicing()


def generate_once(pipe, settings, jobs, cuda: bool) -> dict:
    from keyframes.generation.generator import KeyframeGenerator

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    generator = KeyframeGenerator(pipe, settings)
    start = time.perf_counter()
    made = [g for batch in generator.run(jobs) for g in batch]
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "images": len(made),
        "images_ok": sum(image_ok(g.image) for g in made),
        "errors": sorted({g.error for g in made if g.error}),
        "notes": sorted({n for g in made for n in g.notes}),
        "seconds_per_image": round(seconds / len(jobs), 4),
        "vram_peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3) if cuda else None,
        "vram_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 3) if cuda else None,
        "fallbacks": generator.fallbacks,
    }


def memory_modes(pipe, cfg, plan, placement, jobs_for, report: dict, names) -> None:
    from keyframes.config.schema import memory_mode
    from keyframes.pipeline.memory import apply_memory_mode, estimate_gb, weights_gb

    cuda = placement.device == "cuda"
    float32_vae = placement.dtype == torch.float16
    weights = weights_gb(cfg.model, placement.dtype)
    for mode, batch in [(m, b) for m, b in MODES if m in names]:
        entry = {"mode": mode, "batch_size": batch, "steps": cfg.steps}
        entry["estimate_gb"] = round(
            estimate_gb(mode, batch, plan.width, plan.height, weights, float32_vae), 2
        )
        if mode in OFFLOAD and not cuda:
            report["memory_modes"].append({**entry, "skipped": "needs CUDA"})
            continue
        reset_memory_mode(pipe)
        apply_memory_mode(pipe, memory_mode(mode), placement.device)
        settings = settings_for(cfg, plan, batch)
        generate_once(pipe, replace(settings, steps=2), jobs_for(batch), cuda)  # warm-up
        entry.update(generate_once(pipe, settings, jobs_for(batch), cuda))
        report["memory_modes"].append(entry)
        print(json.dumps(entry), flush=True)
        if mode == "none" and cuda:
            report["out_of_memory"] = out_of_memory(pipe, cfg, plan, jobs_for, entry)
            print(json.dumps({"out_of_memory": report["out_of_memory"]}), flush=True)


def out_of_memory(pipe, cfg, plan, jobs_for, batch4: dict) -> dict:
    """Cap the process below what batch 4 needs and above batch 1's need."""
    short = replace(settings_for(cfg, plan, 1), steps=4)
    one = generate_once(pipe, short, jobs_for(1), True)
    total = torch.cuda.get_device_properties(0).total_memory / 1e9
    cap_gb = one["vram_peak_gb"] + 0.5 * (batch4["vram_peak_gb"] - one["vram_peak_gb"])
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(cap_gb / total)
    try:
        result = generate_once(pipe, replace(short, batch_size=4), jobs_for(4), True)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    return {"cap_gb": round(cap_gb, 2), "batch1_peak_gb": one["vram_peak_gb"], **result}


def float32_redecode(pipe, placement, plan) -> dict:
    """Force a float16 VAE overflow and check the generator's float32 re-decode repairs it."""
    from keyframes.generation.generator import KeyframeGenerator

    vae = pipe.vae
    dtype, upcast = vae.dtype, vae.config.force_upcast
    vae.to(dtype=torch.float16)
    vae.register_to_config(force_upcast=False)  # as an fp16-fixed VAE says of itself
    try:
        generator = torch.Generator("cpu").manual_seed(0)
        shape = (1, 4, plan.height // 8, plan.width // 8)
        # finite in float16 (|x| < 65504), but / scaling_factor and the first conv overflow it
        latents = (torch.randn(shape, generator=generator) * 4000).to(placement.device)
        latents = latents.to(torch.float16)
        start = time.perf_counter()
        checker = KeyframeGenerator(pipe, settings_for(plan.config, plan, 1))
        pixels, bad, redecoded = checker._decode_checked(latents)  # the generator's own check
        seconds = time.perf_counter() - start
        return {
            "latents_finite": bool(torch.isfinite(latents).all()),
            "redecoded_in_float32": redecoded,
            "still_bad": bool(bad.any()),
            "pixels_finite": bool(torch.isfinite(pixels).all()),
            "vae_dtype_after": str(vae.dtype).removeprefix("torch."),
            "seconds": round(seconds, 3),
        }
    finally:
        vae.register_to_config(force_upcast=upcast)
        vae.to(dtype=dtype)


def settings_for(cfg, plan, batch: int):
    from keyframes.generation.generator import GenerationSettings

    return GenerationSettings(cfg.steps, cfg.cfg_scale, plan.width, plan.height, batch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/cuda_paths.py", description=__doc__)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for keyframes.run")
    parser.add_argument("--json", type=Path, default=ROOT / "outputs" / "cuda_paths.json")
    parser.add_argument("--modes", default=",".join(m for m, _ in MODES), help="which, in order")
    args = parser.parse_args(argv)

    from keyframes.config.compose import compose
    from keyframes.generation.preflight import package_versions
    from keyframes.generation.recipe import KeyframesRecipe
    from keyframes.pipeline.load import apply_sampler, load_pipeline, resolve_placement
    from keyframes.pipeline.speed import apply_speed
    from keyframes.shotlist.jobs import cycle_jobs

    recipe = KeyframesRecipe().setup(compose(args.overrides), announce=False)
    plan, placement = recipe.plan, recipe.placement
    cfg = plan.config
    default_dtype = resolve_placement("auto", compose([]).model.dtype).dtype
    cuda = placement.device == "cuda"
    report = {
        "device_name": torch.cuda.get_device_name() if cuda else "cpu",
        "versions": {**package_versions(), "torch CUDA build": torch.version.cuda or "none"},
        "model": cfg.model.name,
        "dtype": str(placement.dtype).removeprefix("torch."),
        "default_dtype_here": str(default_dtype).removeprefix("torch."),
        "width": plan.width,
        "height": plan.height,
        "memory_modes": [],
    }
    start = time.perf_counter()
    pipe = load_pipeline(cfg.model, placement, "none")
    apply_sampler(pipe, cfg.sampler)
    apply_speed(pipe, cfg.speed, placement.device)
    report["load_seconds"] = round(time.perf_counter() - start, 2)
    print(
        f"loaded {cfg.model.name} on {report['device_name']} in {report['load_seconds']} s",
        flush=True,
    )

    def jobs_for(count: int):
        return cycle_jobs([job for job in recipe.jobs if job.take == 1], count)

    report["float32_redecode"] = float32_redecode(pipe, placement, plan)
    print(json.dumps({"float32_redecode": report["float32_redecode"]}), flush=True)
    memory_modes(pipe, cfg, plan, placement, jobs_for, report, args.modes.split(","))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
