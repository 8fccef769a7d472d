"""consistency=story on the tiny model: anchors per character made together, their kept
tokens read by every later scene of that character, nothing shared with the others; the same
pixels again, after a kill and resume, and at another batch size."""

import json
from pathlib import Path

import pytest

from keyframes.conditioning.story import cast_of, choose_anchors, kept_tokens
from keyframes.errors import ConfigError
from keyframes.generation.recipe import KeyframesRecipe, RunPlace
from keyframes.outputs.processes import Processes
from keyframes.shotlist.jobs import plan_jobs
from keyframes.shotlist.load import load_shotlist
from tests.helpers import (
    FLOAT_NOISE,
    SMALL,
    assert_same_picture,
    killed_run,
    load_pixels,
    pixel_gap,
    settings,
    write_json,
)

# a1, a2 anchor A; b1, b2 anchor B; a3 reads A; n1 shows nobody
SCENES = [
    ("a1", ["A"]),
    ("n1", []),
    ("a2", ["A"]),
    ("b1", ["B"]),
    ("a3", ["A"]),
    ("b2", ["B"]),
]


def shots(folder: Path, seeds: dict[str, int] | None = None) -> Path:
    seeds = seeds or {}
    scenes = [
        {"id": i, "description": f"scene {i}", "characters": c, "seed": seeds.get(i, 10 + n)}
        for n, (i, c) in enumerate(SCENES)
    ]
    return write_json(
        folder / "shots.json",
        {
            "title": "t",
            "characters": {"A": "a tall woman in a red coat", "B": "a boy in a green cap"},
            "scenes": scenes,
        },
    )


def made(
    folder: Path, *overrides: str, seeds: dict[str, int] | None = None, processes=None
) -> dict:
    """{scene id: pixels} of an in-process run (no MLflow) into folder/run."""
    (folder / "run").mkdir(parents=True, exist_ok=True)
    path = shots(folder, seeds)
    cfg = settings(
        "experiment=smoke", f"shotlist={path}", *SMALL, "scorer=none", "steps=6", *overrides
    )
    recipe = KeyframesRecipe().setup(cfg, announce=False)
    result = recipe.generate(RunPlace(folder / "run", processes=processes or Processes()))
    return {r.scene_id: load_pixels(folder / "run" / r.file) for r in result.images}


STORY = ("consistency=story", "consistency.anchors=2")


def file_of(scene: str) -> str:
    number = [i for i, _ in SCENES].index(scene) + 1
    return f"{number:03d}_{scene}_t1.png"


def changed(a: dict, b: dict) -> set[str]:
    return {scene for scene in a if not (a[scene] == b[scene]).all()}


def test_anchors_are_chosen_per_character_alone_first_and_never_twice(tmp_path):
    shotlist = load_shotlist(str(shots(tmp_path)))
    jobs = plan_jobs(shotlist, "{prompt}", "", "", 1, "derived", 2)  # two takes each
    cast = cast_of(jobs, shotlist)
    anchors = choose_anchors(jobs, cast, 2)
    assert {n: [(j.scene_id, j.take) for j in js] for n, js in anchors.items()} == {
        "A": [("a1", 1), ("a2", 1)],
        "B": [("b1", 1), ("b2", 1)],
    }
    both = [("x", ["A", "B"]), ("y", ["A"]), ("z", ["B"]), ("w", ["A", "B"])]
    scenes = [{"id": i, "description": i, "characters": c} for i, c in both]
    characters = {"A": "a", "B": "b"}
    path = write_json(
        tmp_path / "both.json", {"title": "t", "characters": characters, "scenes": scenes}
    )
    shotlist = load_shotlist(str(path))
    jobs = plan_jobs(shotlist, "{prompt}", "", "", 1, "derived", 1)
    anchors = choose_anchors(jobs, cast_of(jobs, shotlist), 2)
    # A: y (alone) then x; B: z (alone) then w, x being A's already
    assert {n: [j.scene_id for j in js] for n, js in anchors.items()} == {
        "A": ["x", "y"],
        "B": ["z", "w"],
    }


