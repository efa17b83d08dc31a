"""The interactive patching widget: type two prompts, press Run, watch the heatmap fill in.

Quick start (works offline: ``model=None`` loads the bundled ``toy-ioi`` model)::

    w = patchwidgets.PatchingWidget()
    w                      # display it, then press Run, or from code:
    w.run(wait=True)       # block until the sweep is done
    w.result.frame         # the PatchResult behind the heatmap
    w.figure()             # the same heatmap as a plotly figure

How it works
------------
The widget is an `anywidget <https://anywidget.dev>`_: a Python class with synced traitlets
plus one plain ES module (``static/widget.js``) that draws them. Python owns the model; the
browser owns nothing but the picture. Every input (``clean``, ``corrupted``, ``correct``,
``incorrect``, ``direction``, ``metric``, ``site``) is a traitlet, so it can be set from code
(``w.clean = "..."`` updates the view) or from the page.

Everything that touches the model runs on **one background thread** (a
:class:`~patchwidgets.widget_jobs.JobRunner`), so the notebook never blocks and two forward
passes never overlap (patching attaches hooks to the model; a second pass at the same time
would see them). Three kinds of job run there:

* *preview*, after any prompt or answer edit: tokenise both prompts, check them with the
  core's own checks, run each prompt once, pre-fill the answers with the model's top
  predictions and compute the baseline logit differences;
* *pattern*: send one head's attention pattern (cached by the preview);
* *sweep* (:class:`~patchwidgets.widget_jobs.Sweeper`, composed as ``w.sweeps``): first, with ``fast_preview`` on,
  an attribution-patching estimate of every cell (:func:`patchwidgets.attribution_patch`,
  one backward pass), painted at once and marked *approximate*; then the exact sweep,
  :func:`patchwidgets.patch`, with a ``callback`` that pushes the partial grid to the
  ``heatmap`` traitlet after each chunk (at most ~10 times a second), each exact value
  replacing its estimate, and runs any waiting preview or pattern job, so edits stay
  responsive during a long sweep.

The component ``"path"`` is the path-patching view: :func:`patchwidgets.path_patch` sweeps
every sender head, its effect restricted to the path into the ``receivers`` (``"logits"``,
or heads such as ``"3.1, 3.5"``; Shift+click a head cell on the page to add or remove one)
through their ``receiver_input`` (``q``, ``k``, ``v`` or a combination); the heatmap is
sender layer x sender head.

All built-in metrics are computed in the same sweep (they cost nothing extra), so switching
the metric redraws at once without rerunning.

The component ``"circuit"`` is the circuit view (:mod:`patchwidgets.widget_circuit`): Run scores
every edge of the model's graph with :func:`patchwidgets.edge_attribution` (``circuit_method``:
``"eap"`` or ``"eap-ig"``) and draws the strongest ``circuit_k`` by layer; releasing the top-k
slider (or ``w.circuit_k = k``) computes the kept circuit's exact faithfulness
(:func:`patchwidgets.faithfulness`) into ``circuit_faithfulness``, and clicking an edge (or
``w.circuit_edge = name``) its exact :func:`patchwidgets.edge_patch` into ``circuit_edge_patch``.
``w.circuit_scores`` is the :class:`~patchwidgets.edge_attribution.EdgeScores` on screen.

Errors never escape: anything the core rejects lands in ``errors`` as ``{field: message}``
and the page shows it next to that field, while the last good heatmap stays.

Where it runs
-------------
JupyterLab 4 and Jupyter Notebook 7 (Notebook 7 is built from JupyterLab components and
ships the same ipywidgets manager, so the widget behaves identically), VS Code and Colab
(anywidget's ``export default { render }`` convention). To reopen a saved notebook with its
last heatmap, turn on *Settings -> Jupyter Widgets -> Save Jupyter widget state in
notebooks*; the traitlets (heatmap included) are then stored in the notebook, and a view
restored without its Python object (the notebook reopened, the kernel restarted) shows the
saved heatmap and says, when Run or a cell is clicked, that nothing answers it. Exported
notebooks (``jupyter nbconvert --to html``, GitHub) cannot run the widget offline: a displayed
widget adds a second output, the last heatmap as static HTML with its legend
(:meth:`PatchingWidget.export_html`), redrawn through a display id whenever a sweep ends;
the widget's stylesheet hides it wherever the live widget runs.

Keyboard: the heatmap is one tab stop; arrows move, Enter explains a cell, Shift+Enter adds
or removes a receiver in the path view. The circuit view's graph is one tab stop too: Left and
Right move to the next weaker or stronger edge, Up and Down follow the circuit (the strongest
edge out of this edge's receiver, into its sender), Enter patches the edge exactly.

Datasets: ``PatchingWidget(model, dataset=[(clean, corrupted, correct, incorrect), ...])`` (or
the page's list) sweeps every pair; the heatmap shows the mean (explanations add its standard
error) or, with ``w.pair = k``, one pair.
"""

