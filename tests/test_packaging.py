"""The set-up files agree with each other: pyproject, Binder's environment.yml, the notebooks' first cell."""

import glob
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {"torch", "einops", "numpy", "ipywidgets", "anywidget", "plotly", "tqdm"}  # no notebook server: Colab has one


def _name(req: str) -> str:
    return re.split(r"[<>=!~ \[;@]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_pyproject_names_every_dependency_and_ranges_torch():
    deps = pyproject()["project"]["dependencies"]
    assert {_name(d) for d in deps} == REQUIRED
    torch_req = next(d for d in deps if _name(d) == "torch")
    assert "==" not in torch_req and ">=" in torch_req, "torch must be a range so Colab's torch is kept"
    test_extras = {_name(d) for d in pyproject()["project"]["optional-dependencies"]["test"]}
    assert {"pytest", "nbval", "transformers", "playwright", "jupyterlab"} <= test_extras
    assert {_name(d) for d in pyproject()["project"]["optional-dependencies"]["lab"]} == {"jupyterlab"}


def test_environment_yml_parses_and_matches_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps
    pip = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    names = {_name(p) for p in pip if not p.startswith("-")}
    assert names == {_name(d) for d in pyproject()["project"]["dependencies"]} | {"jupyterlab"}  # Binder serves it
    assert any("whl/cpu" in p for p in pip), "Binder has no GPU: install the CPU build of torch"


def test_postbuild_installs_the_course_package():
    post = ROOT / "postBuild"
    assert post.stat().st_mode & 0o111, "postBuild must be executable for repo2docker"
    assert re.search(r"pip install .*-e \.", post.read_text())


def test_every_notebook_starts_with_the_same_setup_cell():
    url = pyproject()["project"]["urls"]["Repository"]
    firsts = []
    for path in sorted(glob.glob(str(ROOT / "notebooks" / "*.ipynb"))):
        cells = [c for c in json.loads(Path(path).read_text())["cells"] if c["cell_type"] == "code"]
        firsts.append("".join(cells[0]["source"]))
    assert firsts, "no notebooks found"
    assert len(set(firsts)) == 1, "notebooks differ in their first code cell"
    cell = firsts[0]
    assert f"git+{url}" in cell and "enable_custom_widget_manager" in cell and "setup_notebook(" in cell
    assert '"google.colab" in sys.modules' in cell
    assert "--force-reinstall" not in cell and "torch" not in cell.split("pip")[1].split("check=True")[0]
    # Colab: this notebook's release, and nothing of Colab's replaced (no dependency resolution at all)
    version = pyproject()["project"]["version"]
    assert f'COURSE_REF = "v{version}"' in cell and '"--no-deps"' in cell
    assert "COURSE_CHECKPOINT_DIR" in cell and "drive.mount" in cell
    badges = re.findall(r"colab\.research\.google\.com/github/[^)]*?/blob/([^/]+)/notebooks", (ROOT / "README.md").read_text())
    assert badges and set(badges) == {f"v{version}"}, "Colab badges must open the release the notebooks install"


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make lab" in readme
    assert re.search(r"^make test$", ci, re.M)


def test_lab_command_keeps_token_auth_on_localhost():
    make = (ROOT / "Makefile").read_text()
    lab = make.split("\nlab:")[1].split("\n\n")[0]
    assert "--ip=127.0.0.1" in lab
    assert "token=''" not in lab and 'token=""' not in lab and "disable_check_xsrf" not in lab


def test_make_commands_cache_bytecode_inside_the_venv(tmp_path):
    """The commands' Python processes compile what they import once, into .venv/pycache, even under
    PYTHONDONTWRITEBYTECODE (pip installs with --no-compile): without it every kernel recompiles torch."""
    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    probe = tmp_path / "probe.mk"
    probe.write_text(f"include {ROOT / 'Makefile'}\nprobe:\n\t@env\n")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPYCACHEPREFIX", None)
    out = subprocess.run(["make", "-s", "-f", str(probe), "probe"], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True).stdout
    seen = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert "PYTHONDONTWRITEBYTECODE" not in seen
    assert Path(seen["PYTHONPYCACHEPREFIX"]) == ROOT / ".venv" / "pycache"


def test_readme_badges_point_at_the_repository_url():
    url = pyproject()["project"]["urls"]["Repository"]
    slug = url.removeprefix("https://github.com/")
    readme = (ROOT / "README.md").read_text()
    badges = re.findall(r"\]\((https://(?:mybinder\.org/v2/gh|colab\.research\.google\.com/github)/[^)]+)\)", readme)
    assert len(badges) == 2 and all(f"/{slug}/" in b for b in badges)


def test_make_lab_as_root_says_how_to_proceed(tmp_path):
    """In a container make lab runs as root, where JupyterLab refuses to start: make says what to do instead."""
    fake_id = tmp_path / "id"
    fake_id.write_text("#!/bin/sh\necho 0\n")  # whoever runs the test, make sees root
    fake_id.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(["make", "-s", "-o", "setup", "-o", ".venv/.course-installed", "lab"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "make lab LAB_ARGS=--allow-root" in done.stdout and "127.0.0.1" in done.stdout