def test_kept_tokens_are_a_seeded_share():
    drawn = kept_tokens(7, 3, 100, 0.5)
    assert len(drawn) == 50 and len(set(drawn.tolist())) == 50 and drawn.max() < 100
    assert (kept_tokens(7, 3, 100, 0.5) == drawn).all()
    assert not (kept_tokens(8, 3, 100, 0.5) == drawn).all()  # another anchor
    assert not (kept_tokens(7, 4, 100, 0.5) == drawn).all()  # another step


@pytest.fixture(scope="module")
def story_runs(tmp_path_factory):
    """The story run, the same run again, and with anchor a1's seed changed; likewise plain."""
    root = tmp_path_factory.mktemp("story")
    return {
        "story": made(root / "story", *STORY),
        "again": made(root / "again", *STORY),
        "story_a1": made(root / "story_a1", *STORY, seeds={"a1": 999}),
        "plain": made(root / "plain"),
        "plain_a1": made(root / "plain_a1", seeds={"a1": 999}),
    }


def test_an_anchor_seed_changes_its_character_scenes_and_nothing_else(story_runs):
    runs = story_runs
    # story: a1's co-anchor a2 and the reader a3 follow; B's scenes and n1 are the same bits
    assert changed(runs["story"], runs["story_a1"]) == {"a1", "a2", "a3"}
    # off: every scene on its own
    assert changed(runs["plain"], runs["plain_a1"]) == {"a1"}
    # scenes without a character are made as with consistency=none (another code path)
    assert_same_picture(runs["story"]["n1"], runs["plain"]["n1"], "n1")
    # and the sharing shows where it applies. The tiny random-weight UNet attends almost
    # uniformly, so the extra tokens move a pixel by one level at most; the share of values
    # they move is what shows: 12-18 % at 6 steps, 25 times CPU float noise at least.
    for scene in ("a1", "a2", "a3", "b1", "b2"):
        gap = pixel_gap(runs["story"][scene], runs["plain"][scene])
        assert gap.share > 25 * FLOAT_NOISE.share, (scene, gap)


def test_a_story_png_says_whose_anchor_it_is_or_whom_it_reads(story_runs, tmp_path):
    from keyframes.outputs.png import read_png_metadata

    made(tmp_path, *STORY)
    text = {
        scene: read_png_metadata(tmp_path / "run" / "keyframes" / file_of(scene))["parameters"]
        for scene in ("a1", "a3", "n1")
    }
    assert "Consistency: story, Story anchor: A" in text["a1"]
    assert "Consistency: story, Story reads: A" in text["a3"]
    assert "Story" not in text["n1"].replace("Consistency: story", "")


def test_the_same_story_run_twice_gives_the_same_pixels(story_runs):
    assert changed(story_runs["story"], story_runs["again"]) == set()


def test_batch_size_does_not_change_a_story_picture(story_runs, tmp_path):
    batched = made(tmp_path, *STORY, "batch_size=3")
    for scene, pixels in story_runs["story"].items():
        assert_same_picture(batched[scene], pixels, scene)


def test_two_processes_each_make_the_anchors_and_share_the_rest(story_runs, tmp_path):
    """accelerate's processes, one after the other here (process 1 first: process 0 merges):
    each makes every anchor it reads, only process 0 reports them; the pictures are the
    single-process run's and every image is recorded once."""
    reported = {}
    for index in (1, 0):
        reported[index] = made(tmp_path, *STORY, processes=Processes(index, 2))
    assert {"a1", "a2", "b1", "b2"} <= set(reported[0])  # the anchors, from the main process
    assert set(reported[1]) <= {"n1", "a3"} and reported[1]  # its share of the rest
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert sorted(r["scene_id"] for r in manifest["images"]) == sorted(story_runs["story"])
    for scene, pixels in story_runs["story"].items():
        assert_same_picture(
            load_pixels(tmp_path / "run" / f"keyframes/{file_of(scene)}"), pixels, scene
        )


