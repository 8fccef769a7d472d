"""Whether a run directory may be continued with these settings: checked before anything loads.

A folder that already holds a run made with other settings is not silently overwritten: the
run stops, naming the settings that differ, unless `remake=true` asks for it to be made again
(its MLflow run is then replaced, not doubled).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from keyframes.config.plan import NOT_IN_HASH, config_hash, flatten
from keyframes.errors import ConfigError
from keyframes.outputs.files import keyframe_file
from keyframes.outputs.manifest import load_manifest, read_run
from keyframes.outputs.processes import manifest_paths
from keyframes.outputs.records import ImageRecord, RunInfo
from keyframes.shotlist.jobs import ImageJob

log = logging.getLogger("keyframes")


@dataclass(frozen=True)
class Earlier:
    """The run a folder already holds."""

    run: RunInfo  # its manifest's run record
    remade: bool  # remake=true: it is replaced, not continued


def earlier_run(run_dir: Path, resolved: dict[str, Any], remake: bool) -> Earlier | None:
    """The run already in run_dir (None: the folder is new). ConfigError when it was made with
    other settings and remake is false."""
    run = _manifest_run(run_dir)
    if run is None:
        return None
    if run.config_hash == config_hash(resolved):
        return Earlier(run, remade=False)
    if remake:
        return Earlier(run, remade=True)
    differ = _differences(run_dir / "config.yaml", resolved)
    raise ConfigError(
        f"{run_dir} holds a run made with other settings"
        + (":" if differ else " (its config.yaml is gone)."),
        differ
        + [
            "Use another folder (drop hydra.run.dir), put the settings back, or add remake=true "
            "to make this run again (its images are replaced)."
        ],
    )


def _manifest_run(run_dir: Path) -> RunInfo | None:
    return next(filter(None, map(read_run, manifest_paths(run_dir))), None)


def _differences(old_config: Path, resolved: dict[str, Any]) -> list[str]:
    try:
        old = OmegaConf.to_container(OmegaConf.load(old_config), resolve=True)
    except (OSError, ValueError):
        return []
    before, after = (
        {k: v for k, v in flatten(tree).items() if k.split(".")[0] not in NOT_IN_HASH}
        for tree in (old, resolved)
    )
    keys = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return [f"{k}: {before.get(k, '(unset)')} then, {after.get(k, '(unset)')} now" for k in keys]


def previous_images(
    run_dir: Path,
    jobs: list[ImageJob],
    earlier: Earlier | None,
    run: RunInfo,
    recipe: Callable[[ImageJob], dict[str, Any]],
) -> dict[int, ImageRecord]:
    """Records of a manifest already in the run directory whose PNG is whole and whose recipe
    matches the job: those images are not made again (a missing or damaged PNG is made again).
    A continued run keeps its first start time and key, so its MLflow run is replaced rather
    than doubled, also when no image was finished before it stopped; a remade run names the
    key of the run it replaces."""
    if earlier is not None and earlier.remade:
        run.replaces_run_key = earlier.run.run_key
        return {}
    if earlier is not None:
        run.started_at = earlier.run.started_at
        run.run_key = earlier.run.run_key or run.run_key
    old_images = {}
    for path in manifest_paths(run_dir):
        if not path.is_file():
            continue
        try:
            old_images |= {r.file: r for r in load_manifest(path).images if r.ok}
        except ValueError:
            log.warning("%s is unreadable; generating its images again", path)
    done = {}
    for job in jobs:
        record = old_images.get(job.file)
        if record is None or keyframe_file(run_dir, job.file) is None:
            continue
        fields = record.to_json()  # the method fields too, which live in `extra`
        if all(fields.get(k) == v for k, v in recipe(job).items()):
            done[job.index] = replace(record, index=job.index)
    return done
