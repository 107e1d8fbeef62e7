"""Expert parallelism (notebook 10): the live rank-to-rank traffic heatmap of the all-to-all.

A thin view over `course_lib.expert_parallel.traffic_matrix` (each step's (W, W) bytes, row i what rank i
sent to each rank); the pure functions below average and summarize them, the tests check them, and the view
only draws them.
"""

from __future__ import annotations

import time

import plotly.graph_objects as go

from .charts import LAYOUT, live_view


def mean_matrix(matrices) -> list[list[float]]:
    """The element-wise mean of a list of (W, W) matrices ([] for none)."""
    if not matrices:
        return []
    n = len(matrices)
    return [[sum(m[i][j] for m in matrices) / n for j in range(len(matrices[0]))] for i in range(len(matrices[0]))]


def traffic_summary(matrix, ranks_per_group: int = 1) -> dict:
    """Totals of a (W, W) byte matrix: all bytes, bytes between groups of `ranks_per_group` ranks (nodes), and
    the busiest sender's share of the bytes (1/W when every rank sends the same)."""
    W = len(matrix)
    total = sum(map(sum, matrix))
    cross = sum(matrix[i][j] for i in range(W) for j in range(W) if i // ranks_per_group != j // ranks_per_group)
    busiest = max(sum(row) for row in matrix) if W else 0
    return {"total": total, "cross_group": cross, "busiest_sender_share": busiest / total if total else 0.0}


def heatmap_text(matrix) -> list[list[str]]:
    """Cell labels: kB with one decimal, '·' on the diagonal."""
    return [["·" if i == j else f"{v / 1e3:.1f} kB" for j, v in enumerate(row)] for i, row in enumerate(matrix)]


class TrafficHeatmap:
    """Live heatmap of the bytes each rank sends to each other rank, redrawn as steps arrive.

    `update(step, matrix)` takes one step's (W, W) bytes (from `expert_parallel.traffic_matrix`); the heatmap
    shows the mean bytes per step so far. `finish()` draws the final state, freezes a static copy
    into the output and prints the same numbers as a table.
    """

    def __init__(self, title: str = "bytes sent, rank to rank", every: int = 1, min_interval: float = 0.3,
                 live: bool = True) -> None:
        self.every, self.min_interval, self.title = every, min_interval, title
        self.steps: list[int] = []
        self.matrices: list[list[list[int]]] = []
        self.draws, self.seconds, self._last_draw = 0, 0.0, float("-inf")
        fig = go.Figure(go.Heatmap(z=[], x=[], y=[], colorscale="Blues", texttemplate="%{text}",
                                   colorbar=dict(title="bytes/step")))
        fig.update_layout(**{**LAYOUT, "height": 360}, title=title, xaxis_title="to rank", yaxis_title="from rank")
        fig.update_yaxes(autorange="reversed")
        self.fig = go.FigureWidget(fig) if live else fig
        self.view = live_view(self.fig, f"live traffic: {title}", live)

    def update(self, step: int, matrix) -> None:
        t0 = time.perf_counter()
        self.matrices.append([list(row) for row in matrix])
        self.steps.append(step)
        if step % self.every == 0 and t0 - self._last_draw >= self.min_interval:
            self.redraw()
            self._last_draw = time.perf_counter()
        self.seconds += time.perf_counter() - t0

    def redraw(self) -> None:
        m = mean_matrix(self.matrices)
        labels = [f"rank {r}" for r in range(len(m))]
        with self.fig.batch_update():
            heat = self.fig.data[0]
            heat.z, heat.x, heat.y, heat.text = m, labels, labels, heatmap_text(m)
            self.fig.layout.title.text = f"{self.title} (mean of {len(self.steps)} steps)"
        self.draws += 1

    def finish(self, ranks_per_group: int = 1) -> dict:
        """Draw the final state, leave its static copy, print the table; returns `traffic_summary`."""
        self.redraw()
        if self.view is not None:
            self.view.freeze(self.fig, text=f"traffic: {self.title}")
        m = mean_matrix(self.matrices)
        print("bytes per step, from rank (rows) to rank (columns):")
        for i, row in enumerate(m):
            print(f"  rank {i}: " + "  ".join(f"{v:>9,.0f}" for v in row))
        return traffic_summary(m, ranks_per_group)
