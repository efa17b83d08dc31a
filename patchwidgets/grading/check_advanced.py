"""Checks for 07_path_patching and 08_attribution_patching."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ._common import (ATOL, GradingError, SweepSetup, call_learner, copy_cache, library_grid, report_pass,
                      run_sweep_check, sweep_setup, to_tensor)


# ---------------------------------------------------------------------------------------------
# 07_path_patching
# ---------------------------------------------------------------------------------------------

_CORRUPTED_CACHES: dict[int, Any] = {}


def _corrupted_cache(setup: SweepSetup) -> Any:
    key = id(setup)
    if key not in _CORRUPTED_CACHES:
        with torch.no_grad():
            _, _CORRUPTED_CACHES[key] = setup.model.run_with_cache(setup.batch.corrupted_tokens)
    return _CORRUPTED_CACHES[key]


def _answers(setup: SweepSetup) -> torch.Tensor:
    return torch.stack([setup.batch.correct_ids, setup.batch.incorrect_ids], 1)


def _library_path(setup: SweepSetup, sender: tuple[int, int], **kwargs) -> float:
    from ..path_patching import path_patch

    b = setup.batch
    result = path_patch(setup.model, b.clean_tokens, b.corrupted_tokens, answers=_answers(setup),
                        senders=[sender], metrics="normalized", progress=False, **kwargs)
    return float(result.grid("normalized")[0])


def _scalar(name: str, value: Any) -> float:
    t = to_tensor(name, value)
    if t.numel() != 1:
        raise GradingError(f"{name}: return one number (the metric of the patched run), got shape {tuple(t.shape)}")
    return float(t)


def check_path_patch_to_logits(path_patch_to_logits: Callable, model: Any = None) -> None:
    """``path_patch_to_logits(model, corrupted_tokens, clean_cache, corrupted_cache, sender, metric,
    freeze_mlps=False) -> scalar``: the path from one sender head to the logits."""
    name = "path_patch_to_logits"
    setup = sweep_setup(model)
    corrupted_cache = _corrupted_cache(setup)
    for sender in [(0, 0), (1, 5), (2, 1)]:
        for freeze in (False, True):
            model, tokens, clean_cache, metric = setup.learner_args()
            with torch.no_grad(), setup.guard(name):
                got = _scalar(name, call_learner(name, path_patch_to_logits, model, tokens, clean_cache,
                                          copy_cache(corrupted_cache), sender, metric, freeze_mlps=freeze))
            expected = _library_path(setup, sender, freeze_mlps=freeze)
            if not math.isclose(got, expected, abs_tol=ATOL):
                hint = ""
                plain = float(library_grid(setup, "head_out")[sender])
                if math.isclose(got, plain, abs_tol=ATOL):
                    hint = (" That is plain activation patching of the head: freeze every *other* head's "
                            "output to the corrupted run, so its effect cannot travel through them.")
                elif freeze and math.isclose(got, _library_path(setup, sender), abs_tol=ATOL):
                    hint = " With freeze_mlps=True the MLP outputs must be frozen to the corrupted run too."
                raise GradingError(f"{name}: sender L{sender[0]}H{sender[1]}, freeze_mlps={freeze}: expected "
                                   f"{expected:.4f}, got {got:.4f}.{hint}")
    report_pass(name, "matches patchwidgets.path_patch(receivers=None) with and without frozen MLPs")


NAME_MOVERS = [(1, 0), (1, 1), (1, 3), (1, 5), (1, 7)]


def check_path_patch_to_queries(path_patch_to_queries: Callable, model: Any = None) -> None:
    """``path_patch_to_queries(model, corrupted_tokens, clean_cache, corrupted_cache, sender, receivers,
    metric) -> scalar``: the path from one sender head to the receivers' queries."""
    name = "path_patch_to_queries"
    setup = sweep_setup(model)
    corrupted_cache = _corrupted_cache(setup)
    for sender, receivers in [((0, 0), NAME_MOVERS), ((0, 3), NAME_MOVERS), ((0, 0), [(1, 5)]),
                              ((1, 5), NAME_MOVERS)]:
        model, tokens, clean_cache, metric = setup.learner_args()
        with torch.no_grad(), setup.guard(name):
            got = _scalar(name, call_learner(name, path_patch_to_queries, model, tokens, clean_cache,
                                      copy_cache(corrupted_cache), sender, list(receivers), metric))
        expected = _library_path(setup, sender, receivers=list(receivers), receiver_input="q")
        if not math.isclose(got, expected, abs_tol=ATOL):
            hint = ""
            if math.isclose(got, _library_path(setup, sender), abs_tol=ATOL):
                hint = (" That is the path to the logits: in step 2, run the corrupted prompt again with "
                        "only the receivers' queries replaced, and let everything else recompute.")
            raise GradingError(
                f"{name}: sender L{sender[0]}H{sender[1]} -> queries of "
                f"{', '.join(f'L{l}H{h}' for l, h in receivers)}: expected {expected:.4f}, got {got:.4f}.{hint}")
    report_pass(name, "matches patchwidgets.path_patch(receivers=..., receiver_input='q')")


