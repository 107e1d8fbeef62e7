import plotly.io as pio

from course_lib import widgets


def test_summary_rows_keep_first_and_last():
    steps = list(range(100))
    rows = widgets.summary_rows(steps, [float(s) for s in steps], n=5)
    assert rows[0] == (0, 0.0) and rows[-1] == (99, 99.0) and len(rows) == 5
    assert widgets.summary_rows([1, 2], [3.0, 4.0]) == [(1, 3.0), (2, 4.0)]
    assert widgets.summary_rows([], []) == []


def test_live_plot_redraws_at_a_bounded_rate_and_prints_a_fallback(capsys):
    plot = widgets.LivePlot(("loss",), every=10, min_interval=0.0, live=False)
    for step in range(100):
        plot.update(step, loss=1.0 / (step + 1))
    assert plot.draws == 10  # steps 0, 10, ..., 90
    plot.finish()
    assert list(plot.fig.data[0].y) == plot.values["loss"] and len(plot.fig.data[0].x) == 100
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["step", "loss"] and out[1].split() == ["0", "1.000"] and out[-1].split()[0] == "99"


def test_renderer_is_lab_friendly_off_colab(monkeypatch):
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    assert widgets.set_plotly_renderer() == "plotly_mimetype+notebook_connected" == pio.renderers.default
    monkeypatch.setenv("COLAB_RELEASE_TAG", "x")
    assert widgets.set_plotly_renderer() == "colab"
