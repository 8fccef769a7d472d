import csv

from PIL import Image

from keyframes.tracking.report import CELL_WIDTH, build_report, xy_grid
from keyframes.tracking.results import JobResult

COLOURS = {
    ("20", "5"): (255, 0, 0),
    ("40", "5"): (0, 255, 0),
    ("20", "7"): (0, 0, 255),
    ("40", "7"): (255, 255, 0),
}


def make_jobs(tmp_path, style="noir"):
    jobs = []
    for i, ((steps, cfg), colour) in enumerate(COLOURS.items()):
        path = tmp_path / f"{style}{i}.png"
        Image.new("RGB", (160, 90), colour).save(path)
        jobs.append(
            JobResult(
                name=str(i),
                overrides={"steps": steps, "cfg_scale": cfg, "style": style},
                metrics={"clip_score_mean": 20 + i, "seconds_per_image_mean": 1 + i},
                run_id=f"r{i}",
                scenes=["harbor"],
                keyframes={"harbor": path},
                scores={"harbor": 30.0 + i},
            )
        )
    return jobs


def test_grid_places_each_job_by_its_values(tmp_path):
    jobs = make_jobs(tmp_path)
    grid = xy_grid(jobs, "harbor", "steps", "cfg_scale", {})
    cw, ch = CELL_WIDTH, round(CELL_WIDTH * 90 / 160)
    pad, caption, head, side = 6, 20, 28, 150
    assert grid.size == (
        side + 2 * (cw + pad) + pad,
        head + caption + 2 * (ch + caption + pad) + pad,
    )

    def centre(col, row):
        return (
            side + pad + col * (cw + pad) + cw // 2,
            head + caption + row * (ch + caption + pad) + ch // 2,
        )

    assert grid.getpixel(centre(0, 0)) == (255, 0, 0)  # steps=20, cfg=5
    assert grid.getpixel(centre(1, 0)) == (0, 255, 0)  # steps=40, cfg=5
    assert grid.getpixel(centre(0, 1)) == (0, 0, 255)  # steps=20, cfg=7
    assert grid.getpixel(centre(1, 1)) == (255, 255, 0)


def test_missing_cell_is_drawn_empty_not_skipped(tmp_path):
    jobs = make_jobs(tmp_path)[:3]
    grid = xy_grid(jobs, "harbor", "steps", "cfg_scale", {})
    cw, ch = CELL_WIDTH, round(CELL_WIDTH * 90 / 160)
    centre = (150 + 6 + (cw + 6) + cw // 2, 28 + 20 + (ch + 20 + 6) + ch // 2)
    assert grid.getpixel(centre) == (24, 24, 24)


def test_report_writes_csv_a_grid_per_scene_and_fold_and_a_plot_per_key(tmp_path):
    jobs = make_jobs(tmp_path, "noir") + make_jobs(tmp_path, "anime")
    for i, job in enumerate(jobs):
        job.name = str(i)
    report = build_report(jobs, tmp_path / "out")
    assert report.keys == ["steps", "cfg_scale", "style"]
    names = sorted(p.relative_to(tmp_path / "out").as_posix() for p in report.files)
    assert names == [
        "grids/harbor__style-anime.png",
        "grids/harbor__style-noir.png",
        "plots/cfg_scale.png",
        "plots/steps.png",
        "plots/style.png",
        "summary.csv",
    ]
    rows = list(csv.reader(open(tmp_path / "out" / "summary.csv")))
    assert rows[0][:4] == ["job", "steps", "cfg_scale", "style"]
    assert len(rows) == 9
    assert report.best.name == "3" and report.fastest.name == "2"
    plot = Image.open(tmp_path / "out" / "plots" / "steps.png")
    assert plot.width > 600 and plot.height > 300
