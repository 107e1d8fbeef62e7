"""The README's measured numbers are generated, and cannot drift from what was measured.

Chain: notebook 08's committed output prints its report card -> assets/report_card_cpu.json holds the same
card -> README.md's results table is rendered from that JSON; the contents table's run times are rendered
from assets/notebook_times_cpu.json. Change any link without the next and a test here fails.
"""

import importlib.util
import json
import re
from pathlib import Path

import pytest

from course_lib.capstone import MODELS, ROWS, results_table

ROOT = Path(__file__).resolve().parents[1]
# tools/ is the maintainers' folder, not part of the installed package: load the script by its path
_spec = importlib.util.spec_from_file_location("readme_report", ROOT / "tools" / "report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)
NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))


def card():
    return report.load_json(report.CARD)


def times():
    return report.load_json(report.TIMES)


def test_readme_is_generated_from_the_committed_json():
    readme = report.README.read_text()
    assert report.render(readme, card(), times()) == readme, \
        "README.md is stale: run `python tools/report.py` and commit the result"
    assert report.main(["--check"]) == 0


def test_the_committed_card_is_the_one_notebook_08_printed():
    nb = json.loads((ROOT / "notebooks" / "08_nano_deepseek.ipynb").read_text())
    printed = [line for c in nb["cells"] if c["cell_type"] == "code" for out in c.get("outputs", [])
               for line in "".join(out.get("text", "")).splitlines() if line.startswith("REPORT CARD ")]
    assert len(printed) == 1, "notebook 08 should print its card once, on a line starting with 'REPORT CARD '"
    assert json.loads(printed[0][len("REPORT CARD "):]) == card(), \
        "assets/report_card_cpu.json differs from the card in notebook 08's outputs: run `make results`"


def test_every_notebook_has_a_contents_row_and_a_measured_run_time():
    block = report.contents_block(report.README.read_text())
    listed = re.findall(r"\(notebooks/([^)]+\.ipynb)\)", block)
    assert listed == NOTEBOOKS, "the contents table should list every notebook, in order"
    assert set(times()) >= set(NOTEBOOKS)
    assert all(0 < s < 3600 for s in times().values())


def test_a_changed_number_changes_the_readme():
    readme = report.README.read_text()
    changed = json.loads(json.dumps(card()))
    changed["models"]["nano_deepseek"]["kv_cache_bytes_per_token"] += 1
    assert report.render(readme, changed, times()) != readme
    slower = {**times(), NOTEBOOKS[0]: times()[NOTEBOOKS[0]] + 7}
    assert report.render(readme, card(), slower) != readme


def test_results_table_rows_and_formats():
    c = {"profile": "cpu", "models": {m: {k: 0.25 for k, _, _ in ROWS} for m, _ in MODELS}}
    c["models"]["baseline"]["parameters"] = 1000
    c["models"]["baseline"]["max_vio_after_grpo"] = None
    c["models"]["nano_deepseek"]["parameters"] = 1234567
    table = results_table(c)
    assert "| parameters (total) | 1,000 | 1,234,567 |" in table
    assert "| held-out accuracy after GRPO | 25.0% | 25.0% |" in table
    assert "| expert load imbalance after GRPO (MaxVio, held-out) | n/a | 0.25 |" in table
    del c["models"]["baseline"]["accuracy_after_grpo"]
    with pytest.raises(ValueError, match="baseline.accuracy_after_grpo"):
        results_table(c)


def test_missing_markers_or_times_are_reported_clearly():
    with pytest.raises(ValueError, match="markers"):
        report.render("# a README without the markers\n", card(), times())
    block = "| 00 | [x](notebooks/00_x.ipynb) | a | b | 1 s |"
    assert report.contents_with_times(block, {"00_x.ipynb": 42.4}).endswith("| 42 s |")
    with pytest.raises(ValueError, match="no measured run time for 00_x.ipynb"):
        report.contents_with_times(block, {})


def test_results_table_names_the_device_of_each_measured_row():
    c = {"profile": "gpu", "models": {m: {k: 0.25 for k, _, _ in ROWS} for m, _ in MODELS},
         "devices": {"train": "cuda", "decode": "cpu", "model": "cuda"}}
    table = results_table(c)
    assert "| training tokens/s [cuda] |" in table and "| decode tokens/s, short context [cpu] |" in table
    assert "| parameters (total) |" in table  # a count has no device
    assert "the device each row was measured on" in table
    del c["devices"]
    assert "[cuda]" not in results_table(c)
