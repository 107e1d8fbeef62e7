"""Widgets and plots: the only module that imports plotly or ipywidgets.

Every view here is thin: the numbers come from pure functions elsewhere in course_lib (tested),
and this module only draws them. Live views redraw at a bounded rate (every `every` steps and at
most once per `min_interval` seconds), so a training loop with a live plot is barely slower.
Where no widget front end exists (nbval, a notebook read on the web, a terminal), each live view
also prints a small table of the same numbers when it finishes.
"""

from __future__ import annotations

import math
import os
import time

import plotly.graph_objects as go
import plotly.io as pio

LAYOUT = dict(template="plotly_white", height=320, margin=dict(l=50, r=20, t=40, b=40))


def in_colab() -> bool:
    return "COLAB_RELEASE_TAG" in os.environ or "google.colab" in __import__("sys").modules


def set_plotly_renderer() -> str:
    """Colab's renderer on Colab; elsewhere JupyterLab's mimetype plus a small HTML version for
    nbviewer-style readers (it loads plotly.js from a CDN instead of embedding 4 MB in the notebook)."""
    pio.renderers.default = "colab" if in_colab() else "plotly_mimetype+notebook_connected"
    return pio.renderers.default


def _display(obj) -> None:
    try:
        from IPython.display import display
    except ImportError:  # plain Python: nothing to draw on
        return
    display(obj)


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
        self._last_draw = 0.0
        self.draws, self.seconds = 0, 0.0
        fig = go.Figure([go.Scatter(x=[], y=[], mode="lines", name=n) for n in names])
        fig.update_layout(title=title, xaxis_title="step", **LAYOUT)
        if log_y:
            fig.update_yaxes(type="log")
        self.fig = go.FigureWidget(fig) if live else fig
        if live:
            _display(self.fig)

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


# ====================================================================================================
# KV-cache track (notebooks 01-03): line charts and the cache-size explorer.
# The explorer is a thin view over `course_lib.memory.explore`, which computes every number it draws.
# ====================================================================================================

KIND_COLORS = {"mha": "#1f77b4", "gqa": "#ff7f0e", "mqa": "#2ca02c", "mla": "#d62728"}
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


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


