"""The widget's contract: what its Python side and its page agree on, written once.

:class:`~patchwidgets.widget.PatchingWidget` (Python) and ``static/widget.js`` (the page) talk
through synced traitlets and a few custom messages. Everything both sides must agree on is
listed here, and reaches the page once, as the ``contract`` traitlet (:data:`CONTRACT`):

* which traitlets the page may set (:data:`PAGE_FIELDS`) and which only Python sets
  (:data:`SHOWN_FIELDS`); together they are every synced traitlet of the widget;
* which of them a sweep reads when it starts (:data:`SWEEP_FIELDS`: the heatmap payload's
  ``inputs`` records them, and the page calls a heatmap stale when one of them has changed
  since; :data:`PATH_FIELDS` count only in the path view);
* which a Run message from the page may set (:data:`RUN_FIELDS`: the page sends the ones edited
  since the last Run along with the click, since a custom message can overtake a state update);
* the metrics' labels and colour scales (from the registry, :data:`patchwidgets.metrics.METRICS`,
  and the natural bounds of :data:`patchwidgets.widget_colour.ANCHORS`), the sites the
  component menu offers (:data:`SITE_GROUPS`), the receiver inputs of the path view
  (:data:`RECEIVER_INPUTS`);
* the keys of the ``heatmap`` payload (:data:`HEATMAP_KEYS`, :data:`HEATMAP_OPTIONAL_KEYS`;
  built by :func:`patchwidgets.widget_payload.heatmap_payload`);
* the circuit view (the ``"circuit"`` component): what its job reads (:data:`CIRCUIT_FIELDS`,
  recorded in the payload's ``inputs`` for the stale check), the methods its menu offers
  (:data:`CIRCUIT_METHODS`) and the keys of the ``circuit`` payload (:data:`CIRCUIT_KEYS`;
  built by :func:`patchwidgets.circuit_view.circuit_payload`).

The page reads these from the model instead of keeping copies, and its unit tests
(``js/fake_model.js``) start from ``tests/shared/widget_contract.json``, which
``scripts/write_widget_contract.py`` writes from this module and the widget's trait defaults and
``tests/test_widget.py`` checks, so neither the page nor its fake model can drift.

Adding a control touches three places: its traitlet in ``widget.py`` plus its entry here, its
part in ``widget.js`` (an element with ``data-control`` or ``data-field`` naming the traitlet,
and a row of ``render``'s table if it redraws something), and a test. The tests on both sides
fail when an entry is missing: a synced traitlet that is not listed here
(``tests/test_widget.py``), a listed field the page has no control for, or does not redraw on,
or a heatmap key its typedef lacks (``js/contract.test.js``).
"""

from __future__ import annotations

import json
from typing import Any

from .metrics import METRICS
from .widget_colour import ANCHORS

# --------------------------------------------------------------------------- the traitlets
#: The prompts and the answers: each edit runs a preview (tokens, baselines, checks).
INPUT_FIELDS = ("clean", "corrupted", "correct", "incorrect")
#: The receivers of the path view and the input of theirs a path enters (``site == "path"`` only).
PATH_FIELDS = ("receivers", "receiver_input")
#: The sweep's settings besides the prompts: an edit clears their errors and may start an auto-run.
CONTROL_FIELDS = ("direction", "site", *PATH_FIELDS)
#: What a sweep reads from the widget when it starts; the heatmap payload's ``inputs``.
SWEEP_FIELDS = (*INPUT_FIELDS, *CONTROL_FIELDS, "dataset")
#: What the circuit view's job reads (``site == "circuit"``): the prompts, answers and dataset, the
#: direction, the metric the edges are scored on and the scoring method; the ``circuit`` payload's
#: ``inputs``. (Not sweep fields: a heatmap does not go stale when the method changes.)
CIRCUIT_FIELDS = (*INPUT_FIELDS, "direction", "metric", "dataset", "circuit_method")
#: What a Run message from the page may set (each applied as the page's state update would be;
#: others are ignored). Every field a sweep or the circuit view reads is one: a pair added to the
#: dataset just before Run must reach the sweep even when its state update is still held back.
RUN_FIELDS = (*INPUT_FIELDS, *CONTROL_FIELDS, "dataset", "metric", "circuit_method", "circuit_k")
#: Every traitlet the page may set: the sweep's inputs, then choices no sweep reads (the metric
#: shown, the cell clicked, the head whose pattern is shown, the pair shown, two checkboxes), then
#: the circuit view's (its scoring method, the number of edges kept, the edge clicked).
PAGE_FIELDS = (*SWEEP_FIELDS, "metric", "fast_preview", "auto_run", "pair", "selected",
               "pattern_layer", "pattern_head", "circuit_method", "circuit_k", "circuit_edge")
#: Set when the widget is made; the page reads them once.
STATIC_FIELDS = ("contract", "model_name", "model_info")
#: Every traitlet only Python sets: the page draws them.
SHOWN_FIELDS = (*STATIC_FIELDS, "tokens", "baseline", "errors", "status", "progress", "waiting_for",
                "elapsed", "heatmap", "explanation", "pattern", "circuit", "circuit_faithfulness",
                "circuit_edge_patch")

