import html
import json

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
    assert plot.seconds > 0  # its own cost, which notebooks compare with the training loop's time
    plot.finish()
    assert list(plot.fig.data[0].y) == plot.values["loss"] and len(plot.fig.data[0].x) == 100
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["step", "loss"] and out[1].split() == ["0", "1.000"] and out[-1].split()[0] == "99"
    widgets.LivePlot(("loss",), live=False).finish()  # a re-run that reloaded its checkpoint: one line, no table
    assert capsys.readouterr().out == "no steps were run, so there is nothing to plot\n"


def test_renderer_is_lab_friendly_off_colab(monkeypatch):
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    assert widgets.set_plotly_renderer() == "plotly_mimetype+course_png" == pio.renderers.default
    monkeypatch.setenv("COLAB_RELEASE_TAG", "x")
    assert widgets.set_plotly_renderer() == "colab"


# --- the cache-size explorer (KV-cache track) -----------------------------------------------------------
# What is asserted: the figure shows exactly `memory.explore`'s numbers; moving a control redraws it
# with the new numbers (no browser: ipywidgets observers fire in Python); the text fallback; bad values.

import pytest  # noqa: E402

from course_lib import memory  # noqa: E402


def test_cache_explorer_draws_what_explore_computes():
    ex = widgets.CacheExplorer(show=False)
    expected = memory.explore(memory.PRESETS["deepseek-v3"], "mla", 128 * 1024, 1, "bf16", 80.0)
    assert ex.result == expected
    bars = ex.fig.data[0]
    assert list(bars.x) == ["MHA", "GQA (n_g=8)", "MQA", "MLA (d_c=512)"]
    assert list(bars.y) == [r["kib_per_token"] for r in expected["rows"]]
    assert list(bars.marker.opacity) == [0.35, 0.35, 0.35, 1.0]  # MLA, the model's own kind, stands out
    assert list(ex.fig.data[4].y) == expected["curves"]["mla"]
    assert list(ex.fig.data[5].y) == [80.0, 80.0]  # the GPU line
    assert list(ex.fig.data[6].y) == [pytest.approx(8.578125)]  # the chosen point: V3 at 128K in bf16


@pytest.mark.parametrize("control, value", [
    ("preset", "llama-3-8b"), ("attention", "mha"), ("num_tokens", 4096), ("batch_size", 8),
    ("elem_bytes", "6bit"), ("gpu", "T4 (16 GB)"),
])
def test_changing_a_control_changes_the_figure(control, value):
    ex = widgets.CacheExplorer(show=False)
    before = (ex.fig.to_dict()["data"], ex.summary.value, ex.draws)
    ex.controls[control].value = value
    assert ex.draws == before[2] + 1
    assert ex.fig.to_dict()["data"] != before[0] and ex.summary.value != before[1]
    assert ex.result == memory.explore(**ex.values())
    chosen = ex.fig.data[6]
    assert list(chosen.x) == [ex.result["num_tokens"]] and list(chosen.y) == [ex.result["selected"]["cache_gib"]]


def test_explorer_prints_a_table_and_refuses_unknown_values(capsys, monkeypatch):
    shown = []
    monkeypatch.setattr(widgets.cache, "live_view", lambda w, text: shown.append(w) or widgets.LiveView(w, text))
    monkeypatch.setenv(widgets.STATIC_ENV, "0")
    ex = widgets.CacheExplorer(preset="deepseek-llm-67b", num_tokens=4096, batch_size=8, show=True)
    assert shown == [ex.widget]
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "at the controls' starting values:"
    out = out[1:]
    assert out[0] == "deepseek-llm-67b: 8 x 4K tokens, 2 bytes/element, GPU with 80 GiB"
    # the selected row: 380 KiB per token; 389,120 B x 4096 x 8 = 11.875 GiB, 14.8% of 80 GiB
    assert out[3].startswith("*GQA (n_g=8)") and out[3].split()[2:5] == ["380.0", "11.88", "14.8%"]
    assert ex.table() == "\n".join(out)
    # the widget's own table follows the controls; the printed copy is the starting point only
    assert html.unescape(ex.summary.value.split("<pre>")[1].split("</pre>")[0]) == ex.table()
    ex.controls["preset"].value = "llama-3-8b"
    assert "llama-3-8b:" in ex.summary.value and ex.table().startswith("llama-3-8b:")
    assert [widgets.tokens_label(n) for n in (1024, 131072, 2**20, 1000)] == ["1K", "128K", "1M", "1000"]
    with pytest.raises(ValueError, match=r"num_tokens=5000 is not offered"):
        widgets.CacheExplorer(num_tokens=5000, show=False)
    with pytest.raises(ValueError, match=r"preset='gpt-5' is not offered"):
        widgets.CacheExplorer(preset="gpt-5", show=False)


def test_line_chart_draws_one_trace_per_series():
    fig = widgets.line_chart([1, 2, 4], {"a": [1.0, 2.0, 3.0], "b": [3.0, 2.0, 1.0]}, "t", log_x=True)
    assert [t.name for t in fig.data] == ["a", "b"] and list(fig.data[1].y) == [3.0, 2.0, 1.0]
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type != "log"


