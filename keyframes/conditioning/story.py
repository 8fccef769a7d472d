"""Consistent self-attention (StoryDiffusion, Zhou et al. 2024), training-free: the same people
in every scene that lists them.

For each character (in order of first appearance) its anchors are chosen: the first takes of
up to `anchors` scenes that list it, scenes showing it alone first, no scene anchoring two
characters. The anchors of a character are made together, in one pipeline call, before every
other scene: in each shared self-attention layer, from the first shared step on, an anchor
attends to its own tokens and to a share of each other anchor's tokens. Those shares are kept,
per character, layer and step ("writing"). Every later image attends to its own tokens and to
the kept tokens of each character its scene lists ("reading"); images of scenes without
characters attend only to themselves, as with consistency=none.

Unlike StoryDiffusion, nothing is drawn from a global random state: the share of an anchor's
tokens is drawn from a generator seeded with the anchor's seed, the step and the layer's token
count, and no layer skips sharing at random. So a run is reproducible, an image does not
depend on the batch it is in, and a resumed run makes the anchors again to read them.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import torch

from keyframes.conditioning.attention import SelfAttentionProcessor, attend
from keyframes.conditioning.base import BatchHook, Method, register
from keyframes.errors import ConfigError
from keyframes.pipeline.attention_cost import (
    SelfAttention,
    extra_attention_flops,
    kept_count,
    kept_values,
    self_attention_layers,
    shared_layers,
)
from keyframes.shotlist.jobs import ImageJob
from keyframes.shotlist.load import Shotlist

log = logging.getLogger("keyframes")
BLOCKS = ("down_blocks", "mid_block", "up_blocks")  # where a UNet's self-attention layers are


def cast_of(jobs: list[ImageJob], shotlist: Shotlist) -> dict[int, tuple[str, ...]]:
    """Each job's characters, as its scene lists them (once each)."""
    scenes = {scene.id: scene for scene in shotlist.scenes}
    return {job.index: tuple(dict.fromkeys(scenes[job.scene_id].characters)) for job in jobs}


def choose_anchors(
    jobs: list[ImageJob], cast: dict[int, tuple[str, ...]], count: int
) -> dict[str, list[ImageJob]]:
    """Per character, in order of first appearance: the first takes of up to `count` scenes
    listing it, those showing it alone first, none already anchoring an earlier character."""
    firsts = [job for job in jobs if job.take == 1]
    characters = dict.fromkeys(name for job in firsts for name in cast[job.index])
    taken: set[int] = set()
    anchors = {}
    for name in characters:
        showing = [j for j in firsts if name in cast[j.index] and j.index not in taken]
        ordered = sorted(showing, key=lambda j: len(cast[j.index]) > 1)  # stable: alone first
        chosen = sorted(ordered[:count], key=lambda j: j.index)
        taken |= {j.index for j in chosen}
        anchors[name] = chosen
    return anchors


def kept_tokens(seed: int, step: int, tokens: int, share: float) -> torch.Tensor:
    """Which of an anchor's `tokens` the others attend to at this step: round(share x tokens)
    of them, drawn by a generator seeded from the anchor's seed, the step and the count."""
    key = hashlib.sha256(f"{seed}:{step}:{tokens}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "big"))
    count = max(1, round(share * tokens))
    return torch.randperm(tokens, generator=generator)[:count].sort().values


@dataclass
class StoryState:
    """What every shared layer reads during one pipeline call, and the kept tokens."""

    share: float
    first_step: int
    end_step: int | None
    keep_on_cpu: bool = False
    mode: str = "off"  # off | write (the anchors of `character`) | read (the `cast`'s)
    step: int = -1  # UNet calls of this pipeline call so far, minus one
    seeds: tuple[int, ...] = ()  # the call's rows
    character: str | None = None
    cast: tuple[str, ...] = ()
    kept: dict[tuple[str, str, int], torch.Tensor] = field(default_factory=dict)
    _drawn: dict[tuple[int, int, int], torch.Tensor] = field(default_factory=dict)

    def sharing(self) -> bool:
        end = self.end_step if self.end_step is not None else self.step + 1
        return self.mode != "off" and self.first_step <= self.step < end

    def drawn(self, seed: int, tokens: int, device: torch.device) -> torch.Tensor:
        key = (seed, self.step, tokens)
        if key not in self._drawn:
            self._drawn = {k: v for k, v in self._drawn.items() if k[1] == self.step}
            self._drawn[key] = kept_tokens(seed, self.step, tokens, self.share).to(device)
        return self._drawn[key]

    def kept_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kept.values())


