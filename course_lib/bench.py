"""Timing helpers: warm-up, median of repeats, and the ratio of two callables measured alternately.

Used by notebooks and benchmark scripts only: unit tests never assert on time.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Timing:
    median: float          # seconds per call
    times: tuple           # every repeat, seconds

    def per_second(self, units: float) -> float:
        """Throughput, e.g. tokens per second when one call handles `units` tokens."""
        return units / self.median


def time_callable(fn: Callable[[], object], warmup: int = 1, repeats: int = 5) -> Timing:
    """Run fn `warmup` times untimed, then `repeats` times timed; report the median."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), tuple(times))


@dataclass(frozen=True)
class Comparison:
    a: Timing
    b: Timing

    @property
    def speedup(self) -> float:
        """How many times faster a is than b (median of b / median of a)."""
        return self.b.median / self.a.median


def compare(fn_a: Callable[[], object], fn_b: Callable[[], object], warmup: int = 1, repeats: int = 5) -> Comparison:
    """Time two callables alternately (a, b, a, b, ...), so drift in machine load hits both alike."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")
    for _ in range(warmup):
        fn_a()
        fn_b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, sink in ((fn_a, ta), (fn_b, tb)):
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            sink.append(time.perf_counter() - t0)
    return Comparison(Timing(statistics.median(ta), tuple(ta)), Timing(statistics.median(tb), tuple(tb)))
