"""The widget's background work: one job thread, and the sweep job that runs on it.

:class:`JobRunner` is the widget's single daemon thread, so the notebook never blocks and
the widget's own jobs run one at a time. Other callers of the same model (notebook cells,
other widgets) are kept apart pass by pass by :mod:`patchwidgets.sharing`; the runner tells
the widget when a job waits for them (``on_wait``).

:class:`Sweeper` (composed into :class:`~patchwidgets.widget.PatchingWidget`, behind the small
:class:`SweepHost` interface) runs a sweep on that thread. One sweep has up to two stages:

1. **fast preview** (``fast_preview=True``, the default): :func:`patchwidgets.attribution_patch`
   estimates every cell at once from one forward and one backward pass, and the heatmap is
   painted from those estimates, marked *approximate*. AtP needs a gradient, so discrete
   metrics (``rank``, ``accuracy``) get no preview; neither does anything else it cannot
   estimate (path patching, inputs it rejects): the preview is skipped without a word,
   and the exact stage reports any real input error.
2. **exact sweep**: :func:`patchwidgets.patch` (or :func:`patchwidgets.path_patch` for the
   ``"path"`` component), streamed chunk by chunk. Each exact value replaces its estimate,
   so the approximate cells shrink to none as the sweep runs. After a cancel, the cells it
   never reached keep their estimate (and their *approximate* mark).

The estimate costs about as much as a few chunks of the exact sweep, so on a big model the
learner sees the whole picture in a fraction of the time, then watches it sharpen. On a
small model everything is fast and the preview is a blink; ``step_delay`` slows the sweep
down (seconds of pause after the preview and after each chunk) to watch it happen.

The path-patching view sweeps every *sender* head with its path restricted to chosen
*receivers*: the ``receivers`` field reads ``logits`` (or nothing) for the direct path to the
final residual stream, or heads such as ``3.1, 3.5`` (:func:`parse_receivers`), whose
``receiver_input`` (``q``, ``k``, ``v`` or a combination) the path enters.
"""

from __future__ import annotations

import re
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from .attribution import attribution_patch
from .errors import DegenerateNormalizationError, PatchingCancelled
from .metrics import BUILTIN_METRICS, METRICS
from .patching import patch
from .path_patching import path_patch
from .sharing import waiting_notice
from .widget_contract import SWEEP_SITES
from .widget_payload import heatmap_payload

_HEAD = re.compile(r"^l?(\d+)(?:[.:]|h)(\d+)$", re.IGNORECASE)


#: An estimate first only when the last exact sweep of the site took at least this long (s).
PREVIEW_PAYS_S = 1.0


def sweep_metrics(shown: str) -> list[str]:
    """The metrics a sweep computes when ``shown`` is on screen: every metric that reads only
    the answers' logits (they share the unembedding of the answer columns, so showing one costs
    all of them nothing more) when ``shown`` is one of them; else all of them (the full
    unembedding is paid anyway). The others are computed when the user asks for them."""
    cheap = [m for m in BUILTIN_METRICS if METRICS[m].answer_only]
    return cheap if shown in cheap else list(BUILTIN_METRICS)


# --------------------------------------------------------------------------- receivers
def parse_receivers(text: str, n_layers: int, n_heads: int) -> list[tuple[int, int]] | None:
    """Read the *receivers* field of the path-patching view.

    ``""`` or ``"logits"`` means the direct path to the logits (returns ``None``); otherwise
    a list of heads written ``layer.head`` (or ``L3H1``, ``3:1``), separated by commas or
    spaces: ``"3.1, 3.5"`` -> ``[(3, 1), (3, 5)]`` (duplicates dropped, order kept).

    Raises:
        ValueError: with a message for the page, for text that is not a head or a head
            the model does not have.
    """
    words = text.strip()
    if words.lower() in ("", "logits", "logit"):
        return None
    heads: list[tuple[int, int]] = []
    for item in (w for w in re.split(r"[\s,;]+", words) if w):
        match = _HEAD.match(item)
        if match is None:
            raise ValueError(f"could not read {item!r} as a head: write receiver heads as layer.head, "
                             f"e.g. '3.1, 3.5', or 'logits' for the direct path to the logits")
        layer, head = int(match[1]), int(match[2])
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ValueError(f"there is no head {layer}.{head} in this model: layers are 0..{n_layers - 1}, "
                             f"heads 0..{n_heads - 1}")
        if (layer, head) not in heads:
            heads.append((layer, head))
    return heads


