import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from keyframes.config.schema import ScorerConfig
from keyframes.outputs.contact_sheet import contact_sheet
from keyframes.outputs.manifest import load_manifest, write_manifest
from keyframes.outputs.png import a1111_parameters, read_png_metadata, save_png
from keyframes.outputs.records import Manifest
from keyframes.scoring.clip import load_scorer
from tests.helpers import image_record, run_record

RECORD = image_record(
    prompt="film still, a harbor",
    negative_prompt="blurry, text",
    steps=30,
    sampler_label="DPM++ 2M Karras",
    cfg_scale=7.0,
    seed=123,
    width=1344,
    height=768,
    model="sdxl_base",
    style="cinematic",
)


def test_parameters_follow_the_automatic1111_layout():
    assert a1111_parameters(RECORD) == (
        "film still, a harbor\n"
        "Negative prompt: blurry, text\n"
        "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 123, Size: 1344x768, "
        "Model: sdxl_base, Style: cinematic"
    )
    assert "Negative prompt" not in a1111_parameters(replace(RECORD, negative_prompt=""))
    assert "CFG scale: 5.5," in a1111_parameters(replace(RECORD, cfg_scale=5.5))


def test_png_carries_both_metadata_chunks_and_leaves_no_temp_file(tmp_path):
    image = Image.fromarray(np.full((8, 16, 3), 200, np.uint8))
    path = tmp_path / "keyframes" / "001_a_t1.png"
    save_png(
        image, path, RECORD, {"record": RECORD.to_json(), "scene": {"id": "a", "mood": "café"}}
    )
    text = read_png_metadata(path)
    assert text["parameters"] == a1111_parameters(RECORD)
    assert json.loads(text["keyframes"])["scene"]["mood"] == "café"
    assert np.asarray(Image.open(path)).tolist() == np.asarray(image).tolist()
    assert [p.name for p in path.parent.iterdir()] == ["001_a_t1.png"]


def test_manifest_has_run_and_images(tmp_path):
    run, image = run_record(title="T"), image_record(scene_id="a", method_field=[1])
    path = write_manifest(tmp_path, Manifest(run, [image]))
    assert json.loads(path.read_text()) == {
        "version": 1,
        "run": run.to_json(),
        "images": [image.to_json()],
    }
    assert json.loads(path.read_text())["run"]["title"] == "T"
    assert json.loads(path.read_text())["images"][0]["scene_id"] == "a"
    # read back typed, a field this version does not know kept as it was
    assert load_manifest(path) == Manifest(run, [image])
    assert load_manifest(path).images[0].extra == {"method_field": [1]}


def test_contact_sheet_is_a_labelled_grid():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    images = [Image.new("RGB", (160, 90), c) for c in colours]
    sheet = contact_sheet(images, [f"scene {i}" for i in range(5)], "Title", thumb_width=160)
    pad, title_h, label_h = 8, 34, 22
    assert sheet.width == 4 * (160 + pad) + pad  # four columns
    assert sheet.height == title_h + 2 * (90 + label_h + pad) + pad  # two rows
    assert sheet.getpixel((pad + 80, title_h + 45)) == (255, 0, 0)
    assert sheet.getpixel((pad + 168 + 80, title_h + 45)) == (0, 255, 0)
    assert sheet.getpixel((pad + 80, title_h + 90 + label_h + pad + 45)) == (0, 255, 255)
    label_strip = np.asarray(sheet.crop((pad, title_h + 92, pad + 160, title_h + 90 + label_h)))
    assert label_strip.max() > 150  # the label text is drawn


def test_tiny_scorer_scores_in_range_and_flags_truncation():
    scorer = load_scorer(ScorerConfig(name="tiny", model="tiny"), "cpu")
    images = [Image.new("RGB", (64, 36), (i * 40, 90, 200)) for i in range(3)]
    texts = ["a harbor", "a red door", "word " * 90]
    (scores,) = scorer.score(images, texts)
    assert all(0 <= s.score <= 100 for s in scores)
    assert [s.truncated for s in scores] == [False, False, True]
    assert [s.score for s in scores] == [s.score for s in scorer.score(images, texts)[0]]
    # two text lists in one call (another batch: equal within float noise, not to the bit)
    both, reversed_texts = scorer.score(images, texts, texts[::-1])
    assert [s.score for s in both] == pytest.approx([s.score for s in scores], abs=1e-3)
    assert reversed_texts[1].score == pytest.approx(scores[1].score, abs=1e-3)
    assert [s.truncated for s in reversed_texts] == [True, False, False]


def test_a_keyframe_is_encoded_once_for_its_scores_and_the_runs_consistency(tmp_path):
    scorer = load_scorer(ScorerConfig(name="tiny", model="tiny"), "cpu")
    encoded = []
    encode = scorer.model.encode_image
    scorer.model.encode_image = lambda pixels: encoded.append(len(pixels)) or encode(pixels)
    images = [Image.new("RGB", (64, 36), (i * 40, 90, 200)) for i in range(3)]
    scorer.score(images, ["a", "b", "c"], ["d", "e", "f"])
    for n, image in enumerate(images):
        image.save(tmp_path / f"{n}.png")
    from_disk = [Image.open(tmp_path / f"{n}.png") for n in range(3)]  # the same pixels
    features = scorer.image_features(from_disk)
    assert encoded == [3]  # one pass, for both texts and the consistency
    scorer.image_features([Image.new("RGB", (64, 36), (1, 2, 3))])
    assert encoded == [3, 1]  # a new picture is encoded
    assert torch.allclose(features.norm(dim=-1), torch.ones(3))


def test_scorer_none_turns_scoring_off():
    assert load_scorer(ScorerConfig(name="none"), "cpu") is None