# ---------------------------------------------------------------- GRPO dashboard and completions viewer

import math  # noqa: E402

import torch  # noqa: E402


def test_smoothed_is_a_trailing_mean_that_skips_nan():
    out = widgets.smoothed([1.0, 3.0, float("nan"), 5.0, 7.0], window=2)
    assert out == [1.0, 2.0, 3.0, 5.0, 6.0]
    assert math.isnan(widgets.smoothed([float("nan")], 3)[0]) and widgets.smoothed([], 3) == []


def test_dashboard_rows_and_table():
    history = [{"reward": float(s), "kl": 0.5 * s} for s in range(10)]
    rows = widgets.dashboard_rows(history, ("reward", "kl"), n=4, window=2)
    assert [r[0] for r in rows] == [0, 3, 6, 9]
    assert rows[-1] == (9, 8.5, 4.25) and rows[0] == (0, 0.0, 0.0)
    lines = widgets.format_dashboard_rows(rows, ("reward", "kl")).splitlines()
    assert lines[0].split() == ["step", "reward", "kl"] and lines[-1].split() == ["9", "8.500", "4.250"]
    missing = widgets.dashboard_rows([{"reward": 1.0}], ("reward", "kl"))
    assert missing[0][1] == 1.0 and math.isnan(missing[0][2])


def test_training_dashboard_redraws_at_a_bounded_rate_and_prints_the_table(capsys):
    dash = widgets.TrainingDashboard(every=5, min_interval=0.0, window=1, live=False)
    assert len(dash.fig.data) == 2 * len(widgets.GRPO_METRICS)
    for step in range(20):
        dash(step, {m: step / 10 for m in widgets.GRPO_METRICS})  # the train_grpo callback signature
    assert dash.draws == 4  # steps 0, 5, 10, 15
    rows = dash.finish(n=3)
    assert list(dash.fig.data[1].y) == [s / 10 for s in range(20)] and rows[-1][0] == 19
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[0] == "step" and out[-1].split()[:2] == ["19", "1.900"]


def test_training_dashboard_draws_unmeasured_steps_as_gaps():
    # KL measured on every other step only (GRPOConfig.kl_every): NaN must not reach the widget's JSON
    dash = widgets.TrainingDashboard(every=1, min_interval=0.0, window=2, live=False)
    for step in range(4):
        dash(step, {"reward": 1.0, "kl": 0.1 * step if step % 2 == 0 else float("nan")})
    kl = widgets.GRPO_METRICS.index("kl")
    assert list(dash.fig.data[2 * kl].y) == [0.0, None, 0.2, None]  # the dots
    assert list(dash.fig.data[2 * kl + 1].y) == pytest.approx([0.0, 0.0, 0.2, 0.2])  # the moving average
    json.dumps(dash.fig.to_plotly_json()["data"], allow_nan=False)  # raises on NaN


@pytest.mark.parametrize("text, kinds", [
    ("<think>1+2</think><answer>3</answer>", ["tag", "think", "tag", "tag", "answer", "tag"]),
    ("<think></think><answer>3</answer>", ["tag", "tag", "tag", "answer", "tag"]),
    ("hi <answer>3</answer> bye", ["outside", "tag", "answer", "tag", "outside"]),
    ("<think>a<answer>b</think>c", ["tag", "think", "tag", "answer", "tag", "outside"]),  # misnested: shown as read
    ("</answer></answer>", ["tag", "tag"]),
    ("no tags at all", ["outside"]),
    ("", []),
])
def test_completion_parts_split_and_rejoin(text, kinds):
    parts = widgets.completion_parts(text)
    assert [k for k, _ in parts] == kinds
    assert "".join(t for _, t in parts) == text


def test_completions_html_escapes_and_colours():
    rows = [{"prompt": "1+2=", "completion": "<think><script>x</script></think><answer>3</answer>",
             "correct": True, "format": False, "reward": 0.5}]
    page = widgets.completions_html(rows, title="t")
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert widgets.PART_STYLES["think"] in page and widgets.PART_STYLES["answer"] in page
    assert "&lt;think&gt;" in page and "0.50" in page and "color:#b00'>no" in page
    text = widgets.completions_text(rows)
    assert text.startswith("1+2=") and "reward=0.50 correct=yes format=no" in text


