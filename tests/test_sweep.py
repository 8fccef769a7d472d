from pathlib import Path

from keyframes.tracking.results import (
    JobResult,
    best_and_fastest,
    format_table,
    grid_axes,
    parse_overrides,
    ranked,
    sort_values,
    table,
    varying_keys,
)


def job(name, clip, seconds, **overrides):
    metrics = {"clip_score_mean": clip, "seconds_per_image_mean": seconds}
    return JobResult(name, {k: str(v) for k, v in overrides.items()}, metrics, run_id=f"run{name}")


JOBS = [
    job("0", 20.0, 2.0, experiment="smoke", steps=20, cfg_scale=5, style="noir"),
    job("1", 25.0, 4.0, experiment="smoke", steps=40, cfg_scale=5, style="noir"),
    job("2", 24.5, 3.0, experiment="smoke", steps=30, cfg_scale=7, style="noir"),
    job("3", 22.0, 1.0, experiment="smoke", steps=20, cfg_scale=7, style="anime"),
]


def test_overrides_parse_to_keys_without_prefixes_or_hydra_settings():
    assert parse_overrides(["steps=20", "+foo=a=b", "~bar=1", "hydra.run.dir=x", "-m"]) == {
        "steps": "20",
        "foo": "a=b",
        "bar": "1",
    }


def test_only_keys_that_differ_are_compared():
    assert varying_keys(JOBS) == ["steps", "cfg_scale", "style"]


def test_the_two_keys_with_most_values_span_the_grid():
    assert grid_axes(JOBS, varying_keys(JOBS)) == ("steps", "cfg_scale", ["style"])
    assert grid_axes(JOBS[:2], ["steps"]) == ("steps", None, [])
    assert grid_axes(JOBS, []) == (None, None, [])


def test_values_sort_numerically_then_as_text():
    assert sort_values(["10", "9", "x", "2.5", "a", "9"]) == ["2.5", "9", "10", "a", "x"]


def test_ranking_puts_high_clip_first_and_low_seconds_first():
    assert [j.name for j in ranked(JOBS, "clip_score_mean")] == ["1", "2", "3", "0"]
    assert [j.name for j in ranked(JOBS, "seconds_per_image_mean")] == ["3", "0", "2", "1"]


def test_the_aesthetic_score_ranks_high_first_and_can_be_the_objective():
    aesthetic = {"0": 5.1, "1": 4.2, "2": 6.3, "3": 5.9}
    jobs = [
        JobResult(j.name, j.overrides, {**j.metrics, "aesthetic_score_mean": aesthetic[j.name]})
        for j in JOBS
    ]
    assert [j.name for j in ranked(jobs, "aesthetic_score_mean")] == ["2", "3", "0", "1"]
    best, fastest = best_and_fastest(jobs, "aesthetic_score_mean")
    assert (best.name, fastest.name) == ("2", "3")  # 5.9 is within a point, in 1 s, not 3 s
    header, rows = table(jobs, "aesthetic_score_mean")
    assert header.index("aesthetic_score_mean") == 5 and rows[0][0] == "2"


def test_best_and_fastest_within_one_point():
    best, fastest = best_and_fastest(JOBS)
    assert best.name == "1"  # 25.0
    assert fastest.name == "2"  # 24.5 is within 1 point and takes 3 s instead of 4


def test_fastest_is_the_best_when_nothing_else_is_close():
    best, fastest = best_and_fastest([JOBS[0], JOBS[1]])
    assert best is fastest and best.name == "1"


def test_no_scores_no_best():
    assert best_and_fastest([JobResult("0", {}, {})]) == (None, None)


def test_table_rows_carry_the_varying_keys_and_metrics_best_first():
    header, rows = table(JOBS, "clip_score_mean")
    assert header == [
        "job",
        "steps",
        "cfg_scale",
        "style",
        "clip_score_mean",
        "aesthetic_score_mean",
        "style_consistency",
        "character_consistency",
        "seconds_per_image_mean",
        "unet_evaluations_per_image_mean",
        "tflops_per_image_mean",
        "vram_peak_gb_max",
        "run_id",
        "status",
    ]
    assert rows[0] == ["1", "40", "5", "noir", "25", "", "", "", "4", "", "", "", "run1", ""]
    assert [r[0] for r in rows] == ["1", "2", "3", "0"]


def test_formatted_table_aligns_columns():
    text = format_table(["job", "style", "clip"], [["0", "noir", "20.5"], ["10", "anime", "3"]])
    assert text.splitlines() == [
        "job  style  clip",
        "---  -----  ----",
        "  0  noir   20.5",
        " 10  anime     3",
    ]


def test_job_from_manifest_reads_first_takes_and_scores(tmp_path: Path):
    from keyframes.outputs.manifest import write_manifest
    from keyframes.outputs.records import Manifest
    from keyframes.tracking.results import job_from_manifest
    from tests.helpers import image_record, run_record

    manifest = Manifest(
        run_record(overrides=["steps=3"], summary={"clip_score_mean": 1.5}, mlflow={"run_id": "r"}),
        [
            image_record(scene_id="b", take=1, file="keyframes/001_b_t1.png", clip_score=2.0),
            image_record(scene_id="b", take=2, file="keyframes/001_b_t2.png", clip_score=9.0),
            image_record(scene_id="a", take=1, file="keyframes/002_a_t1.png", clip_score=None),
        ],
    )
    write_manifest(tmp_path / "4", manifest)
    from PIL import Image

    (tmp_path / "4" / "keyframes").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "4" / "keyframes" / "001_b_t1.png")
    result = job_from_manifest(tmp_path / "4" / "manifest.json")
    assert (result.name, result.run_id, result.overrides) == ("4", "r", {"steps": "3"})
    assert result.scenes == ["b", "a"]
    # a's PNG is not there: its grid cell says "no image"
    assert result.keyframes == {"b": tmp_path / "4" / "keyframes/001_b_t1.png"}
    assert result.scores == {"b": 2.0}
