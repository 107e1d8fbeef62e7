"""MoE track (notebooks 04-05): the expert-load monitor, live load of every expert over training.

A thin view over `course_lib.balancing`'s load statistics (LoadTracker passes each step's (L, E) token
counts); the pure functions below turn them into what is drawn and printed, and tests check them.
"""

from __future__ import annotations

import time

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .charts import LAYOUT, live_view, summary_rows


def load_ratios(loads) -> list[list[float]]:
    """Token counts (L, E) (or one layer's (E,)) -> each expert's load over its layer's mean, as lists.

    1.0 is a perfectly balanced expert, 0 an unused one; the largest ratio minus 1 is the layer's MaxVio.
    """
    rows = loads.tolist() if hasattr(loads, "tolist") else list(loads)
    if rows and not isinstance(rows[0], (list, tuple)):
        rows = [rows]
    out = []
    for row in rows:
        mean = sum(row) / len(row)
        out.append([v / mean if mean > 0 else 0.0 for v in row])
    return out


def keep_columns(n: int, max_columns: int) -> list[int]:
    """At most `max_columns` evenly spaced indices of n columns, always the first and the last, so a
    heatmap of a long run stays small to send and draw."""
    if n <= max_columns:
        return list(range(n))
    return sorted({round(i * (n - 1) / (max_columns - 1)) for i in range(max_columns)})


def load_heatmap_data(steps: list[int], ratios: list[list[list[float]]], max_columns: int = 150) -> tuple:
    """(x, y, z) for the heatmap: x the kept steps, y one label per (layer, expert) row, z rows × steps."""
    cols = keep_columns(len(steps), max_columns)
    if not ratios:
        return [], [], []
    n_layers, n_experts = len(ratios[0]), len(ratios[0][0])
    y = [f"L{layer} E{e}" if n_layers > 1 else f"E{e}" for layer in range(n_layers) for e in range(n_experts)]
    z = [[ratios[c][layer][e] for c in cols] for layer in range(n_layers) for e in range(n_experts)]
    return [steps[c] for c in cols], y, z


def load_summary(steps: list[int], ratios: list[list[list[float]]], n: int = 6) -> list[tuple]:
    """About n rows (step, MaxVio, busiest expert's label, its ratio, unused experts) for the static table.

    MaxVio is averaged over layers, as `course_lib.balancing.mean_max_violation` does; the busiest expert and
    the count of experts with no tokens are over all layers.
    """
    rows = []
    for step, _ in summary_rows(steps, list(range(len(steps))), n):
        r = ratios[steps.index(step)]
        max_vio = sum(max(layer) - 1 for layer in r) / len(r)
        layer, e = max(((i, j) for i in range(len(r)) for j in range(len(r[i]))), key=lambda ij: r[ij[0]][ij[1]])
        label = f"L{layer} E{e}" if len(r) > 1 else f"E{e}"
        rows.append((step, max_vio, label, r[layer][e], sum(v == 0 for layer_r in r for v in layer_r)))
    return rows


class ExpertLoadMonitor:
    """Live heatmap of each expert's load (over its layer's mean) across training steps, and a bar of the
    current load; redrawn every `every` steps and at most once per `min_interval` seconds.

    Use as `LoadTracker(model, on_load=monitor.update)`, or call `update(step, loads)` with (L, E) counts.
    `finish()` draws the last state and prints the static table (for nbval and readers on the web).
    `seconds` is the time spent inside `update`, so a notebook can show what the monitor costs.
    Colours run from blue (starved) through white (the fair share, 1) to red (overloaded, saturating at
    `zmax` times the mean, so that white sits at the middle of the scale only when zmax = 2).
    """

    def __init__(self, title: str = "expert load (1 = balanced)", every: int = 10, min_interval: float = 0.5,
                 max_columns: int = 150, zmax: float = 2.0, live: bool = True) -> None:
        self.every, self.min_interval, self.max_columns = every, min_interval, max_columns
        self.steps: list[int] = []
        self.ratios: list[list[list[float]]] = []
        self.draws, self.seconds, self._last_draw = 0, 0.0, float("-inf")  # the first eligible step draws
        fig = make_subplots(rows=1, cols=2, column_widths=[0.72, 0.28], horizontal_spacing=0.12, shared_yaxes=True,
                            subplot_titles=("load per expert over steps", "current load"))
        white = 1.0 / zmax  # where the fair share (load / mean = 1) falls on the 0..zmax scale
        scale = [[0.0, "#2166ac"], [white / 2, "#92c5de"], [white, "#f7f7f7"],
                 [(1 + white) / 2, "#f4a582"], [1.0, "#b2182b"]]
        fig.add_trace(go.Heatmap(x=[], y=[], z=[], zmin=0, zmax=zmax, colorscale=scale,
                                 colorbar=dict(title="load / mean", x=0.645, thickness=12)), row=1, col=1)
        fig.add_trace(go.Bar(x=[], y=[], orientation="h", marker_color="#636efa", showlegend=False), row=1, col=2)
        fig.add_vline(x=1.0, line_dash="dot", row=1, col=2)
        fig.update_layout(**{**LAYOUT, "height": 380, "margin": dict(l=50, r=20, t=80, b=40)}, title=title)
        fig.update_xaxes(title_text="step", row=1, col=1)
        fig.update_xaxes(title_text="load / mean", row=1, col=2)
        self.fig = go.FigureWidget(fig) if live else fig
        self.view = live_view(self.fig, f"live expert load: {title}", live)

    def update(self, step: int, loads) -> None:
        t0 = time.perf_counter()
        self.steps.append(step)
        self.ratios.append(load_ratios(loads))
        if step % self.every == 0 and t0 - self._last_draw >= self.min_interval:
            self.redraw()
            self._last_draw = time.perf_counter()
        self.seconds += time.perf_counter() - t0

    def redraw(self) -> None:
        x, y, z = load_heatmap_data(self.steps, self.ratios, self.max_columns)
        current = [v for layer in (self.ratios[-1] if self.ratios else []) for v in layer]
        with self.fig.batch_update():
            heat, bar = self.fig.data
            heat.x, heat.y, heat.z = x, y, z
            bar.x, bar.y = current, y
        self.draws += 1

    def finish(self, n: int = 6) -> list[tuple]:
        """Draw the final state and print the static table; returns its rows."""
        self.redraw()
        if self.view is not None:
            self.view.freeze(self.fig, text=f"expert load: {self.fig.layout.title.text}")
        rows = load_summary(self.steps, self.ratios, n)
        print(f"{'step':>5}  {'MaxVio':>6}  {'busiest':>8}  {'load/mean':>9}  {'unused':>6}")
        for step, max_vio, label, ratio, unused in rows:
            print(f"{step:>5}  {max_vio:>6.2f}  {label:>8}  {ratio:>9.2f}  {unused:>6}")
        if self.ratios:
            for layer, r in enumerate(self.ratios[-1]):
                print(f"final load / mean{f' (layer {layer})' if len(self.ratios[-1]) > 1 else ''}: "
                      + " ".join(f"{v:.1f}" for v in r))
        return rows
