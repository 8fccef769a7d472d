"""A pytest plugin (named in conftest.py): tests that could not run for want of a tool are said
at the end of the run in red, not only counted among the skips: without Chromium the review in
the MLflow UI is not tested at all, without a SLURM cluster the SLURM launcher is not."""

import pytest

NO_BROWSER = "Chromium is not installed"  # the skip reason of the browser fixture
NO_SLURM = "no local SLURM cluster"  # the skip reason of the slurm fixture (tests/test_slurm.py)

WHAT = {
    NO_BROWSER: (
        "the MLflow UI was NOT tested",
        "browser tests were skipped: Chromium is not installed. Install it (Debian/Ubuntu: "
        "apt-get install chromium; .ci/run does this where it can) and run the suite again to "
        "test what the review links open.",
    ),
    NO_SLURM: (
        "SLURM sweeps were NOT tested",
        "SLURM tests were skipped: scripts/slurm_local.sh could not start a local cluster (it "
        "needs root and apt, or SLURM, munge and MariaDB installed). Run it by hand to see why.",
    ),
}


@pytest.hookimpl(trylast=True)  # last: below the durations and the short summary
def pytest_terminal_summary(terminalreporter):
    skipped = terminalreporter.stats.get("skipped", [])
    for reason, (title, text) in WHAT.items():
        count = sum(reason in str(r.longrepr) for r in skipped)
        if count:
            terminalreporter.section(title, red=True, bold=True)
            terminalreporter.line(f"{count} {text}", red=True)