# ---------------------------------------------------------------------------------------------
# 08_attribution_patching
# ---------------------------------------------------------------------------------------------

def _library_attribution(setup: SweepSetup, site: str) -> torch.Tensor:
    from ..attribution import attribution_patch

    b = setup.batch
    result = attribution_patch(setup.model, b.clean_tokens, b.corrupted_tokens, answers=_answers(setup),
                               site=site, metrics="normalized")
    return result.grid("normalized")


def _run_attribution_exercise(name: str, fn: Callable, setup: SweepSetup) -> Any:
    try:
        with torch.enable_grad(), setup.guard(name):
            return call_learner(name, fn, *setup.learner_args())
    finally:
        setup.model.zero_grad(set_to_none=True)


def check_attribution_head_out(attribution_head_out: Callable, model: Any = None) -> None:
    """``attribution_head_out(model, corrupted_tokens, clean_cache, metric) -> [layer, head]``."""
    _check_attribution("attribution_head_out", attribution_head_out, model, "head_out", ("layer", "head"))


def check_attribution_resid_pre(attribution_resid_pre: Callable, model: Any = None) -> None:
    """``attribution_resid_pre(model, corrupted_tokens, clean_cache, metric) -> [layer, pos]``."""
    _check_attribution("attribution_resid_pre", attribution_resid_pre, model, "resid_pre", ("layer", "pos"))


def _check_attribution(name: str, fn: Callable, model: Any, site: str, axes: tuple[str, ...]) -> None:
    run_sweep_check(name, fn, model, site, axes, [
        ("return the exact patching result instead of the gradient estimate",
         lambda setup, _: library_grid(setup, site)),
        ("use (corrupted - clean) instead of (clean - corrupted) as the change", lambda _, expected: -expected),
    ], run=_run_attribution_exercise, library=_library_attribution,
        library_name="patchwidgets.attribution_patch", atol=1e-4)


# ---------------------------------------------------------------------------------------------
# 07_path_patching: the circuit's edges, from the evidence
# ---------------------------------------------------------------------------------------------

Edge = tuple[tuple[int, int], Any, float]


