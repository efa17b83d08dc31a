"""The computational graph of a transformer: which component can talk to which, directly.

Activation patching asks *which component* matters; circuit discovery asks *which
connections* do. A transformer's residual stream makes the connections explicit: every
component adds its output to the stream, and every later component reads the sum. So the
model is a graph whose **nodes** are the components and whose **edges** are "``u``'s output is
part of ``v``'s input":

=========  =============  ======================================================================
node       name           output (what it adds to the residual stream)
=========  =============  ======================================================================
input      ``input``      the token (and position) embeddings: the residual entering block 0
head       ``a{L}.h{H}``  ``z_H @ W_O[H]``, the head's own share of the attention output; the
                          output bias ``b_O`` belongs to no head (a constant, the same in every
                          run, so no edge carries it)
MLP        ``m{L}``       the MLP's output
logits     ``logits``     (receives only) the final residual stream, read by ``ln_final``
=========  =============  ======================================================================

A receiver's input is the sum of the outputs of every sender before it (plus the constant
biases), layer-normed inside the receiver. A head reads its query, key and value inputs
separately (``qkv=True``, the default): one edge per input, ``a0.h1->a2.h3<q>``. With
``qkv=False`` a head has one input feeding all three (``a0.h1->a2.h3``). MLPs and the logits
have one input (``input="in"``, shown without a suffix: ``a0.h1->m2``, as in the EAP-IG code).

Who reads whom: a head in layer ``L`` reads the input node and every head and MLP of the
layers before ``L``; the MLP of layer ``L`` also reads the heads of layer ``L`` (not in
parallel-attention models such as GPT-J, where attention and MLP read the same stream); the
logits read everything.

Grouped-query attention: query heads share keys and values, ``n_heads / n_kv_heads`` heads per
key-value head, so the key and value inputs belong to the **key-value head**, a receiver-only
node ``a{L}.kv{J}`` (kind ``"kv_head"``): ``a0.h1->a2.kv0<k>``. ``qkv=False`` is refused for
such models: one input per query head is not defined when the heads share keys and values.

Edge count
----------
With ``N`` heads and ``K`` key-value heads per layer, ``n`` layers, and ``s_L = 1 + L (N + 1)``
senders before layer ``L`` (the input, and ``N`` heads and one MLP per earlier layer)::

    into heads:   sum_L (N + 2K) * s_L          (qkv=True;  N * s_L with qkv=False)
    into MLPs:    sum_L (s_L + N)               (s_L for parallel attention and MLP)
    into logits:  1 + n (N + 1)

GPT-2 small (12 layers, 12 heads): 31,320 + 1,014 + 157 = **32,491** edges with q/k/v
separate, the number in Hanna et al. (2024), "Have Faith in Faithfulness" (Table 4), and
10,440 + 1,014 + 157 = 11,611 with one input per head.

Ordering
--------
Senders are numbered in the order they write: ``input``, then for each layer its heads and
then its MLP. So the senders a receiver reads are always a *prefix* of that list
(:meth:`Graph.upstream`), which is what lets the attribution and patching code work on whole
layers at once. Receiver inputs ("slots") are numbered layer by layer: the query slots, key
slots and value slots of the layer's heads (or one slot per head), its MLP, and finally the
logits. Edges are numbered slot by slot, and within a slot by sender.

This module only describes the graph; nothing here runs a model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from .errors import PatchingInputError

__all__ = ["Node", "Edge", "Slot", "Graph", "KINDS", "INPUTS"]

#: Node kinds. ``kv_head`` only occurs with grouped-query attention, as a receiver.
KINDS = ("input", "head", "kv_head", "mlp", "logits")
#: Receiver inputs: a head's query, key and value, or the one input of everything else.
INPUTS = ("q", "k", "v", "in")


@dataclass(frozen=True)
class Node:
    """One component. ``layer`` is -1 for the input and ``n_layers`` for the logits; ``head``
    is the head (or key-value head) index, ``None`` for the rest."""

    name: str      # "input", "a{L}.h{H}", "a{L}.kv{J}", "m{L}", "logits"
    kind: str      # one of KINDS
    layer: int
    head: int | None = None


@dataclass(frozen=True)
class Edge:
    """A direct connection: ``sender``'s output is part of ``receiver``'s ``input``."""

    sender: str
    receiver: str
    input: str     # "q" | "k" | "v" (head inputs), "in" (MLP, logits; heads with qkv=False)

    @property
    def name(self) -> str:
        """``"a0.h1->a2.h3<q>"``; an ``"in"`` input has no suffix (``"a0.h1->m2"``)."""
        suffix = "" if self.input == "in" else f"<{self.input}>"
        return f"{self.sender}->{self.receiver}{suffix}"

    @classmethod
    def parse(cls, name: str) -> "Edge":
        """The edge called ``name`` (``"a0.h1->a2.h3<q>"``, ``"input->m0"``; ``<in>`` is
        accepted too). Only the spelling is checked here; :meth:`Graph.index` checks that
        the edge exists in a model."""
        match = _EDGE_NAME.fullmatch(name.strip()) if isinstance(name, str) else None
        if match is None:
            raise PatchingInputError(
                f"{name!r} is not an edge name; edges are written 'sender->receiver<input>', e.g. "
                "'a0.h1->a2.h3<q>', 'input->m0', 'm1->logits'", "edges")
        return cls(match["sender"], match["receiver"], match["input"] or "in")

    def __str__(self) -> str:
        return self.name


_EDGE_NAME = re.compile(r"(?P<sender>[\w.]+)\s*->\s*(?P<receiver>[\w.]+)(?:<(?P<input>q|k|v|in)>)?")


@dataclass(frozen=True)
class Slot:
    """One receiver input: ``node``'s ``input``. Its senders are the first ``upstream`` senders."""

    node: Node
    input: str
    upstream: int


