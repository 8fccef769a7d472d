"""Style presets from JSON style libraries and A1111 styles.csv files."""

import json
import subprocess
import sys

import pytest

from keyframes.config.schema import StyleConfig
from keyframes.config.styles import read_style_file, resolve_style
from keyframes.config.validate import validate
from keyframes.errors import ConfigError
from keyframes.shotlist.jobs import plan_jobs
from keyframes.shotlist.load import load_shotlist
from tests.helpers import settings

LIBRARY = [
    {"name": "base", "prompt": "{prompt}", "negative_prompt": ""},
    {
        "name": "Film Noir",
        "prompt": "film noir style {prompt} . monochrome, high contrast, dramatic shadows",
        "negative_prompt": "ugly, deformed, colorful",
    },
]
A1111_CSV = (
    "\ufeffname,prompt,negative_prompt\n"
    'Grain,"grainy 35mm film, muted colors","digital, clean"\n'
    "Wrap,cinematic still of {prompt} at dusk,\n"
    "Empty,,\n"
)


@pytest.fixture
def files(tmp_path):
    (tmp_path / "styles.json").write_text(json.dumps(LIBRARY))
    (tmp_path / "styles.csv").write_text(A1111_CSV, encoding="utf-8")
    return tmp_path


def test_json_style_library_is_read_as_is(files):
    styles = read_style_file(files / "styles.json")
    assert [s.name for s in styles] == ["base", "Film Noir"]
    assert styles[1].prompt == LIBRARY[1]["prompt"]
    assert styles[1].negative_prompt == "ugly, deformed, colorful"


def test_a1111_csv_prompts_without_placeholder_follow_the_user_prompt(files):
    styles = {s.name: s for s in read_style_file(files / "styles.csv")}
    assert list(styles) == ["Grain", "Wrap", "Empty"]  # the byte-order mark is not in a name
    assert styles["Grain"].prompt == "{prompt}, grainy 35mm film, muted colors"
    assert styles["Grain"].negative_prompt == "digital, clean"
    assert styles["Wrap"].prompt == "cinematic still of {prompt} at dusk"
    assert styles["Empty"].prompt == "{prompt}" and styles["Empty"].negative_prompt == ""


def test_style_file_preset_reaches_the_prompts(files):
    cfg = settings("style=file", f"style.file={files / 'styles.csv'}", "style.name=Grain")
    cfg.style = resolve_style(cfg.style)
    validate(cfg)
    job = plan_jobs(
        load_shotlist("demo"), cfg.style.prompt, cfg.style.negative_prompt, "", 1, "derived", 1
    )[0]
    assert job.prompt.endswith(", grainy 35mm film, muted colors")
    assert job.negative_prompt.startswith("digital, clean")
    assert cfg.style.name == "Grain" and cfg.style.file == str(files / "styles.csv")


@pytest.mark.parametrize(
    "style, message",
    [
        (StyleConfig("Nope", "{prompt}", file="F/styles.json"), "style.name=Nope: not in"),
        (StyleConfig("", "{prompt}", file=""), "style=file needs style.file=PATH"),
        (StyleConfig("x", "{prompt}", file="F/missing.csv"), "style file not found: .*missing.csv"),
    ],
)
def test_style_file_errors_say_what_to_do(files, style, message):
    if style.file:
        style.file = style.file.replace("F", str(files))
    with pytest.raises(ConfigError, match=message):
        resolve_style(style)


def test_bad_json_is_a_clear_error(tmp_path):
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ConfigError, match="not a readable style file"):
        read_style_file(tmp_path / "broken.json")
    (tmp_path / "nameless.json").write_text('[{"prompt": "{prompt}"}]')
    with pytest.raises(ConfigError, match="preset 1: no name"):
        read_style_file(tmp_path / "nameless.json")


def test_styles_command_lists_file_and_builtin_presets(files):
    listed = subprocess.run(
        [sys.executable, "-m", "keyframes.styles", "--file", str(files / "styles.json")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Film Noir\n  prompt:   film noir style {prompt}" in listed
    assert "2 presets; use one with:" in listed and "style.name=NAME" in listed
    builtin = subprocess.run(
        [sys.executable, "-m", "keyframes.styles"], capture_output=True, text=True, check=True
    ).stdout
    assert "noir\n  prompt:   black and white film noir still, {prompt}" in builtin
    assert "8 presets" in builtin


def test_cli_unknown_style_name_exits_2_before_loading(refused_cli, files):
    result = refused_cli(
        "experiment=smoke", "style=file", f"style.file={files / 'styles.json'}", "style.name=Pastel"
    )
    assert result.returncode == 2, result.output
    assert "style.name=Pastel: not in" in result.stderr and "base, Film Noir" in result.stderr
    assert not result.run_dir.exists()


def test_config_yaml_and_mlflow_params_record_the_style_a_file_gave(files, cli_in_process):
    """Not style=file's placeholder template: replaying the record needs no style file."""
    import yaml
    from mlflow.tracking import MlflowClient

    code, err, run_dir, store = cli_in_process(
        "style=file",
        f"style.file={files / 'styles.json'}",
        "style.name=Film Noir",
        "scorer=none",
        "steps=1",
        "width=64",
        "height=64",
    )
    assert code == 0, err[-2000:]
    noir = LIBRARY[1]
    style = yaml.safe_load((run_dir / "config.yaml").read_text())["style"]
    assert (style["prompt"], style["negative_prompt"]) == (noir["prompt"], noir["negative_prompt"])
    client = MlflowClient(f"sqlite:///{store}")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.params["style.prompt"] == noir["prompt"]
    assert run.data.params["style.negative_prompt"] == noir["negative_prompt"]
