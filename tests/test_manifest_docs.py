"""docs/manifest.md documents exactly the fields of the typed records the manifest is written
from: a field added to RunInfo or ImageRecord without a line in the docs (or a documented key
that no longer exists) fails here."""

import re
from dataclasses import fields
from pathlib import Path

from keyframes.outputs.records import ImageRecord, RunInfo

DOCS = Path(__file__).resolve().parent.parent / "docs" / "manifest.md"


def documented_keys(section: str) -> set[str]:
    """The backticked keys in the first column of the table under `## <section>`."""
    text = DOCS.read_text(encoding="utf-8")
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    keys = set()
    for line in body.splitlines():
        if line.startswith("| `"):
            first_cell = re.split(r"(?<!\\)\|", line)[1]  # a cell may hold an escaped \|
            keys |= set(re.findall(r"`([a-z_0-9]+)`", first_cell))
    return keys


def record_fields(cls) -> set[str]:
    return {f.name for f in fields(cls)} - {"extra"}


def test_every_image_record_field_is_documented_and_nothing_else():
    assert documented_keys("`images[]`") == record_fields(ImageRecord)


def test_every_run_field_is_documented_and_nothing_else():
    assert documented_keys("`run`") == record_fields(RunInfo)
