"""UNet feature reuse across steps (DeepCache, Ma et al., CVPR 2024), around the UNet's
forward for one batch.

The deep part of the UNet (the inner down blocks, the mid block and the inner up blocks)
changes slowly from one step to the next. Every `interval`-th step runs the whole UNet and
keeps the feature that enters the up block paired with down block `branch`; the steps in
between run only the shallow branch: conv_in, down blocks 0..branch, then the outer up blocks
from the kept feature, with this step's own skip connections. branch 0 is the shallowest (the
most saved); interval 1 runs the whole UNet at every step (the plain forward, untouched).

The shallow path calls the UNet's own embedding helpers and blocks, so LoRAs, attention
processors (SDPA, IP-Adapter, shared attention) and compiled transformer blocks apply to it as
they do to the full forward: with speed=compile (compile_repeated_blocks) the shallow branch
runs the compiled transformer blocks it holds (none at SDXL's branch 0) and the rest eagerly;
a UNet compiled whole runs its shallow steps eagerly. ControlNet
residuals are added to the shallow skip connections they belong to. Anything the shallow path
does not know (T2I-Adapter residuals, class labels, GLIGEN) gets the full forward at every
step.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from keyframes.generation.unet_calls import wrapped_forward

FULL_ONLY_ARGUMENTS = ("down_intrablock_additional_residuals", "class_labels")


@dataclass
class FeatureReuse:
    shallow_samples: int = 0  # rows through the shallow branch only, from the kept feature
    calls: int = 0


def deepest_branch(unet) -> int:
    """The deepest branch the UNet has: the up block paired with the innermost down block
    must still be skipped."""
    return len(unet.down_blocks) - 2


def outer_up_blocks(unet, branch: int):
    """The up blocks the shallow branch runs; the first of them receives the kept feature."""
    return unet.up_blocks[len(unet.up_blocks) - 1 - branch :]


@contextmanager
def feature_reuse(unet, steps: int, interval: int, branch: int = 0):
    """While active, calls 1..interval-1 after each full call of the first `steps` calls (the
    main pass) run the shallow branch only. Restores the UNet's forward afterwards."""
    counts = FeatureReuse()
    if interval <= 1:
        yield counts
        return
    if not 0 <= branch <= deepest_branch(unet):
        raise ValueError(f"branch {branch}: this UNet has branches 0..{deepest_branch(unet)}")
    kept: dict[str, torch.Tensor] = {}
    keeper = outer_up_blocks(unet, branch)[0]

    def keep(module, args, kwargs):
        # a copy: under torch.compile with CUDA graphs the next replay reuses the output memory
        feature = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        kept["feature"] = feature.clone()

    def wrap(inner):
        def forward(sample, timestep, encoder_hidden_states, *args, **kwargs):
            step, rows = counts.calls, sample.shape[0]
            counts.calls += 1
            feature = _feature_for(kept.get("feature"), rows)
            shallow = (
                step < steps
                and step % interval != 0
                and feature is not None
                and not args
                and not any(kwargs.get(name) is not None for name in FULL_ONLY_ARGUMENTS)
                and not (kwargs.get("cross_attention_kwargs") or {}).get("gligen")
            )
            if shallow:
                counts.shallow_samples += rows
                return _shallow_forward(
                    unet, branch, feature, sample, timestep, encoder_hidden_states, **kwargs
                )
            handle = keeper.register_forward_pre_hook(keep, with_kwargs=True)
            try:
                return inner(sample, timestep, encoder_hidden_states, *args, **kwargs)
            finally:
                handle.remove()

        return forward

    with wrapped_forward(unet, wrap):
        yield counts


