"""KV-cache track (notebooks 01-03): the cache-size explorer.

A thin view over `course_lib.memory.explore`, which computes every number it draws; `explore_table`
is its static text fallback.
"""

from __future__ import annotations

import html
import ipywidgets as W
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .. import memory
from .charts import LAYOUT, live_view

KIND_COLORS = {"mha": "#1f77b4", "gqa": "#ff7f0e", "mqa": "#2ca02c", "mla": "#d62728"}
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


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
            view = live_view(self.widget, "cache explorer (live controls)")
            # a static copy for readers without a live kernel; the widget's own table follows the controls
            view.freeze(self.fig, text="cache explorer at its starting values")
            print("at the controls' starting values:\n" + self.table())

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
                              f"{sel['reduction_vs_mha']:.1%} smaller than MHA."
                              f"<pre>{html.escape(explore_table(r))}</pre>")  # the table, following the controls
        self.result = r
        self.draws += 1

    def table(self) -> str:
        return explore_table(self.result)
