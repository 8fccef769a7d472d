"""consistency=character_ref on the tiny model with the tiny IP-Adapter replica: one reference
portrait per character that has none, recorded like a keyframe, and the right reference shown
to every scene, checked at the IP-Adapter's input."""

import json

import pytest
from PIL import Image

from keyframes.conditioning import ip_adapter
from keyframes.generation.recipe import KeyframesRecipe, RunPlace
from keyframes.outputs.png import read_png_metadata
from keyframes.pipeline import replicas
from tests.helpers import SMALL, settings, tiny_pipe, write_json

SCENES = [
    ("cliff", []),
    ("lamp", ["Mara"]),
    ("kitchen", ["Ilo"]),
    ("rescue", ["Ilo", "Mara"]),
    ("boat", []),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A character_ref run: Mara has no reference (a portrait is made), Ilo has one."""
    folder = tmp_path_factory.mktemp("character_ref")
    Image.new("RGB", (64, 64), (20, 60, 220)).save(folder / "ilo.png")
    Image.new("RGB", (64, 64), (200, 40, 40)).save(folder / "sea.png")
    scenes = [{"id": i, "description": f"the {i}", "characters": c} for i, c in SCENES]
    scenes[-1]["reference"] = "sea.png"  # a scene without characters, with its own image
    characters = {
        "Mara": "an old woman in a yellow oilskin",
        "Ilo": {"description": "a boy in a red scarf", "reference": "ilo.png"},
    }
    shots = write_json(
        folder / "shots.json", {"title": "t", "characters": characters, "scenes": scenes}
    )
    overrides = [
        "experiment=smoke",
        f"shotlist={shots}",
        *SMALL,
        "steps=3",
        "consistency=character_ref",
        f"consistency.ip_adapter_path={folder}",
        "consistency.ip_adapter_subfolder=models",
        "consistency.ip_adapter_weight=ip.safetensors",
    ]
    replicas.save_tiny_ip_adapter(folder, tiny_pipe().unet, "models", "ip.safetensors")
    recipe = KeyframesRecipe().setup(settings(*overrides), announce=False)
    shown = []  # (scene ids of a call, the image prompt it got)
    original = ip_adapter.ImagePrompt.call

    def call(self, pipe, batch, conditioning, arguments):
        out = original(self, pipe, batch, conditioning, arguments)
        shown.append(([job.scene_id for job in batch], batch[0].reference))
        return out

    ip_adapter.ImagePrompt.call = call
    try:
        (folder / "run").mkdir()
        result = recipe.generate(RunPlace(folder / "run"))
    finally:
        ip_adapter.ImagePrompt.call = original
    return folder, result, shown


def test_one_portrait_for_the_character_without_a_reference(run):
    folder, result, _ = run
    records = {r.scene_id: r for r in result.images}
    assert set(records) == {*(i for i, _ in SCENES), "character-Mara"}
    portrait = records["character-Mara"]
    assert portrait.ok and portrait.file == "keyframes/000_character-Mara_t1.png"
    assert "an old woman in a yellow oilskin" in portrait.prompt and "full-body" in portrait.prompt
    assert portrait.description == "an old woman in a yellow oilskin"  # what CLIP scores
    # saved and recorded like a keyframe: its PNG carries its recipe
    meta = read_png_metadata(folder / "run" / portrait.file)
    assert json.loads(meta["keyframes"])["record"]["seed"] == portrait.seed
    manifest = json.loads((folder / "run" / "manifest.json").read_text())
    assert manifest["run"]["character_references"] == {"Mara": portrait.file}


def test_each_scene_is_shown_its_first_character_reference(run):
    folder, result, shown = run
    by_scene = {scene: ref for scenes, ref in shown for scene in scenes}
    portrait = str(folder / "run" / "keyframes" / "000_character-Mara_t1.png")
    assert by_scene == {
        "lamp": portrait,  # Mara: her portrait, made first
        "kitchen": str((folder / "ilo.png").resolve()),  # Ilo's own reference wins
        "rescue": str((folder / "ilo.png").resolve()),  # the first character listed
        "boat": str((folder / "sea.png").resolve()),  # no character: the scene's own image
    }
    # the scene without characters nor image, and the portrait, had no image prompt
    records = {r.scene_id: r for r in result.images}
    assert records["cliff"].consistency_reference is None
    assert records["character-Mara"].consistency_reference is None
    assert records["lamp"].consistency_reference == "keyframes/000_character-Mara_t1.png"
    assert all(r.consistency == "character_ref" for r in result.images)