def test_rollout_rows_mark_correct_and_well_formed():
    from course_lib.rollout import Rollout
    from course_lib.tasks import AdditionProblem

    problems = [AdditionProblem(1, 2), AdditionProblem(3, 4)]
    texts = ["<think>x</think><answer>3</answer>", "<answer>3</answer>", "7", "<think></think><answer>7</answer>"]
    ro = Rollout(problems, [[1], [1]], torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1, dtype=torch.bool),
                 torch.tensor([True, True, False, True]), texts, group_size=2)
    rows = widgets.rollout_rows(ro, groups=2, reward_fn=lambda t, p: float(len(t)))
    assert [(r["correct"], r["format"], r["finished"]) for r in rows] == [
        (True, True, True), (True, False, True), (False, False, False), (True, True, True)]
    assert rows[2]["prompt"] == "3+4=" and rows[0]["reward"] == float(len(texts[0]))
    assert len(widgets.rollout_rows(ro, groups=1, per_group=1)) == 1
    viewer = widgets.CompletionsViewer(groups=1, per_group=2, live=False)
    viewer.update(ro)
    assert [r["completion"] for r in viewer.rows] == texts[:2]


# ---------------------------------------------------------------- expert-load monitor (MoE track)

import torch  # noqa: E402

def test_load_ratios_hand_cases():
    assert widgets.load_ratios(torch.tensor([6, 2, 2, 2])) == [[2.0, 2 / 3, 2 / 3, 2 / 3]]
    assert widgets.load_ratios(torch.tensor([[3, 3], [4, 0]])) == [[1.0, 1.0], [2.0, 0.0]]
    assert widgets.load_ratios([0, 0]) == [[0.0, 0.0]]  # no tokens at all: nothing to divide by


def test_keep_columns_bounds_the_heatmap_and_keeps_the_ends():
    assert widgets.keep_columns(5, 10) == [0, 1, 2, 3, 4]
    cols = widgets.keep_columns(1000, 50)
    assert cols[0] == 0 and cols[-1] == 999 and len(cols) == 50 and cols == sorted(set(cols))


def test_load_heatmap_data_rows_are_layer_expert_pairs():
    steps = [0, 1, 2]
    ratios = [widgets.load_ratios(torch.tensor([[1, 3], [2, 2]])),
              widgets.load_ratios(torch.tensor([[2, 2], [0, 4]])),
              widgets.load_ratios(torch.tensor([[4, 0], [2, 2]]))]
    x, y, z = widgets.load_heatmap_data(steps, ratios, max_columns=2)
    assert x == [0, 2] and y == ["L0 E0", "L0 E1", "L1 E0", "L1 E1"]
    assert z == [[0.5, 2.0], [1.5, 0.0], [1.0, 1.0], [1.0, 1.0]]
    assert widgets.load_heatmap_data([0], [[[1.0, 1.0]]])[1] == ["E0", "E1"]  # one layer: no layer prefix
    assert widgets.load_heatmap_data([], []) == ([], [], [])


def test_load_summary_reports_max_violation_busiest_and_unused():
    ratios = [widgets.load_ratios(torch.tensor([[6, 2, 2, 2], [3, 3, 3, 3]])),  # MaxVio 1.0 and 0.0
              widgets.load_ratios(torch.tensor([[12, 0, 0, 0], [3, 3, 3, 3]]))]  # 3.0 and 0.0
    rows = widgets.load_summary([10, 20], ratios)
    assert rows[0] == (10, pytest.approx(0.5), "L0 E0", pytest.approx(2.0), 0)
    assert rows[1] == (20, pytest.approx(1.5), "L0 E0", pytest.approx(4.0), 3)


def test_expert_load_monitor_redraws_at_a_bounded_rate_and_updates_the_figure(capsys):
    monitor = widgets.ExpertLoadMonitor(every=5, min_interval=0.0, live=False)
    monitor.update(0, torch.tensor([[4, 4, 4, 4]]))
    heat, bar = monitor.fig.data
    assert list(heat.z[0]) == [1.0] and list(bar.x) == [1.0, 1.0, 1.0, 1.0]
    for step in range(1, 20):
        monitor.update(step, torch.tensor([[16, 0, 0, 0]]))
    assert monitor.draws == 4  # steps 0, 5, 10, 15
    monitor.finish()
    heat, bar = monitor.fig.data
    assert len(heat.x) == 20 and list(heat.y) == ["E0", "E1", "E2", "E3"] and heat.z[0][-1] == 4.0
    assert list(bar.x) == [4.0, 0.0, 0.0, 0.0] and monitor.seconds > 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["step", "MaxVio", "busiest", "load/mean", "unused"]
    assert out[1].split() == ["0", "0.00", "E0", "1.00", "0"] and out[-2].split()[:2] == ["19", "3.00"]
    assert out[-1] == "final load / mean: 4.0 0.0 0.0 0.0"


def test_expert_load_monitor_colours_the_fair_share_white():
    for zmax in (2.0, 4.0):
        scale = widgets.ExpertLoadMonitor(zmax=zmax, live=False).fig.data[0].colorscale
        assert [tuple(c) for c in scale if c[1] == "#f7f7f7"] == [(1.0 / zmax, "#f7f7f7")]


def test_expert_load_monitor_is_slowed_by_min_interval():
    monitor = widgets.ExpertLoadMonitor(every=1, min_interval=3600.0, live=False)
    for step in range(50):
        monitor.update(step, torch.tensor([[1, 2, 3]]))
    assert monitor.draws == 1 and len(monitor.steps) == 50  # every step recorded, drawn once
