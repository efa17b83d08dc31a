// @ts-check
// The front end of patchwidgets.PatchingWidget: a plain ES module, no build step.
//
// anywidget calls `render({ model, el })` once per view. `model` holds the synced traitlets
// (model.get / model.set + model.save_changes / model.on("change:x")); Python owns the
// patching model and does all the computing, this file only draws state and reports clicks.
//
// Safety rule: every string that comes from data (prompts, tokens, error messages) reaches
// the DOM through textContent or setAttribute, never innerHTML, so a prompt such as
// `<img src=x onerror=alert(1)>` shows up as text.
//
// Binary data: the heatmap values and attention patterns arrive as little-endian float32
// buffers (DataView), NaN marking cells that are not computed yet.
//
// Fast preview: a heatmap may also carry `estimate`, the attribution-patching estimate of
// every cell in the same layout. A cell without its exact value yet is painted from the
// estimate and marked approximate (class pw-approx, data-approx, a hatched overlay); it
// loses the mark as soon as its exact value arrives.
//
// Layout of this file: pure helpers (numbers, colours, grid views; shared with Python through
// tests/shared/widget_cases.json), then the view's parts, one factory each (makeInputs,
// makeTokens, makeControls, makePathPanel, makeDataset, makeKernelLink, makeStatus,
// makeHeatmap, makeCircuitPanel and makeCircuit (the circuit view, with its own pure helpers),
// makeExplainPanel) built on one shared context (makeContext), then `render`, which wires them
// together and subscribes them to the model.

const SVG_NS = "http://www.w3.org/2000/svg";

// ------------------------------------------------------------ the model and its state
// What Python and this page agree on is written once, in patchwidgets/widget_contract.py, and
// arrives as the `contract` traitlet: which traitlets the page may set, which a sweep reads (the
// stale check), which a Run message carries, the metrics' labels and scales, the sites, the
// receiver inputs and the heatmap's keys. The page reads them from there and keeps no copies.
// The typedefs below name the same traitlets and keys; js/contract.test.js checks that they
// and the page's controls cover the contract (tests/shared/widget_contract.json).

/**
 * What the page needs of a metric (widget_contract.metric_info).
 * @typedef {Object} MetricInfo
 * @property {string} label a few words, for the menu and the caption
 * @property {string} scale "diverging" (signed, 0 = no effect) or "sequential" (one sign)
 * @property {string} high_means what a high value means, for the legend
 * @property {number|null} lo the natural lower bound, if any
 * @property {number|null} hi the natural upper bound, if any
 */
/**
 * The `contract` traitlet (patchwidgets/widget_contract.py CONTRACT).
 * @typedef {Object} Contract
 * @property {Field[]} page_fields every traitlet the page may set
 * @property {Field[]} shown_fields every traitlet only Python sets
 * @property {Field[]} static_fields shown fields set once, when the widget is made
 * @property {Field[]} sweep_fields what a sweep reads: a heatmap whose `inputs` differ from them is stale
 * @property {Field[]} path_fields sweep fields that count only in the path view
 * @property {Field[]} run_fields what a Run message may set (the page sends the edited ones)
 * @property {Object<string, MetricInfo>} metrics the built-in metrics, in menu order
 * @property {Array<[string, Array<[string, string]>]>} sites the component menu: [group, [[value, label], ...]]
 * @property {Array<[string, string]>} receiver_inputs the path view's receiver inputs: [value, label]
 * @property {string[]} heatmap_keys keys of every heatmap payload
 * @property {string[]} heatmap_optional_keys keys some payloads add
 * @property {Field[]} circuit_fields what a circuit job reads: a circuit whose `inputs` differ from them is stale
 * @property {Array<[string, string]>} circuit_methods the circuit view's edge-scoring methods: [value, label]
 * @property {string[]} circuit_keys keys of every circuit payload
 */
/**
 * One row or column of the heatmap: the indices of its cells, a short label, and for a
 * position its clean and corrupted tokens.
 * @typedef {{layer?: number, head?: number, pos?: number, label: string, token?: string,
 *            corrupted_token?: string, diff?: boolean}} Cell
 */
/**
 * The receivers of a path-patching sweep.
 * @typedef {{label: string, receivers: number[][]|null, receiver_input: string}} PathInfo
 */
/**
 * The `heatmap` traitlet (patchwidgets/widget_payload.py heatmap_payload): one metric of one
 * sweep, as a rows x cols table. Its keys are the contract's heatmap_keys and, optional here,
 * its heatmap_optional_keys.
 * @typedef {Object} Heatmap
 * @property {number} run_id the job that made it
 * @property {string} site
 * @property {string} metric
 * @property {string} direction
 * @property {Cell[]} rows
 * @property {Cell[]} cols
 * @property {string} row_title
 * @property {string} col_title
 * @property {DataView} values row-major float32, NaN for cells not computed yet
 * @property {number} done cells with an exact value
 * @property {number} total
 * @property {boolean} complete
 * @property {string} state the sweep's state when this picture was taken: running, done or cancelled
 * @property {Object<string, number|null>} baselines the unpatched runs' values of the metric
 * @property {Centre|null} centre a raw metric's neutral middle (the target run's value), else null
 * @property {Partial<State>} inputs the sweep fields as the sweep read them
 * @property {PathInfo} [path] a path-patching sweep's receivers
 * @property {number} [n_pairs] a dataset: how many prompt pairs
 * @property {number} [pair] a dataset: the pair shown, or -1 for the mean
 * @property {DataView} [se] a dataset's mean: the standard error of each cell
 * @property {DataView} [estimate] the fast preview's estimate of every cell, same layout as values
 * @property {string} [estimate_method] how the estimate was made ("atp")
 */
/**
 * One head's attention on one prompt.
 * @typedef {{tokens: string[], n: number, values: DataView}} PatternView
 */
/**
 * Every synced traitlet (the contract's page_fields, then its shown_fields).
 * @typedef {Object} State
 * @property {string} clean
 * @property {string} corrupted
 * @property {string} correct
 * @property {string} incorrect
 * @property {string} direction
 * @property {string} site
 * @property {string} receivers
 * @property {string} receiver_input
 * @property {string[][]} dataset
 * @property {string} metric
 * @property {boolean} fast_preview
 * @property {boolean} auto_run
 * @property {number} pair
 * @property {{row?: number, col?: number}} selected
 * @property {number} pattern_layer
 * @property {number} pattern_head
 * @property {string} circuit_method "eap" or "eap-ig"
 * @property {number} circuit_k edges kept in the circuit view (the strongest by |score|)
 * @property {string} circuit_edge the edge clicked in the circuit view (its name), or ""
 * @property {Contract} contract
 * @property {string} model_name
 * @property {{n_layers: number, n_heads: number}} model_info
 * @property {{clean?: string[]|null, corrupted?: string[]|null}} tokens
 * @property {{clean?: number|null, corrupted?: number|null, clean_top?: string|null, corrupted_top?: string|null}} baseline
 * @property {Object<string, string>} errors {field: message}
 * @property {string} status idle, running, done, cancelled or error
 * @property {number[]} progress [patches done, total]
 * @property {string} waiting_for
 * @property {number} elapsed
 * @property {Heatmap|{rows?: undefined}} heatmap {} before the first sweep
 * @property {string} explanation
 * @property {{layer?: number, head?: number, error?: string, clean?: PatternView, corrupted?: PatternView}} pattern
 * @property {Circuit|{nodes?: undefined}} circuit {} before the first circuit
 * @property {CircuitCheck} circuit_faithfulness the kept circuit's faithfulness, exact
 * @property {CircuitCheck} circuit_edge_patch the clicked edge patched alone, exact
 */
/** @typedef {keyof State} Field */
/** The text traitlets (prompts, answers, receivers, ...). @typedef {{[K in Field]: State[K] extends string ? K : never}[Field]} TextName */
/**
 * The anywidget model, as this page uses it.
 * @typedef {Object} Model
 * @property {<K extends Field>(name: K) => State[K]} get
 * @property {<K extends Field>(name: K, value: State[K]) => void} set
 * @property {() => void} save_changes
 * @property {(msg: Object<string, any>) => void} send
 * @property {(event: string, fn: Function) => void} on
 * @property {(event: string, fn: Function) => void} off
 */

/**
 * The heatmap payload, or null before the first one.
 * @param {Model} model @returns {Heatmap|null}
 */
export function heatmapOf(model) {
  const p = model.get("heatmap");
  return p && p.rows !== undefined && p.rows.length ? p : null;
}

/**
 * Create an HTML element. Strings among `children` become text nodes (never parsed).
 * @param {string} tag
 * @param {Object<string, string>} [attrs]
 * @param {...(Node|string)} children
 * @returns {HTMLElement}
 */
function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children) node.append(typeof c === "string" ? document.createTextNode(c) : c);
  return node;
}

/**
 * Create an SVG element with attributes.
 * @param {string} tag
 * @param {Object<string, string|number>} [attrs]
 * @returns {SVGElement}
 */
function s(tag, attrs = {}) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

/**
 * Float32 values from whatever the widget manager hands us for a bytes traitlet.
 * @param {DataView|ArrayBuffer|ArrayBufferView|null|undefined} buf
 * @returns {Float32Array}
 */
export function floats(buf) {
  if (!buf) return new Float32Array(0);
  const view = buf instanceof DataView ? buf
    : buf instanceof ArrayBuffer ? new DataView(buf)
    : ArrayBuffer.isView(buf) ? new DataView(buf.buffer, buf.byteOffset, buf.byteLength)
    : null;
  if (!view) return new Float32Array(0);
  const out = new Float32Array(Math.floor(view.byteLength / 4));
  for (let i = 0; i < out.length; i++) out[i] = view.getFloat32(i * 4, true);
  return out;
}

// Colours follow patchwidgets/widget_colour.py exactly (tests/shared/widget_cases.json checks
// both; `scale` below is the one entry point, like widget_colour.scale): "no effect" is never
// coloured. A raw metric (logit_diff, logit, logprob) is coloured by its change from the
// unpatched target run: the payload's `centre` (Python works it out, per pair for one pair of
// a dataset) is the neutral middle, blue above, red below, the range reaching at least the
// source run's value. normalized is blue above 0 and red below; a one-sign metric (kl, prob,
// rank, accuracy) is one hue from exactly its natural bound (info.lo / info.hi: a KL of -5e-8
// is float noise, not a reason for a negative tick). A colour is [r, g, b, alpha]: the hue and
// how much of it covers the background, so "no effect" is the theme's background.
export const RED = [178, 24, 43], BLUE = [33, 102, 172], PURPLE = [84, 39, 143];

/**
 * @typedef {[number, number, number, number]} RGBA
 * @typedef {{value: number, run: string, source?: number|null, source_run?: string|null}} Centre
 * @typedef {{kind: string, lo: number, hi: number, mid: number|null, centre: Centre|null}} Scale
 */

/**
 * The range the colours span. Centred on `mid` (a raw metric's target-run value) or 0 for a
 * diverging metric, symmetric and reaching at least `source` (normalized: at least -1..1), cut
 * at the metric's natural bounds; for a sequential one, from its bound exactly (info.lo,
 * info.hi) to the data's other end.
 * @param {string} metric
 * @param {ArrayLike<number>} values
 * @param {MetricInfo|undefined} info
 * @param {number|null} [mid]
 * @param {number|null} [source]
 * @returns {[number, number]}
 */
export function domain(metric, values, info, mid = null, source = null) {
  const finite = Array.from(values).filter((v) => v !== null && Number.isFinite(v));
  const low = info && info.lo !== null && info.lo !== undefined ? info.lo : null;
  const high = info && info.hi !== null && info.hi !== undefined ? info.hi : null;
  if ((mid !== null && mid !== undefined) || !info || info.scale !== "sequential") {
    const c = mid ?? 0;
    const reach = source !== null && source !== undefined && Number.isFinite(source) ? [...finite, source] : finite;
    let top = reach.reduce((m, v) => Math.max(m, Math.abs(v - c)), 0);
    if (metric === "normalized") top = Math.max(top, 1);
    top = top || 1;
    let lo = c - top, hi = c + top;
    if (low !== null) lo = Math.min(Math.max(lo, low), c);
    if (high !== null) hi = Math.max(Math.min(hi, high), c);
    return [lo, hi];
  }
  const lo = low !== null ? low : finite.length ? Math.min(...finite) : 0;
  const hi = high !== null ? high : finite.length ? Math.max(...finite) : 1;
  return hi > lo ? [lo, hi] : [lo, lo + 1];
}

/** Round like Python's round(x, 3) for the values we meet (no ties at this precision). @param {number} x */
const round3 = (x) => Math.round(x * 1000) / 1000;

/**
 * The colour of `v` on the scale lo..hi of `kind` (diverging: around `mid`); null for a missing value.
 * @param {number|null} v @param {number} lo @param {number} hi @param {string} kind @param {number} [mid]
 * @returns {RGBA|null}
 */
export function colour(v, lo, hi, kind, mid = 0) {
  if (v === null || v === undefined || !Number.isFinite(v)) return null;
  if (kind === "diverging") {
    const top = Math.max(mid - lo, hi - mid) || 1;
    const t = Math.max(-1, Math.min(1, (v - mid) / top));
    const end = t > 0 ? BLUE : RED;
    return [end[0], end[1], end[2], round3(Math.abs(t))];
  }
  const t = hi > lo ? Math.max(0, Math.min(1, (v - lo) / (hi - lo))) : 0;
  return [PURPLE[0], PURPLE[1], PURPLE[2], round3(t)];
}

/**
 * The colour scale of `metric` for `values`, centred on `centre` (the payload's) when given.
 * @param {string} metric @param {ArrayLike<number>} values @param {MetricInfo|undefined} info
 * @param {Centre|null|undefined} centre
 * @returns {Scale}
 */
export function scale(metric, values, info, centre) {
  const c = centre && Number.isFinite(centre.value) ? centre : null;
  const kind = c || !info || info.scale !== "sequential" ? "diverging" : "sequential";
  const [lo, hi] = domain(metric, values, info, c ? c.value : null, c ? c.source : null);
  return { kind, lo, hi, mid: kind === "diverging" ? (c ? c.value : 0) : null, centre: c };
}

