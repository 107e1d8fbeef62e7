"""What a notebook leaves behind for readers without a kernel: static images beside every live view.

A committed notebook keeps its outputs but not its widgets' state, so on GitHub, nbviewer or an HTML export
a live widget is nothing (or a page of its Python repr) and a plotly chart needs plotly.js. Here:

- `png(fig)` draws a plotly figure to PNG with kaleido (which drives a local Chrome or Chromium); it returns
  None where that is not possible (kaleido not installed, no browser, `COURSE_STATIC_FIGURES=0`), and the
  notebook carries on with its interactive views only.
- The `course_png` plotly renderer adds that PNG to every `fig.show()`: JupyterLab draws the interactive
  chart, a reader on the web sees the image (`set_plotly_renderer` in `charts` picks it).
- `LiveView` shows a live widget with a one-line text in place of its repr, and `freeze(...)` adds the final
  state (a PNG of a figure, or HTML) to the same output: a live front end keeps drawing the widget, a reader
  on the web sees the final state. `tools/strip_widget_views.py` then drops the dead widget references
  from committed notebooks, so JupyterLab shows the image before the notebook is run.
- `NotebookBar` is tqdm's notebook bar that leaves its final line ("train: 100% 300/300 [00:42]") as text.
"""

from __future__ import annotations

import atexit
import base64
import os
import warnings

import plotly.graph_objects as go
import plotly.io as pio
from plotly.io._base_renderers import MimetypeRenderer
from tqdm.auto import tqdm as auto_bar
from tqdm.notebook import tqdm_notebook

from ..progress import set_progress_bar

try:  # optional: the test extra installs it; without it the views stay live-only
    import kaleido
except ImportError:
    kaleido = None

try:
    from IPython import get_ipython
    from IPython.display import display
except ImportError:  # plain Python: nothing to draw on
    get_ipython = display = None

STATIC_ENV = "COURSE_STATIC_FIGURES"  # "0" turns the static images off (faster; `make test` does)
PNG_SCALE = 1.0
_state = {"server": False, "broken": None}  # the kaleido server, and why PNGs failed (then never tried again)


def static_enabled() -> bool:
    return os.environ.get(STATIC_ENV, "1") != "0" and _state["broken"] is None


def png(fig, width: int | None = None, height: int | None = None) -> bytes | None:
    """The figure as PNG bytes, or None where no static image can be drawn here (see the module's doc)."""
    if not static_enabled():
        return None
    if kaleido is None:
        _state["broken"] = "kaleido is not installed (pip install kaleido)"
        return None
    try:
        if not _state["server"]:  # one browser for every figure: about 0.1 s a figure instead of 2 s
            kaleido.start_sync_server(silence_warnings=True)
            _state["server"] = True
            atexit.register(_stop_server)
        layout = fig.layout if hasattr(fig, "layout") else {}
        width = width or getattr(layout, "width", None) or 760
        height = height or getattr(layout, "height", None) or 360
        with warnings.catch_warnings():  # kaleido notes that its server ignores per-call browser options
            warnings.simplefilter("ignore", UserWarning)
            return pio.to_image(fig, format="png", width=width, height=height, scale=PNG_SCALE)
    except Exception as exc:  # kaleido missing, no Chrome, a browser that failed to start: views stay live-only
        _state["broken"] = f"{type(exc).__name__}: {exc}"
        return None


def _stop_server() -> None:
    try:
        kaleido.stop_sync_server(silence_warnings=True)
    except Exception:
        pass
    _state["server"] = False


def png_bundle(fig) -> dict:
    """{"image/png": base64} for a figure, or {} where none can be drawn."""
    data = png(fig)
    return {"image/png": base64.b64encode(data).decode("ascii")} if data else {}


class PngRenderer(MimetypeRenderer):
    """A plotly renderer that contributes a PNG of the figure to the output (nothing where none can be drawn)."""

    def to_mimebundle(self, fig_dict: dict) -> dict:
        return png_bundle(go.Figure(fig_dict))


def widget_bundle(widget, text: str) -> dict:
    """The display bundle of an ipywidget (or FigureWidget) with `text` as its plain-text fallback (built by
    hand: ipywidgets 7, which Colab ships, has no `_repr_mimebundle_`)."""
    view = {"version_major": 2, "version_minor": 0, "model_id": widget.model_id}
    return {"application/vnd.jupyter.widget-view+json": view, "text/plain": text}


def show_bundle(bundle: dict):
    """Display a raw mime bundle with a display id (a handle to update it), inside IPython only."""
    if display is None or get_ipython() is None:
        return None
    return display(bundle, raw=True, display_id=True)


class LiveView:
    """A live widget on screen, whose output can later carry a static copy of its final state.

    `LiveView(widget, text)` displays the widget (text is what a reader without widgets sees until
    `freeze`); `freeze(fig=None, html=None, text=None)` puts a PNG of `fig` and/or `html` into the same
    output. Outside a notebook it does nothing.
    """

    def __init__(self, widget, text: str) -> None:
        self.text, self.handle = text, None
        self.view = widget_bundle(widget, text)  # the widget's reference, kept: the widget may be gone later
        self.handle = show_bundle(self.view)

    def show_text(self, text: str) -> None:
        """Replace the fallback text (the widget stays as it is)."""
        if self.handle is not None:
            self.handle.update({**self.view, "text/plain": text}, raw=True)

    def freeze(self, fig=None, html: str | None = None, text: str | None = None) -> dict:
        """Add the final state to the widget's output; returns the static part of the bundle."""
        static = png_bundle(fig) if fig is not None else {}
        if html is not None:
            static["text/html"] = html
        if self.handle is not None:
            self.handle.update({**self.view, "text/plain": text or self.text, **static}, raw=True)
        return static


class NotebookBar(tqdm_notebook):
    """tqdm's notebook bar, displayed with its text line as the fallback and updated to the final line when
    it closes, so a committed notebook shows where training ended instead of the bar's first frame."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["display"] = False
        super().__init__(*args, **kwargs)
        self._view = None
        if not self.disable and hasattr(self, "container"):
            self._view = LiveView(self.container, self._line())

    def _line(self) -> str:
        return self.format_meter(**{**self.format_dict, "ascii": True, "ncols": 80})

    def close(self) -> None:
        super().close()
        view, self._view = getattr(self, "_view", None), None  # tqdm closes again when collected
        if view is not None:
            view.show_text(self._line())


def register_progress_bar() -> bool:
    """Inside a notebook (where tqdm.auto picks its notebook bar), make the training loops use `NotebookBar`."""
    if issubclass(auto_bar, tqdm_notebook):
        set_progress_bar(NotebookBar)
        return True
    return False
