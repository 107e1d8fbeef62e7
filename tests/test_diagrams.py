"""The diagrams: drawn by tools/diagrams.py, stored in assets/diagrams/, carried by the notebooks that introduce
their ideas, and looked at in a real browser (a screenshot of each lands in test-artifacts/diagrams/)."""

import base64
import importlib.util
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SVGS = sorted((ROOT / "assets" / "diagrams").glob("*.svg"))


def tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_diagram_is_the_scripts_current_drawing():
    diagrams = tool("diagrams")
    assert len(SVGS) >= 5 and {p.stem for p in SVGS} == set(diagrams.DIAGRAMS)
    for path in SVGS:
        assert path.read_text() == diagrams.DIAGRAMS[path.stem]().svg(), f"{path.name}: run python tools/diagrams.py"
        root = ET.fromstring(path.read_text())  # well-formed
        assert root.tag.endswith("svg") and len(root.findall(".//{http://www.w3.org/2000/svg}text")) >= 4


def test_every_diagram_is_shown_in_a_notebook_as_it_is_in_assets():
    shown = {}
    for nb_path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for cell in json.loads(nb_path.read_text())["cells"]:
            for name, bundle in cell.get("attachments", {}).items():
                assert f"(attachment:{name})" in "".join(cell["source"]), f"{nb_path.name}: {name} not linked"
                data = bundle["image/svg+xml"]  # nbformat may store a long string as a list of lines
                shown[name] = base64.b64decode("".join(data) if isinstance(data, list) else data)
    for path in SVGS:
        assert shown.get(path.name) == path.read_bytes(), f"{path.name}: run python tools/embed_diagrams.py"


@pytest.mark.browser
def test_each_diagram_renders_in_chromium():
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI needs Debian's chromium (.ci/run installs it)")
        pytest.skip("Debian's chromium is not installed")
    from playwright.sync_api import sync_playwright

    out = ROOT / "test-artifacts" / "diagrams"
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 920, "height": 500})
            for path in SVGS:
                page.goto(path.resolve().as_uri())
                box = page.locator("svg").bounding_box()
                assert box and box["width"] >= 800 and box["height"] >= 300, path.name
                assert page.locator("text").count() >= 4
                page.screenshot(path=str(out / f"{path.stem}.png"))
        finally:
            browser.close()
    assert len(list(out.glob("*.png"))) >= len(SVGS)
