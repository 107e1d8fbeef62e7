"""Every widget of course_lib.widgets, rendered in a real JupyterLab in a real browser (issue 7, item 1).

Unit tests check a widget's Python state; only a browser shows that it renders. For each widget this
writes a small notebook (the course's imports, then the widget on tiny inputs), opens it in JupyterLab
(see conftest.py) and runs it from the Run menu's commands, then asserts in the page:
  - no cell raised, and no "Error displaying widget";
  - the widget and its ipywidgets controls are in the DOM, and it drew something (plot marks, rows);
  - it changes the way a learner sees it change: a live view redraws while its loop runs (the page
    is sampled every 50 ms), and moving each control redraws the figure;
  - the numbers in the page are the numbers course_lib computes (read back from plotly's `_fullData`).
A PNG of each widget goes to test-artifacts/browser/ (ignored by git).

A live view's loop runs only once the widget has rendered ("Run All Above" the loop cell, wait, then
"Run Selected Cell and All Below"), so a short loop shows every redraw however slow the machine is.
The course notebooks themselves are not re-run here (nbval does that), and the notebooks' kernels
are started and warmed together: about two minutes on 2 busy cores for five widgets. One `WidgetCase`
per widget; `test_every_widget_has_a_browser_case` fails when course_lib.widgets gains a widget without one.
"""

from __future__ import annotations

import inspect
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nbformat
import pytest

try:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
except ImportError:  # the `chromium` fixture then skips these tests, or fails them where CI=true
    PlaywrightTimeout = TimeoutError

from course_lib import memory, widgets

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"
SETUP = "import time\nfrom course_lib import setup_notebook, widgets\nnb = setup_notebook(quiet=True)"
PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the open notebook

# What a plotly plot shows, read back from plotly (`el` is the `.js-plotly-plot` div); null until drawn.
PLOTLY = """(el) => {
  if (!el._fullData) return null;
  const arr = v => (v === undefined || v === null) ? [] : (typeof v === 'object' && v.length !== undefined ? Array.from(v) : v);
  return {
    title: (el._fullLayout.title && el._fullLayout.title.text) || '',
    traces: el._fullData.map(t => ({type: t.type, x: arr(t.x), y: arr(t.y), z: arr(t.z).map(arr),
                                    opacity: t.marker ? arr(t.marker.opacity) : [], width: t.line ? t.line.width : null})),
    marks: el.querySelectorAll('.barlayer .point, .scatterlayer path.js-line, .scatterlayer .point, .heatmaplayer image').length,
  };
}"""
# What an ipywidgets.HTML shows: its text and its table rows.
HTML = """(el) => ({text: el.innerText, html: el.innerHTML, marks: el.querySelectorAll('tr').length})"""


@dataclass(frozen=True)
class WidgetCase:
    """One widget, shown the way a notebook shows it.

    cells:    code cells after SETUP that show the widget.
    loop:     for a live view, a code cell that updates it; it runs once the widget is on screen.
    element:  CSS selector of the widget's drawing; `probe` (JS) reads what it shows.
    controls: CSS selectors of ipywidgets controls that must be in the widget's output.
    actions:  each gets the widget's output (a playwright Locator) and moves a control; each must redraw.
    min_states: distinct drawings the page must show from the widget's first render to the loop's end.
    check:    gets the final drawing (what `probe` returns) and asserts its numbers.
    """

    widget: str
    cells: tuple[str, ...]
    check: Callable[[dict], None]
    loop: str = ""
    element: str = ".js-plotly-plot"
    probe: str = PLOTLY
    controls: tuple[str, ...] = ()
    actions: tuple[Callable, ...] = ()
    min_states: int = 1


# ------------------------------------------------------------------------------------------ the cases

def check_live_plot(shown: dict) -> None:
    loss, acc = shown["traces"]
    assert loss["x"] == list(range(30)) and acc["x"] == list(range(30)), "the last redraw must show every step"
    assert loss["y"] == pytest.approx([1 / (s + 1) for s in range(30)]) and acc["y"][-1] == pytest.approx(29 / 30)


