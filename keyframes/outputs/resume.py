"""Whether a run directory may be continued with these settings: checked before anything loads.

A folder that already holds a run made with other settings is not silently overwritten: the
run stops, naming the settings that differ, unless `remake=true` asks for it to be made again
(its MLflow run is then replaced, not doubled).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from keyframes.config.schema import flatten
from keyframes.errors import ConfigError
from keyframes.outputs.processes import manifest_paths

# Settings that do not change what an existing image is: left out of the config hash that
# resume matches on, so a run that ran out of memory can go on with memory=low_vram, and a
# run can be given more takes (each image's own recipe is still checked).
NOT_IN_HASH = (
    "resume", "remake", "batch_size", "device", "mlflow", "memory", "speed", "takes", "objective",
)  # fmt: skip


def config_hash(resolved: dict[str, Any]) -> str:
    recipe = {k: v for k, v in resolved.items() if k not in NOT_IN_HASH}
    text = json.dumps(recipe, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Earlier:
    """The run a folder already holds."""

    run: dict[str, Any]  # its manifest's run record
    remade: bool  # remake=true: it is replaced, not continued


def earlier_run(run_dir: Path, resolved: dict[str, Any], remake: bool) -> Earlier | None:
    """The run already in run_dir (None: the folder is new). ConfigError when it was made with
    other settings and remake is false."""
    run = _manifest_run(run_dir)
    if run is None:
        return None
    if run.get("config_hash") == config_hash(resolved):
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


def _manifest_run(run_dir: Path) -> dict[str, Any] | None:
    for path in manifest_paths(run_dir):
        try:
            return json.loads(path.read_text())["run"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


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
