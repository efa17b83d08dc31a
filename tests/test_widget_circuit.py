"""The widget's circuit view (issue 21 §5), Python side: its drawing rules, its payload and static
picture, and its jobs, each number checked against the core called directly.

* the rules (layout by layer, top k, edge colour and width, curves) against the cases the page's
  unit tests check too (``tests/shared/widget_cases.json``, ``circuit_*``);
* the ``circuit`` payload and the static picture against :class:`EdgeScores` itself;
* the widget driven as the page drives it (``site="circuit"``, Run, ``circuit_k`` set when the
  slider is released, ``circuit_edge`` when an edge is clicked): its scores equal
  :func:`patchwidgets.edge_attribution`'s, its faithfulness :func:`patchwidgets.faithfulness`'s
  of the same top ``k`` edges, its edge value :func:`patchwidgets.edge_patch`'s;
* its job waits for the model's lock and is cancelled while waiting.

``tests/test_widget_circuit_browser.py`` drives the same view in JupyterLab and Chromium.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

import patchwidgets
from patchwidgets import circuit_view as cv
from patchwidgets.edge_attribution import EdgeScores, edge_attribution
from patchwidgets.edge_patching import edge_patch, faithfulness
from patchwidgets.edges import Graph
from patchwidgets.widget import DEFAULT_CLEAN, DEFAULT_CORRUPTED, PatchingWidget
from patchwidgets.widget_contract import CIRCUIT_FIELDS, CIRCUIT_KEYS

SHARED = json.loads((Path(__file__).parent / "shared" / "widget_cases.json").read_text())
ANSWERS = (" Mary", " John")  # what the widget pre-fills for its default prompts
TOY_EDGES = 1519               # toy-ioi: 4 layers x 8 heads, q/k/v apart (patchwidgets.edges' count)


@pytest.fixture(scope="module")
def model():
    return patchwidgets.load_model("toy-ioi")


@pytest.fixture
def widget(model):
    w = PatchingWidget(model, site="circuit")
    yield w
    w.close()


def nan_for_none(values):
    return [math.nan if v is None else v for v in values]


# --------------------------------------------------------------------------- the rules, shared with the page
def test_shared_cases_layout_top_k_style_curve_box():
    for c in SHARED["circuit_layout"]:
        places, rows, n_rows = cv.layout(c["nodes"])
        assert (rows, n_rows) == (c["rows"], c["n_rows"])
        assert [v for p in places for v in p] == pytest.approx([v for p in c["places"] for v in p], abs=1e-12)
    for c in SHARED["circuit_top_k"]:
        assert cv.top_k(nan_for_none(c["scores"]), c["k"]) == c["indices"], c
    for c in SHARED["circuit_style"]:
        width, rgba, opacity = cv.edge_style(math.nan if c["score"] is None else c["score"], c["max_abs"])
        assert (width, None if rgba is None else list(rgba), opacity) == (c["width"], c["rgba"], c["opacity"]), c
    for c in SHARED["circuit_curve"]:
        curve = cv.edge_curve(tuple(c["start"]), tuple(c["end"]), c["span"], c["node_w"])
        assert curve == pytest.approx(c["curve"], abs=1e-9)
    for c in SHARED["circuit_box"]:
        b = cv.box_for(c["nodes"], c["n_rows"], c["width"])
        got = {"left": b.left, "top": b.top, "width": b.width, "height": b.height, "nodeW": b.node_w, "nodeH": b.node_h}
        assert got == pytest.approx(c["box"], abs=1e-9)


def test_layout_stacks_layers_and_keeps_rows_apart(model):
    """Input at the bottom, logits on top, each layer's heads below its MLP; every head of a layer
    in one row, in head order; nothing overlaps."""
    graph = Graph.from_model(model)
    nodes = [cv._node_json(n) for n in graph.nodes]
    places, rows, n_rows = cv.layout(nodes)
    assert n_rows == 2 * 4 + 2
    y = {n["name"]: places[i][1] for i, n in enumerate(nodes)}
    x = {n["name"]: places[i][0] for i, n in enumerate(nodes)}
    assert y["input"] > y["a0.h0"] > y["m0"] > y["a1.h7"] > y["m3"] > y["logits"]
    assert len({y[f"a2.h{h}"] for h in range(8)}) == 1
    assert [x[f"a2.h{h}"] for h in range(8)] == sorted(x[f"a2.h{h}"] for h in range(8))
    assert len(set(places)) == len(places)


def test_top_k_is_edge_scores_top(model):
    """The page's top k (and the payload's order) is EdgeScores.top(k), ties included."""
    graph = Graph.from_model(model)
    scores = torch.randn(graph.n_edges, generator=torch.Generator().manual_seed(0))
    scores[10:20] = 0.5       # ties: graph order
    scores[30:35] = -0.5
    es = EdgeScores(graph, scores, "eap", "denoising", "normalized")
    for k in (0, 1, 7, 25, 300, graph.n_edges):
        assert [graph.edges[i].name for i in cv.top_k(scores.tolist(), k)] == [e.name for e in es.top(k)]


# --------------------------------------------------------------------------- the payload and the static picture
def random_scores(model, seed=0) -> EdgeScores:
    graph = Graph.from_model(model)
    scores = torch.randn(graph.n_edges, generator=torch.Generator().manual_seed(seed)) ** 3
    return EdgeScores(graph, scores, "eap-ig", "denoising", "normalized", steps=5)


def test_payload_has_the_contracts_keys_and_the_strongest_edges_first(model):
    es = random_scores(model)
    payload = cv.circuit_payload(es, {"clean": "x"}, run_id=3)
    assert list(payload) == list(CIRCUIT_KEYS)
    assert payload["n_edges"] == es.graph.n_edges == TOY_EDGES
    assert len(payload["edges"]) == cv.SENT_EDGES
    names = [e[3] for e in payload["edges"]]
    assert names == [e.name for e in es.top(cv.SENT_EDGES)]
    nodes = payload["nodes"]
    for (s, r, inp, name), score in zip(payload["edges"], cv.payload_scores(payload)):
        edge = es.graph.edges[es.graph.index(name)]
        assert (nodes[s]["name"], nodes[r]["name"], inp) == (edge.sender, edge.receiver, edge.input)
        assert score == pytest.approx(float(es.scores[es.graph.index(name)]), rel=1e-6)
    assert (payload["method"], payload["steps"], payload["metric"], payload["direction"]) == (
        "eap-ig", 5, "normalized", "denoising")
    json.dumps({k: v for k, v in payload.items() if k != "scores"})  # (plain JSON, the scores as bytes)


def test_static_picture_draws_the_top_k_with_their_scores(model):
    es = random_scores(model, seed=1)
    payload = cv.circuit_payload(es, {}, run_id=4)
    html = cv.static_circuit_html(payload, "T <b>", k=12, faithfulness={"k": 12, "run_id": 4, "value": 0.75})
    drawn = [part.split('"')[0] for part in html.split('data-edge="')[1:]]
    assert drawn[::-1] == [e.name.replace("<", "&lt;").replace(">", "&gt;") for e in es.top(12)]  # (strongest on top)
    assert html.count('class="pw-node') == len(es.graph.nodes)
    assert "T &lt;b&gt;" in html and "<script" not in html
    assert 'data-faithfulness="0.75"' in html
    top = es.top(1)[0]
    assert f"score {cv.colours.fmt(float(es.scores[es.graph.index(top)]), 4)}</title>" in html
    # A faithfulness of another k (or another circuit) is not printed.
    assert "data-faithfulness" not in cv.static_circuit_html(payload, "T", k=13, faithfulness={"k": 12, "run_id": 4,
                                                                                                 "value": 0.75})
    assert "No circuit yet" in cv.static_circuit_html({}, "T", k=5)
    picture = cv.draw_circuit(es, k=5, faithfulness=0.5)
    assert picture._repr_html_().count('<path class="pw-edge"') == 5 and 'data-faithfulness="0.5"' in picture.html


# --------------------------------------------------------------------------- the widget's jobs
def test_run_scores_every_edge_as_edge_attribution_does(widget, model):
    for method, direction in (("eap-ig", "denoising"), ("eap", "noising")):
        widget.circuit_method, widget.direction = method, direction
        scores = widget.run(wait=True)
        assert widget.status == "done", widget.errors
        ref = edge_attribution(model, DEFAULT_CLEAN, DEFAULT_CORRUPTED, ANSWERS, method=method, metric="normalized",
                               direction=direction, progress=False)
        assert scores is widget.circuit_scores and scores.method == method
        torch.testing.assert_close(scores.scores, ref.scores, atol=1e-6, rtol=1e-5)
        payload = widget.circuit
        assert payload["inputs"] == widget.circuit_inputs() and list(payload["inputs"]) == list(CIRCUIT_FIELDS)
        assert [e[3] for e in payload["edges"][:50]] == [e.name for e in ref.top(50)]


def test_faithfulness_of_the_kept_circuit_is_the_cores(widget, model):
    scores = widget.run(wait=True)
    widget.wait()

    def expected(k):
        return faithfulness(model, DEFAULT_CLEAN, DEFAULT_CORRUPTED, ANSWERS, circuit=scores.top(k),
                            metric="normalized")
    f = widget.circuit_faithfulness
    assert (f["k"], f["state"], f["run_id"]) == (20, "done", widget.circuit["run_id"])
    assert f["value"] == pytest.approx(expected(20), abs=1e-6)
    for k in (50, 3, TOY_EDGES, 0):  # (the slider released at each)
        widget.circuit_k = k
        widget.wait()
        assert widget.circuit_faithfulness["k"] == k
        assert widget.circuit_faithfulness["value"] == pytest.approx(expected(k), abs=1e-6), k
    assert widget.circuit_faithfulness["value"] == pytest.approx(0.0, abs=1e-5)   # the empty circuit
    widget.circuit_k = TOY_EDGES + 100  # past the graph: every edge
    widget.wait()
    assert (widget.circuit_faithfulness["k"], widget.circuit_faithfulness["value"]) == (TOY_EDGES, pytest.approx(1.0))


def test_clicked_edge_is_patched_exactly(widget, model):
    scores = widget.run(wait=True)
    widget.wait()
    unpatched = edge_patch(model, DEFAULT_CLEAN, DEFAULT_CORRUPTED, ANSWERS, edges=[], metric="normalized")
    for edge in (scores.top(1)[0], scores.top(40)[-1]):
        widget.circuit_edge = edge.name
        widget.wait()
        got = widget.circuit_edge_patch
        value = edge_patch(model, DEFAULT_CLEAN, DEFAULT_CORRUPTED, ANSWERS, edges=[edge], metric="normalized")
        assert (got["edge"], got["state"]) == (edge.name, "done")
        assert got["value"] == pytest.approx(value, abs=1e-6)
        assert got["change"] == pytest.approx(value - unpatched, abs=1e-6)
    widget.circuit_edge = "input->logits<q>"
    widget.wait()
    assert widget.circuit_edge_patch["state"] == "error" and "no edge" in widget.circuit_edge_patch["error"]


def test_checks_use_the_prompts_the_edges_were_scored_on(widget, model):
    """Edit the prompts after scoring: the faithfulness and edge values stay those of the graph on
    screen (the stale note tells the user to Run), never a mix of two inputs."""
    scores = widget.run(wait=True)
    widget.wait()
    widget.clean, widget.corrupted = DEFAULT_CORRUPTED, DEFAULT_CLEAN
    widget.circuit_k = 30
    widget.wait()
    assert widget.circuit_faithfulness["value"] == pytest.approx(
        faithfulness(model, DEFAULT_CLEAN, DEFAULT_CORRUPTED, ANSWERS, circuit=scores.top(30), metric="normalized"),
        abs=1e-6)
    assert widget.circuit["inputs"]["clean"] == DEFAULT_CLEAN != widget.clean


def test_dataset_is_scored_as_a_batch(model):
    pairs = [(DEFAULT_CLEAN, DEFAULT_CORRUPTED, " Mary", " John"), (DEFAULT_CORRUPTED, DEFAULT_CLEAN, " John", " Mary")]
    w = PatchingWidget(model, dataset=pairs, site="circuit", circuit_method="eap", metric="logit_diff")
    try:
        scores = w.run(wait=True)
        ref = edge_attribution(model, [p[0] for p in pairs], [p[1] for p in pairs], [(p[2], p[3]) for p in pairs],
                               method="eap", metric="logit_diff", progress=False)
        torch.testing.assert_close(scores.scores, ref.scores, atol=1e-5, rtol=1e-5)
    finally:
        w.close()


def test_metric_without_gradient_is_refused_next_to_the_metric(widget):
    widget.run(wait=True)
    before = widget.circuit["run_id"]
    widget.metric = "rank"
    assert widget.run(wait=True) is None
    assert widget.status == "error" and "gradient" in widget.errors["metric"]
    assert widget.circuit["run_id"] == before, "the last circuit stays"
    widget.metric = "logit_diff"
    assert "metric" not in widget.errors


def test_metric_switch_in_the_circuit_view_starts_no_sweep(widget):
    widget.run(wait=True)
    runs = widget._run_id
    widget.metric = "kl"
    widget.wait()
    assert widget._run_id == runs and widget.heatmap == {}, "the circuit goes stale; Run rescores it"


def test_method_and_k_are_checked(widget):
    widget.circuit_method = "EAP_IG"
    assert widget.circuit_method == "eap-ig"
    with pytest.raises(Exception, match="circuit_method"):
        widget.circuit_method = "acdc"
    with pytest.raises(Exception, match="circuit_k"):
        widget.circuit_k = -1


def test_waits_for_the_models_lock_and_cancels_while_waiting(widget, model):
    """The scoring job takes the model's lock for its passes: while a notebook cell holds it the
    widget says it waits, and Cancel stops it there, leaving the last circuit on screen."""
    widget.run(wait=True)
    shown = widget.circuit["run_id"]
    with patchwidgets.exclusive(model):
        widget.run()
        deadline = time.monotonic() + 30
        while not widget.waiting_for and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "notebook cell" in widget.waiting_for
        widget.cancel()
        assert widget.wait(30), "cancelled while waiting, without the lock"
    assert widget.status == "cancelled"
    assert widget.circuit["run_id"] == shown
    assert widget.run(wait=True) is not None and widget.circuit["run_id"] > shown


def test_page_messages_drive_the_view(widget, model):
    """What the page sends: a Run message carrying the method and k, then the slider's and the
    edge's state updates."""
    widget._handle_custom_msg({"type": "run", "state": {"circuit_method": "eap", "circuit_k": 7}}, [])
    assert widget.wait(120) and widget.status == "done"
    assert widget.circuit["method"] == "eap" and widget.circuit_faithfulness["k"] == 7
    name = widget.circuit["edges"][2][3]
    widget.set_state({"circuit_edge": name})
    widget.wait()
    assert widget.circuit_edge_patch["edge"] == name and widget.circuit_edge_patch["state"] == "done"


