"""Exercises with automatic feedback for every notebook: implement-this, predict-then-measure, open experiments.

In a notebook:

    from course_lib.exercises import exercise
    ex = exercise("rope_interleaved")
    ex.task()                        # what to do, with the paper and equation it comes from

    def my_rope(x, start_pos, theta=10000.0):
        raise NotImplementedError    # the learner's code goes here

    rope = ex.use(my_rope)           # one line: PASS, "not attempted yet", or what is wrong and a hint;
                                     # returns my_rope if it passed, else course_lib's reference
    ex.hint()                        # on request
    ex.show_solution()               # on request: the reference's source (a predict's value, an experiment's outcome)

A predict-then-measure exercise takes a number (`ex.use(my_bytes)`), an experiment a dict of what was measured
(`ex.use({"cached_short_ms": ..., ...})`). An answer left as None or `...`, or a stub that raises
NotImplementedError, is "not attempted yet", never an error. COURSE_SOLUTIONS=1 in the environment makes every
`use` take the reference solution (and check it), so a notebook runs top to bottom with every exercise filled.

For tooling: `EXERCISES` maps each name to its exercise: `check(answer)` returns a `Result` with `passed`
and `message`; `solution` is the reference function (a predict's right value; an experiment's illustrative
measurements); `notebook`, `kind` ("implement", "predict", "experiment") and `statement` say what it is.
Checks are plain functions rather than pytest tests run by ipytest: a pytest report is a traceback, and a
learner needs one sentence.
"""

from . import balance, beyond, decoder, experts, heads, parallel, rl
from .core import KINDS, SOLUTIONS_ENV, Exercise, Experiment, Implement, Mistake, Predict, Result, solutions_on

EXERCISES: dict[str, Exercise] = {}
for _part in (decoder, heads, experts, balance, rl, beyond, parallel):
    for _ex in _part.EXERCISES:
        if _ex.name in EXERCISES:
            raise ValueError(f"two exercises are named {_ex.name!r}")
        EXERCISES[_ex.name] = _ex
EXERCISES = dict(sorted(EXERCISES.items(), key=lambda item: item[1].notebook))


def exercise(name: str) -> Exercise:
    """The exercise called `name`; a KeyError lists the names of the same notebook prefix if it is unknown."""
    if name not in EXERCISES:
        close = [n for n in EXERCISES if n.split("_")[0] == name.split("_")[0]] or list(EXERCISES)
        raise KeyError(f"no exercise named {name!r}; known: {', '.join(close)}")
    return EXERCISES[name]


def by_notebook(notebook: str) -> list[Exercise]:
    """The exercises of one notebook ("00" .. "10"), in the order they are listed."""
    return [ex for ex in EXERCISES.values() if ex.notebook == notebook]


def readme_table() -> str:
    """The README's list of exercises (a test keeps it in sync): one row each with name, notebook and kind."""
    rows = ["| exercise | notebook | kind |", "|---|---|---|"]
    rows += [f"| `{ex.name}` | {ex.notebook} | {ex.kind} |" for ex in EXERCISES.values()]
    return "\n".join(rows)


__all__ = ["EXERCISES", "KINDS", "SOLUTIONS_ENV", "Exercise", "Experiment", "Implement", "Mistake", "Predict",
           "Result", "by_notebook", "exercise", "readme_table", "solutions_on"]
