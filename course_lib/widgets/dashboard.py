"""GRPO track (notebooks 06-07): the live training dashboard of a GRPO run.

A thin view over `course_lib.grpo` (which computes every per-step number, `rollout_stats`) and the
pure functions below (`smoothed`, `dashboard_rows`, `format_dashboard_rows`), which are what
tests/test_widgets.py checks.
"""

from __future__ import annotations

import math
import time

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .charts import LAYOUT, live_view, summary_rows

GRPO_METRICS = ("reward", "accuracy", "format_rate", "length", "zero_adv_frac", "truncation_rate", "kl", "entropy")
GRPO_METRIC_TITLES = {"reward": "reward", "accuracy": "accuracy (sampled)", "format_rate": "format rate (strict)",
                      "length": "completion length (tokens)", "zero_adv_frac": "zero-advantage groups",
                      "truncation_rate": "truncated", "kl": "KL to reference (k3)", "entropy": "entropy (nats/token)"}


def _gaps(values: list[float]) -> list[float | None]:
    """NaN/inf (a step that did not measure this, e.g. KL with `kl_every`) as None: a gap in the plot.
    The widget sends its data as JSON, which has no NaN."""
    return [v if math.isfinite(v) else None for v in values]


def smoothed(values: list[float], window: int) -> list[float]:
    """Trailing moving average over the last ``window`` finite values (NaN where there are none yet)."""
    out = []
    for i in range(len(values)):
        recent = [v for v in values[max(0, i - window + 1):i + 1] if math.isfinite(v)]
        out.append(sum(recent) / len(recent) if recent else float("nan"))
    return out


def dashboard_rows(history: list[dict], metrics: tuple[str, ...] = GRPO_METRICS, n: int = 6,
                   window: int = 1) -> list[tuple]:
    """About ``n`` evenly spaced rows ``(step, value per metric)`` of a GRPO history (one stats dict per
    step), first and last included, each value the trailing mean over ``window`` steps."""
    steps = list(range(len(history)))
    columns = {m: smoothed([float(h.get(m, float("nan"))) for h in history], window) for m in metrics}
    return [(s, *(columns[m][s] for m in metrics)) for s, _ in summary_rows(steps, steps, n)]


def format_dashboard_rows(rows: list[tuple], metrics: tuple[str, ...] = GRPO_METRICS) -> str:
    """The static table: one line per row, a column per metric wide enough for its name, 3 decimals
    (length with 1)."""
    widths = [max(len(m), 8) + 2 for m in metrics]
    lines = [f"{'step':>5}" + "".join(f"{m:>{w}}" for m, w in zip(metrics, widths))]
    for step, *vals in rows:
        lines.append(f"{step:>5}" + "".join(f"{v:>{w}.1f}" if m == "length" else f"{v:>{w}.3f}"
                                            for m, v, w in zip(metrics, vals, widths)))
    return "\n".join(lines)


class TrainingDashboard:
    """Live small multiples of a GRPO run: reward, accuracy, format rate, length, zero-advantage
    fraction, truncation, KL and entropy against the step (dots: each step; line: the moving average).

    Pass it as `train_grpo(..., callback=dashboard)` (it takes `(step, stats, rollout)`), or call
    `update(step, stats)`. Redraws every `every` steps and at most once per `min_interval` seconds;
    `finish()` draws the last state and prints the static table (for nbval and readers on the web).
    With `viewer=CompletionsViewer(...)` it also refreshes that viewer with the latest rollout.
    """

    def __init__(self, metrics: tuple[str, ...] = GRPO_METRICS, title: str = "GRPO", every: int = 5,
                 min_interval: float = 1.0, window: int = 10, viewer=None, live: bool = True) -> None:
        self.metrics, self.every, self.min_interval, self.window, self.viewer = metrics, every, min_interval, window, viewer
        self.history: list[dict] = []
        self.draws, self.seconds, self._last_draw = 0, 0.0, float("-inf")  # the first eligible step draws
        cols = 4 if len(metrics) > 3 else len(metrics)
        rows = -(-len(metrics) // cols)
        fig = make_subplots(rows=rows, cols=cols, subplot_titles=[GRPO_METRIC_TITLES.get(m, m) for m in metrics],
                            horizontal_spacing=0.06, vertical_spacing=0.16)
        for i, _ in enumerate(metrics):
            r, c = i // cols + 1, i % cols + 1
            fig.add_trace(go.Scatter(x=[], y=[], mode="markers", marker=dict(size=3, color="#9ab"), showlegend=False),
                          row=r, col=c)
            fig.add_trace(go.Scatter(x=[], y=[], mode="lines", line=dict(color="#1f5fbf"), showlegend=False), row=r, col=c)
        fig.update_layout(**{**LAYOUT, "height": 260 * rows, "margin": dict(l=40, r=20, t=70, b=30)}, title=title)
        self.fig = go.FigureWidget(fig) if live else fig
        self.view = live_view(self.fig, f"live dashboard: {title}", live)

    def __call__(self, step: int, stats: dict, rollout=None) -> None:
        self.update(step, stats, rollout)

    def update(self, step: int, stats: dict, rollout=None) -> None:
        t0 = time.perf_counter()
        self.history.append({m: float(stats.get(m, float("nan"))) for m in self.metrics})
        if step % self.every == 0 and t0 - self._last_draw >= self.min_interval:
            self.redraw()
            if self.viewer is not None and rollout is not None:
                self.viewer.update(rollout)
            self._last_draw = time.perf_counter()
        self.seconds += time.perf_counter() - t0

    def redraw(self) -> None:
        steps = list(range(len(self.history)))
        with self.fig.batch_update():
            for i, m in enumerate(self.metrics):
                raw = [h[m] for h in self.history]
                dots, line = self.fig.data[2 * i], self.fig.data[2 * i + 1]
                dots.x, dots.y = steps, _gaps(raw)
                line.x, line.y = steps, _gaps(smoothed(raw, self.window))
        self.draws += 1

    def finish(self, n: int = 6) -> list[tuple]:
        """Draw the final state and print the static table (moving averages); returns its rows."""
        self.redraw()
        if self.view is not None:
            self.view.freeze(self.fig, text=f"dashboard: {self.fig.layout.title.text}")
        if self.viewer is not None:
            self.viewer.freeze()
        rows = dashboard_rows(self.history, self.metrics, n, self.window)
        print(f"moving averages over {self.window} steps")
        print(format_dashboard_rows(rows, self.metrics))
        return rows
