"""Run image jobs through the pipeline in batches; time and measure each batch; survive the
failures a long unattended run meets.

- Each image gets its own CPU generator, so it does not depend on its batch or device.
- The pipeline stops at latents and the VAE decode happens here, the same way the pipeline
  does it, so that NaN/Inf (the fp16 SDXL VAE overflow behind black images) can be caught and
  the batch decoded again in float32.
- Out of memory: halve the batch, then VAE tiling, then model CPU offload, before giving up.
- Any other error fails that batch's images only; the run goes on.

Imports neither Hydra nor MLflow: this is the core a benchmark can run on a bare machine.
"""

from __future__ import annotations

import gc
import logging
import resource
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from keyframes.conditioning.base import BatchHook
from keyframes.generation.feature_reuse import feature_reuse
from keyframes.generation.unet_calls import unet_calls
from keyframes.pipeline.long_prompts import text_inputs
from keyframes.pipeline.noise import seeded_generators
from keyframes.shotlist.jobs import ImageJob

log = logging.getLogger("keyframes")
BAD_IMAGE = "NaN/Inf in the latents or the decoded image, also after a float32 decode"


@dataclass(frozen=True)
class GenerationSettings:
    steps: int
    cfg_scale: float
    width: int
    height: int
    batch_size: int
    fixed_batch: bool = False  # pad a short last batch: a compiled model sees one shape only
    long_prompts: str = "chunk"  # chunk: encode past 77 tokens in 75-token chunks | truncate
    prompt_weighting: str = "none"  # a1111: (words:1.3) and the rest weigh the embeddings
    guidance_interval: tuple[float, float] | None = None  # guided steps, fractions [start, end)
    deepcache: tuple[int, int] | None = None  # (interval, branch): UNet feature reuse
    guidance_rescale: float = 0.0  # rescaled classifier-free guidance (zero-SNR models: 0.7)


@dataclass
class Generation:
    job: ImageJob
    image: Image.Image | None  # None when the image failed
    seconds: float  # batch wall time / images in the batch
    vram_peak_gb: float | None  # None where there is no CUDA device, never 0
    rss_peak_gb: float  # peak resident memory of this process so far
    error: str | None = None
    notes: list[str] = field(default_factory=list)  # e.g. "vae_fp32_redecode"
    unet_evaluations: float | None = None  # the base UNet's, one per sample; batch share
    unet_shallow_evaluations: float | None = None  # DeepCache: shallow branch only; likewise
    tflops: float | None = None  # the work spent, from the evaluations (Session sets it)


def batches(jobs: list[ImageJob], size: int, key=lambda job: None) -> Iterator[list[ImageJob]]:
    """Consecutive jobs, `size` at a time; a batch holds only jobs with the same key (the
    conditioning hooks' split keys: e.g. with a ControlNet control or without)."""
    batch: list[ImageJob] = []
    for job in jobs:
        if batch and (len(batch) == size or key(job) != key(batch[0])):
            yield batch
            batch = []
        batch.append(job)
    if batch:
        yield batch


