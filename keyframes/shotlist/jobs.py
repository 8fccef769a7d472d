"""Turn a shotlist and settings into one job per image: prompts, seed, file name. Pure."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

from keyframes.config.schema import MAX_SEED
from keyframes.errors import ConfigError
from keyframes.shotlist.load import Shotlist
from keyframes.shotlist.prompts import apply_style, combine_negatives, scene_prompt


@dataclass(frozen=True)
class ImageJob:
    index: int  # position in the run, 0-based; the MLflow step
    scene_index: int  # position of the scene in the shotlist, 1-based
    scene_id: str
    take: int  # 1-based
    seed: int
    description: str  # what the shotlist asked for (scored separately)
    scene_prompt: str  # before the style
    prompt: str  # final, styled
    negative_prompt: str
    file: str  # relative to the run directory
    control: tuple[str, str] | None = None  # the scene's (type, image path) ControlNet input
    reference: str | None = None  # consistency=ip_adapter: the image prompt of this image


@dataclass(frozen=True)
class JobSettings:
    """What a run's jobs take from its settings (the recipe fills it from the plan)."""

    style_prompt: str = "{prompt}"  # the style template
    style_negative: str = ""
    negative_preset: str = ""
    seed: int = 0
    seed_mode: str = "derived"  # derived: per scene from seed + scene id | fixed
    takes: int = 1  # images per scene, unless a scene says
    max_images: int = 10_000  # a run of more is refused before any job is built


def derive_seed(run_seed: int, scene_id: str) -> int:
    """Stable per-scene seed: inserting or reordering scenes leaves other scenes' seeds alone."""
    digest = hashlib.sha256(f"{run_seed}:{scene_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def scene_seed(run_seed: int, seed_mode: str, scene_id: str, own_seed: int | None) -> int:
    if own_seed is not None:
        return own_seed
    return run_seed if seed_mode == "fixed" else derive_seed(run_seed, scene_id)


WINDOWS_RESERVED = {
    "con",
    "prn",
    "aux",
    "nul",
    *(f"com{i}" for i in range(10)),
    *(f"lpt{i}" for i in range(10)),
}


def safe_name(text: str, max_len: int = 48) -> str:
    """File-system-safe fragment: letters, digits, '-' and '_' only; never a path, never '..',
    never a name Windows reserves, never longer than max_len."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-_")[:max_len].strip("-_")
    if name.lower() in WINDOWS_RESERVED:
        name += "_"
    return name or "scene"


def unique_safe_names(ids: list[str]) -> dict[str, str]:
    """safe_name of each id; ids that clean up to the same name (also only in case: file
    systems that ignore it) get -2, -3, ... suffixes."""
    return dict(zip(ids, make_unique([safe_name(i) for i in ids], fold=str.lower), strict=True))


def make_unique(names: list[str], fold: Callable[[str], str] = lambda name: name) -> list[str]:
    """The names in order, each one that is already taken (compared after `fold`) with -2,
    -3, ... added. Linear: 10,000 ids that all clean up to one name cost no more than 10,000
    different ones."""
    taken: set[str] = set()
    last: dict[str, int] = {}  # per name: the suffix number it reached
    out = []
    for base in names:
        name, n = base, last.get(fold(base), 1)
        while fold(name) in taken:
            n += 1
            name = f"{base}-{n}"
        last[fold(base)] = n
        taken.add(fold(name))
        out.append(name)
    return out


def plan_jobs(
    shotlist: Shotlist,
    style_prompt: str,
    style_negative: str,
    negative_preset: str,
    run_seed: int,
    seed_mode: str,
    takes: int,
) -> list[ImageJob]:
    jobs = []
    names = unique_safe_names([scene.id for scene in shotlist.scenes])
    for scene_index, scene in enumerate(shotlist.scenes, start=1):
        base = scene_prompt(scene, shotlist.characters)
        prompt = apply_style(style_prompt, base)
        negative = combine_negatives(scene.negative_prompt, style_negative, negative_preset)
        seed = scene_seed(run_seed, seed_mode, scene.id, scene.seed)
        for take in range(1, (scene.takes or takes) + 1):
            jobs.append(
                ImageJob(
                    index=len(jobs),
                    scene_index=scene_index,
                    scene_id=scene.id,
                    take=take,
                    seed=(seed + take - 1) % (MAX_SEED + 1),
                    description=scene.description,
                    scene_prompt=base,
                    prompt=prompt,
                    negative_prompt=negative,
                    file=f"keyframes/{scene_index:03d}_{names[scene.id]}_t{take}.png",
                    control=(scene.control["type"], scene.control["image"])
                    if scene.control
                    else None,
                )
            )
    return jobs


def image_count(shotlist: Shotlist, takes: int) -> int:
    """How many images a run makes: each scene's takes (its own, else the run's)."""
    return sum(scene.takes or takes for scene in shotlist.scenes)


def plan_for(shotlist: Shotlist, settings: JobSettings) -> list[ImageJob]:
    """plan_jobs with the run's style, negative preset, seeds and takes. Refuses, before
    building anything, a run of more than settings.max_images images."""
    total = image_count(shotlist, settings.takes)
    if total > settings.max_images:
        raise ConfigError(
            f"this run would make {total:,} images ({len(shotlist.scenes):,} scenes and their "
            f"takes); the limit is max_images={settings.max_images}. If that many is meant, "
            f"raise it: max_images={total}"
        )
    return plan_jobs(
        shotlist,
        style_prompt=settings.style_prompt,
        style_negative=settings.style_negative,
        negative_preset=settings.negative_preset,
        run_seed=settings.seed,
        seed_mode=settings.seed_mode,
        takes=settings.takes,
    )


def cycle_jobs(jobs: list[ImageJob], count: int) -> list[ImageJob]:
    """`count` jobs going round `jobs` again and again, each round with the next seeds (for
    benchmarks that need more images than the shotlist has)."""
    return [
        replace(jobs[i % len(jobs)], index=i, seed=jobs[i % len(jobs)].seed + i // len(jobs))
        for i in range(count)
    ]


def reference_job(jobs: list[ImageJob], scene_id: str | None) -> ImageJob:
    """The first take of the named scene (default: the first scene): the image every other
    one is aligned to under consistency=style_aligned."""
    if scene_id is None:
        return jobs[0]
    for job in jobs:
        if job.scene_id == scene_id:
            return job
    known = ", ".join(dict.fromkeys(job.scene_id for job in jobs))
    raise ConfigError(f"consistency.reference={scene_id}: no such scene (scenes: {known})")
