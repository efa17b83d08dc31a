// @vitest-environment jsdom
// The circuit view of patchwidgets/static/widget.js: its pure rules against the cases Python checks
// too (tests/shared/widget_cases.json, circuit_*: patchwidgets/circuit_view.py), the slider's stops,
// keyboard moves, and the part (makeCircuit, makeCircuitPanel) and render() on a fake model.
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterEach, beforeAll, describe, expect, it } from "vitest";
import widget, {
  circuitBox, circuitLayout, edgeCurve, edgeMove, edgeStyle, edgeWords, kSteps, makeCircuit, makeCircuitPanel,
  makeContext, stepIndex, topEdges,
} from "../patchwidgets/static/widget.js";
import { CIRCUIT_NODES, TOY_EDGES, circuit, fakeModel } from "./fake_model.js";

const here = dirname(fileURLToPath(import.meta.url));
const cases = JSON.parse(readFileSync(join(here, "..", "tests", "shared", "widget_cases.json"), "utf8"));

beforeAll(() => {
  globalThis.ResizeObserver = class { observe() {} disconnect() {} };
});
afterEach(() => document.body.replaceChildren());

const key = (target, k) => target.dispatchEvent(new KeyboardEvent("keydown", { key: k, bubbles: true, cancelable: true }));

describe("shared cases (also checked by tests/test_widget_circuit.py)", () => {
  it("lays nodes out by layer as Python does", () => {
    for (const c of cases.circuit_layout) {
      const { places, rows, nRows } = circuitLayout(c.nodes);
      expect(rows).toEqual(c.rows);
      expect(nRows).toBe(c.n_rows);
      places.forEach((p, i) => { expect(p[0]).toBeCloseTo(c.places[i][0], 12); expect(p[1]).toBeCloseTo(c.places[i][1], 12); });
    }
  });
  it("keeps the same top k edges as Python does", () => {
    for (const c of cases.circuit_top_k) {
      expect(topEdges(c.scores.map((v) => (v === null ? NaN : v)), c.k), JSON.stringify(c)).toEqual(c.indices);
    }
  });
  it("gives edges the width, colour and opacity Python gives them", () => {
    for (const c of cases.circuit_style) {
      expect(edgeStyle(c.score === null ? NaN : c.score, c.max_abs), JSON.stringify(c)).toEqual({ width: c.width, rgba: c.rgba, opacity: c.opacity });
    }
  });
  it("draws the same curves and plot area as Python", () => {
    for (const c of cases.circuit_curve) edgeCurve(c.start, c.end, c.span, c.node_w).forEach((v, i) => expect(v).toBeCloseTo(c.curve[i], 9));
    for (const c of cases.circuit_box) {
      const b = circuitBox(c.nodes, c.n_rows, c.width);
      for (const [k, v] of Object.entries(c.box)) expect(b[k], k).toBeCloseTo(v, 9);
    }
  });
});

