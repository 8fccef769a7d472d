from keyframes.shotlist.jobs import derive_seed, plan_jobs, safe_name
from keyframes.shotlist.load import parse_shotlist
from keyframes.shotlist.prompts import apply_style, combine_negatives, scene_prompt

SHOTLIST = {
    "title": "T",
    "characters": {"Ana": "a tall woman in a green coat", "Bo": "a small grey dog"},
    "scenes": [
        {
            "id": "a",
            "description": "a harbor at dusk",
            "shot": "wide shot",
            "camera": "drone",
            "lighting": "golden hour",
            "mood": "calm",
            "characters": ["Ana", "Bo"],
            "negative_prompt": "boats, Blurry",
        },
        {"id": "b", "description": "a kitchen", "prompt": "my own prompt", "takes": 3},
        {"id": "c", "description": "a road", "seed": 42},
    ],
}


def plan(**kw):
    args = dict(
        style_prompt="film still, {prompt}, grain",
        style_negative="cartoon, blurry",
        negative_preset="lowres, blurry, text",
        run_seed=7,
        seed_mode="derived",
        takes=1,
    )
    return plan_jobs(parse_shotlist(kw.pop("data", SHOTLIST)), **{**args, **kw})


def test_scene_prompt_orders_framing_subject_characters_and_look():
    shotlist = parse_shotlist(SHOTLIST)
    assert scene_prompt(shotlist.scenes[0], shotlist.characters) == (
        "wide shot, a harbor at dusk, a tall woman in a green coat, a small grey dog, drone, "
        "golden hour lighting, calm mood"
    )


def test_scene_prompt_field_replaces_the_assembled_text():
    shotlist = parse_shotlist(SHOTLIST)
    assert scene_prompt(shotlist.scenes[1], shotlist.characters) == "my own prompt"


def test_style_template_wraps_the_prompt_and_leaves_braces_alone():
    assert apply_style("photo of {prompt}, 35mm", "a {cat}") == "photo of a {cat}, 35mm"


def test_negatives_combine_scene_first_without_duplicates():
    assert combine_negatives(
        "boats, Blurry", "cartoon, blurry", "lowres, blurry, text", None, ""
    ) == ("boats, Blurry, cartoon, lowres, text")


def test_jobs_carry_final_prompts_takes_and_file_names():
    jobs = plan()
    assert [(j.scene_id, j.take) for j in jobs] == [
        ("a", 1),
        ("b", 1),
        ("b", 2),
        ("b", 3),
        ("c", 1),
    ]
    assert [j.index for j in jobs] == [0, 1, 2, 3, 4]
    assert jobs[0].prompt.startswith("film still, wide shot, a harbor at dusk")
    assert jobs[0].prompt.endswith(", grain")
    assert jobs[0].negative_prompt == "boats, Blurry, cartoon, lowres, text"
    assert jobs[1].prompt == "film still, my own prompt, grain"
    assert jobs[0].file == "keyframes/001_a_t1.png"
    assert jobs[3].file == "keyframes/002_b_t3.png"


def test_takes_count_up_from_the_scene_seed():
    jobs = plan(takes=2)
    b = [j.seed for j in jobs if j.scene_id == "b"]
    assert b == [b[0], b[0] + 1, b[0] + 2]
    assert [j.seed for j in jobs if j.scene_id == "c"] == [42, 43]


def test_derived_seeds_survive_inserting_and_reordering_scenes():
    before = {j.scene_id: j.seed for j in plan()}
    data = dict(SHOTLIST)
    data["scenes"] = [{"id": "new", "description": "x"}] + list(reversed(SHOTLIST["scenes"]))
    after = {j.scene_id: j.seed for j in plan(data=data)}
    assert all(after[k] == before[k] for k in before)
    assert before["a"] != before["b"]
    assert before["a"] == derive_seed(7, "a")
    assert plan(run_seed=8)[0].seed != before["a"]


def test_fixed_seed_mode_gives_every_scene_the_run_seed_but_keeps_own_seeds():
    jobs = plan(seed_mode="fixed")
    assert [j.seed for j in jobs] == [7, 7, 8, 9, 42]


def test_safe_name_strips_path_and_odd_characters():
    assert safe_name("../etc/passwd") == "etc-passwd"
    assert safe_name("Scene 1: Café") == "Scene-1-Caf"
    assert safe_name("***") == "scene"
    assert len(safe_name("x" * 500)) == 48
