"""Make executed notebooks readable without a kernel: drop their references to live widgets.

A notebook executed by `make notebooks` keeps no widget state, so each live widget's output is a reference to
a model that no longer exists: JupyterLab would show "Error displaying widget: model not found" and GitHub a
blank. The course's live views (`course_lib.widgets.static`) put a static copy of their final state (a PNG,
HTML or a line of text) into the same output, so dropping the reference leaves that copy for every reader;
re-running the cell brings the live widget back. An output that would be left with nothing but a widget's
Python repr (a widget shown some other way) is reported, since it means a view without a static copy.

    python tools/strip_widget_views.py notebooks/*.ipynb      (make notebooks runs it)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_REPR = re.compile(r"^\s*(FigureWidget|[A-Z]\w*(Box|Widget|Slider|Button|Buttons|Dropdown|Progress|HTML|Output))\(")


def strip(nb) -> list[str]:
    """Drop widget references from `nb`'s outputs in place; returns where a bare widget repr was left."""
    bare = []
    nb.metadata.pop("widgets", None)
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            data = out.get("data")
            if not data or WIDGET_VIEW not in data:
                continue
            del data[WIDGET_VIEW]
            text = "".join(data.get("text/plain", ""))
            if set(data) <= {"text/plain"} and WIDGET_REPR.match(text):
                bare.append(f"cell {i}: {text[:60]!r}")
    return bare


def main(paths: list[str]) -> int:
    status = 0
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        bare = strip(nb)
        nbformat.write(nb, path)
        for where in bare:
            print(f"{Path(path).name} {where}: a widget with no static copy", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