# --------------------------------------------------------------------------- the job thread
class JobRunner:
    """One daemon thread that runs every job touching the model, one at a time.

    Jobs have a *kind*; submitting a kind that is already waiting replaces the waiting
    job (only the newest preview or sweep matters). Waiting jobs run in a fixed priority
    order, ``priority[0]`` first, so a preview of new inputs always runs before the sweep
    that reads them. A long job may call :meth:`service` between its steps to run waiting
    jobs of the light kinds right away (the widget does so between chunks of a sweep).
    """

    def __init__(self, priority: tuple[str, ...], on_error: Callable[[str, BaseException], Any],
                 on_wait: Callable[[str], Any] | None = None):
        self.priority = priority
        self.on_error = on_error
        self.on_wait = on_wait  # told when a job waits for the model (patchwidgets.sharing)
        self._cond = threading.Condition()
        self._pending: dict[str, Callable[[], Any]] = {}
        self._busy = 0
        self._closed = False
        self._thread: threading.Thread | None = None

    def submit(self, kind: str, fn: Callable[[], Any]) -> None:
        with self._cond:
            if self._closed:
                return
            self._pending[kind] = fn
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="patchwidgets-jobs", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def discard(self, kind: str) -> None:
        with self._cond:
            self._pending.pop(kind, None)
            self._cond.notify_all()

    def _take(self, kinds) -> tuple[str, Callable] | None:
        for kind in kinds:
            if kind in self._pending:
                return kind, self._pending.pop(kind)
        return None

    def _run(self, kind: str, fn: Callable[[], Any]) -> None:
        try:
            if self.on_wait is None:
                fn()
            else:
                with waiting_notice(self.on_wait):
                    fn()
        except BaseException as err:  # never let a job kill the thread
            try:
                self.on_error(kind, err)
            except Exception:
                traceback.print_exc()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                kind, fn = self._take(self.priority)
                self._busy += 1
            try:
                self._run(kind, fn)
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()

    def service(self, kinds: tuple[str, ...]) -> None:
        """Run waiting jobs of ``kinds`` now, on the calling (job) thread."""
        while True:
            with self._cond:
                job = self._take(kinds)
            if job is None:
                return
            self._run(*job)

    def waiting(self, kind: str) -> bool:
        """Whether a job of ``kind`` is waiting to start."""
        with self._cond:
            return kind in self._pending

    def idle(self) -> bool:
        with self._cond:
            return not self._pending and not self._busy

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no job is waiting or running; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._busy, timeout)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._pending.clear()
            self._cond.notify_all()


# --------------------------------------------------------------------------- the sweep job
@dataclass
class View:
    """One sweep as the heatmap shows it: the inputs it read and what is known so far."""

    run_id: int
    inputs: dict
    result: Any = None               # the exact PatchResult so far (partial while streaming)
    estimate: Any = None             # the fast preview's AttributionResult, or None
    state: str = "running"           # running | done | cancelled


class SweepHost(Protocol):
    """What a :class:`Sweeper` needs from the widget it works for (and nothing more)."""

    model: Any
    metric: str
    fast_preview: bool
    step_delay: float
    max_batch_tokens: int
    selected: dict
    pair: int

    def sweep_inputs(self) -> dict: ...                     # widget_contract.SWEEP_FIELDS, as they are now
    def blocking_errors(self) -> dict: ...                  # what the preview found wrong with them
    def field_of(self, err: BaseException) -> str: ...      # the input an error of the core is about
    def show(self, payload: dict, clear_selection: bool) -> None: ...  # the heatmap (and progress) traitlets
    def set_progress(self, done: int, total: int) -> None: ...
    def started(self) -> None: ...                          # status "running", errors refreshed
    def finished(self, status: str, elapsed: float | None) -> None: ...
    def service(self) -> None: ...                          # run waiting light jobs (between chunks)


