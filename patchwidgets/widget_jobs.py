"""The widget's background work: one job thread, and the sweep job that runs on it.

:class:`JobRunner` is the single daemon thread that owns the model, so the notebook never
blocks and two forward passes never overlap (patching hooks the model; a second pass at
the same time would see the hooks).

:class:`SweepJobs` is the part of :class:`~patchwidgets.widget.PatchingWidget` that runs a
sweep on that thread. One sweep has up to two stages:

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
from typing import Any, Callable

from .attribution import attribution_patch
from .errors import DegenerateNormalizationError, PatchingCancelled
from .metrics import BUILTIN_METRICS, METRICS
from .patching import patch
from .path_patching import path_patch
from .widget_state import INPUT_FIELDS, WIDGET_SITES, heatmap_payload

#: What a sweep reads from the widget when it starts.
SWEEP_FIELDS = (*INPUT_FIELDS, "direction", "site", "receivers", "receiver_input")
#: The receiver inputs the page offers (the core accepts any combination of q, k, v).
RECEIVER_INPUTS = ("q", "k", "v", "kv", "qkv")

_HEAD = re.compile(r"^l?(\d+)(?:[.:]|h)(\d+)$", re.IGNORECASE)


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

    def __init__(self, priority: tuple[str, ...], on_error: Callable[[str, BaseException], Any]):
        self.priority = priority
        self.on_error = on_error
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


class SweepJobs:
    """The sweep job of :class:`~patchwidgets.widget.PatchingWidget` (a mixin).

    It reads and writes the widget's traitlets and runs on the job thread, except
    :meth:`_push`, which the kernel thread also calls to redraw in another metric. The
    heatmap always shows ``self._view``: a new sweep takes the screen with its first
    picture (the estimate or the first exact chunk); a sweep that fails before that
    leaves the last good heatmap where it was, and a sweep cancelled because a newer Run
    replaced it gives the screen back to the last complete sweep (``self._complete``).

    Every picture is taken under the widget's sync lock from one snapshot of the view (its
    values, done/total and state together), so pushes from the two threads never mix.
    """

    def _push(self, view: View | None = None) -> None:
        """Show ``view`` (default: the view on screen) in the current metric."""
        with self._sync_lock:
            view = self._view if view is None else view
            source = None if view is None else view.result if view.result is not None else view.estimate
            if source is None or self.metric not in source.metrics:
                return
            payload = heatmap_payload(view.result, self.metric, view.inputs, view.run_id,
                                      estimate=view.estimate, state=view.state)
            shown = self.heatmap or {}
            layout = ("site", "rows", "cols", "path")
            moved = any(shown.get(k) != payload.get(k) for k in layout)
            with self.hold_sync():
                self._view = view
                if moved and self.selected:  # a cell of another layout: nobody clicked it
                    self.selected, self.explanation = {}, ""
                self.heatmap = payload
                self.progress = [payload["done"], payload["total"]]
            if self.selected:
                self._on_selected({"new": self.selected})

    def _pause(self, cancel: threading.Event) -> None:
        """Wait ``step_delay`` seconds (slow motion; 0 by default), or until cancelled."""
        if self.step_delay > 0:
            cancel.wait(self.step_delay)

    def _sweep(self, run_id: int) -> None:
        inputs = {name: getattr(self, name) for name in SWEEP_FIELDS}
        view = View(run_id, inputs)
        cancel = self._cancel = threading.Event()
        shown_view = self._view
        self._run_errors, self._dropped = {}, {}
        with self.hold_sync():
            self.status = "running"
            self._set_errors()
        if self._blocking_errors():  # what the preview found (same words before and after Run)
            return self._finish("error")
        if inputs["site"] not in WIDGET_SITES:
            self._run_errors["site"] = (f"the widget shows these sites: {', '.join(WIDGET_SITES)}; "
                                        f"use patchwidgets.patch() for {inputs['site']!r}")
            return self._finish("error")
        receivers = None
        if inputs["site"] == "path":
            try:
                receivers = parse_receivers(inputs["receivers"], self.model.cfg.n_layers, self.model.cfg.n_heads)
            except ValueError as err:
                self._run_errors["receivers"] = str(err)
            chosen = inputs["receiver_input"]
            if not chosen or set(chosen) - set("qkv"):
                self._run_errors["receiver_input"] = (
                    f"receiver_input must be q, k, v or a combination such as kv, got {chosen!r}")
            if self._run_errors:
                return self._finish("error")
        started, last_push = time.perf_counter(), [0.0]
        self.preview_skipped = ""
        if self.fast_preview and inputs["site"] == "path":
            self.preview_skipped = "attribution patching has no estimate for path patching"
        elif self.fast_preview:
            self._estimate(view, cancel)
            self._pause(cancel)

        def on_update(update) -> None:
            view.result = update.result
            now = time.perf_counter()
            if now - last_push[0] >= 0.1 or update.done >= update.total or self.step_delay > 0:
                last_push[0] = now
                self._push(view)
            else:
                self.progress = [update.done, update.total]
            self._jobs.service(("preview", "pattern"))  # keep edits responsive
            self._pause(cancel)

        def sweep(metrics):
            common = dict(answers=(inputs["correct"], inputs["incorrect"]), direction=inputs["direction"],
                          metrics=metrics, callback=on_update, cancel=cancel, progress=False,
                          max_batch_tokens=self.max_batch_tokens)
            if inputs["site"] == "path":
                return path_patch(self.model, inputs["clean"], inputs["corrupted"], receivers=receivers,
                                  receiver_input=inputs["receiver_input"], **common)
            return patch(self.model, inputs["clean"], inputs["corrupted"], site=inputs["site"], **common)

        try:
            metrics = list(BUILTIN_METRICS)
            try:
                result = sweep(metrics)
            except DegenerateNormalizationError as err:
                if self.metric == "normalized":
                    raise
                self._dropped["normalized"] = str(err)
                result = sweep([m for m in metrics if m != "normalized"])
        except PatchingCancelled as stop:
            if self._jobs.waiting("sweep"):  # replaced by a newer Run: back to the last complete picture
                if self._complete is not None:
                    self.result = self._complete.result
                    self._push(self._complete)
            elif stop.partial is not None:
                view.result = self.result = stop.partial
                view.state = "cancelled"
                self._push(view)
            return self._finish("cancelled", started)
        except ValueError as err:  # every input problem the core reports
            self._run_errors[self._sweep_field(err, inputs["site"])] = str(err)
            if self._view is view:  # only the estimate made it to the screen: take it back
                if shown_view is not None:
                    self._push(shown_view)
                else:
                    self._view, self.heatmap = None, {}
            return self._finish("error", started)
        view.result = self.result = result
        view.state = "done"
        if self.metric not in result.metrics:  # (a metric this sweep had to drop: say so, never a stale picture)
            self._run_errors["metric"] = (f"metric {self.metric!r} is not available for this sweep. "
                                          f"{self._dropped.get(self.metric, '')}").strip()
        self._complete = view
        self._push(view)
        self._finish("done", started)

    def _estimate(self, view: View, cancel: threading.Event) -> None:
        """Stage 1: paint the attribution-patching estimate of every cell, if AtP can make one.

        Only the metric on screen is estimated (one backward pass). Anything AtP refuses or
        fails on skips the preview; ``self.preview_skipped`` keeps the reason.
        """
        metric, inputs = self.metric, view.inputs
        if not METRICS[metric].differentiable:
            self.preview_skipped = f"metric {metric!r} has no gradient"
            return
        try:
            estimate = attribution_patch(
                self.model, inputs["clean"], inputs["corrupted"], answers=(inputs["correct"], inputs["incorrect"]),
                site=inputs["site"], direction=inputs["direction"], metrics=[metric])
        except Exception as err:  # an estimate is optional: the exact sweep reports input errors
            self.preview_skipped = f"{type(err).__name__}: {err}"
            return
        if cancel.is_set():
            return
        view.estimate = estimate
        self._push(view)

    def _sweep_field(self, err: BaseException, site: str) -> str:
        """The input an error of the core is about; in the path view, "site" errors are
        about the receivers (the senders are always every head)."""
        name = self._field_of(err)
        return "receivers" if site == "path" and name == "site" else name

    def _finish(self, status: str, started: float | None = None) -> None:
        with self.hold_sync():
            if started is not None:
                self.elapsed = round(time.perf_counter() - started, 4)
            self._set_errors()
            if not self._jobs.waiting("sweep"):  # a newer sweep keeps "running"
                self.status = status
