"""End-to-end tests of PatchingWidget in the other hosts anywidget serves: marimo, Voilà and
Jupyter Notebook 7.

``test_widget_browser.py`` drives the widget in JupyterLab 4. Here the same widget is served
the way a reader would open it, and driven in headless Chromium:

* **marimo**: ``marimo run examples/marimo_widget.py --headless`` (the widget wrapped in
  ``mo.ui.anywidget``; marimo draws it in a shadow root, which Playwright's CSS selectors
  pierce but ``document.querySelector`` does not: see :data:`FIND_ROOT`);
* **Voilà**: ``voila examples/voila_widget.ipynb --template=offline`` (Voilà 0.5 renders
  outputs with JupyterLab's widget manager and anywidget's lab extension; the ``offline``
  template, in ``examples/jupyter``, is Voilà's ``lab`` template without its two Font Awesome
  stylesheets from a CDN);
* **Notebook 7**: ``python -m notebook`` (what ``jupyter notebook`` runs) on a temporary root
  holding a one-cell notebook that displays the widget, written as the JupyterLab test writes
  its own (:func:`test_widget_browser.write_notebook_root`: same cell, same user settings;
  Notebook 7 is built from JupyterLab's plugins). The page is the notebook; the test runs its
  cell as a reader would (click in the editor, Shift+Enter).

Each host is started on 127.0.0.1 on a free port, waited for (bounded) and always stopped, with
its whole process group. In each: Run fills the heatmap, every cell painted and equal to
:func:`patchwidgets.patch` on the same prompts computed in this process; the head view's cells
too; clicking a head cell shows its attention pattern, equal to the model's own
``hook_pattern`` to the four decimals the page keeps. The browser is offline: every request
that does not go to the host's own server is aborted and recorded, and each test fails if
there was one.

Skipped, with the reason, when Chromium, playwright, marimo, Voilà or Notebook 7 is missing (a
failure instead under ``PATCHWIDGETS_REQUIRE_BROWSER=1``, as in CI).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import pytest

# The JupyterLab test's prompts, page helpers (their selectors pierce marimo's shadow root), its
# notebook writer and cell runner (Notebook 7 has the same cells) and its Playwright driver fixture.
from test_widget_browser import (  # noqa: F401  (playwright_session: a fixture, used by name)
    ARTIFACTS, CHROMIUM, CLEAN, CORRUPTED, REPO, WIDGET_CELL, _free_port, cell_values, launch_browser,
    playwright_session, log_tail, run_first_cell, run_id, stop_process_group, wait_for_server,
    write_notebook_root,
)

EXAMPLES = REPO / "examples"
MARIMO_APP = EXAMPLES / "marimo_widget.py"
VOILA_NOTEBOOK = EXAMPLES / "voila_widget.ipynb"
VOILA_TEMPLATES = EXAMPLES / "jupyter"  # holds voila/templates/offline
ANSWERS = (" Sarah", " Lisa")            # the model's predictions on CLEAN and CORRUPTED
NOTEBOOK = "widget.ipynb"                # Notebook 7's page: its first cell displays the widget
#: Notebook 7 has no status bar: its kernel is ready once the toolbar names the kernel (it says
#: "No Kernel" until the session starts) and the execution indicator reads idle.
NOTEBOOK_KERNEL_IDLE = ("[data-jp-item-name='kernelName']:has-text('Python 3')",
                        ".jp-Notebook-ExecutionIndicator[data-status='idle']")


def _import_error(module: str) -> str | None:
    # Found, not imported: the hosts run in their own processes, and importing marimo into a
    # test process that other tests have already shaped can fail on marimo's own dataclasses.
    if importlib.util.find_spec(module) is None:
        return f"needs {module} (pip install {module})"
    return None


def missing_requirement(host: str) -> str | None:
    """Why ``host`` cannot be tested here, or None."""
    if not Path(CHROMIUM).exists():
        return f"needs Chromium at {CHROMIUM} (apt-get install chromium)"
    return _import_error("playwright") or _import_error(host)


HOSTS = ("marimo", "voila", "notebook")
if os.environ.get("PATCHWIDGETS_REQUIRE_BROWSER") == "1":
    # CI installs everything and sets this: there a missing host is a failure, not a skip.
    for _host in HOSTS:
        if missing_requirement(_host) is not None:
            raise RuntimeError(f"{_host} browser test required but cannot run: {missing_requirement(_host)}")

pytestmark = pytest.mark.browser


# --------------------------------------------------------------------------- the servers
class HostServer:
    """A throw-away app server (marimo, Voilà, Notebook 7) on 127.0.0.1; use as a context manager.

    Started in a session of its own, so that stopping it stops its kernels too; ``ready`` is
    a path that answers 200 once the server listens; ``page`` the path a reader opens. ``{port}``
    and ``{tmp}`` in ``args`` become the port and the server's temporary directory (its working
    directory too), into which ``prepare(tmp)`` writes what the server serves."""

    def __init__(self, name: str, args: list[str], ready: str, env: dict[str, str] | None = None,
                 timeout: float = 60, page: str = "", prepare: Callable[[Path], None] | None = None):
        self.name, self.args, self.ready, self.extra_env, self.timeout = name, args, ready, env or {}, timeout
        self.page, self.prepare = page, prepare
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.tmp: tempfile.TemporaryDirectory | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def __enter__(self) -> "HostServer":
        self.tmp = tempfile.TemporaryDirectory(prefix=f"pw-{self.name}-")
        tmp = Path(self.tmp.name)
        if self.prepare is not None:
            self.prepare(tmp)
        self.port = _free_port()
        env = dict(os.environ, HF_HUB_OFFLINE="1", JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
                   PYTHONPATH=os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p),
                   **self.extra_env)
        cmd = [sys.executable, "-m", *[a.format(port=self.port, tmp=tmp) for a in self.args]]
        self.log_path = tmp / "server.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.proc is not None
        wait_for_server(self.proc, self.url + self.ready, self.timeout, self.name, self.server_log)

    def server_log(self) -> str:
        return log_tail(self.log_path)

    def __exit__(self, *exc) -> None:
        stop_process_group(self.proc)
        if getattr(self, "log", None):
            self.log.close()
        if self.tmp is not None:
            self.tmp.cleanup()


def marimo_server() -> HostServer:
    # `marimo run`: the app, code hidden, cells run once per browser session (in the server's
    # process). --no-token: no login page; --no-sandbox: this environment, no uv.
    return HostServer("marimo", ["marimo", "run", str(MARIMO_APP), "--headless", "--host", "127.0.0.1",
                                 "--port", "{port}", "--no-token", "--no-sandbox"], ready="health")


def voila_server() -> HostServer:
    # Voilà starts a kernel per page view and runs the notebook in it; JUPYTER_PATH makes the
    # `offline` template findable (Voilà looks for templates on the Jupyter data path).
    jupyter_path = os.pathsep.join(p for p in (str(VOILA_TEMPLATES), os.environ.get("JUPYTER_PATH")) if p)
    return HostServer("voila", ["voila", str(VOILA_NOTEBOOK), "--no-browser", "--Voila.ip=127.0.0.1",
                                "--port={port}", "--Voila.port_retries=0", "--template=offline",
                                "--show_tracebacks=True"],
                      ready="voila/static/voila.js", env={"JUPYTER_PATH": jupyter_path})


def notebook_server() -> HostServer:
    # Jupyter Notebook 7 on a root of its own: no token or password (the page would ask for
    # one), its own user settings (no news or update checks) and workspaces, and the read-only
    # extension manager (the default one asks PyPI from the server). Root may run it in a
    # container only when it says so. The settings go to both apps: the JupyterLab server
    # extension, loaded first, answers /lab/api/settings for the Notebook page too.
    root_ok = ["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    dirs = [f"--{app}.{trait}={{tmp}}/{folder}" for app in ("JupyterNotebookApp", "LabApp")
            for trait, folder in (("user_settings_dir", "settings"), ("workspaces_dir", "workspaces"))]
    return HostServer("notebook", ["notebook", "--no-browser", "--ip=127.0.0.1", "--port={port}", *root_ok,
                                   "--ServerApp.port_retries=0", "--IdentityProvider.token=",
                                   "--ServerApp.password=", "--LabApp.extension_manager=readonly",
                                   "--ServerApp.root_dir={tmp}/nb", *dirs],
                      ready="api/status", page=f"notebooks/{NOTEBOOK}",
                      prepare=lambda tmp: write_notebook_root(tmp, [WIDGET_CELL], NOTEBOOK))


SERVERS = {"marimo": marimo_server, "voila": voila_server, "notebook": notebook_server}


# --------------------------------------------------------------------------- the page
#: The widget's root element, wherever the host put it: marimo renders anywidgets inside a
#: shadow root, which ``document.querySelector`` does not enter.
FIND_ROOT = """
const findRoot = (node) => {
    const hit = node.querySelector('.pw-root');
    if (hit) return hit;
    for (const el of node.querySelectorAll('*')) {
        const inner = el.shadowRoot && findRoot(el.shadowRoot);
        if (inner) return inner;
    }
    return null;
};"""


def wait_for_run(page, previous_run_id: int, timeout_ms: int = 60_000) -> int:
    """As ``test_widget_browser.wait_for_run`` (the sweep the last Run click started is on screen
    and done), with the root found through shadow roots."""
    page.wait_for_function(FIND_ROOT + """
        (before) => {
            const r = findRoot(document);
            return r && r.dataset.requestedRun !== undefined && r.dataset.runId === r.dataset.requestedRun
                   && r.dataset.runState === 'done' && r.dataset.complete === 'true'
                   && Number(r.dataset.runId) > before;
        }""", arg=previous_run_id, timeout=timeout_ms)
    return run_id(page)


def host_shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator(".pw-root").screenshot(path=str(ARTIFACTS / name))


@pytest.fixture(scope="module", params=HOSTS)
def host_page(request, playwright_session):  # noqa: F811
    """The widget's page in ``host``, offline: a request for anything but the host's own server
    is aborted and listed in ``page.blocked``."""
    host = request.param
    why = missing_requirement(host)
    if why is not None:
        pytest.skip(why)
    with SERVERS[host]() as server:
        browser = launch_browser(playwright_session)
        try:
            # Service workers off: a request a service worker answers would not reach the route.
            context = browser.new_context(viewport={"width": 1400, "height": 1600}, service_workers="block")
            blocked: list[str] = []
            own = f"http://127.0.0.1:{server.port}/"

            def only_own_server(route):
                if route.request.url.startswith(own):
                    route.continue_()
                else:
                    blocked.append(route.request.url)
                    route.abort()

            context.route("**/*", only_own_server)
            page = context.new_page()
            page.host, page.server, page.blocked = host, server, blocked
            page.goto(server.url + server.page)
            try:
                if host == "notebook":  # a notebook, not an app: run its cell
                    run_first_cell(page, NOTEBOOK_KERNEL_IDLE, timeout_ms=120_000)
                page.wait_for_selector(".pw-root[data-status]", timeout=120_000)
                page.locator(".pw-token-row .pw-tok").first.wait_for(timeout=60_000)
            except Exception as err:
                raise RuntimeError(f"the widget did not appear in {host}: {err}\nserver log:\n"
                                   f"{server.server_log()}") from err
            yield page
        finally:
            browser.close()


def use_prompts(page) -> None:
    """This module's prompts, denoising, ``normalized``; wait for the answers to follow the
    model's predictions on them (which come from the kernel: the link works both ways)."""
    from playwright.sync_api import expect

    page.fill("input[data-field='clean']", CLEAN)
    page.fill("input[data-field='corrupted']", CORRUPTED)
    page.click("button[data-direction='denoising']")
    page.select_option("select[data-control='metric']", "normalized")
    for field, answer in zip(("correct", "incorrect"), ANSWERS):
        expect(page.locator(f"input[data-field='{field}']")).to_have_value(answer, timeout=30_000)