def check_cache_explorer(shown: dict) -> None:
    # after the actions: llama-3-8b, MHA chosen, context 64K (one step left of 128K), batch 1, bf16, 80 GB
    r = memory.explore(memory.PRESETS["llama-3-8b"], "mha", 64 * 1024, 1, "bf16", 80.0)
    bars, chosen = shown["traces"][0], shown["traces"][-1]
    assert bars["x"] == [row["label"] for row in r["rows"]]
    assert bars["y"] == pytest.approx([row["kib_per_token"] for row in r["rows"]])
    assert chosen["x"] == [64 * 1024] and chosen["y"] == pytest.approx([r["selected"]["cache_gib"]])
    assert shown["title"].startswith("llama-3-8b: MHA")


def move_slider_left(output, label: str) -> None:
    handle = output.locator(".widget-slider", has_text=label).locator(".noUi-handle")
    handle.focus()
    handle.press("ArrowLeft")


def grpo_stats(step: int) -> dict:
    return {m: round(0.1 * step + i, 3) for i, m in enumerate(widgets.GRPO_METRICS)}


def check_dashboard(shown: dict) -> None:
    traces = shown["traces"]
    assert len(traces) == 2 * len(widgets.GRPO_METRICS)
    for i, m in enumerate(widgets.GRPO_METRICS):  # dots: every step's value; line: its moving average
        raw = [grpo_stats(s)[m] for s in range(20)]
        assert traces[2 * i]["x"] == list(range(20)) and traces[2 * i]["y"] == pytest.approx(raw)
        assert traces[2 * i + 1]["y"] == pytest.approx(widgets.smoothed(raw, 4))


LOADS = [[40 + 6 * s, 40, 40 - s, 40 - 3 * s] for s in range(12)]  # expert 0 takes over, expert 3 starves


def check_load_monitor(shown: dict) -> None:
    heat, bar = shown["traces"]
    ratios = [widgets.load_ratios(load) for load in LOADS]
    x, y, z = widgets.load_heatmap_data(list(range(12)), ratios)
    assert heat["x"] == x and heat["y"] == y and heat["z"] == [pytest.approx(row) for row in z]
    assert bar["x"] == pytest.approx(ratios[-1][0]) and bar["y"] == y


TRAFFIC = [[[0, 100 + 10 * s], [200 - 5 * s, 0]] for s in range(10)]  # (W, W) bytes per step, 2 ranks


def check_traffic(shown: dict) -> None:
    (heat,) = shown["traces"]
    assert heat["x"] == ["rank 0", "rank 1"] and heat["y"] == ["rank 0", "rank 1"]
    assert heat["z"] == [pytest.approx(row) for row in widgets.mean_matrix(TRAFFIC)]  # the mean of every step


COMPLETIONS = [["<think>1+2 is 3</think><answer>3</answer>", "<answer>4</answer>"],
               ["<think>so 3</think><answer>3</answer>", "3 <answer>3</answer>"],
               ["<think>add</think><answer>3</answer>", "<think>add</think><answer>3</answer>"]]


def check_completions(shown: dict) -> None:
    assert shown["marks"] == 1 + 2, "a header row and one row per completion"
    assert "1+2=" in shown["text"] and shown["text"].count("<answer>") == 2  # the last rollout, tags shown as text
    assert shown["html"].count(widgets.PART_STYLES["answer"]) == 2 + 1  # each answer highlighted, and the legend


