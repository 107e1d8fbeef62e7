"""Committed notebooks are what a learner reads on the web: one in-order run, no errors, no widget-state
blobs, no machine paths, small."""

import glob
import json
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(glob.glob(str(ROOT / "notebooks" / "*.ipynb")))
MACHINE_PATH = re.compile(r"(/(work|tmp|root|home|Users|content)/[^\s\"']+|[A-Z]:\\\\Users)")


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_clean(path):
    raw = Path(path).read_text()
    nb = json.loads(raw)
    assert os.path.getsize(path) < 1_000_000, "over 1 MB: widget state or huge outputs committed?"
    assert "widgets" not in nb.get("metadata", {}), "widget state is stored in the metadata"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    counts = [c["execution_count"] for c in code]
    assert None not in counts, "some code cells were never executed"
    assert counts == list(range(1, len(code) + 1)), "outputs are not from one top-to-bottom run"
    for c in code:
        for out in c.get("outputs", []):
            assert out["output_type"] != "error", f"an error output: {out.get('ename')}"
            assert out.get("name") != "stderr" or "Traceback" not in "".join(out.get("text", ""))
            assert not MACHINE_PATH.search(json.dumps(out)), "an output shows a path of this machine"


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_REPR = re.compile(r"^\s*(FigureWidget|[A-Z]\w*(Box|Widget|Slider|Button|Buttons|Dropdown|Progress|HTML|Output))\(")
FIRST_FRAME = re.compile(r"\b0%\|")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_reads_without_a_kernel(path):
    """What GitHub, nbviewer and JupyterLab show before a run: an image beside every chart, the final state of
    every live view, no reference to a widget that no longer exists, no repr dump, no bar's first frame."""
    nb = json.loads(Path(path).read_text())
    for i, cell in enumerate(nb["cells"]):
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            where = f"cell {i}"
            assert WIDGET_VIEW not in data, f"{where}: a live widget's reference (run tools/strip_widget_views.py)"
            if "application/vnd.plotly.v1+json" in data:
                assert "image/png" in data, f"{where}: a chart without its static image (kaleido missing?)"
            text = "".join(data.get("text/plain", "")) + "".join(out.get("text", ""))
            assert not WIDGET_REPR.match(text), f"{where}: a widget's repr instead of a view: {text[:60]!r}"
            assert not FIRST_FRAME.search(text), f"{where}: a progress bar's first frame"