/**
 * `rgba` laid over `background`, as #rrggbb (for places without transparency).
 * @param {RGBA|null} rgba @param {number[]} [background] @param {string} [missing]
 */
export function over(rgba, background = [255, 255, 255], missing = "#e0e0e0") {
  if (!rgba) return missing;
  const hex = [0, 1, 2].map((i) => {
    const c = Math.round(background[i] + (rgba[i] - background[i]) * rgba[3]);
    return c.toString(16).padStart(2, "0");
  });
  return `#${hex.join("")}`;
}

/**
 * `n` evenly spaced legend ticks from lo to hi; with `mid` strictly inside (a centred scale),
 * the ends, `mid` and the points halfway to it, so the neutral value is a tick of its own.
 * @param {number} lo @param {number} hi @param {number} [n] @param {number|null} [mid]
 */
export function ticks(lo, hi, n = 5, mid = null) {
  if (mid !== null && mid !== undefined && n === 5 && lo < mid && mid < hi) return [lo, (lo + mid) / 2, mid, (mid + hi) / 2, hi];
  return Array.from({ length: n }, (_, i) => (i < n - 1 ? lo + ((hi - lo) * i) / (n - 1) : hi));
}

/**
 * Tick labels with `digits` significant digits, or more until no two read the same.
 * @param {number[]} values @param {number} [digits] @returns {string[]}
 */
export function tickLabels(values, digits = 2) {
  let labels = values.map((v) => fmt(v, digits));
  while (new Set(labels).size < labels.length && digits < 7) {
    digits += 1;
    labels = values.map((v) => fmt(v, digits));
  }
  return labels;
}

/** Attention weight 0..1 -> white .. deep purple. @param {number} w */
function sequential(w) {
  const a = Math.max(0, Math.min(1, w));
  const end = [63, 0, 125];
  const c = [255, 255, 255].map((m, i) => Math.round(m + (end[i] - m) * Math.sqrt(a)));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

/** A number for people (as widget_colour.fmt). @param {number|null|undefined} v @param {number} [digits] */
export function fmt(v, digits = 3) {
  if (v === null || v === undefined || !Number.isFinite(v)) return "n/a";
  return Math.abs(v) >= 1e-3 || v === 0 ? String(Number(v.toPrecision(digits))) : v.toExponential(2);
}

/** A token as it should read: quoted, so leading spaces show. @param {string} tok */
const quote = (tok) => `'${tok}'`;

/** Shorten long labels. @param {string} text @param {number} n */
const clip = (text, n) => (text.length > n ? text.slice(0, n - 1) + "\u2026" : text);

/**
 * The heads named in the receivers field ("3.1, L3H5" -> ["3.1", "3.5"]); [] for logits.
 * Only for marking and toggling cells: Python parses the field for real and reports errors.
 * @param {string} text
 */
export function receiverHeads(text) {
  /** @type {string[]} */
  const heads = [];
  for (const item of String(text || "").split(/[\s,;]+/)) {
    const m = /^l?(\d+)(?:[.:]|h)(\d+)$/i.exec(item);
    if (m && !heads.includes(`${Number(m[1])}.${Number(m[2])}`)) heads.push(`${Number(m[1])}.${Number(m[2])}`);
  }
  return heads;
}

/**
 * What the heatmap grid shows of a payload: every (row, col) as sent, or, for a
 * (layer.head x position) sweep, one position as a layer x head grid, readable at any model
 * size (GPT-2: 12 x 12 cells instead of 144 rows of 5 px). `cells` lists, row-major over the
 * grid, the payload's own [row, col] of each cell, so clicks and values keep their indices.
 * @param {{rows: Cell[], cols: Cell[], row_title: string, col_title: string}} p
 * @param {number|null} pos a position index, or null for every (row, col)
 * @returns {{rows: Cell[], cols: Cell[], row_title: string, col_title: string, cells: number[][], byPosition: boolean}}
 */
export function gridView(p, pos) {
  const byHeadPos = p.rows.length > 0 && p.rows[0].head !== undefined && p.cols.length > 0 && p.cols[0].pos !== undefined;
  if (pos === null || !byHeadPos || pos < 0 || pos >= p.cols.length) {
    const cells = [];
    for (let i = 0; i < p.rows.length; i++) for (let j = 0; j < p.cols.length; j++) cells.push([i, j]);
    return { rows: p.rows, cols: p.cols, row_title: p.row_title, col_title: p.col_title, cells, byPosition: false };
  }
  const layers = [...new Set(p.rows.map((r) => r.layer))], heads = [...new Set(p.rows.map((r) => r.head))];
  const rowOf = new Map(p.rows.map((r, i) => [`${r.layer}.${r.head}`, i]));
  const cells = [];
  for (const l of layers) for (const hd of heads) cells.push([rowOf.get(`${l}.${hd}`) ?? -1, pos]);
  return {
    rows: layers.map((l) => ({ layer: l, label: `L${l}` })), cols: heads.map((hd) => ({ head: hd, label: `H${hd}` })),
    row_title: "layer", col_title: "head", cells, byPosition: true,
  };
}

/**
 * Where a cell is, in words: "layer 3, head 1, position 14 ' to'" (a path sweep: "sender head 3.1").
 * @param {Cell} row @param {Cell} col @param {boolean} path
 */
export function cellName(row, col, path) {
  const d = { ...row, ...col };
  if (path) return `sender head ${d.layer}.${d.head}`;
  const parts = [`layer ${d.layer}`];
  if (d.head !== undefined) parts.push(`head ${d.head}`);
  if (d.pos !== undefined) parts.push(`position ${d.pos} ${quote(d.token ?? "")}`);
  return parts.join(", ");
}

/** Whether an event target is a heatmap cell. @param {EventTarget|null} el @returns {el is SVGRectElement} */
const isCell = (el) => el instanceof Element && el.matches("rect.pw-cell");

/** Rows beyond which a (layer.head x position) sweep opens one position at a time. */
export const MANY_ROWS = 48;

/** @type {Object<string, string>} */
const REMINDER = {
  denoising: "Denoising: run the corrupted prompt, paste in clean activations. High = this activation is sufficient.",
  noising: "Noising: run the clean prompt, paste in corrupted activations. High = this activation is necessary.",
};

// ============================================================ the view, in parts
//
// `render` wires small parts together. Each part is a factory `makeX(ctx, callbacks)` that
// builds its DOM once and returns it with the functions that redraw it from the model
// (`update`, ...). Parts never subscribe to the model themselves: `render` does, in one table,
// and unsubscribes when the view goes. So each part can be built and tested alone against a
// fake model (js/parts.test.js).

/**
 * The page-side state the parts share.
 * @typedef {Object} ViewState
 * @property {Set<Field>} edited traitlets set on this page since the last Run (the run fields among them go with it: see sendRun)
 * @property {Array<() => void>} flushers push text still being typed (debounced) to the model now
 */
/**
 * One tooltip for the whole widget (heatmap cells and attention patterns).
 * @typedef {Object} Tooltip
 * @property {HTMLElement} el
 * @property {(e: MouseEvent, lines: string[]) => void} show lines[0] in bold, near the pointer
 * @property {() => void} hide
 */
/**
 * The error boxes of every field, wherever the parts put them.
 * @typedef {Object} Errors
 * @property {(field: string) => HTMLElement} box a new box for `field`'s messages: empty until one comes,
 *           of fixed height (CSS), so nothing around it moves when it fills
 * @property {() => void} update show `errors` ({field: message}) in the boxes and mark the inputs at fault
 */
/**
 * What every part is built with.
 * @typedef {Object} Ctx
 * @property {Model} model the anywidget model: get / set / save_changes / send / on / off
 * @property {Contract} contract what Python and the page agree on (the `contract` traitlet, read once)
 * @property {HTMLElement} root the widget's root; parts publish what they show on root.dataset
 *           (the browser tests and benchmarks/bench_widget_latency.py read it)
 * @property {ViewState} state
 * @property {<K extends Field>(name: K, value: State[K]) => void} save set a traitlet from the page (and remember the edit)
 * @property {Errors} errors
 * @property {Tooltip} tooltip
 */

/**
 * The shared context of one view.
 * @param {Model} model @param {HTMLElement} [root]
 * @returns {Ctx}
 */
export function makeContext(model, root = h("div", { class: "pw-root" })) {
  /** @type {ViewState} */
  const state = { edited: new Set(), flushers: [] };
  const save = /** @type {Ctx["save"]} */ ((name, value) => {
    model.set(name, value);
    model.save_changes();
    state.edited.add(name);
  });
  const errors = makeErrors({ model, root });
  return { model, contract: model.get("contract"), root, state, save, errors, tooltip: makeTooltip(root) };
}

/**
 * @param {HTMLElement} root the tooltip is placed relative to it
 * @returns {Tooltip}
 */
export function makeTooltip(root) {
  const el = h("div", { class: "pw-tooltip pw-hidden", role: "tooltip" });
  return {
    el,
    show(e, lines) {
      el.replaceChildren(...lines.map((l, i) => h(i ? "div" : "b", {}, l)));
      el.classList.remove("pw-hidden");
      const box = root.getBoundingClientRect();
      let x = e.clientX - box.left + 14;
      const y = e.clientY - box.top + 14;
      if (x + 380 > box.width) x = Math.max(0, x - 400);
      el.style.left = `${x}px`;
      el.style.top = `${y}px`;
    },
    hide() { el.classList.add("pw-hidden"); },
  };
}

/**
 * @param {{model: Model, root: HTMLElement}} ctx
 * @returns {Errors}
 */
export function makeErrors({ model, root }) {
  /** @type {Object<string, HTMLElement>} */
  const boxes = {};
  return {
    box(field) {
      const box = h("div", { class: "pw-error", "data-error-for": field, role: "alert" });
      boxes[field] = box;
      return box;
    },
    update() {
      const errors = model.get("errors") || {};
      for (const [field, box] of Object.entries(boxes)) {
        const msg = errors[field] || "";
        box.textContent = msg;
        box.title = msg; // the box keeps a fixed height (controls never move): the full text on hover
        box.classList.toggle("pw-has-error", !!msg);
        const input = root.querySelector(`[data-field="${field}"]`);
        if (input) input.classList.toggle("pw-invalid", !!msg);
      }
      root.dataset.errors = Object.keys(errors).join(" ");
    },
  };
}

// ------------------------------------------------------------ prompt and answer inputs
/**
 * @typedef {Object} TextField
 * @property {HTMLElement} el the label with its input (and, unless told otherwise, its error box)
 * @property {HTMLInputElement} input
 * @property {() => void} update show the model's value, unless the user is still typing
 * @property {() => void} flush send what was typed now
 * @property {TextName} name the traitlet
 */

/**
 * A text input bound to traitlet `name`: synced while typing (debounced), at once on change,
 * and on Enter, which also asks for a Run.
 * @param {Ctx} ctx @param {TextName} name @param {string} label @param {string} cls
 * @param {{inlineError?: boolean, onEnter?: () => void}} [opts]
 * @returns {TextField}
 */
export function makeTextField(ctx, name, label, cls, { inlineError = true, onEnter = () => {} } = {}) {
  const { model } = ctx;
  const input = /** @type {HTMLInputElement} */ (h("input", {
    type: "text", class: "pw-input", "data-field": name, spellcheck: "false", "aria-label": label,
  }));
  input.value = model.get(name);
  /** @type {ReturnType<typeof setTimeout>|undefined} */ let timer;
  const flush = () => {
    clearTimeout(timer);
    timer = undefined;
    if (model.get(name) !== input.value) ctx.save(name, input.value);
  };
  input.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(flush, 250); });
  input.addEventListener("change", flush);
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.ctrlKey && !e.metaKey) { e.preventDefault(); flush(); onEnter(); }
  });
  ctx.state.flushers.push(flush);
  const el = h("label", { class: `pw-field ${cls}` }, h("span", { class: "pw-label" }, label), input);
  if (inlineError) el.append(ctx.errors.box(name));
  return {
    el, input, flush, name,
    update() { if (timer === undefined && input.value !== model.get(name)) input.value = model.get(name); },
  };
}

/**
 * @typedef {Object} InputsPart
 * @property {HTMLElement[]} els the grid of prompts and answers, then the line of the answers' errors
 * @property {Object<string, TextField>} fields by traitlet name (clean, corrupted, correct, incorrect)
 */

/**
 * The two prompts and two answers. Each prompt's errors sit under it; the answer fields are
 * narrow, so their messages share one full-width line below, whose height is reserved like
 * every error box's, so nothing below moves when one appears.
 * @param {Ctx} ctx @param {{onRun: () => void}} callbacks
 * @returns {InputsPart}
 */
export function makeInputs(ctx, { onRun }) {
  const field = (/** @type {TextName} */ name, /** @type {string} */ label, /** @type {string} */ cls, inlineError = true) =>
    makeTextField(ctx, name, label, cls, { inlineError, onEnter: onRun });
  const fields = {
    clean: field("clean", "Clean prompt", "pw-prompt"),
    correct: field("correct", "Correct answer", "pw-answer", false),
    corrupted: field("corrupted", "Corrupted prompt", "pw-prompt"),
    incorrect: field("incorrect", "Incorrect answer", "pw-answer", false),
  };
  const grid = h("div", { class: "pw-inputs" }, fields.clean.el, fields.correct.el, fields.corrupted.el, fields.incorrect.el);
  const answerErrors = h("div", { class: "pw-answer-errors" },
    ctx.errors.box("correct"), ctx.errors.box("incorrect"), ctx.errors.box("answers"));
  return { els: [grid, answerErrors], fields };
}

// ------------------------------------------------------------ tokenisations + baselines
/**
 * Both tokenisations (differing positions highlighted) and the baseline logit differences.
 * @param {Ctx} ctx
 * @returns {{els: HTMLElement[], update: () => void}}
 */
