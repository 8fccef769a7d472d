"""Nothing from a shotlist or a checkpoint can do harm, and oversized input fails clearly."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyframes.config.schema import ModelConfig
from keyframes.errors import ConfigError, ShotlistError
from keyframes.pipeline.load import check_source
from keyframes.shotlist.jobs import safe_name, unique_safe_names
from keyframes.shotlist.load import MAX_SCENES, MAX_TEXT, Shotlist, load_shotlist, parse_shotlist

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=40,
)
# A scene's fields need any kind of value, not deep trees (the test above covers those): small
# values keep hypothesis' own drawing from taking most of the test's time.
FIELD_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(), children, max_size=3)
    ),
    max_leaves=6,
)
SCENE_LIKE = st.dictionaries(
    st.sampled_from(
        [
            "id",
            "description",
            "prompt",
            "shot",
            "characters",
            "seed",
            "takes",
            "reference",
            "control",
            "extra",
        ]
    ),
    FIELD_VALUE,
)


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_any_json_value_is_a_shotlist_or_a_shotlist_error(data):
    try:
        assert isinstance(parse_shotlist(data), Shotlist)
    except ShotlistError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    st.lists(SCENE_LIKE, max_size=4), st.dictionaries(st.text(max_size=5), FIELD_VALUE, max_size=3)
)
def test_scene_shaped_json_is_a_shotlist_or_a_shotlist_error(scenes, characters):
    try:
        assert isinstance(parse_shotlist({"characters": characters, "scenes": scenes}), Shotlist)
    except ShotlistError:
        pass


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(max_size=2000) | JSON.map(lambda v: json.dumps(v).encode()))
def test_any_file_content_is_a_shotlist_or_a_shotlist_error(tmp_path, raw):
    path = tmp_path / "shots.json"
    path.write_bytes(raw)
    try:
        assert isinstance(load_shotlist(str(path)), Shotlist)
    except ShotlistError:
        pass


def test_deeply_nested_json_is_a_shotlist_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ShotlistError, match="nested too deeply"):
        load_shotlist(str(path))


def test_target_fields_in_a_shotlist_stay_plain_data():
    data = [{"id": "a", "description": "d", "_target_": "os.system", "camera": "dolly"}]
    scene = parse_shotlist(data).scenes[0]
    assert scene.extra == {"_target_": "os.system"}  # kept as text, never instantiated


@pytest.mark.parametrize(
    "data, problem",
    [
        (
            [{"id": "a", "description": "x" * (MAX_TEXT + 1)}],
            f"scenes[0].description: {MAX_TEXT + 1} characters, the limit is {MAX_TEXT}",
        ),
        (
            [{"id": "a", "description": "d", "prompt": "p" * 100_000}],
            f"scenes[0].prompt: 100000 characters, the limit is {MAX_TEXT}",
        ),
        ([{"id": "a" * 300, "description": "d"}], "scenes[0].id: 300 characters, the limit is 200"),
        (
            [{"id": str(i), "description": "d"} for i in range(MAX_SCENES + 1)],
            f"scenes: {MAX_SCENES + 1} scenes, the limit is {MAX_SCENES}",
        ),
    ],
)
def test_oversized_input_is_a_clear_error(data, problem):
    with pytest.raises(ShotlistError) as info:
        parse_shotlist(data)
    assert info.value.problems == [problem]


def test_oversized_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "huge.json"
    with open(path, "wb") as f:
        f.truncate(25_000_000)
    with pytest.raises(ShotlistError, match="huge.json is over 20 MB, the limit"):
        load_shotlist(str(path))


def test_image_paths_resolve_inside_the_shotlist_folder(tmp_path):
    (tmp_path / "films" / "refs").mkdir(parents=True)
    (tmp_path / "films" / "refs" / "mara.png").write_bytes(b"png")
    (tmp_path / "secret.png").write_bytes(b"png")
    shots = tmp_path / "films" / "shots.json"
    data = {
        "characters": {"Mara": {"description": "a woman", "reference": "refs/mara.png"}},
        "scenes": [
            {"id": "a", "description": "d", "control": {"type": "canny", "image": "refs/mara.png"}}
        ],
    }
    shots.write_text(json.dumps(data))
    shotlist = load_shotlist(str(shots))
    assert shotlist.characters["Mara"].reference == str(tmp_path / "films" / "refs" / "mara.png")
    assert shotlist.scenes[0].control == {
        "type": "canny",
        "image": str(tmp_path / "films" / "refs" / "mara.png"),
    }

    data["scenes"][0]["reference"] = "../secret.png"
    data["characters"]["Mara"]["reference"] = "/etc/passwd"
    shots.write_text(json.dumps(data))
    with pytest.raises(ShotlistError) as info:
        load_shotlist(str(shots))
    assert info.value.problems == [
        f"characters.Mara.reference: '/etc/passwd' is outside the shotlist's folder {tmp_path / 'films'} (set allow_external_paths=true to allow it)",
        f"scenes[0].reference: '../secret.png' is outside the shotlist's folder {tmp_path / 'films'} (set allow_external_paths=true to allow it)",
    ]
    data["characters"]["Mara"]["reference"] = "refs/missing.png"
    shots.write_text(json.dumps(data))
    with pytest.raises(ShotlistError) as info:
        load_shotlist(str(shots), allow_external_paths=True)
    assert info.value.problems == [
        f"characters.Mara.reference: image not found: {tmp_path / 'films' / 'refs' / 'missing.png'}"
    ]
    data["characters"]["Mara"]["reference"] = "refs/mara.png"
    shots.write_text(json.dumps(data))
    assert load_shotlist(str(shots), allow_external_paths=True).scenes[0].reference == str(
        tmp_path / "secret.png"
    )


def test_an_image_path_the_file_system_cannot_take_is_a_problem_not_a_crash(tmp_path):
    """A name longer than the file system allows (255 bytes on ext4) made stat() raise
    OSError: a traceback instead of exit 2, found by comparing the validators on random input."""
    data = [{"id": "a", "description": "d", "reference": "x" * 5000}]
    with pytest.raises(ShotlistError) as info:
        parse_shotlist(data, base_dir=tmp_path)
    assert info.value.problems == [f"scenes[0].reference: file name too long: {'x' * 60!r}..."]


@pytest.mark.parametrize(
    "scene_id, name",
    [
        ("../../etc/passwd", "etc-passwd"),
        ("a/b\\c", "a-b-c"),
        ("..", "scene"),
        ("CON", "CON_"),
        ("lpt1", "lpt1_"),
        ("ünïcode 🎬", "n-code"),
        ("x" * 500, "x" * 48),
        ("\x00\n", "scene"),
    ],
)
def test_scene_ids_become_safe_file_names(scene_id, name):
    assert safe_name(scene_id) == name


def test_colliding_names_get_a_suffix():
    assert unique_safe_names(["a b", "a-b", "a/b", "c"]) == {
        "a b": "a-b",
        "a-b": "a-b-2",
        "a/b": "a-b-3",
        "c": "c",
    }


@given(st.text())
def test_any_scene_id_gives_a_plain_bounded_name(scene_id):
    name = safe_name(scene_id)
    assert name and len(name) <= 49 and "/" not in name and "\\" not in name and ".." not in name


def test_pickle_checkpoints_load_only_when_allowed_explicitly(tmp_path):
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"pickle")
    with pytest.raises(ConfigError, match="set model.allow_pickle=true if you trust its source"):
        check_source(ModelConfig(name="local", path=str(checkpoint)))
    check_source(ModelConfig(name="local", path=str(checkpoint), allow_pickle=True))  # passes


def test_fifty_megapixels_is_refused(refused_cli):
    result = refused_cli("experiment=smoke", "width=8192", "height=6144")
    assert result.returncode == 2 and not result.run_dir.exists()
    assert "size 8192x6144 (50.3 MP): at most 8192 per side and 16.8 MP" in result.stderr
