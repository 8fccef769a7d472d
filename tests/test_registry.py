"""Conditioning methods are found through one registry: a method registered from a test
module, with its YAML in a config folder of its own, runs and is recorded, and no keyframes
module knows its name."""

import numpy as np
from PIL import Image

import tests.tint_method  # noqa: F401 - registers consistency=tint
from keyframes.conditioning.base import method_class
from keyframes.outputs.png import read_png_metadata
from tests.conftest import read_manifest

SMALL = ("width=64", "height=64", "scorer=none", "speed.warm_up=false")


def test_a_method_registered_outside_keyframes_runs_and_is_recorded(cli_in_process, tmp_path):
    conf = tmp_path / "my_conf"
    (conf / "consistency").mkdir(parents=True)
    (conf / "consistency" / "tint.yaml").write_text(
        "defaults:\n  - tint_schema\n  - _self_\nname: tint\nshift: 30\n"
    )
    assert method_class("consistency", "tint").__name__ == "Tint"

    code, err, tinted_dir, _ = cli_in_process(
        *SMALL,
        "consistency=tint",
        f"hydra.searchpath=[file://{conf}]",
        run_dir=tmp_path / "tinted",
    )
    assert code == 0, err[-2000:]
    code, err, plain_dir, _ = cli_in_process(*SMALL, run_dir=tmp_path / "plain")
    assert code == 0, err[-2000:]

    record = read_manifest(tinted_dir)["images"][0]
    assert record["consistency"] == "tint" and record["tint_shift"] == 30
    assert "consistency:\n  name: tint\n" in (tinted_dir / "config.yaml").read_text()
    png = tinted_dir / record["file"]
    assert "Consistency: tint" in read_png_metadata(png)["parameters"]
    # the shift reached the picture (the tiny random VAE needs a large one to show it)
    tinted = np.asarray(Image.open(png), dtype=np.int16)
    plain = np.asarray(Image.open(plain_dir / record["file"]), dtype=np.int16)
    assert (np.abs(tinted - plain) > 2).mean() > 0.2


def test_a_typo_in_an_outside_methods_settings_is_refused_by_name(refused_cli, tmp_path):
    """Its own dataclass, not a free dict: a misspelt setting never runs with the default."""
    conf = tmp_path / "my_conf"
    (conf / "consistency").mkdir(parents=True)
    (conf / "consistency" / "tint.yaml").write_text(
        "defaults:\n  - tint_schema\n  - _self_\nname: tint\nshift: 30\n"
    )
    where = f"hydra.searchpath=[file://{conf}]"
    result = refused_cli("experiment=smoke", "consistency=tint", "consistency.shfit=3", where)
    assert result.returncode == 2
    assert "consistency.shfit: no such setting (the closest known one is consistency.shift)" in (
        result.stderr
    )
    result = refused_cli("experiment=smoke", "consistency=tint", "consistency.shift=abc", where)
    assert result.returncode == 2 and "shift" in result.stderr and "Traceback" not in result.stderr


def test_an_unregistered_method_is_bad_input_naming_the_registered_ones(cli_in_process, tmp_path):
    conf = tmp_path / "my_conf"
    (conf / "consistency").mkdir(parents=True)
    (conf / "consistency" / "sepia.yaml").write_text("name: sepia\n")
    code, err, run_dir, _ = cli_in_process(
        *SMALL, "consistency=sepia", f"hydra.searchpath=[file://{conf}]"
    )
    assert code == 2
    assert "consistency=sepia: no conditioning method is registered under that name" in err
    assert "ip_adapter" in err and "style_aligned" in err
    assert not run_dir.exists()
