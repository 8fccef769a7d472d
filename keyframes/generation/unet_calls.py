"""Around the UNet's forward for one batch: count the samples it evaluates, and apply
classifier-free guidance only in an interval of the schedule.

Guidance in a limited interval (Kynkäänniemi et al., NeurIPS 2024): outside the interval a
step needs only the conditional prediction. The pipelines stack [unconditional, conditional]
rows into one UNet call; on a step outside the interval the wrapper runs the conditional half
alone and hands back that prediction for both halves, so the pipeline's guidance arithmetic
(uncond + scale * (cond - uncond)) gives exactly the conditional prediction. Every pipeline
(text-to-image, img2img second passes, ControlNet, IP-Adapter) keeps its own code: batch
tensors among the arguments (ControlNet residuals, IP-Adapter image embeddings, SDXL's added
conditioning) are cut to the same half.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class UnetCalls:
    samples: int = 0  # UNet evaluations, one per sample (a guided row counts twice)
    calls: int = 0


def guided_step(step: int, steps: int, interval: tuple[float, float] | None) -> bool:
    """Is step (0-based) of `steps` inside the guidance interval, given as fractions of the
    schedule [start, end)? None: every step is guided."""
    if interval is None:
        return True
    start, end = interval
    return start <= step / steps < end


@contextmanager
def wrapped_forward(unet, wrap):
    """unet.forward = wrap(its current forward) while active, then as it was: an offload
    hook's own wrapper (an instance attribute) is put back, a class method uncovered."""
    own = "forward" in unet.__dict__
    inner = unet.forward
    unet.forward = wrap(inner)
    try:
        yield
    finally:
        if own:
            unet.forward = inner
        else:
            del unet.forward


@contextmanager
def unet_calls(unet, steps: int, interval: tuple[float, float] | None = None):
    """Counts every UNet call while active; the first `steps` calls (the main pass) follow
    the guidance interval (pass None where the pipeline does not guide: cfg_scale <= 1).
    Restores the UNet's forward afterwards."""
    counts = UnetCalls()

    def wrap(inner):
        def forward(sample, *args, **kwargs):
            step, rows = counts.calls, sample.shape[0]
            counts.calls += 1
            if step < steps and not guided_step(step, steps, interval) and rows % 2 == 0:
                counts.samples += rows // 2
                out = inner(*_cond_half(rows, (sample, *args)), **_cond_half(rows, kwargs))
                return _doubled(out)
            counts.samples += rows
            return inner(sample, *args, **kwargs)

        return forward

    with wrapped_forward(unet, wrap):
        yield counts


def _cond_half(rows: int, value):
    """The conditional (second) half of every batch tensor in value; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value[rows // 2 :] if value.ndim and value.shape[0] == rows else value
    if isinstance(value, dict):
        return {k: _cond_half(rows, v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cond_half(rows, v) for v in value)
    return value


def _doubled(out):
    """The prediction for both halves: [cond, cond]."""
    if isinstance(out, tuple):
        return (torch.cat([out[0], out[0]]), *out[1:])
    out.sample = torch.cat([out.sample, out.sample])
    return out