from __future__ import annotations

import difflib
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anywidget
import traitlets as t

from .inputs import dataset_rows
from .metrics import ALIASES, BUILTIN_METRICS, METRICS
from .circuit_view import static_circuit_html
from .widget_circuit import Circuits
from .widget_contract import (
    CIRCUIT_FIELDS,
    CIRCUIT_METHODS,
    CONTRACT,
    CONTROL_FIELDS,
    INPUT_FIELDS,
    PAGE_FIELDS,
    RUN_FIELDS,
    SHOWN_FIELDS,
    SWEEP_FIELDS,
)
from .widget_jobs import JobRunner, Sweeper, parse_receivers
from .widget_payload import pattern_payload, static_html
from .widget_preview import field_of, preview, quiet_load
from .widget_words import explain_cell

STATIC = Path(__file__).parent / "static"
DEFAULT_CLEAN = "When Mary and John went to the store, John gave a drink to"
DEFAULT_CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"


class PatchingWidget(anywidget.AnyWidget):
    """Activation patching, interactively. See the module docstring for the design.

    Args:
        model: a model from :func:`patchwidgets.load_model`, a model name, or ``None`` for
            the bundled ``toy-ioi`` model (loads offline).
        clean, corrupted: the two prompts (default: an indirect-object pair).
        correct, incorrect: answer tokens; left empty, they are filled with the model's
            top prediction on the clean and the corrupted prompt, and follow the prompts
            until you type your own.
        direction, metric, site, auto_run: initial control settings (any traitlet can be
            passed as a keyword).
        fast_preview: paint an attribution-patching estimate first, marked approximate,
            then replace it cell by cell with the exact sweep (default on; skipped for
            ``rank``/``accuracy`` and for path patching, which AtP cannot estimate).
        receivers, receiver_input: the path-patching view (``site="path"``): ``"logits"``
            (or ``""``) or heads such as ``"3.1, 3.5"``, and ``"q"``, ``"k"``, ``"v"`` or a
            combination such as ``"kv"``.
        step_delay: seconds to pause after the estimate and after each exact chunk (slow
            motion, to watch the heatmap fill in; 0 by default).
        max_batch_tokens: memory budget of one forward pass (rows x positions), passed to
            :func:`patchwidgets.patch`. The heatmap is repainted after each pass, so a smaller
            budget also means more frequent updates (and a cancel that lands sooner) at some
            cost in speed; a toy sweep fits in a single pass at the default.
        circuit_method, circuit_k, circuit_steps: the circuit view (``site="circuit"``): how
            edges are scored (``"eap"`` or ``"eap-ig"``, with ``circuit_steps`` interpolation
            steps), and how many of the strongest are kept (drawn, and checked for faithfulness).

    Attributes:
        result: the last :class:`~patchwidgets.results.PatchResult` (partial after a
            cancel: ``result.complete`` is False), or ``None``.
        circuit_scores: the :class:`~patchwidgets.edge_attribution.EdgeScores` of the circuit
            view, or ``None``.
    """

    _esm = STATIC / "widget.js"
    _css = STATIC / "widget.css"

    # Inputs (set from the page or from code).
    clean = t.Unicode(DEFAULT_CLEAN).tag(sync=True)
    corrupted = t.Unicode(DEFAULT_CORRUPTED).tag(sync=True)
    correct = t.Unicode("").tag(sync=True)
    incorrect = t.Unicode("").tag(sync=True)
    direction = t.Unicode("denoising").tag(sync=True)
    metric = t.Unicode("normalized").tag(sync=True)
    site = t.Unicode("resid_pre").tag(sync=True)
    receivers = t.Unicode("").tag(sync=True)        # path view: "" / "logits", or "3.1, 3.5"
    receiver_input = t.Unicode("q").tag(sync=True)  # path view: q, k, v or a combination
    fast_preview = t.Bool(True).tag(sync=True)      # attribution-patching estimate first
    step_delay = t.Float(0.0)                       # seconds of pause per stage (slow motion)
    max_batch_tokens = t.Int(4096)                  # memory budget of one pass; smaller = more updates
    auto_run = t.Bool(False).tag(sync=True)
    auto_run_delay = t.Float(0.4)  # seconds of quiet before an auto-run starts
    selected = t.Dict().tag(sync=True)          # {"row": r, "col": c} of the clicked cell
    pattern_layer = t.Int(0).tag(sync=True)
    # Datasets: [[clean, corrupted, correct, incorrect], ...]; a sweep runs over every pair, the
    # heatmap shows the mean (``pair=-1``) or one pair's own values (``pair=k``).
    dataset = t.List().tag(sync=True)
    pair = t.Int(-1).tag(sync=True)
    pattern_head = t.Int(0).tag(sync=True)
    # The circuit view (site "circuit"): how edges are scored, how many of the strongest are kept
    # (the top-k slider: drawn, and their faithfulness computed), the edge clicked (Edge.name).
    circuit_method = t.Unicode("eap-ig").tag(sync=True)
    circuit_k = t.Int(20).tag(sync=True)
    circuit_edge = t.Unicode("").tag(sync=True)
    circuit_steps = t.Int(5)                        # EAP-IG's interpolation steps

    # Outputs (set by Python only).
    # What the page and Python agree on (fields, metric labels and scales, sites, receiver
    # inputs, heatmap keys): see patchwidgets.widget_contract.
    contract = t.Dict(CONTRACT, read_only=True).tag(sync=True)
    model_name = t.Unicode("").tag(sync=True)
    model_info = t.Dict().tag(sync=True)        # {"n_layers", "n_heads"}
    tokens = t.Dict().tag(sync=True)            # {"clean": [...] | None, "corrupted": ...}
    baseline = t.Dict().tag(sync=True)          # logit differences and top predictions
    errors = t.Dict().tag(sync=True)            # {field: message}
    status = t.Unicode("idle").tag(sync=True)   # idle | running | done | cancelled | error
    progress = t.List([0, 0]).tag(sync=True)    # [patches done, total]
    # Non-empty while a job waits for the model because another caller (a notebook cell,
    # another widget) is running a pass on it: who holds it (patchwidgets.sharing).
    waiting_for = t.Unicode("").tag(sync=True)
    elapsed = t.Float(0.0).tag(sync=True)       # seconds the last sweep took in Python
    heatmap = t.Dict().tag(sync=True)           # see widget_payload.heatmap_payload
    explanation = t.Unicode("").tag(sync=True)
    pattern = t.Dict().tag(sync=True)           # one head's pattern on both prompts
    circuit = t.Dict().tag(sync=True)           # see circuit_view.circuit_payload
    # {"k", "value", "state", "run_id", "metric"[, "error"]}: the kept circuit's faithfulness
    circuit_faithfulness = t.Dict().tag(sync=True)
    # {"edge", "value", "change", "state", "run_id", "metric"[, "error"]}: the clicked edge patched alone
    # (value: the metric, as edge_patch gives it; change: from the unpatched target run, what the score estimates)
    circuit_edge_patch = t.Dict().tag(sync=True)

    @classmethod
    def default_state(cls) -> dict[str, Any]:
        """Every synced traitlet (:data:`~patchwidgets.widget_contract.PAGE_FIELDS` and
        :data:`~patchwidgets.widget_contract.SHOWN_FIELDS`, the contract itself aside) as a new
        widget has it before it has seen its model: what the page's unit tests start from
        (``tests/shared/widget_contract.json``)."""
        traits = cls.class_traits()
        return {name: traits[name].default() for name in (*PAGE_FIELDS, *SHOWN_FIELDS) if name != "contract"}

    def __init__(self, model: Any = None, dataset: Any = None, **kwargs: Any):
        self._sync_lock = threading.RLock()  # see hold_sync below
        if model is None or isinstance(model, str):
            model = quiet_load(model or "toy-ioi")
        self.model = model
        self._run_id = 0
        self._timer: threading.Timer | None = None
        self._timer_lock = threading.Lock()
        self._quiet = threading.local()  # set while the job thread writes inputs itself
        self._preview_errors: dict[str, str] = {}
        self._run_errors: dict[str, str] = {}
        # An answer follows the model's prediction until the user types one (typing it empty
        # makes it follow again); the prompt edited last is where a length mismatch is shown.
        if dataset:  # the fields show (and the preview checks) the first pair
            dataset = dataset_rows(dataset)
            kwargs.update(dataset=dataset, **dict(zip(INPUT_FIELDS, dataset[0])))
        self._follow = {name: not kwargs.get(name) for name in ("correct", "incorrect")}
        self._edited_prompt = "corrupted"
        self._patterns: dict[str, Any] = {}
        self._inputs_used: dict[str, str] = {}
        self._jobs = JobRunner(("preview", "pattern", "edge", "faithfulness", "sweep", "circuit"),
                               self._job_failed, on_wait=self._waiting_for)
        self.sweeps = Sweeper(self, self._sync_lock, lambda: self._jobs.waiting("sweep"))
        self.circuits = Circuits(self)
        cfg = model.cfg
        name = str(getattr(cfg, "model_name", "") or type(model).__name__)
        super().__init__(
            model_name=Path(name).name if "/" in name else name,
            model_info={"n_layers": int(cfg.n_layers), "n_heads": int(cfg.n_heads)},
            **kwargs,
        )
        self.observe(self._on_input, names=list(INPUT_FIELDS))
        self.observe(self._on_control, names=list(CONTROL_FIELDS))
        self.observe(self._on_metric, names="metric")
        self.observe(self._on_selected, names="selected")
        self.observe(self._on_pattern_choice, names=["pattern_layer", "pattern_head"])
        self.observe(self._on_auto_run, names="auto_run")
        self.observe(lambda change: self.sweeps.push(), names="pair")
        self.observe(self._on_dataset, names="dataset")
        self.observe(self._on_circuit_method, names="circuit_method")
        self.observe(self._on_circuit_k, names="circuit_k")
        self.observe(self._on_circuit_edge, names="circuit_edge")
        self.on_msg(self._on_frontend_msg)
        self._preview()  # (on this thread: its one pass waits its turn if the model is busy)

    # ------------------------------------------------------------------ public API
    def run(self, wait: bool = False, timeout: float | None = None):
        """Start a sweep with the current inputs (cancelling one in progress); in the circuit
        view (``site="circuit"``), score the edges instead.

        With ``wait=True``, block until it finishes and return :attr:`result` (in the circuit
        view: :attr:`circuit_scores`; ``None`` if the inputs were rejected: see :attr:`errors`).
        The page's Run button does the same without waiting.
        """
        self._cancel_timer()
        self.sweeps.stop()
        self.circuits.stop()
        self.status = "running"
        self._run_id += 1
        run_id = self._run_id
        circuit = self.site == "circuit"
        if circuit:
            self._jobs.discard("sweep")
            self._jobs.submit("circuit", lambda: self.circuits.run(run_id))
        else:
            self._jobs.discard("circuit")
            self._jobs.submit("sweep", lambda: self.sweeps.run(run_id))
        if wait:
            self.wait(timeout)
            if self.status != "done":
                return None
            return self.circuit_scores if circuit else self.result
        return None

    def cancel(self) -> None:
        """Stop the running sweep after its current chunk (the Cancel button)."""
        self._cancel_timer()
        self._jobs.discard("sweep")
        self._jobs.discard("circuit")
        self.sweeps.stop()
        self.circuits.stop()
        if self._jobs.idle() and self.status == "running":
            self.status = "cancelled"

    def wait(self, timeout: float | None = None) -> bool:
        """Block until pending auto-runs, previews and sweeps are done; False on timeout."""
        if threading.current_thread().name == "patchwidgets-jobs":
            return False  # called from an observer on the job thread: would deadlock
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._timer_lock:
                timer = self._timer
            if timer is None:
                break
            timer.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if timer.is_alive():
                return False
            with self._timer_lock:
                if self._timer is timer:  # it fired (or was cancelled) without clearing
                    self._timer = None
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        done = self._jobs.wait(left)
        self._refresh_export()  # (here, on the kernel's thread, the display update reaches its cell)
        return done

    def figure(self, metric: str | None = None):
        """The current heatmap as a plotly figure (``result.figure``). A metric the last sweep
        did not compute (a sweep computes the metric on screen and those that come free with
        it) is shown by switching to it and waiting for its sweep."""
        if self.result is None:
            raise RuntimeError("no sweep has run yet: press Run or call w.run(wait=True)")
        if metric is not None and metric != self.metric and self.sweeps.lacks(metric):
            self.metric = metric
            self.wait()
        return self.result.figure(metric or self.metric)

    def select(self, row: int | None = None, col: int | None = None, **index: int) -> str:
        """Select a heatmap cell, as a click does, by ``row, col`` or by index values
        (``layer=3, pos=10``, ``layer=1, head=4``); return its explanation."""
        if row is None or col is None:
            rows, cols = self.heatmap.get("rows", []), self.heatmap.get("cols", [])

            def find(items):
                return next(i for i, d in enumerate(items)
                            if all(d[k] == v for k, v in index.items() if k in d))
            row, col = find(rows), find(cols)
        self.selected = {"row": int(row), "col": int(col)}
        return self.explanation

    def close(self) -> None:
        if hasattr(self, "sweeps"):  # (not when the constructor refused its arguments: nothing started)
            self._cancel_timer()
            self.sweeps.stop()
            self.circuits.stop()
            self._jobs.close()
        super().close()

    # ------------------------------------------------------------------ validation
    @t.validate("metric")
    def _valid_metric(self, proposal):
        """A metric the widget computes; an alias (``"normalised"``) becomes its name, and a typo
        is refused at once, so no sweep ever runs with a metric nobody can see."""
        name = ALIASES.get(proposal["value"], proposal["value"])
        if name not in METRICS:
            close = difflib.get_close_matches(str(name), list(METRICS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise t.TraitError(f"unknown metric {proposal['value']!r}.{hint} "
                               f"The widget offers: {', '.join(BUILTIN_METRICS)}.")
        return name

    @t.validate("circuit_method")
    def _valid_circuit_method(self, proposal):
        methods = dict(CIRCUIT_METHODS)
        name = str(proposal["value"]).lower().replace("_", "-")
        if name not in methods:
            raise t.TraitError(f"unknown circuit_method {proposal['value']!r}: the circuit view scores edges "
                               f"with {' or '.join(repr(m) for m in methods)}")
        return name

    @t.validate("circuit_k")
    def _valid_circuit_k(self, proposal):
        if proposal["value"] < 0:
            raise t.TraitError(f"circuit_k is the number of edges kept, at least 0; got {proposal['value']}")
        return proposal["value"]

    @t.validate("dataset")
    def _valid_dataset(self, proposal):
        """Rows set from code are checked at once (an empty prompt or answer raises
        :class:`~patchwidgets.errors.PatchingInputError` naming the row). Rows edited on the page
        are taken as typed (raising would leave the page and Python out of step); a Run then
        reports a bad one next to its field."""
        if "dataset" in getattr(self, "_property_lock", {}):  # (set by ipywidgets while applying a page edit)
            return proposal["value"]
        return dataset_rows(proposal["value"])

    # ------------------------------------------------------------------ thread-safe syncing
    # ipywidgets batches trait updates (hold_sync) in a per-widget queue that is not
    # thread-safe: an update made by one thread while another flushes the queue can be
    # lost. Both the kernel's thread and the job thread write traitlets, so every piece of
    # that bookkeeping runs under one re-entrant lock.
    @contextmanager
    def hold_sync(self):
        with self._sync_lock, super().hold_sync():
            yield

    def _should_send_property(self, key, value):
        with self._sync_lock:
            return super()._should_send_property(key, value)

    def send_state(self, key=None):
        with self._sync_lock:
            super().send_state(key)

    def set_state(self, sync_data):
        with self._sync_lock:  # an update from the page: its property lock is shared state too
            super().set_state(sync_data)

    # ------------------------------------------------------------------ representations
    def __repr__(self) -> str:
        answers = (self.correct, self.incorrect)
        return (f"PatchingWidget(model={self.model_name!r}, site={self.site!r}, "
                f"direction={self.direction!r}, metric={self.metric!r}, clean={self.clean!r}, "
                f"corrupted={self.corrupted!r}, answers={answers!r}, status={self.status!r})")

    def _repr_mimebundle_(self, **kwargs: Any):
        bundle = super()._repr_mimebundle_(**kwargs)
        data, meta = bundle if isinstance(bundle, tuple) else (bundle, {})
        data = dict(data)
        data["text/html"] = self._static_pictures()
        return data, meta

    def _static_pictures(self) -> str:
        """The heatmap as static HTML and, once there is one, the circuit (the one on screen first)."""
        title = f"PatchingWidget ({self.model_name})"
        pictures = [static_html(self.heatmap, title)]
        if self.circuit:
            circuit = static_circuit_html(self.circuit, f"{title}: circuit", self.circuit_k, self.circuit_faithfulness)
            pictures.insert(0 if self.site == "circuit" else 1, circuit)
        return "".join(pictures)

    # ------------------------------------------------------------------ export (nbconvert, GitHub)
    # A notebook that carries widget state exports the widget as a script that loads the
    # widget manager from a CDN: offline (or on GitHub) that draws nothing. So a displayed
    # widget gets a second output: the last heatmap as static HTML (colours, legend, labels;
    # no scripts), kept up to date through a display id. The widget's own CSS hides it
    # wherever the live widget (or the widget manager) runs, so a reader sees one heatmap.
    def _ipython_display_(self, **kwargs: Any) -> None:
        from IPython.display import display

        data, meta = self._repr_mimebundle_()
        data.pop("text/html", None)  # (the static picture is the output below)
        display(data, metadata=meta, raw=True)
        self._export_key = self._export_state()
        self._export_handle = display(self._export_bundle(), raw=True, display_id=True)

    def export_html(self) -> str:
        """The last heatmap as self-contained HTML, as exported notebooks show it."""
        return (f'<div class="pw-static-export" data-run-id="{self.heatmap.get("run_id", "")}">'
                f'{self._static_pictures()}</div>')

    def _export_bundle(self) -> dict:
        return {"text/html": self.export_html(),
                "text/plain": f"PatchingWidget heatmap (static copy): {self.heatmap.get('metric', 'none yet')}"}

    def _export_state(self) -> tuple:
        hm, faith = self.heatmap or {}, self.circuit_faithfulness or {}
        return (hm.get("run_id"), hm.get("metric"), hm.get("state"), hm.get("done"), self.site,
                (self.circuit or {}).get("run_id"), self.circuit_k, faith.get("k"), faith.get("value"))

    def _refresh_export(self) -> None:
        """Update the static copy if the heatmap changed since it was drawn (and was displayed)."""
        handle = getattr(self, "_export_handle", None)
        if handle is None or (self.heatmap or {}).get("state") == "running":
            return
        key = self._export_state()
        if key != getattr(self, "_export_key", None):
            self._export_key = key
            try:
                handle.update(self._export_bundle(), raw=True)
            except Exception:  # (no IPython display machinery here: nothing to update)
                pass

    # ------------------------------------------------------------------ observers
    def _writing(self) -> bool:
        return getattr(self._quiet, "on", False)

    def _set_quietly(self, **values: Any) -> None:
        self._quiet.on = True
        try:
            for name, value in values.items():
                setattr(self, name, value)
        finally:
            self._quiet.on = False

    def _on_input(self, change) -> None:
        if self._writing():
            return
        name = change["name"]
        if name in self._follow:
            self._follow[name] = not change["new"]
        else:
            self._edited_prompt = name
        self._run_errors, self.sweeps.errors, self.circuits.errors = {}, {}, {}
        self._jobs.submit("preview", self._preview)
        self._schedule_auto_run()

    def _on_control(self, change) -> None:
        self._run_errors.pop(change["name"], None)
        self.sweeps.errors.pop(change["name"], None)
        self.circuits.errors.pop(change["name"], None)
        if change["name"] in ("receivers", "site"):
            self._check_receivers()
        self._set_errors()
        self._schedule_auto_run()

    def _check_receivers(self) -> None:
        """Check the receivers field as it is typed (only while the path view is chosen)."""
        self._run_errors.pop("receivers", None)
        self.sweeps.errors.pop("receivers", None)
        if self.site == "path":
            try:
                parse_receivers(self.receivers, self.model.cfg.n_layers, self.model.cfg.n_heads)
            except ValueError as err:
                self._run_errors["receivers"] = str(err)

    def _on_dataset(self, change) -> None:
        self.sweeps.errors = {}
        self._set_errors()
        self._schedule_auto_run()

    def _on_auto_run(self, change) -> None:
        if change["new"]:
            self._schedule_auto_run()
        else:
            self._cancel_timer()

    def _on_metric(self, change) -> None:
        self.sweeps.errors.pop("metric", None)
        self.circuits.errors.pop("metric", None)
        self._run_errors.pop("metric", None)
        if self.site == "circuit":  # (the circuit's scores are for one metric: it goes stale, Run rescores)
            self._set_errors()
            self._schedule_auto_run()
            return
        if self.sweeps.lacks(change["new"]):  # computed on demand (widget_jobs.sweep_metrics)
            self.run()
            return
        why = self.sweeps.unavailable(change["new"])
        if why:
            self._run_errors["metric"] = why
        else:  # (before the first exact chunk, only the estimate's own metric can be shown)
            self.sweeps.push()
        self._set_errors()

    def _on_selected(self, change) -> None:
        sel, payload = change["new"] or {}, self.heatmap
        try:
            row, col = int(sel["row"]), int(sel["col"])
            cell = {**payload["rows"][row], **payload["cols"][col]}
        except (KeyError, IndexError, TypeError, ValueError):
            self.explanation = ""
            return
        used = payload.get("inputs", {})
        self.explanation = explain_cell(payload, row, col, (used.get("correct", ""), used.get("incorrect", "")))
        if "head" in cell and "layer" in cell:
            with self.hold_sync():
                self.pattern_layer, self.pattern_head = int(cell["layer"]), int(cell["head"])

    def _on_circuit_method(self, change) -> None:
        self.circuits.errors.pop("circuit_method", None)
        self._set_errors()
        if self.site == "circuit":
            self._schedule_auto_run()

    def _on_circuit_k(self, change) -> None:
        """The top-k slider was released (or ``circuit_k`` set): the kept circuit's faithfulness."""
        self.circuits.supersede("faithfulness")
        self._jobs.submit("faithfulness", self.circuits.faithfulness)

    def _on_circuit_edge(self, change) -> None:
        """An edge was clicked (or ``circuit_edge`` set): its exact edge patch."""
        self.circuits.supersede("edge")
        self._jobs.submit("edge", self.circuits.edge_patch)

    def _on_pattern_choice(self, change) -> None:
        self._jobs.submit("pattern", self._send_pattern)

    def _on_frontend_msg(self, widget, content, buffers) -> None:
        kind = content.get("type") if isinstance(content, dict) else None
        self._refresh_export()  # a page message: the kernel's thread, a good moment to catch up
        if kind == "hello":  # a view asks whether a Python object is behind it
            self.send({"type": "hello"})
        elif kind == "run":
            # The page sends the run fields it edited along with Run: ipywidgets may still hold
            # back a state update while the kernel is busy, and custom messages overtake it.
            state = content.get("state")
            if isinstance(state, dict):
                with self.hold_sync():
                    for name in RUN_FIELDS:
                        if name in state and state[name] != getattr(self, name):
                            try:  # (as a state update: a dataset row is taken as typed, see _valid_dataset)
                                self.set_state({name: state[name]})
                            except t.TraitError:  # (refused, as the same value in a state update would be)
                                pass
            self.run()
            self.send({"type": "ack", "run_id": self._run_id})
        elif kind == "cancel":
            self.cancel()

    # ------------------------------------------------------------------ auto-run
    def _schedule_auto_run(self) -> None:
        if not self.auto_run:
            return
        with self._timer_lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(self.auto_run_delay, self._auto_fire)
            self._timer.daemon = True
            self._timer.start()

    def _auto_fire(self) -> None:
        with self._timer_lock:
            self._timer = None
        self.run()

    def _cancel_timer(self) -> None:
        with self._timer_lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    # ------------------------------------------------------------------ errors
    def blocking_errors(self) -> dict[str, str]:
        """What stops a Run before it starts: the preview's findings on the current inputs."""
        return self._preview_errors

    def _set_errors(self) -> None:
        self.errors = {**self.blocking_errors(), **self.sweeps.errors, **self.circuits.errors, **self._run_errors}

    def field_of(self, err: BaseException) -> str:
        return field_of(err, {name: getattr(self, name) for name in INPUT_FIELDS})

    def _job_failed(self, kind: str, err: BaseException) -> None:
        self._run_errors["general"] = f"Internal error in the {kind} job: {type(err).__name__}: {err}"
        self._set_errors()
        if kind in ("sweep", "circuit"):
            self.status = "error"

    # ------------------------------------------------------------------ SweepHost (for self.sweeps)
    @property
    def result(self):
        """The last :class:`~patchwidgets.results.PatchResult` (partial after a cancel), or None."""
        return self.sweeps.result

    @property
    def preview_skipped(self) -> str:
        """Why the last fast preview was skipped, if it was."""
        return self.sweeps.preview_skipped

    def sweep_inputs(self) -> dict:
        return {name: getattr(self, name) for name in SWEEP_FIELDS}

    def show(self, payload: dict, clear_selection: bool) -> None:
        with self.hold_sync():
            if clear_selection and self.selected:  # a cell of another layout: nobody clicked it
                self.selected, self.explanation = {}, ""
            self.heatmap = payload
            if payload:
                self.progress = [payload["done"], payload["total"]]
        if payload and self.selected:
            self._on_selected({"new": self.selected})

    def _waiting_for(self, holder: str) -> None:
        """The job thread waits for the model (``holder``: the thread using it), or no longer."""
        words = ""
        if holder:
            who = ("a notebook cell" if holder == "MainThread" else "another widget"
                   if holder.startswith("patchwidgets-jobs") else f"thread {holder!r}")
            words = f"waiting for {who} to finish with this model"
        with self._sync_lock:
            self.waiting_for = words

    def set_progress(self, done: int, total: int) -> None:
        self.progress = [done, total]

    def started(self) -> None:
        self._run_errors = {}
        with self.hold_sync():
            self.status = "running"
            self._set_errors()

    def finished(self, status: str, elapsed: float | None) -> None:
        with self.hold_sync():
            if elapsed is not None:
                self.elapsed = round(elapsed, 4)
            self._set_errors()
            if not self._jobs.waiting("sweep") and not self._jobs.waiting("circuit"):  # a newer run keeps "running"
                self.status = status
        self._refresh_export()

    def service(self) -> None:
        self._jobs.service(("preview", "pattern"))

    # ------------------------------------------------------------------ CircuitHost (for self.circuits)
    @property
    def circuit_scores(self):
        """The :class:`~patchwidgets.edge_attribution.EdgeScores` of the circuit view, or None."""
        return self.circuits.scores

    def circuit_inputs(self) -> dict:
        return {name: getattr(self, name) for name in CIRCUIT_FIELDS}

    def set_circuit(self, **traits: Any) -> None:
        with self.hold_sync():
            for name, value in traits.items():
                setattr(self, name, value)
        self._refresh_export()

    # ------------------------------------------------------------------ jobs (job thread)
    def _preview(self) -> None:
        """Tokenise and check the prompts, pre-fill the answers, compute the baselines."""
        texts = {"clean": self.clean, "corrupted": self.corrupted}
        answers = {"correct": self.correct, "incorrect": self.incorrect}
        found = preview(self.model, texts, answers, self._follow, self._edited_prompt)
        self._patterns = found.patterns
        self._preview_errors = found.errors
        with self.hold_sync():
            self._set_quietly(**found.fills)
            self.tokens = found.tokens
            self.baseline = found.baseline
            self._set_errors()
        self._send_pattern()

    def _send_pattern(self) -> None:
        self.pattern = pattern_payload(self._patterns, self.pattern_layer, self.pattern_head)