CASES = [
    WidgetCase(
        "LivePlot",
        cells=("plot = widgets.LivePlot(('loss', 'accuracy'), title='browser test: LivePlot', every=5, min_interval=0.1)",),
        loop=("for step in range(30):  # a fake training loop\n"
              "    time.sleep(0.05)\n"
              "    plot.update(step, loss=1 / (step + 1), accuracy=step / 30)\n"
              "plot.finish()"),
        min_states=3, check=check_live_plot),
    WidgetCase(
        "CacheExplorer",
        cells=("explorer = widgets.CacheExplorer()",),
        controls=(".widget-dropdown select", ".widget-toggle-buttons button", ".widget-slider .noUi-handle"),
        actions=(lambda out: out.locator(".widget-dropdown", has_text="model").locator("select").select_option("llama-3-8b"),
                 lambda out: out.locator(".widget-toggle-buttons button", has_text="MHA").click(),
                 lambda out: move_slider_left(out, "context")),
        check=check_cache_explorer),
    WidgetCase(
        "TrainingDashboard",
        cells=(f"dashboard = widgets.TrainingDashboard(title='browser test: GRPO', every=2, min_interval=0.1, window=4)\n"
               f"METRICS = {widgets.GRPO_METRICS!r}",),
        loop=("for step in range(20):  # fake GRPO stats, a straight line per metric\n"
              "    time.sleep(0.05)\n"
              "    dashboard(step, {m: round(0.1 * step + i, 3) for i, m in enumerate(METRICS)})\n"
              "dashboard.finish()"),
        min_states=3, check=check_dashboard),
    WidgetCase(
        "ExpertLoadMonitor",
        cells=(f"monitor = widgets.ExpertLoadMonitor(title='browser test: routing collapse', every=2, min_interval=0.1)\n"
               f"LOADS = {LOADS!r}",),
        loop=("for step, load in enumerate(LOADS):  # (L, E) token counts: one layer, four experts\n"
              "    time.sleep(0.1)\n"
              "    monitor.update(step, [load])\n"
              "monitor.finish()"),
        min_states=3, check=check_load_monitor),
    WidgetCase(
        "TrafficHeatmap",
        cells=(f"heatmap = widgets.TrafficHeatmap(title='browser test: traffic', min_interval=0.1)\n"
               f"TRAFFIC = {TRAFFIC!r}",),
        loop=("for step, matrix in enumerate(TRAFFIC):  # bytes rank to rank, one matrix a step\n"
              "    time.sleep(0.1)\n"
              "    heatmap.update(step, matrix)\n"
              "heatmap.finish()"),
        min_states=3, check=check_traffic),
    WidgetCase(
        "CompletionsViewer",
        cells=("import torch\n"
               "from course_lib.rollout import Rollout\n"
               "from course_lib.tasks import AdditionProblem\n"
               "viewer = widgets.CompletionsViewer(groups=1, per_group=2, title='browser test: samples')\n"
               f"COMPLETIONS = {COMPLETIONS!r}",),
        loop=("for texts in COMPLETIONS:  # three fake rollouts of one problem, two samples each\n"
              "    time.sleep(0.3)\n"
              "    viewer.update(Rollout([AdditionProblem(1, 2)], [[1]], torch.zeros(2, 1, dtype=torch.long),\n"
              "                          torch.ones(2, 1, dtype=torch.bool), torch.tensor([True, True]), texts, 2))"),
        element=".widget-html", probe=HTML, min_states=3, check=check_completions),
]


# ---------------------------------------------------------------------------------- driving the page

def write_notebook(folder: Path, case: WidgetCase) -> str:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(source) for source in (SETUP, *case.cells, *([case.loop] if case.loop else []))]
    name = f"browser_{case.widget}.ipynb"
    nbformat.write(nb, folder / name)
    return name


def open_notebooks(page, paths: list[str], timeout_s: float = 240) -> None:
    """Open every notebook (one tab and one kernel each) and warm the kernels together.

    Starting a kernel and importing torch, plotly and nbformat is most of a case's time; done for all
    notebooks at once it overlaps with the others' waits. The warm-up runs SETUP silently in the
    kernel (no cell runs), so each notebook still runs top to bottom in its test."""
    page.evaluate("""([paths, code]) => {
      window.__panels = {}; window.__warm = null;
      Promise.all(paths.map(async (path) => {
        const panel = await window.jupyterapp.commands.execute('docmanager:open', {path, factory: 'Notebook'});
        window.__panels[path] = panel;
        await panel.context.ready;
        await panel.sessionContext.ready;
        const reply = await panel.sessionContext.session.kernel.requestExecute({code, silent: true}).done;
        if (reply.content.status !== 'ok') throw new Error(`${path}: ${reply.content.ename}: ${reply.content.evalue}`);
      })).then(() => { window.__warm = {ok: true}; }, e => { window.__warm = {ok: false, error: String(e)}; });
    }""", [paths, SETUP])
    page.wait_for_function("() => window.__warm !== null", timeout=timeout_s * 1000)
    warm = page.evaluate("() => window.__warm")
    assert warm["ok"], f"warming the kernels failed: {warm.get('error')}"


