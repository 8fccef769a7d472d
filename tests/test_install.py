"""An installed copy, not a checkout: the wheel ships the Hydra configs inside the package."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_wheel_installed_into_a_fresh_venv_runs_the_smoke_experiment_from_elsewhere(tmp_path):
    uv = shutil.which("uv")
    assert uv, "uv is the project's tool (pip install uv)"
    subprocess.run(
        [uv, "build", "--wheel", "--out-dir", str(tmp_path / "dist"), str(ROOT)],
        check=True,
        capture_output=True,
    )
    [wheel] = (tmp_path / "dist").glob("keyframes-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "keyframes/conf/config.yaml" in names and "keyframes/conf/experiment/smoke.yaml" in names

    venv = tmp_path / "venv"
    subprocess.run(
        [uv, "venv", "--python", sys.executable, str(venv)], check=True, capture_output=True
    )
    python = venv / "bin" / "python"
    subprocess.run(
        [uv, "pip", "install", "--python", str(python), "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
    )
    # its dependencies from this environment (a fresh download is 3 GB): a path, not the
    # checkout; this environment's own editable keyframes is not on it
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [str(python), "-c", "import keyframes.config.schema as c; print(c.CONF_DIR)"],
        cwd=elsewhere,
        check=True,
        capture_output=True,
        text=True,
    )
    assert where.stdout.strip() == str(Path(site) / "keyframes" / "conf")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(  # the console script [project.scripts] installs
        [
            str(venv / "bin" / "keyframes"),
            "experiment=smoke",
            "steps=1",
            "width=64",
            "height=64",
            "scorer=none",
            "hydra.run.dir=run",
            "mlflow.tracking_uri=sqlite:///m.db",
        ],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(list((elsewhere / "run" / "keyframes").glob("*.png"))) == 7
    for command in (
        ["keyframes-sync", "run", "--tracking-uri", "sqlite:///m.db"],
        [
            "keyframes-compare",
            "--experiment",
            "smoke",
            "--tracking-uri",
            "sqlite:///m.db",
            "--metric",
            "seconds_per_image_mean",
        ],
        ["keyframes-replicas", "--help"],
        ["keyframes-styles"],
    ):
        done = subprocess.run(
            [str(venv / "bin" / command[0]), *command[1:]],
            cwd=elsewhere,
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        assert done.returncode == 0, (command, done.stderr[-2000:])
