"""The exercise types: implement-this, predict-then-measure, open experiment; their verdicts, hints and solutions.

Every exercise answers `check(answer)` with a `Result` (`passed`, `message`: one pass line or one specific
message) and keeps its reference in `solution`. What a notebook cell calls:

    ex = exercise("rope_interleaved")
    ex.task()                 # the one-line statement, with its source in the papers
    rope = ex.use(my_rope)    # prints the verdict; returns my_rope if it passed, else course_lib's reference
    ex.hint(); ex.show_solution()   # only when asked

An unattempted answer (None, `...`, or a stub that raises NotImplementedError) is "not attempted yet", never
an error, and `use` hands back the reference so the rest of the notebook runs. With the environment variable
COURSE_SOLUTIONS=1, `use` fills every exercise with its reference solution (and checks it).

An implement-this check runs the learner's function and the reference on seeded inputs of several shapes,
edge cases included; on a mismatch it runs each known mistake on the same input, and if the learner's output
matches one, the message names that mistake with its hint.
"""

from __future__ import annotations

import inspect
import os
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .running import DEFAULT_TIME_LIMIT, Case, LearnerProblem, NotAttempted, call, difference, timed

SOLUTIONS_ENV = "COURSE_SOLUTIONS"
KINDS = ("implement", "predict", "experiment")