export function makeTokens({ model }) {
  const tokenRows = h("div", { class: "pw-tokens" });
  const baselineLine = h("div", { class: "pw-baseline" });
  baselineLine.addEventListener("mouseenter", () => { baselineLine.title = baselineLine.textContent || ""; });
  function update() {
    const toks = model.get("tokens") || {};
    const clean = toks.clean || null, corrupted = toks.corrupted || null;
    const n = Math.max(clean ? clean.length : 0, corrupted ? corrupted.length : 0);
    // Highlight positions whose tokens differ (only when both prompts tokenised).
    const differs = (/** @type {number} */ i) => !!clean && !!corrupted && clean[i] !== corrupted[i];
    tokenRows.replaceChildren();
    const typed = ["clean", "corrupted"].filter((k) => String(model.get(/** @type {TextName} */ (k)) || "").trim());
    for (const [name, list] of /** @type {Array<[string, string[]|null]>} */ ([["clean", clean], ["corrupted", corrupted]])) {
      const row = h("div", { class: "pw-token-row", "data-prompt": name }, h("span", { class: "pw-token-name" }, name));
      if (!list) row.append(h("span", { class: "pw-muted" }, typed.includes(name) ? "(not tokenised: see the message at the prompt)" : "(empty)"));
      else list.forEach((tok, i) => {
        row.append(h("span", { class: "pw-tok" + (differs(i) ? " pw-tok-diff" : ""), title: `position ${i}: ${quote(tok)}`, "data-pos": String(i) }, tok));
      });
      if (list) row.append(h("span", { class: "pw-muted" }, ` ${list.length} tokens`));
      tokenRows.append(row);
    }
    tokenRows.dataset.hint = !n && typed.length === 0 ? "Type two prompts." : "";
    if (!n && typed.length === 0) /** @type {HTMLElement} */ (tokenRows.firstChild).append(h("span", { class: "pw-muted pw-hint" }, " Type two prompts."));
    const base = model.get("baseline") || {};
    const c = model.get("correct"), i = model.get("incorrect");
    baselineLine.replaceChildren(
      `Logit difference, logit(${quote(c)}) \u2212 logit(${quote(i)}): clean run `,
      h("b", { "data-baseline": "clean" }, fmt(base.clean)),
      ", corrupted run ",
      h("b", { "data-baseline": "corrupted" }, fmt(base.corrupted)),
      `. Top predictions: clean ${base.clean_top ? quote(base.clean_top) : "n/a"}, corrupted ${base.corrupted_top ? quote(base.corrupted_top) : "n/a"}.`);
  }
  return { els: [tokenRows, baselineLine], update };
}

// ------------------------------------------------------------ controls
/**
 * @typedef {Object} ControlsPart
 * @property {HTMLElement} el direction, metric, component, Run / Cancel, auto-run, fast preview
 * @property {HTMLElement} reminder what the chosen direction does (placed by render, below the panels)
 * @property {() => void} update show the model's settings
 * @property {(running: boolean) => void} setRunning Cancel is enabled only while a sweep runs
 */

/**
 * @param {Ctx} ctx @param {{onRun: () => void}} callbacks
 * @returns {ControlsPart}
 */
export function makeControls(ctx, { onRun }) {
  const { model, save } = ctx;
  const dirGroup = h("div", { class: "pw-toggle", role: "radiogroup", "aria-label": "direction", "data-control": "direction" });
  /** @type {Object<string, HTMLButtonElement>} */
  const dirButtons = {};
  for (const d of ["denoising", "noising"]) {
    const b = /** @type {HTMLButtonElement} */ (h("button", { type: "button", class: "pw-toggle-btn", "data-direction": d, role: "radio" }, d));
    b.addEventListener("click", () => save("direction", d));
    dirButtons[d] = b;
    dirGroup.append(b);
  }
  const reminder = h("div", { class: "pw-reminder" });
  const metricSelect = /** @type {HTMLSelectElement} */ (h("select", { class: "pw-select", "data-control": "metric", "aria-label": "metric" }));
  for (const [m, info] of Object.entries(ctx.contract.metrics)) metricSelect.append(h("option", { value: m }, `${m}: ${info.label}`));
  metricSelect.addEventListener("change", () => save("metric", metricSelect.value));
  const siteSelect = /** @type {HTMLSelectElement} */ (h("select", { class: "pw-select", "data-control": "site", "aria-label": "component" }));
  for (const [group, options] of ctx.contract.sites) {
    const og = h("optgroup", { label: group });
    for (const [value, label] of options) og.append(h("option", { value }, label));
    siteSelect.append(og);
  }
  siteSelect.addEventListener("change", () => save("site", siteSelect.value));
  const runButton = h("button", { type: "button", class: "pw-run", "data-action": "run" }, "Run");
  const cancelButton = /** @type {HTMLButtonElement} */ (h("button", { type: "button", class: "pw-cancel", "data-action": "cancel" }, "Cancel"));
  runButton.addEventListener("click", () => onRun());
  cancelButton.addEventListener("click", () => model.send({ type: "cancel" }));
  const autoBox = /** @type {HTMLInputElement} */ (h("input", { type: "checkbox", "data-control": "auto_run" }));
  autoBox.addEventListener("change", () => save("auto_run", autoBox.checked));
  const previewBox = /** @type {HTMLInputElement} */ (h("input", { type: "checkbox", "data-control": "fast_preview" }));
  previewBox.addEventListener("change", () => save("fast_preview", previewBox.checked));
  const previewLabel = h("label", { class: "pw-auto", title: "Paint a first-order estimate of every cell at once (one backward pass), then replace it with the exact values as the sweep runs. Not for rank, accuracy or path patching." },
    previewBox, " fast preview (attribution patching)");
  const el = h("div", { class: "pw-controls" },
    h("div", { class: "pw-control" }, h("span", { class: "pw-label" }, "Direction"), dirGroup, ctx.errors.box("direction")),
    h("label", { class: "pw-control" }, h("span", { class: "pw-label" }, "Metric"), metricSelect, ctx.errors.box("metric")),
    h("label", { class: "pw-control" }, h("span", { class: "pw-label" }, "Component"), siteSelect, ctx.errors.box("site")),
    h("div", { class: "pw-control pw-actions" }, runButton, cancelButton,
      h("label", { class: "pw-auto" }, autoBox, " auto-run"), previewLabel));
  return {
    el, reminder,
    update() {
      const d = model.get("direction");
      for (const [name, b] of Object.entries(dirButtons)) {
        b.classList.toggle("pw-on", name === d);
        b.setAttribute("aria-checked", String(name === d));
      }
      reminder.textContent = REMINDER[d] || "";
      metricSelect.value = model.get("metric");
      siteSelect.value = model.get("site");
      autoBox.checked = !!model.get("auto_run");
      const noPreview = model.get("site") === "path" || model.get("site") === "circuit";
      previewBox.checked = !!model.get("fast_preview");
      previewBox.disabled = noPreview; // AtP has no estimate for path patching (the circuit view is scored by gradients anyway)
      previewLabel.classList.toggle("pw-disabled", noPreview);
    },
    setRunning(running) { cancelButton.disabled = !running; },
  };
}

// ------------------------------------------------------------ path patching: receivers
/**
 * @typedef {Object} PathPart
 * @property {HTMLElement} el the receivers field, the receiver input and a word of help (shown for site "path")
 * @property {TextField} field the receivers field
 * @property {() => void} update
 * @property {(head: string) => void} toggleReceiver add head "layer.head" to the receivers, or remove it
 */

/**
 * @param {Ctx} ctx @param {{onRun: () => void}} callbacks
 * @returns {PathPart}
 */
export function makePathPanel(ctx, { onRun }) {
  const { model, save } = ctx;
  const field = makeTextField(ctx, "receivers", "Receivers: logits, or heads (layer.head)", "pw-receivers", { onEnter: onRun });
  field.input.setAttribute("placeholder", "logits   (or heads: 3.1, 3.5)");
  const inputSelect = /** @type {HTMLSelectElement} */ (h("select", { class: "pw-select", "data-control": "receiver_input", "aria-label": "receiver input" }));
  for (const [value, label] of ctx.contract.receiver_inputs) inputSelect.append(h("option", { value }, label));
  inputSelect.addEventListener("change", () => save("receiver_input", inputSelect.value));
  const el = h("div", { class: "pw-path pw-hidden", "data-panel": "path" },
    field.el,
    h("label", { class: "pw-control" }, h("span", { class: "pw-label" }, "Receiver input"), inputSelect, ctx.errors.box("receiver_input")),
    h("div", { class: "pw-path-help" },
      "Each cell is a sender head: its output is patched only along the path into the receivers ",
      "(the logits: its direct effect; heads: the chosen input of those heads), every other head frozen. ",
      "Shift+click a head cell to add or remove it as a receiver."));
  return {
    el, field,
    update() {
      el.classList.toggle("pw-hidden", model.get("site") !== "path");
      inputSelect.value = model.get("receiver_input");
      inputSelect.disabled = receiverHeads(model.get("receivers")).length === 0;
    },
    toggleReceiver(head) {
      const heads = receiverHeads(model.get("receivers"));
      const next = heads.includes(head) ? heads.filter((x) => x !== head) : [...heads, head];
      field.input.value = next.join(", ");
      save("receivers", field.input.value);
    },
  };
}

// ------------------------------------------------------------ dataset (several prompt pairs)
/**
 * An editable list of (clean, corrupted, correct, incorrect) rows; a Run sweeps them all and
 * the heatmap shows their mean (the explanation adds its standard error) or one pair alone.
 * @param {Ctx} ctx
 * @returns {{el: HTMLElement, update: () => void}}
 */
export function makeDataset({ model, save }) {
  const body = h("div", { class: "pw-dataset-rows", "data-control": "dataset" });
  const summary = h("summary", {}, "Dataset");
  const el = h("details", { class: "pw-dataset", "data-panel": "dataset" }, summary, body);
  /** @param {string[][]} rows */
  const saveRows = (rows) => save("dataset", rows.map((r) => [...r]));
  const copy = () => (model.get("dataset") || []).map((r) => [...r]);
  const labels = ["clean prompt", "corrupted prompt", "correct", "incorrect"];
  /** @param {string[]} row @param {number} i */
  function line(row, i) {
    const div = h("div", { class: "pw-dataset-row", "data-pair": String(i) });
    row.forEach((text, j) => {
      const input = /** @type {HTMLInputElement} */ (h("input", { type: "text", class: `pw-input ${j < 2 ? "pw-dataset-prompt" : "pw-dataset-answer"}`,
        "data-dataset-row": String(i), "data-dataset-col": String(j), "aria-label": `pair ${i} ${labels[j]}`, spellcheck: "false" }));
      input.value = text;
      input.addEventListener("change", () => {
        const next = copy();
        next[i][j] = input.value;
        saveRows(next);
      });
      div.append(input);
    });
    const remove = h("button", { type: "button", class: "pw-cancel", "data-action": "remove-pair", "aria-label": `remove pair ${i}` }, "\u2212");
    remove.addEventListener("click", () => saveRows(copy().filter((_, k) => k !== i)));
    div.append(remove);
    return div;
  }
  function update() {
    /** @type {string[][]} */
    const rows = model.get("dataset") || [];
    summary.textContent = rows.length ? `Dataset: ${rows.length} prompt pairs (the heatmap shows their mean)` :
      "Dataset: one prompt pair (add pairs to average over several)";
    if (el.contains(document.activeElement) && body.childElementCount === rows.length + 1) return; // typing here
    const add = h("button", { type: "button", class: "pw-cancel", "data-action": "add-pair" }, "+ add the prompts above as a pair");
    add.addEventListener("click", () => saveRows([...copy(), /** @type {TextName[]} */ (["clean", "corrupted", "correct", "incorrect"]).map((k) => String(model.get(k) || ""))]));
    body.replaceChildren(...rows.map(line), add);
  }
  return { el, update };
}

// ------------------------------------------------------------ is Python there? + Run
/**
 * @typedef {Object} KernelLink
 * @property {HTMLElement} note says so when no Python widget answers this view
 * @property {() => boolean} seen whether Python has answered yet
 * @property {(msg?: {type?: string, run_id?: number}) => void} heard a message or state change from Python (a Run's "ack" names its job)
 * @property {(what: string) => void} expect expect an answer; without one in 3 s, say what `what` cannot do
 */

/**
 * Is a Python object behind this view? A view restored from a saved notebook (no kernel, or a
 * new kernel that never made this widget) draws the saved state, but nothing answers it. The
 * view says "hello" at once (render); any message from Python proves the link. A Run (or a
 * cell click) that gets no answer within a few seconds says so instead of spinning forever.
 * @param {Ctx} ctx @param {{onMissing: () => void}} callbacks
 * @returns {KernelLink}
 */
export function makeKernelLink({ root }, { onMissing }) {
  const note = h("div", { class: "pw-kernel-note pw-hidden", role: "status", "data-note": "kernel" });
  let seen = false;
  /** @type {ReturnType<typeof setTimeout>|undefined} */ let timer;
  root.dataset.kernel = "unknown";
  return {
    note,
    seen: () => seen,
    heard(msg) {
      seen = true;
      clearTimeout(timer);
      root.dataset.kernel = "connected";
      note.classList.add("pw-hidden");
      if (msg && msg.type === "ack" && Number.isInteger(msg.run_id)) root.dataset.requestedRun = String(msg.run_id);
    },
    expect(what) {
      if (seen) return;
      clearTimeout(timer);
      timer = setTimeout(() => {
        if (seen) return;
        root.dataset.kernel = "missing";
        note.textContent = `No Python widget answers this view, so ${what} cannot happen. This is probably ` +
          "a saved copy (the notebook was reopened or the kernel restarted): the heatmap is the last one saved. " +
          "Run the cell that creates the widget again to use it.";
        note.classList.remove("pw-hidden");
        onMissing();
      }, 3000);
    },
  };
}

/**
 * Ask Python for a Run. The run fields (contract.run_fields) edited here go with the request:
 * ipywidgets may hold back state updates while the kernel is busy, and a custom message could
 * overtake them. Only edited ones: the others may have been changed by Python (pre-filled
 * answers) since. Python
 * answers {type: "ack", run_id}, the id of the job this click started (root.dataset.requestedRun).
 * @param {Ctx} ctx
 */
