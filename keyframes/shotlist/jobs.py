"""Turn a shotlist and settings into one job per image: prompts, seed, file name. Pure."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from keyframes.config.schema import MAX_SEED, Config
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


def make_unique(names: list[str], fold=lambda name: name) -> list[str]:
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


def plan_for(cfg: Config, shotlist: Shotlist, takes: int | None = None) -> list[ImageJob]:
    """plan_jobs with the run's style, negative preset and seeds (takes: cfg.takes unless
    given). Refuses, before building anything, a run of more than cfg.max_images images."""
    takes = cfg.takes if takes is None else takes
    total = image_count(shotlist, takes)
    if total > cfg.max_images:
        raise ConfigError(
            f"this run would make {total:,} images ({len(shotlist.scenes):,} scenes and their "
            f"takes); the limit is max_images={cfg.max_images}. If that many is meant, raise "
            f"it: max_images={total}"
        )
    return plan_jobs(
        shotlist,
        style_prompt=cfg.style.prompt,
        style_negative=cfg.style.negative_prompt,
        negative_preset=cfg.negative.prompt,
        run_seed=cfg.seed,
        seed_mode=cfg.seed_mode,
        takes=takes,
    )


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