describe("the rules", () => {
  it("puts the input at the bottom, each layer's heads below its MLP, the logits on top", () => {
    const { places, rows, nRows } = circuitLayout(CIRCUIT_NODES);
    expect(nRows).toBe(6);
    expect(rows).toEqual([0, 1, 1, 2, 3, 3, 4, 5]);
    const y = (name) => places[CIRCUIT_NODES.findIndex((n) => n.name === name)][1];
    expect(y("input")).toBeGreaterThan(y("a0.h0"));
    expect(y("a0.h0")).toBeGreaterThan(y("m0"));
    expect(y("m0")).toBeGreaterThan(y("a1.h1"));
    expect(y("m1")).toBeGreaterThan(y("logits"));
    expect(places[1][0]).toBeLessThan(places[2][0]); // head 0 left of head 1
  });

  it("ranks by |score|, so a strong negative edge is kept before a weak positive one", () => {
    expect(topEdges([0.1, -0.9, 0.5], 2)).toEqual([1, 2]);
    expect(topEdges([0.1, -0.9, 0.5], 10)).toEqual([1, 2, 0]);
  });

  it("slider stops: every k to 10, then about ten a decade, and the whole graph", () => {
    expect(kSteps(0)).toEqual([0]);
    expect(kSteps(5)).toEqual([1, 2, 3, 4, 5]);
    expect(kSteps(30)).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 20, 25, 30]);
    for (const n of [1519, 32491]) {
      const steps = kSteps(n);
      expect(steps.at(-1)).toBe(n);
      for (let i = 1; i < steps.length; i++) expect(steps[i]).toBeGreaterThan(steps[i - 1]);
      expect(steps.length).toBeLessThan(50);
    }
    expect(kSteps(32491)).toContain(1000);
    const steps = kSteps(1519);
    expect(steps[stepIndex(steps, 20)]).toBe(20);
    expect(steps[stepIndex(steps, 37)]).toBe(40);
    expect(steps[stepIndex(steps, 99999)]).toBe(1519);
  });

  it("arrow keys follow the ranking sideways and the circuit up and down", () => {
    // 0: input->a (strongest), 1: a->b, 2: b->logits, 3: input->b, 4: a->logits
    const edges = [[0, 1], [1, 2], [2, 3], [0, 2], [1, 3]];
    expect(edgeMove(edges, 0, "ArrowRight")).toBe(1);
    expect(edgeMove(edges, 4, "ArrowRight")).toBe(4);
    expect(edgeMove(edges, 0, "ArrowLeft")).toBe(0);
    expect(edgeMove(edges, 3, "Home")).toBe(0);
    expect(edgeMove(edges, 0, "End")).toBe(4);
    expect(edgeMove(edges, 0, "ArrowUp")).toBe(1);   // input->a, then the strongest edge out of a
    expect(edgeMove(edges, 1, "ArrowUp")).toBe(2);   // a->b, then b->logits
    expect(edgeMove(edges, 2, "ArrowUp")).toBe(2);   // nothing leaves the logits
    expect(edgeMove(edges, 2, "ArrowDown")).toBe(1); // b->logits, then the strongest edge into b
    expect(edgeMove(edges, 0, "ArrowDown")).toBe(0); // nothing enters the input
    expect(edgeMove(edges, 0, "a")).toBeNull();
  });

  it("names edges in words, the input only for heads", () => {
    expect(edgeWords(CIRCUIT_NODES[2], CIRCUIT_NODES[4], "q")).toBe("head 0.1 \u2192 head 1.0 (query)");
    expect(edgeWords(CIRCUIT_NODES[0], CIRCUIT_NODES[3], "in")).toBe("the input embeddings \u2192 MLP 0");
    expect(edgeWords(CIRCUIT_NODES[6], CIRCUIT_NODES[7], "in")).toBe("MLP 1 \u2192 the logits");
  });
});