def reference_circuit_edges(model: Any, clean_tokens: torch.Tensor, corrupted_tokens: torch.Tensor,
                            answers: torch.Tensor, heads: list[tuple[int, int]], threshold: float,
                            receiver_input: str = "q", freeze_mlps: bool = False, signed: bool = False) -> list[Edge]:
    """The edges of a candidate circuit, from path patching (denoising, normalised metric).

    ``(head, "logits", value)`` for each head's path to the logits, and ``(sender, receiver,
    value)`` for the path from a head into the ``receiver_input`` of a head of ``heads`` in a later
    layer; kept when ``|value| >= threshold`` (``value >= threshold`` with ``signed=True``, the
    mistake the check names), strongest first. The keyword arguments other than ``threshold`` give
    the wrong answers the check recognises.
    """
    from ..path_patching import path_patch

    def paths(senders: list, **kwargs) -> list[float]:
        result = path_patch(model, clean_tokens, corrupted_tokens, answers=answers, senders=senders,
                            metrics="normalized", progress=False, **kwargs)
        return [float(v) for v in result.grid("normalized").reshape(-1)]

    heads = [tuple(h) for h in heads]
    edges = list(zip(heads, ["logits"] * len(heads), paths(heads, freeze_mlps=freeze_mlps)))
    for receiver in heads:
        senders = [h for h in heads if h[0] < receiver[0]]
        if senders:
            values = paths(senders, receivers=[receiver], receiver_input=receiver_input, freeze_mlps=freeze_mlps)
            edges += [(s, receiver, v) for s, v in zip(senders, values)]
    kept = [e for e in edges if (e[2] if signed else abs(e[2])) >= threshold]
    return sorted(kept, key=lambda e: -abs(e[2]))


#: The candidate circuit the check passes: toy-ioi's main head, its layer-1 name movers, and L0H2,
#: whose path to the logits is negative (about -0.01 on the check's batch), so that a signed
#: threshold shows. The threshold keeps a margin of 0.002 from every path of these heads.
CIRCUIT_HEADS = [(0, 0), (0, 2), (1, 0), (1, 1), (1, 3), (1, 5), (1, 7)]
CIRCUIT_THRESHOLD = 0.008


def _edge_name(edge: tuple) -> str:
    sender, receiver = edge[0], edge[1]
    to = "logits" if receiver == "logits" else f"L{receiver[0]}H{receiver[1]} (queries)"
    return f"L{sender[0]}H{sender[1]} -> {to}"


def _as_edges(name: str, got: Any) -> dict[tuple, float]:
    if not isinstance(got, (list, tuple, set)):
        raise GradingError(f"{name}: return a list of (sender, receiver, value) tuples, got {type(got).__name__}")
    edges = {}
    for item in got:
        try:
            sender, receiver, value = item
            sender = (int(sender[0]), int(sender[1]))
            receiver = "logits" if isinstance(receiver, str) and receiver.strip().lower() == "logits" else \
                (int(receiver[0]), int(receiver[1]))
            value = float(to_tensor(name, value).reshape(-1)[0])
        except (TypeError, ValueError, IndexError, GradingError):
            raise GradingError(f"{name}: each edge is a tuple (sender, receiver, value) with sender = (layer, head) "
                               f"and receiver = (layer, head) or 'logits'; got {item!r}") from None
        edges[(sender, receiver)] = value
    return edges


