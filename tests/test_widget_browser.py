"""End-to-end test of PatchingWidget in a real browser: JupyterLab 4 + headless Chromium.

What it does, like a learner would:

1. write a notebook whose first cell displays ``patchwidgets.PatchingWidget()`` into the root
   of the session's JupyterLab server (127.0.0.1, free port, no token, no browser; one server
   for every browser test, the ``lab_server`` fixture of ``conftest.py``);
2. open it in headless Chromium (Python playwright), click into the cell editor and press
   Shift+Enter;
3. type a clean and a corrupted prompt, press Run, wait for the heatmap and check it: one
   cell per (layer, position), the strongest cell at the changed name (S2) in the first
   layer and at the final position (END) in the last layer, read from the ``data-value``
   attributes of the SVG cells;
4. slow the sweep down (a second cell sets ``w.step_delay``) and catch the fast preview:
   every cell first painted from the attribution-patching estimate and marked approximate
   (hatched, ``data-approx``), then turning exact as the sweep streams in;
5. toggle noising, switch metric, click a head cell and see its attention pattern;
6. switch to the path-patching view: sender heads to the logits, then Shift+click a head to
   make it the receiver and run again, each heatmap checked against
   :func:`patchwidgets.path_patch` in this process; a receiver that does not exist shows
   its error in place;
7. enter bad inputs and see the errors in place, and check that markup in a prompt stays text.

Screenshots go to ``test-artifacts/`` at the repository root (gitignored). Each notebook's
kernel is shut down when its fixture ends and the server when the session does, even when a
step fails. :class:`JupyterLab` and :func:`open_widget` are reused by
``benchmarks/bench_widget_latency.py``.

Skipped, with the reason, when Chromium (``/usr/bin/chromium``), playwright or JupyterLab
is missing. CI installs all three, so it runs there.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

WIDGET_CELL = """\
import os
os.environ["HF_HUB_OFFLINE"] = "1"
import patchwidgets
w = patchwidgets.PatchingWidget()
w"""
SLOW_CELL = ("w.step_delay = 0.6  # slow motion: pause after the estimate and after each chunk\n"
             "w.max_batch_tokens = 64  # several chunks (a toy sweep fits one pass by default)")
FAST_CELL = "w.step_delay = 0.0\nw.max_batch_tokens = 4096"


def missing_requirement() -> str | None:
    """Why the browser test cannot run here, or None."""
    if not Path(CHROMIUM).exists():
        return f"needs Chromium at {CHROMIUM} (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "needs the playwright Python package (pip install playwright)"
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        return "needs JupyterLab (pip install jupyterlab)"
    return None


if missing_requirement() is not None and os.environ.get("PATCHWIDGETS_REQUIRE_BROWSER") == "1":
    # CI installs Chromium and sets this: there a missing browser is a failure, not a skip.
    raise RuntimeError(f"browser test required but cannot run: {missing_requirement()}")

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(missing_requirement() is not None, reason=str(missing_requirement()))]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_notebook(path: Path, cells: list[str]) -> None:
    """Write a notebook of one code cell per string, on the Python 3 kernel, to ``path``."""
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


def write_settings(root: Path) -> None:
    """The user settings in ``root/settings``: no news/update toasts (there is no internet)
    and save widget state."""
    settings = root / "settings"
    for plugin, values in {
        "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
        "@jupyter-widgets/jupyterlab-manager/plugin": {"saveState": True},
    }.items():
        path = settings / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


def write_notebook_root(root: Path, cells: list[str], notebook: str) -> None:
    """Write ``root/nb/notebook`` (one code cell per string, Python 3 kernel) and the user
    settings in ``root/settings``. Notebook 7 is built from the same JupyterLab plugins, so
    ``tests/test_widget_hosts.py`` serves it the same root."""
    write_notebook(root / "nb" / notebook, cells)
    write_settings(root)


class JupyterLab:
    """A throw-away JupyterLab server on a temporary root; use as a context manager.

    Given ``cells``, it serves one notebook of them at :attr:`url` (what the benchmark opens).
    The tests share one server for the whole session instead (``lab_server`` in conftest.py:
    starting one costs seconds, and the fixtures would each start their own): each fixture
    adds its notebook (:meth:`add_notebook`), opens it in a workspace of its own
    (:meth:`notebook_url`) and ends its kernel when done (:meth:`close_notebook`).
    """

    def __init__(self, cells: list[str] | None = None, notebook: str = "widget_e2e.ipynb"):
        self.cells, self.notebook = cells, notebook
        self.root: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self._opener: urllib.request.OpenerDirector | None = None
        self._xsrf = ""

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/lab/tree/{self.notebook}"

    def _write_files(self) -> None:
        assert self.root is not None
        write_settings(self.root)
        if self.cells is not None:
            write_notebook(self.root / "nb" / self.notebook, self.cells)

    def __enter__(self) -> "JupyterLab":
        self.root = Path(tempfile.mkdtemp(prefix="pw-lab-"))
        (self.root / "nb").mkdir()
        self._write_files()
        self.port = _free_port()
        env = dict(os.environ, HF_HUB_OFFLINE="1", JUPYTER_RUNTIME_DIR=str(self.root / "runtime"),
                   PYTHONPATH=os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p))
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={self.port}",
               *(["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
               "--ip=127.0.0.1", "--ServerApp.port_retries=0", "--IdentityProvider.token=",
               "--ServerApp.password=", "--LabApp.extension_manager=readonly",
               f"--ServerApp.root_dir={self.root / 'nb'}",
               f"--LabApp.user_settings_dir={self.root / 'settings'}",
               f"--LabApp.workspaces_dir={self.root / 'workspaces'}"]
        self.log = open(self.root / "server.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_ready(self, timeout: float = 60) -> None:
        assert self.proc is not None
        wait_for_server(self.proc, f"{self.base}/api/status", timeout, "JupyterLab", self.server_log)

    def server_log(self) -> str:
        assert self.root is not None
        return log_tail(self.root / "server.log")

    # ----------------------------------------------------------------- one notebook per fixture
    def notebook_path(self, notebook: str) -> Path:
        """Where ``notebook`` is on disk (what Ctrl+S in the page writes)."""
        assert self.root is not None
        return self.root / "nb" / notebook

    def add_notebook(self, cells: list[str], notebook: str) -> Path:
        """Write ``notebook`` (one code cell per string) into the served root. Two fixtures
        alive at once with the same name would share a file and a kernel: refused."""
        path = self.notebook_path(notebook)
        if path.exists():
            raise ValueError(f"{notebook} is already served by this JupyterLab: give each fixture its own name")
        write_notebook(path, cells)
        return path

    def notebook_url(self, notebook: str) -> str:
        """``notebook`` opened in a workspace named after it. In the default workspace, JupyterLab
        would reopen every notebook an earlier fixture left in its layout, and start kernels
        for them again."""
        workspace = "".join(c if c.isalnum() else "-" for c in Path(notebook).stem)
        return f"{self.base}/lab/workspaces/{workspace}/tree/{notebook}"

    def close_notebook(self, notebook: str) -> None:
        """End ``notebook``'s sessions, which shuts their kernels down (``DELETE
        /api/sessions/<id>``), and remove the file, so that the name can be used again."""
        for session in self.api("GET", "/api/sessions"):
            if session.get("path") == notebook:
                self.api("DELETE", f"/api/sessions/{session['id']}")
        self.notebook_path(notebook).unlink(missing_ok=True)

    def api(self, method: str, path: str) -> Any:
        """Call the server's REST API; the JSON it answers (None when empty). A request that
        changes something must carry the ``_xsrf`` cookie's value in a header (XSRF protection);
        the server sets that cookie with the first page it renders."""
        import http.cookiejar

        if self._opener is None:
            jar = http.cookiejar.CookieJar()
            self._opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
            with self._opener.open(f"{self.base}/lab", timeout=60) as r:
                r.read()
            self._xsrf = next(c.value for c in jar if c.name == "_xsrf")
        request = urllib.request.Request(self.base + path, method=method, headers={"X-XSRFToken": self._xsrf})
        with self._opener.open(request, timeout=60) as r:
            body = r.read()
        return json.loads(body) if body else None

    def __exit__(self, *exc) -> None:
        stop_process_group(self.proc)
        if getattr(self, "log", None):
            self.log.close()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


def wait_for_server(proc: subprocess.Popen, url: str, timeout: float, name: str, log: Callable[[], str]) -> None:
    """Poll ``url`` until it answers 200 (at most ``timeout`` s); fail with the server's log
    (``log()``) if the server exits or never answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited early (code {proc.returncode}):\n{log()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{name} did not answer {url} in {timeout}s:\n{log()}")


def log_tail(path: Path) -> str:
    """The last 4,000 characters of a server's log, or nothing if it cannot be read."""
    try:
        return path.read_text()[-4000:]
    except OSError:
        return ""


def stop_process_group(proc: subprocess.Popen | None) -> None:
    """Stop a server started with ``start_new_session=True`` and everything it started (its
    kernels run in the same process group): SIGTERM, then SIGKILL after 10 s."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)


def launch_browser(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


#: JupyterLab's kernel is ready once its status bar reads "... | Idle".
LAB_KERNEL_IDLE = (".jp-StatusBar-TextItem:has-text('| Idle')",)


def open_widget(page, lab: JupyterLab, timeout_ms: int = 120_000) -> None:
    """Open the notebook, run its first cell (click in the editor, Shift+Enter) and wait
    until the widget has drawn itself."""
    page.goto(lab.url)
    run_first_cell(page, LAB_KERNEL_IDLE, timeout_ms)


@contextlib.contextmanager
def widget_page(playwright, lab: JupyterLab, cells: list[str], notebook: str = "widget_e2e.ipynb",
                height: int = 1400, before_open: Callable[[Any], None] | None = None) -> Iterator[Any]:
    """A notebook of ``cells`` served by ``lab`` (the session's server), open in headless
    Chromium with its first cell run and the widget drawn: the page (``page.lab`` is the server,
    ``page.notebook`` the notebook's name, ``page.notebook_path`` its file). ``before_open`` is
    called on the page before anything loads (dialog handlers). The notebook's kernel is shut
    down at the end: the server outlives the fixture."""
    lab.add_notebook(cells, notebook)
    try:
        browser = launch_browser(playwright)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": height})
            page.lab, page.notebook, page.notebook_path = lab, notebook, lab.notebook_path(notebook)
            if before_open is not None:
                before_open(page)
            page.goto(lab.notebook_url(notebook))
            run_first_cell(page, LAB_KERNEL_IDLE)
            yield page
        finally:
            browser.close()
    finally:
        lab.close_notebook(notebook)


def run_first_cell(page, kernel_idle: tuple[str, ...], timeout_ms: int = 120_000) -> None:
    """In an open notebook (JupyterLab or Notebook 7: the same cell components), wait for the
    kernel (each selector of ``kernel_idle`` in turn), run the first cell and wait until the
    widget has drawn itself."""
    page.wait_for_selector(".jp-Notebook .jp-Cell .cm-content", timeout=timeout_ms)
    for selector in kernel_idle:
        page.wait_for_selector(selector, timeout=timeout_ms)
    first_cell = ".jp-Notebook .jp-Cell >> nth=0"
    for _ in range(3):  # a Shift+Enter that races the kernel connection can get lost: retry
        page.click(f"{first_cell} >> .cm-content")
        page.keyboard.press("Shift+Enter")
        try:
            page.wait_for_function(
                """() => { const p = document.querySelector('.jp-Notebook .jp-Cell .jp-InputPrompt');
                           return p && /\\[(\\*|\\d+)\\]/.test(p.textContent); }""", timeout=10_000)
            break
        except Exception:
            continue
    page.wait_for_selector(".pw-root[data-status]", timeout=timeout_ms)
    page.wait_for_function(
        "() => document.querySelectorAll('.pw-token-row .pw-tok').length > 0", timeout=timeout_ms)


def wait_for_run(page, previous_run_id: int, timeout_ms: int = 60_000) -> int:
    """Wait until the sweep that the last Run click started (its id comes back with the
    kernel's acknowledgement, ``data-requested-run``) is on screen and done; return its id.

    Everything read here comes from one heatmap payload (its run id and its own state), so a
    picture of another job, or a status that arrived in another message, cannot satisfy it."""
    page.wait_for_function(
        """(before) => {
            const r = document.querySelector('.pw-root');
            return r && r.dataset.requestedRun !== undefined && r.dataset.runId === r.dataset.requestedRun
                   && r.dataset.runState === 'done' && r.dataset.complete === 'true'
                   && Number(r.dataset.runId) > before;
        }""", arg=previous_run_id, timeout=timeout_ms)
    return run_id(page)


def run_id(page) -> int:
    value = page.get_attribute(".pw-root", "data-run-id")
    return int(value) if value else -1


def cell_values(page) -> list[dict]:
    return page.eval_on_selector_all("rect.pw-cell", """els => els.map(e => ({
        layer: e.dataset.layer === undefined ? null : Number(e.dataset.layer),
        pos: e.dataset.pos === undefined ? null : Number(e.dataset.pos),
        head: e.dataset.head === undefined ? null : Number(e.dataset.head),
        value: e.dataset.value === undefined ? null : Number(e.dataset.value)}))""")


def run_cell(page, index: int, timeout_ms: int = 30_000) -> None:
    """Run notebook cell ``index`` (click into its editor, Shift+Enter) and wait until done."""
    cell = f".jp-Notebook .jp-Cell >> nth={index}"
    before = page.inner_text(f"{cell} >> .jp-InputPrompt")
    page.click(f"{cell} >> .cm-content")
    page.keyboard.press("Shift+Enter")
    page.wait_for_function(
        """([i, before]) => { const p = document.querySelectorAll('.jp-Notebook .jp-Cell')[i].querySelector('.jp-InputPrompt');
                              return p && p.textContent !== before && /\\[\\d+\\]/.test(p.textContent); }""",
        arg=[index, before], timeout=timeout_ms)


def root_data(page, key: str) -> str | None:
    return page.get_attribute(".pw-root", f"data-{key}")


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator(".pw-root").screenshot(path=str(ARTIFACTS / name))


# --------------------------------------------------------------------------- the test
CLEAN = "When Lisa and Sarah went to the cinema, Lisa gave the ticket to"
CORRUPTED = "When Lisa and Sarah went to the cinema, Sarah gave the ticket to"


@pytest.fixture(scope="module")
def playwright_session():
    """One Playwright driver for the module (the sync API allows one at a time)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def page(playwright_session, lab_server):
    dialogs: list[str] = []

    def record_dialogs(pg) -> None:
        pg.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        pg.dialogs = dialogs

    with widget_page(playwright_session, lab_server, [WIDGET_CELL, SLOW_CELL, FAST_CELL], height=1600,
                     before_open=record_dialogs) as pg:
        yield pg


def test_run_fills_heatmap_with_ioi_pattern(page):
    page.fill("input[data-field='clean']", CLEAN)
    page.fill("input[data-field='corrupted']", CORRUPTED)
    before = run_id(page)
    page.click("button[data-action='run']")
    wait_for_run(page, before)
    # The answers were pre-filled with the model's predictions on the new prompts.
    assert page.input_value("input[data-field='correct']") == " Sarah"
    assert page.input_value("input[data-field='incorrect']") == " Lisa"

    n_tokens = page.locator(".pw-token-row[data-prompt='clean'] .pw-tok").count()
    diff = [int(p) for p in page.eval_on_selector_all(
        ".pw-token-row[data-prompt='clean'] .pw-tok-diff", "els => els.map(e => e.dataset.pos)")]
    assert n_tokens == 15 and diff == [10]
    cells = cell_values(page)
    n_layers = int(page.get_attribute("svg.pw-heatmap", "data-rows"))
    assert len(cells) == n_layers * n_tokens == 4 * 15
    assert all(c["value"] is not None for c in cells)
    assert page.get_attribute(".pw-root", "data-metric") == "normalized"

    def strongest(layer: int) -> int:
        row = [c for c in cells if c["layer"] == layer]
        return max(row, key=lambda c: abs(c["value"]))["pos"]

    s2, end = diff[0], n_tokens - 1
    assert strongest(0) == s2, "early layers: the information sits at the changed name (S2)"
    assert strongest(n_layers - 1) == end, "late layers: it has moved to the final position"
    shot(page, "01-heatmap-denoising.png")

    # Hover shows the exact value; clicking a residual cell explains it in words.
    page.hover(f"rect.pw-cell[data-layer='0'][data-pos='{s2}']")
    tip = page.inner_text(".pw-tooltip")
    assert "normalized" in tip and "layer 0" in tip and "' Lisa'" in tip
    page.click(f"rect.pw-cell[data-layer='0'][data-pos='{s2}']")
    page.wait_for_function("() => document.querySelector('.pw-explanation').textContent.includes('restores')")
    assert "of the clean logit difference" in page.inner_text(".pw-explanation")
    shot(page, "02-tooltip-and-explanation.png")


def test_fast_preview_approximate_then_exact(page):
    """The heatmap is first painted from attribution patching, hatched and labelled
    approximate; each cell loses the mark when its exact value streams in."""
    assert page.is_checked("input[data-control='fast_preview']"), "on by default"
    run_cell(page, 1)  # w.step_delay = 0.6: time to look at each stage
    try:
        before = run_id(page)
        page.click("button[data-action='run']")
        page.wait_for_function(
            """(before) => { const r = document.querySelector('.pw-root');
                return Number(r.dataset.runId) > before && r.dataset.approx === '60'; }""", arg=before)
        # One snapshot of the page (a chunk may land between two separate reads).
        snap = page.evaluate("""() => { const r = document.querySelector('.pw-root');
            const note = document.querySelector('.pw-approx-note');
            return {approx: r.dataset.approx, hatch: document.querySelector('path.pw-hatch').getAttribute('d'),
                    note: note.classList.contains('pw-hidden') ? null : note.textContent,
                    cells: [...document.querySelectorAll('rect.pw-cell')].map(e => ({
                        approx: e.dataset.approx === 'true', estimate: e.dataset.estimate, value: e.dataset.value,
                        hatched: e.classList.contains('pw-approx'), fill: e.getAttribute('fill')}))}; }""")
        cells = snap["cells"]
        n_approx = int(snap["approx"])
        assert sum(c["approx"] and c["hatched"] for c in cells) == n_approx and n_approx > 0
        assert all(c["estimate"] is not None and c["fill"] for c in cells)
        assert all(c["value"] is None for c in cells if c["approx"])
        assert snap["note"] and "approximate (attribution patching)" in snap["note"]
        assert snap["hatch"].count("M") == n_approx
        page.hover("rect.pw-cell[data-layer='3'][data-pos='14']")
        assert "approximate: attribution patching" in page.inner_text(".pw-tooltip")
        shot(page, "07-fast-preview-approximate.png")

        # Part exact, part approximate: the exact sweep is on its way.
        page.wait_for_function("""() => { const r = document.querySelector('.pw-root');
            return Number(r.dataset.filled) > 0 && Number(r.dataset.approx) > 0; }""")
        mixed = page.eval_on_selector_all("rect.pw-cell", """els => els.map(e => ({
            approx: e.classList.contains('pw-approx'), exact: e.dataset.value !== undefined}))""")
        assert all(c["approx"] != c["exact"] for c in mixed), "a cell is either exact or approximate"
        shot(page, "08-fast-preview-turning-exact.png")

        wait_for_run(page, before)
        assert root_data(page, "approx") == "0" and page.locator("rect.pw-cell.pw-approx").count() == 0
        assert page.get_attribute("path.pw-hatch", "d") == ""
        assert not page.is_visible(".pw-approx-note")
        assert all(c["value"] is not None for c in cell_values(page))
        page.hover("rect.pw-cell[data-layer='3'][data-pos='14']")
        assert "attribution estimate was" in page.inner_text(".pw-tooltip")
    finally:
        run_cell(page, 2)  # w.step_delay = 0.0


def test_noising_and_metric_switch(page):
    before = run_id(page)
    page.click("button[data-direction='noising']")
    assert "necessary" in page.inner_text(".pw-reminder")
    page.click("button[data-action='run']")
    rid = wait_for_run(page, before)
    assert page.get_attribute(".pw-root", "data-direction") == "noising"
    normalized = [c["value"] for c in cell_values(page)]
    page.select_option("select[data-control='metric']", "logit_diff")
    page.wait_for_selector(".pw-root[data-metric='logit_diff']")
    assert run_id(page) == rid, "switching the metric redraws without rerunning"
    logit_diff = [c["value"] for c in cell_values(page)]
    assert len(logit_diff) == len(normalized) and logit_diff != normalized
    # Coloured by the change from the unpatched clean run: cells before the changed name are
    # no-ops (same activations in both prompts), so they show no colour at all.
    assert root_data(page, "centre-run") == "clean"
    untouched = page.eval_on_selector_all("rect.pw-cell", "els => els.filter(e => Number(e.dataset.pos) < 10)"
                                          ".map(e => e.getAttribute('fill-opacity'))")
    assert untouched and set(untouched) == {"0"}, untouched
    shot(page, "03-noising-logit-diff.png")


def test_click_head_cell_shows_attention_pattern(page):
    page.click("button[data-direction='denoising']")
    page.select_option("select[data-control='metric']", "normalized")
    page.select_option("select[data-control='site']", "head_out")
    before = run_id(page)
    page.click("button[data-action='run']")
    wait_for_run(page, before)
    cells = cell_values(page)
    assert len(cells) == 4 * 8 and all(c["head"] is not None for c in cells)
    top = max(cells, key=lambda c: abs(c["value"]))
    page.click(f"rect.pw-cell[data-layer='{top['layer']}'][data-head='{top['head']}']")
    page.wait_for_function(
        "(name) => document.querySelector('.pw-explanation').textContent.includes(name)",
        arg=f"head {top['layer']}.{top['head']}")
    page.wait_for_selector(f".pw-patterns[data-layer='{top['layer']}'][data-head='{top['head']}'] "
                           "svg.pw-pattern[data-prompt='clean']")
    weights = page.eval_on_selector_all(
        "svg.pw-pattern[data-prompt='clean'] rect.pw-pcell", "els => els.map(e => Number(e.dataset.weight))")
    assert len(weights) == 15 * 15
    last_row = weights[-15:]
    assert abs(sum(last_row) - 1) < 0.01, "each query's attention sums to 1"
    shot(page, "04-head-attention-pattern.png")


def use_ioi_prompts(page) -> None:
    """Put this module's prompts in the page, denoising and ``normalized``, and wait until the
    answers follow the model's predictions on them (" Sarah", " Lisa").

    A test that compares the page with a computation of its own sets its inputs here: run
    alone (``pytest ...::test_path_patching_view``), the page still holds the widget's default
    prompts, and its heatmap, rightly the job it names, is a sweep of other prompts."""
    for field, text in (("clean", CLEAN), ("corrupted", CORRUPTED)):
        if page.input_value(f"input[data-field='{field}']") != text:
            page.fill(f"input[data-field='{field}']", text)
    page.click("button[data-direction='denoising']")
    page.select_option("select[data-control='metric']", "normalized")
    page.wait_for_function(
        """() => document.querySelector("input[data-field='correct']").value === ' Sarah'
                 && document.querySelector("input[data-field='incorrect']").value === ' Lisa'""")


def path_reference(receivers, receiver_input: str = "q"):
    """``path_patch`` on the prompts of this test, computed here, for comparing with the page."""
    import patchwidgets

    model = patchwidgets.load_model("toy-ioi")
    result = patchwidgets.path_patch(model, CLEAN, CORRUPTED, answers=(" Sarah", " Lisa"), receivers=receivers,
                                     receiver_input=receiver_input, direction="denoising", metrics=["normalized"])
    return result.grid("normalized")


def assert_heatmap_is(page, grid) -> None:
    cells = cell_values(page)
    assert len(cells) == grid.numel() == 4 * 8
    for c in cells:
        assert c["value"] == pytest.approx(float(grid[c["layer"], c["head"]]), abs=1e-6), c


@pytest.fixture
def cpu_load():
    """Keep two cores busy for the length of a test: a test that needs an idle machine fails."""
    burn = "import time\nend = time.time() + 300\nwhile time.time() < end: pass"
    procs = [subprocess.Popen([sys.executable, "-c", burn]) for _ in range(2)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_path_patching_view(page, cpu_load):
    """Senders to the logits, then Shift+click a head to make it the receiver; a receiver
    that does not exist is reported in place. Each heatmap is checked against path_patch on
    the inputs this test typed (see use_ioi_prompts), under CPU load."""
    use_ioi_prompts(page)
    assert page.locator("[data-panel='path']").is_hidden()
    page.select_option("select[data-control='site']", "path")
    assert page.locator("[data-panel='path']").is_visible()
    assert page.is_disabled("input[data-control='fast_preview']"), "no AtP estimate for paths"
    assert page.is_disabled("select[data-control='receiver_input']"), "the logits have no q/k/v"

    before = run_id(page)
    page.click("button[data-action='run']")
    before = wait_for_run(page, before)
    assert page.get_attribute("svg.pw-heatmap", "data-rows") == "4"
    assert page.get_attribute("svg.pw-heatmap", "data-cols") == "8"
    assert "path: senders -> logits" in page.inner_text(".pw-caption")
    assert root_data(page, "approx") == "0"
    assert page.is_hidden(".pw-stale"), "the heatmap is of the inputs on the page"
    assert_heatmap_is(page, path_reference(None))
    shot(page, "09-path-to-logits.png")

    # The strongest direct effect on the logits after layer 0 becomes the receiver (Shift+click),
    # and the path into its inputs shows which earlier heads feed it.
    later = [c for c in cell_values(page) if c["layer"] > 0]
    top = max(later, key=lambda c: abs(c["value"]))
    receiver = f"{top['layer']}.{top['head']}"
    page.click(f"rect.pw-cell[data-layer='{top['layer']}'][data-head='{top['head']}']", modifiers=["Shift"])
    page.wait_for_function("(r) => document.querySelector('.pw-root').dataset.receivers === r", arg=receiver)
    assert page.input_value("input[data-field='receivers']") == receiver
    assert page.get_attribute("path.pw-receiver-marks", "d").count("M") == 1
    assert page.is_visible(".pw-stale"), "the heatmap no longer matches the receivers"
    assert page.is_enabled("select[data-control='receiver_input']")
    page.select_option("select[data-control='receiver_input']", "qkv")
    page.click("button[data-action='run']")
    before = wait_for_run(page, before)
    assert f"L{top['layer']}H{top['head']} (qkv)" in page.inner_text(".pw-caption")
    expected = path_reference([(top["layer"], top["head"])], "qkv")
    assert_heatmap_is(page, expected)
    sender = max(cell_values(page), key=lambda c: abs(c["value"]))
    assert sender["layer"] < top["layer"] and abs(sender["value"]) > 0.1, "an earlier head feeds the receiver"
    page.click(f"rect.pw-cell[data-layer='{sender['layer']}'][data-head='{sender['head']}']")
    page.wait_for_function(
        "(r) => document.querySelector('.pw-explanation').textContent.includes('into the queries, keys and values of head ' + r)",
        arg=receiver)
    shot(page, "10-path-to-receiver.png")

    # A receiver the model does not have: the error shows at the field, the heatmap stays.
    cells_before = cell_values(page)
    page.fill("input[data-field='receivers']", f"{receiver}, 9.9")
    page.wait_for_function("() => document.querySelector(\"[data-error-for='receivers']\").textContent.includes('no head 9.9')")
    page.click("button[data-action='run']")
    page.wait_for_selector(".pw-root[data-status='error']")
    assert cell_values(page) == cells_before
    assert "pw-invalid" in page.get_attribute("input[data-field='receivers']", "class")
    shot(page, "11-path-receiver-error.png")
    page.fill("input[data-field='receivers']", receiver)
    page.wait_for_function("() => document.querySelector(\"[data-error-for='receivers']\").textContent === ''")


def test_bad_inputs_show_errors_in_place(page):
    cells_before = cell_values(page)
    error = "[data-error-for='{}']"
    page.fill("input[data-field='corrupted']", CORRUPTED.replace(" the ticket", " ticket"))
    page.wait_for_function(f"() => document.querySelector(\"{error.format('corrupted')}\").textContent.includes('different token lengths')")
    page.click("button[data-action='run']")
    page.wait_for_selector(".pw-root[data-status='error']")
    assert cell_values(page) == cells_before, "the last good heatmap stays"
    shot(page, "05-error-token-lengths.png")

    page.fill("input[data-field='corrupted']", CORRUPTED)
    page.fill("input[data-field='correct']", " Sarah Lisa")
    page.wait_for_function(f"() => document.querySelector(\"{error.format('correct')}\").textContent.includes('2 tokens')")
    page.fill("input[data-field='correct']", " Sarah")
    page.fill("input[data-field='clean']", "When Lisa and Sarahh went")
    page.wait_for_function(f"() => document.querySelector(\"{error.format('clean')}\").textContent.includes('not in the')")
    page.fill("input[data-field='clean']", "   ")
    page.wait_for_function(f"() => document.querySelector(\"{error.format('clean')}\").textContent.includes('empty')")
    assert page.locator("[data-error-for='corrupted']").inner_text() == ""

    # Markup typed into the inputs is shown as text, never parsed.
    markup = "<img src=x onerror=alert(1)>"
    page.fill("input[data-field='clean']", markup)
    page.fill("input[data-field='correct']", markup)
    page.wait_for_function(f"() => document.querySelector(\"{error.format('correct')}\").textContent.includes('not in the')")
    assert markup in page.inner_text(".pw-baseline")  # the answer, echoed as text
    assert page.locator(".pw-root img").count() == 0
    assert page.dialogs == []
    shot(page, "06-error-escaped-markup.png")


def test_saved_notebook_stores_last_heatmap(page):
    """With widget state saving on, Ctrl+S stores the traitlets, heatmap bytes included."""
    import base64
    import struct

    shown = [c["value"] for c in cell_values(page)]
    page.click("input[data-field='incorrect']")  # Ctrl+S works with the focus in the widget
    page.keyboard.press("Control+s")
    path = page.notebook_path
    deadline = time.monotonic() + 20
    state = None
    while state is None and time.monotonic() < deadline:
        time.sleep(0.25)
        widgets = json.loads(path.read_text()).get("metadata", {}).get("widgets")
        if widgets:
            models = widgets["application/vnd.jupyter.widget-state+json"]["state"].values()
            state = next(m for m in models if "heatmap" in m["state"])
    assert state is not None, "the notebook was not saved with its widget state"
    buffer = next(b for b in state["buffers"] if b["path"] == ["heatmap", "values"])
    raw = base64.b64decode(buffer["data"])
    saved = list(struct.unpack(f"<{len(raw) // 4}f", raw))
    assert saved == pytest.approx(shown, abs=0, nan_ok=True)
    assert state["state"]["heatmap"]["site"] == "path"  # the last good heatmap: the path view


# --------------------------------------------------------------------------- defects of issue 12
def error_text(page, field: str) -> str:
    return page.inner_text(f"[data-error-for='{field}']")


def wait_error(page, field: str, words: str) -> None:
    page.wait_for_function("([f, w]) => document.querySelector(`[data-error-for='${f}']`).textContent.includes(w)",
                           arg=[field, words])


def wait_no_error(page, field: str) -> None:
    page.wait_for_function("(f) => document.querySelector(`[data-error-for='${f}']`).textContent === ''", arg=field)


def test_run_click_lands_while_errors_come_and_go(page):
    """Errors appear and vanish as the page re-checks what was typed; the Run button stays
    where it is, so a click pressed while an error shows and released after it is gone runs."""
    page.select_option("select[data-control='site']", "resid_pre")
    page.fill("input[data-field='clean']", CLEAN)
    page.fill("input[data-field='corrupted']", CORRUPTED)
    page.fill("input[data-field='correct']", " Sarah")
    page.fill("input[data-field='incorrect']", " Lisa")
    run = page.locator("button[data-action='run']")
    page.wait_for_function("() => document.querySelector('.pw-root').dataset.errors === ''")
    home = run.bounding_box()
    long_prompt = "When" + " Lisa and Sarah went to the cinema," * 30 + " Sarah gave the ticket to"
    for field, text, words in [("corrupted", CORRUPTED.replace(" the ticket", " ticket"), "tokens"),
                               ("clean", long_prompt, "tokens"), ("correct", " Sarahh", "not in the"),
                               ("incorrect", " Sarah", "same token")]:
        good = page.input_value(f"input[data-field='{field}']")
        page.fill(f"input[data-field='{field}']", text)
        wait_error(page, field, words)
        assert run.bounding_box() == home, f"Run moved when the {field} error appeared"
        if field == "clean":
            assert len(error_text(page, "clean")) < 300, "a short message, not every token"
        page.fill(f"input[data-field='{field}']", good)
        wait_no_error(page, field)
        assert run.bounding_box() == home, f"Run moved when the {field} error went"

    # Press Run while an error shows; the fix lands (the error vanishes) before the release.
    page.fill("input[data-field='corrupted']", CORRUPTED.replace(" the ticket", " ticket"))
    wait_error(page, "corrupted", "tokens")
    before = run_id(page)
    page.mouse.move(home["x"] + home["width"] / 2, home["y"] + home["height"] / 2)
    page.mouse.down()
    page.fill("input[data-field='corrupted']", CORRUPTED)
    wait_no_error(page, "corrupted")
    page.mouse.up()
    wait_for_run(page, before)


def test_prompts_that_do_not_tokenise_are_not_called_missing(page):
    page.fill("input[data-field='clean']", "Lisaa and Saraah")
    page.fill("input[data-field='corrupted']", "Saraah and Lisaa")
    wait_error(page, "clean", "not in the")
    wait_error(page, "corrupted", "not in the")
    assert "Type two prompts" not in page.inner_text(".pw-tokens")
    assert "not tokenised" in page.inner_text(".pw-token-row[data-prompt='clean']")
    page.fill("input[data-field='clean']", "")
    page.fill("input[data-field='corrupted']", " ")
    page.wait_for_function("() => document.querySelector('.pw-tokens').textContent.includes('Type two prompts.')")
    page.fill("input[data-field='clean']", CLEAN)
    page.fill("input[data-field='corrupted']", CORRUPTED)
    page.wait_for_function("() => document.querySelector('.pw-root').dataset.errors === ''")


def test_identical_answers_error_before_run(page):
    cells_before = cell_values(page)
    page.fill("input[data-field='incorrect']", " Sarah")  # the correct answer too
    wait_error(page, "incorrect", "same token")
    assert error_text(page, "corrupted") == "" and "pw-invalid" in page.get_attribute(
        "input[data-field='incorrect']", "class")
    page.click("button[data-action='run']")
    page.wait_for_selector(".pw-root[data-status='error']")
    assert cell_values(page) == cells_before, "no all-zero heatmap"
    page.fill("input[data-field='incorrect']", " Lisa")
    wait_no_error(page, "incorrect")


def test_cancel_right_after_run_says_what_it_holds(page):
    run_cell(page, 1)  # slow motion, several chunks
    try:
        before = run_id(page)
        page.click("button[data-action='run']")
        # Cancel as soon as the new sweep's first picture (the estimate) is on screen.
        page.wait_for_function("(b) => Number(document.querySelector('.pw-root').dataset.runId) > b", arg=before)
        page.click("button[data-action='cancel']")
        page.wait_for_function("""() => { const r = document.querySelector('.pw-root');
            return r.dataset.status === 'cancelled' && r.dataset.runState === 'cancelled'; }""")
        text = page.inner_text(".pw-progress-text")
        exact = page.locator("rect.pw-cell[data-value]").count()
        assert "0/0" not in text and f"cancelled after {exact}/60 patches" in text, text
        assert root_data(page, "complete") == "false"
        if page.is_visible(".pw-approx-note"):
            note = page.inner_text(".pw-approx-note")
            assert "stopped before reaching" in note and "replaced by the exact value" not in note
    finally:
        run_cell(page, 2)


# --------------------------------------------------------------------------- pictures (§2)
def gpt2_shaped_cell(n_embd: int = 96, **widget_args: str) -> str:
    """A notebook cell that displays a widget on a random model shaped like GPT-2 small where
    the view is concerned: 12 layers x 12 heads (``n_embd`` sets its cost), with GPT-2's own
    tokenizer and vocabulary (``patchwidgets.gpt2_tokenizer``), so the IOI prompt is GPT-2's 15
    tokens. Also used by bench_widget_latency.py."""
    args = "".join(f", {k}={v!r}" for k, v in widget_args.items())
    return f"""\
import os, tempfile
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformer_lens.model_bridge import TransformerBridge
import patchwidgets
from patchwidgets.gpt2_tokenizer import gpt2_tokenizer
torch.manual_seed(0)
hf = GPT2LMHeadModel(GPT2Config(n_layer=12, n_head=12, n_embd={n_embd}, vocab_size=50257, n_positions=1024)).eval()
with tempfile.TemporaryDirectory() as tmp:  # (the bridge reloads its tokenizer from disk while booting)
    model = TransformerBridge.boot_transformers("gpt2", hf_model=hf, tokenizer=gpt2_tokenizer(directory=tmp))
model.eval()
w = patchwidgets.PatchingWidget(model, metric="logit_diff", correct=" Mary", incorrect=" John"{args})
w"""


GPT2_CELL = gpt2_shaped_cell(site="head_out_by_pos")


@pytest.fixture(scope="module")
def gpt2_page(playwright_session, lab_server):
    with widget_page(playwright_session, lab_server, [GPT2_CELL], notebook="widget_gpt2.ipynb") as pg:
        yield pg


def test_gpt2_size_heads_by_position_readable(gpt2_page):
    """12 layers x 12 heads x 15 positions: one position at a time as a layer x head grid,
    every layer and head labelled, cells big enough to see; every position still reachable."""
    page = gpt2_page
    before = run_id(page)
    page.click("button[data-action='run']")
    wait_for_run(page, before, timeout_ms=300_000)
    svg = "svg.pw-heatmap"
    assert page.get_attribute(svg, "data-view") == "position"
    assert (page.get_attribute(svg, "data-rows"), page.get_attribute(svg, "data-cols")) == ("12", "12")
    assert root_data(page, "position") == "14", "the answer position first"
    assert page.locator("rect.pw-cell").count() == 144
    box = page.locator("rect.pw-cell >> nth=0").bounding_box()
    assert box["width"] >= 14 and box["height"] >= 12, box
    rows = page.eval_on_selector_all(f"{svg} .pw-row-label", "els => els.map(e => e.textContent)")
    cols = page.eval_on_selector_all(f"{svg} .pw-col-label", "els => els.map(e => e.textContent)")
    assert rows == [f"L{l}" for l in range(12)] and cols == [f"H{h}" for h in range(12)]
    at_end = {(c["layer"], c["head"]): c["value"] for c in cell_values(page)}
    assert all(c["pos"] == 14 for c in cell_values(page))
    page.click("rect.pw-cell[data-layer='7'][data-head='3']")
    page.wait_for_function("() => document.querySelector('.pw-explanation').textContent.includes('head 7.3')")
    assert "position 14" in page.inner_text(".pw-explanation")
    assert page.is_visible("rect.pw-outline:not(.pw-hidden)")
    # Random weights: no head moves the answer much. Coloured by the change from the corrupted
    # run (not centred on 0), most cells are pale, not a field of deep red.
    assert root_data(page, "centre-run") == "corrupted"
    opacity = sorted(float(a) for a in page.eval_on_selector_all(
        "rect.pw-cell", "els => els.map(e => e.getAttribute('fill-opacity'))"))
    assert opacity[len(opacity) // 2] < 0.5, opacity
    shot(page, "13-gpt2-size-one-position.png")

    page.select_option("select[data-control='position']", "10")
    page.wait_for_function("() => document.querySelector('.pw-root').dataset.position === '10'")
    assert all(c["pos"] == 10 for c in cell_values(page)) and page.locator("rect.pw-cell").count() == 144
    page.select_option("select[data-control='position']", "all")
    page.wait_for_function("() => document.querySelector('svg.pw-heatmap').dataset.view === 'all'")
    everything = cell_values(page)
    assert len(everything) == 144 * 15
    assert {(c["layer"], c["head"]): c["value"] for c in everything if c["pos"] == 14} == at_end


def test_heatmap_is_the_main_picture_and_legend_says_which_end(page):
    """The heatmap outweighs the attention grids; the legend has five labelled ticks, a
    sequential scale for a one-sign metric (rank), and says what high means."""
    page.select_option("select[data-control='site']", "resid_pre")
    page.select_option("select[data-control='metric']", "normalized")
    before = run_id(page)
    page.click("button[data-action='run']")
    wait_for_run(page, before)
    heat = page.locator("svg.pw-heatmap").bounding_box()
    for grid in page.locator("svg.pw-pattern").all():
        box = grid.bounding_box()
        assert heat["width"] * heat["height"] > 1.5 * box["width"] * box["height"], (heat, box)
    assert page.locator("svg.pw-heatmap text[data-tick]").count() == 5
    assert root_data(page, "scale") == "diverging"
    page.select_option("select[data-control='metric']", "rank")
    page.wait_for_selector(".pw-root[data-metric='rank']")
    assert root_data(page, "scale") == "sequential"
    ticks = [float(t) for t in root_data(page, "legend").split()]
    assert len(ticks) == 5 and ticks[0] == 1 and ticks == sorted(ticks), "ranks from 1, no negative half"
    assert "worse" in page.inner_text(".pw-legend-note")
    shot(page, "14-rank-sequential-legend.png")
    page.select_option("select[data-control='metric']", "normalized")


def test_keyboard_navigation(page):
    """One tab stop; arrows move; Enter explains; Shift+Enter toggles a receiver in the path
    view; every cell's accessible name carries its place and value."""
    page.select_option("select[data-control='site']", "head_out")
    before = run_id(page)
    page.click("button[data-action='run']")
    wait_for_run(page, before)
    assert page.locator("rect.pw-cell[tabindex='0']").count() == 1
    page.focus("rect.pw-cell[tabindex='0']")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowDown")
    active = page.evaluate("""() => { const a = document.activeElement;
        return {row: a.dataset.row, col: a.dataset.col, label: a.getAttribute('aria-label'), value: a.dataset.value,
                tab: a.getAttribute('tabindex'), cell: a.classList.contains('pw-cell')}; }""")
    assert active["cell"] and (active["row"], active["col"], active["tab"]) == ("1", "1", "0")
    assert active["label"].startswith("layer 1, head 1: normalized ")
    assert page.locator("rect.pw-cell[tabindex='0']").count() == 1
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelector('.pw-explanation').textContent.includes('head 1.1')")
    page.keyboard.press("Tab")
    assert not page.evaluate("() => document.activeElement.classList.contains('pw-cell')"), "one tab stop"
    page.keyboard.press("Shift+Tab")
    assert page.evaluate("() => document.activeElement.dataset.row + '.' + document.activeElement.dataset.col") == "1.1"

    page.select_option("select[data-control='site']", "path")
    page.fill("input[data-field='receivers']", "")  # the logits
    before = run_id(page)
    page.click("button[data-action='run']")
    wait_for_run(page, before)
    page.focus("rect.pw-cell[tabindex='0']")
    page.keyboard.press("Home")
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowDown")  # layer 2 or 3, head 0
    name = page.evaluate("() => document.activeElement.getAttribute('aria-label')")
    assert name.startswith("sender head ")
    head = name.split()[2].rstrip(":")
    page.keyboard.press("Shift+Enter")
    page.wait_for_function("(h) => document.querySelector(\"input[data-field='receivers']\").value === h", arg=head)
    page.keyboard.press("Shift+Enter")
    page.wait_for_function("() => document.querySelector(\"input[data-field='receivers']\").value === ''")


def test_dataset_in_the_page(page):
    """Add two prompt pairs to the list, Run: the heatmap is their mean, the explanation adds
    its standard error, and one pair can be shown alone."""
    import patchwidgets

    page.select_option("select[data-control='site']", "resid_pre")
    page.select_option("select[data-control='metric']", "logit_diff")
    pairs = [(CLEAN, CORRUPTED, " Sarah", " Lisa"), (CORRUPTED, CLEAN, " Lisa", " Sarah")]
    page.click("details[data-panel='dataset'] summary")
    for clean, corrupted, correct, incorrect in pairs:
        page.fill("input[data-field='clean']", clean)
        page.fill("input[data-field='corrupted']", corrupted)
        page.fill("input[data-field='correct']", correct)
        page.fill("input[data-field='incorrect']", incorrect)
        page.wait_for_function("() => document.querySelector('.pw-root').dataset.errors === ''")
        n = page.locator(".pw-dataset-row").count()
        page.click("button[data-action='add-pair']")
        page.wait_for_function("(n) => document.querySelectorAll('.pw-dataset-row').length === n", arg=n + 1)
    assert page.input_value("input[data-dataset-row='1'][data-dataset-col='2']") == " Lisa"
    before = run_id(page)
    page.click("button[data-action='run']")
    wait_for_run(page, before)
    assert page.is_visible("select[data-control='pair']")
    model = patchwidgets.load_model("toy-ioi")
    ref = patchwidgets.patch(model, [p[0] for p in pairs], [p[1] for p in pairs],
                             answers=[(p[2], p[3]) for p in pairs], metrics=["logit_diff"])
    mean, per = ref.grid("logit_diff"), ref.grid("logit_diff", per_pair=True)
    for c in cell_values(page):
        assert c["value"] == pytest.approx(float(mean[c["layer"], c["pos"]]), abs=1e-4)
    page.click("rect.pw-cell[data-layer='0'][data-pos='10']")
    page.wait_for_function("() => document.querySelector('.pw-explanation').textContent.includes('standard error')")
    assert "mean over 2 prompt pairs" in page.inner_text(".pw-explanation")
    page.select_option("select[data-control='pair']", "1")
    page.wait_for_function("() => document.querySelector('.pw-root').dataset.pair === '1'")
    for c in cell_values(page):
        assert c["value"] == pytest.approx(float(per[c["layer"], c["pos"], 1]), abs=1e-4)
    shot(page, "16-dataset-one-pair.png")
    page.select_option("select[data-control='pair']", "-1")
    page.click("button[data-action='remove-pair'] >> nth=0")
    page.click("button[data-action='remove-pair'] >> nth=0")
    page.wait_for_function("() => document.querySelectorAll('.pw-dataset-row').length === 0")
    page.select_option("select[data-control='metric']", "normalized")


def test_reopened_notebook_without_python_widget_says_so(page):
    """Last: a restarted kernel has no widget behind the saved view. The saved heatmap shows;
    Run and cell clicks say that no Python widget answers, and nothing spins forever."""
    before = run_id(page)
    page.click("button[data-action='run']")
    wait_for_run(page, before)
    saved = [c["value"] for c in cell_values(page)]
    page.click("input[data-field='incorrect']")
    page.keyboard.press("Control+s")
    page.wait_for_function("() => !document.querySelector('.jp-mod-dirty')", timeout=20_000)
    # This notebook's kernel: the server is the session's, and other fixtures' notebooks may be open.
    restarted = page.evaluate("""async (notebook) => {
        const xsrf = (document.cookie.match(/_xsrf=([^;]+)/) || [])[1];
        const sessions = (await (await fetch('/api/sessions')).json()).filter(s => s.path === notebook);
        for (const s of sessions) {
            const r = await fetch(`/api/kernels/${s.kernel.id}/restart`,
                                  {method: 'POST', headers: xsrf ? {'X-XSRFToken': xsrf} : {}});
            if (!r.ok) throw new Error(`restart: ${r.status}`);
        }
        return sessions.length; }""", page.notebook)
    assert restarted == 1
    page.reload()
    page.wait_for_selector(".pw-root rect.pw-cell", timeout=120_000)
    assert [c["value"] for c in cell_values(page)] == pytest.approx(saved, nan_ok=True)
    page.click("button[data-action='run']")
    page.wait_for_selector(".pw-root[data-kernel='missing']", timeout=30_000)
    assert "saved copy" in page.inner_text(".pw-kernel-note")
    assert page.inner_text(".pw-status") == "no kernel"
    page.click("rect.pw-cell >> nth=3")
    assert "no Python widget" in page.inner_text(".pw-explanation")
    shot(page, "12-saved-copy-without-kernel.png")


# --------------------------------------------------------------------------- export (§3)
def test_exported_notebook_shows_last_heatmap_offline(tmp_path, playwright_session):
    """``jupyter nbconvert --to html --execute`` stores the widget state (so the export holds
    the widget-manager script, which needs a CDN); opened with no network, the page still
    shows the last heatmap: the static copy, with its legend."""
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(WIDGET_CELL),                    # displayed before any Run ...
        nbformat.v4.new_code_cell("w.run(wait=True);"),            # ... and filled in afterwards
    ])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "exported.ipynb"
    nbformat.write(nb, path)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(
        p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p))
    subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "html", "--execute", str(path)],
                   check=True, env=env, capture_output=True, timeout=300)
    html_path = tmp_path / "exported.html"
    text = html_path.read_text()
    assert "application/vnd.jupyter.widget-state+json" in text, "the export carries the widget state"

    blocked: list[str] = []
    browser = launch_browser(playwright_session)
    try:
        context = browser.new_context(offline=True)
        context.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:")
                      else (blocked.append(route.request.url), route.abort()))
        page = context.new_page()
        page.goto(html_path.as_uri())
        page.wait_for_selector(".pw-static-export table", state="visible", timeout=30_000)
        cells = page.locator(".pw-static-export td")
        assert cells.count() == 4 * 15, "the last heatmap, every cell"
        filled = page.eval_on_selector_all(".pw-static-export td", "els => els.filter(e => e.textContent.trim()).length")
        assert filled == 60, "a complete heatmap (the Run after the display reached the export)"
        legend = page.locator(".pw-static-export [data-legend]")
        assert legend.count() == 1 and legend.locator("span").count() == 5
        ARTIFACTS.mkdir(exist_ok=True)
        page.locator(".pw-static-export").screenshot(path=str(ARTIFACTS / "15-exported-offline.png"))
        assert any("http" in url for url in blocked) or "cdn" not in text, "(no network was used)"
    finally:
        browser.close()


