// A fake anywidget model for the vitest tests (widget.test.js, parts.test.js): get / set / on /
// off / save_changes / send as anywidget's model proxy has them; the Python side is played by
// `py` (set without saving). Plus the payloads and model state those tests share.

export const METRIC_INFO = {
  normalized: { scale: "diverging", label: "", high_means: "the patch gave the source run's behaviour", lo: null, hi: null },
  logit_diff: { scale: "diverging", label: "", high_means: "the correct answer is preferred", lo: null, hi: null },
  prob: { scale: "sequential", label: "", high_means: "the correct answer is likely", lo: 0, hi: 1 },
  rank: { scale: "sequential", label: "", high_means: "the correct answer is far down the ranking (worse)", lo: 1, hi: null },
  kl: { scale: "sequential", label: "", high_means: "", lo: 0, hi: null },
  logprob: { scale: "sequential", label: "", high_means: "", lo: null, hi: 0 },
  accuracy: { scale: "sequential", label: "", high_means: "", lo: 0, hi: 1 },
};

export class FakeModel {
  constructor(state) { this.state = { ...state }; this.handlers = new Map(); this.sent = []; this.saved = []; }
  get(name) { return this.state[name]; }
  set(name, value) { const old = this.state[name]; this.state[name] = value; if (old !== value) this.trigger(`change:${name}`); }
  save_changes() { this.saved.push({ ...this.state }); }
  send(msg) { this.sent.push(msg); }
  on(name, fn) { if (!this.handlers.has(name)) this.handlers.set(name, []); this.handlers.get(name).push(fn); }
  off(name, fn) { this.handlers.set(name, (this.handlers.get(name) || []).filter((f) => f !== fn)); }
  trigger(name, ...args) { for (const fn of this.handlers.get(name) || []) fn(...args); }
  py(values) { for (const [k, v] of Object.entries(values)) this.set(k, v); }
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
    baselines: {}, inputs: {}, ...extra,
  };
}

/** A model with every traitlet the widget reads, as a fresh PatchingWidget has them. */
export function fakeModel(state = {}) {
  return new FakeModel({
    clean: "a b c", corrupted: "a x c", correct: " b", incorrect: " x", direction: "denoising", metric: "normalized",
    site: "resid_pre", receivers: "", receiver_input: "q", fast_preview: true, auto_run: false, selected: {},
    pattern_layer: 0, pattern_head: 0, model_name: "toy", model_info: { n_layers: 2, n_heads: 2 },
    metric_options: Object.keys(METRIC_INFO), metric_info: METRIC_INFO, site_options: [["g", [["resid_pre", "residual"], ["path", "path"]]]],
    tokens: { clean: ["a", "b", "c"], corrupted: ["a", "x", "c"] }, baseline: {}, errors: {}, status: "idle",
    progress: [0, 0], elapsed: 0, heatmap: {}, explanation: "", pattern: {}, dataset: [], ...state,
  });
}