class StoryAttention(SelfAttentionProcessor):
    """A self-attention layer that writes or reads kept anchor tokens (see the module)."""

    def __init__(self, layer: str, state: StoryState):
        self.layer, self.state = layer, state

    def attention(self, attn, tokens: torch.Tensor) -> torch.Tensor:
        state, context = self.state, tokens
        if state.sharing():
            rows = len(state.seeds)
            # guidance halves: 2 under classifier-free guidance, 1 on unguided steps
            per_row = tokens.unflatten(0, (tokens.shape[0] // rows, rows))
            writing = state.mode == "write"
            context = self._write(per_row) if writing else self._read(per_row)
        return attend(attn, tokens, context)

    def _write(self, x: torch.Tensor) -> torch.Tensor:
        """x: (halves, anchors, tokens, channels). Each anchor's context: the others' kept
        tokens, then its own; the kept tokens are stored for the readers."""
        state = self.state
        kept = [
            x[:, i, state.drawn(seed, x.shape[2], x.device)] for i, seed in enumerate(state.seeds)
        ]
        passed_on = torch.cat(kept, dim=1)
        key = (state.character, self.layer, state.step)
        state.kept[key] = passed_on.to("cpu") if state.keep_on_cpu else passed_on
        contexts = [
            torch.cat([*kept[:i], *kept[i + 1 :], x[:, i]], dim=1) for i in range(x.shape[1])
        ]
        return torch.stack(contexts, dim=1).flatten(0, 1)

    def _read(self, x: torch.Tensor) -> torch.Tensor:
        """x: (halves, rows, tokens, channels). Each row's context: the kept tokens of every
        character of the batch's cast, then its own."""
        state = self.state
        kept = [state.kept.get((name, self.layer, state.step)) for name in state.cast]
        kept = [k.to(x.device) for k in kept if k is not None and k.shape[0] == x.shape[0]]
        if not kept:
            return x.flatten(0, 1)
        extra = torch.cat(kept, dim=1).unsqueeze(1).expand(-1, x.shape[1], -1, -1)
        return torch.cat([extra, x], dim=2).flatten(0, 1)


class StoryHook(BatchHook):
    """Stage 0 (anchors): one call per character, every anchor in it, in every process.
    Stage 1 (the rest): batches of one cast each, reading the kept tokens."""

    def __init__(self, method: Story, stage: int):
        self.method, self.stage = method, stage
        self.whole_groups = self.every_process = stage == 0

    def split_key(self, job: ImageJob):
        if self.stage == 0:
            return self.method.anchor_of[job.index]
        return self.method.reads(job)

    def call(self, pipe, batch: list[ImageJob], conditioning: dict, arguments: dict):
        state = self.method.state
        state.step, state.seeds = -1, tuple(job.seed for job in batch)
        if self.stage == 0:
            state.mode, state.character = "write", self.method.anchor_of[batch[0].index]
        else:
            state.mode, state.cast = "read", self.method.reads(batch[0])
        return pipe

    def after_latents(self, latents, batch: list, inputs: dict):
        self.method.state.mode = "off"  # second passes (hires) run the same UNet plainly
        return latents


@register("consistency", "story")
class Story(Method):
    """consistency=story: consistent self-attention among the scenes that share a character."""

    def prepare(self, jobs: list[ImageJob], shotlist: Shotlist) -> list[ImageJob]:
        self._check(jobs)
        self.cast = cast_of(jobs, shotlist)
        self.anchors = choose_anchors(jobs, self.cast, self.settings.anchors)
        self.anchor_of = {j.index: name for name, js in self.anchors.items() for j in js}
        for name, chosen in self.anchors.items():
            if not chosen:
                log.warning("consistency=story: %s appears only in other characters' anchors", name)
        return jobs

    def _check(self, jobs: list[ImageJob]) -> None:
        s, run, problems = self.settings, self.run, []
        if not 0 < s.share <= 1:
            problems.append(f"consistency.share={s.share}: a share of the tokens, in (0, 1]")
        if s.anchors < 1:
            problems.append(f"consistency.anchors={s.anchors}: at least 1 per character")
        if not s.layers or any(not layer.startswith(BLOCKS) for layer in s.layers):
            problems.append(
                f"consistency.layers={list(s.layers)}: layer name prefixes, each starting "
                f"with one of {', '.join(BLOCKS)}"
            )
        first, end = (list(s.steps) + [None, None])[:2]
        if len(s.steps) != 2 or first is None or first < 0 or (end is not None and end <= first):
            problems.append(f"consistency.steps={list(s.steps)}: [first, end) steps; end null: all")
        if s.keep not in ("device", "cpu"):
            problems.append(f"consistency.keep={s.keep}: device or cpu")
        if run.chosen.get("controlnet", "none") != "none" and any(job.control for job in jobs):
            problems.append(
                "consistency=story with ControlNet scenes: a character's anchors are made in "
                "one call, and a ControlNet call steers all its rows with one control. Use one "
                "of them per run (consistency=character_ref works with ControlNet)."
            )
        if run.compile:
            problems.append(
                "consistency=story with speed=compile: the kept tokens change at every step, "
                "and the compiled UNet would be compiled again for each. Use speed=sdpa."
            )
        if problems:
            raise ConfigError("settings that do not fit consistency=story:", problems)

    def reads(self, job: ImageJob) -> tuple[str, ...]:
        """The characters whose kept tokens this job reads."""
        return tuple(name for name in self.cast[job.index] if self.anchors.get(name))

    # What it costs (pipeline/attention_cost.py): counted from the UNet's config.
    def _layers(self, unet_config: dict) -> list[SelfAttention]:
        run = self.run
        layers = self_attention_layers(unet_config, run.width, run.height)
        return shared_layers(layers, list(self.settings.layers))

    def shared_steps(self) -> int:
        first, end = self.settings.steps
        return max(0, min(self.run.steps if end is None else end, self.run.steps) - first)

    def memory_gb(self, bytes_per_value: int) -> float:
        """The kept anchor tokens of every character, both guidance halves, every shared
        step, at the plan's size, counted for the SDXL base architecture (as memory=auto
        counts every model: an over-estimate for smaller ones); none on the card where
        they are kept in CPU memory."""
        from keyframes.pipeline.architectures import published_configs

        layers = self._layers(published_configs(self.run.model.architecture or "sdxl_base")["unet"])
        if self.settings.keep == "cpu":
            return 0.0
        halves = 2 if self.run.cfg_scale > 1 else 1
        values = sum(
            kept_values(layers, self.settings.share, len(js)) for js in self.anchors.values()
        )
        return values * halves * self.shared_steps() * bytes_per_value / 1e9

    def extra_flops(self, job: ImageJob, evaluations: float) -> float:
        """The extra attention one image cost: its UNet evaluations (samples) on the shared
        steps, each attending to the kept tokens it reads (an anchor: the other anchors')."""
        if not hasattr(self, "layers") or self.run.steps == 0:
            return 0.0
        anchor = self.anchor_of.get(job.index)
        images = (
            len(self.anchors[anchor]) - 1
            if anchor
            else sum(len(self.anchors[n]) for n in self.reads(job))
        )
        share = self.settings.share
        extra = {a.layer: images * kept_count(a.tokens, share) for a in self.layers}
        shared = evaluations * self.shared_steps() / self.run.steps
        return shared * extra_attention_flops(self.layers, extra)

    def install(self, loaded, todo: list[ImageJob]) -> None:
        unet = loaded.pipe.unet
        self.layers = self._layers(dict(unet.config))
        first, end = self.settings.steps
        self.state = StoryState(self.settings.share, first, end, self.settings.keep == "cpu")
        self.restore = dict(unet.attn_processors)
        shared = [
            name
            for name in self.restore
            if name.endswith("attn1.processor") and name.startswith(tuple(self.settings.layers))
        ]
        if not shared:
            raise ConfigError(f"consistency.layers={list(self.settings.layers)}: no such layer")
        state = self.state
        unet.set_attn_processor(
            {n: StoryAttention(n, state) if n in shared else p for n, p in self.restore.items()}
        )

        def count_step(module, args) -> None:
            state.step += 1

        self.ticking = unet.register_forward_pre_hook(count_step)
        log.info(
            "story: %d self-attention layers share; anchors %s",
            len(shared),
            "; ".join(
                f"{n}: {', '.join(j.scene_id for j in js)}" for n, js in self.anchors.items()
            ),
        )

    def stages(self, todo: list[ImageJob], planned: list[ImageJob], run_dir) -> list[list]:
        """The anchors of every character a job to make lists (made again where done: their
        kept tokens are not on disk), then the rest."""
        needed = dict.fromkeys(name for job in todo for name in self.reads(job))
        anchors = [job for name in needed for job in self.anchors[name]]
        return [anchors, [job for job in todo if job.index not in self.anchor_of]]

    def begin_stage(self, pipe, stage: int) -> BatchHook:
        return StoryHook(self, stage)

    def remove(self, pipe) -> None:
        if hasattr(self, "restore"):
            log.info("story: %.2f GB of kept anchor tokens released", self.state.kept_bytes() / 1e9)
            pipe.unet.set_attn_processor(self.restore)
            self.ticking.remove()
            self.state.kept.clear()
            del self.restore

    def record(self, job: ImageJob) -> dict:
        anchor = self.anchor_of.get(job.index)
        reads = [] if anchor else list(self.reads(job))
        return {
            "consistency": self.name,
            "consistency_reference": None,
            "story": {"anchor_of": anchor, "reads": reads},
        }

    @classmethod
    def png_settings(cls, record: dict) -> list[str]:
        story = record.get("story") or {}
        if story.get("anchor_of"):
            return [f"Story anchor: {story['anchor_of']}"]
        return [f"Story reads: {', '.join(story['reads'])}"] if story.get("reads") else []

    def run_record(self) -> dict:
        s = self.settings
        return {
            "story": {
                "share": s.share,
                "anchors": {n: [j.file for j in js] for n, js in self.anchors.items()},
                "layers": list(s.layers),
                "steps": list(s.steps),
                "keep": s.keep,
            }
        }