# --------------------------------------------------------------------------- toy-ioi-deep
#: Wang et al.'s direct-effect view in the widget: held-out IOI prompts, each against its ABC
#: sentence (three different names, so nothing says which to copy), noising each head's path to
#: the logits. A head whose path carries a name (here the layer-3 heads that attend the IO or copy
#: a name by position, see the model card) drops the logit difference when it carries the ABC
#: sentence's name instead.
DEEP_PAIRS = 8
DEEP_CELL = f"""\
import os
os.environ["HF_HUB_OFFLINE"] = "1"
import patchwidgets
from patchwidgets.datasets import ioi_prompts
rows = [[p["clean"], p["abc"], p["correct"], p["incorrect"]] for p in ioi_prompts({DEEP_PAIRS}, split="test")]
w = patchwidgets.PatchingWidget("toy-ioi-deep", dataset=rows, site="path", direction="noising", metric="logit_diff")
w"""


@pytest.fixture(scope="module")
def deep_page(playwright_session, lab_server):
    with widget_page(playwright_session, lab_server, [DEEP_CELL], notebook="widget_deep.ipynb") as pg:
        yield pg


def test_toy_ioi_deep_io_heads_in_the_path_view(deep_page):
    """The bundled 6-layer model in the widget: 6 x 8 sender heads, the page's values those of
    ``path_patch`` computed here, head 3.5 (which attends from END to the IO in both name orders)
    the strongest, and head 3.6's attention pattern (clicked), the model's own, going from the
    last token to the indirect object (the model card measures these heads in both name orders,
    and says why they are still no name movers: they copy names too weakly). The screenshot is
    docs/widget-toy-ioi-deep.png."""
    import patchwidgets
    from patchwidgets.datasets import ioi_prompts

    page = deep_page
    before = run_id(page)
    page.click("button[data-action='run']")
    wait_for_run(page, before, timeout_ms=300_000)
    svg = "svg.pw-heatmap"
    assert (page.get_attribute(svg, "data-rows"), page.get_attribute(svg, "data-cols")) == ("6", "8")
    assert "path: senders -> logits" in page.inner_text(".pw-caption")

    items = ioi_prompts(DEEP_PAIRS, split="test")
    model = patchwidgets.load_model("toy-ioi-deep")
    ref = patchwidgets.path_patch(model, [p["clean"] for p in items], [p["abc"] for p in items],
                                  answers=[(p["correct"], p["incorrect"]) for p in items], receivers=None,
                                  direction="noising", metrics=["logit_diff"]).grid("logit_diff")
    cells = cell_values(page)
    assert len(cells) == 6 * 8
    for c in cells:
        assert c["value"] == pytest.approx(float(ref[c["layer"], c["head"]]), abs=1e-4), c
    # Lowest logit difference after the ABC patch = the largest drop.
    assert (lambda c: (c["layer"], c["head"]))(min(cells, key=lambda c: c["value"])) == (3, 5)

    # Head 3.6, clicked: on the first pair's clean prompt (ABBA) its last row (END) puts 0.94 on
    # the IO. (3.5 attends the IO on average, 0.79 in ABBA prompts, but on this one it picks S1.)
    page.click("rect.pw-cell[data-layer='3'][data-head='6']")
    page.wait_for_function("() => document.querySelector('.pw-explanation').textContent.includes('head 3.6')")
    page.wait_for_selector(".pw-patterns[data-layer='3'][data-head='6'] svg.pw-pattern[data-prompt='clean']")
    assert items[0]["order"] == "ABBA"
    clean = model.to_tokens(items[0]["clean"])  # [1, pos]
    _, cache = model.run_with_cache(clean)
    pattern = cache["blocks.3.attn.hook_pattern"][0, 6]  # [query, key]
    io = int((clean[0] == model.to_single_token(items[0]["correct"])).nonzero()[0])
    n = clean.shape[1]
    weights = page.eval_on_selector_all(
        "svg.pw-pattern[data-prompt='clean'] rect.pw-pcell", "els => els.map(e => Number(e.dataset.weight))")
    assert weights == pytest.approx(pattern.flatten().tolist(), abs=2e-4)  # (the page shows 4 decimals)
    end_row = weights[-n:]
    assert max(range(n), key=lambda k: end_row[k]) == io and end_row[io] > 0.9, end_row
    page.mouse.move(0, 0)  # no tooltip over the heatmap in the picture
    page.wait_for_timeout(300)
    shot(page, "24-toy-ioi-deep-name-movers.png")
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator(".pw-patterns").screenshot(path=str(ARTIFACTS / "24-toy-ioi-deep-pattern.png"))