def activate_notebook(page, path: str) -> None:
    page.evaluate("""(path) => {
      window.__panel = window.__panels[path];
      window.jupyterapp.shell.activateById(window.__panel.id);
    }""", path)
    page.wait_for_function("""() => { const k = window.__panel.sessionContext.session?.kernel;
                                      return k && k.connectionStatus === 'connected' && k.status === 'idle'; }""")


def close_notebook(page) -> None:
    page.evaluate("""async () => {
      const panel = window.__panel; window.__panel = null;
      clearInterval(window.__recorder);
      if (!panel || panel.isDisposed) return;
      try { await panel.sessionContext.shutdown(); } catch (e) {}
      panel.context.model.dirty = false;
      panel.dispose();
    }""")


def run(page, command: str, active_cell: int = 0, timeout_s: float = 240) -> None:
    """Run a Run-menu command on the open notebook and wait until its cells ran and the kernel is idle."""
    page.evaluate("""([command, active]) => {
      window.__panel.content.activeCellIndex = active;
      window.__ran = null;
      window.jupyterapp.commands.execute(command).then(
        ok => { window.__ran = {ok: ok !== false}; }, e => { window.__ran = {ok: false, error: String(e)}; });
    }""", [command, active_cell])
    page.wait_for_function("() => window.__ran !== null", timeout=timeout_s * 1000)
    page.wait_for_function("() => window.__panel.sessionContext.session.kernel.status === 'idle'")
    errors = [re.sub(r"\x1b\[[0-9;]*m", "", e) for e in page.evaluate("""() =>
        window.__panel.content.widgets.flatMap((cell, i) => (cell.model.toJSON().outputs || [])
          .filter(o => o.output_type === 'error')
          .map(o => `cell ${i}: ${o.ename}: ${o.evalue}\\n${(o.traceback || []).join('\\n')}`))""")]
    assert page.evaluate("() => window.__ran.ok") and not errors, f"{command}: a cell failed:\n" + "\n".join(errors)


def probe_js(case: WidgetCase) -> str:
    return f"() => {{ const el = document.querySelector('{PANEL} {case.element}'); return el ? ({case.probe})(el) : null; }}"


def start_recording(page, case: WidgetCase) -> None:
    """Sample what the widget shows every 50 ms, keeping each distinct drawing (window.__states)."""
    page.evaluate("""(probeJs) => {
      const probe = eval(probeJs);
      window.__states = [];
      window.__sample = () => {
        const s = probe(); const text = s && JSON.stringify(s);
        if (text && window.__states[window.__states.length - 1] !== text) window.__states.push(text);
      };
      window.__sample();
      clearInterval(window.__recorder);
      window.__recorder = setInterval(window.__sample, 50);
    }""", probe_js(case))


