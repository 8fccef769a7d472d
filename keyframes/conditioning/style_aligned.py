"""Shared self-attention in the spirit of StyleAligned (Hertz et al., 2024), training-free.

Every image of a pipeline batch is generated next to one reference image (the batch's first
row, in each classifier-free-guidance half). In each UNet self-attention layer an image's
queries attend to its own keys and values and to the reference's; its queries and keys are
first AdaIN-normalised to the reference's statistics (per channel, over the tokens), which
carries the reference's palette and rendering over while the image keeps its own content.
The reference attends only to itself, exactly as without sharing, so it comes out unchanged.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from keyframes.conditioning.attention import SelfAttentionProcessor, merged_heads, projections
from keyframes.conditioning.base import Method, register
from keyframes.errors import ConfigError
from keyframes.shotlist.jobs import ImageJob, reference_job

log = logging.getLogger("keyframes")

EPS = 1e-5


def adain(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """x re-scaled to the reference's mean and standard deviation over the tokens (dim -2)."""
    mean, std = x.mean(-2, keepdim=True), x.std(-2, keepdim=True) + EPS
    ref_mean, ref_std = reference.mean(-2, keepdim=True), reference.std(-2, keepdim=True) + EPS
    return (x - mean) / std * ref_std + ref_mean


class SharedAttentionProcessor(SelfAttentionProcessor):
    """Self-attention where rows 1.. of each group also attend to row 0 of the group.

    `groups` is how many equal parts the batch has: 2 under classifier-free guidance (the
    unconditional half, then the conditional one), else 1. Set it before each pipeline call."""

    def __init__(self):
        self.groups = 1

    def attention(self, attn, tokens: torch.Tensor) -> torch.Tensor:
        q, k, v = projections(attn, tokens, tokens)
        out = torch.empty_like(q)
        batch = tokens.shape[0]
        size = batch // self.groups
        for start in range(0, batch, size):
            ref, rest = slice(start, start + 1), slice(start + 1, start + size)
            out[ref] = F.scaled_dot_product_attention(q[ref], k[ref], v[ref])
            if size > 1:
                n = size - 1
                keys = torch.cat([k[ref].expand(n, -1, -1, -1), adain(k[rest], k[ref])], dim=-2)
                values = torch.cat([v[ref].expand(n, -1, -1, -1), v[rest]], dim=-2)
                out[rest] = F.scaled_dot_product_attention(adain(q[rest], q[ref]), keys, values)
        return merged_heads(attn, out)


def share_attention(unet) -> tuple[dict, list[SharedAttentionProcessor]]:
    """Install shared attention on the UNet's self-attention layers. Returns the processors
    it replaced (to restore with unet.set_attn_processor) and the new ones."""
    previous = dict(unet.attn_processors)
    shared = {}
    processors = {}
    for name, processor in previous.items():
        if name.endswith("attn1.processor"):  # self-attention; attn2 reads the text
            shared[name] = SharedAttentionProcessor()
            processors[name] = shared[name]
        else:
            processors[name] = processor
    unet.set_attn_processor(processors)
    return previous, list(shared.values())


@register("consistency", "style_aligned")
class StyleAligned(Method):
    """consistency=style_aligned: every image shares attention with one reference keyframe."""

    def prepare(self, jobs: list[ImageJob], shotlist) -> list[ImageJob]:
        if self.run.chosen.get("controlnet", "none") != "none" and any(job.control for job in jobs):
            raise ConfigError(
                "consistency=style_aligned with ControlNet scenes is not supported: the "
                "reference shares every batch, and a ControlNet batch steers all its rows with "
                "one scale. Use one of them per run (consistency=ip_adapter works with ControlNet)."
            )
        self.reference = reference_job(jobs, self.settings.reference)
        return jobs

    def lead(self) -> ImageJob:
        return self.reference

    def install(self, loaded, todo) -> None:
        self.restore, shared = share_attention(loaded.pipe.unet)
        for processor in shared:  # diffusers doubles the batch for guidance above 1
            processor.groups = 2 if self.run.cfg_scale > 1 else 1
        log.info("style_aligned: every image shares attention with %s", self.reference.file)

    def remove(self, pipe) -> None:
        pipe.unet.set_attn_processor(self.restore)

    def record(self, job: ImageJob) -> dict:
        return {"consistency": self.name, "consistency_reference": self.reference.file}
