"""Every path of this repository that the README, docs/ and the config comments name exists:
a module moved or renamed without its mentions fails here. The README stays short."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATH = re.compile(r"(?<![\w/.-])((?:keyframes|conf|docs|scripts|tests)/[\w./*<>{}-]*[\w*/])")
RUN_FOLDER_PNG = re.compile(r"keyframes/\d{3}_")  # a run folder's keyframes/, not the package


def named_paths(text: str) -> set[str]:
    found = set()
    for match in PATH.finditer(text):
        path = match.group(1).rstrip(".").split("::")[0]
        if not ({"<", "{"} & set(path)) and not RUN_FOLDER_PNG.match(path):
            found.add(path)
    return found


def comments(yaml: Path) -> str:
    return "\n".join(line.split("#", 1)[1] for line in yaml.read_text().splitlines() if "#" in line)


def sources() -> dict[str, str]:
    texts = {"README.md": (ROOT / "README.md").read_text()}
    texts |= {str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))}
    texts |= {
        str(p.relative_to(ROOT)): comments(p) for p in sorted((ROOT / "conf").rglob("*.yaml"))
    }
    return texts


def test_every_path_the_docs_and_config_comments_name_exists():
    missing = {
        f"{where}: {path}"
        for where, text in sources().items()
        for path in named_paths(text)
        if not (any(ROOT.glob(path)) if "*" in path else (ROOT / path).exists())
    }
    assert sorted(missing) == []


def test_the_check_finds_a_stale_path_and_skips_placeholders():
    text = "see keyframes/memory.py, conf/model/tiny.yaml, keyframes/data/<name>/ and keyframes/001_a.png"
    assert named_paths(text) == {"keyframes/memory.py", "conf/model/tiny.yaml"}
    assert not (ROOT / "keyframes/memory.py").exists()  # the old place of pipeline/memory.py


def test_the_readme_is_short_and_links_every_doc():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for doc in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{doc.name})" in readme, doc.name
