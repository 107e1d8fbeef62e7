"""Fixtures for the real-browser widget test: a throwaway JupyterLab server and one headless Chromium page.

The server runs on 127.0.0.1 on a free port with token auth on, and with its own temporary settings,
workspace, runtime, config and data folders, so neither a learner's ~/.jupyter nor a previous run can
change what the test sees. News and update checks are off (no network, no toasts over the widgets).
It is always stopped, also when a test fails: graceful /api/shutdown first (it shuts the kernels down),
then SIGTERM and SIGKILL to its process group and to any kernel left behind.

Chromium is Debian's (/usr/bin/chromium, driven by the `playwright` package; never `playwright install`).
Without it the test fails under CI=true (`.ci/run` installs it) and is skipped with a reason elsewhere.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"
SERVER_START_S = 120  # a cold JupyterLab on 2 busy cores takes 10-30 s


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require(ok: bool, why: str) -> None:
    """A missing browser is a failure in CI (it must not pass by skipping) and a skip elsewhere."""
    if not ok:
        if in_ci():
            pytest.fail(f"{why} (CI=true: the browser test must run; .ci/run installs chromium)", pytrace=False)
        pytest.skip(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """All descendants of pid (Linux /proc; elsewhere none). Kernels run in their own session, so
    killing the server's process group alone would leave them running."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


class LabServer:
    """`jupyter lab` serving `root`, with everything it writes kept under `tmp`."""

    def __init__(self, root: Path, tmp: Path) -> None:
        self.root, self.tmp = root, tmp
        self.token = secrets.token_hex(16)
        self.log_path = tmp / "jupyterlab.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        folders = {name: self.tmp / name for name in ("settings", "workspaces", "runtime", "config", "data", "ipython")}
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        # Belt and braces with --LabApp.news_url=None: never ask "get notified about Jupyter news?".
        notification = folders["settings"] / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
        notification.parent.mkdir(parents=True, exist_ok=True)
        notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
        env = {**os.environ, "JUPYTER_CONFIG_DIR": str(folders["config"]), "JUPYTER_DATA_DIR": str(folders["data"]),
               "JUPYTER_RUNTIME_DIR": str(folders["runtime"]), "IPYTHONDIR": str(folders["ipython"]),
               "OMP_NUM_THREADS": "1", "COURSE_PROFILE": "cpu", "PYTHONUNBUFFERED": "1"}
        for attempt in range(3):  # the free port can be taken between free_port() and the bind
            self.port = free_port()
            cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
                   "--ServerApp.port_retries=0", f"--ServerApp.root_dir={self.root}",
                   f"--IdentityProvider.token={self.token}", "--ServerApp.allow_root=True",
                   f"--LabApp.user_settings_dir={folders['settings']}", f"--LabApp.workspaces_dir={folders['workspaces']}",
                   "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                   "--LabApp.extension_manager=readonly",  # no PyPI queries from the extension manager
                   "--LabApp.expose_app_in_browser=True"]  # window.jupyterapp: run commands, read cell outputs
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
            if self._wait_ready():
                return
            self.stop()
            if "Address already in use" not in self.log_tail() or attempt == 2:
                break
        raise RuntimeError(f"JupyterLab did not start within {SERVER_START_S} s; its log ends with:\n{self.log_tail()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                self.api("GET", "/api/status", timeout=5)
                return True
            except (OSError, urllib.error.URLError):
                time.sleep(0.25)
        return False

    def api(self, method: str, path: str, timeout: float = 10) -> bytes:
        req = urllib.request.Request(self.url + path, method=method, headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.read()

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        kernels = _children(proc.pid)
        try:  # graceful: the server shuts its kernels down and exits
            self.api("POST", "/api/shutdown", timeout=5)
            proc.wait(timeout=15)
        except (OSError, urllib.error.URLError, subprocess.TimeoutExpired):
            pass
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        for pid in kernels:  # their own sessions: not in the server's process group
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture(scope="module")
def lab_server():
    """A running JupyterLab over an empty temporary folder (tests write their notebooks into `.root`)."""
    tmp = Path(tempfile.mkdtemp(prefix="course-browser-test-"))
    root = tmp / "notebooks"
    root.mkdir()
    server = LabServer(root, tmp / "server")
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def chromium():
    """Debian's Chromium, headless, driven by playwright (module scope: closed before nbval runs)."""
    require(os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: `apt-get install chromium` (Debian's package)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "the `playwright` package is missing: `pip install -e '.[test]'`")
    pw = sync_playwright().start()
    try:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
    finally:
        pw.stop()


@pytest.fixture(scope="module")
def lab_page(lab_server, chromium):
    """One JupyterLab page, loaded once (a cold load is the slowest step); tests open notebooks in it.

    `page.errors` collects uncaught exceptions (a widget that crashed) and `page.console_errors` the
    console's errors; tests report both when they fail."""
    page = chromium.new_page(viewport={"width": 1280, "height": 1000})
    page.errors, page.console_errors = [], []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.on("console", lambda msg: page.console_errors.append(msg.text) if msg.type == "error" else None)
    page.set_default_timeout(120_000)
    page.goto(f"{lab_server.url}/lab?token={lab_server.token}")
    page.wait_for_function("() => window.jupyterapp !== undefined")
    page.evaluate("async () => { await window.jupyterapp.started; await window.jupyterapp.restored; }")
    try:
        yield page
    finally:
        page.close()