def _feature_for(feature: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """The kept feature for a call of `rows` rows: itself, or its conditional half where a
    guidance interval left only the conditional rows; None where it does not fit."""
    if feature is None or feature.shape[0] == rows:
        return feature
    if feature.shape[0] == 2 * rows:
        return feature[rows:]
    return None


def _shallow_forward(
    unet,
    branch,
    feature,
    sample,
    timestep,
    encoder_hidden_states,
    timestep_cond=None,
    attention_mask=None,
    cross_attention_kwargs=None,
    added_cond_kwargs=None,
    down_block_additional_residuals=None,
    mid_block_additional_residual=None,
    encoder_attention_mask=None,
    return_dict=True,
    **_,
):
    """UNet2DConditionModel.forward with the deep part replaced by `feature`: the same
    embedding helpers and blocks, in the same order, for the outer levels only."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    forward_upsample_size = any(s % 2**unet.num_upsamplers for s in sample.shape[-2:])
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    emb, attention = _embeddings(
        unet,
        sample,
        timestep,
        encoder_hidden_states,
        timestep_cond,
        attention_mask,
        cross_attention_kwargs,
        added_cond_kwargs,
        encoder_attention_mask,
    )

    skips = _down(unet, branch, unet.conv_in(sample), emb, attention)
    outer = outer_up_blocks(unet, branch)
    # the outer up blocks read the first skips, as in the full forward (its deeper up blocks
    # take theirs from the end first); the innermost down block's last output goes unused
    skips = skips[: sum(len(block.resnets) for block in outer)]
    if down_block_additional_residuals is not None:  # ControlNet: the same skips, same order
        skips = tuple(s + r for s, r in zip(skips, down_block_additional_residuals, strict=False))
    sample = _up(outer, feature, skips, emb, attention, forward_upsample_size)

    if unet.conv_norm_out:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    sample = unet.conv_out(sample)
    return UNet2DConditionOutput(sample=sample) if return_dict else (sample,)


def _down(unet, branch: int, sample, emb, attention: dict) -> tuple:
    """The outer down blocks, to `branch`: every skip feature they make, the input's first."""
    skips = (sample,)
    for block in unet.down_blocks[: branch + 1]:
        if getattr(block, "has_cross_attention", False):
            sample, more = block(hidden_states=sample, temb=emb, **attention)
        else:
            sample, more = block(hidden_states=sample, temb=emb)
        skips += more
    return skips


def _up(outer: list, sample, skips: tuple, emb, attention: dict, forward_upsample_size: bool):
    """The outer up blocks from the deep `sample`, each taking its skips from the end."""
    for i, block in enumerate(outer):
        own_skips, skips = skips[-len(block.resnets) :], skips[: -len(block.resnets)]
        final = i == len(outer) - 1
        upsample_size = skips[-1].shape[2:] if not final and forward_upsample_size else None
        inputs = {
            "hidden_states": sample,
            "temb": emb,
            "res_hidden_states_tuple": own_skips,
            "upsample_size": upsample_size,
        }
        if getattr(block, "has_cross_attention", False):
            inputs |= attention
        sample = block(**inputs)
    return sample


def _embeddings(
    unet,
    sample,
    timestep,
    encoder_hidden_states,
    timestep_cond,
    attention_mask,
    cross_attention_kwargs,
    added_cond_kwargs,
    encoder_attention_mask,
):
    """(time embedding, the attention blocks' keyword arguments) as the full forward makes
    them: masks turned into biases, SDXL's added conditioning, IP-Adapter's image tokens."""
    if attention_mask is not None:
        attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
    if encoder_attention_mask is not None:
        encoder_attention_mask = (1 - encoder_attention_mask.to(sample.dtype)) * -10000.0
        encoder_attention_mask = encoder_attention_mask.unsqueeze(1)
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
    aug_emb = unet.get_aug_embed(
        emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
    )
    emb = emb + aug_emb if aug_emb is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    encoder_hidden_states = unet.process_encoder_hidden_states(
        encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
    )
    return emb, dict(
        encoder_hidden_states=encoder_hidden_states,
        attention_mask=attention_mask,
        cross_attention_kwargs=cross_attention_kwargs,
        encoder_attention_mask=encoder_attention_mask,
    )


def run_flops(pipe, width: int, height: int, deepcache: tuple[int, int] | None):
    """(FLOPs of this pipeline at this size, where they come from), with the shallow branch's
    FLOPs per sample where feature reuse is on."""
    from dataclasses import replace

    from keyframes.pipeline.flops import image_flops

    flops, source = image_flops(pipe, width, height)
    if deepcache:
        shallow = shallow_branch_flops(pipe.unet, width, height, deepcache[1])
        flops = replace(flops, unet_shallow_per_sample_step=shallow)
    return flops, source


def shallow_branch_flops(unet, width: int, height: int, branch: int) -> float:
    """FLOPs of one sample through the shallow branch at this size: feature reuse itself run
    on a meta copy of the UNet (shapes only), a whole call to keep the feature, then a shallow
    one counted. Once per process for each UNet configuration, size and branch."""
    import json

    from torch.utils.flop_counter import FlopCounterMode

    from keyframes.pipeline.flops import unet_inputs

    key = (json.dumps(dict(unet.config), sort_keys=True, default=str), width, height, branch)
    if key not in _SHALLOW_FLOPS:
        with torch.device("meta"):
            unet = type(unet).from_config(unet.config)
        inputs = unet_inputs(unet, width, height)
        with torch.no_grad(), feature_reuse(unet, steps=2, interval=2, branch=branch) as reused:
            unet(**inputs)
            with FlopCounterMode(display=False) as counter:
                unet(**inputs)
        assert reused.shallow_samples == 1, "the counted call was not the shallow branch"
        _SHALLOW_FLOPS[key] = float(counter.get_total_flops())
    return _SHALLOW_FLOPS[key]


_SHALLOW_FLOPS: dict[tuple[str, int, int, int], float] = {}
