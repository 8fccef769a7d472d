"""A reference portrait per character, shown to every scene of that character through the
IP-Adapter (conditioning/ip_adapter.py).

Each character a scene lists that has no `reference` image in the shotlist's character sheet
first gets a portrait: `consistency.portrait` filled with its name and description, in the
run's style and negatives, from its own seed (derived from the run seed and the name, as a
scene's is). The portrait is a keyframe of its own (`keyframes/000_character-<name>_t1.png`,
scene id `character-<name>`): saved with its recipe, scored, in the manifest and MLflow.
Then every scene is shown the reference of the first character it lists: IP-Adapter takes one
image prompt per call here, and a shotlist says nothing of where in the frame each character
stands, which masked regions would need. Scenes without characters show their own `reference`
where they have one, else nothing (made before the adapter loads, as with consistency=none).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from keyframes.conditioning.base import register
from keyframes.conditioning.ip_adapter import IpAdapter
from keyframes.shotlist.jobs import ImageJob, derive_seed, safe_name
from keyframes.shotlist.load import Shotlist
from keyframes.shotlist.prompts import apply_style, combine_negatives


def portrait_jobs(
    shotlist: Shotlist, jobs: list[ImageJob], template: str, run
) -> dict[str, ImageJob]:
    """The portrait job of every character a scene lists without a reference of its own,
    numbered after the scenes' jobs."""
    listed = dict.fromkeys(name for scene in shotlist.scenes for name in scene.characters)
    sheet, settings = shotlist.characters, run.jobs
    wanted = [name for name in listed if not (name in sheet and sheet[name].reference)]
    negative = combine_negatives(None, settings.style_negative, settings.negative_preset)
    portraits = {}
    for number, name in enumerate(wanted):
        description = sheet[name].description if name in sheet else name
        text = template.replace("{name}", name).replace("{description}", description)
        scene_id = f"character-{safe_name(name)}"
        portraits[name] = ImageJob(
            index=len(jobs) + number,
            scene_index=0,
            scene_id=scene_id,
            take=1,
            seed=derive_seed(settings.seed, f"character:{name}"),
            description=description,
            scene_prompt=text,
            prompt=apply_style(settings.style_prompt, text),
            negative_prompt=negative,
            file=f"keyframes/000_{scene_id}_t1.png",
        )
    return portraits


@register("consistency", "character_ref")
class CharacterRef(IpAdapter):
    """consistency=character_ref: each scene sees its first character's reference portrait."""

    def prepare(self, jobs: list[ImageJob], shotlist: Shotlist) -> list[ImageJob]:
        self.check_model()
        self.portraits = portrait_jobs(shotlist, jobs, self.settings.portrait, self.run)
        scenes, sheet = {s.id: s for s in shotlist.scenes}, shotlist.characters
        self.first = {}  # job index -> the character whose reference it is shown
        planned = []
        for job in jobs:
            scene = scenes[job.scene_id]
            name = next(iter(scene.characters), None)
            given = sheet[name].reference if name in sheet else None
            self.first[job.index] = name
            planned.append(replace(job, reference=given or (None if name else scene.reference)))
        self.planned = planned + list(self.portraits.values())
        self.loaded = False
        return self.planned

    def reference_of(self, job: ImageJob) -> str | None:
        """The image prompt of a job as the manifest keeps it: a path given in the shotlist,
        or a portrait's file in the run folder."""
        name = self.first.get(job.index)
        if job.reference or name is None:
            return job.reference
        return self.portraits[name].file

    def stages(self, todo: list[ImageJob], planned: list[ImageJob], run_dir) -> list[list]:
        """The portraits and the jobs without an image prompt first, then the rest, each
        shown its reference (a portrait: from the run folder, where the first stage put it)."""
        shown = [replace(j, reference=self._resolved(j, run_dir)) for j in todo]
        return [[j for j in shown if j.reference is None], [j for j in shown if j.reference]]

    def _resolved(self, job: ImageJob, run_dir: Path) -> str | None:
        reference = self.reference_of(job)
        if reference is None or job.reference:
            return reference
        return str(Path(run_dir) / reference)

    def record(self, job: ImageJob) -> dict:
        return {"consistency": self.name, "consistency_reference": self.reference_of(job)}

    def references(self) -> dict[str, str]:
        return {name: job.file for name, job in self.portraits.items()}

    def run_record(self) -> dict:
        return {"character_references": {n: j.file for n, j in self.portraits.items()}}