def test_tokens_kept_in_cpu_memory_give_the_same_pictures(story_runs, tmp_path):
    """consistency.keep=cpu changes where the anchors' tokens wait, not what they are (on a
    CPU run both places are the same memory: the same computation, bit for bit)."""
    assert changed(made(tmp_path, *STORY, "consistency.keep=cpu"), story_runs["story"]) == set()


def test_story_is_refused_with_what_it_cannot_share(tmp_path):
    path = shots(tmp_path)
    for overrides, words in [
        (("consistency.share=0",), "consistency.share=0"),
        (("consistency.layers=[decoder]",), "consistency.layers=['decoder']"),
        (("consistency.steps=[3,2]",), "consistency.steps=[3, 2]"),
        (("speed=compile",), "speed=compile"),
        (("consistency.keep=disk",), "consistency.keep=disk"),
    ]:
        cfg = settings("experiment=smoke", f"shotlist={path}", "consistency=story", *overrides)
        with pytest.raises(ConfigError) as refused:
            KeyframesRecipe().setup(cfg, announce=False)
        assert words in str(refused.value), str(refused.value)


@pytest.mark.slow
def test_a_kill_after_the_anchors_resumes_to_the_same_pixels(tmp_path, cli_in_process):
    """SIGKILL at the third pipeline call (A's anchors, B's anchors, then a reader), resume:
    the anchors are made again to read them, and every picture is the uninterrupted one."""
    shots(tmp_path)
    story = (f"shotlist={tmp_path / 'shots.json'}", "steps=6", "speed.warm_up=false", *STORY)
    whole = tmp_path / "whole"
    code, err, _, _ = cli_in_process(*SMALL, *story, run_dir=whole)
    assert code == 0, err[-2000:]
    run_dir, _ = killed_run(tmp_path, "generation", *story)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {r["scene_id"] for r in manifest["images"]} == {"a1", "a2", "b1", "b2"}
    code, err, _, _ = cli_in_process(*SMALL, *story, "resume=true", run_dir=run_dir)
    assert code == 0, err[-2000:]
    for name in sorted(p.name for p in (whole / "keyframes").glob("*.png")):
        assert_same_picture(
            load_pixels(run_dir / "keyframes" / name), load_pixels(whole / "keyframes" / name), name
        )


# What it costs: pipeline/attention_cost.py, checked against what the models do.


@pytest.mark.parametrize("size", [(64, 64), (1024, 1024), (1000, 600)])
@pytest.mark.parametrize("architecture", ["tiny", "sdxl_base"])
def test_the_self_attention_layers_are_those_a_forward_pass_runs(architecture, size):
    """The analytic layer list against the attn1 calls of a forward pass on `meta`."""
    import torch
    from diffusers import UNet2DConditionModel

    from keyframes.pipeline.architectures import published_configs
    from keyframes.pipeline.attention_cost import self_attention_layers
    from tests.helpers import tiny_path

    if architecture == "tiny":
        config = json.loads((Path(tiny_path()).expanduser() / "unet" / "config.json").read_text())
    else:
        config = published_configs("sdxl_base")["unet"]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    seen = []
    for name, module in unet.named_modules():
        if name.endswith("attn1"):
            module.register_forward_pre_hook(
                lambda m, args, kwargs, n=name: seen.append(
                    (n[: -len(".attn1")], *args[0].shape[1:])
                ),
                with_kwargs=True,
            )
    width, height = size
    from keyframes.pipeline.flops import unet_inputs

    with torch.no_grad():
        unet(**unet_inputs(unet, width, height))
    expected = [
        (a.layer, a.tokens, a.channels) for a in self_attention_layers(config, width, height)
    ]
    assert seen == expected


