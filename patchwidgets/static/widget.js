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

const SVG_NS = "http://www.w3.org/2000/svg";

/**
 * @typedef {{layer?: number, head?: number, pos?: number, label: string, token?: string,
 *            corrupted_token?: string, diff?: boolean}} Cell
 * @typedef {{run_id: number, site: string, metric: string, direction: string,
 *            rows: Cell[], cols: Cell[], row_title: string, col_title: string,
 *            values: DataView, done: number, total: number, complete: boolean, state?: string,
 *            baselines: Object<string, number|null>, inputs: Object<string, string>,
 *            estimate?: DataView, estimate_method?: string,
 *            path?: {label: string, receivers: number[][]|null, receiver_input: string}}} Heatmap
 * @typedef {{tokens: string[], n: number, values: DataView}} PatternView
 */

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
 * @param {any} buf
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
// both): a diverging metric is blue above 0 and red below, symmetric around 0; a sequential
// one is one hue from light (low end) to dark (high end). A colour is [r, g, b, alpha]: the
// hue and how much of it covers the background, so "no effect" is the theme's background.
export const RED = [178, 24, 43], BLUE = [33, 102, 172], PURPLE = [84, 39, 143];

/**
 * @typedef {{scale: string, label: string, high_means: string, lo: number|null, hi: number|null}} MetricInfo
 * @typedef {[number, number, number, number]} RGBA
 */

/**
 * The range the colours span: symmetric for a diverging metric (normalized: at least -1..1),
 * the data plus the metric's natural bounds (info.lo, info.hi) for a sequential one.
 * @param {string} metric
 * @param {ArrayLike<number>} values
 * @param {MetricInfo|undefined} info
 * @returns {[number, number]}
 */
export function domain(metric, values, info) {
  const finite = Array.from(values).filter((v) => v !== null && Number.isFinite(v));
  if (!info || info.scale !== "sequential") {
    let top = finite.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
    if (metric === "normalized") top = Math.max(top, 1);
    top = top || 1;
    return [-top, top];
  }
  let lo = finite.length ? Math.min(...finite) : 0, hi = finite.length ? Math.max(...finite) : 1;
  if (info.lo !== null && info.lo !== undefined) lo = Math.min(lo, info.lo);
  if (info.hi !== null && info.hi !== undefined) hi = Math.max(hi, info.hi);
  return hi > lo ? [lo, hi] : [lo, lo + 1];
}

/** Round like Python's round(x, 3) for the values we meet (no ties at this precision). @param {number} x */
const round3 = (x) => Math.round(x * 1000) / 1000;

/**
 * The colour of `v` on the scale lo..hi of `kind`; null for a missing value.
 * @param {number|null} v @param {number} lo @param {number} hi @param {string} kind
 * @returns {RGBA|null}
 */
