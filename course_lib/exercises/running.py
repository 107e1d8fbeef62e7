"""Running a learner's function safely and comparing what it returns with the reference.

`call` runs the function in a worker thread with a deadline, so an exception, a wrong return type or an
endless loop becomes one readable sentence instead of a traceback from inside course_lib. A thread
cannot be killed from outside in Python: a function past its deadline is reported as too slow and left to
finish in the background (a daemon thread, gone when the kernel stops). Signals (`SIGALRM`) would stop it,
but they do not exist on Windows and only work in the main thread, so they are not used.

`difference` compares a result with an expected one of the same structure (a tensor, a number, a string,
None, or a tuple/list/dict of these) and returns None when they agree, else a sentence: the shape, the
type, or the largest difference and where it is.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

DEFAULT_TIME_LIMIT = 1.0  # seconds per call: every input is small, so a correct function needs milliseconds


class NotAttempted(Exception):
    """The learner's stub still raises NotImplementedError."""


class LearnerProblem(Exception):
    """The learner's function raised, ran too long or returned the wrong kind of value: `str(self)` says which."""


@dataclass
class Case:
    """One input: a short label for messages ("x (2, 3, 5, 8), start_pos=4") and the arguments."""

    label: str
    args: tuple
    kwargs: dict = field(default_factory=dict)


def fresh(value: Any) -> Any:
    """A deep copy of tensors (nested in tuples, lists, dicts), so a function that writes into its inputs
    changes neither the reference's inputs nor the next call's."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(fresh(v) for v in value)
    if isinstance(value, dict):
        return {k: fresh(v) for k, v in value.items()}
    return value


def call(fn: Callable, case: Case, time_limit: float = DEFAULT_TIME_LIMIT, reference_seconds: float | None = None,
         slow_hint: str = "") -> tuple[Any, float]:
    """fn(*case.args, **case.kwargs) in a worker thread: (its result, seconds taken).

    Raises NotAttempted for NotImplementedError and LearnerProblem (with a sentence) for any other exception
    or for a call still running after `time_limit` seconds.
    """
    box: dict[str, Any] = {}
    grad = torch.is_grad_enabled()

    def run() -> None:
        start = time.perf_counter()
        try:
            with torch.set_grad_enabled(grad):  # grad mode is per thread: keep the caller's
                box["value"] = fn(*fresh(case.args), **fresh(case.kwargs))
        except BaseException as error:  # noqa: BLE001 - anything the learner's code raises is reported
            box["error"] = error
        box["seconds"] = time.perf_counter() - start

    worker = threading.Thread(target=run, daemon=True, name="course-exercise")
    worker.start()
    worker.join(time_limit)
    if worker.is_alive():
        ref = "" if reference_seconds is None else f"; the reference takes {_duration(reference_seconds)}"
        raise LearnerProblem(f"too slow: still running after {time_limit:.1f} s on {case.label}{ref}"
                             + (f". {slow_hint}" if slow_hint else "")
                             + " (the call goes on in the background until it returns; if it never does, restart "
                               "the kernel)")
    error = box.get("error")
    if isinstance(error, NotImplementedError):
        raise NotAttempted()
    if error is not None:
        where = _last_learner_line(error)
        raise LearnerProblem(f"your function raised {type(error).__name__}: {error} on {case.label}{where}")
    return box["value"], box["seconds"]


def _duration(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} µs" if seconds < 1e-3 else f"{seconds * 1e3:.1f} ms"


def _last_learner_line(error: BaseException) -> str:
    """' (line N of your cell)' for the deepest frame outside course_lib and torch, if any."""
    tb, line = error.__traceback__, None
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if "course_lib" not in name and "torch" not in name and "threading" not in name:
            line = tb.tb_lineno
        tb = tb.tb_next
    return f" (line {line} of your code)" if line is not None else ""


def timed(fn: Callable, case: Case) -> tuple[Any, float]:
    """The reference's result on `case` and its seconds (run here: it is trusted)."""
    start = time.perf_counter()
    value = fn(*fresh(case.args), **fresh(case.kwargs))
    return value, time.perf_counter() - start


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {_shape(value)}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"{value!r}" if isinstance(value, (int, float, str, bool, type(None))) else f"a {type(value).__name__}"


