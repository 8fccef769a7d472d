"""ControlNet: a scene's `control: {type: canny|depth, image: path}` steers its composition.

Canny edges are computed here with OpenCV's Canny, the detector the SDXL canny ControlNets
were trained on; a depth control takes a ready depth map (white near, black far). Scenes
with a control run through the model's ControlNet pipeline (SDXL or SD 1.5) made with
`from_pipe`, so the base model is shared; scenes without one run as usual.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from keyframes.conditioning.base import BatchHook, Method, register
from keyframes.config.schema import CONTROL_TYPES, FAMILIES, ControlNetConfig
from keyframes.config.weights import pickle_problem
from keyframes.errors import ConfigError, ModelUnavailableError, first_line
from keyframes.pipeline.load import quiet_loading
from keyframes.shotlist.jobs import ImageJob

log = logging.getLogger("keyframes")


def canny(image: Image.Image, low: int, high: int) -> Image.Image:
    """White edges on black, three channels, the control image a canny ControlNet reads."""
    import cv2

    edges = cv2.Canny(np.asarray(image.convert("RGB")), low, high)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def control_image(job: ImageJob, control: ControlNetConfig, width: int, height: int):
    kind, path = job.control
    with Image.open(path) as opened:
        image = opened.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    if kind == "canny":
        return canny(image, control.canny_low, control.canny_high)
    return image  # depth: already a depth map


def check_controls(jobs: list[ImageJob], control: ControlNetConfig) -> list[str]:
    """Scenes whose control this run cannot follow are errors; with controlnet=none the
    controls are ignored, with a note (the same shotlist serves runs with and without)."""
    scenes = {job.scene_id: job.control[0] for job in jobs if job.control}
    if not scenes:
        return []
    if control.type is None:
        return [f"controlnet=none: the control of scenes {', '.join(scenes)} is ignored"]
    wrong = [f"{scene} ({kind})" for scene, kind in scenes.items() if kind != control.type]
    if wrong:
        raise ConfigError(
            f"controlnet={control.name} follows {control.type} controls; scenes "
            f"{', '.join(wrong)} need another (types: {', '.join(CONTROL_TYPES)})"
        )
    return []


def local_controlnet_problem(folder: Path, allow_pickle: bool) -> str | None:
    """A diffusers ControlNet folder: its config and its weights, a pickle only if allowed."""
    what = f"controlnet.path={folder}"
    if not (folder / "config.json").is_file():
        return f"{what}: no config.json (a diffusers ControlNet folder holds it and its weights)"
    if any(folder.glob("diffusion_pytorch_model*.safetensors")):
        return None
    pickled = sorted(folder.glob("diffusion_pytorch_model*.bin"))
    if not pickled:
        return f"{what}: no diffusion_pytorch_model.safetensors"
    return pickle_problem(pickled[0], "controlnet.path", allow_pickle)


def load_controlnet(control: ControlNetConfig, dtype: torch.dtype, allow_pickle: bool = False):
    from diffusers import ControlNetModel

    try:
        with quiet_loading():
            return ControlNetModel.from_pretrained(  # the README's pickle rule
                str(Path(control.path).expanduser()) if control.path else control.id,
                dtype=dtype,
                use_safetensors=None if allow_pickle else True,
            )
    except (OSError, ValueError) as e:
        raise ModelUnavailableError(
            f"controlnet={control.name} ({control.path or control.id}) is not available: "
            f"{first_line(e)}\n  Download it: uv run hf download {control.id} "
            '--include "*.json" "*.safetensors" (or set controlnet.path to a local folder).'
        ) from None


class Control(BatchHook):
    """The ControlNet pipeline for the run, and the control images of its jobs: batches with
    a control run through it, the others through the plain pipeline."""

    def __init__(self, pipe, net, control: ControlNetConfig, width: int, height: int):
        from diffusers import AutoPipelineForText2Image

        # from_pipe copies the components there are now (an IP-Adapter's image encoder too)
        self.pipe = AutoPipelineForText2Image.from_pipe(pipe, controlnet=net)
        self.pipe.set_progress_bar_config(disable=True)
        self.config, self.width, self.height = control, width, height

    def split_key(self, job: ImageJob) -> bool:
        return bool(job.control)

    def call(self, pipe, batch: list[ImageJob], conditioning: dict, arguments: dict):
        if not batch[0].control:
            return pipe
        arguments["image"] = [
            control_image(job, self.config, self.width, self.height) for job in batch
        ]
        arguments["controlnet_conditioning_scale"] = self.config.conditioning_scale
        return self.pipe


@register("controlnet", "none")
class NoControlNet(Method):
    """controlnet=none: scenes' controls are ignored, with a note (the same shotlist serves runs
    with and without)."""

    def prepare(self, jobs: list[ImageJob], shotlist) -> list[ImageJob]:
        for note in check_controls(jobs, self.settings):
            log.warning(note)
        return jobs


@register("controlnet", "canny_sdxl", "depth_sdxl", "canny_sd15", "depth_sd15")
class ControlNet(Method):
    """controlnet=<type>_<family>: scenes with a control of that type follow it."""

    name = "controlnet"

    def prepare(self, jobs: list[ImageJob], shotlist) -> list[ImageJob]:
        control, model = self.settings, self.run.model
        problems = []
        if control.type not in CONTROL_TYPES:
            problems.append(
                f"controlnet.type={control.type}: must be one of {', '.join(CONTROL_TYPES)}"
            )
        if control.family not in FAMILIES[1:]:
            problems.append(
                f"controlnet.family={control.family}: must be one of {', '.join(FAMILIES[1:])}"
            )
        if not control.conditioning_scale >= 0:
            problems.append(
                f"controlnet.conditioning_scale={control.conditioning_scale}: must be >= 0"
            )
        if problems:
            raise ConfigError("invalid settings:", problems)
        check_controls(jobs, control)
        if any(job.control for job in jobs) and control.family != model.family:
            raise ConfigError(
                "settings that do not fit the model:",
                [
                    f"controlnet={control.name} is a {control.family} ControlNet; {model.name} is "
                    f"{model.family} (controlnet=canny_{model.family} or depth_{model.family} fits)"
                ],
            )
        return jobs

    def missing_weights(self) -> str | None:
        from keyframes.pipeline import hub

        control = self.settings
        if control.path:
            return local_controlnet_problem(
                Path(control.path).expanduser(), self.run.model.allow_pickle
            )
        return hub.missing(
            control.id,
            "config.json",
            f"controlnet={control.name}",
            '--include "*.json" "*.safetensors"',
        )

    def install(self, loaded, todo: list[ImageJob]) -> None:
        pipe = loaded.pipe
        self.net = None
        if any(job.control for job in todo):
            allow = self.run.model.allow_pickle
            net = load_controlnet(self.settings, pipe.unet.dtype, allow)
            self.net = net.to(pipe.device)

    def begin_stage(self, pipe, stage: int) -> BatchHook | None:
        # made per stage: from_pipe copies the components there are at that moment
        if self.net is None:
            return None
        return Control(pipe, self.net, self.settings, self.run.width, self.run.height)

    def record(self, job: ImageJob) -> dict:
        if not job.control:
            return {"control": None}
        return {
            "control": {
                "type": job.control[0],
                "image": job.control[1],
                "controlnet": self.settings.name,
                "scale": self.settings.conditioning_scale,
            }
        }

    @classmethod
    def png_settings(cls, record: dict) -> list[str]:
        control = record.get("control")
        if not control:
            return []
        return [f"ControlNet: {control['type']} (weight {control['scale']:g})"]
