"""What the consistent-character methods add, counted for the full-size SDXL base architecture
(keyframes/data/sdxl_base) over a shotlist, with the methods' own cost code; no GPU, no
weights, seconds on a CPU:

    uv run python scripts/count_character_cost.py                 # the demo, 1024x1024, 30 steps
    uv run python scripts/count_character_cost.py consistency.anchors=2 steps=40

consistency=story: the extra self-attention FLOPs of each image (anchors attend to the other
anchors' kept tokens, later scenes to those of every character they list) and the memory of
the kept tokens (bfloat16). consistency=character_ref: one portrait per character (a whole
image each) and the IP-Adapter's 4 image tokens in every cross-attention layer; the image
encoder (OpenCLIP ViT-bigG for ip-adapter_sdxl) is not counted: its config is not packaged.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keyframes.conditioning.character_ref import portrait_jobs  # noqa: E402
from keyframes.config.compose import composer  # noqa: E402
from keyframes.generation.recipe import KeyframesRecipe  # noqa: E402
from keyframes.pipeline.architectures import packaged_counts, published_configs  # noqa: E402
from keyframes.pipeline.attention_cost import self_attention_layers  # noqa: E402
from keyframes.pipeline.flops import ImageFlops  # noqa: E402

IP_TOKENS = 4  # ip-adapter_sdxl's image tokens per cross-attention layer
BASE = ("model=sdxl_random", "device=cpu", "scorer=none", "width=1024", "height=1024")


def composed(consistency: str, overrides: list[str]):
    with composer() as settings_of:
        return settings_of([*BASE, f"consistency={consistency}", *overrides])


def main(overrides: list[str]) -> None:
    story = KeyframesRecipe().setup(composed("story", overrides), announce=False)
    plan, method = story.plan, story.methods[0]
    unet = published_configs("sdxl_base")["unet"]
    method.layers = method._layers(unet)
    size = f"{plan.width}x{plan.height}"
    counts = ImageFlops(**packaged_counts("sdxl_base")["flops"][size])
    cfg, s = plan.config, method.settings
    evaluations = (2 if cfg.cfg_scale > 1 else 1) * cfg.steps
    image = counts.per_image(cfg.steps, cfg.cfg_scale)
    print(f"{story.shotlist.title}: {len(story.jobs)} images at {size}, {cfg.steps} steps")
    print(f"one image, plain: {image / 1e12:.1f} TFLOP (cfg {cfg.cfg_scale})\n")
    print(f"consistency=story: share {s.share}, anchors {s.anchors}, layers {list(s.layers)}")
    print("| scene | role | extra TFLOP | of a plain image |\n|---|---|---|---|")
    total = 0.0
    for job in story.jobs:
        extra = method.extra_flops(job, evaluations)
        total += extra
        anchor, reads = method.anchor_of.get(job.index), method.reads(job)
        role = f"anchor of {anchor}" if anchor else f"reads {', '.join(reads)}" if reads else "-"
        print(f"| {job.scene_id} | {role} | {extra / 1e12:.2f} | {100 * extra / image:.1f} % |")
    share = 100 * total / (image * len(story.jobs))
    print(f"\nthe run: +{total / 1e12:.1f} TFLOP, {share:.1f} % of plain")
    print(f"kept anchor tokens, bfloat16: {method.memory_gb(2):.2f} GB for the run")
    for name, anchors in method.anchors.items():
        print(f"  {name}: {', '.join(j.scene_id for j in anchors)}")

    others = [o for o in overrides if not o.startswith("consistency.")]  # story's own
    template = composed("character_ref", others).consistency.portrait
    portraits = portrait_jobs(story.shotlist, story.jobs, template, story.method_context)
    cross = self_attention_layers(unet, plan.width, plan.height)  # an attn2 beside each attn1
    context = unet["cross_attention_dim"]
    per_eval = sum(
        2 * 2 * IP_TOKENS * context * a.channels + 2 * 2 * a.tokens * IP_TOKENS * a.channels
        for a in cross
    )
    tokens = per_eval * evaluations
    print(
        f"\nconsistency=character_ref: {len(portraits)} portraits ({', '.join(portraits)}), "
        f"{len(portraits) * image / 1e12:.0f} TFLOP; the IP-Adapter's image tokens "
        f"{tokens / 1e12:.3f} TFLOP per image ({100 * tokens / image:.2f} %); "
        "the image encoder not counted"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