def run_and_wait(page) -> list[dict]:
    before = run_id(page)
    page.click("button[data-action='run']")
    wait_for_run(page, before)
    assert page.get_attribute(".pw-root", "data-kernel") == "connected", "Python answered the page"
    return cell_values(page)


def reference(model, site: str):
    """:func:`patchwidgets.patch` on this module's prompts, in this process."""
    import patchwidgets

    return patchwidgets.patch(model, CLEAN, CORRUPTED, answers=ANSWERS, site=site, direction="denoising",
                              metrics=["normalized"]).grid("normalized")


def assert_no_network(page) -> None:
    assert page.blocked == [], f"{page.host} asked the network for {page.blocked}"


# --------------------------------------------------------------------------- the tests
def test_run_fills_heatmap(host_page, toy_model):
    """Run: one painted cell per (layer, position), each equal to ``patch`` computed here."""
    page = host_page
    use_prompts(page)
    page.select_option("select[data-control='site']", "resid_pre")
    cells = run_and_wait(page)
    expected = reference(toy_model, "resid_pre")  # [layer, pos]
    assert expected.shape == (4, 15)
    assert len(cells) == expected.numel(), "one cell per (layer, position)"
    fills = page.eval_on_selector_all("rect.pw-cell", "els => els.map(e => e.getAttribute('fill'))")
    assert all(f and f != "none" for f in fills), "every cell is painted"
    for c in cells:
        assert c["value"] is not None, c
        assert c["value"] == pytest.approx(float(expected[c["layer"], c["pos"]]), abs=1e-6), c
    host_shot(page, f"hosts-{page.host}-heatmap.png")
    assert_no_network(page)


