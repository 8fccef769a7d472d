"""Several processes (accelerate launch), one run: each writes its own manifest part; the main
process merges them into manifest.json at the end."""

from __future__ import annotations

import logging
from pathlib import Path

from keyframes.outputs.manifest import journal_of, load_manifest
from keyframes.outputs.processes import PART_GLOB, Processes

log = logging.getLogger("keyframes")


def merge_parts(run_dir: Path, processes: Processes, result) -> None:
    """Main process: the images and fallbacks of every process's manifest part into the run's
    manifest; the parts are removed once manifest.json holds them."""
    parts = sorted(run_dir.glob(PART_GLOB))
    if not parts:
        return
    records = {r.index: r for r in result.images}
    fallbacks = list(result.run.fallbacks)
    for part in parts:
        try:
            doc = load_manifest(part)
        except (OSError, ValueError):
            log.warning("%s is unreadable; its images are left out", part)
            continue
        for record in doc.images:  # this process's own records win over a leftover part's
            records.setdefault(record.index, record)
        if part.name != processes.part_name():
            fallbacks += doc.run.fallbacks
    result.images = [records[i] for i in sorted(records)]
    result.run.fallbacks = fallbacks
    result.run.processes = processes.count
    result.write_manifest()
    for part in parts:
        part.unlink()
        journal_of(part).unlink(missing_ok=True)
