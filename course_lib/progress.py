"""Progress bars for the training loops, and the one place a notebook front end can change how they look.

`progress_bar(iterable, ...)` is tqdm's: a text bar in a terminal, an ipywidgets bar in a notebook
(`tqdm.auto`). A notebook bar lives in widget state, which committed notebooks do not keep, so on the web it
would read as its first frame ("0% 0/300") forever. `course_lib.widgets` therefore registers, when it is
imported, a bar that also leaves its final line as text (`set_progress_bar`); the core package stays free of
any UI library and just calls whatever is registered.
"""

from __future__ import annotations

from typing import Callable, Iterable

from tqdm.auto import tqdm

_bar: Callable[..., tqdm] = tqdm


def set_progress_bar(factory: Callable[..., tqdm] | None) -> None:
    """Use `factory` (tqdm's signature) for every later progress bar; None restores `tqdm.auto.tqdm`."""
    global _bar
    _bar = factory if factory is not None else tqdm


def progress_bar(iterable: Iterable, **kwargs) -> tqdm:
    """A progress bar over `iterable` (tqdm's keyword arguments: total, initial, desc, disable, ...)."""
    return _bar(iterable, **kwargs)