def tokens_label(n: int) -> str:
    """1024 -> '1K', 131072 -> '128K', 2**20 -> '1M'."""
    for unit, size in (("M", 2**20), ("K", 2**10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def explore_table(result: dict) -> str:
    """The explorer's numbers as a text table (the static fallback of `CacheExplorer`)."""
    head = (f"{result['model']}: {result['batch_size']} x {tokens_label(result['num_tokens'])} tokens, "
            f"{result['element_bytes']:g} bytes/element, GPU with {result['gpu_gib']:g} GiB")
    lines = [head, f"{'attention':<16}{'KiB/token':>11}{'cache GiB':>12}{'of GPU':>10}{'fits':>6}{'saves vs MHA':>14}"]
    for r in result["rows"]:
        mark = "*" if r["selected"] else " "
        lines.append(f"{mark}{r['label']:<15}{r['kib_per_token']:>11,.1f}{r['cache_gib']:>12,.2f}"
                     f"{r['gpu_fraction']:>10.1%}{'yes' if r['fits'] else 'no':>6}{r['reduction_vs_mha']:>14.1%}")
    return "\n".join(lines)


class CacheExplorer:
    """Pick a model preset, attention kind, context length, batch size, element type and GPU; see the
    cache per token and the batch's total cache against the GPU's memory, redrawn on every change.

    Left: KiB per token for MHA/GQA/MQA/MLA at the model's shape (the chosen kind in full colour).
    Right: total cache vs context length for each kind, the GPU's memory as a dashed line, and the
    chosen point. `controls` holds the ipywidgets; `result` the last `memory.explore` output.
    Sliders redraw when released (continuous_update=False), so each change costs one redraw.
    """

    def __init__(self, preset: str = "deepseek-v3", attention: str | None = None, num_tokens: int = 128 * 1024,
                 batch_size: int = 1, elem_bytes: str = "bf16", gpu: str = "A100 / H100 / H800 (80 GB)",
                 show: bool = True) -> None:
        import ipywidgets as W
        from plotly.subplots import make_subplots

        from . import memory

        self._memory = memory
        for value, options, what in ((preset, memory.PRESETS, "preset"), (gpu, memory.GPU_MEMORY_GIB, "gpu"),
                                     (elem_bytes, memory.ELEMENT_BYTES, "elem_bytes"),
                                     (num_tokens, memory.CONTEXT_LENGTHS, "num_tokens"), (batch_size, BATCH_SIZES, "batch_size")):
            if value not in options:
                raise ValueError(f"{what}={value!r} is not offered. Use one of {list(options)}.")
        sizes = sorted(memory.ELEMENT_BYTES.items(), key=lambda kv: -kv[1])
        self.controls = {
            "preset": W.Dropdown(options=list(memory.PRESETS), value=preset, description="model"),
            "gpu": W.Dropdown(options=list(memory.GPU_MEMORY_GIB), value=gpu, description="GPU"),
            "attention": W.ToggleButtons(options=[(k.upper(), k) for k in memory.ATTENTION_KINDS],
                                         value=attention or memory.PRESETS[preset].attention, description="attention"),
            "num_tokens": W.SelectionSlider(options=[(tokens_label(n), n) for n in memory.CONTEXT_LENGTHS],
                                            value=num_tokens, description="context", continuous_update=False),
            "batch_size": W.SelectionSlider(options=list(BATCH_SIZES), value=batch_size, description="batch",
                                            continuous_update=False),
            "elem_bytes": W.Dropdown(options=[(f"{n} ({b:g} B)", n) for n, b in sizes], value=elem_bytes,
                                     description="element"),
        }
        fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                            subplot_titles=("cache per token, all layers (KiB)", "cache of the batch (GiB) vs context"))
        fig.add_trace(go.Bar(x=[], y=[], showlegend=False, textposition="auto"), row=1, col=1)
        for kind in memory.ATTENTION_KINDS:
            fig.add_trace(go.Scatter(x=[], y=[], mode="lines", name=kind.upper(), line=dict(color=KIND_COLORS[kind])),
                          row=1, col=2)
        fig.add_trace(go.Scatter(x=[], y=[], mode="lines", name="GPU memory", line=dict(color="black", dash="dash")),
                      row=1, col=2)
        fig.add_trace(go.Scatter(x=[], y=[], mode="markers", name="chosen", marker=dict(size=12, symbol="x", color="black")),
                      row=1, col=2)
        fig.update_xaxes(type="log", title_text="context length (tokens)", row=1, col=2)
        fig.update_yaxes(type="log", row=1, col=2)
        fig.update_layout(**{**LAYOUT, "height": 420, "margin": dict(l=50, r=20, t=90, b=40)})  # room for two titles
        self.fig = go.FigureWidget(fig)
        self.summary = W.HTML()
        self.draws = 0
        self.result: dict = {}
        self.update()
        for control in self.controls.values():
            control.observe(lambda _change: self.update(), names="value")
        c = self.controls
        self.widget = W.VBox([W.HBox([c["preset"], c["gpu"]]), c["attention"], W.HBox([c["num_tokens"], c["batch_size"]]),
                              c["elem_bytes"], self.fig, self.summary])
        if show:
            _display(self.widget)
            print(self.table())

    def values(self) -> dict:
        """The controls' current values as `memory.explore` arguments."""
        c = self.controls
        return dict(spec=self._memory.PRESETS[c["preset"].value], attention=c["attention"].value,
                    num_tokens=c["num_tokens"].value, batch_size=c["batch_size"].value,
                    elem_bytes=c["elem_bytes"].value, gpu_gib=self._memory.GPU_MEMORY_GIB[c["gpu"].value])

    def update(self) -> None:
        """Recompute with `memory.explore` and redraw the figure and the summary line."""
        r = self._memory.explore(**self.values())
        rows, kinds, sel = r["rows"], [row["attention"] for row in r["rows"]], r["selected"]
        with self.fig.batch_update():
            bars = self.fig.data[0]
            bars.x, bars.y = [row["label"] for row in rows], [row["kib_per_token"] for row in rows]
            bars.text = [f"{row['kib_per_token']:,.1f}" for row in rows]
            # set marker fields one by one: replacing the whole marker object before the widget is on
            # screen makes plotly.js fail to draw it in JupyterLab (seen in the browser test)
            bars.marker.color = [KIND_COLORS[k] for k in kinds]
            bars.marker.opacity = [1.0 if row["selected"] else 0.35 for row in rows]
            for trace, kind in zip(self.fig.data[1:1 + len(kinds)], kinds):
                trace.x, trace.y = r["context_lengths"], r["curves"][kind]
                trace.line.width = 4 if kind == sel["attention"] else 1.5
            gpu_line, chosen = self.fig.data[1 + len(kinds)], self.fig.data[2 + len(kinds)]
            gpu_line.x, gpu_line.y = [r["context_lengths"][0], r["context_lengths"][-1]], [r["gpu_gib"]] * 2
            chosen.x, chosen.y = [r["num_tokens"]], [sel["cache_gib"]]
            self.fig.layout.title = f"{r['model']}: {sel['label']}, batch {r['batch_size']}, {r['element_bytes']:g} B/element"
        fits = "fits in" if sel["fits"] else "does NOT fit in"
        self.summary.value = (f"<b>{sel['kib_per_token']:,.1f} KiB per token</b>; {r['batch_size']} x "
                              f"{tokens_label(r['num_tokens'])} tokens = <b>{sel['cache_gib']:,.2f} GiB</b>, "
                              f"{sel['gpu_fraction']:.1%} of the GPU's {r['gpu_gib']:g} GiB: it {fits} the GPU "
                              f"(before weights). At most {sel['max_tokens_in_gpu']:,} cached tokens fit; "
                              f"{sel['reduction_vs_mha']:.1%} smaller than MHA.")
        self.result = r
        self.draws += 1

    def table(self) -> str:
        return explore_table(self.result)


# ============================================================================= GRPO dashboard and completions viewer
# Notebooks 06-07: a live view of a GRPO run and a viewer for sampled completions. Thin views over
# `course_lib.grpo` (which computes every per-step number, `rollout_stats`) and the pure functions
# below (`smoothed`, `dashboard_rows`, `completion_parts`, `rollout_rows`, `completions_html`), which
# are what tests/test_widgets.py checks.

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
        from plotly.subplots import make_subplots

        self.metrics, self.every, self.min_interval, self.window, self.viewer = metrics, every, min_interval, window, viewer
        self.history: list[dict] = []
        self.draws, self.seconds, self._last_draw = 0, 0.0, 0.0
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
        if live:
            _display(self.fig)

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
        rows = dashboard_rows(self.history, self.metrics, n, self.window)
        print(f"moving averages over {self.window} steps")
        print(format_dashboard_rows(rows, self.metrics))
        return rows


# ---------------------------------------------------------------------------- completions viewer

PART_STYLES = {"think": "background:#e3ecfa", "answer": "background:#dff3e2;font-weight:bold",
               "tag": "color:#777", "outside": "background:#fbe0e0"}


def completion_parts(text: str) -> list[tuple[str, str]]:
    """Split a completion into ``(kind, text)`` runs: "tag" (one of the four exact tags), "think",
    "answer", or "outside" (anything not inside a think or answer block, which breaks the format).

    A plain left-to-right state machine, no validation: malformed completions split too, so the
    viewer shows exactly where they go wrong. Joining the texts gives back the completion.
    """
    from .tasks import ANSWER_CLOSE, ANSWER_OPEN, TAGS, THINK_CLOSE, THINK_OPEN

    state_after = {THINK_OPEN: "think", ANSWER_OPEN: "answer", THINK_CLOSE: "outside", ANSWER_CLOSE: "outside"}
    parts: list[tuple[str, str]] = []
    state, i, start = "outside", 0, 0
    while i < len(text):
        tag = next((t for t in TAGS if text.startswith(t, i)), None)
        if tag is None:
            i += 1
            continue
        if i > start:
            parts.append((state, text[start:i]))
        parts.append(("tag", tag))
        state = state_after[tag]
        i = start = i + len(tag)
    if start < len(text):
        parts.append((state, text[start:]))
    return parts


def rollout_rows(rollout, groups: int = 2, per_group: int | None = None, reward_fn=None) -> list[dict]:
    """Rows for the viewer from a `grpo.Rollout`: the first ``groups`` groups, ``per_group`` completions
    each (all by default), with accuracy and strict format from the verifiers and, if given, the reward."""
    from .rewards import format_reward
    from .tasks import score_answer

    rows = []
    G = rollout.group_size
    for p in range(min(groups, len(rollout.problems))):
        for g in range(G if per_group is None else min(per_group, G)):
            r = p * G + g
            text, problem = rollout.texts[r], rollout.problems[p]
            row = {"prompt": problem.prompt, "completion": text, "correct": score_answer(problem, text) == 1.0,
                   "format": format_reward(text) == 1.0, "finished": bool(rollout.finished[r])}
            if reward_fn is not None:
                row["reward"] = float(reward_fn(text, problem))
            rows.append(row)
    return rows


def completions_html(rows: list[dict], title: str = "") -> str:
    """An HTML table of completions with the think part, the answer and text outside the tags
    coloured (``PART_STYLES``). Every piece of model text is HTML-escaped."""
    import html

    cols = ["prompt", "completion"] + [c for c in ("reward", "correct", "format", "finished") if rows and c in rows[0]]
    out = [f"<div><b>{html.escape(title)}</b></div>" if title else "",
           "<table style='font-family:monospace;font-size:12px;border-collapse:collapse'>",
           "<tr>" + "".join(f"<th style='text-align:left;padding:2px 8px'>{c}</th>" for c in cols) + "</tr>"]
    for row in rows:
        spans = "".join(f"<span style='{PART_STYLES[kind]}'>{html.escape(text)}</span>"
                        for kind, text in completion_parts(row["completion"]))
        cells = [html.escape(row["prompt"]), spans]
        for c in cols[2:]:
            v = row[c]
            cells.append(f"{v:.2f}" if isinstance(v, float) else ("yes" if v else "<b style='color:#b00'>no</b>"))
        out.append("<tr>" + "".join(f"<td style='text-align:left;padding:2px 8px;white-space:pre'>{c}</td>"
                                    for c in cells) + "</tr>")
    legend = " ".join(f"<span style='{style}'>&nbsp;{kind}&nbsp;</span>" for kind, style in PART_STYLES.items())
    out.append(f"</table><div style='font-size:11px'>{legend}</div>")
    return "".join(out)


def completions_text(rows: list[dict]) -> str:
    """The plain-text twin of `completions_html` (terminals, nbval)."""
    lines = []
    for row in rows:
        marks = " ".join(f"{c}={row[c]:.2f}" if isinstance(row[c], float) else f"{c}={'yes' if row[c] else 'no'}"
                         for c in ("reward", "correct", "format", "finished") if c in row)
        lines.append(f"{row['prompt']:<12} {row['completion']}   [{marks}]")
    return "\n".join(lines)


class CompletionsViewer:
    """Completions with their think and answer parts highlighted, as an HTML table.

    `show(rows)` displays a static table (it stays readable on the web); `update(rollout)` refreshes
    a live ipywidgets.HTML in place, which is how `TrainingDashboard(viewer=...)` shows the latest
    samples while training. Rows come from `rollout_rows` or are dicts with prompt and completion.
    """

    def __init__(self, groups: int = 2, per_group: int | None = 4, reward_fn=None, live: bool = True,
                 title: str = "latest samples") -> None:
        self.groups, self.per_group, self.reward_fn, self.title = groups, per_group, reward_fn, title
        self.rows: list[dict] = []
        self.widget = None
        if live:
            import ipywidgets as W

            self.widget = W.HTML()
            _display(self.widget)

    def update(self, rollout) -> None:
        self.rows = rollout_rows(rollout, self.groups, self.per_group, self.reward_fn)
        if self.widget is not None:
            self.widget.value = completions_html(self.rows, self.title)

    @staticmethod
    def show(rows: list[dict], title: str = "") -> str:
        """Display rows as a static HTML table; returns the HTML."""
        page = completions_html(rows, title)
        try:
            from IPython.display import HTML
        except ImportError:
            print(completions_text(rows))
            return page
        _display(HTML(page))
        return page


# ====================================================================================================
# MoE track (notebooks 04-05): the expert-load monitor, live load of every expert over training.
# A thin view over `course_lib.moe`'s load statistics (LoadTracker passes each step's (L, E) token
# counts); the pure functions below turn them into what is drawn and printed, and tests check them.
# ====================================================================================================

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

    MaxVio is averaged over layers, as `course_lib.moe.mean_max_violation` does; the busiest expert and
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
        from plotly.subplots import make_subplots

        self.every, self.min_interval, self.max_columns = every, min_interval, max_columns
        self.steps: list[int] = []
        self.ratios: list[list[list[float]]] = []
        self.draws, self.seconds, self._last_draw = 0, 0.0, 0.0
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
        if live:
            _display(self.fig)

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
        rows = load_summary(self.steps, self.ratios, n)
        print(f"{'step':>5}  {'MaxVio':>6}  {'busiest':>8}  {'load/mean':>9}  {'unused':>6}")
        for step, max_vio, label, ratio, unused in rows:
            print(f"{step:>5}  {max_vio:>6.2f}  {label:>8}  {ratio:>9.2f}  {unused:>6}")
        if self.ratios:
            for layer, r in enumerate(self.ratios[-1]):
                print(f"final load / mean{f' (layer {layer})' if len(self.ratios[-1]) > 1 else ''}: "
                      + " ".join(f"{v:.1f}" for v in r))
        return rows

    def snapshot(self) -> go.Figure:
        """A static copy of the figure as last drawn: `.show()` it after `finish()` so a notebook read on the
        web (no kernel, no widget state) still shows the heatmap."""
        return go.Figure(self.fig)