def test_the_extra_attention_flops_are_what_torch_counts():
    """One SDXL-sized layer (1280 channels, 20 heads, 1024 tokens) attending to 1,536 more
    tokens: the analytic count against torch.utils.flop_counter on `meta`."""
    import torch
    from diffusers.models.attention_processor import Attention
    from torch.utils.flop_counter import FlopCounterMode

    from keyframes.conditioning.attention import attend
    from keyframes.pipeline.attention_cost import SelfAttention, extra_attention_flops

    with torch.device("meta"):
        attn = Attention(1280, heads=20, dim_head=64)
        tokens, extra = torch.empty(1, 1024, 1280), torch.empty(1, 1536, 1280)

    def counted(context):
        with FlopCounterMode(display=False) as counter:
            attend(attn, tokens, context)
        return counter.get_total_flops()

    measured = counted(torch.cat([extra, tokens], dim=1)) - counted(tokens)
    layer = SelfAttention("up", 1024, 1280)
    assert measured == extra_attention_flops([layer], {"up": 1536})


def test_the_kept_tokens_are_the_memory_the_estimate_counts(tmp_path, monkeypatch):
    """After the anchors, the kept tokens' bytes equal the count memory=auto adds (here for
    the tiny model's layers, in float32 on the CPU)."""
    from keyframes.conditioning import story
    from keyframes.pipeline.attention_cost import kept_values, self_attention_layers
    from tests.helpers import tiny_path

    kept = {}
    remove = story.Story.remove

    def measured_remove(self, pipe):
        kept["bytes"] = self.state.kept_bytes()
        kept["anchors"] = {n: len(js) for n, js in self.anchors.items()}
        remove(self, pipe)

    monkeypatch.setattr(story.Story, "remove", measured_remove)
    made(tmp_path, *STORY)  # 64x64, 6 steps, cfg 5: sharing on steps 1-5
    config = json.loads((Path(tiny_path()).expanduser() / "unet" / "config.json").read_text())
    layers = [a for a in self_attention_layers(config, 64, 64) if a.layer.startswith("up_blocks")]
    values = sum(kept_values(layers, 0.5, n) for n in kept["anchors"].values())
    assert kept["bytes"] == values * 2 * 5 * 4  # halves, shared steps, float32


def test_memory_auto_counts_the_kept_tokens():
    """The demo at 1024x1024 in bfloat16, counted for SDXL: the figure docs/benchmarks.md
    gives, and on a 24 GB card (faked free memory) memory=auto leaves memory=none for it."""
    import torch

    from keyframes.pipeline.memory import choose_mode, weights_gb

    def story(*overrides):
        cfg = settings(
            "model=sdxl_random",
            "device=cpu",
            "scorer=none",
            "width=1024",
            "height=1024",
            "consistency=story",
            *overrides,
        )
        return KeyframesRecipe().setup(cfg, announce=False).methods[0]

    held = story().memory_gb(2)
    assert held == pytest.approx(15.96, abs=0.005)
    weights = weights_gb(settings("model=sdxl_random").model, torch.bfloat16)
    assert choose_mode(24.0, 1, 1024, 1024, weights).mode == "none"
    with_story = choose_mode(24.0, 1, 1024, 1024, weights, held_gb=held)
    assert with_story.mode == "low_vram" and "16.0 GB of it kept by methods" in with_story.reason
    assert story("consistency.keep=cpu").memory_gb(2) == 0.0


@pytest.mark.parametrize("other", ["guidance_interval=[0,0.5]", "speed=deepcache"])
def test_story_works_beside_fewer_unet_evaluations(tmp_path, other):
    """Unguided steps (one guidance half) and DeepCache's shallow steps (no shared layer
    runs) change nothing of what is shared with whom."""
    story = made(tmp_path / "story", *STORY, other)
    moved = made(tmp_path / "moved", *STORY, other, seeds={"a1": 999})
    plain = made(tmp_path / "plain", other)
    assert changed(story, moved) == {"a1", "a2", "a3"}
    assert changed(story, plain) == {"a1", "a2", "a3", "b1", "b2"}
