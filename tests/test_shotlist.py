import json

import pytest

from keyframes.errors import ShotlistError
from keyframes.shotlist.load import DEMO, load_shotlist, parse_shotlist
from tests.helpers import write_json


def scene(i, **fields):
    return {"id": f"s{i}", "description": f"scene number {i}", **fields}


def problems_of(data) -> list[str]:
    with pytest.raises(ShotlistError) as info:
        parse_shotlist(data)
    return info.value.problems


def test_demo_shotlist_is_a_short_film_with_characters():
    shotlist = load_shotlist("demo")
    assert shotlist.path == str(DEMO)
    assert 6 <= len(shotlist.scenes) <= 8
    assert set(shotlist.characters) == {"Mara", "Ilo"}
    assert any(s.characters for s in shotlist.scenes)
    assert len(shotlist.sha256) == 64


def test_bare_list_of_scenes_is_accepted_and_titled_after_the_file(tmp_path):
    path = write_json(tmp_path / "my_film.json", [scene(1), scene(2)])
    shotlist = load_shotlist(str(path))
    assert [s.id for s in shotlist.scenes] == ["s1", "s2"]
    assert shotlist.title == "my_film"


def test_all_scene_fields_are_read():
    data = {
        "title": "T",
        "characters": {"Ana": "a tall woman", "Bo": {"description": "a dog", "ref": "bo.png"}},
        "scenes": [
            scene(
                1,
                prompt="override",
                negative_prompt="blur",
                shot="wide",
                camera="dolly",
                lighting="dusk",
                mood="calm",
                characters=["Ana", "Bo"],
                seed=5,
                takes=3,
            )
        ],
    }
    s = parse_shotlist(data).scenes[0]
    assert (s.prompt, s.negative_prompt, s.shot, s.camera, s.lighting, s.mood) == (
        "override",
        "blur",
        "wide",
        "dolly",
        "dusk",
        "calm",
    )
    assert (s.characters, s.seed, s.takes) == (("Ana", "Bo"), 5, 3)
    assert parse_shotlist(data).characters["Bo"].extra == {"ref": "bo.png"}


def test_unknown_fields_are_kept_and_listed_once():
    data = {"title": "T", "music": "piano", "scenes": [scene(1, duration=4), scene(2, duration=2)]}
    shotlist = parse_shotlist(data)
    assert shotlist.extra == {"music": "piano"}
    assert shotlist.scenes[0].extra == {"duration": 4}
    assert shotlist.unknown_fields == ("music", "scenes[*].duration")


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(ShotlistError, match="shotlist not found: .*nope.json"):
        load_shotlist(str(tmp_path / "nope.json"))


def test_invalid_json_reports_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "scenes": [\n    {"id": "a",}\n  ]\n}')
    with pytest.raises(ShotlistError) as info:
        load_shotlist(str(path))
    assert "not valid JSON" in str(info.value)
    assert "line 3, column 16" in str(info.value)


def test_every_schema_violation_is_listed_with_its_path():
    data = {
        "characters": {"Ana": "a woman"},
        "scenes": [
            scene(0),
            {"description": "no id"},
            {"id": "x"},
            scene(3, seed="abc", takes=0, shot=5, characters=["Zed"]),
            "not a scene",
        ],
    }
    assert problems_of(data) == [
        "scenes[1].id: missing",
        "scenes[2].description: missing",
        "scenes[3].shot: expected a string, got the number 5",
        "scenes[3].characters[0]: unknown character 'Zed' (the sheet has: Ana)",
        "scenes[3].seed: expected an integer, got a string",
        "scenes[3].takes: 0 is out of range, must be between 1 and 1000",
        "scenes[4]: expected an object, got a string",
    ]


def test_duplicate_ids_name_both_scenes():
    assert problems_of([scene(1), scene(2), scene(1)]) == [
        "scenes[2].id: duplicate id 's1' (first used by scenes[0])"
    ]


@pytest.mark.parametrize(
    "data, problem",
    [
        ({"scenes": []}, "scenes: empty, a shotlist needs at least one scene"),
        ({"title": "x"}, "scenes: missing"),
        ([], "scenes: empty, a shotlist needs at least one scene"),
        ({"scenes": {"a": 1}}, "scenes: expected a list, got an object"),
        ("text", "top level: expected an object with 'scenes' or a list of scenes, got a string"),
        (
            {"scenes": [scene(1)], "characters": ["Ana"]},
            "characters: expected an object of name -> description, got a list",
        ),
        (
            {"scenes": [scene(1, seed=-1)]},
            "scenes[0].seed: -1 is out of range, must be between 0 and 4294967295",
        ),
        (
            {"scenes": [scene(1, seed=1.5)]},
            "scenes[0].seed: expected an integer, got the number 1.5",
        ),
        ({"scenes": [scene(1, takes=True)]}, "scenes[0].takes: expected an integer, got a boolean"),
        (
            {"scenes": [scene(1, takes=1001)]},
            "scenes[0].takes: 1001 is out of range, must be between 1 and 1000",
        ),
        ({"scenes": [{"id": "", "description": "d"}]}, "scenes[0].id: must not be empty"),
        (
            {"scenes": [{"id": "a", "description": "  "}]},
            "scenes[0].description: expected a non-empty string",
        ),
    ],
)
def test_bad_values_get_one_clear_problem(data, problem):
    assert problems_of(data) == [problem]


def test_error_message_lists_problems_under_the_file_name(tmp_path):
    path = write_json(
        tmp_path / "s.json", {"scenes": [{"id": "a"}, {"id": "a", "description": "d"}]}
    )
    with pytest.raises(ShotlistError) as info:
        load_shotlist(str(path))
    assert str(info.value).splitlines() == [
        f"shotlist {path} is invalid:",
        "  scenes[0].description: missing",
        "  scenes[1].id: duplicate id 'a' (first used by scenes[0])",  # not hidden by the other
    ]


def test_not_utf8_is_reported(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(json.dumps([scene(1, mood="café")]).encode("utf-8").replace(b"caf", b"\xff"))
    with pytest.raises(ShotlistError, match="not UTF-8"):
        load_shotlist(str(path))


def test_a_run_of_too_many_images_is_refused_before_any_job_is_built(monkeypatch):
    import keyframes.shotlist.jobs
    from keyframes.errors import ConfigError
    from keyframes.shotlist.jobs import JobSettings

    def build(*args, **kwargs):
        raise AssertionError("jobs were built")

    monkeypatch.setattr(keyframes.shotlist.jobs, "plan_jobs", build)
    huge = parse_shotlist([scene(i, takes=1000) for i in range(10_000)])  # 10 million images
    settings = JobSettings(takes=1, max_images=10_000)
    with pytest.raises(ConfigError) as info:
        keyframes.shotlist.jobs.plan_for(huge, settings)
    assert str(info.value) == (
        "this run would make 10,000,000 images (10,000 scenes and their takes); the limit is "
        "max_images=10000. If that many is meant, raise it: max_images=10000000"
    )