# --------------------------------------------------------------------------- what the menus offer
#: The sites the widget offers, grouped as in its component menu: ``(value, label)``.
SITE_GROUPS: list[tuple[str, list[tuple[str, str]]]] = [
    ("Residual stream and blocks (layer x position)", [
        ("resid_pre", "residual stream (before each layer)"),
        ("resid_mid", "residual stream (between attention and MLP)"),
        ("resid_post", "residual stream (after each layer)"),
        ("attn_out", "attention output"),
        ("mlp_out", "MLP output"),
    ]),
    ("Attention heads, all positions (layer x head)", [
        ("head_out", "head outputs (z)"),
        ("head_q", "head queries (q)"),
        ("head_k", "head keys (k)"),
        ("head_v", "head values (v)"),
        ("head_pattern", "head attention patterns"),
    ]),
    ("Attention heads, by position (layer.head x position)", [
        ("head_out_by_pos", "head outputs (z) by position"),
        ("head_q_by_pos", "head queries (q) by position"),
        ("head_k_by_pos", "head keys (k) by position"),
        ("head_v_by_pos", "head values (v) by position"),
        ("head_pattern_by_pos", "head patterns by destination position"),
    ]),
    ("Paths between heads (sender layer x sender head)", [
        ("path", "path patching: senders \u2192 receivers"),
    ]),
    ("Circuits (every edge between components)", [
        ("circuit", "circuit: edge attribution (EAP / EAP-IG)"),
    ]),
]
WIDGET_SITES = [value for _, options in SITE_GROUPS for value, _ in options]
#: The components a heatmap sweep draws (every one but the circuit view).
SWEEP_SITES = [value for value in WIDGET_SITES if value != "circuit"]

#: The edge-scoring methods of the circuit view, ``(value, label)``
#: (:func:`patchwidgets.edge_attribution`'s ``method``).
CIRCUIT_METHODS: tuple[tuple[str, str], ...] = (
    ("eap", "EAP: attribution patching of edges (1 backward pass)"),
    ("eap-ig", "EAP-IG: integrated gradients (5 steps)"),
)

#: The receiver inputs the path view offers, ``(value, label)`` (the core takes any combination of q, k, v).
RECEIVER_INPUTS: tuple[tuple[str, str], ...] = (
    ("q", "queries (q)"), ("k", "keys (k)"), ("v", "values (v)"),
    ("kv", "keys and values (kv)"), ("qkv", "all inputs (qkv)"),
)


def metric_info() -> dict[str, dict[str, Any]]:
    """What the page needs of each built-in metric, in menu order: its label, its colour
    scale, its natural bounds (``lo``, ``hi``: ``None`` where it has none) and what a high
    value means."""
    return {name: {"label": m.label, "scale": m.scale, "high_means": m.high_means,
                   "lo": ANCHORS.get(name, (None, None))[0], "hi": ANCHORS.get(name, (None, None))[1]}
            for name, m in METRICS.items()}


# --------------------------------------------------------------------------- the heatmap payload
#: Keys every ``heatmap`` payload has (an empty payload, ``{}``, means "no heatmap yet").
HEATMAP_KEYS = ("run_id", "site", "metric", "direction", "rows", "cols", "row_title", "col_title",
                "values", "done", "total", "complete", "state", "baselines", "centre", "inputs")
#: Keys some payloads add: ``path`` (the path view), ``n_pairs``, ``pair``, ``se`` (a dataset),
#: ``estimate``, ``estimate_method`` (the fast preview).
HEATMAP_OPTIONAL_KEYS = ("path", "n_pairs", "pair", "se", "estimate", "estimate_method")

# --------------------------------------------------------------------------- the circuit payload
#: Keys of every ``circuit`` payload (``{}`` means "no circuit yet"; built by
#: :func:`patchwidgets.circuit_view.circuit_payload`).
CIRCUIT_KEYS = ("run_id", "method", "steps", "metric", "direction", "nodes", "edges", "scores", "n_edges", "inputs")

# --------------------------------------------------------------------------- what the page receives
#: The ``contract`` traitlet: all of the above, as JSON.
CONTRACT: dict[str, Any] = {
    "page_fields": list(PAGE_FIELDS),
    "shown_fields": list(SHOWN_FIELDS),
    "static_fields": list(STATIC_FIELDS),
    "sweep_fields": list(SWEEP_FIELDS),
    "path_fields": list(PATH_FIELDS),
    "run_fields": list(RUN_FIELDS),
    "metrics": metric_info(),
    "sites": [[group, [list(option) for option in options]] for group, options in SITE_GROUPS],
    "receiver_inputs": [list(option) for option in RECEIVER_INPUTS],
    "heatmap_keys": list(HEATMAP_KEYS),
    "heatmap_optional_keys": list(HEATMAP_OPTIONAL_KEYS),
    "circuit_fields": list(CIRCUIT_FIELDS),
    "circuit_methods": [list(option) for option in CIRCUIT_METHODS],
    "circuit_keys": list(CIRCUIT_KEYS),
}

SHARED_FILE = "tests/shared/widget_contract.json"


def shared_json(defaults: dict[str, Any]) -> str:
    """The text of :data:`SHARED_FILE`: the contract, and ``defaults`` (every synced
    traitlet's value in a new widget before it has seen its model), which ``js/fake_model.js``
    starts from."""
    about = ("What PatchingWidget sends its page (patchwidgets/widget_contract.py): the contract "
             "traitlet, and every other synced traitlet's default. Written by "
             "scripts/write_widget_contract.py, checked by tests/test_widget.py; js/fake_model.js "
             "builds its state from it. Do not edit by hand.")
    return json.dumps({"_about": about, "contract": CONTRACT, "defaults": defaults},
                      indent=1, ensure_ascii=False) + "\n"