class Graph:
    """Every node, receiver input and edge of one model shape.

    Build it with :meth:`from_model` (a TransformerBridge, or its ``cfg``) or
    :meth:`from_config` (the shape alone, no weights). Attributes:

    * ``nodes``: every :class:`Node`, senders first (input, then each layer's heads and MLP),
      then the key-value heads (grouped-query attention only) and the logits;
    * ``senders``: the nodes that write to the residual stream, in order;
    * ``slots``: every receiver input (:class:`Slot`), layer by layer;
    * ``edges``: every :class:`Edge`, slot by slot (and by sender within a slot);
    * ``edge_sender``, ``edge_slot``: ``[n_edges]`` long tensors: each edge's sender index
      and slot index.
    """

    def __init__(self, n_layers: int, n_heads: int, n_kv_heads: int | None = None, *, qkv: bool = True,
                 parallel_attn_mlp: bool = False, attn_only: bool = False):
        n_kv = n_heads if n_kv_heads is None else n_kv_heads
        for value, what in ((n_layers, "n_layers"), (n_heads, "n_heads"), (n_kv, "n_kv_heads")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PatchingInputError(f"{what} must be a positive integer, got {value!r}", "model")
        if n_heads % n_kv:
            raise PatchingInputError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv})", "model")
        if not isinstance(qkv, bool):
            raise PatchingInputError(f"qkv must be True or False, got {qkv!r}", "qkv")
        if not qkv and n_kv != n_heads:
            raise PatchingInputError(
                f"qkv=False gives each head one input feeding its query, key and value, but this model "
                f"shares keys and values between heads ({n_kv} key/value heads for {n_heads} query heads), "
                "so one head's key or value input is not its own; use qkv=True (key and value inputs per "
                "key-value head)", "qkv")
        self.n_layers, self.n_heads, self.n_kv_heads = n_layers, n_heads, n_kv
        self.qkv, self.parallel_attn_mlp, self.attn_only = qkv, parallel_attn_mlp, attn_only
        self.per_layer = n_heads + (0 if attn_only else 1)   # senders each layer adds

        self.senders: list[Node] = [Node("input", "input", -1)]
        for layer in range(n_layers):
            self.senders += [Node(f"a{layer}.h{h}", "head", layer, h) for h in range(n_heads)]
            if not attn_only:
                self.senders.append(Node(f"m{layer}", "mlp", layer))
        kv_nodes = [Node(f"a{layer}.kv{j}", "kv_head", layer, j)
                    for layer in range(n_layers) for j in range(n_kv)] if n_kv != n_heads else []
        logits = Node("logits", "logits", n_layers)
        self.nodes: list[Node] = [*self.senders, *kv_nodes, logits]
        self._node = {n.name: n for n in self.nodes}
        self._sender_index = {n.name: i for i, n in enumerate(self.senders)}

        self.slots: list[Slot] = []
        for layer in range(n_layers):
            before = self.first_sender(layer)
            heads = [self._node[f"a{layer}.h{h}"] for h in range(n_heads)]
            kv = [self._node[f"a{layer}.kv{j}"] for j in range(n_kv)] if kv_nodes else heads
            if qkv:
                self.slots += [Slot(n, "q", before) for n in heads]
                self.slots += [Slot(n, c, before) for c in "kv" for n in kv]
            else:
                self.slots += [Slot(n, "in", before) for n in heads]
            if not attn_only:
                self.slots.append(Slot(self._node[f"m{layer}"], "in",
                                       before + (0 if parallel_attn_mlp else n_heads)))
        self.slots.append(Slot(logits, "in", len(self.senders)))
        self._slot_index = {(s.node.name, s.input): i for i, s in enumerate(self.slots)}
        upstream = torch.tensor([s.upstream for s in self.slots])
        self._slot_start = torch.cat([torch.zeros(1, dtype=torch.long), upstream.cumsum(0)])
        self.edge_slot = torch.repeat_interleave(torch.arange(len(self.slots)), upstream)
        self.edge_sender = torch.arange(int(upstream.sum())) - self._slot_start[self.edge_slot]
        self.edges: list[Edge] = [Edge(self.senders[s].name, self.slots[r].node.name, self.slots[r].input)
                                  for s, r in zip(self.edge_sender.tolist(), self.edge_slot.tolist())]

    # ------------------------------------------------------------------ building
    @classmethod
    def from_config(cls, n_layers: int, n_heads: int, n_kv_heads: int | None = None, *, qkv: bool = True,
                    parallel_attn_mlp: bool = False, attn_only: bool = False) -> "Graph":
        """The graph of a model of this shape (no weights needed)."""
        return cls(n_layers, n_heads, n_kv_heads, qkv=qkv, parallel_attn_mlp=parallel_attn_mlp,
                   attn_only=attn_only)

    @classmethod
    def from_model(cls, model: Any, qkv: bool = True) -> "Graph":
        """The graph of ``model`` (a TransformerBridge, or a TransformerLens config: anything
        with ``n_layers`` and ``n_heads``, directly or on ``.cfg``)."""
        cfg = getattr(model, "cfg", model)
        if not hasattr(cfg, "n_layers") or not hasattr(cfg, "n_heads"):
            raise PatchingInputError(
                f"cannot read the model's shape: {type(model).__name__} has no cfg.n_layers / cfg.n_heads "
                "(give a TransformerBridge from patchwidgets.load_model, or use Graph.from_config)", "model")
        return cls(int(cfg.n_layers), int(cfg.n_heads), getattr(cfg, "n_key_value_heads", None) or None,
                   qkv=qkv, parallel_attn_mlp=bool(getattr(cfg, "parallel_attn_mlp", False)),
                   attn_only=bool(getattr(cfg, "attn_only", False)))

    # ------------------------------------------------------------------ looking things up
    @property
    def n_edges(self) -> int:
        return len(self.edges)

    def __len__(self) -> int:
        return len(self.edges)

    def __repr__(self) -> str:
        shape = f"{self.n_layers} layers, {self.n_heads} heads"
        if self.n_kv_heads != self.n_heads:
            shape += f" ({self.n_kv_heads} key/value heads)"
        return (f"Graph({shape}, {'q/k/v inputs' if self.qkv else 'one input per head'}: "
                f"{len(self.nodes)} nodes, {len(self.slots)} receiver inputs, {self.n_edges} edges)")

    def node(self, name: str) -> Node:
        """The node called ``name``."""
        if name not in self._node:
            raise PatchingInputError(f"no node {name!r} in this model ({self._shape_hint()})", "edges")
        return self._node[name]

    def first_sender(self, layer: int) -> int:
        """How many senders write before layer ``layer``'s attention reads: ``1 + layer * (N + 1)``."""
        return 1 + layer * self.per_layer

    def sender_index(self, name: str) -> int:
        """The position of sender ``name`` in :attr:`senders`."""
        if name not in self._sender_index:
            hint = " (the logits and key-value heads only receive)" if name in self._node else ""
            raise PatchingInputError(f"{name!r} is not a sender in this model{hint} ({self._shape_hint()})",
                                     "edges")
        return self._sender_index[name]

    def slot_index(self, receiver: str, input: str) -> int:
        """The position of ``receiver``'s ``input`` in :attr:`slots`."""
        key = (receiver, input)
        if key not in self._slot_index:
            node = self.node(receiver)
            have = sorted(i for (n, i) in self._slot_index if n == node.name)
            hint = "; this graph has one input per head (qkv=False)" if not self.qkv and input in "qkv" else ""
            raise PatchingInputError(f"{receiver!r} has no input {input!r} in this graph (its inputs: "
                                     f"{have or 'none, it only sends'}{hint})", "edges")
        return self._slot_index[key]

    def upstream(self, slot: int) -> int:
        """How many senders slot ``slot`` reads: the first ``upstream(slot)`` of :attr:`senders`."""
        return self.slots[slot].upstream

    def first_edge(self, slot: int) -> int:
        """The index of slot ``slot``'s first edge (from the input). Its ``upstream(slot)``
        edges follow in sender order, and the next slot's come right after, so the edges of
        consecutive slots with the same senders form a ``[slots, senders]`` block."""
        return int(self._slot_start[slot])

    def index(self, edge: "Edge | str") -> int:
        """The position of ``edge`` (an :class:`Edge` or its name) in :attr:`edges`."""
        if isinstance(edge, str):
            edge = Edge.parse(edge)
        if not isinstance(edge, Edge):
            raise PatchingInputError(f"an edge must be an Edge or an edge name, got {edge!r}", "edges")
        sender = self.sender_index(edge.sender)
        slot = self.slot_index(edge.receiver, edge.input)
        if sender >= self.slots[slot].upstream:
            raise PatchingInputError(
                f"there is no edge {edge.name}: {edge.sender} writes after {edge.receiver} reads "
                f"(a receiver reads only the senders of earlier layers, and an MLP its own layer's heads)",
                "edges")
        return int(self._slot_start[slot]) + sender

    def mask(self, edges: Any) -> torch.Tensor:
        """``[n_edges]`` bool: which edges ``edges`` names. ``edges`` is an iterable of
        :class:`Edge` objects or edge names, or a ``[n_edges]`` bool tensor (returned as is)."""
        if isinstance(edges, torch.Tensor):
            if edges.dtype != torch.bool or edges.shape != (self.n_edges,):
                raise PatchingInputError(
                    f"an edge mask must be a bool tensor of shape [{self.n_edges}] (one entry per edge), got "
                    f"{edges.dtype} {tuple(edges.shape)}", "edges")
            return edges.cpu()
        if isinstance(edges, (str, Edge)):
            edges = [edges]
        if not isinstance(edges, Iterable):
            raise PatchingInputError(
                f"edges must be a list of Edge objects or edge names (or a bool mask), got {type(edges).__name__}",
                "edges")
        mask = torch.zeros(self.n_edges, dtype=torch.bool)
        for edge in edges:
            mask[self.index(edge)] = True
        return mask

    def _shape_hint(self) -> str:
        last = self.n_layers - 1
        return (f"nodes are 'input', 'a0.h0'..'a{last}.h{self.n_heads - 1}'"
                f"{'' if self.attn_only else f', m0..m{last}'}, 'logits'")