class KeyframeGenerator:
    """Generates jobs batch by batch; `fallbacks` lists every out-of-memory step taken.
    With a shard (i, n), only batches i, i + n, ... of the ones a single process would make.

    With a `reference` job, every pipeline call starts with it (shared attention reads it
    from the first row); it is generated again in each batch, the same way from its seed, and
    reported once, in the first batch, if it is among the jobs. `hooks` are the conditioning
    methods' BatchHooks: they split batches, choose the pipeline and add to its arguments,
    and finish latents or run a second pass."""

    def __init__(
        self,
        pipe,
        settings: GenerationSettings,
        reference: ImageJob | None = None,
        hooks: tuple[BatchHook, ...] | list[BatchHook] = (),
        shard: tuple[int, int] = (0, 1),  # (process, processes): make every n-th batch only
    ):
        self.pipe = pipe
        self.hooks = list(hooks)
        self.settings = settings
        self.batch_size = settings.batch_size
        self.fallbacks: list[dict] = []
        self.cuda = pipe.device.type == "cuda"
        self.reference = reference
        self.whole_groups = any(hook.whole_groups for hook in self.hooks)
        self._report_reference = False
        self.shard = shard

    def run(self, jobs: list[ImageJob]) -> Iterator[list[Generation]]:
        """Yield one list of Generations per batch, as soon as the batch is done."""
        if self.reference is not None:
            others = [job for job in jobs if job.index != self.reference.index]
            if not others:  # the reference alone, or nothing: ordinary batches
                self.reference = None
            else:
                self._report_reference = len(others) < len(jobs)
                jobs = others
        size = max(len(jobs), 1) if self.whole_groups else self.batch_size
        queue = deque(batches(jobs, size, self._split_key))
        index, count = self.shard
        if count > 1:  # the batches a single process would make, dealt out in turn
            queue = deque(batch for k, batch in enumerate(queue) if k % count == index)
            self._report_reference &= index == 0  # it rides in batch 0
        while queue:
            batch = queue.popleft()
            try:
                yield self._generate(batch)
            except torch.OutOfMemoryError as e:
                _free_memory(self.pipe.device.type)
                if len(batch) > 1 and not self.whole_groups:
                    # Halve this batch and every later one: the size that failed will fail again.
                    self.batch_size = len(batch) // 2
                    rest = batch + [job for queued in queue for job in queued]
                    queue = deque(batches(rest, self.batch_size, self._split_key))
                    self._note(
                        "halve_batch", batch, f"batch size {len(batch)} -> {self.batch_size}"
                    )
                elif self._next_memory_saver(batch):
                    queue.appendleft(batch)
                else:
                    yield self._failed(
                        batch, f"out of memory at batch size 1 with every saver on: {e}"
                    )
            except Exception as e:  # noqa: BLE001 - one bad batch must not end a long run
                log.exception("batch of %s failed", ", ".join(j.file for j in batch))
                yield self._failed(batch, f"{type(e).__name__}: {e}")

    def _split_key(self, job: ImageJob) -> tuple:
        return tuple(hook.split_key(job) for hook in self.hooks)

    def _next_memory_saver(self, batch: list[ImageJob]) -> bool:
        """Switch on the next memory saver; False when none is left."""
        pipe = self.pipe
        if not getattr(pipe.vae, "use_tiling", False):
            pipe.vae.enable_tiling()  # decode in overlapping tiles: less memory, same look
            self._note("vae_tiling", batch, "VAE tiling on")
            return True
        if self.cuda and not any(f["action"] == "model_cpu_offload" for f in self.fallbacks):
            pipe.enable_model_cpu_offload()
            self._note("model_cpu_offload", batch, "model CPU offload on")
            return True
        return False

    def _note(self, action: str, batch: list[ImageJob], detail: str) -> None:
        log.warning("out of memory at %s: %s", batch[0].file, detail)
        self.fallbacks.append({"action": action, "at_image": batch[0].index, "detail": detail})

    def _failed(self, batch: list[ImageJob], error: str) -> list[Generation]:
        return [Generation(job, None, 0.0, None, peak_rss_gb(), error=error) for job in batch]

    def _generate(self, batch: list[ImageJob]) -> list[Generation]:
        if self.reference is None:
            return self._generate_rows(batch, self.batch_size)
        out = self._generate_rows([self.reference, *batch], self.batch_size + 1)
        if self._report_reference:
            self._report_reference = False
            return out
        # the reference's second making is a cost of the images it served
        share = len(out) / (len(out) - 1)
        return [
            replace(
                g,
                seconds=g.seconds * share,
                unet_evaluations=g.unet_evaluations * share,
                unet_shallow_evaluations=_times(g.unet_shallow_evaluations, share),
            )
            for g in out[1:]
        ]

    def _generate_rows(self, batch: list[ImageJob], rows: int) -> list[Generation]:
        size = len(batch)
        if self.settings.fixed_batch and size < rows:
            batch = batch + [batch[-1]] * (rows - size)  # dropped again below
        seeds = [job.seed for job in batch]
        generators = seeded_generators(seeds)
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        conditioning, inputs = self._inputs(batch, seeds)
        pipe, arguments = self.pipe, {}
        for hook in self.hooks:  # conditioning: the second passes reuse it; arguments: not
            pipe = hook.call(pipe, batch, conditioning, arguments)
        guided = self.settings.cfg_scale > 1  # as the pipelines decide classifier-free guidance
        interval = self.settings.guidance_interval if guided else None
        unet, steps, deepcache = self.pipe.unet, self.settings.steps, self.settings.deepcache
        # feature reuse innermost: it sees the rows the guidance interval leaves
        with (
            feature_reuse(unet, steps, *(deepcache or (1, 0))) as reused,
            unet_calls(unet, steps, interval) as calls,
        ):
            pixels, bad, redecoded = self._denoise_and_decode(
                pipe, batch, conditioning, arguments, generators, inputs
            )
        batch, images, bad = batch[:size], to_pil(self.pipe, pixels[:size]), bad[:size]
        if self.cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / size
        vram = torch.cuda.max_memory_allocated() / 1e9 if self.cuda else None
        rss = peak_rss_gb()
        notes = ["vae_fp32_redecode"] if redecoded else []
        evaluations = (calls.samples - reused.shallow_samples) / size
        shallow = reused.shallow_samples / size if deepcache else None
        return [
            Generation(
                job,
                None if is_bad else image,
                seconds,
                vram,
                rss,
                error=BAD_IMAGE if is_bad else None,
                notes=list(notes),
                unet_evaluations=evaluations,
                unet_shallow_evaluations=shallow,
            )
            for job, image, is_bad in zip(batch, images, bad.tolist(), strict=True)
        ]

    def _inputs(self, batch: list[ImageJob], seeds: list[int]) -> tuple[dict, dict]:
        """(the prompts' conditioning for the pipeline, what the hooks' passes get: the
        conditioning, prompts, negatives, seeds, steps and cfg)."""
        prompts = [job.prompt for job in batch]
        negatives = [job.negative_prompt for job in batch]
        settings = self.settings
        conditioning = text_inputs(
            self.pipe, prompts, negatives, settings.long_prompts, settings.prompt_weighting
        )
        inputs = {
            "conditioning": conditioning,
            "prompts": prompts,
            "negatives": negatives,
            "seeds": seeds,
            "steps": settings.steps,
            "cfg_scale": settings.cfg_scale,
        }
        return conditioning, inputs

    def _denoise_and_decode(self, pipe, batch, conditioning, arguments, generators, inputs):
        """The pipeline to latents, the hooks' finishing and second passes, each decode
        checked: (pixels, per-image NaN/Inf flags, decoded again in float32?)"""
        if self.settings.guidance_rescale:
            arguments = {**arguments, "guidance_rescale": self.settings.guidance_rescale}
        latents = pipe(
            **conditioning,
            **arguments,
            num_inference_steps=self.settings.steps,
            guidance_scale=self.settings.cfg_scale,
            width=self.settings.width,
            height=self.settings.height,
            generator=generators,
            output_type="latent",
        ).images
        for hook in self.hooks:
            latents = hook.after_latents(latents, batch, inputs)
        pixels, bad, redecoded = self._decode_checked(latents)
        for hook in self.hooks:
            if bad.all():
                break
            latents = hook.second_pass(pixels, batch, inputs)
            if latents is not None:
                pixels, bad_again, redecoded_again = self._decode_checked(latents)
                bad, redecoded = bad | bad_again, redecoded or redecoded_again
        return pixels, bad, redecoded

    def _decode_checked(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(pixels, per-image NaN/Inf flags, decoded again in float32?)"""
        pixels = decode(self.pipe, latents)
        bad = ~(_finite(latents) & _finite(pixels))
        redecoded = bool(bad.any())
        if redecoded:
            log.warning(
                "NaN/Inf in %d image(s); decoding the batch again in float32", int(bad.sum())
            )
            pixels = decode(self.pipe, latents, float32=True)
            bad = ~(_finite(latents) & _finite(pixels))
        return pixels, bad, redecoded


def decode(pipe, latents: torch.Tensor, float32: bool = False) -> torch.Tensor:
    """Latents -> images in [-1, 1], as the SDXL and SD 1.5 pipelines decode them (float32 VAE
    where the config asks for it, or where float32=True)."""
    vae = pipe.vae
    dtype = vae.dtype
    upcast = float32 or (dtype == torch.float16 and vae.config.force_upcast)
    if upcast and dtype != torch.float32:
        vae.to(dtype=torch.float32)
    latents = latents.to(vae.dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor
    with torch.no_grad():
        image = vae.decode(latents.to(_execution_device(vae)), return_dict=False)[0]
    if vae.dtype != dtype:
        vae.to(dtype=dtype)
    return image


def to_pil(pipe, pixels: torch.Tensor) -> list[Image.Image]:
    if getattr(pipe, "watermark", None) is not None:
        pixels = pipe.watermark.apply_watermark(pixels)
    return pipe.image_processor.postprocess(torch.nan_to_num(pixels), output_type="pil")


def _times(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(x).flatten(1).all(dim=1).cpu()


def _execution_device(module: torch.nn.Module) -> torch.device:
    """Where the module runs, also under CPU offload hooks: model offload hooks the module
    itself and keeps its weights on the CPU; sequential offload hooks its layers and leaves
    the weights on `meta` (found on an H200: memory=minimal sent the latents there)."""
    for part in module.modules():
        hook = getattr(part, "_hf_hook", None)
        if hook is not None and getattr(hook, "execution_device", None) is not None:
            return torch.device(hook.execution_device)
    return next(module.parameters()).device


def _free_memory(device: str) -> None:
    """Give the failed batch's accelerator memory back before the next try. On the CPU there
    is nothing to do: its tensors were freed when their last reference went."""
    if device == "cpu":
        return
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_rss_gb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9


def generate(
    pipe, jobs: list[ImageJob], settings: GenerationSettings
) -> Iterator[list[Generation]]:
    """Shorthand for KeyframeGenerator(pipe, settings).run(jobs)."""
    return KeyframeGenerator(pipe, settings).run(jobs)
