"""The design's one-way data flow, checked: generation code never pulls in Hydra or MLflow."""

import subprocess
import sys


def test_generation_core_imports_neither_hydra_nor_mlflow():
    code = (
        "import sys, keyframes.render, keyframes.generate, keyframes.models, keyframes.scoring; "
        "print(sorted(m for m in ('hydra', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_only_the_tracking_module_imports_mlflow():
    from pathlib import Path

    package = Path(__file__).resolve().parent.parent / "keyframes"
    importers = sorted(
        p.name
        for p in package.glob("*.py")
        if "import mlflow" in p.read_text() or "from mlflow" in p.read_text()
    )
    assert importers == ["tracking.py"]