def test_export_shows_the_circuit_on_screen(widget):
    widget.circuit_k = 15
    widget.run(wait=True)
    html = widget.export_html()
    assert html.index("pw-static-circuit") < html.index("No heatmap yet"), "the view on screen first"
    assert html.count('<path class="pw-edge"') == 15
    assert f'data-faithfulness="{widget.circuit_faithfulness["value"]}"' in html


def test_circuit_runs_beside_another_caller(widget, model):
    """A notebook cell's patch() while the circuit job runs: both give what they give alone."""
    alone = patchwidgets.patch(model, DEFAULT_CLEAN, DEFAULT_CORRUPTED, ANSWERS, site="resid_pre").grid("normalized")
    ref = edge_attribution(model, DEFAULT_CLEAN, DEFAULT_CORRUPTED, ANSWERS, method="eap-ig", metric="normalized",
                           progress=False)
    results = []
    widget.run()
    thread = threading.Thread(target=lambda: results.append(
        patchwidgets.patch(model, DEFAULT_CLEAN, DEFAULT_CORRUPTED, ANSWERS, site="resid_pre").grid("normalized")))
    thread.start()
    thread.join(120)
    assert widget.wait(120) and widget.status == "done"
    torch.testing.assert_close(results[0], alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(widget.circuit_scores.scores, ref.scores, atol=1e-6, rtol=1e-5)