export function sendRun({ model, contract, root, state }) {
  state.flushers.forEach((f) => f());
  root.dataset.status = "running";
  /** @type {Partial<State>} */
  const edited = {};
  for (const k of state.edited) if (contract.run_fields.includes(k)) Object.assign(edited, { [k]: model.get(k) });
  state.edited.clear();
  delete root.dataset.requestedRun;
  model.send({ type: "run", state: edited });
}

// ------------------------------------------------------------ status line
/**
 * @typedef {Object} StatusPart
 * @property {HTMLElement} header title, model name and the status word
 * @property {HTMLElement} progressRow progress bar and what it counts
 * @property {() => string} update redraw; returns the status shown ("no kernel" when nobody answers)
 */

/**
 * The status word and the progress line. A cancelled sweep's counts come from the heatmap
 * payload itself (one snapshot), never from a status that arrived in another message.
 * @param {Ctx} ctx
 * @returns {StatusPart}
 */
export function makeStatus({ model, root }) {
  const statusText = h("span", { class: "pw-status", "aria-live": "polite" });
  const header = h("div", { class: "pw-header" },
    h("span", { class: "pw-title" }, "Activation patching"),
    h("span", { class: "pw-model" }, String(model.get("model_name") || "")),
    statusText);
  const progress = /** @type {HTMLProgressElement} */ (h("progress", { class: "pw-progress", max: "1", value: "0" }));
  const progressText = h("span", { class: "pw-progress-text" });
  const progressRow = h("div", { class: "pw-progress-row" }, progress, progressText);
  /** The progress line of the circuit view: scoring runs as a few passes, so no count of patches. @param {string} status */
  function circuitText(status) {
    const p = circuitOf(model);
    const waiting = String(model.get("waiting_for") || "");
    return status === "running" ? `scoring every edge with ${String(model.get("circuit_method")).toUpperCase()}\u2026${waiting ? ` ${waiting}` : ""}`
      : status === "done" && p ? `${p.n_edges} edges scored in ${fmt(model.get("elapsed"), 2)} s`
      : status === "cancelled" ? "cancelled: the circuit shown is the previous one" : "";
  }
  /** What a cancel left: counted from the picture itself, or nothing started. */
  function cancelledText() {
    const p = heatmapOf(model);
    return p && p.state === "cancelled" ? `cancelled after ${p.done}/${p.total} patches`
      : "cancelled before the sweep started: the heatmap is the previous one";
  }
  return {
    header, progressRow,
    update() {
      const status = root.dataset.kernel === "missing" ? "no kernel" : String(model.get("status") || "idle");
      const [done, total] = model.get("progress") || [0, 0];
      const running = status === "running";
      root.dataset.status = status;
      progress.value = total ? done / total : status === "done" ? 1 : 0;
      progress.classList.toggle("pw-hidden", !running && status !== "cancelled");
      const waiting = String(model.get("waiting_for") || "");
      const circuit = model.get("site") === "circuit";
      if (circuit && running) progress.removeAttribute("value"); // (indeterminate: a few passes, no count)
      progressText.textContent = circuit ? circuitText(status)
        : running && waiting ? `${done}/${total} patches, ${waiting}`
        : running ? `${done}/${total} patches`
        : status === "done" ? `${total} patches in ${fmt(model.get("elapsed"), 2)} s`
        : status === "cancelled" ? cancelledText() : "";
      statusText.textContent = status;
      statusText.className = `pw-status pw-status-${status.replace(" ", "-")}`;
      return status;
    },
  };
}

// ------------------------------------------------------------ heatmap
/**
 * The legend's parts that follow the values: gradient, five tick labels, title.
 * @typedef {{grad: SVGElement, texts: SVGElement[], title: SVGElement}} Legend
 */
/**
 * The SVG of one heatmap layout (see buildGrid); its cells are painted by makeHeatmap.
 * @typedef {Object} Grid
 * @property {SVGSVGElement} svg
 * @property {SVGRectElement[]} rects the cells, row-major over the grid shown
 * @property {number[]} flat each cell's index into the payload's values (row * cols + col)
 * @property {number} gridCols cells per grid row
 * @property {SVGRectElement} outline marks the selected cell
 * @property {SVGPathElement} hatch stripes over the approximate cells
 * @property {SVGPathElement} receivers outlines of the receiver heads (path view)
 * @property {number} cw cell width
 * @property {number} ch cell height
 * @property {Legend} legend
 */

/**
 * A vertical legend bar at x = lx from the high end (top) to the low end, five ticks; its
 * gradient stops and labels are set by paintLegend (the range follows the values).
 * @param {SVGElement} svg @param {number} lx @param {number} top @param {number} lh
 * @returns {{legend: Legend, hatchId: string}}
 */
function buildLegend(svg, lx, top, lh) {
  const gid = `pw-grad-${Math.random().toString(36).slice(2)}`;
  const defs = s("defs");
  const grad = s("linearGradient", { id: gid, x1: 0, y1: 1, x2: 0, y2: 0 });
  // Hatching for approximate cells: one <path> covering all of them, filled with stripes.
  const hatchPattern = s("pattern", { id: `${gid}-hatch`, patternUnits: "userSpaceOnUse", width: 5, height: 5, patternTransform: "rotate(45)" });
  hatchPattern.append(s("rect", { width: 2, height: 5, class: "pw-hatch-stripe" }));
  defs.append(grad, hatchPattern);
  const texts = [0, 1, 2, 3, 4].map((k) => {
    const y = top + lh - (k * lh) / 4;
    svg.append(s("line", { x1: lx + 12, x2: lx + 16, y1: y, y2: y, class: "pw-legend-tick" }));
    const t = s("text", { x: lx + 18, y, "dominant-baseline": "middle", class: "pw-legend-label", "data-tick": k });
    svg.append(t);
    return t;
  });
  const title = s("text", { x: lx, y: top - 8, class: "pw-legend-label pw-legend-title" });
  svg.append(defs, s("rect", { x: lx, y: top, width: 12, height: lh, class: "pw-legend-back" }),
    s("rect", { x: lx, y: top, width: 12, height: lh, fill: `url(#${gid})`, class: "pw-legend-bar" }), title);
  return { legend: { grad, texts, title }, hatchId: `${gid}-hatch` };
}

/**
 * Set the legend to `sc` (see `scale`): gradient stops, five tick labels, the metric on top.
 * On a scale centred on a run's value, that tick is marked "◂" (class pw-legend-centre) and
 * `legendWords` says whose value it is. Returns the tick labels (numbers only).
 * @param {Legend} legend @param {string} metric @param {Scale} sc @returns {string[]}
 */
export function paintLegend(legend, metric, sc) {
  const { lo, hi, kind, mid } = sc;
  const stops = mid !== null && lo < mid && mid < hi ? [lo, mid, hi] : [lo, hi];
  legend.grad.replaceChildren(...stops.map((v) => {
    const c = /** @type {RGBA} */ (colour(v, lo, hi, kind, mid ?? 0));
    return s("stop", { offset: (v - lo) / (hi - lo), "stop-color": `rgb(${c[0]},${c[1]},${c[2]})`, "stop-opacity": c[3] });
  }));
  const values = ticks(lo, hi, 5, mid);
  const labels = tickLabels(values, sc.centre ? 3 : 2);
  const marked = sc.centre ? values.indexOf(sc.centre.value) : -1;
  labels.forEach((text, k) => {
    legend.texts[k].textContent = k === marked ? `${text} \u25c2` : text;
    legend.texts[k].classList.toggle("pw-legend-centre", k === marked);
  });
  legend.title.textContent = metric;
  return labels;
}

/**
 * What the colours mean, in words (as widget_colour.Scale.words): for a centred scale, whose
 * value is the neutral middle; then what a high value means.
 * @param {string} metric @param {Scale} sc @param {MetricInfo|undefined} info
 */
export function legendWords(metric, sc, info) {
  const parts = [];
  const c = sc.centre;
  if (c) {
    const reach = c.source !== null && c.source !== undefined ? `; the scale spans at least the ${c.source_run} run's ${fmt(c.source)}` : "";
    parts.push(`colour = change from the unpatched ${c.run} run (\u25c2 ${fmt(c.value)}): blue higher, red lower${reach}`);
  }
  if (info) parts.push(`\u25b2 high ${metric}: ${info.high_means}`);
  return parts.join(" \u00b7 ");
}

/**
 * Build the SVG skeleton (labels, empty cells, legend) of a payload's layout, sized for a
 * widget `width` px wide: the heatmap takes what it needs, and the side panel (explanation,
 * attention patterns) wraps below it when there is no room left.
 * @param {Heatmap} p @param {ReturnType<typeof gridView>} view @param {number} width
 * @returns {Grid}
 */
export function buildGrid(p, view, width) {
  const nR = view.rows.length, nC = view.cols.length;
  const rowLabelLen = Math.max(...view.rows.map((r) => r.label.length), view.row_title.length);
  const left = Math.min(90, 14 + 7 * rowLabelLen);
  const colLabelLen = Math.max(...view.cols.map((c) => c.label.length + 2));
  const legendW = 96;
  // The heatmap is the main picture: it gets about two thirds of a wide widget (the side
  // panel takes the rest), and its cells grow up to 40 px.
  const share = width >= 900 ? 0.64 : 1;
  const cw = Math.max(6, Math.min(40, Math.floor((width * share - left - legendW - 8) / nC)));
  const ch = Math.max(4, Math.min(40, Math.floor(720 / nR), Math.max(cw, 16)));
  const colFont = Math.min(11, Math.max(7, cw - 1));
  // Tilt column labels just enough that neighbours do not overlap (steeper when narrow).
  const angle = Math.max(45, Math.min(90, (Math.asin(Math.min(1, (colFont + 1) / cw)) * 180) / Math.PI));
  const top = Math.min(120, 16 + colFont * 0.62 * colLabelLen * Math.sin((angle * Math.PI) / 180));
  const gridW = cw * nC, gridH = ch * nR;
  const svg = /** @type {SVGSVGElement} */ (s("svg", {
    width: left + gridW + legendW, height: top + gridH + 24, class: "pw-heatmap",
    role: "grid", "aria-label": `${p.direction} ${p.site} heatmap of ${p.metric}: arrow keys move, Enter explains a cell`,
    "data-rows": nR, "data-cols": nC, "data-view": view.byPosition ? "position" : "all",
  }));
  // Column labels: tokens (diff positions bold) or head numbers; thin out when crowded.
  const colStride = Math.ceil(9 / cw);
  view.cols.forEach((c, j) => {
    if (j % colStride && !c.diff) return;
    const x = left + j * cw + cw / 2, y = top - 5;
    const t = s("text", { x: 0, y: 0, transform: `translate(${x},${y}) rotate(${-angle.toFixed(1)})`, class: "pw-col-label" + (c.diff ? " pw-diff" : ""), "font-size": colFont, "dominant-baseline": "middle" });
    t.textContent = c.token !== undefined ? quote(clip(c.token, 14)) : c.label;
    svg.append(t);
  });
  // Row labels: layers, or "L3 H5"; with many rows, label each layer once.
  const byHead = view.rows.length > 0 && view.rows[0].head !== undefined;
  const rowFont = Math.min(11, Math.max(7, ch - 2));
  const rowStride = Math.ceil(10 / ch);
  view.rows.forEach((r, i) => {
    let text = r.label;
    if (byHead && ch < 10) { if (r.head !== 0) return; text = `L${r.layer}`; }
    else if (i % rowStride) return;
    const t = s("text", { x: left - 4, y: top + i * ch + ch / 2, class: "pw-row-label", "font-size": rowFont, "dominant-baseline": "middle", "text-anchor": "end" });
    t.textContent = text;
    svg.append(t);
  });
  const axisX = s("text", { x: left + gridW / 2, y: top + gridH + 16, class: "pw-axis-title", "text-anchor": "middle" });
  axisX.textContent = view.col_title;
  const axisY = s("text", { x: 2, y: top - 5, class: "pw-axis-title" });
  axisY.textContent = view.row_title;
  svg.append(axisX, axisY);
  // Cells.
  const gap = cw > 8 && ch > 6 ? 1 : 0;
  const cells = s("g", { class: "pw-cells" });
  /** @type {SVGRectElement[]} */
  const rects = [];
  /** @type {number[]} */
  const flat = [];
  view.cells.forEach(([i, j], n) => {
    if (i < 0) return;
    const gi = Math.floor(n / nC), gj = n % nC;
    const r = /** @type {SVGRectElement} */ (s("rect", { x: left + gj * cw, y: top + gi * ch, width: cw - gap, height: ch - gap, class: "pw-cell", "data-row": i, "data-col": j, role: "gridcell" }));
    const d = { ...p.rows[i], ...p.cols[j] };
    for (const k of /** @type {const} */ (["layer", "head", "pos"])) if (d[k] !== undefined) r.setAttribute(`data-${k}`, String(d[k]));
    rects.push(r);
    flat.push(i * p.cols.length + j);
    cells.append(r);
  });
  svg.append(cells);
  if (byHead) { // separators between layers
    const nHeads = view.rows.filter((r) => r.layer === 0).length;
    for (let l = 1; l * nHeads < nR; l++) svg.append(s("line", { x1: left, x2: left + gridW, y1: top + l * nHeads * ch, y2: top + l * nHeads * ch, class: "pw-sep" }));
  }
  const { legend, hatchId } = buildLegend(svg, left + gridW + 16, top, Math.max(100, Math.min(gridH, 200)));
  const hatch = /** @type {SVGPathElement} */ (s("path", { class: "pw-hatch", fill: `url(#${hatchId})`, d: "" }));
  const receivers = /** @type {SVGPathElement} */ (s("path", { class: "pw-receiver-marks", d: "" }));
  const outline = /** @type {SVGRectElement} */ (s("rect", { class: "pw-outline pw-hidden", width: cw, height: ch }));
  svg.append(hatch, receivers, outline);
  return { svg, rects, flat, gridCols: nC, outline, hatch, receivers, cw, ch, legend };
}

