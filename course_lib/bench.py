"""Timing helpers: warm-up, median of repeats, and callables measured alternately (round-robin).

Used by notebooks and by `course_lib.benchmarks` (`python -m course_lib.benchmarks kv|moe|mtp`); unit tests
never assert on time.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


def _sync() -> None:
    """Wait for queued GPU work, so a timer reads the clock after the work and not before (CUDA and MPS)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        torch.mps.synchronize()


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


def compare_many(fns: dict[str, Callable[[], object]], warmup: int = 1, repeats: int = 5,
                 clock: Callable[[], float] = time.perf_counter,
                 sample_seconds: float | None = None) -> dict[str, Timing]:
    """Time several callables round-robin (a, b, c, a, b, c, ...), so drift in machine load hits all alike.

    With `sample_seconds`, each of the `repeats` samples is a run of back-to-back calls about that long
    (the count per callable set after the warm-up from one more timed call) and records the time per call,
    as `timeit` does: a call of a few milliseconds, timed alone, is at the mercy of one scheduler hiccup; a
    sample of tens of milliseconds averages those out, and the median over samples drops the samples a busy
    neighbour spoiled. Without it, each sample is one call.

    `clock=time.process_time` counts this process's CPU time instead of wall time: on a machine shared with
    other jobs it is much steadier, but it only means latency when torch runs one thread (set_num_threads(1)).
    """
    if repeats < 1 or warmup < 0 or (sample_seconds is not None and sample_seconds <= 0):
        raise ValueError(f"need repeats >= 1, warmup >= 0 and sample_seconds > 0 (or None), got "
                         f"repeats={repeats}, warmup={warmup}, sample_seconds={sample_seconds}.")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    numbers = {name: 1 for name in fns}
    if sample_seconds is not None:
        for name, fn in fns.items():  # calls per sample, from one timed call each
            _sync()
            t0 = clock()
            fn()
            _sync()
            numbers[name] = max(1, round(sample_seconds / max(clock() - t0, 1e-9)))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            n = numbers[name]
            _sync()
            t0 = clock()
            for _ in range(n):
                fn()
            _sync()
            times[name].append((clock() - t0) / n)
    return {name: Timing(statistics.median(ts), tuple(ts)) for name, ts in times.items()}


def compare(fn_a: Callable[[], object], fn_b: Callable[[], object], warmup: int = 1, repeats: int = 5,
            sample_seconds: float | None = None, clock: Callable[[], float] = time.perf_counter) -> Comparison:
    """Time two callables alternately (a, b, a, b, ...), so drift in machine load hits both alike; with
    `sample_seconds`, each sample is that long a run of back-to-back calls (see `compare_many`)."""
    t = compare_many({"a": fn_a, "b": fn_b}, warmup, repeats, clock=clock, sample_seconds=sample_seconds)
    return Comparison(t["a"], t["b"])

