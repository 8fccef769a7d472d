"""A run's summary figures, from its image records: what MLflow shows and sweeps compare."""

from __future__ import annotations

from keyframes.outputs.records import ImageRecord


def summarize(images: list[ImageRecord], model_load_seconds: float, total: float):
    ok = [r for r in images if r.ok]

    def mean(key: str) -> float | None:
        values = [getattr(r, key) for r in ok if getattr(r, key) is not None]
        return sum(values) / len(values) if values else None

    vram = [r.vram_peak_gb for r in ok if r.vram_peak_gb is not None]
    clip, seconds = mean("clip_score"), mean("seconds")
    summary = {
        "images": len(ok),
        "images_failed": len(images) - len(ok),
        "clip_score_mean": clip,
        # what a sweep trades off: prompt adherence per second of generation
        "clip_score_per_second": clip / seconds if clip is not None and seconds else None,
        "clip_score_prompt_mean": mean("clip_score_prompt"),
        "aesthetic_score_mean": mean("aesthetic_score"),
        "seconds_per_image_mean": seconds,
        "vram_peak_gb_max": max(vram) if vram else None,  # absent on CPU, never 0
        "rss_peak_gb": max((r.rss_peak_gb for r in images), default=None),
        "vae_fp32_redecodes": sum("vae_fp32_redecode" in r.notes for r in images),
        # "_total": the per-image MLflow metrics carry the plain names
        "unet_evaluations_total": sum(r.unet_evaluations or 0 for r in images) or None,
        "unet_evaluations_per_image_mean": mean("unet_evaluations"),
        "unet_shallow_evaluations_total": sum(r.unet_shallow_evaluations or 0 for r in images)
        or None,
        "unet_shallow_evaluations_per_image_mean": mean("unet_shallow_evaluations"),
        "tflops_total": sum(r.tflops or 0 for r in images) or None,
        "tflops_per_image_mean": mean("tflops"),
        "model_load_seconds": model_load_seconds,
        "total_seconds": total,
    }
    return {k: round(v, 4) for k, v in summary.items() if v is not None}