/**
 * Keyboard moves on a grid of `count` cells, `nCols` to a row: arrows, Home/End (the row's
 * ends), PageUp/PageDown (the column's ends), never leaving the grid. Returns the index of the
 * cell to move to from cell `n` (itself at an edge), or null for a key that is not a move.
 * @param {number} n @param {number} count @param {number} nCols @param {string} key
 * @returns {number|null}
 */
export function gridMove(n, count, nCols, key) {
  const nRows = Math.ceil(count / nCols);
  const gi = Math.floor(n / nCols), gj = n % nCols;
  /** @type {Object<string, number[]>} */
  const moves = { ArrowLeft: [gi, gj - 1], ArrowRight: [gi, gj + 1], ArrowUp: [gi - 1, gj], ArrowDown: [gi + 1, gj],
    Home: [gi, 0], End: [gi, nCols - 1], PageUp: [0, gj], PageDown: [nRows - 1, gj] };
  if (!(key in moves)) return null;
  const [i, j] = moves[key];
  const next = Math.max(0, Math.min(nRows - 1, i)) * nCols + Math.max(0, Math.min(nCols - 1, j));
  return next < count ? next : n; // (a short last row: stay)
}

/**
 * @typedef {Object} HeatmapPart
 * @property {HTMLElement} el the heatmap panel: caption, legend note, pair and position choice, notes, the SVG
 * @property {() => void} update paint the `heatmap` payload (rebuilding the SVG for a new layout)
 * @property {() => void} relayout rebuild the SVG for a new width
 * @property {() => void} markStale say so when the inputs no longer match the heatmap's
 * @property {() => void} markReceivers outline the receiver heads (path view)
 * @property {() => void} drawOutline outline the selected cell
 * @property {() => void} drawApproxNote the words on approximate cells (they depend on the status)
 */

/**
 * The heatmap with its legend and notes. Keyboard: the grid is one tab stop (roving tabindex:
 * the active cell has tabindex 0, the others -1); arrows move, Home/End go to the row's ends,
 * Enter (or a click) calls `onSelect(row, col)`; with Shift, on a head cell of the path view,
 * `onToggleReceiver("layer.head")` instead. Each cell's accessible name carries its place and
 * value. Everything painted comes from one payload, whose run id goes to root.dataset.runId.
 * @param {Ctx} ctx
 * @param {{onSelect: (row: number, col: number) => void, onToggleReceiver: (head: string) => void}} callbacks
 * @returns {HeatmapPart}
 */
export function makeHeatmap(ctx, { onSelect, onToggleReceiver }) {
  const { model, root, save, tooltip } = ctx;
  const caption = h("div", { class: "pw-caption" });
  const legendNote = h("div", { class: "pw-legend-note" });
  // One position at a time for (layer.head x position) sweeps: a layer x head grid.
  const posSelect = /** @type {HTMLSelectElement} */ (h("select", { class: "pw-select", "data-control": "position", "aria-label": "position shown" }));
  const posRow = h("label", { class: "pw-position pw-hidden" }, h("span", { class: "pw-label" }, "Show "), posSelect);
  const pairSelect = /** @type {HTMLSelectElement} */ (h("select", { class: "pw-select", "data-control": "pair", "aria-label": "prompt pair shown" }));
  const pairRow = h("label", { class: "pw-position pw-hidden" }, h("span", { class: "pw-label" }, "Pairs "), pairSelect);
  const approxNote = h("div", { class: "pw-approx-note pw-hidden", "data-note": "approximate" },
    h("span", { class: "pw-approx-swatch" }),
    h("b", {}, "approximate (attribution patching)"),
    h("span", { class: "pw-approx-count" }));
  const staleNote = h("div", { class: "pw-stale pw-hidden" }, "Inputs changed since this heatmap was computed: press Run.");
  const plot = h("div", { class: "pw-plot", "data-control": "selected" }); // (a click on a cell selects it)
  const el = h("div", { class: "pw-heatmap-panel" }, caption, legendNote, pairRow, posRow, approxNote, staleNote, ctx.errors.box("general"), plot);

  /** @type {Grid|null} */ let grid = null;
  let key = "", active = 0;
  /** @type {string|null} */ let posChoice = null; // null: automatic (one position when there are many rows)
  let posOptionsKey = "";
  pairSelect.addEventListener("change", () => save("pair", Number(pairSelect.value)));
  posSelect.addEventListener("change", () => { posChoice = posSelect.value; relayout(); });

  /** @param {Heatmap} p */
  function drawPairChoice(p) {
    const n = p.n_pairs ?? 1;
    pairRow.classList.toggle("pw-hidden", n < 2);
    if (n < 2) return;
    const rows = p.inputs.dataset || [];
    if (pairSelect.options.length !== n + 1) {
      pairSelect.replaceChildren(h("option", { value: "-1" }, `mean over ${n} pairs (explanations add the standard error)`),
        ...Array.from({ length: n }, (_, k) => h("option", { value: String(k) }, `pair ${k}: ${clip(String((rows[k] || [])[0] || ""), 48)}`)));
    }
    pairSelect.value = String(p.pair ?? -1);
    root.dataset.pair = pairSelect.value;
  }

  /** Fill the position selector for this payload and return the position to show (null: all). @param {Heatmap} p */
  function drawPositionChoice(p) {
    const applies = p.rows[0].head !== undefined && p.cols[0].pos !== undefined;
    posRow.classList.toggle("pw-hidden", !applies);
    if (!applies) return null;
    const optionsKey = p.cols.map((c) => c.token ?? c.label).join("\u0000");
    if (optionsKey !== posOptionsKey) {
      posOptionsKey = optionsKey;
      posSelect.replaceChildren(h("option", { value: "all" }, "every position (rows: layer.head)"),
        ...p.cols.map((c, j) => h("option", { value: String(j) }, `position ${j}: ${quote(c.token ?? c.label)} (layer x head)`)));
    }
    const auto = p.rows.length > MANY_ROWS ? String(p.cols.length - 1) : "all";
    const choice = posChoice !== null && (posChoice === "all" || Number(posChoice) < p.cols.length) ? posChoice : auto;
    posSelect.value = choice;
    root.dataset.position = choice;
    return choice === "all" ? null : Number(choice);
  }

  /** Show a new grid, keeping the active cell (and the focus, if the grid had it). @param {Grid} next */
  function mount(next) {
    const hadFocus = !!grid && grid.svg.contains(document.activeElement);
    plot.replaceChildren(next.svg);
    active = Math.min(Math.max(0, active), next.rects.length - 1);
    next.rects.forEach((r, n) => r.setAttribute("tabindex", n === active ? "0" : "-1"));
    grid = next;
    if (hadFocus && next.rects[active]) next.rects[active].focus();
  }

  /** Colour the cells from the current values (cheap: runs on every streamed update). */
  function update() {
    const p = heatmapOf(model);
    if (!p) {
      key = "";
      plot.replaceChildren(h("div", { class: "pw-empty" }, "No heatmap yet: press Run."));
      caption.textContent = "";
      approxNote.classList.add("pw-hidden");
      delete root.dataset.runId;
      return;
    }
    drawPairChoice(p);
    const view = gridView(p, drawPositionChoice(p));
    const width = root.clientWidth || 800;
    const layout = `${p.run_id}|${p.site}|${p.rows.length}x${p.cols.length}|${Math.round(width / 40)}|${view.byPosition ? view.cells[0][1] : "all"}`;
    if (layout !== key || !grid) { mount(buildGrid(p, view, Math.max(320, width))); key = layout; }
    const g = /** @type {Grid} */ (grid);
    const values = floats(p.values);
    const estimate = p.estimate ? floats(p.estimate) : null;
    // What each cell shows: its exact value, else its estimate (approximate), else nothing.
    const shown = Array.from(values, (v, i) => (Number.isFinite(v) ? v : estimate ? estimate[i] : NaN));
    let filled = 0, approx = 0;
    shown.forEach((v, i) => {
      if (!Number.isFinite(v)) return;
      if (Number.isFinite(values[i])) filled++; else approx++;
    });
    const info = ctx.contract.metrics[p.metric];
    const sc = scale(p.metric, shown, info, p.centre);
    let hatchPath = "";
    g.rects.forEach((r, n) => {
      const i = g.flat[n];
      const v = shown[i], exact = Number.isFinite(values[i]);
      if (estimate && Number.isFinite(estimate[i])) r.setAttribute("data-estimate", String(estimate[i]));
      else r.removeAttribute("data-estimate");
      const c = colour(v, sc.lo, sc.hi, sc.kind, sc.mid ?? 0);
      if (c) {
        r.setAttribute("fill", `rgb(${c[0]},${c[1]},${c[2]})`);
        r.setAttribute("fill-opacity", String(c[3]));
        r.classList.remove("pw-pending");
      } else {
        r.removeAttribute("fill"); // .pw-pending colours it (CSS variables need CSS, not attributes)
        r.removeAttribute("fill-opacity");
        r.classList.add("pw-pending");
      }
      if (exact) r.setAttribute("data-value", String(v));
      else r.removeAttribute("data-value");
      r.setAttribute("aria-label", `${cellName(p.rows[Number(r.dataset.row)], p.cols[Number(r.dataset.col)], !!p.path)}: ${p.metric} ` +
        (exact ? fmt(v, 3) : Number.isFinite(v) ? `about ${fmt(v, 3)} (approximate)` : "not computed"));
      const isApprox = !exact && Number.isFinite(v);
      r.classList.toggle("pw-approx", isApprox);
      if (isApprox) {
        r.setAttribute("data-approx", "true");
        hatchPath += `M${r.getAttribute("x")} ${r.getAttribute("y")}h${r.getAttribute("width")}v${r.getAttribute("height")}h-${r.getAttribute("width")}z`;
      } else r.removeAttribute("data-approx");
    });
    g.hatch.setAttribute("d", hatchPath);
    const labels = paintLegend(g.legend, p.metric, sc);
    legendNote.textContent = legendWords(p.metric, sc, info);
    const what = p.path ? p.path.label : p.site;
    caption.textContent = `${p.direction} \u00b7 ${what} \u00b7 ${info ? info.label : p.metric}` +
      (p.complete ? "" : ` \u00b7 ${p.done}/${p.total} patches`);
    approxNote.classList.toggle("pw-hidden", approx === 0);
    approxNote.dataset.count = String(approx);
    drawApproxNote();
    Object.assign(root.dataset, {
      runId: String(p.run_id), complete: String(!!p.complete), runState: String(p.state || ""), filled: String(filled), approx: String(approx),
      metric: p.metric, direction: p.direction, site: p.site, scale: sc.kind, legend: labels.join(" "),
    });
    if (sc.centre) Object.assign(root.dataset, { centre: String(sc.centre.value), centreRun: sc.centre.run });
    else { delete root.dataset.centre; delete root.dataset.centreRun; }
    drawOutline();
    markStale();
    markReceivers();
  }

  function relayout() {
    key = "";
    update();
  }

  /** The words after "approximate (attribution patching)": how many cells, and what happens next. */
  function drawApproxNote() {
    const n = Number(approxNote.dataset.count || 0);
    const it = n === 1 ? "it" : "them";
    const state = heatmapOf(model)?.state;
    const next = state === "running" ? `, replaced by the exact value as the sweep reaches ${it}`
      : ` (the exact sweep stopped before reaching ${it}; press Run for exact values)`;
    /** @type {HTMLElement} */ (approxNote.querySelector(".pw-approx-count")).textContent =
      `: ${n} hatched cell${n === 1 ? "" : "s"} show${n === 1 ? "s" : ""} a first-order estimate` + (n ? next : "");
  }

  /** Stale: a sweep field the heatmap records (the contract's sweep_fields; the path view's own
   * only for a path sweep) is no longer what the model holds. */
  function markStale() {
    const inputs = heatmapOf(model)?.inputs;
    if (!inputs) return staleNote.classList.add("pw-hidden");
    const { sweep_fields, path_fields } = ctx.contract;
    const stale = sweep_fields.some((k) => k in inputs && (inputs.site === "path" || !path_fields.includes(k)) &&
      JSON.stringify(inputs[k]) !== JSON.stringify(model.get(k)));
    staleNote.classList.toggle("pw-hidden", !stale);
  }

  function markReceivers() {
    if (!grid) return;
    const heads = model.get("site") === "path" ? receiverHeads(model.get("receivers")) : [];
    let d = "";
    for (const r of grid.rects) {
      if (r.dataset.layer === undefined || r.dataset.head === undefined || r.dataset.pos !== undefined) continue;
      if (!heads.includes(`${r.dataset.layer}.${r.dataset.head}`)) continue;
      const x = Number(r.getAttribute("x")) + 1.5, y = Number(r.getAttribute("y")) + 1.5;
      d += `M${x} ${y}h${grid.cw - 4}v${grid.ch - 4}h-${grid.cw - 4}z`;
    }
    grid.receivers.setAttribute("d", d);
    root.dataset.receivers = heatmapOf(model) ? heads.join(" ") : "";
  }

  function drawOutline() {
    if (!grid) return;
    const sel = model.get("selected") || {};
    const cell = Number.isInteger(sel.row) && Number.isInteger(sel.col)
      ? grid.rects.find((r) => r.dataset.row === String(sel.row) && r.dataset.col === String(sel.col)) : undefined;
    grid.outline.classList.toggle("pw-hidden", !cell);
    if (cell) {
      grid.outline.setAttribute("x", String(cell.getAttribute("x")));
      grid.outline.setAttribute("y", String(cell.getAttribute("y")));
    }
  }

  // Tooltip and clicks, delegated from the cells.
  plot.addEventListener("mousemove", (e) => {
    const r = /** @type {Element} */ (e.target);
    const p = heatmapOf(model);
    if (!isCell(r) || !p) return tooltip.hide();
    const row = p.rows[Number(r.dataset.row)], col = p.cols[Number(r.dataset.col)];
    const exact = r.dataset.value !== undefined, guess = r.dataset.estimate;
    const lines = [exact ? `${p.metric} = ${fmt(Number(r.dataset.value), 4)}`
      : guess !== undefined ? `${p.metric} \u2248 ${fmt(Number(guess), 4)} (approximate: attribution patching)`
      : `${p.metric}: not computed yet`];
    const head = row.head ?? col.head;
    if (p.path) lines.push(`sender: head ${row.layer}.${head}`);
    else {
      lines.push(`layer ${row.layer}`);
      if (head !== undefined) lines.push(`head ${head}`);
    }
    if (col.pos !== undefined) {
      lines.push(`position ${col.pos}: ${quote(col.token ?? "")}` +
        (col.diff ? ` (corrupted: ${quote(col.corrupted_token ?? "")})` : ""));
    }
    if (exact && guess !== undefined) lines.push(`attribution estimate was ${fmt(Number(guess), 4)}`);
    if (model.get("site") === "path" && col.pos === undefined) lines.push("Shift+click: add/remove as a receiver");
    tooltip.show(e, lines);
  });
  plot.addEventListener("mouseleave", () => tooltip.hide());

  /** Make `r` the grid's one tab stop. @param {SVGRectElement} r @param {boolean} focus */
  function setActive(r, focus) {
    if (!grid) return;
    for (const other of grid.rects) if (other !== r && other.getAttribute("tabindex") === "0") other.setAttribute("tabindex", "-1");
    r.setAttribute("tabindex", "0");
    active = grid.rects.indexOf(r);
    if (focus) r.focus();
  }
  /** A click (or Enter) on a cell; with Shift in the path view, a receiver toggle. @param {SVGRectElement} r @param {boolean} shift */
  function activate(r, shift) {
    const { layer, head, pos } = r.dataset;
    setActive(r, false);
    if (shift && model.get("site") === "path" && layer !== undefined && head !== undefined && pos === undefined) {
      onToggleReceiver(`${layer}.${head}`);
      return;
    }
    onSelect(Number(r.dataset.row), Number(r.dataset.col));
  }
  plot.addEventListener("click", (e) => {
    const r = /** @type {Element} */ (e.target);
    if (isCell(r)) activate(r, e.shiftKey);
  });
  plot.addEventListener("keydown", (e) => {
    const r = /** @type {Element} */ (e.target);
    if (!isCell(r) || !grid) return;
    const next = gridMove(grid.rects.indexOf(r), grid.rects.length, grid.gridCols, e.key);
    if (next !== null) setActive(grid.rects[next], true);
    else if (e.key === "Enter" || e.key === " ") activate(r, e.shiftKey);
    else return;
    e.preventDefault();
    e.stopPropagation();
  });

  return { el, update, relayout, markStale, markReceivers, drawOutline, drawApproxNote };
}

