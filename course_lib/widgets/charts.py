"""Generic plotting: plotly's renderer, static bar and line charts, and the live loss plot.

`LivePlot` redraws at a bounded rate (every `every` steps and at most once per `min_interval`
seconds), so a training loop with a live plot is barely slower, and prints a small table of the same
numbers when it finishes (the static fallback where no widget front end exists).
"""

from __future__ import annotations

import os
import time

import plotly.graph_objects as go
import plotly.io as pio

from .static import LiveView, PngRenderer

try:
    from IPython.display import display
except ImportError:  # plain Python: nothing to draw on
    display = None

LAYOUT = dict(template="plotly_white", height=320, margin=dict(l=50, r=20, t=40, b=40))


def in_colab() -> bool:
    return "COLAB_RELEASE_TAG" in os.environ or "google.colab" in __import__("sys").modules


def set_plotly_renderer() -> str:
    """Colab's renderer on Colab; elsewhere JupyterLab's interactive mimetype plus a PNG of the figure
    (`static.PngRenderer`) that GitHub, nbviewer and HTML exports show, with no plotly.js to load."""
    pio.renderers["course_png"] = PngRenderer()
    pio.renderers.default = "colab" if in_colab() else "plotly_mimetype+course_png"
    return pio.renderers.default


def _display(obj) -> None:
    if display is None:  # plain Python: nothing to draw on
        return
    display(obj)


def live_view(widget, text: str, live: bool = True) -> LiveView | None:
    """Display a live widget (see `static.LiveView`); None when `live` is off."""
    return LiveView(widget, text) if live else None


def summary_rows(steps: list[int], values: list[float], n: int = 6) -> list[tuple[int, float]]:
    """About n evenly spaced (step, value) pairs, always including the first and the last."""
    if not steps:
        return []
    if len(steps) <= n:
        return list(zip(steps, values))
    idx = sorted({round(i * (len(steps) - 1) / (n - 1)) for i in range(n)})
    return [(steps[i], values[i]) for i in idx]


class LivePlot:
    """A live line plot of one or more series against the training step.

    `update(step, **values)` records every point and redraws the FigureWidget at a bounded rate;
    `finish()` draws the last points and prints a summary table (the static fallback). `seconds` is the
    time spent inside `update`, so a notebook can show what the live plot costs its training loop.
    """

    def __init__(self, names: tuple[str, ...] = ("loss",), title: str = "training", every: int = 10,
                 min_interval: float = 0.5, log_y: bool = False, live: bool = True) -> None:
        self.names, self.every, self.min_interval = names, every, min_interval
        self.steps: list[int] = []
        self.values: dict[str, list[float]] = {n: [] for n in names}
        self._last_draw = float("-inf")  # the first eligible step always draws
        self.draws, self.seconds = 0, 0.0
        fig = go.Figure([go.Scatter(x=[], y=[], mode="lines", name=n) for n in names])
        fig.update_layout(title=title, xaxis_title="step", **LAYOUT)
        if log_y:
            fig.update_yaxes(type="log")
        self.fig = go.FigureWidget(fig) if live else fig
        self.view = live_view(self.fig, f"live chart: {title}", live)

    def update(self, step: int, **values: float) -> None:
        t0 = time.perf_counter()
        self.steps.append(step)
        for n in self.names:
            self.values[n].append(float(values[n]))
        if step % self.every == 0 and t0 - self._last_draw >= self.min_interval:
            self.redraw()
            self._last_draw = t0
        self.seconds += time.perf_counter() - t0

    def redraw(self) -> None:
        with self.fig.batch_update():
            for trace, n in zip(self.fig.data, self.names):
                trace.x, trace.y = list(self.steps), list(self.values[n])
        self.draws += 1

    def finish(self, decimals: int = 3) -> None:
        self.redraw()
        if self.view is not None:
            self.view.freeze(self.fig, text=f"chart: {self.fig.layout.title.text}")
        if not self.steps:  # e.g. training reloaded a finished checkpoint: an empty table would puzzle
            print("no steps were run, so there is nothing to plot")
            return
        rows = summary_rows(self.steps, self.values[self.names[0]])
        print("step  " + "  ".join(f"{n:>8}" for n in self.names))
        for i, (s, _) in enumerate(rows):
            j = self.steps.index(s)
            print(f"{s:>4}  " + "  ".join(f"{self.values[n][j]:>8.{decimals}f}" for n in self.names))


def bar_chart(labels: list[str], values: list[float], title: str, y_title: str = "", text_fmt: str = "{:.1f}") -> go.Figure:
    """A static bar chart (shown with fig.show(): works in every front end)."""
    fig = go.Figure(go.Bar(x=labels, y=values, text=[text_fmt.format(v) for v in values], textposition="auto"))
    fig.update_layout(title=title, yaxis_title=y_title, **LAYOUT)
    return fig


def line_chart(x: list[float], series: dict[str, list[float]], title: str, x_title: str = "", y_title: str = "",
               log_x: bool = False, log_y: bool = False) -> go.Figure:
    """A static chart of one line per named series over the same x (shown with fig.show())."""
    fig = go.Figure([go.Scatter(x=list(x), y=list(y), mode="lines+markers", name=name) for name, y in series.items()])
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, **LAYOUT)
    if log_x:
        fig.update_xaxes(type="log")
    if log_y:
        fig.update_yaxes(type="log")
    return fig