def test_head_cell_shows_attention_pattern(host_page, toy_model):
    """The head view's heatmap equals ``patch(site="head_out")``; clicking a head cell shows
    that head's attention on both prompts, equal to the model's ``hook_pattern``."""
    page = host_page
    use_prompts(page)
    page.select_option("select[data-control='site']", "head_out")
    cells = run_and_wait(page)
    expected = reference(toy_model, "head_out")  # [layer, head]
    assert len(cells) == expected.numel() == 4 * 8
    for c in cells:
        assert c["value"] == pytest.approx(float(expected[c["layer"], c["head"]]), abs=1e-6), c

    # The strongest head after layer 0: the panel starts on head 0.0, so its pattern must come
    # from the click.
    top = max((c for c in cells if c["layer"] > 0), key=lambda c: abs(c["value"]))
    layer, head = top["layer"], top["head"]
    panel = f".pw-patterns[data-layer='{layer}'][data-head='{head}']"
    assert page.locator(panel).count() == 0, "the panel shows another head before the click"
    page.click(f"rect.pw-cell[data-layer='{layer}'][data-head='{head}']")
    page.locator(".pw-explanation", has_text=f"head {layer}.{head}").wait_for()
    page.locator(f"{panel} svg.pw-pattern[data-prompt='corrupted']").wait_for()

    names = {f"blocks.{layer}.attn.hook_pattern"}
    for prompt, text in (("clean", CLEAN), ("corrupted", CORRUPTED)):
        _, cache = toy_model.run_with_cache(toy_model.to_tokens(text), names_filter=lambda n: n in names)
        want = cache[f"blocks.{layer}.attn.hook_pattern"][0, head]  # [query, key]
        n = want.shape[0]
        assert page.get_attribute(f"{panel} svg.pw-pattern[data-prompt='{prompt}']", "data-n") == str(n)
        shown = page.eval_on_selector_all(
            f"{panel} svg.pw-pattern[data-prompt='{prompt}'] rect.pw-pcell",
            "els => els.map(e => [Number(e.dataset.q), Number(e.dataset.k), Number(e.dataset.weight)])")
        assert len(shown) == n * n
        for q, k, weight in shown:  # (the page keeps four decimals)
            assert weight == pytest.approx(float(want[q, k]), abs=5e-5 + 1e-6), (prompt, q, k)
    host_shot(page, f"hosts-{page.host}-pattern.png")
    assert_no_network(page)