// ------------------------------------------------------------ circuit view
// The component "circuit" (patchwidgets/widget_circuit.py): every edge of the model's graph
// scored by edge attribution (EAP or EAP-IG), the strongest drawn by layer. The rules below are
// patchwidgets/circuit_view.py's (layout, top k, colour and width, curves), checked against the
// same cases (tests/shared/widget_cases.json, circuit_*), so the exported picture and the page agree.

/**
 * A node of the graph (circuit_view.circuit_payload): the input embeddings, a head, an MLP or the logits.
 * @typedef {{name: string, kind: string, layer: number, head: number|null}} CircuitNode
 */
/**
 * The `circuit` traitlet (patchwidgets/circuit_view.py circuit_payload): the graph's nodes and its
 * strongest edges by |score|, strongest first. Its keys are the contract's circuit_keys.
 * @typedef {Object} Circuit
 * @property {number} run_id the job that made it
 * @property {string} method "eap" or "eap-ig"
 * @property {number} steps EAP-IG's interpolation steps (1 for EAP)
 * @property {string} metric the metric the edges are scored on
 * @property {string} direction
 * @property {CircuitNode[]} nodes every node of the graph
 * @property {Array<[number, number, string, string]>} edges [sender, receiver, input, name], node indices, strongest first
 * @property {DataView} scores float32, one per edge, same order
 * @property {number} n_edges every edge of the graph (the slider's range)
 * @property {Partial<State>} inputs the circuit fields as the job read them
 */
/**
 * An exact check of the circuit on screen (circuit_faithfulness, circuit_edge_patch).
 * `value` is the faithfulness, or the metric with the edge patched (what patchwidgets.edge_patch gives); an edge's
 * `change` is that minus the unpatched target run's value: what its score estimates.
 * @typedef {{run_id?: number, k?: number, edge?: string, value?: number|null, change?: number, state?: string, metric?: string, error?: string}} CircuitCheck
 */

/** A score or change with its sign: "+0.123", "-0.5". @param {number|null|undefined} v */
export const signed = (v) => (v !== null && v !== undefined && v > 0 ? "+" : "") + fmt(v, 4);

/** Where each input of a head enters it, as a fraction of the node's width from its middle. @type {Object<string, number>} */
export const INPUT_OFFSET = { q: -0.3, k: 0, v: 0.3, in: 0 };
/** @type {Object<string, string>} */
const INPUT_WORDS = { q: "query", k: "key", v: "value", in: "input" };

/** The circuit payload, or null before the first one. @param {Model} model @returns {Circuit|null} */
export function circuitOf(model) {
  const p = model.get("circuit");
  return p && Array.isArray(p.nodes) && p.nodes.length ? /** @type {Circuit} */ (p) : null;
}

/** A node's row, bottom to top: the input, per layer its heads then its MLP, the logits. @param {CircuitNode} n */
export function circuitRowKey(n) {
  if (n.kind === "input") return -1;
  if (n.kind === "logits") return Infinity;
  return 2 * n.layer + (n.kind === "mlp" ? 1 : 0);
}

/**
 * Each node's place in the unit square ([x, y], y = 0 at the top), its row (0 = the bottom one)
 * and the number of rows: the input at the bottom, the logits at the top, a row per layer's heads
 * and one per layer's MLP between; a row of m nodes (ordered by head) puts node i at (i + 0.5) / m.
 * @param {CircuitNode[]} nodes
 * @returns {{places: Array<[number, number]>, rows: number[], nRows: number}}
 */
export function circuitLayout(nodes) {
  const keys = [...new Set(nodes.map(circuitRowKey))].sort((a, b) => a - b);
  const rowOf = new Map(keys.map((k, r) => [k, r]));
  const nRows = keys.length;
  const rows = nodes.map((n) => /** @type {number} */ (rowOf.get(circuitRowKey(n))));
  /** @type {Array<[number, number]>} */
  const places = nodes.map(() => [0, 0]);
  for (let r = 0; r < nRows; r++) {
    const members = nodes.map((_, i) => i).filter((i) => rows[i] === r);
    members.sort((a, b) => ((nodes[a].head ?? -1) - (nodes[b].head ?? -1)) || a - b);
    members.forEach((i, j) => { places[i] = [(j + 0.5) / members.length, 1 - (r + 0.5) / nRows]; });
  }
  return { places, rows, nRows };
}

/**
 * The indices of the k largest |score|s, largest first (ties: lower index first; NaN last).
 * @param {ArrayLike<number>} scores @param {number} k @returns {number[]}
 */
export function topEdges(scores, k) {
  const size = (/** @type {number} */ i) => (Number.isFinite(scores[i]) ? Math.abs(scores[i]) : -1);
  const order = Array.from({ length: scores.length }, (_, i) => i);
  order.sort((a, b) => size(b) - size(a) || a - b);
  return order.slice(0, Math.max(0, Math.floor(k)));
}

/**
 * An edge's width (1 to 6 px), colour (the diverging rule around 0 on -maxAbs..maxAbs: blue for a
 * positive score, red for a negative one; null when missing) and opacity (0.25 + 0.75 alpha, so a
 * drawn edge never vanishes), as circuit_view.edge_style.
 * @param {number} score @param {number} maxAbs
 * @returns {{width: number, rgba: RGBA|null, opacity: number}}
 */
export function edgeStyle(score, maxAbs) {
  const top = maxAbs > 0 && Number.isFinite(maxAbs) ? maxAbs : 1;
  const rgba = colour(score, -top, top, "diverging", 0);
  if (!rgba) return { width: 1, rgba: null, opacity: 0.25 };
  const strength = Math.min(1, Math.abs(score) / top);
  return { width: Math.round((1 + 5 * strength) * 100) / 100, rgba, opacity: round3(0.25 + 0.75 * rgba[3]) };
}

/**
 * The cubic of an edge from `start` (the sender's top, px) to `end` (the receiver's bottom), `span`
 * rows up, between nodes `nodeW` px wide: [x1, y1, c1x, c1y, c2x, c2y, x2, y2]. It leaves and enters
 * vertically; an edge that skips rows bows right by 0.7 nodeW + 6 px per row skipped (at most 80),
 * clear of the aligned nodes it passes (as circuit_view.edge_curve).
 * @param {[number, number]} start @param {[number, number]} end @param {number} span @param {number} nodeW
 * @returns {number[]}
 */
export function edgeCurve(start, end, span, nodeW) {
  const [x1, y1] = start, [x2, y2] = end;
  const dy = (y1 - y2) * 0.45;
  const bow = span > 1 ? Math.min(80, 0.7 * nodeW + 6 * (span - 1)) : 0;
  return [x1, y1, x1 + bow, y1 - dy, x2 + bow, y2 + dy, x2, y2];
}

/**
 * The plot area of a graph `width` px wide (as circuit_view.box_for): rows 26 to 56 px apart,
 * nodes as wide as the fullest row allows (at most 46 px).
 * @param {CircuitNode[]} nodes @param {number} nRows @param {number} width
 */
export function circuitBox(nodes, nRows, width) {
  /** @type {Map<number, number>} */
  const perRow = new Map();
  for (const n of nodes) perRow.set(circuitRowKey(n), (perRow.get(circuitRowKey(n)) ?? 0) + 1);
  const widest = Math.max(1, ...perRow.values());
  const gap = Math.max(26, Math.min(56, 720 / Math.max(1, nRows)));
  const nodeW = Math.max(8, Math.min(46, (0.8 * width) / widest));
  return { left: 8, top: 8, width, height: gap * nRows, nodeW, nodeH: Math.min(18, 0.55 * gap) };
}

/**
 * The slider's stops for a graph of `n` edges: every k up to 10, then 12, 15, 20, 25, 30, 40,
 * 50, 60, 80, 100, ... (about ten per decade), and n itself: fine steps where circuits are small,
 * and every size reachable on a GPT-2-sized graph (32,491 edges) in about 45 stops.
 * @param {number} n @returns {number[]}
 */
export function kSteps(n) {
  if (n <= 0) return [0];
  const steps = [];
  for (let k = 1; k <= Math.min(n, 10); k++) steps.push(k);
  for (let e = 1; 10 ** e < n; e++) {
    for (const m of [1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8]) {
      const v = Math.round(m * 10 ** e);
      if (v > 10 && v < n) steps.push(v);
    }
  }
  if (steps[steps.length - 1] !== n) steps.push(n);
  return steps;
}

/** The stop of `steps` for k: the first at least k (the last for a k past them). @param {number[]} steps @param {number} k */
export function stepIndex(steps, k) {
  const i = steps.findIndex((v) => v >= k);
  return i < 0 ? steps.length - 1 : i;
}

/**
 * Keyboard moves between the drawn edges (`edges`: [sender, receiver] node indices, strongest
 * first) from edge n: ArrowRight / ArrowLeft the next weaker / stronger edge, ArrowUp the
 * strongest edge leaving this edge's receiver (follow the flow up), ArrowDown the strongest edge
 * entering its sender (down), Home / End the strongest / weakest. Returns the edge to move to (n
 * itself when there is none that way), or null for a key that is not a move.
 * @param {Array<[number, number]>} edges @param {number} n @param {string} key
 * @returns {number|null}
 */
export function edgeMove(edges, n, key) {
  const last = edges.length - 1;
  const [sender, receiver] = edges[n];
  const find = (/** @type {(e: [number, number]) => boolean} */ test) => { const i = edges.findIndex(test); return i < 0 ? n : i; };
  switch (key) {
    case "ArrowRight": return Math.min(last, n + 1);
    case "ArrowLeft": return Math.max(0, n - 1);
    case "Home": return 0;
    case "End": return last;
    case "ArrowUp": return find((e) => e[0] === receiver);
    case "ArrowDown": return find((e) => e[1] === sender);
    default: return null;
  }
}

/** What a node's box says: "0.1", "0.kv1" (a key-value head), "MLP 0", "input", "logits". @param {CircuitNode} n */
export function nodeLabel(n) {
  if (n.kind === "head") return `${n.layer}.${n.head}`;
  if (n.kind === "kv_head") return `${n.layer}.kv${n.head}`;
  if (n.kind === "mlp") return `MLP ${n.layer}`;
  return n.kind === "input" ? "input" : "logits";
}

/** A node in words: "head 0.1", "key-value head 0.1", "MLP 0", "the input embeddings", "the logits". @param {CircuitNode} n */
export function nodeWords(n) {
  if (n.kind === "head") return `head ${n.layer}.${n.head}`;
  if (n.kind === "kv_head") return `key-value head ${n.layer}.${n.head}`;
  if (n.kind === "mlp") return `MLP ${n.layer}`;
  return n.kind === "input" ? "the input embeddings" : "the logits";
}

/** An edge in words: "head 0.1 → head 2.3 (query)". @param {CircuitNode} s @param {CircuitNode} r @param {string} input */
export function edgeWords(s, r, input) {
  return `${nodeWords(s)} \u2192 ${nodeWords(r)}${r.kind === "head" || r.kind === "kv_head" ? ` (${INPUT_WORDS[input] ?? input})` : ""}`;
}

/**
 * @typedef {Object} CircuitGraph
 * @property {SVGSVGElement} svg
 * @property {SVGGElement[]} edges the drawn edges, strongest first (each a .pw-edge group: line and hit area)
 * @property {number[]} index each drawn edge's index in the payload's edges
 * @property {Legend} legend
 */

/**
 * Build the SVG of the `k` strongest edges of `p` for a widget `width` px wide: edges (weakest
 * drawn first, so the strongest lie on top), then the nodes (the ones no drawn edge touches
 * faded), then the legend. Each edge is a group (.pw-edge, a roving tab stop) holding its visible
 * line and a wide transparent hit area, named for screen readers with its words and score.
 * @param {Circuit} p @param {number} k @param {number} width
 * @returns {CircuitGraph}
 */
