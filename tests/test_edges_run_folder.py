"""A run folder after a crash, a kill or a careless hand: what resume, the contact sheet and
sync make of cut journal lines, damaged or missing keyframes, temporary leftovers, records that
point outside the folder, and manifests written by earlier versions. Finished work is kept,
nothing is made twice, and nothing outside the folder is read."""

import json
import os
import shutil
from pathlib import Path

from mlflow.tracking import MlflowClient
from PIL import Image

from keyframes.outputs.contact_sheet import write_contact_sheets
from keyframes.outputs.files import whole_png
from keyframes.outputs.manifest import journal_of, load_manifest
from keyframes.sync import main as sync_main
from tests.conftest import read_manifest
from tests.helpers import SMALL, store_runs

QUICK = (*SMALL, "scorer=none", "speed.warm_up=false")  # what these tests read needs no scores


def artifact_names(uri: str, run_id: str) -> list[str]:
    client = MlflowClient(uri)
    names, folders = [], [None]
    while folders:
        for item in client.list_artifacts(run_id, folders.pop()):
            (folders if item.is_dir else names).append(item.path)
    return sorted(names)


def test_a_journal_line_cut_inside_a_character_loses_only_that_line(cli_in_process, tmp_path):
    """A kill in the middle of appending a record with non-ASCII text: the line before and the
    manifest itself are kept (a whole-file decode used to throw all 7 records away)."""
    code, err, run_dir, _ = cli_in_process(*QUICK)
    assert code == 0, err[-2000:]
    manifest = read_manifest(run_dir)
    records = manifest["images"]
    for record in records:
        record["scene_extra"] = {"note": "Mära’s café – 朝"}  # multi-byte characters
    manifest["images"], manifest["run"]["status"] = [], "running"
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    lines = [json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records]
    last = lines[-1]
    cut = last.index("朝".encode()) + 1  # inside the 3-byte character
    journal_of(run_dir / "manifest.json").write_bytes(b"".join(lines[:-1]) + last[:cut])

    assert len(load_manifest(run_dir / "manifest.json").images) == 6
    assert sync_main([str(run_dir), "--tracking-uri", f"sqlite:///{tmp_path / 'a.db'}"]) == 0

    mtimes = {p: p.stat().st_mtime_ns for p in (run_dir / "keyframes").glob("*.png")}
    code, err, _, _ = cli_in_process(*QUICK, run_dir=run_dir)
    assert code == 0, err[-2000:]
    assert "6 of 7 images already done" in (run_dir / "run.log").read_text()
    remade = [p for p, t in mtimes.items() if p.stat().st_mtime_ns != t]
    assert [p.name for p in remade] == [Path(records[-1]["file"]).name]


def test_a_damaged_or_missing_keyframe_is_made_again_and_nothing_else(cli_in_process):
    code, err, run_dir, store = cli_in_process(*QUICK)
    assert code == 0, err[-2000:]
    [first] = store_runs(store)
    files = [run_dir / r["file"] for r in read_manifest(run_dir)["images"]]
    os.truncate(files[1], 500)  # `truncate -s 500`: on record, unreadable
    files[2].unlink()  # on record, gone
    (run_dir / "keyframes" / f".{files[3].name}.tmp").write_bytes(b"\x89PNG half")  # a kill's
    mtimes = {p: p.stat().st_mtime_ns for p in files if p.exists()}

    code, err, _, _ = cli_in_process(*QUICK, run_dir=run_dir)
    assert code == 0, err[-2000:]
    assert "5 of 7 images already done" in (run_dir / "run.log").read_text()
    assert all(whole_png(p) for p in files)
    assert [p for p, t in mtimes.items() if p.stat().st_mtime_ns != t] == [files[1]]
    manifest = read_manifest(run_dir)
    assert manifest["run"]["status"] == "finished" and len(manifest["images"]) == 7
    [run] = store_runs(store)  # logged anew (its images changed), not beside the first
    assert run.info.status == "FINISHED" and run.data.metrics["images"] == 7
    assert run.info.run_id != first.info.run_id
    uploaded = artifact_names(f"sqlite:///{store}", run.info.run_id)
    assert [n for n in uploaded if n.startswith("keyframes/")] == [
        f"keyframes/{p.name}" for p in files
    ]  # the temporary leftover is not a keyframe


def test_the_contact_sheet_draws_a_damaged_keyframe_as_a_cell_saying_so(cli_in_process):
    code, err, run_dir, _ = cli_in_process(*QUICK)
    assert code == 0, err[-2000:]
    manifest = load_manifest(run_dir / "manifest.json")
    os.truncate(run_dir / manifest.images[0].file, 500)
    (run_dir / "contact_sheet.png").unlink()
    [sheet] = write_contact_sheets(run_dir, manifest.images, "t", 64, 64)
    with Image.open(sheet) as image:
        first_cell = image.convert("RGB").crop((8, 34, 72, 98))
    # the dark red of a cell that says why it holds no picture, not a keyframe's noise
    assert first_cell.getpixel((60, 60)) == (60, 20, 20)


def test_sync_uploads_nothing_from_outside_the_folder_and_no_temporary_file(
    cli_in_process, tmp_path
):
    code, err, run_dir, _ = cli_in_process(*QUICK)
    assert code == 0, err[-2000:]
    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir()
    shutil.copyfile(run_dir / read_manifest(run_dir)["images"][0]["file"], secret)
    manifest = read_manifest(run_dir)
    stolen = dict(manifest["images"][0], index=7, file="../outside/secret.png", scene_id="x")
    absolute = dict(stolen, index=8, file=str(secret), scene_id="y")
    manifest["images"] += [stolen, absolute]
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    (run_dir / "keyframes" / ".008_y_t1.png.tmp").write_bytes(b"\x89PNG half")
    (run_dir / ".hydra").mkdir(exist_ok=True)
    (run_dir / ".hydra" / ".config.yaml.tmp").write_text("half")

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    assert sync_main([str(run_dir), "--tracking-uri", uri]) == 0
    [run] = store_runs(tmp_path / "store.db")
    uploaded = artifact_names(uri, run.info.run_id)
    assert not [n for n in uploaded if "secret" in n or n.endswith(".tmp")], uploaded
    assert len([n for n in uploaded if n.startswith("keyframes/")]) == 7
    assert run.data.metrics["images"] == 7


def test_a_manifest_of_an_earlier_version_syncs_once(cli_in_process, tmp_path, capsys):
    """Written before run keys and experiments were recorded: logged under the experiment its
    config names, and the second sync finds the first one's run."""
    code, err, run_dir, _ = cli_in_process(*QUICK)
    assert code == 0, err[-2000:]
    manifest = read_manifest(run_dir)
    for key in ("run_key", "experiment", "mlflow"):
        manifest["run"].pop(key, None)
    (run_dir / "manifest.json").write_text(json.dumps(manifest))

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    assert sync_main([str(run_dir), "--tracking-uri", uri]) == 0
    assert sync_main([str(run_dir), "--tracking-uri", uri]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("already logged")
    [run] = store_runs(tmp_path / "store.db")
    assert MlflowClient(uri).get_experiment(run.info.experiment_id).name == "smoke"
    assert read_manifest(run_dir)["run"]["run_key"]  # written back for the next sync
