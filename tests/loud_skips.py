"""A pytest plugin (named in conftest.py): browser tests that could not run are said at the end
of the run in red, not only counted among the skips, since without Chromium the review in
the MLflow UI is not tested at all."""

import pytest

NO_BROWSER = "Chromium is not installed"  # the skip reason of the browser fixture


@pytest.hookimpl(trylast=True)  # last: below the durations and the short summary
def pytest_terminal_summary(terminalreporter):
    """A browser test that could not run is said at the end in red, not only counted among
    the skips: without Chromium the review in the MLflow UI is not tested at all."""
    skipped = [
        r for r in terminalreporter.stats.get("skipped", []) if NO_BROWSER in str(r.longrepr)
    ]
    if skipped:
        terminalreporter.section("the MLflow UI was NOT tested", red=True, bold=True)
        terminalreporter.line(
            f"{len(skipped)} browser tests were skipped: Chromium is not installed. Install it "
            "(Debian/Ubuntu: apt-get install chromium; .ci/run does this where it can) and run "
            "the suite again to test what the review links open.",
            red=True,
        )