def wait_until(page, case: WidgetCase, js: str, failure: str, arg=None, timeout_s: float = 60) -> None:
    """Wait until `js` is true in the page; fail at once if the page throws (a widget that crashed
    never recovers), else after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            page.wait_for_function(js, arg=arg, timeout=1000)
            return
        except PlaywrightTimeout:
            if page.errors or time.monotonic() > deadline:
                raise AssertionError(f"{case.widget}: {failure}. Uncaught page errors: {page.errors}; "
                                     f"console errors: {page.console_errors}") from None


@pytest.fixture(params=CASES, ids=lambda case: case.widget)
def case(request):
    return request.param


@pytest.fixture(scope="module")
def notebooks(request, lab_server, lab_page):
    """The selected cases' notebooks, open in JupyterLab with warm kernels: {widget: path}."""
    selected = {item.callspec.params["case"].widget for item in request.session.items
                if "case" in getattr(getattr(item, "callspec", None), "params", {})}
    paths = {case.widget: write_notebook(lab_server.root, case) for case in CASES if case.widget in selected}
    open_notebooks(lab_page, list(paths.values()))
    return paths


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_widget_renders_and_reacts_in_jupyterlab(case, notebooks, lab_page):
    page, t0, seconds = lab_page, time.monotonic(), {}
    page.errors.clear()
    page.console_errors.clear()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for stale in (f"{case.widget}.png", f"{case.widget}-failure.png"):
        (ARTIFACTS / stale).unlink(missing_ok=True)
    n_show = 1 + len(case.cells)
    activate_notebook(page, notebooks[case.widget])
    seconds["open"] = time.monotonic() - t0
    try:
        if case.loop:  # show the widget, then run the loop once it is on screen
            run(page, "notebook:run-all-above", active_cell=n_show)
        else:
            run(page, "notebook:run-all-cells")
        panel = page.locator(PANEL)
        output = panel.locator(".jp-Cell").filter(has=page.locator(case.element)).locator(".jp-Cell-outputArea")
        # plotly has drawn the figure (an ipywidgets.HTML may still be empty)
        wait_until(page, case, f"() => ({probe_js(case)})() !== null", f"nothing was drawn in its {case.element}")
        seconds["show"] = time.monotonic() - t0 - sum(seconds.values())
        assert "Error displaying widget" not in panel.inner_text(), f"{case.widget}: Error displaying widget"
        for selector in case.controls:
            assert output.locator(selector).count() > 0, f"{case.widget}: no control {selector!r} in the page"
        start_recording(page, case)
        if case.loop:
            run(page, "notebook:run-all-below", active_cell=n_show)
            time.sleep(0.3)  # the last redraw's messages may land just after the kernel goes idle
            seconds["loop"] = time.monotonic() - t0 - sum(seconds.values())
        for i, action in enumerate(case.actions):
            before = page.evaluate(f"() => JSON.stringify(({probe_js(case)})())")
            action(output)
            wait_until(page, case, f"(before) => JSON.stringify(({probe_js(case)})()) !== before",
                       f"control move {i + 1} did not change what the widget shows", arg=before)
        states = page.evaluate("() => (clearInterval(window.__recorder), window.__sample(), window.__states)")

        shown = page.evaluate(probe_js(case))
        visible = output.locator(case.element).first.is_visible()
        assert visible and shown is not None and shown["marks"] > 0, (
            f"{case.widget}: the page shows {'an empty' if visible else 'no'} drawing "
            f"({shown and shown['marks']} marks) although the kernel's widget has data, so its state did not "
            f"reach the browser or could not be drawn. Page errors: {page.errors}; {page.console_errors}")
        assert len(states) >= case.min_states + len(case.actions), (
            f"{case.widget}: the page showed {len(states)} distinct drawings, expected at least "
            f"{case.min_states + len(case.actions)} (a live view redraws while its loop runs)")
        case.check(shown)
        output.screenshot(path=ARTIFACTS / f"{case.widget}.png")
        print(f"\n{case.widget}: rendered and reacted in JupyterLab in {time.monotonic() - t0:.1f} s ("
              + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())
              + f"; {len(states)} drawings, {len(case.actions)} control moves)")
    except BaseException:
        page.screenshot(path=ARTIFACTS / f"{case.widget}-failure.png", full_page=True)
        raise
    finally:
        close_notebook(page)


def test_every_widget_has_a_browser_case():
    """A widget that lands in course_lib.widgets without a case here would go untested in a browser."""
    # `static` holds the plumbing of the static copies (a renderer, the display handle, the progress bar):
    # every case below shows its widget through it, and test_committed_notebooks.py checks what it leaves.
    classes = {name for name, obj in inspect.getmembers(widgets, inspect.isclass)
               if obj.__module__.startswith(widgets.__name__ + ".") and not name.startswith("_")
               and obj.__module__ != widgets.static.__name__}
    missing = classes - {case.widget for case in CASES}
    assert not missing, (f"widgets {sorted(missing)} have no case in tests/browser/test_widgets_in_lab.py: "
                         "add a WidgetCase (the cells that show it, its controls and what must change)")