def test_real_scorer_refuses_pickle_weights(tmp_path):
    from keyframes.errors import ModelUnavailableError

    weights = tmp_path / "clip.bin"
    weights.write_bytes(b"x")
    with pytest.raises(ModelUnavailableError, match="only .safetensors"):
        load_scorer(ScorerConfig(name="clip", model="ViT-L-14", pretrained=str(weights)), "cpu")


def test_two_line_labels_fit_a_256_px_thumbnail():
    """The smoke run's thumbnails are 256 px wide: scene, seed and CLIP score must all show."""
    from PIL import ImageDraw

    from keyframes.outputs.contact_sheet import _label, fit_text, load_font

    record = image_record(
        scene_index=1, scene_id="opening", take=1, seed=4064471231, clip_score=23.41
    )
    draw, font = ImageDraw.Draw(Image.new("RGB", (1, 1))), load_font(14)
    lines = _label(record).split("\n")
    assert lines == ["01 opening t1", "seed 4064471231 · CLIP 23.4"]
    assert all(fit_text(draw, line, font, 256 - 4) == line for line in lines)  # nothing cut


def test_a_long_run_gets_contact_sheet_pages_a_viewer_can_open(tmp_path):
    from keyframes.outputs.contact_sheet import write_contact_sheets

    (tmp_path / "keyframes").mkdir()
    records = []
    for i in range(130):
        file = f"keyframes/{i:03d}.png"
        Image.new("RGB", (64, 36), (i, 80, 160)).save(tmp_path / file)
        records.append(
            image_record(
                scene_index=i + 1,
                scene_id=f"s{i}",
                take=1,
                seed=i,
                clip_score=None,
                status="ok",
                file=file,
            )
        )
    (tmp_path / "contact_sheet_009.png").write_bytes(b"a page of an earlier, longer run")
    pages = write_contact_sheets(tmp_path, records, "Title", 64, 36)
    assert [p.name for p in pages] == [
        "contact_sheet.png",
        "contact_sheet_002.png",
        "contact_sheet_003.png",
    ]
    assert sorted(p.name for p in tmp_path.glob("contact_sheet*")) == [p.name for p in pages]
    first, last = Image.open(pages[0]), Image.open(pages[2])
    assert first.width == 8 * (64 + 8) + 8  # 8 columns from 17 keyframes on
    assert first.height == 34 + 8 * (36 + 40 + 8) + 8  # 64 a page: 8 rows of two-line labels
    assert last.height == 34 + 1 * (36 + 40 + 8) + 8  # the last 2
    assert first.getpixel((8 + 32, 34 + 18)) == (0, 80, 160)  # keyframe 0, top left


def test_quoted_library_errors_end_on_a_whole_word():
    from keyframes.errors import first_line

    line = first_line(OSError("Cannot load model " + "stabilityai/stable-diffusion " * 30))
    assert line.endswith("stabilityai/stable-diffusion …") and len(line) <= 302
    assert first_line(OSError("short\nsecond line")) == "short"


def test_manifest_bookkeeping_grows_linearly_and_a_kill_loses_nothing(tmp_path):
    """2,000 images one per batch: the full manifest is rewritten 10 times (each time the
    image count doubles), not 2,000 times; the journal holds the rest, read back by load_manifest."""
    from keyframes.outputs.manifest import ManifestWriter, journal_of

    path, writer, full_writes = tmp_path / "manifest.json", None, 0
    writer = ManifestWriter(path)
    writer.full(run_record(status="running"), [])
    images = []
    for i in range(2000):
        images.append(image_record(index=i, file=f"keyframes/{i:04d}.png", prompt="p" * 200))
        if writer.due(len(images)):
            writer.full(run_record(status="running"), images)
            full_writes += 1
        else:
            writer.append(images[-1:])
    assert full_writes == 10  # at 2, 4, 8, ..., 1024 images
    assert len(json.loads(path.read_text())["images"]) == 1024
    with open(journal_of(path), "a") as f:
        f.write('{"index": 2000, "file": "keyframes/20')  # a line cut off by SIGKILL
    doc = load_manifest(path)
    assert [r.index for r in doc.images] == list(range(2000))
    writer.full(run_record(status="finished"), images)  # the end: one manifest, no journal
    assert not journal_of(path).exists() and load_manifest(path).run.status == "finished"


def test_a_runs_memory_speed_and_sweep_are_typed_records_with_the_same_json():
    """Read by attribute (a misspelt one fails), written back as the manifest always had them;
    a key this version does not know is kept, and an older sweep record lacks swept_keys."""
    memory = {
        "requested": "auto",
        "mode": "balanced",
        "reason": "fits",
        "free_vram_gb": 23.5,
        "estimate_gb": 9.7,
    }
    speed = {"preset": "compile", "compile": "unet + vae decoder", "tf32": True, "new": 1}
    sweep = {
        "parent_run_id": "p",
        "experiment": "e",
        "sweep_dir": "/s",
        "job_num": 2,
        "swept_keys": ["steps"],
    }
    run = run_record(memory=memory, speed=speed, sweep=sweep)
    assert (run.memory.mode, run.speed.compile, run.sweep.job_num) == (
        "balanced",
        speed["compile"],
        2,
    )
    assert run.speed.extra == {"new": 1} and run.speed.fuse_qkv is None
    data = run.to_json()
    assert (data["memory"], data["speed"], data["sweep"]) == (memory, speed, sweep)
    older = run_record(sweep={k: v for k, v in sweep.items() if k != "swept_keys"})
    assert older.sweep.swept_keys == [] and older.to_json()["sweep"]["swept_keys"] == []
    with pytest.raises(TypeError):
        run.memory["mode"]  # noqa: B018 - the dict of before