describe("makeCircuit", () => {
  function part(state = {}) {
    const model = fakeModel({ site: "circuit", circuit: circuit(TOY_EDGES), circuit_k: 3, ...state });
    const ctx = makeContext(model);
    document.body.append(ctx.root);
    const selected = [];
    const p = makeCircuit(ctx, { onSelectEdge: (name) => { selected.push(name); ctx.save("circuit_edge", name); } });
    ctx.root.append(p.el);
    // (what render's table does: redraw on the traitlets this part shows)
    for (const name of ["circuit", "circuit_k"]) model.on(`change:${name}`, p.update);
    for (const name of ["circuit_faithfulness", "circuit_edge_patch", "circuit_edge"]) model.on(`change:${name}`, p.updateChecks);
    p.update();
    // The drawn edges, strongest first (the DOM has them weakest first: the strongest on top).
    const edges = () => [...p.el.querySelectorAll("g.pw-edge")].sort((a, b) => Number(a.dataset.rank) - Number(b.dataset.rank));
    const slider = p.el.querySelector("input[data-control='circuit_k']");
    return { model, root: ctx.root, part: p, selected, edges, slider };
  }

  it("draws the k strongest edges, coloured by sign and as wide as strong, on every node", () => {
    const { edges, root, part: p } = part();
    expect(edges().map((g) => g.dataset.edge)).toEqual(["a1.h0->logits", "a0.h1->a1.h0<q>", "input->a0.h1<v>"]);
    const line = (g) => g.querySelector(".pw-edge-line");
    expect(line(edges()[0]).getAttribute("stroke")).toBe("rgb(33,102,172)"); // positive: blue
    expect(line(edges()[1]).getAttribute("stroke")).toBe("rgb(178,24,43)");  // negative: red
    expect(Number(line(edges()[0]).getAttribute("stroke-width"))).toBe(6);
    expect(Number(line(edges()[1]).getAttribute("stroke-width"))).toBeCloseTo(1 + 5 * 0.5 / 0.8, 2);
    expect(p.el.querySelectorAll("g.pw-node").length).toBe(CIRCUIT_NODES.length);
    const idle = [...p.el.querySelectorAll("g.pw-node-idle")].map((g) => g.dataset.node).sort();
    expect(idle).toEqual(["a0.h0", "a1.h1", "m0", "m1"]);
    expect(root.dataset.circuitK).toBe("3");
    expect(root.dataset.circuitDrawn).toBe("3");
    expect(edges()[1].getAttribute("aria-label")).toBe("head 0.1 \u2192 head 1.0 (query): score -0.5");
    expect(p.el.querySelector(".pw-k-readout").textContent).toBe("3 of 8");
    // The strongest edge is drawn last (on top).
    expect(p.el.querySelector("g.pw-edges").lastElementChild.dataset.edge).toBe("a1.h0->logits");
  });

  it("moving the slider redraws at once; releasing it saves circuit_k", () => {
    const { model, slider, edges } = part();
    slider.value = String(4); // stops 1..8: the fifth is 5
    slider.dispatchEvent(new Event("input"));
    expect(edges().length).toBe(5);
    expect(model.get("circuit_k")).toBe(3);
    expect(model.saved.length).toBe(0);
    slider.dispatchEvent(new Event("change"));
    expect(model.get("circuit_k")).toBe(5);
    expect(model.saved.at(-1).circuit_k).toBe(5);
  });

  it("shows the faithfulness of exactly the circuit on screen", () => {
    const { model, root, part: p, slider } = part();
    const faith = () => p.el.querySelector(".pw-faithfulness");
    model.py({ circuit_faithfulness: { run_id: 7, k: 3, state: "running", value: null } });
    expect(faith().textContent).toContain("computing");
    model.py({ circuit_faithfulness: { run_id: 7, k: 3, state: "done", value: 0.8125 } });
    expect(faith().textContent).toBe("faithfulness of these 3 edges: 0.813");
    expect(root.dataset.faithfulness).toBe("0.8125");
    model.py({ circuit_faithfulness: { run_id: 6, k: 3, state: "done", value: 0.5 } }); // another circuit's
    expect(root.dataset.faithfulness).toBeUndefined();
    model.py({ circuit_faithfulness: { run_id: 7, k: 3, state: "done", value: 0.8125 } });
    slider.value = "5";
    slider.dispatchEvent(new Event("input")); // dragging: the number is for k = 3, not 6
    expect(faith().textContent).toBe("release to compute the faithfulness");
    expect(root.dataset.faithfulness).toBeUndefined();
  });

  it("a click selects an edge; its exact patch is shown next to its score", () => {
    const { model, edges, selected, part: p, root } = part();
    edges()[1].querySelector(".pw-edge-hit").dispatchEvent(new MouseEvent("click", { bubbles: true }));
    expect(selected).toEqual(["a0.h1->a1.h0<q>"]);
    expect(edges()[1].classList.contains("pw-edge-selected")).toBe(true);
    const info = () => p.el.querySelector(".pw-edge-info").textContent;
    expect(info()).toBe("head 0.1 \u2192 head 1.0 (query): score -0.5 (EAP-IG estimate)");
    model.py({ circuit_edge_patch: { run_id: 7, edge: "a0.h1->a1.h0<q>", state: "running", value: null } });
    expect(info()).toContain("computing");
    model.py({ circuit_edge_patch: { run_id: 7, edge: "a0.h1->a1.h0<q>", state: "done", value: -0.4321, change: -0.4321 } });
    expect(info()).toBe("head 0.1 \u2192 head 1.0 (query): score -0.5 (EAP-IG estimate) \u00b7 exact: -0.4321 when patched alone (normalized -0.4321)");
    expect(root.dataset.edgePatch).toBe("-0.4321");
    // Another edge's value (or another circuit's) is not this edge's.
    model.py({ circuit_edge_patch: { run_id: 6, edge: "a1.h0->logits", state: "done", value: 0.9, change: 0.9 } });
    expect(info()).toContain("-0.4321");
    edges()[0].dispatchEvent(new MouseEvent("click", { bubbles: true }));
    expect(info()).toBe("the logits: score +0.8 (EAP-IG estimate)".replace("the logits", "head 1.0 \u2192 the logits"));
    expect(root.dataset.edgePatch).toBeUndefined();
  });

  it("is one tab stop; arrows move between edges, Enter selects", () => {
    const { edges, selected } = part({ circuit_k: 8 });
    expect(edges().filter((g) => g.getAttribute("tabindex") === "0").map((g) => g.dataset.rank)).toEqual(["0"]);
    edges()[0].focus();
    key(edges()[0], "ArrowRight");
    expect(document.activeElement.dataset.edge).toBe("a0.h1->a1.h0<q>");
    key(document.activeElement, "ArrowDown"); // into head 0.1: input -> a0.h1 <v>
    expect(document.activeElement.dataset.edge).toBe("input->a0.h1<v>");
    key(document.activeElement, "ArrowUp"); // out of head 0.1 again
    expect(document.activeElement.dataset.edge).toBe("a0.h1->a1.h0<q>");
    key(document.activeElement, "ArrowUp"); // out of head 1.0: to the logits
    expect(document.activeElement.dataset.edge).toBe("a1.h0->logits");
    key(document.activeElement, "End");
    expect(document.activeElement.dataset.edge).toBe("a0.h0->logits");
    expect(edges().filter((g) => g.getAttribute("tabindex") === "0").length).toBe(1);
    key(document.activeElement, "Enter");
    expect(selected).toEqual(["a0.h0->logits"]);
  });

  it("keeps the focused edge across a redraw", () => {
    const { edges, model } = part({ circuit_k: 8 });
    edges()[0].focus();
    key(edges()[0], "ArrowRight");
    model.py({ circuit_k: 5 });
    expect(document.activeElement.dataset.edge).toBe("a0.h1->a1.h0<q>");
  });

  it("says when the inputs changed since the edges were scored", () => {
    const inputs = { clean: "a b c", corrupted: "a x c", correct: " b", incorrect: " x", direction: "denoising",
      metric: "normalized", dataset: [], circuit_method: "eap-ig" };
    const { model, part: p } = part({ circuit: circuit(TOY_EDGES, { inputs }) });
    const stale = () => !p.el.querySelector(".pw-stale").classList.contains("pw-hidden");
    expect(stale()).toBe(false);
    model.py({ circuit_method: "eap" });
    p.markStale();
    expect(stale()).toBe(true);
  });

  it("draws only the edges it was sent, and says so, for a k past them", () => {
    const { part: p, edges } = part({ circuit: circuit(TOY_EDGES, { n_edges: 1519 }), circuit_k: 100 });
    expect(edges().length).toBe(8);
    expect(p.el.querySelector(".pw-k-readout").textContent).toBe("100 of 1519 (the 8 strongest drawn)");
  });

  it("before any circuit: an empty view, the slider off", () => {
    const { part: p, slider } = part({ circuit: {} });
    expect(p.el.querySelector(".pw-empty").textContent).toContain("press Run");
    expect(slider.disabled).toBe(true);
  });
});

