"""Several processes (accelerate launch), one run: each writes its own manifest part; the main
process merges them into manifest.json at the end."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from keyframes.outputs.manifest import journal_of, load_manifest, write_manifest
from keyframes.outputs.processes import PART_GLOB, Processes
from keyframes.outputs.records import Manifest

log = logging.getLogger("keyframes")


def merge_parts(run_dir: Path, processes: Processes, manifest: Manifest) -> Manifest:
    """Main process: the images and fallbacks of every process's manifest part added to this
    process's `manifest`, written as the run's manifest.json; the parts are removed once it
    holds them. Returns the merged manifest (`manifest` itself when there are no parts)."""
    parts = sorted(run_dir.glob(PART_GLOB))
    if not parts:
        return manifest
    records = {r.index: r for r in manifest.images}
    fallbacks = list(manifest.run.fallbacks)
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
    run = replace(manifest.run, fallbacks=fallbacks, processes=processes.count)
    merged = Manifest(run, [records[i] for i in sorted(records)])
    write_manifest(run_dir, merged)
    for part in parts:
        part.unlink()
        journal_of(part).unlink(missing_ok=True)
    return merged
