"""The committed notebooks as a reader meets them before running anything, in a real browser.

1. Exported to HTML by nbconvert (what nbviewer and an HTML export show; GitHub's view is much the same:
   no widget state, no plotly.js), each notebook is opened in Chromium, which must show every static image
   the notebook carries (loaded, with a size), and no widget dump, widget error or progress bar's first frame.
2. Two committed notebooks with live views (00: the loss plot and a progress bar; 05: the expert-load
   monitor) are opened in JupyterLab without running a cell: no "Error displaying widget" may appear, and
   their images must be on screen.
Screenshots go to test-artifacts/html/ and test-artifacts/browser/ (ignored by git).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import nbformat
import pytest
from nbconvert import HTMLExporter

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = Path(os.environ.get("COURSE_NOTEBOOK_DIR", ROOT / "notebooks"))  # another folder: a trial run
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
HTML_ARTIFACTS = ROOT / "test-artifacts" / "html"
LAB_ARTIFACTS = ROOT / "test-artifacts" / "browser"
# What a reader must never see: a widget's Python repr, a widget that cannot be drawn, a bar's first frame.
DUMPS = re.compile(r"FigureWidget\(|[VH]Box\(children|Error displaying widget|Loading widget|\b0%\|")
OUTPUT_IMAGES = """() => Array.from(document.querySelectorAll('.jp-OutputArea-output img'))
    .map(img => ({ok: img.complete && img.naturalWidth > 50 && img.naturalHeight > 50, src: img.src.slice(0, 30)}))"""


def png_outputs(nb) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))


@pytest.mark.browser
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem[:2])
def test_html_export_shows_every_image_and_no_widget_dump(path, chromium):
    nb = nbformat.read(path, as_version=4)
    expected = png_outputs(nb)
    html, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    HTML_ARTIFACTS.mkdir(parents=True, exist_ok=True)
    out = HTML_ARTIFACTS / f"{path.stem}.html"
    out.write_text(html)
    page = chromium.new_page(viewport={"width": 1100, "height": 900})
    try:
        page.goto(out.as_uri(), wait_until="domcontentloaded")  # its CDN scripts never load here: not needed
        page.wait_for_function(f"() => document.querySelectorAll('.jp-OutputArea-output img').length >= {expected}"
                               " && Array.from(document.images).every(i => i.complete)", timeout=60_000)
        images = page.evaluate(OUTPUT_IMAGES)
        text = page.evaluate("() => document.body.innerText")
        page.screenshot(path=str(HTML_ARTIFACTS / f"{path.stem}.png"), full_page=True)
    finally:
        page.close()
    assert len(images) == expected, f"{path.name}: {expected} images in the notebook, {len(images)} on the page"
    assert all(i["ok"] for i in images), f"{path.name}: images that did not draw: {[i for i in images if not i['ok']]}"
    dumps = sorted({m.group(0) for m in DUMPS.finditer(text)})
    assert not dumps, f"{path.name}: the page shows {dumps}"


LIVE = ["00_setup_and_baseline.ipynb", "05_deepseekmoe_balancing.ipynb"]


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_jupyterlab_opens_committed_notebooks_without_widget_errors(lab_server, lab_page):
    for name in LIVE:
        shutil.copy(NOTEBOOK_DIR / name, lab_server.root / name)
    LAB_ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for name in LIVE:
        nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
        static_only = sum("image/png" in out.get("data", {}) and "application/vnd.plotly.v1+json" not in out["data"]
                          for cell in nb.cells for out in cell.get("outputs", []))
        assert static_only > 0, f"{name} has no live view left as an image: pick another notebook for this test"
        lab_page.evaluate("""async (path) => {
          window.__open = await window.jupyterapp.commands.execute('docmanager:open',
                                                                   {path, factory: 'Notebook', kernel: {name: 'none'}});
          await window.__open.context.ready;
          window.jupyterapp.shell.activateById(window.__open.id);
        }""", name)
        # the notebook renders its cells lazily as they scroll into view: walk it to the end
        lab_page.evaluate("""async () => {
          const nb = window.__open.content;
          for (let i = 0; i < nb.widgets.length; i++) {
            nb.activeCellIndex = i; nb.scrollToItem ? await nb.scrollToItem(i) : nb.activeCell.node.scrollIntoView();
            await new Promise(r => setTimeout(r, 30));
          }
        }""")
        lab_page.wait_for_timeout(1500)
        found = lab_page.evaluate("""() => {
          const node = window.__open.node;
          return {text: node.innerText,
                  images: Array.from(node.querySelectorAll('.jp-OutputArea-output img'))
                          .filter(i => i.complete && i.naturalWidth > 50).length};
        }""")
        lab_page.screenshot(path=str(LAB_ARTIFACTS / f"unexecuted_{Path(name).stem}.png"))
        lab_page.evaluate("() => { window.__open.context.model.dirty = false; window.__open.dispose(); }")
        assert "Error displaying widget" not in found["text"], f"{name}: JupyterLab shows a widget error"
        assert found["images"] >= static_only, f"{name}: {static_only} live views left as images, {found['images']} shown"
