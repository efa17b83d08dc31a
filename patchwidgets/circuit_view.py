"""Drawing a circuit: the graph of edge scores as a picture, in the widget and without it.

Edge attribution (:func:`patchwidgets.edge_attribution`) scores every edge of the model's graph:
input embeddings, attention heads and MLPs, and the logits, each sender connected to every
later component's input through the residual stream. This module draws the strongest edges
of such a score table, three ways from one set of rules:

* :func:`circuit_payload` flattens an :class:`~patchwidgets.edge_attribution.EdgeScores` into
  the widget's ``circuit`` traitlet (nodes, the strongest edges with their scores as float32
  bytes), which ``static/widget.js`` draws live (``makeCircuit``);
* :func:`static_circuit_html` draws the same payload as one self-contained SVG (no scripts;
  each edge's score in its ``<title>``, so hovering works in a plain browser), what exported
  notebooks show;
* :func:`draw_circuit` is the same picture for a notebook cell, without a widget::

      scores = pw.edge_attribution(model, clean, corrupted, answers, method="eap-ig")
      pw.draw_circuit(scores, k=30)                           # the 30 strongest edges
      pw.draw_circuit(scores, k=30, faithfulness=pw.faithfulness(..., circuit=scores.top(30)))

The rules, kept in step with ``widget.js`` by the cases in ``tests/shared/widget_cases.json``
(``circuit_*``), which the Python and the JavaScript tests both check:

* **Layout by layer** (:func:`layout`): the input at the bottom, the logits at the top, and in
  between, layer by layer, a row of attention heads and above it the layer's MLP, so the
  residual stream flows upwards. Nodes of a row are spread evenly across it.
* **Top k** (:func:`top_k`): the ``k`` edges of largest ``|score|`` (ties: graph order), the
  same edges :meth:`EdgeScores.top <patchwidgets.edge_attribution.EdgeScores.top>` keeps.
* **Colour and width** (:func:`edge_style`): the project's diverging rule
  (:mod:`patchwidgets.widget_colour`) around 0, blue for a positive score (patching the edge
  moves the metric up), red for a negative one; the colour's strength and the line's width
  grow with ``|score|`` relative to the strongest edge. A floor on the opacity keeps weak edges
  visible: an edge drawn at all is one of the top ``k``.
* **Curves** (:func:`edge_curve`): a cubic from the top of the sender to the bottom of the
  receiver (a head's query, key and value inputs enter at its left, middle and right); one that
  skips rows bows to the right, past the width of a node and further the more rows it skips, so
  that an edge between aligned nodes (MLP to MLP, a head to the same head later) does not run
  through the nodes between them.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from . import widget_colour as colours

#: The most edges a payload carries (the strongest ones): what the page can draw at once. The
#: slider still counts every edge of the graph; a bigger circuit is drawn as its strongest edges.
SENT_EDGES = 1000
#: Where each input of a head enters it, as a fraction of the node's width from its middle.
INPUT_OFFSET = {"q": -0.3, "k": 0.0, "v": 0.3, "in": 0.0}
INPUT_WORDS = {"q": "query", "k": "key", "v": "value", "in": "input"}


# --------------------------------------------------------------------------- the rules
def row_key(node: dict) -> float:
    """Where a node's row sits, bottom to top: the input, then per layer its heads (and key-value
    heads, under grouped-query attention) and its MLP, then the logits."""
    kind, layer = node["kind"], int(node.get("layer", 0))
    if kind == "input":
        return -1.0
    if kind == "logits":
        return math.inf
    return 2.0 * layer + (1.0 if kind == "mlp" else 0.0)


def layout(nodes: Sequence[dict]) -> tuple[list[tuple[float, float]], list[int], int]:
    """Each node's place in the unit square, ``(x, y)`` with ``y = 0`` at the top; each node's
    row (0 = the bottom one) and the number of rows. Rows are the distinct :func:`row_key`\\ s
    present (an attention-only model has no MLP rows); a row of ``m`` nodes, ordered by head,
    puts node ``i`` at ``x = (i + 0.5) / m``."""
    keys = sorted({row_key(n) for n in nodes})
    row_of = {k: r for r, k in enumerate(keys)}
    n_rows = len(keys)
    members: dict[int, list[int]] = {}
    for i, n in enumerate(nodes):
        members.setdefault(row_of[row_key(n)], []).append(i)
    places: list[tuple[float, float]] = [(0.0, 0.0)] * len(nodes)
    rows = [row_of[row_key(n)] for n in nodes]
    for r, idx in members.items():
        idx.sort(key=lambda i: (nodes[i].get("head") if nodes[i].get("head") is not None else -1, i))
        for j, i in enumerate(idx):
            places[i] = ((j + 0.5) / len(idx), 1.0 - (r + 0.5) / n_rows)
    return places, rows, n_rows


def top_k(scores: Sequence[float], k: int) -> list[int]:
    """The indices of the ``k`` largest ``|score|``\\ s, largest first (ties: lower index
    first; NaN last)."""
    def magnitude(i: int) -> float:
        v = float(scores[i])
        return abs(v) if math.isfinite(v) else -1.0
    order = sorted(range(len(scores)), key=lambda i: -magnitude(i))
    return order[: max(0, int(k))]


def edge_style(score: float, max_abs: float) -> tuple[float, tuple[int, int, int, float] | None, float]:
    """``(width, rgba, opacity)`` of an edge of ``score`` when the strongest edge has
    ``|score| = max_abs``: width 1 to 6 px, the diverging colour of
    :func:`patchwidgets.widget_colour.colour` on ``-max_abs..max_abs`` (``rgba`` is ``None``
    for a missing score) and the opacity to draw it with (``0.25 + 0.75 * alpha``)."""
    top = max_abs if max_abs > 0 and math.isfinite(max_abs) else 1.0
    rgba = colours.colour(score, -top, top, "diverging", 0.0)
    if rgba is None:
        return 1.0, None, 0.25
    strength = min(1.0, abs(score) / top)
    return _round_to(1 + 5 * strength, 100), rgba, _round_to(0.25 + 0.75 * rgba[3], 1000)


def _round_to(x: float, scale: int) -> float:
    """``x`` rounded to ``1 / scale``, half up, exactly as JavaScript's ``Math.round(x * scale) / scale``
    (Python's round() goes to even, and would differ from the page on ties)."""
    return math.floor(x * scale + 0.5) / scale


def edge_curve(start: tuple[float, float], end: tuple[float, float], span: int, node_w: float) -> list[float]:
    """The cubic of an edge from ``start`` (the sender's top, in px) to ``end`` (the receiver's
    bottom), ``span`` rows up, between nodes ``node_w`` px wide: ``[x1, y1, c1x, c1y, c2x, c2y,
    x2, y2]``. Its ends leave and enter vertically. An edge that skips rows bows to the right
    by ``0.7 node_w + 6 px`` per row skipped (at most 80 px): a cubic reaches 3/4 of its
    control points' offset, so even a one-row skip clears the half-width of the node it passes."""
    (x1, y1), (x2, y2) = start, end
    dy = (y1 - y2) * 0.45
    bow = min(80.0, 0.7 * node_w + 6.0 * (span - 1)) if span > 1 else 0.0
    return [x1, y1, x1 + bow, y1 - dy, x2 + bow, y2 + dy, x2, y2]


def node_label(node: dict) -> str:
    """What a node's box says: ``0.1`` for head 1 of layer 0, ``0.kv1`` for a key-value head
    (grouped-query attention), ``MLP 0``, ``input``, ``logits``."""
    kind = node["kind"]
    if kind == "head":
        return f"{node['layer']}.{node['head']}"
    if kind == "kv_head":
        return f"{node['layer']}.kv{node['head']}"
    if kind == "mlp":
        return f"MLP {node['layer']}"
    return "input" if kind == "input" else "logits"


def node_words(node: dict) -> str:
    """A node in words: ``head 0.1``, ``key-value head 0.1``, ``MLP 0``, ``the input embeddings``,
    ``the logits``."""
    kind = node["kind"]
    if kind == "head":
        return f"head {node['layer']}.{node['head']}"
    if kind == "kv_head":
        return f"key-value head {node['layer']}.{node['head']}"
    if kind == "mlp":
        return f"MLP {node['layer']}"
    return "the input embeddings" if kind == "input" else "the logits"


def edge_words(sender: dict, receiver: dict, input: str) -> str:
    """An edge in words: ``head 0.1 -> head 2.3 (query)``; the input is named for heads only."""
    into = f" ({INPUT_WORDS.get(input, input)})" if receiver["kind"] in ("head", "kv_head") else ""
    return f"{node_words(sender)} \u2192 {node_words(receiver)}{into}"


# --------------------------------------------------------------------------- the payload
def _node_json(node: Any) -> dict:
    head = getattr(node, "head", None)
    return {"name": str(node.name), "kind": str(node.kind), "layer": int(node.layer),
            "head": None if head is None else int(head)}


def _f32(values: Sequence[float]) -> bytes:
    return torch.tensor([float(v) for v in values], dtype=torch.float32).numpy().astype("<f4").tobytes()


def circuit_payload(edge_scores: Any, inputs: dict, run_id: int, sent: int = SENT_EDGES) -> dict:
    """The ``circuit`` traitlet: what the page needs to draw ``edge_scores``.

    Its keys are :data:`~patchwidgets.widget_contract.CIRCUIT_KEYS` (the page's ``Circuit``
    typedef names the same ones): the graph's ``nodes`` (``name``, ``kind``, ``layer``,
    ``head``), the ``sent`` strongest ``edges`` by ``|score|`` as ``[sender, receiver, input,
    name]`` (node indices), strongest first, their ``scores`` (little-endian float32 bytes in the
    same order), ``n_edges`` (every edge of the graph: the slider's range), the ``method`` (with
    EAP-IG's ``steps``), ``metric`` and ``direction`` the scores are for, and the ``inputs`` the job read
    (:data:`~patchwidgets.widget_contract.CIRCUIT_FIELDS`), for the page's stale check."""
    graph = edge_scores.graph
    nodes = [_node_json(n) for n in graph.nodes]
    index = {n["name"]: i for i, n in enumerate(nodes)}
    scores = edge_scores.scores.detach().float().cpu().tolist()
    keep = top_k(scores, sent)
    edges = []
    for i in keep:
        e = graph.edges[i]
        edges.append([index[str(e.sender)], index[str(e.receiver)], str(e.input), str(e.name)])
    return {
        "run_id": int(run_id),
        "method": str(edge_scores.method),
        "steps": int(getattr(edge_scores, "steps", 1)),
        "metric": str(edge_scores.metric) if isinstance(edge_scores.metric, str) else "custom",
        "direction": str(edge_scores.direction),
        "nodes": nodes,
        "edges": edges,
        "scores": _f32([scores[i] for i in keep]),
        "n_edges": len(scores),
        "inputs": dict(inputs),
    }


def payload_scores(payload: dict) -> list[float]:
    """Decode ``payload["scores"]`` (float32 bytes) into floats."""
    raw = bytes(payload.get("scores") or b"")
    return torch.frombuffer(bytearray(raw), dtype=torch.float32).tolist() if raw else []


# --------------------------------------------------------------------------- the static picture
@dataclass(frozen=True)
class Box:
    """Where the graph is drawn, in px: the plot area and the size of a node."""

    left: float
    top: float
    width: float
    height: float
    node_w: float
    node_h: float

    def place(self, x: float, y: float) -> tuple[float, float]:
        return self.left + x * self.width, self.top + y * self.height


def box_for(nodes: Sequence[dict], n_rows: int, width: float) -> Box:
    """The plot area of a graph ``width`` px wide (the legend aside): rows 26 to 56 px apart (at
    most about 720 px in all), nodes as wide as fits the fullest row (at most 46 px)."""
    per_row: dict[float, int] = {}
    for n in nodes:
        per_row[row_key(n)] = per_row.get(row_key(n), 0) + 1
    widest = max(per_row.values(), default=1)
    gap = max(26.0, min(56.0, 720.0 / max(1, n_rows)))
    node_w = max(8.0, min(46.0, 0.8 * width / widest))
    return Box(left=8.0, top=8.0, width=width, height=gap * n_rows, node_w=node_w, node_h=min(18.0, 0.55 * gap))


def static_circuit_html(payload: dict | None, title: str, k: int, faithfulness: dict | None = None,
                        width: float = 640.0) -> str:
    """The strongest ``k`` edges of a ``circuit`` payload as a self-contained SVG with a caption
    and a legend (no scripts): what exported notebooks show of the circuit view, and what
    :func:`draw_circuit` displays. ``faithfulness`` (the widget's ``circuit_faithfulness``) adds
    the kept circuit's faithfulness when it was computed for this ``k``."""
    esc = html.escape
    if not payload or not payload.get("nodes"):
        return (f"<div><b>{esc(title)}</b><br><i>No circuit yet: choose the circuit component and "
                f"press Run in the widget.</i></div>")
    nodes, edges = payload["nodes"], payload["edges"]
    scores = payload_scores(payload)
    k = max(0, min(int(k), int(payload["n_edges"])))
    drawn = top_k(scores, min(k, len(edges)))
    places, rows, n_rows = layout(nodes)
    box = box_for(nodes, n_rows, width)
    max_abs = max((abs(v) for v in scores if math.isfinite(v)), default=0.0)
    sc = colours.Scale("score", "diverging", -(max_abs or 1.0), max_abs or 1.0)
    parts = []
    for i in reversed(drawn):  # (the strongest last: on top)
        s, r, inp, name = edges[i]
        sx, sy = box.place(*places[s])
        rx, ry = box.place(*places[r])
        end = (rx + INPUT_OFFSET.get(inp, 0.0) * box.node_w, ry + box.node_h / 2)
        curve = edge_curve((sx, sy - box.node_h / 2), end, rows[r] - rows[s], box.node_w)
        width_px, rgba, opacity = edge_style(scores[i], max_abs)
        stroke = "#999999" if rgba is None else f"rgb({rgba[0]},{rgba[1]},{rgba[2]})"
        d = "M{:.1f} {:.1f}C{:.1f} {:.1f} {:.1f} {:.1f} {:.1f} {:.1f}".format(*curve)
        words = edge_words(nodes[s], nodes[r], inp)
        parts.append(f'<path class="pw-edge" data-edge="{esc(name)}" d="{d}" fill="none" stroke="{stroke}" '
                     f'stroke-width="{width_px}" stroke-opacity="{opacity}"><title>{esc(words)}: score '
                     f'{esc(colours.fmt(scores[i], 4))}</title></path>')
    used = {edges[i][0] for i in drawn} | {edges[i][1] for i in drawn}
    for j, n in enumerate(nodes):
        x, y = box.place(*places[j])
        cls = "pw-node" if j in used else "pw-node pw-node-idle"
        label = node_label(n)
        text = (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="middle" dominant-baseline="central" '
                f'font-size="9" fill="#222">{esc(label)}</text>') if 5.5 * len(label) <= box.node_w else ""
        parts.append(f'<g class="{cls}" data-node="{esc(n["name"])}" opacity="{1 if j in used else 0.35}">'
                     f'<rect x="{x - box.node_w / 2:.1f}" y="{y - box.node_h / 2:.1f}" width="{box.node_w:.1f}" '
                     f'height="{box.node_h:.1f}" rx="3" fill="#f3f3f3" stroke="#888"/>{text}'
                     f'<title>{esc(node_words(n))}</title></g>')
    svg_w, svg_h = box.left * 2 + box.width, box.top * 2 + box.height
    legend = "".join(
        f'<span style="display:inline-block;padding:0 6px;background:{colours.over(sc.colour(v))}">{esc(t)}</span>'
        for v, t in zip(sc.ticks(), sc.labels()))
    shown = len(drawn)
    what = (f"the {k} edges of largest |score| of {payload['n_edges']}" if shown == k
            else f"the {shown} strongest of the {k} kept edges ({payload['n_edges']} in the graph)")
    faith = ""
    if faithfulness and faithfulness.get("k") == k and faithfulness.get("run_id") == payload.get("run_id") \
            and faithfulness.get("value") is not None:
        faith = (f'<div style="font-size:11px" data-faithfulness="{faithfulness["value"]}">faithfulness of the '
                 f'kept circuit: <b>{esc(colours.fmt(faithfulness["value"], 3))}</b></div>')
    method = payload["method"].upper() + (f" ({payload['steps']} steps)" if payload["method"] == "eap-ig" else "")
    caption = (f"{esc(method)} edge scores, {esc(payload['direction'])}, {esc(payload['metric'])}: "
               f"{esc(what)}")
    return (f'<div class="pw-static-circuit"><b>{esc(title)}</b><div style="font-size:11px">{caption}</div>'
            f'<div style="font-size:11px" data-legend="diverging">edge score: {legend} (blue: patching the edge '
            f'raises {esc(payload["metric"])}, red: lowers it; width = |score|)</div>{faith}'
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{svg_w:.0f}" height="{svg_h:.0f}" '
            f'viewBox="0 0 {svg_w:.0f} {svg_h:.0f}" style="background:#fff" data-k="{k}">'
            f'{"".join(parts)}</svg></div>')


class CircuitPicture:
    """A static circuit picture for a notebook cell (see :func:`draw_circuit`)."""

    def __init__(self, html_text: str):
        self.html = html_text

    def _repr_html_(self) -> str:
        return self.html

    def save(self, path: str) -> None:
        """Write a self-contained HTML page with the picture."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"<!DOCTYPE html><meta charset='utf-8'><title>circuit</title>{self.html}")


def draw_circuit(edge_scores: Any, k: int = 30, faithfulness: float | None = None,
                 title: str | None = None) -> CircuitPicture:
    """The ``k`` strongest edges of ``edge_scores`` (from :func:`patchwidgets.edge_attribution`),
    drawn by layer as the widget's circuit view draws them, as a static picture (it shows in
    exported notebooks too). ``faithfulness`` (from :func:`patchwidgets.faithfulness` for the same
    ``k`` edges) is printed above it."""
    payload = circuit_payload(edge_scores, {}, 0)
    faith = None if faithfulness is None else {"k": int(k), "run_id": 0, "value": float(faithfulness)}
    return CircuitPicture(static_circuit_html(payload, title or "Circuit", k, faith))
