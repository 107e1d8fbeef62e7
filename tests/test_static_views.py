"""The static copies readers on the web see: a PNG beside each chart, live views' final states, progress
bars' last line, and the tool that strips dead widget references from committed notebooks.

The PNG tests draw with kaleido and Debian's Chromium (what `.ci/run` installs); without a browser they are
skipped, except under CI=true where they fail. The notebook-level checks (every committed chart carries an
image, no widget dumps) are in test_notebook_hygiene.py; the browser shows them in tests/browser.
"""

import base64
import os
import shutil
import sys
from pathlib import Path

import nbformat
import plotly.graph_objects as go
import pytest

from course_lib import progress, widgets
from course_lib.widgets import static

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import strip_widget_views  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VIEW = "application/vnd.jupyter.widget-view+json"


def need_browser():
    if static.kaleido is None:  # e.g. Colab's package set (make colab-check): charts stay interactive only
        pytest.skip("kaleido is not installed")
    if shutil.which("chromium") is None and shutil.which("google-chrome") is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("no Chromium for kaleido (CI=true: .ci/run installs it)")
        pytest.skip("no Chromium or Chrome for kaleido")


@pytest.fixture
def fresh_state(monkeypatch):
    monkeypatch.setitem(static._state, "broken", None)
    monkeypatch.delenv(static.STATIC_ENV, raising=False)


class FakeHandle:
    def __init__(self, bundle):
        self.shown = [bundle]

    def update(self, bundle, raw=False):
        assert raw
        self.shown.append(bundle)


@pytest.fixture
def fake_display(monkeypatch):
    handles = []

    def show(bundle):
        handles.append(FakeHandle(bundle))
        return handles[-1]

    monkeypatch.setattr(static, "show_bundle", show)
    return handles


def test_png_draws_a_png_of_the_figures_size(fresh_state):
    need_browser()
    fig = widgets.bar_chart(["a", "b"], [1.0, 2.0], "two bars")
    data = static.png(fig)
    assert data is not None and data.startswith(PNG_MAGIC), static._state["broken"]
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (760, 320)  # the default width, and the course's LAYOUT height
    bundle = static.PngRenderer().to_mimebundle(fig.to_dict())
    assert base64.b64decode(bundle["image/png"]).startswith(PNG_MAGIC)


def test_png_is_off_when_asked_or_impossible(fresh_state, monkeypatch):
    fig = go.Figure(go.Bar(x=[1], y=[1]))
    monkeypatch.setenv(static.STATIC_ENV, "0")
    assert static.png(fig) is None and static.png_bundle(fig) == {} and not static.static_enabled()
    monkeypatch.delenv(static.STATIC_ENV)
    monkeypatch.setattr(static, "kaleido", None)  # a learner without kaleido: live views only, no error
    assert static.png(fig) is None
    assert "pip install kaleido" in static._state["broken"] and not static.static_enabled()


def test_live_view_shows_text_not_a_repr_and_freezes_to_the_final_state(fake_display, fresh_state, monkeypatch):
    monkeypatch.setattr(static, "png_bundle", lambda fig: {"image/png": f"png of {fig.layout.title.text}"})
    plot = widgets.LivePlot(("loss",), title="pretraining", every=1, min_interval=0.0)
    first = fake_display[0].shown[0]
    assert first[VIEW]["model_id"] == plot.fig.model_id
    assert first["text/plain"] == "live chart: pretraining"  # not FigureWidget({...}) over 80 lines
    for step in range(3):
        plot.update(step, loss=1.0)
    plot.finish()
    last = fake_display[0].shown[-1]
    assert last[VIEW] == first[VIEW]  # a live front end keeps drawing the same widget
    assert last["image/png"] == "png of pretraining" and last["text/plain"] == "chart: pretraining"


def test_dashboard_monitor_and_viewer_freeze_too(fake_display, fresh_state, monkeypatch):
    monkeypatch.setattr(static, "png_bundle", lambda fig: {"image/png": "png"})
    viewer = widgets.CompletionsViewer()
    dash = widgets.TrainingDashboard(every=1, min_interval=0.0, viewer=viewer)
    viewer.rows = [{"prompt": "1+2=", "completion": "<think>1+2</think><answer>3</answer>", "reward": 1.5}]
    dash.update(0, {"reward": 1.5})
    dash.finish()
    viewer_out, dash_out = fake_display[0].shown[-1], fake_display[1].shown[-1]
    assert dash_out["image/png"] == "png" and dash_out["text/plain"].startswith("dashboard: ")
    assert "<answer>" not in viewer_out["text/html"] and "3" in viewer_out["text/html"]  # escaped, coloured
    assert viewer_out["text/plain"].startswith("1+2=")
    monitor = widgets.ExpertLoadMonitor(every=1, min_interval=0.0)
    monitor.update(0, [[3, 1]])
    monitor.finish()
    assert fake_display[2].shown[-1]["image/png"] == "png"


def test_notebook_bar_leaves_its_last_line(fake_display):
    bar = static.NotebookBar(range(40), desc="train")
    assert fake_display[0].shown[0]["text/plain"].startswith("train:   0%")
    for _ in bar:
        pass
    line = fake_display[0].shown[-1]["text/plain"]
    assert line.startswith("train: 100%") and "40/40" in line
    bar.close()  # tqdm closes again when the bar is collected: nothing more is shown, nothing raises
    assert fake_display[0].shown[-1]["text/plain"] == line


def test_training_loops_use_the_registered_bar(monkeypatch):
    seen = []

    def bar(iterable, **kwargs):
        seen.append(kwargs["desc"])
        return iterable

    monkeypatch.setattr(progress, "_bar", progress._bar)
    progress.set_progress_bar(bar)
    assert list(progress.progress_bar(range(3), desc="train")) == [0, 1, 2] and seen == ["train"]
    progress.set_progress_bar(None)
    assert progress._bar is progress.tqdm


def test_strip_keeps_static_copies_and_reports_bare_widgets():
    nb = nbformat.v4.new_notebook()
    frozen = {VIEW: {"model_id": "a"}, "image/png": "iVBOR", "text/plain": "chart: loss"}
    bare = {VIEW: {"model_id": "b"}, "text/plain": "FigureWidget({'data': [...]})"}
    bar = {VIEW: {"model_id": "c"}, "text/plain": "train: 100%|#####| 300/300"}
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = [nbformat.v4.new_output("display_data", data=d) for d in (frozen, bare, bar)]
    nb.cells = [cell]
    nb.metadata["widgets"] = {"state": {}}
    where = strip_widget_views.strip(nb)
    assert [VIEW in o.data for o in cell.outputs] == [False, False, False]
    assert cell.outputs[0].data == {"image/png": "iVBOR", "text/plain": "chart: loss"}
    assert where == ["cell 0: \"FigureWidget({'data': [...]})\""] and "widgets" not in nb.metadata