def _same_edges(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(math.isclose(a[e], b[e], abs_tol=ATOL) for e in a)


def _circuit_args(setup: SweepSetup) -> tuple:
    """``(clean_tokens, corrupted_tokens, answers, heads)``: what the check passes, before the threshold."""
    b = setup.batch
    return b.clean_tokens, b.corrupted_tokens, _answers(setup), list(CIRCUIT_HEADS)


def _reference_edges(setup: SweepSetup, threshold: float = CIRCUIT_THRESHOLD, **kwargs) -> dict:
    """``{(sender, receiver): value}`` from :func:`reference_circuit_edges` on the setup's batch.

    Six ``path_patch`` calls for each set of arguments (the right answer and each known wrong
    one), which every run of the check would otherwise repeat: kept in the setup's
    :attr:`~SweepSetup.memos` while the model's weights are the setup's; a model changed since
    has them computed afresh, and not kept."""
    key = ("circuit_edges", threshold, tuple(sorted(kwargs.items())))
    unchanged = not setup.changed_weights()
    if unchanged and key in setup.memos:
        return dict(setup.memos[key])
    edges = {(s, r): v for s, r, v in reference_circuit_edges(setup.model, *_circuit_args(setup), threshold, **kwargs)}
    if unchanged:
        setup.memos[key] = dict(edges)
    return edges


def check_circuit_edges(circuit_edges: Callable, model: Any = None) -> None:
    """``circuit_edges(model, clean_tokens, corrupted_tokens, answers, heads, threshold) -> list of
    (sender, receiver, value)``: see :func:`reference_circuit_edges`."""
    name = "circuit_edges"
    setup = sweep_setup(model)
    args = (*_circuit_args(setup), CIRCUIT_THRESHOLD)
    with torch.no_grad(), setup.guard(name):
        # (Never memoised: the learner's function runs on every check.)
        got = _as_edges(name, call_learner(name, circuit_edges, setup.model, *(a.clone() if isinstance(a, torch.Tensor)
                                                                             else a for a in args)))

    def edges(threshold: float = CIRCUIT_THRESHOLD, **kwargs) -> dict:
        return _reference_edges(setup, threshold, **kwargs)

    expected = edges()
    if _same_edges(got, expected):
        report_pass(name, f"{len(expected)} edges match path_patch to the logits and to the queries")
        return

    def total_effect() -> dict:
        grid = library_grid(setup, "head_out")
        return {e: (float(grid[e[0]]) if e[1] == "logits" else v) for e, v in edges(threshold=-1.0).items()
                if abs(float(grid[e[0]]) if e[1] == "logits" else v) >= CIRCUIT_THRESHOLD}

    known = [
        ("compare the signed value with the threshold: every edge with a negative value is missing. A path that "
         "pushes against the answer is part of the circuit too (a negative component): keep |value| >= threshold",
         lambda: edges(signed=True)),
        ("take each head's total effect (activation patching) for its edge to the logits; the edge is its path "
         "to the logits, path_patch(..., senders=heads) with receivers=None", total_effect),
        ("freeze the MLPs; this exercise recomputes them (the default, freeze_mlps=False)",
         lambda: edges(freeze_mlps=True)),
        ("patch the receivers' keys or values instead of their queries (receiver_input='q')",
         lambda: edges(receiver_input="k")),
        ("patch the receivers' values instead of their queries (receiver_input='q')",
         lambda: edges(receiver_input="v")),
    ]
    where = f"heads {', '.join(f'L{l}H{h}' for l, h in CIRCUIT_HEADS)}, threshold {CIRCUIT_THRESHOLD}"
    missing = [e for e in expected if e not in got]
    extra = [e for e in got if e not in expected]
    wrong = [e for e in expected if e in got and not math.isclose(got[e], expected[e], abs_tol=ATOL)]
    parts = []
    if missing:
        parts.append("missing " + ", ".join(f"{_edge_name(e)} ({expected[e]:.3f})" for e in missing))
    if extra:
        parts.append("unexpected " + ", ".join(f"{_edge_name(e)} ({got[e]:.3f})" for e in extra))
    if wrong:
        parts.append(f"{len(wrong)} value(s) differ, first {_edge_name(wrong[0])}: expected {expected[wrong[0]]:.4f}, "
                     f"got {got[wrong[0]]:.4f}")
    lines = [f"{name} ({where}): " + "; ".join(parts) + "."]
    for why, make in known:
        if _same_edges(got, make()):
            lines.append(f"Your edges match what you get when you {why}.")
            break
    else:
        if any(r != "logits" and s[0] >= r[0] for s, r in extra):
            lines.append("A head can send only to heads in later layers: take the senders from earlier layers.")
        elif any(s not in CIRCUIT_HEADS or (r != "logits" and r not in CIRCUIT_HEADS) for s, r in extra):
            lines.append("Only the candidate heads (`heads`) are senders and receivers.")
    raise GradingError("\n".join(lines))