export function buildCircuit(p, k, width) {
  const scores = floats(p.scores);
  const legendW = 96;
  const { places, rows, nRows } = circuitLayout(p.nodes);
  const box = circuitBox(p.nodes, nRows, Math.max(240, width - legendW - 24));
  const at = (/** @type {number} */ i) => [box.left + places[i][0] * box.width, box.top + places[i][1] * box.height];
  const svgW = box.left * 2 + box.width + legendW, svgH = box.top * 2 + box.height;
  const svg = /** @type {SVGSVGElement} */ (s("svg", {
    width: svgW, height: svgH, class: "pw-circuit-graph", role: "group",
    "aria-label": `circuit of ${p.method.toUpperCase()} edge scores: arrow keys move between edges, Enter patches one exactly`,
  }));
  const maxAbs = Array.from(scores).reduce((m, v) => (Number.isFinite(v) ? Math.max(m, Math.abs(v)) : m), 0);
  const drawn = topEdges(scores, Math.min(k, p.edges.length));
  const edgeLayer = s("g", { class: "pw-edges" });
  /** @type {SVGGElement[]} */
  const groups = [];
  drawn.forEach((i, rank) => {
    const [si, ri, input, name] = p.edges[i];
    const [sx, sy] = at(si), [rx, ry] = at(ri);
    const c = edgeCurve([sx, sy - box.nodeH / 2], [rx + (INPUT_OFFSET[input] ?? 0) * box.nodeW, ry + box.nodeH / 2], rows[ri] - rows[si], box.nodeW);
    const d = `M${c[0].toFixed(1)} ${c[1].toFixed(1)}C${c.slice(2).map((v) => v.toFixed(1)).join(" ")}`;
    const st = edgeStyle(scores[i], maxAbs);
    const g = /** @type {SVGGElement} */ (s("g", {
      class: "pw-edge", role: "button", tabindex: rank === 0 ? 0 : -1, "data-edge": name, "data-rank": rank,
      "data-index": i, "data-score": scores[i], "data-sender": p.nodes[si].name, "data-receiver": p.nodes[ri].name, "data-input": input,
      "aria-label": `${edgeWords(p.nodes[si], p.nodes[ri], input)}: score ${fmt(scores[i], 3)}`,
    }));
    g.append(
      s("path", { d, class: "pw-edge-line", fill: "none", stroke: st.rgba ? `rgb(${st.rgba[0]},${st.rgba[1]},${st.rgba[2]})` : "#999", "stroke-width": st.width, "stroke-opacity": st.opacity }),
      s("path", { d, class: "pw-edge-hit", fill: "none" }));
    groups.push(g);
  });
  edgeLayer.append(...[...groups].reverse());
  const used = new Set(drawn.flatMap((i) => [p.edges[i][0], p.edges[i][1]]));
  const nodeLayer = s("g", { class: "pw-nodes" });
  p.nodes.forEach((n, i) => {
    const [x, y] = at(i);
    const g = s("g", { class: used.has(i) ? "pw-node" : "pw-node pw-node-idle", "data-node": n.name });
    g.append(s("rect", { x: x - box.nodeW / 2, y: y - box.nodeH / 2, width: box.nodeW, height: box.nodeH, rx: 3 }));
    const label = nodeLabel(n);
    if (5.5 * label.length <= box.nodeW) {
      const t = s("text", { x, y, "text-anchor": "middle", "dominant-baseline": "central", class: "pw-node-label" });
      t.textContent = label;
      g.append(t);
    }
    nodeLayer.append(g);
  });
  svg.append(edgeLayer, nodeLayer);
  const { legend } = buildLegend(svg, box.left * 2 + box.width + 8, box.top + 16, Math.max(100, Math.min(box.height - 24, 200)));
  paintLegend(legend, "score", scale("score", [-maxAbs, maxAbs], undefined, null));
  return { svg, edges: groups, index: drawn, legend };
}

/**
 * @typedef {Object} CircuitPanelPart
 * @property {HTMLElement} el the circuit view's settings (shown for the "circuit" component): the scoring method
 * @property {() => void} update
 */

/**
 * The circuit view's row of settings, shown for the "circuit" component (as the path view's is).
 * @param {Ctx} ctx
 * @returns {CircuitPanelPart}
 */
export function makeCircuitPanel(ctx) {
  const { model, save } = ctx;
  const methodSelect = /** @type {HTMLSelectElement} */ (h("select", { class: "pw-select", "data-control": "circuit_method", "aria-label": "edge scoring method" }));
  for (const [value, label] of ctx.contract.circuit_methods) methodSelect.append(h("option", { value }, label));
  methodSelect.addEventListener("change", () => save("circuit_method", methodSelect.value));
  const el = h("div", { class: "pw-path pw-hidden", "data-panel": "circuit" },
    h("label", { class: "pw-control" }, h("span", { class: "pw-label" }, "Edge scores"), methodSelect, ctx.errors.box("circuit_method")),
    h("div", { class: "pw-path-help" },
      "Run scores every edge of the model (input, heads, MLPs, logits; a head's query, key and value inputs apart) by how much ",
      "patching it alone would move the metric, to first order (EAP) or integrated along the way from the corrupted to the clean run (EAP-IG). ",
      "Keep the strongest with the slider: releasing it computes the kept circuit's exact faithfulness; click an edge for its exact patch."));
  return {
    el,
    update() {
      el.classList.toggle("pw-hidden", model.get("site") !== "circuit");
      methodSelect.value = model.get("circuit_method");
    },
  };
}

/**
 * @typedef {Object} CircuitPart
 * @property {HTMLElement} el the view: caption, legend note, top-k slider with the faithfulness, the edge clicked, the graph
 * @property {() => void} update draw the `circuit` payload with the slider's k (rebuilding the SVG)
 * @property {() => void} updateChecks show `circuit_faithfulness` and `circuit_edge_patch`
 * @property {() => void} markStale say so when the inputs no longer match the circuit's
 * @property {() => void} relayout rebuild for a new width
 */

/**
 * The circuit view. The slider's stops are kSteps(n_edges); moving it redraws the top k at once,
 * and releasing it (or an arrow key on it) saves `circuit_k`, which makes Python compute the kept
 * circuit's faithfulness. Hover an edge for its score; click it, or Tab to the graph (one tab
 * stop), move with the arrows (edgeMove) and press Enter, to call `onSelectEdge(name)`.
 * @param {Ctx} ctx @param {{onSelectEdge: (name: string) => void}} callbacks
 * @returns {CircuitPart}
 */
export function makeCircuit(ctx, { onSelectEdge }) {
  const { model, root, save, tooltip } = ctx;
  const caption = h("div", { class: "pw-caption" });
  const legendNote = h("div", { class: "pw-legend-note" });
  const slider = /** @type {HTMLInputElement} */ (h("input", { type: "range", class: "pw-k-slider", min: "0", max: "0", step: "1", value: "0", "data-control": "circuit_k", "aria-label": "edges kept: the strongest k" }));
  const readout = h("span", { class: "pw-k-readout" });
  const faith = h("span", { class: "pw-faithfulness", "aria-live": "polite" });
  const kRow = h("div", { class: "pw-k-row" }, h("label", { class: "pw-position" }, h("span", { class: "pw-label" }, "Edges kept "), slider, readout), faith);
  const staleNote = h("div", { class: "pw-stale pw-hidden" }, "Inputs changed since these edges were scored: press Run.");
  const info = h("div", { class: "pw-edge-info", "aria-live": "polite" });
  const plot = h("div", { class: "pw-plot pw-circuit-plot", "data-control": "circuit_edge" });
  const el = h("div", { class: "pw-circuit-panel pw-hidden", "data-panel": "circuit-view" }, caption, legendNote, kRow, staleNote, info, plot);

  /** @type {CircuitGraph|null} */ let graph = null;
  let key = "", steps = [0], active = 0;
  /** @type {number|null} */ let localK = null; // the slider's k while it moves (null: the model's)
  /** @type {Map<string, {value: number, change: number}>} */ let exact = new Map(); // exact edge patches seen for this run
  let exactRun = -1;

  const kShown = () => localK ?? model.get("circuit_k");
  slider.addEventListener("input", () => { localK = steps[Number(slider.value)]; draw(); });
  slider.addEventListener("change", () => {
    const k = steps[Number(slider.value)];
    localK = null;
    if (k !== model.get("circuit_k")) save("circuit_k", k);
    else draw();
  });

  function update() {
    const p = circuitOf(model);
    if (!p) {
      key = "";
      graph = null;
      plot.replaceChildren(h("div", { class: "pw-empty" }, "No circuit yet: press Run to score every edge."));
      caption.textContent = legendNote.textContent = readout.textContent = "";
      slider.disabled = true;
      delete root.dataset.circuitRun;
      updateChecks();
      return;
    }
    if (p.run_id !== exactRun) { exact = new Map(); exactRun = p.run_id; }
    steps = kSteps(p.n_edges);
    slider.max = String(steps.length - 1);
    slider.disabled = false;
    const method = p.method.toUpperCase() + (p.method === "eap-ig" ? ` (${p.steps} steps)` : "");
    caption.textContent = `${p.direction} \u00b7 circuit \u00b7 ${method} edge scores of ${p.metric} \u00b7 ${p.n_edges} edges`;
    legendNote.textContent = `edge score = ${p.method.toUpperCase()}'s estimate of how much patching the edge alone changes ${p.metric}: ` +
      "blue raises it, red lowers it; width and strength grow with |score|.";
    draw();
    markStale();
  }

  /** Draw the k strongest edges (k: the slider's while it moves, else the model's). */
  function draw() {
    const p = circuitOf(model);
    if (!p) return;
    const k = Math.min(kShown(), p.n_edges);
    if (localK === null) slider.value = String(stepIndex(steps, k));
    const drawnN = Math.min(k, p.edges.length);
    readout.textContent = `${k} of ${p.n_edges}` + (drawnN < k ? ` (the ${drawnN} strongest drawn)` : "");
    slider.setAttribute("aria-valuetext", `${k} of ${p.n_edges} edges`);
    const width = root.clientWidth || 800;
    const layout = `${p.run_id}|${k}|${Math.round(width / 40)}`;
    if (layout !== key || !graph) {
      const activeName = graph?.edges[active]?.dataset.edge;
      const hadFocus = !!graph && graph.svg.contains(document.activeElement);
      const next = buildCircuit(p, k, Math.max(360, width));
      plot.replaceChildren(next.svg);
      const again = next.edges.findIndex((g) => g.dataset.edge === activeName);
      active = again >= 0 ? again : 0;
      next.edges.forEach((g, n) => g.setAttribute("tabindex", n === active ? "0" : "-1"));
      graph = next;
      key = layout;
      if (hadFocus && next.edges[active]) next.edges[active].focus();
    }
    Object.assign(root.dataset, { circuitRun: String(p.run_id), circuitK: String(k), circuitDrawn: String(graph.edges.length) });
    drawSelection();
    updateChecks();
  }

  /** Mark the edge clicked (circuit_edge) and say what is known of it. */
  function drawSelection() {
    if (!graph) return;
    const name = model.get("circuit_edge");
    for (const g of graph.edges) g.classList.toggle("pw-edge-selected", g.dataset.edge === name);
  }

  /** Faithfulness of the kept circuit, and the clicked edge's exact patch, for the circuit on screen. */
  function updateChecks() {
    const p = circuitOf(model);
    /** @type {CircuitCheck} */ const f = model.get("circuit_faithfulness") || {};
    /** @type {CircuitCheck} */ const e = model.get("circuit_edge_patch") || {};
    const k = p ? Math.min(kShown(), p.n_edges) : 0;
    const fits = p && f.run_id === p.run_id && f.k === k;
    faith.textContent = !p ? "" : !fits ? (localK !== null ? "release to compute the faithfulness" : "")
      : f.state === "running" ? `faithfulness of these ${k} edges: computing\u2026`
      : f.state === "done" ? `faithfulness of these ${k} edges: ` : f.state === "error" ? `faithfulness: ${f.error ?? "failed"}`
      : f.state === "cancelled" ? "faithfulness: cancelled" : "";
    if (fits && f.state === "done") faith.append(h("b", {}, fmt(f.value, 3)));
    faith.dataset.state = fits ? String(f.state ?? "") : "";
    if (fits && f.state === "done" && f.value !== null && f.value !== undefined) { faith.dataset.value = String(f.value); root.dataset.faithfulness = String(f.value); root.dataset.faithfulnessK = String(k); }
    else { delete faith.dataset.value; delete root.dataset.faithfulness; delete root.dataset.faithfulnessK; }

    const name = model.get("circuit_edge");
    const i = p ? p.edges.findIndex((x) => x[3] === name) : -1;
    if (p && e.run_id === p.run_id && e.state === "done" && typeof e.value === "number" && typeof e.change === "number" && e.edge) {
      exact.set(e.edge, { value: e.value, change: e.change });
    }
    delete root.dataset.edgePatch;
    delete root.dataset.edgeChange;
    if (!p || i < 0) {
      info.textContent = p ? "Click an edge (or Tab to the graph, move with the arrow keys, press Enter) for its exact edge patch." : "";
      delete info.dataset.edge;
      return;
    }
    const [si, ri, input] = p.edges[i];
    const score = floats(p.scores)[i];
    info.replaceChildren(h("b", {}, edgeWords(p.nodes[si], p.nodes[ri], input)), `: score ${signed(score)} (${p.method.toUpperCase()} estimate)`);
    info.dataset.edge = name;
    const mine = e.run_id === p.run_id && e.edge === name;
    if (mine && e.state === "running") info.append(" \u00b7 exact edge patch: computing\u2026");
    else if (mine && e.state === "error") info.append(` \u00b7 exact edge patch failed: ${e.error ?? ""}`);
    else if (exact.has(name)) {
      const x = /** @type {{value: number, change: number}} */ (exact.get(name));
      info.append(" \u00b7 exact: ", h("b", { "data-change": String(x.change) }, signed(x.change)),
        ` when patched alone (${p.metric} `, h("span", { "data-exact": String(x.value) }, fmt(x.value, 4)), ")");
      Object.assign(root.dataset, { edgePatch: String(x.value), edgeChange: String(x.change) });
    }
  }

  /** Stale: a circuit field (the contract's circuit_fields) is no longer what the circuit was scored with. */
  function markStale() {
    const inputs = circuitOf(model)?.inputs;
    const stale = !!inputs && ctx.contract.circuit_fields.some((k) => k in inputs && JSON.stringify(inputs[k]) !== JSON.stringify(model.get(k)));
    staleNote.classList.toggle("pw-hidden", !stale);
  }

  /** The drawn edge an event is about, or null. @param {EventTarget|null} t */
  const edgeOf = (t) => (t instanceof Element ? /** @type {SVGGElement|null} */ (t.closest("g.pw-edge")) : null);
  /** Make `g` the graph's one tab stop. @param {SVGGElement} g @param {boolean} focus */
  function setActive(g, focus) {
    if (!graph) return;
    for (const other of graph.edges) if (other !== g) other.setAttribute("tabindex", "-1");
    g.setAttribute("tabindex", "0");
    active = graph.edges.indexOf(g);
    if (focus) g.focus();
  }
  /** @param {SVGGElement} g */
  function activate(g) {
    setActive(g, false);
    onSelectEdge(String(g.dataset.edge));
    drawSelection();
  }
  plot.addEventListener("mousemove", (e) => {
    const g = edgeOf(e.target);
    const p = circuitOf(model);
    if (!g || !p) return tooltip.hide();
    const i = Number(g.dataset.index);
    const [si, ri, input, name] = p.edges[i];
    const lines = [edgeWords(p.nodes[si], p.nodes[ri], input), `score ${fmt(Number(g.dataset.score), 4)} (${p.method.toUpperCase()} estimate of the change in ${p.metric})`];
    const x = exact.get(name);
    if (x) lines.push(`exact change when patched alone: ${signed(x.change)} (${p.metric} ${fmt(x.value, 4)})`);
    lines.push(`rank ${Number(g.dataset.rank) + 1} by |score|; click for the exact edge patch`);
    tooltip.show(e, lines);
  });
  plot.addEventListener("mouseleave", () => tooltip.hide());
  plot.addEventListener("click", (e) => { const g = edgeOf(e.target); if (g) activate(g); });
  plot.addEventListener("keydown", (e) => {
    const g = edgeOf(e.target);
    if (!g || !graph) return;
    const links = graph.index.map((i) => /** @type {[number, number]} */ ([circuitOf(model)?.edges[i][0] ?? -1, circuitOf(model)?.edges[i][1] ?? -1]));
    const next = edgeMove(links, graph.edges.indexOf(g), e.key);
    if (next !== null) setActive(graph.edges[next], true);
    else if (e.key === "Enter" || e.key === " ") activate(g);
    else return;
    e.preventDefault();
    e.stopPropagation();
  });

  return { el, update, updateChecks: () => { drawSelection(); updateChecks(); }, markStale, relayout() { key = ""; draw(); } };
}

