"""Widgets and plots: the only part of course_lib that imports plotly or ipywidgets.

Every view here is a thin view over a pure function: the numbers come from pure functions elsewhere in
course_lib or in these modules (tested), and the views only draw them. Live views redraw at a bounded
rate (every `every` steps and at most once per `min_interval` seconds), so a training loop with a live
plot is barely slower. Where no widget front end exists (nbval, a notebook read on the web, a terminal),
each live view also prints a small table of the same numbers when it finishes.

- `static`: the static copies readers on the web see (PNG beside each chart, final states of live views,
  progress bars' last line).
- `charts`: plotly's renderer, static bar and line charts, the live loss plot (`LivePlot`).
- `cache`: the KV-cache size explorer (`CacheExplorer`, over `course_lib.memory.explore`).
- `experts`: the MoE expert-load monitor (`ExpertLoadMonitor`).
- `dashboard`: the live GRPO training dashboard (`TrainingDashboard`).
- `completions`: the viewer for sampled completions (`CompletionsViewer`).
- `traffic`: the rank-to-rank traffic heatmap of expert parallelism (`TrafficHeatmap`).
"""

from .cache import BATCH_SIZES, KIND_COLORS, CacheExplorer, explore_table, tokens_label
from .charts import LAYOUT, LivePlot, bar_chart, in_colab, line_chart, set_plotly_renderer, summary_rows
from .completions import (
    PART_STYLES,
    CompletionsViewer,
    completion_parts,
    completions_html,
    completions_text,
    rollout_rows,
)
from .dashboard import GRPO_METRIC_TITLES, GRPO_METRICS, TrainingDashboard, dashboard_rows, format_dashboard_rows, smoothed
from .experts import ExpertLoadMonitor, keep_columns, load_heatmap_data, load_ratios, load_summary
from .static import (
    STATIC_ENV,
    LiveView,
    NotebookBar,
    PngRenderer,
    png,
    png_bundle,
    register_progress_bar,
    static_enabled,
    widget_bundle,
)
from .traffic import TrafficHeatmap, heatmap_text, mean_matrix, traffic_summary

__all__ = [
    # static
    "STATIC_ENV", "static_enabled", "png", "png_bundle", "PngRenderer", "widget_bundle", "LiveView", "NotebookBar",
    # charts
    "LAYOUT", "in_colab", "set_plotly_renderer", "summary_rows", "LivePlot", "bar_chart", "line_chart",
    # cache
    "KIND_COLORS", "BATCH_SIZES", "tokens_label", "explore_table", "CacheExplorer",
    # dashboard
    "GRPO_METRICS", "GRPO_METRIC_TITLES", "smoothed", "dashboard_rows", "format_dashboard_rows", "TrainingDashboard",
    # completions
    "PART_STYLES", "completion_parts", "rollout_rows", "completions_html", "completions_text", "CompletionsViewer",
    # experts
    "load_ratios", "keep_columns", "load_heatmap_data", "load_summary", "ExpertLoadMonitor",
    # traffic
    "mean_matrix", "traffic_summary", "heatmap_text", "TrafficHeatmap",
]

# Charts render with Colab's renderer on Colab and JupyterLab's elsewhere from the first import on: the core
# package never imports plotly, so this set-up belongs here rather than in `setup_notebook`.
set_plotly_renderer()
# In a notebook, training loops' progress bars leave their last line as text (see `static.NotebookBar`).
register_progress_bar()
