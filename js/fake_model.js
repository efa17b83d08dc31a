// A fake anywidget model for the vitest tests (widget.test.js, parts.test.js, contract.test.js):
// get / set / on / off / save_changes / send as anywidget's model proxy has them; the Python side
// is played by `py` (set without saving). Its state starts from what PatchingWidget sends
// (tests/shared/widget_contract.json, written from patchwidgets/widget_contract.py and checked by
// tests/test_widget.py), so it cannot drift from the widget: the `contract` traitlet as Python
// sends it, every other traitlet's default, then a toy model's own values on top.
import shared from "../tests/shared/widget_contract.json";

/** The `contract` traitlet, as PatchingWidget sends it. */
export const CONTRACT = shared.contract;
/** The metrics' labels, scales and bounds (CONTRACT.metrics). */
export const METRIC_INFO = CONTRACT.metrics;
const PAGE = new Set(CONTRACT.page_fields), KNOWN = new Set([...CONTRACT.page_fields, ...CONTRACT.shown_fields]);

export class FakeModel {
  constructor(state) { this.state = { ...state }; this.handlers = new Map(); this.sent = []; this.saved = []; this.python = false; }
  // Like a real widget, the model has no traitlets beyond the contract's, and the page may set only
  // its page_fields: a page that reads or writes anything else fails every test that gets there.
  get(name) {
    if (!KNOWN.has(name)) throw new Error(`the page read ${JSON.stringify(name)}, which is not a traitlet of the contract`);
    return this.state[name];
  }
  set(name, value) {
    if (!this.python && !PAGE.has(name)) throw new Error(`the page set ${JSON.stringify(name)}, which is not among the contract's page_fields`);
    const old = this.state[name];
    this.state[name] = value;
    if (old !== value) this.trigger(`change:${name}`);
  }
  save_changes() { this.saved.push({ ...this.state }); }
  send(msg) { this.sent.push(msg); }
  on(name, fn) { if (!this.handlers.has(name)) this.handlers.set(name, []); this.handlers.get(name).push(fn); }
  off(name, fn) { this.handlers.set(name, (this.handlers.get(name) || []).filter((f) => f !== fn)); }
  trigger(name, ...args) { for (const fn of this.handlers.get(name) || []) fn(...args); }
  /** Python sets traitlets (any of them, without save_changes). */
  py(values) {
    this.python = true;
    try { for (const [k, v] of Object.entries(values)) this.set(k, v); } finally { this.python = false; }
  }
}

/** Little-endian float32 bytes, as the widget manager hands over a bytes traitlet. */
export const f32 = (values) => new DataView(new Float32Array(values).buffer);

/** A 2-layer x 3-position heatmap payload of `metric` (row-major values). */
export function heatmap(metric, values, extra = {}) {
  return {
    run_id: 1, site: "resid_pre", metric, direction: "denoising", state: "done",
    rows: [{ layer: 0, label: "0" }, { layer: 1, label: "1" }],
    cols: [{ pos: 0, label: "A", token: "A" }, { pos: 1, label: "B", token: "B" }, { pos: 2, label: "C", token: "C" }],
    row_title: "layer", col_title: "position", values: f32(values), done: 6, total: 6, complete: true,
    baselines: {}, centre: null, inputs: {}, ...extra,
  };
}

/** What a toy model (2 layers, 2 heads, prompts "a b c" / "a x c") puts in a fresh widget. */
export const TOY = {
  clean: "a b c", corrupted: "a x c", correct: " b", incorrect: " x", model_name: "toy",
  model_info: { n_layers: 2, n_heads: 2 }, tokens: { clean: ["a", "b", "c"], corrupted: ["a", "x", "c"] },
};

/** A model with every traitlet the widget has, as a fresh PatchingWidget on the toy model has them. */
export function fakeModel(state = {}) {
  return new FakeModel({ ...structuredClone(shared.defaults), contract: CONTRACT, ...TOY, ...state });
}

/** The nodes of a 2-layer, 2-head model's graph (as Graph.from_model names them). */
export const CIRCUIT_NODES = [
  { name: "input", kind: "input", layer: -1, head: null },
  { name: "a0.h0", kind: "head", layer: 0, head: 0 }, { name: "a0.h1", kind: "head", layer: 0, head: 1 },
  { name: "m0", kind: "mlp", layer: 0, head: null },
  { name: "a1.h0", kind: "head", layer: 1, head: 0 }, { name: "a1.h1", kind: "head", layer: 1, head: 1 },
  { name: "m1", kind: "mlp", layer: 1, head: null },
  { name: "logits", kind: "logits", layer: 2, head: null },
];

/**
 * A `circuit` payload on CIRCUIT_NODES: `edges` as [sender name, receiver name, input, score],
 * sent in the order given (Python sends them strongest first); n_edges defaults to their number.
 */
export function circuit(edges, extra = {}) {
  const at = new Map(CIRCUIT_NODES.map((n, i) => [n.name, i]));
  return {
    run_id: 7, method: "eap-ig", steps: 5, metric: "normalized", direction: "denoising", nodes: CIRCUIT_NODES,
    edges: edges.map(([s, r, input]) => [at.get(s), at.get(r), input, `${s}->${r}${input === "in" ? "" : `<${input}>`}`]),
    scores: f32(edges.map((e) => e[3])), n_edges: edges.length, inputs: {}, ...extra,
  };
}

/** Eight edges of the toy graph, strongest first (scores of both signs). */
export const TOY_EDGES = [
  ["a1.h0", "logits", "in", 0.8], ["a0.h1", "a1.h0", "q", -0.5], ["input", "a0.h1", "v", 0.4], ["m0", "m1", "in", -0.3],
  ["a0.h0", "a1.h0", "k", 0.2], ["a1.h1", "logits", "in", -0.1], ["input", "m0", "in", 0.05], ["a0.h0", "logits", "in", 0.01],
];
