"""Per-character identity consistency: computed per character over the keyframes whose scene
lists it, checked against an independent computation, and carried to the manifest, MLflow,
the sweep table and keyframes.compare."""

import csv
import itertools
import json

import numpy as np
import pytest
import torch

from keyframes.config.schema import ScorerConfig
from keyframes.scoring.clip import load_scorer
from keyframes.scoring.consistency import character_identity
from tests.test_sweep_cli import compare, runs_of


def unit(*rows):
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_character_figures_are_mean_pairwise_cosines_per_character():
    features = unit([1, 0], [1, 1], [0, 1], [1, 0], [3, 1])
    casts = [("Mara",), ("Mara", "Ilo"), ("Ilo",), (), ("Mara",)]
    reference = unit([1, 0])[0]
    summary, per_image = character_identity(features, casts, {"Mara": reference})
    f = features.numpy()

    def mean_pairs(rows):
        return 100 * np.mean([f[i] @ f[j] for i, j in itertools.combinations(rows, 2)])

    mara, ilo = [0, 1, 4], [1, 2]
    assert summary["character_consistency_Mara"] == pytest.approx(mean_pairs(mara))
    assert summary["character_consistency_Ilo"] == pytest.approx(mean_pairs(ilo))
    assert summary["character_consistency"] == pytest.approx(
        (mean_pairs(mara) + mean_pairs(ilo)) / 2
    )
    to_reference = [100 * f[i] @ reference.numpy() for i in mara]
    assert summary["character_reference_Mara"] == pytest.approx(np.mean(to_reference))
    assert summary["character_reference"] == summary["character_reference_Mara"]  # Ilo: none
    # per keyframe: its mean similarity to the character's others, and to the reference
    assert per_image[1]["Mara"]["others"] == pytest.approx(
        100 * (f[1] @ f[0] + f[1] @ f[4]) / 2, abs=1e-4
    )
    assert per_image[1]["Ilo"] == {"others": pytest.approx(100 * f[1] @ f[2], abs=1e-4)}
    assert per_image[4]["Mara"]["reference"] == pytest.approx(to_reference[2], abs=1e-4)
    assert per_image[3] == {}  # nobody in that scene


def test_a_character_in_one_scene_has_no_pair_and_no_figure():
    summary, per_image = character_identity(unit([1, 0], [0, 1]), [("Mara",), ()], {})
    assert summary == {} and per_image == [{}, {}]


def test_a_run_records_character_consistency_everywhere_it_records_scores(smoke_sweep, capsys):
    """The demo sweep's jobs: the manifest per image and per character, recomputed here from
    the PNGs; MLflow metrics; the sweep table; keyframes.compare."""
    job = smoke_sweep.sweep_dir / "0"
    manifest = json.loads((job / "manifest.json").read_text())
    casts = {"lamp-room": ("Mara",), "signal": ("Mara",), "rescue": ("Mara", "Ilo")}
    casts |= {"kitchen": ("Ilo",), "morning-after": ("Mara", "Ilo")}
    images = manifest["images"]
    scorer = load_scorer(ScorerConfig(name="tiny", model="tiny", aesthetic=None), "cpu")
    from PIL import Image

    features = scorer.image_features([Image.open(job / r["file"]) for r in images]).numpy()
    for name in ("Mara", "Ilo"):
        rows = [i for i, r in enumerate(images) if name in casts.get(r["scene_id"], ())]
        pairs = [features[i] @ features[j] for i, j in itertools.combinations(rows, 2)]
        figure = manifest["run"]["summary"][f"character_consistency_{name}"]
        assert figure == pytest.approx(100 * np.mean(pairs), abs=1e-3)
        for i in rows:
            others = np.mean([features[i] @ features[j] for j in rows if j != i])
            assert images[i]["character_similarity"][name]["others"] == pytest.approx(
                100 * others, abs=1e-3
            )
    assert images[0]["character_similarity"] is None  # the opening shows nobody
    summary = manifest["run"]["summary"]
    assert summary["character_consistency"] == pytest.approx(
        (summary["character_consistency_Mara"] + summary["character_consistency_Ilo"]) / 2,
        abs=1e-3,
    )
    # MLflow: the mean and one metric per character, on every job's run
    _, _, children = runs_of(smoke_sweep)
    for child in children:
        assert {"character_consistency", "character_consistency_Mara"} <= set(child.data.metrics)
    # the sweep table and the comparison
    rows = list(csv.DictReader(open(smoke_sweep.sweep_dir / "summary" / "summary.csv")))
    assert all(0 < float(r["character_consistency"]) <= 100 for r in rows)
    result = compare(smoke_sweep, capsys, "--metric", "character_consistency")
    assert result.returncode == 0, result.stderr
    assert "character_consistency" in result.stdout.splitlines()[2].split()
