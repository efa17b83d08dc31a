"""Edge attribution: score every edge of the model's graph from a few backward passes.

Path patching (:func:`patchwidgets.path_patch`) measures one family of connections at a time,
exactly; the graph of GPT-2 small has 32,491 edges (:mod:`patchwidgets.edges`), far too many
to patch one by one. **Edge attribution patching** (EAP; Syed, Rager and Conmy 2023) estimates
all of them at once, to first order, like attribution patching does for nodes
(:mod:`patchwidgets.attribution`).

Patching edge ``u -> v`` replaces, in ``v``'s input only, ``u``'s output ``a_u`` in the run
being patched (the *target*) by its value in the *source* run (:mod:`patchwidgets.patching`:
denoising patches clean values into the corrupted run, noising corrupted values into the
clean run). ``v``'s input is a sum of senders' outputs, so it moves by exactly
``a_u^S - a_u^T``, and to first order the metric moves by::

    score(u -> v)  =  (a_u^S - a_u^T) · ∂M/∂x_v |_T

where ``x_v`` is ``v``'s input (before its LayerNorm) and the gradient is taken in the target
run. One forward pass of the source (its senders' outputs), one forward and one backward pass
of the target (its senders' outputs, and the gradient at every receiver's input) give every
edge's score: for each receiver, the dot products of its gradient with the differences of all
the senders before it, summed over positions and averaged over prompt pairs.

**EAP-IG** (Hanna, Pezzelle and Belinkov 2024, "Have Faith in Faithfulness") replaces the
gradient at the target by its average along a straight path between the two runs' *input
embeddings* (integrated gradients): ``steps`` passes with the residual entering block 0 set to
``e_S + (k / steps) (e_T - e_S)``, ``k = 1 .. steps`` (the last is the target run itself; as in
the authors' code, ``hannamw/EAP-IG``). The differences ``a_u^S - a_u^T`` are the two runs'
own. ``steps=1`` is EAP. A patch that moves a component far (a name mover's query, a whole
token's representation) is where the gradient at one end misleads and the path average
helps: on ``toy-ioi``, the Pearson correlation with exact single-edge patching rises from 0.72
(EAP) to 0.96 (EAP-IG, 5 steps; ``tests/test_edges.py``).

Scores are the estimated change of the metric's mean over prompt pairs, in the metric's units
(``normalized``: divided by the dataset's clean-corrupted gap, as in :func:`patchwidgets.patch`).
Check them with exact edge patching (:mod:`patchwidgets.edge_patching`).

What a pass costs
-----------------
Gradients are needed for every receiver's input but for no weight, so the backward pass asks
for the input embeddings' gradient only (no weight gradients are computed) and each
receiver's gradient is consumed where it appears (a tensor hook), never stored. The forks
(:mod:`patchwidgets.edge_hooks`) cost one LayerNorm per head and input, and the per-head
projections the usual projection's multiply-adds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import pandas as pd
import torch

from .atp import differentiated_metric, gradient_groups
from .devices import input_device
from .edge_hooks import ReceiverHook, Senders, check_model, receiver_hooks, sender_hook_names, split_inputs, verify
from .edges import Edge, Graph
from .errors import PatchingInputError
from .inputs import Prompts
from .metrics import check_normalization, logit_diff
from .sweep import Measure, Request, prepare_request

__all__ = ["edge_attribution", "EdgeScores", "METHODS"]

METHODS = ("eap", "eap-ig")


@dataclass
class EdgeScores:
    """One score per edge of ``graph`` (``scores[i]`` belongs to ``graph.edges[i]``): the
    estimated change of the mean ``metric`` when that edge alone is patched."""

    graph: Graph
    scores: torch.Tensor       # [n_edges] float32
    method: str                # "eap" or "eap-ig"
    direction: str
    metric: str
    steps: int = 1

    def frame(self) -> pd.DataFrame:
        """One row per edge (``sender``, ``receiver``, ``input``, ``score``, ``edge``: its name),
        sorted by ``|score|``, largest first."""
        order = self._order()
        edges = [self.graph.edges[i] for i in order.tolist()]
        return pd.DataFrame({"sender": [e.sender for e in edges], "receiver": [e.receiver for e in edges],
                             "input": [e.input for e in edges], "score": self.scores[order].numpy(),
                             "edge": [e.name for e in edges]})

    def top(self, k: int) -> list[Edge]:
        """The ``k`` edges with the largest ``|score|``, largest first."""
        return [self.graph.edges[i] for i in self._order()[:self._k(k)].tolist()]

    def mask(self, k: int) -> torch.Tensor:
        """``[n_edges]`` bool: the ``k`` edges with the largest ``|score|``."""
        mask = torch.zeros(self.graph.n_edges, dtype=torch.bool)
        mask[self._order()[:self._k(k)]] = True
        return mask

    def _order(self) -> torch.Tensor:
        # (stable: equal scores keep the graph's order, so top(k) never depends on sort internals)
        return torch.sort(self.scores.abs(), descending=True, stable=True).indices

    def _k(self, k: Any) -> int:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= self.graph.n_edges:
            raise PatchingInputError(f"k must be an integer from 0 to {self.graph.n_edges} (the number of edges), "
                                     f"got {k!r}", "ks")
        return k

    def __repr__(self) -> str:
        label = self.method if self.method == "eap" else f"{self.method}, {self.steps} steps"
        best = ", ".join(f"{e.name} {s:+.3g}" for e, s in zip(self.top(3), self.scores[self._order()[:3]].tolist()))
        return f"EdgeScores({label}, {self.direction}, {self.metric}: {self.graph.n_edges} edges; top: {best})"


def edge_attribution(
    model: Any,
    clean: Prompts,
    corrupted: Prompts | None = None,
    answers: Any = None,
    *,
    method: str = "eap",
    steps: int = 5,
    metric: Any = "logit_diff",
    direction: str = "denoising",
    qkv: bool = True,
    batch_size: int | None = None,
    progress: bool = True,
) -> EdgeScores:
    """Score every edge of ``model``'s graph by EAP or EAP-IG (module docstring).

    Args:
        model: a TransformerBridge (:func:`patchwidgets.load_model`), on one device, split or
            offloaded. nnsight models are refused (:func:`patchwidgets.edge_hooks.check_model`).
        clean, corrupted, answers, direction: as in :func:`patchwidgets.patch` (prompts,
            datasets or token ids; denoising scores the clean value of an edge in the
            corrupted run, noising the corrupted value in the clean run). No ablations.
        method: ``"eap"`` (the gradient at the target run) or ``"eap-ig"`` (averaged over
            ``steps`` points between the input embeddings of the source and the target).
        steps: EAP-IG's number of points (5 in the paper's experiments); ignored by EAP.
        metric: one differentiable metric of :mod:`patchwidgets.metrics` (``logit_diff``,
            ``normalized``, ``logit``, ``logprob``, ``prob``, ``kl``) or a callable.
        qkv: score a head's query, key and value inputs as separate edges (default), or one
            input per head.
        batch_size: prompt pairs per pass (default: all); scores are the same either way.
        progress: show a progress bar over the passes.

    Returns:
        :class:`EdgeScores`; ``.frame()`` is the tidy table, ``.top(k)`` the top edges.
    """
    check_model(model, "edge_attribution")
    if method not in METHODS:
        raise PatchingInputError(f"method must be one of {METHODS}, got {method!r}", "method")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PatchingInputError(f"steps must be a positive integer (EAP-IG uses 5), got {steps!r}", "steps")
    if direction is None:  # (patch's default)
        direction = "denoising"
    request = prepare_request(model, clean, corrupted, answers, direction, metric, gradient=True)
    if len(request.metric_fns) != 1:
        raise PatchingInputError(f"edge_attribution scores one metric at a time, got {list(request.metric_fns)}",
                                 "metrics")
    name, fn = next(iter(request.metric_fns.items()))
    graph = Graph.from_model(model, qkv)
    verify(model, graph, request.inputs.clean_tokens[:1])
    n_pairs = request.inputs.batch
    size = n_pairs if batch_size is None else batch_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise PatchingInputError(f"batch_size must be a positive number of prompt pairs, got {batch_size!r}",
                                 "batch_size")
    n_steps = steps if method == "eap-ig" else 1

    # normalized is an affine map of the logit difference: differentiate that, divide at the end.
    plain = dataclasses.replace(request, metric_fns={name: "logit_diff" if fn == "normalized" else fn})
    run = _Attribution(model, graph, plain, n_steps)
    groups = [slice(i, min(i + size, n_pairs)) for i in range(0, n_pairs, size)]
    bar = _bar(progress, len(groups) * (n_steps + 1))
    try:
        for rows in groups:
            run.group(plain.rows(rows), bar.update if bar is not None else lambda n: None)
    finally:
        if bar is not None:
            bar.close()
    scores = run.scores / n_pairs
    if fn == "normalized":
        target_ld, source_ld = torch.cat(run.target_ld), torch.cat(run.source_ld)
        check_normalization(*((target_ld, source_ld) if direction == "noising" else (source_ld, target_ld)))
        scores = scores / (source_ld.double() - target_ld.double()).mean()
    return EdgeScores(graph, scores.float(), method, direction, name, n_steps)


def _bar(progress: Any, total: int) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="edge attribution", unit="pass")


class _Attribution:
    """The passes of one :func:`edge_attribution` call, group of pairs by group; ``scores``
    (``[n_edges]`` float64) sums every pair's estimate."""

    def __init__(self, model: Any, graph: Graph, request: Request, n_steps: int):
        self.model, self.graph, self.request, self.n_steps = model, graph, request, n_steps
        self.senders = Senders(model, graph)
        self.hooks = receiver_hooks(graph)
        self.names = sender_hook_names(graph)
        self.key = next(iter(gradient_groups(request.metric_fns)))
        self.scores = torch.zeros(graph.n_edges, dtype=torch.float64)
        self.target_ld: list[torch.Tensor] = []
        self.source_ld: list[torch.Tensor] = []
        self.delta: torch.Tensor | None = None   # [batch, pos, n_senders, d_model]: source - target
        self.offset = 0                         # positions before it are the same in both runs

    def group(self, request: Request, step_done: Callable[[int], Any]) -> None:
        """Every pass for one group of pairs: the source, the target, and the rest of EAP-IG's path."""
        inputs = request.inputs
        target_run, source_run = request.runs(self.model)
        assert source_run is not None   # (no ablations: prepare_request was given a corrupted prompt)
        changed = request.changed.nonzero()
        self.offset = int(changed[0]) if len(changed) else inputs.seq_len
        weight = 1.0 / self.n_steps
        with torch.no_grad():
            source_logits, source_acts = self._forward(source_run.tokens, inputs.answer_pos, self.names, [])
        step_done(1)

        # The target run itself (the last point of EAP-IG's path) first: its senders' outputs give
        # the differences every point's gradient is multiplied with, its logits the baselines.
        start = _Start(None)
        with torch.enable_grad():
            logits, target_acts = self._forward(target_run.tokens, inputs.answer_pos, self.names,
                                                [(_Start.name, start), *self._gradient_hooks(weight)])
        self.delta = self.senders.all(source_acts) - self.senders.all(target_acts)
        measure = request.measure(logits.detach(), source_logits)
        self._keep_logit_diffs(measure, logits.detach(), source_logits)
        self._backward(logits, measure, start)
        step_done(1)
        embed_s, embed_t = source_acts["blocks.0.hook_resid_pre"], target_acts["blocks.0.hook_resid_pre"]
        del source_acts, target_acts
        for k in range(self.n_steps - 1, 0, -1):   # e_S + (k / steps) (e_T - e_S), towards the source
            start = _Start((embed_s, embed_t, k / self.n_steps))
            with torch.enable_grad():
                logits, _ = self._forward(target_run.tokens, inputs.answer_pos, [],
                                          [(_Start.name, start), *self._gradient_hooks(weight)])
            self._backward(logits, measure, start)
            step_done(1)
        self.delta = None

    def _backward(self, logits: torch.Tensor, measure: Measure, start: "_Start") -> None:
        """The backward pass from the metric to the input embeddings: no weight gradients, and
        the receivers' gradient hooks add the scores on the way."""
        with torch.enable_grad():
            value = differentiated_metric(self.key, self.request.metric_fns, logits, measure.ctx)
            assert start.leaf is not None
            torch.autograd.grad(value.sum(), [start.leaf])

    def _keep_logit_diffs(self, measure: Measure, target: torch.Tensor, source: torch.Tensor) -> None:
        ctx = measure.ctx
        if ctx.incorrect is not None:
            self.target_ld.append(logit_diff(target.float(), ctx.correct, ctx.incorrect).cpu())
            self.source_ld.append(logit_diff(source.float(), ctx.correct, ctx.incorrect).cpu())

    def _forward(self, tokens: torch.Tensor, answer_pos: torch.Tensor, names: list[str],
                 hooks: list) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One pass with the receivers' inputs forked: answer logits ``[batch, vocab]`` and the
        activations ``names`` (detached). Only the answer positions are unembedded, where the
        model has an ``unembed.hook_in``: the metric reads nothing else, and the full
        unembedding would be a third of GPT-2's forward pass and of its backward pass."""
        acts: dict[str, torch.Tensor] = {}
        answer_pos = answer_pos.to(input_device(self.model))

        def keep(name: str):
            def hook(act: torch.Tensor, hook) -> None:
                acts[name] = act.detach()
            return hook

        def answer_rows(resid: torch.Tensor, hook) -> torch.Tensor:   # [batch, pos, d_model] -> [batch, 1, d_model]
            rows = torch.arange(resid.shape[0], device=resid.device)
            return resid[rows, answer_pos.to(resid.device)][:, None]

        # (recording hooks first: the start hook on blocks.0.hook_resid_pre replaces what they saw)
        fwd = [*((n, keep(n)) for n in names), *hooks]
        cut = "unembed.hook_in" in (getattr(self.model, "hook_dict", None) or {})
        if cut:
            fwd.append(("unembed.hook_in", answer_rows))
        with split_inputs(self.model):
            logits = self.model.run_with_hooks(tokens.to(input_device(self.model)), fwd_hooks=fwd)
        if cut and logits.shape[1] == 1:
            return logits[:, 0], acts
        rows = torch.arange(tokens.shape[0], device=logits.device)
        return logits[rows, answer_pos.to(logits.device)], acts

    def _gradient_hooks(self, weight: float) -> list:
        """Forward hooks that give each receiver hook's tensor a gradient hook adding its edges'
        scores (weighted by ``weight``) to :attr:`scores`."""
        return [(h.name, self._receiver(h, weight)) for h in self.hooks]

    def _receiver(self, rh: ReceiverHook, weight: float):
        first = self.graph.first_edge(rh.first_slot)
        count = rh.n_slots * rh.upstream

        def on_grad(grad: torch.Tensor) -> None:
            assert self.delta is not None
            g = grad.float() if rh.per_head else grad.float()[:, :, None]   # [batch, pos, slots, d_model]
            d = self.delta[:, self.offset:, :rh.upstream].to(g.device)      # [batch, pos, senders, d_model]
            block = torch.einsum("bpsd,bpud->su", g[:, self.offset:], d)
            self.scores[first:first + count] += block.reshape(-1).double().cpu() * weight

        def hook(act: torch.Tensor, hook) -> torch.Tensor:
            # A copy that only this receiver reads: the MLP's fork is the residual stream itself,
            # which the skip connection reads too, and its gradient would count both.
            mine = act.clone()
            mine.register_hook(on_grad)
            return mine
        return hook


class _Start:
    """The hook on the residual entering block 0 where the backward pass ends: a leaf that
    needs a gradient (so no weight gradients are computed), set to ``e_S + alpha (e_T - e_S)``
    on EAP-IG's path, or the run's own embeddings (``path`` None)."""

    name = "blocks.0.hook_resid_pre"

    def __init__(self, path: tuple | None):
        self.path = path
        self.leaf: torch.Tensor | None = None

    def __call__(self, act: torch.Tensor, hook) -> torch.Tensor:
        if self.path is None:
            x = act.detach()
        else:
            embed_s, embed_t, alpha = self.path
            x = (embed_s.to(act) + alpha * (embed_t.to(act) - embed_s.to(act))).detach()
        self.leaf = x.requires_grad_(True)
        return self.leaf
