"""Repository-wide pytest hooks: report each notebook's run time under nbval (for the README's table)."""

import json
from collections import defaultdict
from pathlib import Path

_notebook_seconds: dict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::")[0]
    if path.endswith(".ipynb"):
        _notebook_seconds[path] += report.duration


def pytest_terminal_summary(terminalreporter):
    if _notebook_seconds:
        terminalreporter.write_sep("-", "notebook run times (setup + cells + teardown)")
        for path, seconds in sorted(_notebook_seconds.items()):
            terminalreporter.write_line(f"{seconds:7.1f} s  {path}")
        # For the README's contents table: python tools/report.py --times test-artifacts/notebook_times.json
        out = Path(__file__).parent / "test-artifacts" / "notebook_times.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps({Path(p).name: round(s, 1) for p, s in sorted(_notebook_seconds.items())}, indent=1))


def pytest_collection_modifyitems(items):
    # nbval waits only 5 s for a cell's outputs after the kernel says the cell is done; a busy 2-core
    # machine (CI beside other jobs) can take longer to flush a training cell's progress bar and plot.
    for item in items:
        if hasattr(item, "output_timeout"):
            item.output_timeout = 120