class Sweeper:
    """Runs the widget's sweeps on the job thread and decides what the heatmap shows.

    Composed into :class:`~patchwidgets.widget.PatchingWidget` (``widget.sweeps``), it talks
    to the widget only through :class:`SweepHost`. The heatmap always shows ``self.view``: a
    new sweep takes the screen with its first picture (the estimate or the first exact
    chunk); a sweep that fails before that leaves the last good heatmap where it was, and a
    sweep cancelled because a newer Run replaced it gives the screen back to the last
    complete sweep (``self.complete``). Every picture is taken under ``lock`` from one
    snapshot of the view (values, done/total and state together), so pushes from the
    kernel thread (metric switches) and the job thread never mix.

    Errors it finds go to ``errors`` as ``{field: message}``; ``dropped`` says which metrics
    the last sweep could not compute and why; ``preview_skipped`` why it had no estimate.
    """

    def __init__(self, host: SweepHost, lock: threading.RLock, waiting: Callable[[], bool]):
        self.host, self.lock, self.waiting = host, lock, waiting
        self.view: View | None = None
        self.complete: View | None = None
        self.result = None
        self.cancel_event: threading.Event | None = None
        self.errors: dict[str, str] = {}
        self.dropped: dict[str, str] = {}
        self.preview_skipped = ""
        self.exact_seconds: dict[str, float] = {}   # site -> how long its last exact sweep took

    # ------------------------------------------------------------------ pictures
    def push(self, view: View | None = None) -> bool:
        """Show ``view`` (default: the one on screen) in the host's metric; False if that
        metric is not in it."""
        host = self.host
        with self.lock:
            view = self.view if view is None else view
            source = None if view is None else view.result if view.result is not None else view.estimate
            if source is None or host.metric not in source.metrics:
                return False
            payload = heatmap_payload(view.result, host.metric, view.inputs, view.run_id,
                                      estimate=view.estimate, state=view.state, pair=host.pair)
            self.view = view
            host.show(payload, clear_selection=self._moved(payload))
            return True

    def _moved(self, payload: dict) -> bool:
        shown = getattr(self.host, "heatmap", None) or {}
        return any(shown.get(k) != payload.get(k) for k in ("site", "rows", "cols", "path"))

    def unavailable(self, metric: str) -> str | None:
        """Why ``metric`` cannot be shown for the sweep on screen, or None if it can."""
        result = None if self.view is None else self.view.result
        if result is not None and metric not in result.metrics:
            return f"metric {metric!r} is not available for this sweep. {self.dropped.get(metric, '')}".strip()
        return None

    def stop(self) -> None:
        if self.cancel_event is not None:
            self.cancel_event.set()

    def _pause(self, cancel: threading.Event) -> None:
        """Wait ``step_delay`` seconds (slow motion; 0 by default), or until cancelled."""
        if self.host.step_delay > 0:
            cancel.wait(self.host.step_delay)

    # ------------------------------------------------------------------ the job
    def run(self, run_id: int) -> None:
        host = self.host
        inputs = host.sweep_inputs()
        view = View(run_id, inputs)
        cancel = self.cancel_event = threading.Event()
        shown_view = self.view
        self.errors, self.dropped = {}, {}
        host.started()
        started = time.perf_counter()
        if host.blocking_errors():  # what the preview found (same words before and after Run)
            return host.finished("error", None)
        if inputs["site"] not in SWEEP_SITES:
            self.errors["site"] = (f"the widget shows these sites: {', '.join(SWEEP_SITES)}; "
                                   f"use patchwidgets.patch() for {inputs['site']!r}")
            return host.finished("error", None)
        receivers = None
        if inputs["site"] == "path":
            try:
                receivers = parse_receivers(inputs["receivers"], host.model.cfg.n_layers, host.model.cfg.n_heads)
            except ValueError as err:
                self.errors["receivers"] = str(err)
            chosen = inputs["receiver_input"]
            if not chosen or set(chosen) - set("qkv"):
                self.errors["receiver_input"] = (
                    f"receiver_input must be q, k, v or a combination such as kv, got {chosen!r}")
            if self.errors:
                return host.finished("error", None)
        last_push = [0.0]
        self.preview_skipped = ""
        if host.fast_preview and inputs["site"] == "path":
            self.preview_skipped = "attribution patching has no estimate for path patching"
        elif host.fast_preview and not self._preview_pays(inputs["site"]):
            self.preview_skipped = (f"the last exact {inputs['site']} sweep took under {PREVIEW_PAYS_S:g} s: "
                                    "an estimate first would only delay it")
        elif host.fast_preview:
            self._estimate(view, cancel)
            self._pause(cancel)

        def on_update(update) -> None:
            view.result = update.result
            now = time.perf_counter()
            if now - last_push[0] >= 0.1 or update.done >= update.total or host.step_delay > 0:
                last_push[0] = now
                self.push(view)
            else:
                host.set_progress(update.done, update.total)
            host.service()  # keep edits responsive
            self._pause(cancel)

        rows = inputs.get("dataset") or []
        if rows:
            clean, corrupted, answers = [r[0] for r in rows], [r[1] for r in rows], [(r[2], r[3]) for r in rows]
        else:
            clean, corrupted, answers = inputs["clean"], inputs["corrupted"], (inputs["correct"], inputs["incorrect"])

        def sweep(metrics):
            common = dict(answers=answers, direction=inputs["direction"],
                          metrics=metrics, callback=on_update, cancel=cancel, progress=False,
                          max_batch_tokens=host.max_batch_tokens)
            if inputs["site"] == "path":
                return path_patch(host.model, clean, corrupted, receivers=receivers,
                                  receiver_input=inputs["receiver_input"], **common)
            return patch(host.model, clean, corrupted, site=inputs["site"], **common)

        try:
            try:
                result = sweep(sweep_metrics(host.metric))
            except DegenerateNormalizationError as err:
                if host.metric == "normalized":
                    raise
                self.dropped["normalized"] = str(err)
                result = sweep([m for m in sweep_metrics(host.metric) if m != "normalized"])
        except PatchingCancelled as stop:
            if self.waiting():  # replaced by a newer Run: back to the last complete picture
                if self.complete is not None:
                    self.result = self.complete.result
                    self.push(self.complete)
            elif stop.partial is not None or self.view is view:  # (what it has, marked as stopped)
                if stop.partial is not None:
                    view.result = self.result = stop.partial
                view.state = "cancelled"
                self.push(view)
            return host.finished("cancelled", time.perf_counter() - started)
        except ValueError as err:  # every input problem the core reports
            name = host.field_of(err)
            self.errors["receivers" if inputs["site"] == "path" and name == "site" else name] = str(err)
            if self.view is view:  # only the estimate made it to the screen: take it back
                if shown_view is not None:
                    self.push(shown_view)
                else:
                    self.view = None
                    host.show({}, clear_selection=False)
            return host.finished("error", time.perf_counter() - started)
        view.result = self.result = result
        view.state = "done"
        self.complete = view
        if not self.push(view):  # a metric this sweep had to drop: say so, never a stale picture
            self.errors["metric"] = self.unavailable(host.metric) or f"metric {host.metric!r} is not available"
        self.exact_seconds[inputs["site"]] = time.perf_counter() - started
        host.finished("done", time.perf_counter() - started)

    def _preview_pays(self, site: str) -> bool:
        """Whether an estimate first is worth its pass: unless the last exact sweep of this site
        finished within :data:`PREVIEW_PAYS_S` (then the estimate would only delay the exact
        picture). Slow motion (``step_delay``) always shows it."""
        return self.host.step_delay > 0 or self.exact_seconds.get(site, float("inf")) >= PREVIEW_PAYS_S

    def lacks(self, metric: str) -> bool:
        """Whether the sweep on screen did not compute ``metric`` (and did not drop it): the
        widget then computes it on demand (:func:`sweep_metrics`)."""
        view = self.view
        source = None if view is None else view.result if view.result is not None else view.estimate
        return source is not None and metric not in source.metrics and metric not in self.dropped

    def _estimate(self, view: View, cancel: threading.Event) -> None:
        """Stage 1: paint the attribution-patching estimate of every cell, if AtP can make one.

        Only the metric on screen is estimated (one backward pass). Anything AtP refuses or
        fails on skips the preview; ``self.preview_skipped`` keeps the reason.
        """
        host, inputs = self.host, view.inputs
        metric = host.metric
        if not METRICS[metric].differentiable:
            self.preview_skipped = f"metric {metric!r} has no gradient"
            return
        try:
            rows = inputs.get("dataset") or []
            estimate = attribution_patch(
                host.model, [r[0] for r in rows] if rows else inputs["clean"],
                [r[1] for r in rows] if rows else inputs["corrupted"],
                answers=[(r[2], r[3]) for r in rows] if rows else (inputs["correct"], inputs["incorrect"]),
                site=inputs["site"], direction=inputs["direction"], metrics=[metric])
        except Exception as err:  # an estimate is optional: the exact sweep reports input errors
            self.preview_skipped = f"{type(err).__name__}: {err}"
            return
        if cancel.is_set():
            return
        view.estimate = estimate
        self.push(view)