// ------------------------------------------------------------ explanation + attention patterns
/**
 * @typedef {Object} ExplainPart
 * @property {HTMLElement} el the side panel: the selected cell in words, one head's attention on both prompts
 * @property {HTMLElement} patterns the attention grids' box (its width sets their size)
 * @property {() => void} updateExplanation
 * @property {() => void} updatePattern
 * @property {() => void} noKernel say that explanations need Python, which has not answered
 */

/**
 * The side panel. The explanation comes from Python (`explanation`); the pattern of the head
 * chosen with the layer and head selects (or by clicking a head cell) from `pattern`.
 * @param {Ctx} ctx
 * @returns {ExplainPart}
 */
export function makeExplainPanel({ model, save, tooltip }) {
  const explanation = h("p", { class: "pw-explanation" });
  const patternPanel = h("div", { class: "pw-patterns" });
  const layerSelect = /** @type {HTMLSelectElement} */ (h("select", { class: "pw-select", "data-control": "pattern_layer", "aria-label": "layer" }));
  const headSelect = /** @type {HTMLSelectElement} */ (h("select", { class: "pw-select", "data-control": "pattern_head", "aria-label": "head" }));
  const info = model.get("model_info") || { n_layers: 0, n_heads: 0 };
  for (let l = 0; l < info.n_layers; l++) layerSelect.append(h("option", { value: String(l) }, `layer ${l}`));
  for (let hh = 0; hh < info.n_heads; hh++) headSelect.append(h("option", { value: String(hh) }, `head ${hh}`));
  layerSelect.addEventListener("change", () => save("pattern_layer", Number(layerSelect.value)));
  headSelect.addEventListener("change", () => save("pattern_head", Number(headSelect.value)));
  const el = h("div", { class: "pw-side" },
    h("div", { class: "pw-side-title" }, "Selected cell"), explanation,
    h("div", { class: "pw-side-title" }, "Attention pattern of ", layerSelect, headSelect),
    patternPanel);

  /** One query x key grid. @param {string} name @param {PatternView} view */
  function patternGrid(name, view) {
    const n = view.n, w = floats(view.values), toks = view.tokens;
    // Two grids side by side when the panel is wide enough, else one per line.
    const avail = Math.max(220, patternPanel.clientWidth || 300);
    const per = avail >= 560 ? avail / 2 - 12 : avail - 4;
    const labelLen = Math.min(12, Math.max(...toks.map((t) => t.length + 2)));
    const labelW = 10 + labelLen * 6;
    const cell = Math.max(3, Math.min(8, Math.floor((per - labelW) / n))); // (smaller than the heatmap's cells: the heatmap is the main picture)
    const font = Math.min(10, Math.max(7, cell - 2));
    const left = 10 + labelLen * font * 0.6, top = 10 + labelLen * font * 0.5;
    const svg = s("svg", { width: left + n * cell + 4, height: top + n * cell + 4, class: "pw-pattern", "data-prompt": name, "data-n": n });
    const stride = Math.ceil(8 / cell);
    toks.forEach((tok, i) => {
      if (i % stride) return;
      const label = quote(clip(tok, 10));
      const q = s("text", { x: left - 3, y: top + i * cell + cell / 2, "font-size": font, "text-anchor": "end", "dominant-baseline": "middle", class: "pw-row-label" });
      q.textContent = label;
      const k = s("text", { x: 0, y: 0, transform: `translate(${left + i * cell + cell / 2},${top - 3}) rotate(-55)`, "font-size": font, class: "pw-col-label" });
      k.textContent = label;
      svg.append(q, k);
    });
    for (let qi = 0; qi < n; qi++) {
      for (let ki = 0; ki < n; ki++) {
        const v = w[qi * n + ki];
        svg.append(s("rect", { x: left + ki * cell, y: top + qi * cell, width: cell, height: cell, fill: sequential(v), class: ki > qi ? "pw-pcell pw-masked" : "pw-pcell", "data-q": qi, "data-k": ki, "data-weight": v.toFixed(4) }));
      }
    }
    svg.addEventListener("mousemove", (e) => {
      const r = /** @type {Element} */ (e.target);
      if (!(r instanceof Element) || r.tagName !== "rect") return tooltip.hide();
      const cellData = /** @type {SVGElement} */ (r).dataset;
      const qi = Number(cellData.q), ki = Number(cellData.k);
      tooltip.show(e, [`attention ${fmt(Number(cellData.weight), 3)}`, `${name} prompt`,
        `query ${qi}: ${quote(toks[qi])}`, `key ${ki}: ${quote(toks[ki])}`]);
    });
    svg.addEventListener("mouseleave", () => tooltip.hide());
    return h("div", { class: "pw-pattern-box" }, h("div", { class: "pw-pattern-title" }, `${name} prompt (rows: queries, columns: keys)`), svg);
  }

  return {
    el, patterns: patternPanel,
    updateExplanation() {
      explanation.textContent = model.get("explanation") || "Click a cell of the heatmap to see what it means.";
    },
    updatePattern() {
      const p = model.get("pattern") || {};
      layerSelect.value = String(model.get("pattern_layer"));
      headSelect.value = String(model.get("pattern_head"));
      patternPanel.replaceChildren();
      patternPanel.dataset.layer = String(p.layer ?? "");
      patternPanel.dataset.head = String(p.head ?? "");
      for (const name of /** @type {const} */ (["clean", "corrupted"])) {
        const view = p[name];
        patternPanel.append(view ? patternGrid(name, view) : h("div", { class: "pw-muted" }, `${name}: no pattern (fix the prompt first)`));
      }
    },
    noKernel() {
      explanation.textContent = "Explanations come from Python, and no Python widget has answered this view yet: hover a cell for its value.";
    },
  };
}

// ------------------------------------------------------------ render: the parts, wired
/**
 * anywidget's entry point: build the parts, subscribe them to the model, draw once.
 * Returns the cleanup anywidget calls when the view goes.
 * @param {{ model: Model, el: HTMLElement }} args
 */
function render({ model, el }) {
  const ctx = makeContext(model);
  const root = ctx.root;
  el.replaceChildren(root);
  // Keys pressed in our inputs, selects and buttons are ours: keep the notebook's
  // single-key shortcuts (Shift+Enter runs the cell, "a" inserts a cell, ...) out of them,
  // but let Ctrl/Cmd combinations such as Ctrl+S (save) through.
  root.addEventListener("keydown", (e) => {
    const t = /** @type {Element} */ (e.target);
    if (!e.ctrlKey && !e.metaKey && t.matches("input, select, button, .pw-cell, .pw-edge")) e.stopPropagation();
  });

  const run = () => { sendRun(ctx); kernel.expect("a Run"); };
  const kernel = makeKernelLink(ctx, { onMissing: () => drawStatus() });
  const status = makeStatus(ctx);
  const inputs = makeInputs(ctx, { onRun: run });
  const tokens = makeTokens(ctx);
  const controls = makeControls(ctx, { onRun: run });
  const path = makePathPanel(ctx, { onRun: run });
  const dataset = makeDataset(ctx);
  const side = makeExplainPanel(ctx);
  const heatmap = makeHeatmap(ctx, {
    onSelect(row, col) {
      ctx.save("selected", { row, col });
      if (!kernel.seen()) { side.noKernel(); kernel.expect("an explanation"); }
    },
    onToggleReceiver: path.toggleReceiver,
  });
  const circuitPanel = makeCircuitPanel(ctx);
  const circuit = makeCircuit(ctx, {
    onSelectEdge(name) {
      ctx.save("circuit_edge", name);
      if (!kernel.seen()) kernel.expect("an exact edge patch");
    },
  });
  heatmap.el.prepend(kernel.note);
  root.append(status.header, ...inputs.els, ...tokens.els, controls.el, path.el, circuitPanel.el, dataset.el, controls.reminder,
    status.progressRow, h("div", { class: "pw-main" }, heatmap.el, side.el, circuit.el), ctx.tooltip.el);

  const drawStatus = () => controls.setRunning(status.update() === "running");
  /** The circuit component swaps the heatmap and its side panel for the circuit view (and back). */
  const drawView = () => {
    const on = model.get("site") === "circuit";
    const was = !circuit.el.classList.contains("pw-hidden");
    for (const part of [heatmap.el, side.el]) part.classList.toggle("pw-hidden", on);
    circuit.el.classList.toggle("pw-hidden", !on);
    root.dataset.view = on ? "circuit" : "heatmap";
    if (on && !was) circuit.relayout();
  };
  const drawControls = () => { controls.update(); path.update(); circuitPanel.update(); drawView(); heatmap.markReceivers(); };
  const fields = { ...inputs.fields, receivers: path.field };
  /** Who redraws on which change, in this order. @type {Array<[Field[], Function]>} */
  const table = [
    ...Object.values(fields).map((f) => /** @type {[Field[], Function]} */ ([[f.name], f.update])),
    [ctx.contract.sweep_fields, heatmap.markStale],
    [["tokens", "baseline", "correct", "incorrect", "clean", "corrupted"], tokens.update],
    [["direction", "metric", "site", "auto_run", "fast_preview", "receivers", "receiver_input", "circuit_method"], drawControls],
    [["dataset"], dataset.update],
    [["status", "progress", "heatmap", "tokens", "errors", "explanation", "circuit", "circuit_faithfulness", "circuit_edge_patch"], () => kernel.heard()],
    [["status", "progress", "elapsed", "heatmap", "waiting_for", "site", "circuit"], drawStatus],
    [["errors"], ctx.errors.update],
    [["heatmap"], heatmap.update],
    [["status", "heatmap"], heatmap.drawApproxNote],
    [["selected"], heatmap.drawOutline],
    [["explanation"], side.updateExplanation],
    [["pattern", "pattern_layer", "pattern_head"], side.updatePattern],
    [["circuit", "circuit_k"], circuit.update],
    [ctx.contract.circuit_fields, circuit.markStale],
    [["circuit_faithfulness", "circuit_edge_patch", "circuit_edge"], circuit.updateChecks],
  ];
  /** @type {Array<() => void>} */
  const cleanups = [];
  const on = (/** @type {string} */ event, /** @type {Function} */ fn) => {
    model.on(event, fn);
    cleanups.push(() => model.off(event, fn));
  };
  for (const [names, fn] of table) for (const name of names) on(`change:${name}`, fn);
  on("msg:custom", kernel.heard);
  try { model.send({ type: "hello" }); } catch (e) { /* no comm at all: kernel.expect reports it */ }

  tokens.update(); drawControls(); drawStatus(); ctx.errors.update(); heatmap.update(); side.updatePattern(); dataset.update(); circuit.update();
  side.updateExplanation();
  let rootWidth = 0, patternWidth = 0;
  const resize = new ResizeObserver(() => {
    if (Math.abs(root.clientWidth - rootWidth) > 40) { rootWidth = root.clientWidth; heatmap.relayout(); circuit.relayout(); }
    if (Math.abs(side.patterns.clientWidth - patternWidth) > 40) { patternWidth = side.patterns.clientWidth; side.updatePattern(); }
  });
  resize.observe(root);
  resize.observe(side.patterns);
  cleanups.push(() => resize.disconnect());
  return () => cleanups.forEach((f) => f());
}

export default { render };