export function colour(v, lo, hi, kind) {
  if (v === null || v === undefined || !Number.isFinite(v)) return null;
  if (kind === "diverging") {
    const top = Math.max(Math.abs(lo), Math.abs(hi)) || 1;
    const t = Math.max(-1, Math.min(1, v / top));
    const end = t > 0 ? BLUE : RED;
    return [end[0], end[1], end[2], round3(Math.abs(t))];
  }
  const t = hi > lo ? Math.max(0, Math.min(1, (v - lo) / (hi - lo))) : 0;
  return [PURPLE[0], PURPLE[1], PURPLE[2], round3(t)];
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

/** `n` evenly spaced legend ticks from lo to hi. @param {number} lo @param {number} hi @param {number} [n] */
export function ticks(lo, hi, n = 5) {
  return Array.from({ length: n }, (_, i) => lo + ((hi - lo) * i) / (n - 1));
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

/** Whether an event target is a heatmap cell. @param {any} el @returns {el is SVGRectElement} */
const isCell = (el) => !!el && typeof el.matches === "function" && el.matches("rect.pw-cell");

/** Rows beyond which a (layer.head x position) sweep opens one position at a time. */
export const MANY_ROWS = 48;

const RECEIVER_INPUTS = [["q", "queries (q)"], ["k", "keys (k)"], ["v", "values (v)"], ["kv", "keys and values (kv)"], ["qkv", "all inputs (qkv)"]];

const METRIC_LABELS = {
  logit_diff: "logit difference", normalized: "normalized (fraction restored)",
  logit: "logit of correct answer", logprob: "log-prob of correct answer",
  prob: "probability of correct answer", rank: "rank of correct answer",
  accuracy: "top-1 accuracy", kl: "KL(clean || patched)",
};
const REMINDER = {
  denoising: "Denoising: run the corrupted prompt, paste in clean activations. High = this activation is sufficient.",
  noising: "Noising: run the clean prompt, paste in corrupted activations. High = this activation is necessary.",
};

/** @param {{ model: any, el: HTMLElement }} ctx */
function render({ model, el }) {
  /** @type {Array<() => void>} */
  const cleanups = [];
  /** Subscribe to a model event and remember to unsubscribe. */
  const on = (/** @type {string} */ name, /** @type {Function} */ fn) => {
    model.on(name, fn);
    cleanups.push(() => model.off(name, fn));
  };
  /** Inputs edited on this page since the last Run (see requestRun). @type {Set<string>} */
  const edited = new Set();
  const save = (/** @type {string} */ name, /** @type {any} */ value) => {
    model.set(name, value);
    model.save_changes();
    edited.add(name);
  };

  const root = h("div", { class: "pw-root" });
  el.replaceChildren(root);
  // Keys pressed in our inputs, selects and buttons are ours: keep the notebook's
  // single-key shortcuts (Shift+Enter runs the cell, "a" inserts a cell, ...) out of them,
  // but let Ctrl/Cmd combinations such as Ctrl+S (save) through.
  root.addEventListener("keydown", (e) => {
    const t = /** @type {Element} */ (e.target);
    if (!e.ctrlKey && !e.metaKey && t.matches("input, select, button, .pw-cell")) e.stopPropagation();
  });

  // ------------------------------------------------------------ header
  const statusText = h("span", { class: "pw-status", "aria-live": "polite" });
  root.append(h("div", { class: "pw-header" },
    h("span", { class: "pw-title" }, "Activation patching"),
    h("span", { class: "pw-model" }, String(model.get("model_name") || "")),
    statusText));

  // ------------------------------------------------------------ prompt and answer inputs
  /** @type {Object<string, HTMLElement>} */
  const errorBoxes = {};
  /** @type {Array<() => void>} */
  const flushers = [];
  const errorBox = (/** @type {string} */ field) => {
    const box = h("div", { class: "pw-error", "data-error-for": field, role: "alert" });
    errorBoxes[field] = box;
    return box;
  };

  /** A text input bound to traitlet `name`, synced while typing (debounced). */
  const textField = (/** @type {string} */ name, /** @type {string} */ label, /** @type {string} */ cls, inlineError = true) => {
    const input = /** @type {HTMLInputElement} */ (h("input", {
      type: "text", class: "pw-input", "data-field": name, spellcheck: "false", "aria-label": label,
    }));
    input.value = model.get(name);
    /** @type {any} */ let timer = null;
    const flush = () => {
      clearTimeout(timer);
      timer = null;
      if (model.get(name) !== input.value) save(name, input.value);
    };
    input.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(flush, 250); });
    input.addEventListener("change", flush);
    input.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.ctrlKey && !e.metaKey) { e.preventDefault(); flush(); requestRun(); }
    });
    on(`change:${name}`, () => {
      if (timer === null && input.value !== model.get(name)) input.value = model.get(name);
      markStale();
    });
    flushers.push(flush);
    const field = h("label", { class: `pw-field ${cls}` }, h("span", { class: "pw-label" }, label), input);
    if (inlineError) field.append(errorBox(name));
    return field;
  };

  root.append(h("div", { class: "pw-inputs" },
    textField("clean", "Clean prompt", "pw-prompt"),
    textField("correct", "Correct answer", "pw-answer", false),
    textField("corrupted", "Corrupted prompt", "pw-prompt"),
    textField("incorrect", "Incorrect answer", "pw-answer", false)));
  // The answer fields are narrow: their messages share one full-width line below, whose
  // height is reserved like every error box's, so nothing below moves when one appears.
  root.append(h("div", { class: "pw-answer-errors" }, errorBox("correct"), errorBox("incorrect"), errorBox("answers")));

  // ------------------------------------------------------------ tokenisations + baselines
  const tokenRows = h("div", { class: "pw-tokens" });
  const baselineLine = h("div", { class: "pw-baseline" });
  root.append(tokenRows, baselineLine);

  function drawTokens() {
    const toks = model.get("tokens") || {};
    const clean = toks.clean || null, corrupted = toks.corrupted || null;
    const n = Math.max(clean ? clean.length : 0, corrupted ? corrupted.length : 0);
    // Highlight positions whose tokens differ (only when both prompts tokenised).
    const differs = (/** @type {number} */ i) => !!clean && !!corrupted && clean[i] !== corrupted[i];
    tokenRows.replaceChildren();
    const typed = ["clean", "corrupted"].filter((k) => String(model.get(k) || "").trim());
    for (const [name, list] of [["clean", clean], ["corrupted", corrupted]]) {
      const row = h("div", { class: "pw-token-row", "data-prompt": name }, h("span", { class: "pw-token-name" }, name));
      if (!list) row.append(h("span", { class: "pw-muted" }, typed.includes(name) ? "(not tokenised: see the message at the prompt)" : "(empty)"));
      else list.forEach((tok, i) => {
        const chip = h("span", { class: "pw-tok" + (differs(i) ? " pw-tok-diff" : ""), title: `position ${i}: ${quote(tok)}`, "data-pos": String(i) }, tok);
        row.append(chip);
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
  for (const name of ["tokens", "baseline", "correct", "incorrect", "clean", "corrupted"]) on(`change:${name}`, drawTokens);
  baselineLine.addEventListener("mouseenter", () => { baselineLine.title = baselineLine.textContent || ""; });

  // ------------------------------------------------------------ controls
  const dirGroup = h("div", { class: "pw-toggle", role: "radiogroup", "aria-label": "direction" });
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
  for (const m of model.get("metric_options") || []) metricSelect.append(h("option", { value: m }, `${m}: ${METRIC_LABELS[m] || m}`));
  metricSelect.addEventListener("change", () => save("metric", metricSelect.value));
  const siteSelect = /** @type {HTMLSelectElement} */ (h("select", { class: "pw-select", "data-control": "site", "aria-label": "component" }));
  for (const [group, options] of model.get("site_options") || []) {
    const og = h("optgroup", { label: group });
    for (const [value, label] of options) og.append(h("option", { value }, label));
    siteSelect.append(og);
  }
  siteSelect.addEventListener("change", () => save("site", siteSelect.value));
  const runButton = h("button", { type: "button", class: "pw-run", "data-action": "run" }, "Run");
  const cancelButton = /** @type {HTMLButtonElement} */ (h("button", { type: "button", class: "pw-cancel", "data-action": "cancel" }, "Cancel"));
  const autoBox = /** @type {HTMLInputElement} */ (h("input", { type: "checkbox", "data-control": "auto_run" }));
  autoBox.addEventListener("change", () => save("auto_run", autoBox.checked));
  const previewBox = /** @type {HTMLInputElement} */ (h("input", { type: "checkbox", "data-control": "fast_preview" }));
  previewBox.addEventListener("change", () => save("fast_preview", previewBox.checked));
  const previewLabel = h("label", { class: "pw-auto", title: "Paint a first-order estimate of every cell at once (one backward pass), then replace it with the exact values as the sweep runs. Not for rank, accuracy or path patching." },
    previewBox, " fast preview (attribution patching)");
  const progress = /** @type {HTMLProgressElement} */ (h("progress", { class: "pw-progress", max: "1", value: "0" }));
  const progressText = h("span", { class: "pw-progress-text" });

  runButton.addEventListener("click", () => requestRun());
  cancelButton.addEventListener("click", () => model.send({ type: "cancel" }));

  root.append(h("div", { class: "pw-controls" },
    h("div", { class: "pw-control" }, h("span", { class: "pw-label" }, "Direction"), dirGroup, errorBox("direction")),
    h("label", { class: "pw-control" }, h("span", { class: "pw-label" }, "Metric"), metricSelect, errorBox("metric")),
    h("label", { class: "pw-control" }, h("span", { class: "pw-label" }, "Component"), siteSelect, errorBox("site")),
    h("div", { class: "pw-control pw-actions" }, runButton, cancelButton,
      h("label", { class: "pw-auto" }, autoBox, " auto-run"), previewLabel)));

  // ------------------------------------------------------------ path patching: receivers
  const receiversField = textField("receivers", "Receivers: logits, or heads (layer.head)", "pw-receivers");
  const receiversInput = /** @type {HTMLInputElement} */ (receiversField.querySelector("input"));
  receiversInput.setAttribute("placeholder", "logits   (or heads: 3.1, 3.5)");
  const receiverInputSelect = /** @type {HTMLSelectElement} */ (h("select", { class: "pw-select", "data-control": "receiver_input", "aria-label": "receiver input" }));
  for (const [value, label] of RECEIVER_INPUTS) receiverInputSelect.append(h("option", { value }, label));
  receiverInputSelect.addEventListener("change", () => save("receiver_input", receiverInputSelect.value));
  const pathRow = h("div", { class: "pw-path pw-hidden", "data-panel": "path" },
    receiversField,
    h("label", { class: "pw-control" }, h("span", { class: "pw-label" }, "Receiver input"), receiverInputSelect, errorBox("receiver_input")),
    h("div", { class: "pw-path-help" },
      "Each cell is a sender head: its output is patched only along the path into the receivers ",
      "(the logits: its direct effect; heads: the chosen input of those heads), every other head frozen. ",
      "Shift+click a head cell to add or remove it as a receiver."));
  root.append(pathRow);

  // ------------------------------------------------------------ dataset (several prompt pairs)
  // An editable list of (clean, corrupted, correct, incorrect) rows; a Run sweeps them all and
  // the heatmap shows their mean (the explanation adds its standard error) or one pair alone.
  const datasetBody = h("div", { class: "pw-dataset-rows" });
  const datasetSummary = h("summary", {}, "Dataset");
  const datasetPanel = h("details", { class: "pw-dataset", "data-panel": "dataset" }, datasetSummary, datasetBody);
  root.append(datasetPanel);
  /** @param {string[][]} rows */
  const saveDataset = (rows) => save("dataset", rows.map((r) => [...r]));
  function drawDataset() {
    /** @type {string[][]} */
    const rows = model.get("dataset") || [];
    datasetSummary.textContent = rows.length ? `Dataset: ${rows.length} prompt pairs (the heatmap shows their mean)` :
      "Dataset: one prompt pair (add pairs to average over several)";
    if (datasetPanel.contains(document.activeElement) && datasetBody.childElementCount === rows.length + 1) return; // typing here
    const labels = ["clean prompt", "corrupted prompt", "correct", "incorrect"];
    datasetBody.replaceChildren(...rows.map((row, i) => {
      const line = h("div", { class: "pw-dataset-row", "data-pair": String(i) });
      row.forEach((text, j) => {
        const input = /** @type {HTMLInputElement} */ (h("input", { type: "text", class: `pw-input ${j < 2 ? "pw-dataset-prompt" : "pw-dataset-answer"}`,
          "data-dataset-row": String(i), "data-dataset-col": String(j), "aria-label": `pair ${i} ${labels[j]}`, spellcheck: "false" }));
        input.value = text;
        input.addEventListener("change", () => {
          const next = (model.get("dataset") || []).map((/** @type {string[]} */ r) => [...r]);
          next[i][j] = input.value;
          saveDataset(next);
        });
        line.append(input);
      });
      const remove = h("button", { type: "button", class: "pw-cancel", "data-action": "remove-pair", "aria-label": `remove pair ${i}` }, "\u2212");
      remove.addEventListener("click", () => saveDataset((model.get("dataset") || []).filter((/** @type {any} */ _, k) => k !== i)));
      line.append(remove);
      return line;
    }), (() => {
      const add = h("button", { type: "button", class: "pw-cancel", "data-action": "add-pair" }, "+ add the prompts above as a pair");
      add.addEventListener("click", () => saveDataset([...(model.get("dataset") || []),
        ["clean", "corrupted", "correct", "incorrect"].map((k) => String(model.get(k) || ""))]));
      return add;
    })());
  }
  on("change:dataset", drawDataset);
  root.append(reminder, h("div", { class: "pw-progress-row" }, progress, progressText));

  function drawControls() {
    const d = model.get("direction");
    for (const [name, b] of Object.entries(dirButtons)) {
      b.classList.toggle("pw-on", name === d);
      b.setAttribute("aria-checked", String(name === d));
    }
    reminder.textContent = REMINDER[d] || "";
    metricSelect.value = model.get("metric");
    siteSelect.value = model.get("site");
    autoBox.checked = !!model.get("auto_run");
    const path = model.get("site") === "path";
    previewBox.checked = !!model.get("fast_preview");
    previewBox.disabled = path; // AtP has no estimate for path patching
    previewLabel.classList.toggle("pw-disabled", path);
    pathRow.classList.toggle("pw-hidden", !path);
    receiverInputSelect.value = model.get("receiver_input");
    receiverInputSelect.disabled = receiverHeads(model.get("receivers")).length === 0;
    markStale();
    markReceivers();
  }
  for (const name of ["direction", "metric", "site", "auto_run", "fast_preview", "receivers", "receiver_input"]) on(`change:${name}`, drawControls);

  // ------------------------------------------------------------ run / latency bookkeeping
  let clickedAt = 0, runIdAtClick = -1;
  root.dataset.latencyMs = "";
  // Is a Python object behind this view? A view restored from a saved notebook (no kernel, or
  // a new kernel that never made this widget) draws the saved state, but nothing answers it.
  // The view says "hello" at once; any message from Python proves the link. A Run (or a cell
  // click) that gets no answer within a few seconds says so instead of spinning forever.
  const kernelNote = h("div", { class: "pw-kernel-note pw-hidden", role: "status", "data-note": "kernel" });
  let kernelSeen = false;
  /** @type {any} */ let kernelTimer = null;
  root.dataset.kernel = "unknown";
  const heardFromKernel = () => {
    kernelSeen = true;
    clearTimeout(kernelTimer);
    root.dataset.kernel = "connected";
    kernelNote.classList.add("pw-hidden");
  };
  on("msg:custom", (/** @type {any} */ msg) => {
    heardFromKernel();
    if (msg && msg.type === "ack" && Number.isInteger(msg.run_id)) root.dataset.requestedRun = String(msg.run_id);
  });
  for (const name of ["status", "progress", "heatmap", "tokens", "errors", "explanation"]) on(`change:${name}`, heardFromKernel);
  /** Expect an answer from Python; without one, tell the user what the page is. @param {string} what */
  function expectKernel(what) {
    if (kernelSeen) return;
    clearTimeout(kernelTimer);
    kernelTimer = setTimeout(() => {
      if (kernelSeen) return;
      root.dataset.kernel = "missing";
      kernelNote.textContent = `No Python widget answers this view, so ${what} cannot happen. This is probably ` +
        "a saved copy (the notebook was reopened or the kernel restarted): the heatmap is the last one saved. " +
        "Run the cell that creates the widget again to use it.";
      kernelNote.classList.remove("pw-hidden");
      drawStatus();
    }, 3000);
  }
  try { model.send({ type: "hello" }); } catch (e) { /* no comm at all: expectKernel reports it */ }
  function requestRun() {
    flushers.forEach((f) => f());
    clickedAt = performance.now();
    runIdAtClick = (model.get("heatmap") || {}).run_id ?? -1;
    root.dataset.status = "running";
    // Send the inputs edited here with the request: ipywidgets may hold back state updates
    // while the kernel is busy, and a custom message could overtake them. Only edited ones:
    // the others may have been changed by Python (pre-filled answers) after we last heard.
    const state = {};
    for (const k of edited) state[k] = model.get(k);
    edited.clear();
    delete root.dataset.requestedRun;
    model.send({ type: "run", state });
    expectKernel("a Run");
  }

  /** What a cancel left: counted from the picture itself (one snapshot), or nothing started. */
  function cancelledText() {
    const p = model.get("heatmap") || {};
    return p.state === "cancelled" ? `cancelled after ${p.done}/${p.total} patches`
      : "cancelled before the sweep started: the heatmap is the previous one";
  }

  function drawStatus() {
    const status = root.dataset.kernel === "missing" ? "no kernel" : model.get("status");
    const [done, total] = model.get("progress") || [0, 0];
    const running = status === "running";
    root.dataset.status = status;
    cancelButton.disabled = !running;
    progress.value = total ? done / total : status === "done" ? 1 : 0;
    progress.classList.toggle("pw-hidden", !running && status !== "cancelled");
    const secs = model.get("elapsed");
    progressText.textContent = running ? `${done}/${total} patches`
      : status === "done" ? `${total} patches in ${fmt(secs, 2)} s` + (root.dataset.latencyMs ? ` (${root.dataset.latencyMs} ms from click to heatmap)` : "")
      : status === "cancelled" ? cancelledText() : "";
    statusText.textContent = status;
    statusText.className = `pw-status pw-status-${status.replace(" ", "-")}`;
  }
  for (const name of ["status", "progress", "elapsed", "heatmap"]) on(`change:${name}`, drawStatus);

  // ------------------------------------------------------------ errors
  const generalError = errorBox("general");
  function drawErrors() {
    const errors = model.get("errors") || {};
    for (const [field, box] of Object.entries(errorBoxes)) {
      const msg = errors[field] || "";
      box.textContent = msg;
      box.title = msg; // the box keeps a fixed height (controls never move): the full text on hover
      box.classList.toggle("pw-has-error", !!msg);
      const input = root.querySelector(`[data-field="${field}"]`);
      if (input) input.classList.toggle("pw-invalid", !!msg);
    }
    root.dataset.errors = Object.keys(errors).join(" ");
  }
  on("change:errors", drawErrors);

  // ------------------------------------------------------------ heatmap
  const caption = h("div", { class: "pw-caption" });
  const legendNote = h("div", { class: "pw-legend-note" });
  // One position at a time for (layer.head x position) sweeps: a layer x head grid.
  const posSelect = /** @type {HTMLSelectElement} */ (h("select", { class: "pw-select", "data-control": "position", "aria-label": "position shown" }));
  const posRow = h("label", { class: "pw-position pw-hidden" }, h("span", { class: "pw-label" }, "Show "), posSelect);
  const pairSelect = /** @type {HTMLSelectElement} */ (h("select", { class: "pw-select", "data-control": "pair", "aria-label": "prompt pair shown" }));
  const pairRow = h("label", { class: "pw-position pw-hidden" }, h("span", { class: "pw-label" }, "Pairs "), pairSelect);
  pairSelect.addEventListener("change", () => save("pair", Number(pairSelect.value)));
  /** @param {Heatmap} p */
  function drawPairChoice(p) {
    const n = Number(/** @type {any} */ (p).n_pairs || 1);
    pairRow.classList.toggle("pw-hidden", n < 2);
    if (n < 2) return;
    const rows = (p.inputs && /** @type {any} */ (p.inputs).dataset) || [];
    if (pairSelect.options.length !== n + 1) {
      pairSelect.replaceChildren(h("option", { value: "-1" }, `mean over ${n} pairs (explanations add the standard error)`),
        ...Array.from({ length: n }, (_, k) => h("option", { value: String(k) }, `pair ${k}: ${clip(String((rows[k] || [])[0] || ""), 48)}`)));
    }
    pairSelect.value = String(/** @type {any} */ (p).pair ?? -1);
    root.dataset.pair = pairSelect.value;
  }
  /** @type {string|null} */ let posChoice = null; // null: automatic (one position when there are many rows)
  let posOptionsKey = "";
  posSelect.addEventListener("change", () => { posChoice = posSelect.value; hm.key = ""; paintHeatmap(); });
  /**
   * Fill the position selector for this payload and return the position to show (null: all).
   * @param {Heatmap} p
   */
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
  const approxNote = h("div", { class: "pw-approx-note pw-hidden", "data-note": "approximate" },
    h("span", { class: "pw-approx-swatch" }),
    h("b", {}, "approximate (attribution patching)"),
    h("span", { class: "pw-approx-count" }));
  const staleNote = h("div", { class: "pw-stale pw-hidden" }, "Inputs changed since this heatmap was computed: press Run.");
  const plot = h("div", { class: "pw-plot" });
  const tooltip = h("div", { class: "pw-tooltip pw-hidden", role: "tooltip" });
  const explanation = h("p", { class: "pw-explanation" });
  const patternPanel = h("div", { class: "pw-patterns" });
  const layerSelect = /** @type {HTMLSelectElement} */ (h("select", { class: "pw-select", "data-control": "pattern_layer", "aria-label": "layer" }));
  const headSelect = /** @type {HTMLSelectElement} */ (h("select", { class: "pw-select", "data-control": "pattern_head", "aria-label": "head" }));
  const info = model.get("model_info") || { n_layers: 0, n_heads: 0 };
  for (let l = 0; l < info.n_layers; l++) layerSelect.append(h("option", { value: String(l) }, `layer ${l}`));
  for (let hh = 0; hh < info.n_heads; hh++) headSelect.append(h("option", { value: String(hh) }, `head ${hh}`));
  layerSelect.addEventListener("change", () => save("pattern_layer", Number(layerSelect.value)));
  headSelect.addEventListener("change", () => save("pattern_head", Number(headSelect.value)));

  root.append(h("div", { class: "pw-main" },
    h("div", { class: "pw-heatmap-panel" }, caption, legendNote, pairRow, posRow, approxNote, staleNote, generalError, plot),
    h("div", { class: "pw-side" },
      h("div", { class: "pw-side-title" }, "Selected cell"), explanation,
      h("div", { class: "pw-side-title" }, "Attention pattern of ", layerSelect, headSelect),
      patternPanel)));
  root.append(tooltip);
  caption.before(kernelNote);

  /** @type {{key: string, rects: SVGRectElement[], flat: number[], gridCols: number, active: number, svg: SVGSVGElement|null, outline: SVGRectElement|null, hatch: SVGPathElement|null, receivers: SVGPathElement|null, cw: number, ch: number, left: number, top: number, legend: any}} */
  const hm = { key: "", rects: [], flat: [], gridCols: 1, active: 0, svg: null, outline: null, hatch: null, receivers: null, cw: 0, ch: 0, left: 0, top: 0, legend: null };

  /** Build the SVG skeleton (labels, empty cells, legend) for a heatmap's shape. @param {Heatmap} p */
  function buildHeatmap(p, view) {
    const nR = view.rows.length, nC = view.cols.length;
    // Size cells from the widget's width: the heatmap takes what it needs, and the side
    // panel (explanation, attention patterns) wraps below it when there is no room left.
    const width = Math.max(320, root.clientWidth || 800);
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
    const rects = [], flat = [];
    view.cells.forEach(([i, j], n) => {
      if (i < 0) return;
      const gi = Math.floor(n / nC), gj = n % nC;
      const r = /** @type {SVGRectElement} */ (s("rect", { x: left + gj * cw, y: top + gi * ch, width: cw - gap, height: ch - gap, class: "pw-cell", "data-row": i, "data-col": j, role: "gridcell" }));
      const d = { ...p.rows[i], ...p.cols[j] };
      for (const k of ["layer", "head", "pos"]) if (d[k] !== undefined) r.setAttribute(`data-${k}`, String(d[k]));
      rects.push(r);
      flat.push(i * p.cols.length + j);
      cells.append(r);
    });
    svg.append(cells);
    if (byHead) { // separators between layers
      const nHeads = view.rows.filter((r) => r.layer === 0).length;
      for (let l = 1; l * nHeads < nR; l++) svg.append(s("line", { x1: left, x2: left + gridW, y1: top + l * nHeads * ch, y2: top + l * nHeads * ch, class: "pw-sep" }));
    }
    // Legend: a vertical bar from the high end (top) to the low end, five labelled ticks;
    // its gradient stops are set by paintHeatmap (the range follows the values).
    const lx = left + gridW + 16, lh = Math.max(100, Math.min(gridH, 200));
    const gid = `pw-grad-${Math.random().toString(36).slice(2)}`;
    const defs = s("defs");
    const grad = s("linearGradient", { id: gid, x1: 0, y1: 1, x2: 0, y2: 0 });
    // Hatching for approximate cells: one <path> covering all of them, filled with stripes.
    const hatchPattern = s("pattern", { id: `${gid}-hatch`, patternUnits: "userSpaceOnUse", width: 5, height: 5, patternTransform: "rotate(45)" });
    hatchPattern.append(s("rect", { width: 2, height: 5, class: "pw-hatch-stripe" }));
    defs.append(grad, hatchPattern);
    const legendTexts = [0, 1, 2, 3, 4].map((k) => {
      const y = top + lh - (k * lh) / 4;
      svg.append(s("line", { x1: lx + 12, x2: lx + 16, y1: y, y2: y, class: "pw-legend-tick" }));
      const t = s("text", { x: lx + 18, y, "dominant-baseline": "middle", class: "pw-legend-label", "data-tick": k });
      svg.append(t);
      return t;
    });
    const legendTitle = s("text", { x: lx, y: top - 8, class: "pw-legend-label pw-legend-title" });
    svg.append(defs, s("rect", { x: lx, y: top, width: 12, height: lh, class: "pw-legend-back" }),
      s("rect", { x: lx, y: top, width: 12, height: lh, fill: `url(#${gid})`, class: "pw-legend-bar" }), legendTitle);
    const hatch = /** @type {SVGPathElement} */ (s("path", { class: "pw-hatch", fill: `url(#${gid}-hatch)`, d: "" }));
    const receivers = /** @type {SVGPathElement} */ (s("path", { class: "pw-receiver-marks", d: "" }));
    const outline = /** @type {SVGRectElement} */ (s("rect", { class: "pw-outline pw-hidden", width: cw, height: ch }));
    svg.append(hatch, receivers, outline);
    plot.replaceChildren(svg);
    const hadFocus = !!hm.svg && hm.svg.contains(document.activeElement);
    const active = Math.min(Math.max(0, hm.active), rects.length - 1);
    rects.forEach((r, n) => r.setAttribute("tabindex", n === active ? "0" : "-1"));
    Object.assign(hm, { svg, rects, flat, gridCols: nC, active, outline, hatch, receivers, cw, ch, left, top, legend: { legendTexts, legendTitle, grad } });
    if (hadFocus && rects[active]) rects[active].focus();
  }

  /** Colour the cells from the current values (cheap: runs on every streamed update). */
  function paintHeatmap() {
    /** @type {Heatmap} */
    const p = model.get("heatmap") || {};
    if (!p.rows || !p.rows.length) {
      hm.key = "";
      plot.replaceChildren(h("div", { class: "pw-empty" }, "No heatmap yet: press Run."));
      caption.textContent = "";
      approxNote.classList.add("pw-hidden");
      delete root.dataset.runId;
      return;
    }
    drawPairChoice(p);
    const view = gridView(p, drawPositionChoice(p));
    const key = `${p.run_id}|${p.site}|${p.rows.length}x${p.cols.length}|${Math.round((root.clientWidth || 800) / 40)}|${view.byPosition ? view.cells[0][1] : "all"}`;
    if (key !== hm.key) { buildHeatmap(p, view); hm.key = key; }
    const values = floats(p.values);
    const estimate = p.estimate ? floats(p.estimate) : null;
    // What each cell shows: its exact value, else its estimate (approximate), else nothing.
    const shown = Array.from(values, (v, i) => (Number.isFinite(v) ? v : estimate ? estimate[i] : NaN));
    let filled = 0, approx = 0;
    shown.forEach((v, i) => {
      if (!Number.isFinite(v)) return;
      if (Number.isFinite(values[i])) filled++; else approx++;
    });
    const info = (model.get("metric_info") || {})[p.metric];
    const kind = info && info.scale === "sequential" ? "sequential" : "diverging";
    const [lo, hi] = domain(p.metric, shown, info);
    let hatchPath = "";
    hm.rects.forEach((r, n) => {
      const i = hm.flat[n];
      const v = shown[i], exact = Number.isFinite(values[i]);
      if (estimate && Number.isFinite(estimate[i])) r.setAttribute("data-estimate", String(estimate[i]));
      else r.removeAttribute("data-estimate");
      const c = colour(v, lo, hi, kind);
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
    hm.hatch.setAttribute("d", hatchPath);
    drawLegend(p.metric, lo, hi, kind, info);
    const what = p.path ? p.path.label : p.site;
    caption.textContent = `${p.direction} \u00b7 ${what} \u00b7 ${METRIC_LABELS[p.metric] || p.metric}` +
      (p.complete ? "" : ` \u00b7 ${p.done}/${p.total} patches`);
    approxNote.classList.toggle("pw-hidden", approx === 0);
    approxNote.dataset.count = String(approx);
    drawApproxNote();
    Object.assign(root.dataset, {
      runId: String(p.run_id), complete: String(!!p.complete), runState: String(p.state || ""), filled: String(filled), approx: String(approx),
      metric: p.metric, direction: p.direction, site: p.site,
    });
    drawOutline();
    markStale();
    markReceivers();
    if (p.complete && clickedAt && p.run_id > runIdAtClick) {
      const t = clickedAt;
      clickedAt = 0;
      requestAnimationFrame(() => {
        root.dataset.latencyMs = String(Math.round(performance.now() - t));
        drawStatus();
      });
    }
  }
  on("change:heatmap", paintHeatmap);

  /**
   * The legend: gradient stops for lo..hi, five tick labels, the metric's name on top and,
   * below the caption, what its high end means (from the metric registry).
   * @param {string} metric @param {number} lo @param {number} hi @param {string} kind @param {MetricInfo|undefined} info
   */
  function drawLegend(metric, lo, hi, kind, info) {
    const { grad, legendTexts, legendTitle } = hm.legend;
    const stops = kind === "diverging" ? [lo, 0, hi] : [lo, hi];
    grad.replaceChildren(...stops.map((v) => {
      const c = /** @type {RGBA} */ (colour(v, lo, hi, kind));
      return s("stop", { offset: (v - lo) / (hi - lo), "stop-color": `rgb(${c[0]},${c[1]},${c[2]})`, "stop-opacity": c[3] });
    }));
    ticks(lo, hi).forEach((v, k) => { legendTexts[k].textContent = fmt(v, 2); });
    legendTitle.textContent = metric;
    legendNote.textContent = info ? `▲ high ${metric}: ${info.high_means}` : "";
    root.dataset.scale = kind;
    root.dataset.legend = ticks(lo, hi).map((v) => fmt(v, 2)).join(" ");
  }

  /** The words after "approximate (attribution patching)": how many cells, and what happens next. */
  function drawApproxNote() {
    const n = Number(approxNote.dataset.count || 0);
    const it = n === 1 ? "it" : "them";
    const state = (model.get("heatmap") || {}).state;
    const next = state === "running" ? `, replaced by the exact value as the sweep reaches ${it}`
      : ` (the exact sweep stopped before reaching ${it}; press Run for exact values)`;
    /** @type {HTMLElement} */ (approxNote.querySelector(".pw-approx-count")).textContent =
      `: ${n} hatched cell${n === 1 ? "" : "s"} show${n === 1 ? "s" : ""} a first-order estimate` + (n ? next : "");
  }
  on("change:status", drawApproxNote);
  on("change:heatmap", drawApproxNote);

  function markStale() {
    const p = model.get("heatmap") || {};
    if (!p.inputs) return staleNote.classList.add("pw-hidden");
    const keys = ["clean", "corrupted", "correct", "incorrect", "direction", "site"];
    if (p.inputs.site === "path") keys.push("receivers", "receiver_input");
    const stale = keys.some((k) => p.inputs[k] !== model.get(k)) ||
      JSON.stringify(p.inputs.dataset || []) !== JSON.stringify(model.get("dataset") || []);
    staleNote.classList.toggle("pw-hidden", !stale);
  }

  /** Outline the receiver heads on a layer x head heatmap while the path view is chosen. */
  function markReceivers() {
    if (!hm.receivers) return;
    const p = model.get("heatmap") || {};
    const heads = model.get("site") === "path" ? receiverHeads(model.get("receivers")) : [];
    let d = "";
    for (const r of hm.rects) {
      if (r.dataset.layer === undefined || r.dataset.head === undefined || r.dataset.pos !== undefined) continue;
      if (!heads.includes(`${r.dataset.layer}.${r.dataset.head}`)) continue;
      const x = Number(r.getAttribute("x")) + 1.5, y = Number(r.getAttribute("y")) + 1.5;
      d += `M${x} ${y}h${hm.cw - 4}v${hm.ch - 4}h-${hm.cw - 4}z`;
    }
    hm.receivers.setAttribute("d", d);
    root.dataset.receivers = p.rows ? heads.join(" ") : "";
  }

  function drawOutline() {
    const sel = model.get("selected") || {};
    if (!hm.outline) return;
    const cell = Number.isInteger(sel.row) && Number.isInteger(sel.col)
      ? hm.rects.find((r) => r.dataset.row === String(sel.row) && r.dataset.col === String(sel.col)) : undefined;
    hm.outline.classList.toggle("pw-hidden", !cell);
    if (cell) {
      hm.outline.setAttribute("x", String(cell.getAttribute("x")));
      hm.outline.setAttribute("y", String(cell.getAttribute("y")));
    }
  }
  on("change:selected", drawOutline);

  // Tooltip and clicks, delegated from the cells.
  /** @param {MouseEvent} e @param {string[]} lines */
  function showTooltip(e, lines) {
    tooltip.replaceChildren(...lines.map((l, i) => h(i ? "div" : "b", {}, l)));
    tooltip.classList.remove("pw-hidden");
    const box = root.getBoundingClientRect();
    let x = e.clientX - box.left + 14, y = e.clientY - box.top + 14;
    if (x + 380 > box.width) x = Math.max(0, x - 400);
    tooltip.style.left = `${x}px`;
    tooltip.style.top = `${y}px`;
  }
  const hideTooltip = () => tooltip.classList.add("pw-hidden");

  plot.addEventListener("mousemove", (e) => {
    const r = /** @type {Element} */ (e.target);
    if (!isCell(r)) return hideTooltip();
    /** @type {Heatmap} */
    const p = model.get("heatmap");
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
    showTooltip(e, lines);
  });
  plot.addEventListener("mouseleave", hideTooltip);
  /**
   * A click (or Enter) on a cell selects it; with Shift in the path view, it adds or removes
   * the head as a receiver. @param {SVGRectElement} r @param {boolean} shift
   */
  function activate(r, shift) {
    const { layer, head, pos } = r.dataset;
    setActive(r, false);
    if (shift && model.get("site") === "path" && layer !== undefined && head !== undefined && pos === undefined) {
      toggleReceiver(`${layer}.${head}`);
      return;
    }
    save("selected", { row: Number(r.dataset.row), col: Number(r.dataset.col) });
    if (!kernelSeen) {
      explanation.textContent = "Explanations come from Python, and no Python widget has answered this view yet: hover a cell for its value.";
      expectKernel("an explanation");
    }
  }
  plot.addEventListener("click", (e) => {
    const r = /** @type {Element} */ (e.target);
    if (!isCell(r)) return;
    activate(/** @type {SVGRectElement} */ (r), e.shiftKey);
  });

  // Keyboard: the grid is one tab stop (roving tabindex: the active cell has tabindex 0, the
  // others -1); arrows move, Home/End go to the row's ends, Enter selects (as a click),
  // Shift+Enter toggles a receiver in the path view. Each cell's accessible name carries its
  // place and value (set when painted).
  /** @param {SVGRectElement} r @param {boolean} focus */
  function setActive(r, focus) {
    for (const other of hm.rects) if (other !== r && other.getAttribute("tabindex") === "0") other.setAttribute("tabindex", "-1");
    r.setAttribute("tabindex", "0");
    hm.active = hm.rects.indexOf(r);
    if (focus) r.focus();
  }
  plot.addEventListener("keydown", (e) => {
    const r = /** @type {Element} */ (e.target);
    if (!isCell(r)) return;
    const n = hm.rects.indexOf(r), nC = hm.gridCols, nR = Math.ceil(hm.rects.length / nC);
    const gi = Math.floor(n / nC), gj = n % nC;
    /** @type {Object<string, number[]>} */
    const moves = { ArrowLeft: [gi, gj - 1], ArrowRight: [gi, gj + 1], ArrowUp: [gi - 1, gj], ArrowDown: [gi + 1, gj],
      Home: [gi, 0], End: [gi, nC - 1], PageUp: [0, gj], PageDown: [nR - 1, gj] };
    if (e.key in moves) {
      const [i, j] = moves[e.key];
      const next = hm.rects[Math.max(0, Math.min(nR - 1, i)) * nC + Math.max(0, Math.min(nC - 1, j))];
      if (next) setActive(next, true);
    } else if (e.key === "Enter" || e.key === " ") {
      activate(r, e.shiftKey);
    } else return;
    e.preventDefault();
    e.stopPropagation();
  });

  /** Add a head to the receivers field, or remove it (an empty field means the logits). */
  function toggleReceiver(/** @type {string} */ name) {
    const heads = receiverHeads(model.get("receivers"));
    const next = heads.includes(name) ? heads.filter((x) => x !== name) : [...heads, name];
    receiversInput.value = next.join(", ");
    save("receivers", receiversInput.value);
  }
  on("change:explanation", () => {
    explanation.textContent = model.get("explanation") || "Click a cell of the heatmap to see what it means.";
  });

  // ------------------------------------------------------------ attention patterns
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
      if (!(r instanceof Element) || r.tagName !== "rect") return hideTooltip();
      const cellData = /** @type {SVGElement} */ (r).dataset;
      const qi = Number(cellData.q), ki = Number(cellData.k);
      showTooltip(e, [`attention ${fmt(Number(cellData.weight), 3)}`, `${name} prompt`,
        `query ${qi}: ${quote(toks[qi])}`, `key ${ki}: ${quote(toks[ki])}`]);
    });
    svg.addEventListener("mouseleave", hideTooltip);
    return h("div", { class: "pw-pattern-box" }, h("div", { class: "pw-pattern-title" }, `${name} prompt (rows: queries, columns: keys)`), svg);
  }

  function drawPattern() {
    const p = model.get("pattern") || {};
    layerSelect.value = String(model.get("pattern_layer"));
    headSelect.value = String(model.get("pattern_head"));
    patternPanel.replaceChildren();
    patternPanel.dataset.layer = String(p.layer ?? "");
    patternPanel.dataset.head = String(p.head ?? "");
    for (const name of ["clean", "corrupted"]) {
      if (p[name]) patternPanel.append(patternGrid(name, p[name]));
      else patternPanel.append(h("div", { class: "pw-muted" }, `${name}: no pattern (fix the prompt first)`));
    }
  }
  for (const name of ["pattern", "pattern_layer", "pattern_head"]) on(`change:${name}`, drawPattern);

  // ------------------------------------------------------------ first draw + resizing
  drawTokens(); drawControls(); drawStatus(); drawErrors(); paintHeatmap(); drawPattern(); drawDataset();
  explanation.textContent = model.get("explanation") || "Click a cell of the heatmap to see what it means.";
  let rootWidth = 0, patternWidth = 0;
  const resize = new ResizeObserver(() => {
    if (Math.abs(root.clientWidth - rootWidth) > 40) { rootWidth = root.clientWidth; hm.key = ""; paintHeatmap(); }
    if (Math.abs(patternPanel.clientWidth - patternWidth) > 40) { patternWidth = patternPanel.clientWidth; drawPattern(); }
  });
  resize.observe(root);
  resize.observe(patternPanel);
  cleanups.push(() => resize.disconnect());
  return () => cleanups.forEach((f) => f());
}

export default { render };
