"""The notebooks' Exercises sections: each holds a cell for every exercise registered for its notebook, and each
cell, run as a learner first finds it, prints one verdict line: "not attempted yet", or a pass with
COURSE_SOLUTIONS=1. The cells are run in a fresh namespace: they need nothing from the notebook above them.
"""

import contextlib
import io
import json
from pathlib import Path

import pytest

from course_lib.exercises import SOLUTIONS_ENV, by_notebook

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
WITH_SECTION = [f"{i:02d}" for i in range(10)]  # the notebooks whose Exercises section is written


def exercise_cells(number: str) -> list[str]:
    """The code cells of the notebook's Exercises section that call `exercise(...)`, in order."""
    path = next(NOTEBOOKS.glob(f"{number}_*.ipynb"))
    cells = [(c["cell_type"], "".join(c["source"])) for c in json.loads(path.read_text())["cells"]]
    starts = [i for i, (kind, src) in enumerate(cells) if kind == "markdown" and src.startswith("## Exercises")]
    assert len(starts) == 1, f"{path.name} should have one '## Exercises' section, has {len(starts)}"
    return [src for kind, src in cells[starts[0]:] if kind == "code" and "exercise(" in src]


def run_cells(cells: list[str]) -> list[list[str]]:
    """Each cell's printed lines, run one after another in one fresh namespace, as a notebook would."""
    namespace, printed = {}, []
    for src in cells:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(src, "<exercise cell>", "exec"), namespace)  # noqa: S102 - the notebook's own cells
        printed.append(out.getvalue().splitlines())
    return printed


@pytest.mark.parametrize("number", WITH_SECTION)
def test_the_section_has_a_cell_for_each_registered_exercise(number):
    named = [src.split('exercise("', 1)[1].split('"', 1)[0] for src in exercise_cells(number)]
    assert sorted(named) == sorted(ex.name for ex in by_notebook(number))


@pytest.mark.parametrize("number", WITH_SECTION)
def test_each_stub_prints_one_line_saying_not_attempted(number, monkeypatch):
    monkeypatch.delenv(SOLUTIONS_ENV, raising=False)
    for lines in run_cells(exercise_cells(number)):
        assert len(lines) == 1 and "not attempted yet" in lines[0], lines


@pytest.mark.parametrize("number", WITH_SECTION)
def test_with_solutions_on_each_cell_passes(number, monkeypatch):
    monkeypatch.setenv(SOLUTIONS_ENV, "1")
    for lines in run_cells(exercise_cells(number)):
        assert len(lines) == 1 and "PASS" in lines[0], lines
