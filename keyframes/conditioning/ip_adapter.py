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

from keyframes.conditioning.base import BatchHook, Method, register
from keyframes.config.schema import IPAdapterConfig
from keyframes.config.weights import ALLOW, pickle_problem
from keyframes.errors import ConfigError, ModelUnavailableError, first_line
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


def missing_adapter(consistency: IPAdapterConfig, allow_pickle: bool = False) -> str | None:
    """Pre-flight: why the adapter weights cannot be had (a local copy, the hub cache, or the
    hub when it answers), or may not be loaded (a pickle: the adapter's .bin, or an image
    encoder kept as pytorch_model.bin, which transformers would fall back to). The first
    keyframe may be made before the adapter loads; a missing adapter must not stop the run
    halfway."""
    from keyframes.pipeline import hub

    sub, where = consistency.ip_adapter_subfolder, consistency.ip_adapter_path
    refused = pickle_problem(
        Path(consistency.ip_adapter_weight), "consistency.ip_adapter_weight", allow_pickle
    )
    if refused:
        return refused

    def have(name: str) -> bool:
        if where:
            return (Path(where).expanduser() / name).is_file()
        return hub.cached(consistency.ip_adapter_id, name) is not None

    name = f"{sub}/{consistency.ip_adapter_weight}"
    if not (have(name) or (not where and hub.reachable())):
        return (
            f"consistency={consistency.name}: {where or consistency.ip_adapter_id} has no {name}.\n"
            f"  Download it: uv run hf download {consistency.ip_adapter_id} --include "
            f'"{sub}/*" (or set consistency.ip_adapter_path).'
        )
    encoder = f"{sub}/image_encoder"
    pickled = not have(f"{encoder}/model.safetensors") and have(f"{encoder}/pytorch_model.bin")
    if pickled and not allow_pickle:
        return (
            f"consistency={consistency.name}: the image encoder in "
            f"{where or consistency.ip_adapter_id}/{encoder} is a pickle (pytorch_model.bin), "
            "which can run code when loaded. Put its "
            f"model.safetensors there, or set {ALLOW} if you trust its source."
        )
    return None


def load_adapter(pipe, consistency: IPAdapterConfig) -> None:
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
        {
            block: {k: [v * scale for v in vs] for k, vs in blocks.items()}
            for block, blocks in STYLE_ONLY.items()
        }
        if consistency.style_only
        else scale
    )


def reference_image(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


class ImagePrompt(BatchHook):
    """Shows each batch its reference image (batches are split on it)."""

    def split_key(self, job: ImageJob) -> str | None:
        return job.reference

    def call(self, pipe, batch: list[ImageJob], conditioning: dict, arguments: dict):
        conditioning["ip_adapter_image"] = reference_image(batch[0].reference)
        return pipe


@register("consistency", "ip_adapter")
class IpAdapter(Method):
    """consistency=ip_adapter: an image prompt per image; where none is given, the run's first
    keyframe, made before the adapter loads and then shown to every other image."""

    def prepare(self, jobs: list[ImageJob], shotlist: Shotlist) -> list[ImageJob]:
        self.check_model()
        image = self.settings.image
        if image is not None and not Path(image).expanduser().is_file():
            raise ConfigError(f"consistency.image={image}: no such file")
        image = str(Path(image).expanduser().resolve()) if image else None
        self.planned = assign_references(jobs, shotlist, image)
        self.loaded = False
        return self.planned

    def check_model(self) -> None:
        family, model = self.run.model.family, self.run.model.name
        if family != "sdxl":
            raise ConfigError(
                "settings that do not fit the model:",
                [
                    f"consistency={self.name} loads SDXL IP-Adapters; {model} is {family}. "
                    "Use consistency=style_aligned, story or none."
                ],
            )

    def missing_weights(self) -> str | None:
        return missing_adapter(self.settings, self.run.model.allow_pickle)

    def stages(self, todo: list[ImageJob], planned: list[ImageJob], run_dir) -> list[list]:
        first = planned[0]
        plain = [j for j in todo if j.index == first.index and j.reference is None]
        fallback = str(run_dir / first.file)
        rest = [replace(j, reference=j.reference or fallback) for j in todo if j not in plain]
        return [plain, rest]

    def begin_stage(self, pipe, stage: int) -> BatchHook | None:
        if stage == 0:
            return None
        load_adapter(pipe, self.settings)
        self.loaded = True
        return ImagePrompt()

    def remove(self, pipe) -> None:
        if self.loaded:
            pipe.unload_ip_adapter()

    def record(self, job: ImageJob) -> dict:
        """The image prompt's path: the run's first keyframe where nothing else was given."""
        first = self.planned[0]
        reference = job.reference or (None if job.index == first.index else first.file)
        return {"consistency": self.name, "consistency_reference": reference}
