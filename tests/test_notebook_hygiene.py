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
