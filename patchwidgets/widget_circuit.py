"""The widget's circuit view: edge scores, and the exact checks of them, as background jobs.

Choosing the component ``"circuit"`` turns the heatmap into a graph of the model's edges
(:mod:`patchwidgets.circuit_view` draws it). Three jobs run on the widget's job thread
(:class:`~patchwidgets.widget_jobs.JobRunner`), each pass under the model's lock
(:func:`patchwidgets.sharing.exclusive`, taken by the core for every pass it makes), so a
notebook cell or another widget on the same model waits at most a pass:

* *circuit* (Run): :func:`patchwidgets.edge_attribution` scores every edge with the chosen
  ``circuit_method`` (EAP, or EAP-IG with ``circuit_steps`` steps) on the metric and direction
  on screen, and the ``circuit`` traitlet gets the strongest edges
  (:func:`~patchwidgets.circuit_view.circuit_payload`); then the kept circuit's faithfulness
  is computed at once. Cancel stops it within a block of a pass
  (:class:`~patchwidgets.watch.SweepWatch`, attached to this thread's passes only).
* *faithfulness* (the top-k slider released, or ``w.circuit_k = k``):
  :func:`patchwidgets.faithfulness` of the ``k`` edges of largest ``|score|``, exactly, into
  ``circuit_faithfulness``. A newer ``k`` cancels the one still being computed.
* *edge* (an edge clicked, or ``w.circuit_edge = name``): :func:`patchwidgets.edge_patch` with
  that one edge patched, exactly, into ``circuit_edge_patch``: the metric with the edge patched
  (``value``, what ``edge_patch`` returns) and its ``change`` from the unpatched target run (the
  same call with no edge, once per scoring run), which is what the edge's score estimates.

The checks use the prompts the scores were computed from (the payload's ``inputs``), not what
the fields hold now, so a number on screen always belongs to the graph on screen. Results are
cached per scoring run: moving the slider back to a ``k`` seen before, or clicking an edge
again, answers at once.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

from .circuit_view import circuit_payload
from .edge_attribution import edge_attribution
from .edge_patching import edge_patch, faithfulness
from .errors import PatchingCancelled
from .metrics import METRICS
from .watch import SweepWatch
from .widget_contract import CIRCUIT_METHODS


class CircuitHost(Protocol):
    """What :class:`Circuits` needs from the widget it works for."""

    model: Any
    circuit_k: int
    circuit_edge: str
    circuit_steps: int
    max_batch_tokens: int

    def circuit_inputs(self) -> dict: ...                   # widget_contract.CIRCUIT_FIELDS, as they are now
    def blocking_errors(self) -> dict: ...                  # what the preview found wrong with the inputs
    def field_of(self, err: BaseException) -> str: ...      # the input an error of the core is about
    def set_circuit(self, **traits: Any) -> None: ...       # circuit, circuit_faithfulness, circuit_edge_patch
    def started(self) -> None: ...
    def finished(self, status: str, elapsed: float | None) -> None: ...


def prompts_of(inputs: dict) -> tuple[Any, Any, Any]:
    """``(clean, corrupted, answers)`` of a job's inputs: the dataset's rows when there are any,
    else the two prompts and the answer pair."""
    rows = inputs.get("dataset") or []
    if rows:
        return [r[0] for r in rows], [r[1] for r in rows], [(r[2], r[3]) for r in rows]
    return inputs["clean"], inputs["corrupted"], (inputs["correct"], inputs["incorrect"])


class Circuits:
    """Runs the circuit view's jobs and keeps what they found (see the module docstring).

    Attributes:
        scores: the :class:`~patchwidgets.edge_attribution.EdgeScores` on screen, or ``None``.
        inputs: the inputs they were computed from.
        errors: ``{field: message}`` of the last scoring run.
    """

    def __init__(self, host: CircuitHost):
        self.host = host
        self.scores: Any = None
        self.inputs: dict = {}
        self.run_id = 0
        self.errors: dict[str, str] = {}
        self.cancel_event: threading.Event | None = None
        self._checks: dict[str, threading.Event] = {}        # kind -> cancel event of the running check
        self._faith: dict[int, dict] = {}                    # k -> {"value"}, for self.run_id
        self._edge: dict[str, dict] = {}                     # edge name -> {"value", "change"}
        self._unpatched: float | None = None                 # the metric with no edge patched
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ control
    def stop(self) -> None:
        """Cancel the scoring run (the Cancel button)."""
        if self.cancel_event is not None:
            self.cancel_event.set()

    def supersede(self, kind: str) -> None:
        """A newer check of ``kind`` is coming: cancel the one still running."""
        with self._lock:
            event = self._checks.get(kind)
        if event is not None:
            event.set()

    def edge_index(self, name: str) -> int | None:
        """The index in the graph of the edge called ``name`` (``Edge.name``), or None."""
        if self.scores is None:
            return None
        names = getattr(self, "_names", None)
        if names is None or names[0] is not self.scores:
            names = (self.scores, {str(e.name): i for i, e in enumerate(self.scores.graph.edges)})
            self._names = names
        return names[1].get(name)

    def kept(self, k: int) -> list[Any]:
        """The ``k`` edges of largest ``|score|``: ``EdgeScores.top(k)``, the edges the page draws
        (:func:`patchwidgets.circuit_view.top_k` is the same rule)."""
        return list(self.scores.top(k))

    # ------------------------------------------------------------------ the jobs (job thread)
    def run(self, run_id: int) -> None:
        """Score every edge, show the strongest, then check the kept circuit's faithfulness."""
        host = self.host
        inputs = host.circuit_inputs()
        cancel = self.cancel_event = threading.Event()
        self.errors = {}
        host.started()
        started = time.perf_counter()
        if host.blocking_errors():
            return host.finished("error", None)
        method, metric = inputs["circuit_method"], inputs["metric"]
        if method not in dict(CIRCUIT_METHODS):
            offered = " or ".join(dict(CIRCUIT_METHODS))
            self.errors["circuit_method"] = f"the circuit view scores edges with {offered}, got {method!r}"
            return host.finished("error", None)
        info = METRICS.get(metric)
        if info is not None and not info.differentiable:
            self.errors["metric"] = (f"edge attribution follows the gradient of the metric, and {metric!r} has none: "
                                     f"pick logit_diff, normalized, logit, logprob, prob or kl for the circuit view")
            return host.finished("error", None)
        clean, corrupted, answers = prompts_of(inputs)
        try:
            with SweepWatch(cancel).watching(host.model):
                scores = edge_attribution(host.model, clean, corrupted, answers, method=method,
                                          steps=host.circuit_steps, metric=metric, direction=inputs["direction"],
                                          progress=False)
        except PatchingCancelled:
            return host.finished("cancelled", time.perf_counter() - started)
        except ValueError as err:  # every input problem the core reports, next to its field
            self.errors[host.field_of(err)] = str(err)
            return host.finished("error", time.perf_counter() - started)
        with self._lock:
            self.scores, self.inputs, self.run_id = scores, inputs, run_id
            self._faith, self._edge, self._unpatched = {}, {}, None
        host.set_circuit(circuit=circuit_payload(scores, inputs, run_id), circuit_faithfulness={},
                         circuit_edge_patch={}, circuit_edge="")
        elapsed = time.perf_counter() - started
        host.finished("done", elapsed)
        self.faithfulness()

    def faithfulness(self) -> None:
        """The faithfulness of the ``circuit_k`` strongest edges (exact), into ``circuit_faithfulness``."""
        self._check("faithfulness", self.host.circuit_k)

    def edge_patch(self) -> None:
        """The exact patch of the edge ``circuit_edge`` alone, into ``circuit_edge_patch``."""
        self._check("edge", self.host.circuit_edge)

    def _check(self, kind: str, what: Any) -> None:
        host = self.host
        with self._lock:
            scores, inputs, run_id = self.scores, self.inputs, self.run_id
            cache: dict = self._faith if kind == "faithfulness" else self._edge
        field, key = ("circuit_faithfulness", "k") if kind == "faithfulness" else ("circuit_edge_patch", "edge")
        if scores is None or (kind == "edge" and not what):
            return host.set_circuit(**{field: {}})
        if kind == "faithfulness":  # (k past the graph's size keeps every edge)
            what = max(0, min(int(what), len(scores.graph.edges)))
        said = {key: what, "run_id": run_id, "metric": inputs["metric"]}
        if kind == "edge" and self.edge_index(what) is None:
            return host.set_circuit(**{field: {**said, "state": "error", "value": None,
                                               "error": f"no edge {what!r} in this graph"}})
        with self._lock:
            known = cache.get(what)
        if known is not None:
            return host.set_circuit(**{field: {**said, "state": "done", **known}})
        cancel = threading.Event()
        with self._lock:
            self._checks[kind] = cancel
        host.set_circuit(**{field: {**said, "state": "running", "value": None}})
        clean, corrupted, answers = prompts_of(inputs)
        common = dict(metric=inputs["metric"], max_batch_tokens=host.max_batch_tokens)
        try:
            with SweepWatch(cancel).watching(host.model):
                if kind == "faithfulness":
                    found = {"value": float(faithfulness(host.model, clean, corrupted, answers,
                                                         circuit=self.kept(what), **common))}
                else:
                    edge = scores.graph.edges[self.edge_index(what)]
                    patched = float(edge_patch(host.model, clean, corrupted, answers, edges=[edge],
                                               direction=inputs["direction"], **common))
                    if self._unpatched is None:  # (the target run's own value: once per scoring run)
                        self._unpatched = float(edge_patch(host.model, clean, corrupted, answers, edges=[],
                                                           direction=inputs["direction"], **common))
                    found = {"value": patched, "change": patched - self._unpatched}
        except PatchingCancelled:
            return host.set_circuit(**{field: {**said, "state": "cancelled", "value": None}})
        except ValueError as err:
            return host.set_circuit(**{field: {**said, "state": "error", "value": None, "error": str(err)}})
        finally:
            with self._lock:
                if self._checks.get(kind) is cancel:
                    del self._checks[kind]
        with self._lock:
            if self.run_id != run_id:  # (a newer scoring run replaced the graph meanwhile)
                return None
            cache[what] = found
        host.set_circuit(**{field: {**said, "state": "done", **found}})