def difference(got: Any, expected: Any, atol: float = 1e-5, rtol: float = 1e-4, what: str = "the result") -> str | None:
    """None if `got` matches `expected` (within atol + rtol·|expected| for floats), else what differs."""
    if got is None and expected is not None:
        return f"{what} should be {_describe(expected)}, got None: does the function `return` its result?"
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"{what} should be a tensor of shape {_shape(expected)}, got {_describe(got)}"
        if got.shape != expected.shape:
            return f"{what} should have shape {_shape(expected)}, got shape {_shape(got)}"
        if expected.dtype == torch.bool or not expected.is_floating_point():
            wrong = got.to(expected.dtype) != expected
            if wrong.any():
                at = tuple(int(i) for i in wrong.nonzero()[0])
                return (f"{what} differs at {int(wrong.sum())} of {wrong.numel()} places, first at index {at}: "
                        f"expected {expected[at].item()}, got {got[at].item()}")
            return None
        got_f, exp_f = got.detach().double(), expected.detach().double()
        bad_nan = torch.isnan(got_f) & ~torch.isnan(exp_f)
        if bad_nan.any():
            at = tuple(int(i) for i in bad_nan.nonzero()[0])
            return f"{what} has NaN at index {at} where {exp_f[at].item():.4g} is expected"
        both_inf = torch.isinf(exp_f) & (got_f == exp_f)
        err = torch.where(both_inf, torch.zeros_like(exp_f), (got_f - exp_f).abs().nan_to_num(nan=0.0, posinf=math.inf))
        allowed = atol + rtol * exp_f.abs().nan_to_num(posinf=0.0, neginf=0.0)
        if (err > allowed).any():
            flat = int(err.flatten().argmax())
            at = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), err.shape))
            return (f"{what} (shape {_shape(expected)}) differs by up to {err.max().item():.3g} (at index {at}: "
                    f"expected {exp_f[at].item():.4g}, got {got_f[at].item():.4g})")
        return None
    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            return f"{what} should be {_describe(expected)}, got {_describe(got)}"
        for i, (g, e) in enumerate(zip(got, expected)):
            if (msg := difference(g, e, atol, rtol, f"item {i} of {what}")) is not None:
                return msg
        return None
    if isinstance(expected, Mapping):
        if not isinstance(got, Mapping) or set(got) != set(expected):
            return f"{what} should be a dict with keys {sorted(expected)}, got {_describe(got)}"
        for key in expected:
            if (msg := difference(got[key], expected[key], atol, rtol, f"{what}[{key!r}]")) is not None:
                return msg
        return None
    if isinstance(expected, bool) or expected is None or isinstance(expected, str):
        if type(got) is not type(expected) and not (isinstance(expected, bool) and isinstance(got, torch.Tensor)):
            return f"{what} should be {_describe(expected)}, got {_describe(got)}"
        return None if (bool(got) if isinstance(expected, bool) else got) == expected else \
            f"{what} should be {expected!r}, got {got!r}"
    if isinstance(expected, (int, float)):
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if isinstance(got, bool) or not isinstance(got, (int, float)):
            return f"{what} should be a number ({expected!r}), got {_describe(got)}"
        if math.isnan(got) and not math.isnan(expected):
            return f"{what} should be {expected:.6g}, got NaN"
        if math.isinf(got) or math.isinf(expected):
            return None if got == expected else f"{what} should be {expected:.6g}, got {got:.6g}"
        if abs(got - expected) > atol + rtol * abs(expected):
            return f"{what} should be {expected:.6g}, got {got:.6g}"
        return None
    return None if got == expected else f"{what} should be {expected!r}, got {got!r}"
