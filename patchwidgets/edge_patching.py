"""Exact edge patching: run the model with a set of edges patched, and how faithful a circuit is.

Patching edge ``u -> v`` (:mod:`patchwidgets.edges`) changes ``v``'s input, and nothing
else, as if ``u``'s output were the source run's: in the run being patched (the *target*:
corrupted when denoising, clean when noising, as in :func:`patchwidgets.patch`), every
receiver's input becomes::

    x_v  +  sum over patched edges u -> v of  (a_u^source - a_u^now)

where ``x_v`` is the input ``v`` would have read in this very pass and ``a_u^now`` is ``u``'s
output in this pass. So a patched edge carries the source's value, every other edge carries
what its sender computes *now* (its own inputs may have been patched upstream), and effects
travel along the kept edges: nothing is linearised. With every edge patched each receiver
reads exactly the source run's input, and the pass gives the source run; with none, the
target run (``tests/test_edges.py`` checks both to 1e-5, and single head -> logits edges
against :func:`patchwidgets.path_patch`).

Circuits and faithfulness
-------------------------
A *circuit* is a set of edges. Its **faithfulness** (Hanna et al. 2024) is the share of the
clean-corrupted difference it keeps when every edge *outside* it carries the corrupted run's
value (the clean run, noising every other edge)::

    faithfulness = (M(circuit) - M(corrupted)) / (M(clean) - M(corrupted))

1 for the whole graph, 0 for the empty circuit. :func:`faithfulness_curve` computes it for the
top ``k`` edges of one or several :class:`~patchwidgets.edge_attribution.EdgeScores`, for many
``k`` at once.

Speed
-----
As in the engine (:mod:`patchwidgets.engine`), several variants (edge sets) share a forward
pass, each owning ``batch`` rows, and a pass resumes at the first layer whose input any of them
patches and skips the positions before the first one where the prompts differ (every sender's
output is the same in both runs there). Answer logits only are unembedded. The differences
``a_u^source - a_u^now`` are kept for every sender of a pass (``[rows, positions, senders,
d_model]``, float32), which bounds the rows of one pass: :data:`DELTA_BYTES`. A receiver hook
adds them with one ``einsum`` over the variants' edge masks.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import pandas as pd
import torch

from .driver import DEFAULT_CACHE_BYTES, pair_groups
from .edge_attribution import EdgeScores
from .edge_hooks import ReceiverHook, Senders, check_model, receiver_hooks, sender_hook_names, split_inputs, verify
from .edges import Edge, Graph
from .errors import DegenerateNormalizationError, PatchingInputError
from .inputs import Prompts
from .metrics import check_normalization
from .sweep import Measure, Request, cached_bytes_per_pair, prepare_request, run_unpatched

__all__ = ["edge_patch", "edge_patches", "faithfulness", "faithfulness_curve", "DELTA_BYTES"]

#: Memory budget for one pass's sender differences (``[rows, positions, senders, d_model]``).
DELTA_BYTES = 256 * 2**20


def edge_patch(model: Any, clean: Prompts, corrupted: Prompts | None = None, answers: Any = None, *,
               edges: Any, metric: Any = "logit_diff", direction: str = "denoising", complement: bool = False,
               max_batch_tokens: int = 4096) -> float:
    """The mean ``metric`` over prompt pairs with ``edges`` patched, exactly (module docstring).

    Args:
        model, clean, corrupted, answers, metric, direction: as in :func:`patchwidgets.patch`
            (one metric; ``normalized`` is 0 for the target run and 1 for the source run).
        edges: :class:`~patchwidgets.edges.Edge` objects or edge names (``"a0.h1->a2.h3<q>"``), or
            a ``[n_edges]`` bool mask. Head inputs written without ``<q>``/``<k>``/``<v>`` mean the
            graph with one input per head.
        complement: patch every edge *except* ``edges``.
        max_batch_tokens: rows x positions of one forward pass.
    """
    return edge_patches(model, clean, corrupted, answers, edge_sets=[edges], metric=metric, direction=direction,
                        complement=complement, max_batch_tokens=max_batch_tokens)[0]


def edge_patches(model: Any, clean: Prompts, corrupted: Prompts | None = None, answers: Any = None, *,
                 edge_sets: Sequence[Any], metric: Any = "logit_diff", direction: str = "denoising",
                 complement: bool = False, max_batch_tokens: int = 4096) -> list[float]:
    """:func:`edge_patch` for several sets of edges at once (sharing passes): one value per set."""
    if isinstance(edge_sets, (str, Edge, torch.Tensor)) or not isinstance(edge_sets, Sequence) or not edge_sets:
        raise PatchingInputError("edge_sets must be a non-empty list of edge sets (each a list of edges or a mask)",
                                 "edges")
    request, name = _request(model, clean, corrupted, answers, metric, direction, "edge_patch")
    graph = _graph_for(model, edge_sets)
    masks = torch.stack([graph.mask(edges) for edges in edge_sets])
    if not isinstance(complement, bool):
        raise PatchingInputError(f"complement must be True or False, got {complement!r}", "edges")
    values, _ = _patched(model, request, graph, ~masks if complement else masks, max_batch_tokens)
    return values[name].double().mean(-1).tolist()


def faithfulness(model: Any, clean: Prompts, corrupted: Prompts | None = None, answers: Any = None, *,
                 circuit: Any, metric: Any = "logit_diff", max_batch_tokens: int = 4096) -> float:
    """The share of ``M(clean) - M(corrupted)`` that ``circuit`` keeps with every other edge
    patched to the corrupted run (module docstring): 1 for every edge, 0 for none."""
    request, name = _request(model, clean, corrupted, answers, metric, "noising", "faithfulness")
    graph = _graph_for(model, [circuit])
    return _faithfulness(model, request, name, graph, graph.mask(circuit)[None], max_batch_tokens)[0][0]


def faithfulness_curve(model: Any, clean: Prompts, corrupted: Prompts | None = None, answers: Any = None, *,
                       scores: Any, ks: Sequence[int], metric: Any = "logit_diff",
                       max_batch_tokens: int = 4096) -> pd.DataFrame:
    """Faithfulness of the top ``k`` edges by ``|score|``, for every ``k`` in ``ks``.

    ``scores``: an :class:`~patchwidgets.edge_attribution.EdgeScores`, or several (a list, or
    a dict naming them) to set methods side by side; all points of all of them share forward
    passes. Returns a frame with one row per point: ``k``, ``faithfulness``, ``value`` (the mean
    metric with that circuit) and ``method`` (the dict's key, or the scores' method).
    """
    named = _named_scores(scores)
    ks = _ks(ks, next(iter(named.values())).graph.n_edges)
    request, name = _request(model, clean, corrupted, answers, metric, "noising", "faithfulness_curve")
    graph = next(iter(named.values())).graph
    for label, s in named.items():
        if not _same_graph(s.graph, Graph.from_model(model, s.graph.qkv)) or not _same_graph(s.graph, graph):
            raise PatchingInputError(f"the scores {label!r} ({s.graph}) do not belong to this model's graph "
                                     f"({Graph.from_model(model, s.graph.qkv)}), or not to the same graph as the "
                                     "others", "scores")
    masks = torch.stack([s.mask(k) for s in named.values() for k in ks])
    faith, values = _faithfulness(model, request, name, graph, masks, max_batch_tokens)
    labels = [label for label in named for _ in ks]
    return pd.DataFrame({"k": ks * len(named), "faithfulness": faith, "value": values, "method": labels})


# ---------------------------------------------------------------------------- arguments
def _request(model: Any, clean: Any, corrupted: Any, answers: Any, metric: Any, direction: Any,
             what: str) -> tuple[Request, str]:
    check_model(model, what)
    request = prepare_request(model, clean, corrupted, answers, "denoising" if direction is None else direction,
                              metric)
    if len(request.metric_fns) != 1:
        raise PatchingInputError(f"{what} measures one metric at a time, got {list(request.metric_fns)}", "metrics")
    return request, next(iter(request.metric_fns))


def _graph_for(model: Any, edge_sets: Sequence[Any]) -> Graph:
    """The graph the edges are written for: one input per head if a head's input is ``"in"``
    (or a mask has that graph's length), else q/k/v inputs."""
    graph = Graph.from_model(model)
    for edges in edge_sets:
        if isinstance(edges, torch.Tensor):
            if edges.ndim == 1 and len(edges) != graph.n_edges and graph.n_kv_heads == graph.n_heads:
                return Graph.from_model(model, qkv=False)
            continue
        for edge in [edges] if isinstance(edges, (str, Edge)) else edges:
            edge = Edge.parse(edge) if isinstance(edge, str) else edge
            if isinstance(edge, Edge) and edge.input == "in" and edge.receiver.startswith("a"):
                return Graph.from_model(model, qkv=False)
    return graph


def _same_graph(a: Graph, b: Graph) -> bool:
    return (a.n_layers, a.n_heads, a.n_kv_heads, a.qkv, a.attn_only, a.parallel_attn_mlp) == \
        (b.n_layers, b.n_heads, b.n_kv_heads, b.qkv, b.attn_only, b.parallel_attn_mlp)


def _named_scores(scores: Any) -> dict[str, EdgeScores]:
    if isinstance(scores, EdgeScores):
        return {scores.method: scores}
    items = list(scores.items()) if isinstance(scores, Mapping) else \
        [(getattr(s, "method", None), s) for s in scores] if isinstance(scores, (list, tuple)) else None
    if not items or not all(isinstance(s, EdgeScores) for _, s in items):
        raise PatchingInputError("scores must be EdgeScores (from patchwidgets.edge_attribution), or a list or dict "
                                 f"of them; got {type(scores).__name__}", "scores")
    named: dict[str, EdgeScores] = {}
    for label, s in items:
        label = str(label)
        while label in named:  # (two runs of one method in a list: eap, eap (2))
            label = f"{label} ({sum(k.startswith(str(s.method)) for k in named) + 1})"
        named[label] = s
    return named


def _ks(ks: Any, n_edges: int) -> list[int]:
    if isinstance(ks, (str, bytes)) or not isinstance(ks, Sequence) and not isinstance(ks, range) or not len(ks):
        raise PatchingInputError(f"ks must be a non-empty list of edge counts, got {ks!r}", "ks")
    out = []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n_edges:
            raise PatchingInputError(f"every k must be an integer from 0 to {n_edges} (the number of edges), "
                                     f"got {k!r}", "ks")
        out.append(int(k))
    return out


# ---------------------------------------------------------------------------- faithfulness
def _faithfulness(model: Any, request: Request, name: str, graph: Graph, circuits: torch.Tensor,
                  max_batch_tokens: int) -> tuple[list[float], list[float]]:
    """Faithfulness and mean metric of each circuit (``[n, n_edges]`` bool), on a noising request."""
    values, measure = _patched(model, request, graph, ~circuits, max_batch_tokens)
    clean = measure.baselines["clean"][name].double().mean()
    corrupted = measure.baselines["corrupted"][name].double().mean()
    ctx = measure.ctx
    if ctx.target_logit_diff is not None and ctx.source_logit_diff is not None \
            and request.metric_fns[name] in ("logit_diff", "normalized"):
        check_normalization(ctx.target_logit_diff.cpu(), ctx.source_logit_diff.cpu())
    elif not float((clean - corrupted).abs()) > 1e-6 * (1.0 + float(clean.abs() + corrupted.abs())):
        raise DegenerateNormalizationError(
            f"cannot measure faithfulness: the metric {name!r} is the same on the clean and corrupted runs "
            f"({float(clean):.4g} and {float(corrupted):.4g}), so there is no difference for a circuit to keep")
    means = values[name].double().mean(-1)
    return ((means - corrupted) / (clean - corrupted)).tolist(), means.tolist()


# ---------------------------------------------------------------------------- the passes
def _patched(model: Any, request: Request, graph: Graph, patched: torch.Tensor,
             max_batch_tokens: int) -> tuple[dict[str, torch.Tensor], Measure]:
    """``({metric: [variants, pairs]}, measure)``: the metrics with each variant's edges
    (``patched[i]``, ``[variants, n_edges]`` bool) patched."""
    if isinstance(max_batch_tokens, bool) or not isinstance(max_batch_tokens, int) or max_batch_tokens < 1:
        raise PatchingInputError(f"max_batch_tokens must be a positive integer, got {max_batch_tokens!r}", "model")
    columns, request = request.answer_columns()
    inputs = request.inputs
    verify(model, graph, inputs.clean_tokens[:1])
    names = sender_hook_names(graph)
    senders = Senders(model, graph)
    hooks = receiver_hooks(graph)
    groups = pair_groups(inputs.batch, cached_bytes_per_pair(model, inputs.seq_len, names), DEFAULT_CACHE_BYTES)
    targets, sources, patched_logits = [], [], []
    for rows in groups:
        group = request.rows(rows)
        runs = run_unpatched(model, group, names, max_batch_tokens, columns)
        assert runs.source_logits is not None
        targets.append(runs.target_logits)
        sources.append(runs.source_logits)
        patched_logits.append(_Passes(runs, senders, graph, hooks, group, max_batch_tokens).run(patched))
    measure = request.measure(torch.cat(targets), torch.cat(sources))
    return measure(torch.cat(patched_logits, 1)), measure


class _Passes:
    """The patched passes of one group of pairs, variants stacked on the batch axis."""

    def __init__(self, runs: Any, senders: Senders, graph: Graph, hooks: list[ReceiverHook], request: Request,
                 max_batch_tokens: int):
        self.runs, self.senders, self.graph, self.hooks = runs, senders, graph, hooks
        inputs = request.inputs
        self.batch, self.seq_len = inputs.batch, inputs.seq_len
        changed = request.changed.nonzero()
        first = int(changed[0]) if len(changed) else inputs.seq_len
        self.offset = min(first, int(inputs.answer_pos.min()))
        self.source = senders.all(runs.source_acts)                  # [batch, pos, senders, d_model]
        self.fixed = self.source - senders.all(runs.target_acts)     # source - target, before any patch
        self.max_batch_tokens = max_batch_tokens
        # The layer each receiver slot reads in (the logits: the last block's output).
        self.slot_layer = torch.tensor([min(s.node.layer, graph.n_layers - 1) for s in graph.slots])

    def run(self, patched: torch.Tensor) -> torch.Tensor:
        """Answer logits ``[variants, batch, columns]``."""
        out = self.runs.target_logits[None].repeat(patched.shape[0], 1, 1)
        layers = self.slot_layer[self.graph.edge_slot]
        # The layer each variant's pass starts at: its first patched receiver's (variants
        # patching nothing keep the target's logits).
        start = {v: int(layers[p].min()) for v, p in enumerate(patched) if p.any()}
        todo = sorted(start, key=start.__getitem__)
        positions = self.seq_len - self.offset
        row_bytes = positions * len(self.graph.senders) * self.source.shape[-1] * 4   # one row's differences
        k_max = max(1, min(self.max_batch_tokens // (self.batch * positions), DELTA_BYTES // (self.batch * row_bytes)))
        for i in range(0, len(todo), k_max):
            chunk = todo[i:i + k_max]
            layer = min(start[v] for v in chunk)
            hooks = self._hooks(patched[chunk].float(), layer)
            with split_inputs(self.runs.target.model):
                logits = self.runs.target.run_pass(layer, self.offset, len(chunk), hooks)
            out[chunk] = logits.reshape(len(chunk), self.batch, -1).to(out.device, out.dtype)
        return out

    def _hooks(self, masks: torch.Tensor, start: int) -> list:
        """The hooks of one pass of ``k`` variants resumed at block ``start``: senders of
        ``start`` on record their difference from the source, receivers add their patched
        edges' differences."""
        graph, k, batch = self.graph, masks.shape[0], self.batch
        state: dict[str, torch.Tensor] = {}
        source, fixed = self.source, self.fixed

        def buffer(n: int, device: torch.device) -> torch.Tensor:
            """``[k * batch, n, senders, d_model]``: source - now for every sender, over the
            last ``n`` positions (those the pass computes); before ``start``, nothing has
            changed yet, so the unpatched difference."""
            if "delta" not in state:
                before = graph.first_sender(start)
                delta = torch.empty(k * batch, n, len(graph.senders), fixed.shape[-1], device=device)
                delta[:, :, :before] = fixed[:, -n:, :before].to(device).repeat(k, 1, 1, 1)
                state["delta"] = delta
            return state["delta"]

        def heads(layer: int):
            first = graph.first_sender(layer)
            span = slice(first, first + graph.n_heads)

            def hook(z: torch.Tensor, hook) -> None:
                now = self.senders.heads(layer, z)
                delta = buffer(z.shape[1], now.device)
                delta[:, :, span] = source[:, -z.shape[1]:, span].to(now.device).repeat(k, 1, 1, 1) - now
            return hook

        def mlp(layer: int):
            index = graph.first_sender(layer) + graph.n_heads

            def hook(out: torch.Tensor, hook) -> None:
                delta = buffer(out.shape[1], out.device)
                delta[:, :, index] = source[:, -out.shape[1]:, index].to(out.device).repeat(k, 1, 1) - out.float()
            return hook

        def receiver(rh: ReceiverHook, block: torch.Tensor):
            def hook(act: torch.Tensor, hook) -> torch.Tensor:
                n = act.shape[1]
                delta = buffer(n, act.device)[:, :, :rh.upstream].to(act.device)
                add = torch.einsum("kbpud,ksu->kbpsd", delta.reshape(k, batch, n, rh.upstream, -1),
                                   block.to(act.device))
                add = add.reshape(k * batch, n, rh.n_slots, -1)
                return act + (add if rh.per_head else add[:, :, 0]).to(act.dtype)
            return hook

        out = []
        for layer in range(start, graph.n_layers):
            out.append((f"blocks.{layer}.attn.hook_z", heads(layer)))
            if not graph.attn_only:
                out.append((f"blocks.{layer}.hook_mlp_out", mlp(layer)))
        for rh in self.hooks:
            first = graph.first_edge(rh.first_slot)
            block = masks[:, first:first + rh.n_slots * rh.upstream].reshape(k, rh.n_slots, rh.upstream)
            if rh.layer >= start and bool(block.any()):
                out.append((rh.name, receiver(rh, block)))
        return out
