"""Repository-wide pytest hooks: report each notebook's run time under nbval (for the README's table), and
keep a notebook beside the one whose checkpoint it reuses when `make test` runs two at once."""

import json
from collections import defaultdict
from pathlib import Path

try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # pytest-xdist is a test extra; without it (make colab-check) tests run in one process
    LoadScopeScheduling = None

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


# A learner runs the notebooks in order, so notebook 08 finds notebook 07's GRPO run of the baseline among
# the checkpoints and compares against it. `make test` runs two notebooks at a time (--dist loadscope: each
# notebook whole on one worker); 07 and 08 form one unit of work, 08 after 07, so 08 is measured as a learner
# runs it instead of retraining 07's model beside it. (Every notebook still trains what it needs when a
# checkpoint is missing.)
RUN_TOGETHER = {"notebooks/07_grpo.ipynb": "notebooks/07+08", "notebooks/08_nano_deepseek.ipynb": "notebooks/07+08"}


if LoadScopeScheduling is not None:
    class NotebookScheduling(LoadScopeScheduling):
        """xdist's loadscope, with the notebooks of RUN_TOGETHER as one scope."""

        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return RUN_TOGETHER.get(scope, scope)

    def pytest_xdist_make_scheduler(config, log):
        if config.getvalue("dist") == "loadscope":
            return NotebookScheduling(config, log)
        return None


def pytest_collection_modifyitems(items):
    # nbval waits only 5 s for a cell's outputs after the kernel says the cell is done; a busy 2-core
    # machine (CI beside other jobs) can take longer to flush a training cell's progress bar and plot.
    for item in items:
        if hasattr(item, "output_timeout"):
            item.output_timeout = 120