describe("in the widget", () => {
  function mount(state = {}) {
    const model = fakeModel(state);
    const el = document.createElement("div");
    document.body.append(el);
    widget.render({ model, el });
    return { model, root: el.querySelector(".pw-root") };
  }

  it("the circuit component swaps the heatmap for the circuit view, and offers the methods", () => {
    const { model, root } = mount({ circuit: circuit(TOY_EDGES) });
    const shown = (sel) => !root.querySelector(sel).classList.contains("pw-hidden");
    expect(shown(".pw-heatmap-panel")).toBe(true);
    expect(shown(".pw-circuit-panel")).toBe(false);
    model.set("site", "circuit");
    expect(shown(".pw-heatmap-panel")).toBe(false);
    expect(shown(".pw-side")).toBe(false);
    expect(shown(".pw-circuit-panel")).toBe(true);
    expect(shown("[data-panel='circuit']")).toBe(true);
    expect(root.dataset.view).toBe("circuit");
    expect(root.querySelectorAll("g.pw-edge").length).toBe(8); // (k = 20 by default: all eight)
    expect([...root.querySelectorAll("select[data-control='circuit_method'] option")].map((o) => o.value)).toEqual(["eap", "eap-ig"]);
    expect(root.querySelector("input[data-control='fast_preview']").disabled).toBe(true);
    model.py({ status: "running" });
    expect(root.querySelector(".pw-progress-text").textContent).toBe("scoring every edge with EAP-IG\u2026");
    model.py({ status: "done", elapsed: 0.25 });
    expect(root.querySelector(".pw-progress-text").textContent).toBe("8 edges scored in 0.25 s");
  });

  it("keeps the notebook's shortcut keys out of the graph", () => {
    const { root, model } = mount({ circuit: circuit(TOY_EDGES), site: "circuit" });
    let reached = 0;
    document.body.addEventListener("keydown", () => { reached += 1; });
    const g = root.querySelector("g.pw-edge");
    key(g, "a");
    expect(reached).toBe(0);
    expect(model.get("circuit_edge")).toBe("");
  });

  it("makeCircuitPanel shows the method chosen and saves a new one", () => {
    const model = fakeModel({ site: "circuit" });
    const ctx = makeContext(model);
    const p = makeCircuitPanel(ctx);
    p.update();
    const select = p.el.querySelector("select");
    expect(select.value).toBe("eap-ig");
    select.value = "eap";
    select.dispatchEvent(new Event("change"));
    expect(model.get("circuit_method")).toBe("eap");
  });
});