def solutions_on() -> bool:
    """True when COURSE_SOLUTIONS is set to 1/true/yes/on: every exercise then uses its reference."""
    return os.environ.get(SOLUTIONS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def unanswered(answer: Any) -> bool:
    """None and `...` are what a notebook's exercise cell holds before the learner writes anything."""
    return answer is None or answer is Ellipsis


@dataclass(frozen=True)
class Result:
    """A check's verdict: `passed`, and `message`, one line (a pass line, or what is wrong and a hint)."""

    passed: bool
    message: str
    attempted: bool = True

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Mistake:
    """A common wrong version of the idea: `name` says what it gets wrong, `hint` how to see it.

    For an implement-this exercise `wrong` is a function with the reference's signature; for a predict
    exercise, the value that mistake gives (or a function of the right value).
    """

    name: str
    hint: str
    wrong: Any


@dataclass
class Exercise:
    """What every exercise has: where it sits, what it asks, a hint and a reference, and `check`."""

    name: str
    notebook: str           # "00" .. "10"
    statement: str          # the one-line task, citing its source
    hint_text: str
    details: str = ""       # printed under the statement by task(), e.g. the inputs of a prediction
    kind: str = field(init=False, default="")

    @property
    def solution(self) -> Any:
        raise NotImplementedError

    def check(self, answer: Any) -> Result:
        raise NotImplementedError

    # ---- what a notebook cell calls
    def task(self) -> None:
        print(f"[{self.notebook}] {self.name} ({self.kind}): {self.statement}")
        if self.details:
            print(self.details)

    def hint(self) -> None:
        print(f"hint for {self.name}: {self.hint_text}")

    def show_solution(self) -> None:
        print(self.solution_text())

    def solution_text(self) -> str:
        raise NotImplementedError

    def use(self, answer: Any) -> Any:
        """Print the one-line verdict on `answer` and return it if it passed, else the reference."""
        if solutions_on():
            result = self.check(self.solution)
            print(f"{SOLUTIONS_ENV}=1, using the reference solution: {result.message}")
            return self.solution
        result = self.check(answer)
        print(result.message)
        return answer if result.passed else self.fallback(answer)

    def fallback(self, answer: Any) -> Any:
        return self.solution

    def _not_attempted(self, then: str = "the notebook continues with course_lib's version") -> Result:
        return Result(False, f"{self.name}: not attempted yet; {then} (ex.hint() for a hint, "
                             f"ex.show_solution() for the answer)", attempted=False)

    def _fail(self, text: str) -> Result:
        return Result(False, f"{self.name}: {text}")


@dataclass
class Implement(Exercise):
    """Implement a function; checked on seeded `cases()` against `reference`, with known `mistakes`."""

    reference: Callable = None
    cases: Callable[[], list[Case]] = None
    mistakes: tuple[Mistake, ...] = ()
    atol: float = 1e-5
    rtol: float = 1e-4
    slow_hint: str = ""
    properties: Callable[[Case, Any], str | None] | None = None  # the idea's properties, checked on a mismatch
    compare: Callable[[Any, Any], str | None] | None = None  # replaces `difference` (e.g. order-free top-k)

    def __post_init__(self) -> None:
        self.kind = "implement"

    @property
    def solution(self) -> Callable:
        return self.reference

    def solution_text(self) -> str:
        return f"# the reference solution of {self.name}\n" + textwrap.dedent(inspect.getsource(self.reference))

    def _differs(self, got: Any, expected: Any) -> str | None:
        if self.compare is not None:
            return self.compare(got, expected)
        return difference(got, expected, self.atol, self.rtol)

    def check(self, fn: Any, time_limit: float = DEFAULT_TIME_LIMIT) -> Result:
        if unanswered(fn):
            return self._not_attempted()
        if not callable(fn):
            return self._fail(f"expected a function, got {type(fn).__name__}: pass the function itself, "
                              f"e.g. ex.check(my_fn), not my_fn(...)")
        cases = self.cases()
        outputs = []  # (case, the learner's output, the reference's), in order, up to the first mismatch
        for case in cases:
            expected, ref_seconds = timed(self.reference, case)
            try:
                got, _ = call(fn, case, time_limit, ref_seconds, self.slow_hint)
            except NotAttempted:
                return self._not_attempted()
            except LearnerProblem as problem:
                return self._fail(str(problem))
            outputs.append((case, got, expected))
            if (diff := self._differs(got, expected)) is not None:
                return self._fail(self._explain(outputs, fn, cases[len(outputs):], diff, time_limit))
        labels = "; ".join(c.label for c in cases[:3]) + ("; ..." if len(cases) > 3 else "")
        return Result(True, f"{self.name}: PASS on {len(cases)} seeded inputs ({labels})")

    def _explain(self, outputs: list, fn: Callable, rest: list[Case], diff: str, time_limit: float) -> str:
        """The message for the first mismatch: the mistake the learner's outputs agree with, if any.

        A mistake that agrees with the learner on every input is named first (several mistakes can give the
        same wrong output on one input); else one that agrees on the failing input.
        """
        fail_at = len(outputs) - 1
        case, got, expected = outputs[fail_at]
        for case_rest in rest:  # the remaining inputs tell mistakes apart; a problem there just ends the look
            try:
                outputs.append((case_rest, call(fn, case_rest, time_limit)[0], timed(self.reference, case_rest)[0]))
            except (NotAttempted, LearnerProblem):
                break
        fits_here, fits_all = [], []
        for mistake in self.mistakes:
            wrong = [_run_mistake(mistake.wrong, c) for c, _, _ in outputs]
            if wrong[fail_at] is _FAILED or self._differs(wrong[fail_at], expected) is None \
                    or self._differs(got, wrong[fail_at]) is not None:
                continue  # cannot run here, right on the failing input, or not what the learner returned there
            fits_here.append(mistake)
            if all(w is not _FAILED and self._differs(g, w) is None for (_, g, _), w in zip(outputs, wrong)):
                fits_all.append(mistake)
        if fits_all or fits_here:
            mistake = (fits_all or fits_here)[0]
            return f"on {case.label}: looks like {mistake.name}. {mistake.hint}"
        if self.properties is not None and (broken := self.properties(case, got)):
            return f"on {case.label}: {broken}; {diff}"
        return f"on {case.label}: {diff}"


_FAILED = object()


def _run_mistake(wrong: Callable, case: Case) -> Any:
    """A known mistake's output on `case`, or _FAILED when that mistake cannot run on it (e.g. wrong shapes)."""
    try:
        return timed(wrong, case)[0]
    except Exception:  # noqa: BLE001 - a mistake that cannot run on this input recognises nothing here
        return _FAILED


@dataclass
class Predict(Exercise):
    """Compute a number before measuring it; `value` is the right one (a function when it depends on the profile)."""

    value: Any = None
    how: str = ""           # how the right value follows, shown with the solution
    rel_tol: float = 1e-6  # counts and bytes are exact; a rounded prediction sets its own tolerance
    unit: str = ""
    mistakes: tuple[Mistake, ...] = ()

    def __post_init__(self) -> None:
        self.kind = "predict"

    @property
    def solution(self) -> Any:
        return self.value() if callable(self.value) else self.value

    def solution_text(self) -> str:
        return f"{self.name} = {self.solution!r} {self.unit}\n{self.how}".rstrip()

    def fallback(self, answer: Any) -> Any:
        return self.solution

    def check(self, answer: Any) -> Result:
        if unanswered(answer):
            return self._not_attempted("the notebook continues with the measured value")
        right = self.solution
        if difference(answer, right, atol=0.0, rtol=self.rel_tol) is None:
            return Result(True, f"{self.name}: PASS, {_fmt(right)} {self.unit}".rstrip())
        for mistake in self.mistakes:
            wrong = mistake.wrong(right) if callable(mistake.wrong) else mistake.wrong
            if difference(answer, wrong, atol=0.0, rtol=self.rel_tol) is None:
                return self._fail(f"{_fmt(answer)} looks like {mistake.name}. {mistake.hint}")
        text = difference(answer, right, atol=0.0, rtol=self.rel_tol, what="your prediction") or ""
        if isinstance(answer, (int, float)) and not isinstance(answer, bool) and isinstance(right, (int, float)) and right:
            text += f" ({answer / right:.3g}x the right value)"
        return self._fail(text + ". ex.hint() says where to start")


@dataclass
class Experiment(Exercise):
    """An open experiment: the learner measures, `check` reads the numbers against the stated `expected` outcome.

    `required` lists the keys the measurements need; `judge(measurements)` returns None when they show the
    expected outcome, else what they show instead. `example` is a set of numbers of the expected shape.
    """

    expected: str = ""
    required: tuple[str, ...] = ()
    judge: Callable[[Mapping], str | None] = None
    example: Mapping = None  # numbers of the expected shape and outcome (what `solution` returns)
    against: Mapping = None  # numbers showing the opposite outcome, which `check` must reject

    def __post_init__(self) -> None:
        self.kind = "experiment"

    @property
    def solution(self) -> Mapping:
        return self.example

    def solution_text(self) -> str:
        return (f"expected outcome of {self.name}: {self.expected}\n"
                f"measurements of that shape (illustrative, not from your machine): {dict(self.example)!r}")

    def fallback(self, answer: Any) -> Any:
        return answer

    def task(self) -> None:
        super().task()
        print(f"  pass your measurements as a dict with keys {list(self.required)}; expected: {self.expected}")

    def check(self, measured: Any) -> Result:
        if unanswered(measured):
            return self._not_attempted("run it when you have a few minutes")
        if not isinstance(measured, Mapping):
            return self._fail(f"pass a dict of what you measured, with keys {list(self.required)}; "
                              f"got {type(measured).__name__}")
        missing = [k for k in self.required if k not in measured]
        if missing:
            return self._fail(f"the measurements lack {missing}: pass a dict with keys {list(self.required)}")
        try:
            verdict = self.judge(measured)
        except (TypeError, ValueError, KeyError, ZeroDivisionError) as problem:
            return self._fail(f"could not read the measurements ({type(problem).__name__}: {problem}); "
                              f"the shape expected: {dict(self.example)!r}")
        if verdict is None:
            return Result(True, f"{self.name}: PASS, your numbers show the expected outcome: {self.expected}")
        return self._fail(f"{verdict}. Expected: {self.expected} If you measured carefully, rerun with another "
                          f"seed before concluding: one run on a small model is noisy")


def _fmt(value: Any) -> str:
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.4g}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:,.0f}"
    return repr(value)
