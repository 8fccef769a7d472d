"""IP-Adapter: an image prompt next to the text prompt, through diffusers' `load_ip_adapter`.

Each image's reference is, first to last: the scene's own `reference` image, the reference
of the first character in the scene that has one (the shotlist's character sheet), the run's
`consistency.image`, or else the run's first keyframe (generated first, then shown to the
others). `consistency.style_only` sets the adapter's scale per block the InstantStyle way:
only the up block that carries style reads the image, so its look transfers, not its content.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from PIL import Image

from keyframes.config.schema import ConsistencyConfig
from keyframes.errors import ModelUnavailableError, first_line
from keyframes.shotlist.jobs import ImageJob
from keyframes.shotlist.load import Shotlist

# InstantStyle for SDXL: up_blocks.0.attentions.1 reads style, down_blocks.2.attentions.1 layout
STYLE_ONLY = {"up": {"block_0": [0.0, 1.0, 0.0]}}


def assign_references(
    jobs: list[ImageJob], shotlist: Shotlist, image: str | None
) -> list[ImageJob]:
    """The jobs with their `reference` image set; None where the run's first keyframe will
    serve (render makes it first)."""
    scenes = {scene.id: scene for scene in shotlist.scenes}
    out = []
    for job in jobs:
        scene = scenes[job.scene_id]
        featured = [shotlist.characters[n] for n in scene.characters if n in shotlist.characters]
        cast = next((c.reference for c in featured if c.reference), None)
        out.append(replace(job, reference=scene.reference or cast or image))
    return out


def missing_adapter(consistency: ConsistencyConfig) -> str | None:
    """Pre-flight: why the adapter weights cannot be had (a local copy, the hub cache, or the
    hub when it answers). The first keyframe may be made before the adapter loads; a missing
    adapter must not stop the run halfway."""
    from keyframes.pipeline import hub

    name = f"{consistency.ip_adapter_subfolder}/{consistency.ip_adapter_weight}"
    if consistency.ip_adapter_path:
        found = (Path(consistency.ip_adapter_path).expanduser() / name).is_file()
    else:
        found = hub.cached(consistency.ip_adapter_id, name) is not None or hub.reachable()
    if found:
        return None
    where = consistency.ip_adapter_path or consistency.ip_adapter_id
    return (
        f"consistency=ip_adapter: {where} has no {name}.\n  Download it: uv run hf "
        f'download {consistency.ip_adapter_id} --include "{consistency.ip_adapter_subfolder}/*"'
        " (or set consistency.ip_adapter_path)."
    )


def load_adapter(pipe, consistency: ConsistencyConfig) -> None:
    """Load the adapter and its image encoder into the pipeline, and set the scale."""
    source = consistency.ip_adapter_path or consistency.ip_adapter_id
    try:
        pipe.load_ip_adapter(
            source,
            subfolder=consistency.ip_adapter_subfolder,
            weight_name=consistency.ip_adapter_weight,
        )
    except (OSError, ValueError) as e:
        raise ModelUnavailableError(
            f"consistency=ip_adapter: {source} ({consistency.ip_adapter_subfolder}/"
            f"{consistency.ip_adapter_weight}) is not available: {first_line(e)}\n"
            f"  Download it: uv run hf download {consistency.ip_adapter_id} --include "
            f'"{consistency.ip_adapter_subfolder}/*" (or set consistency.ip_adapter_path).'
        ) from None
    scale = consistency.ip_adapter_scale
    pipe.set_ip_adapter_scale(
        {block: {k: [v * scale for v in vs] for k, vs in blocks.items()}
         for block, blocks in STYLE_ONLY.items()}
        if consistency.style_only else scale
    )  # fmt: skip


def reference_image(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")
