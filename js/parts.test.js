// @vitest-environment jsdom
// Unit tests of the parts render() wires together (patchwidgets/static/widget.js), each built
// alone on a fake anywidget model (fake_model.js): the DOM it draws, the callbacks it calls.
import { afterEach, beforeAll, describe, expect, it, vi } from "vitest";
import {
  fmt, gridMove, makeContext, makeControls, makeDataset, makeExplainPanel, makeHeatmap, makeInputs, makeKernelLink,
  makePathPanel, makeStatus, makeTextField, sendRun,
} from "../patchwidgets/static/widget.js";
import { f32, fakeModel, heatmap } from "./fake_model.js";

beforeAll(() => {
  globalThis.ResizeObserver = class { observe() {} disconnect() {} };
});
afterEach(() => {
  vi.useRealTimers();
  document.body.replaceChildren();
});

/** A context on a fake model, its root in the document (focus needs that). */
function context(state = {}) {
  const model = fakeModel(state);
  const ctx = makeContext(model);
  document.body.append(ctx.root);
  return { model, ctx, root: ctx.root };
}

const key = (target, k, shiftKey = false) =>
  target.dispatchEvent(new KeyboardEvent("keydown", { key: k, shiftKey, bubbles: true, cancelable: true }));

/** A layer x head path-patching payload (2 layers, 3 heads) of job `runId`. */
function pathPayload(runId, values, extra = {}) {
  return heatmap("normalized", values, {
    run_id: runId, site: "path", row_title: "sender layer", col_title: "sender head",
    rows: [{ layer: 0, label: "0" }, { layer: 1, label: "1" }],
    cols: [{ head: 0, label: "0" }, { head: 1, label: "1" }, { head: 2, label: "2" }],
    path: { label: "path: senders -> logits", receivers: null, receiver_input: "" },
    inputs: { site: "path", receivers: "", receiver_input: "q" }, ...extra,
  });
}

describe("makeHeatmap", () => {
  function heatmapPart(state) {
    const { model, ctx, root } = context(state);
    const calls = { select: [], toggle: [] };
    const part = makeHeatmap(ctx, {
      onSelect: (row, col) => calls.select.push([row, col]),
      onToggleReceiver: (head) => calls.toggle.push(head),
    });
    root.append(part.el);
    part.update();
    return { model, root, part, calls, cells: () => [...part.el.querySelectorAll("rect.pw-cell")] };
  }

  it("draws one cell per value, each named with its place and value", () => {
    const { cells, root } = heatmapPart({ heatmap: heatmap("normalized", [0, 0.5, 1, -0.25, NaN, 2], { complete: false, done: 5 }) });
    expect(cells().length).toBe(6);
    expect(cells().map((r) => r.getAttribute("aria-label"))).toEqual([
      "layer 0, position 0 'A': normalized 0", "layer 0, position 1 'B': normalized 0.5",
      "layer 0, position 2 'C': normalized 1", "layer 1, position 0 'A': normalized -0.25",
      "layer 1, position 1 'B': normalized not computed", "layer 1, position 2 'C': normalized 2"]);
    expect(cells()[4].hasAttribute("data-value")).toBe(false);
    expect(cells()[4].classList.contains("pw-pending")).toBe(true);
    expect(root.dataset.filled).toBe("5");
    expect(root.dataset.legend).toBe("-2 -1 0 1 2");
  });

  it("colours logit_diff by its change from the corrupted run: no change, no colour", () => {
    // Python's payload names the centre: the unpatched corrupted run's -0.62 (clean run: 2.0).
    // Centred on 0, every one of these cells was red (the field of deep red).
    const mid = Math.fround(-0.62);
    const centre = { value: mid, run: "corrupted", source: 2.0, source_run: "clean" };
    const values = [mid, mid, Math.fround(-0.5), mid, Math.fround(-1.93), 2.0];
    const { cells, root, part } = heatmapPart({ metric: "logit_diff", heatmap: heatmap("logit_diff", values, { centre }) });
    const paint = cells().map((r) => [r.getAttribute("fill"), Number(r.getAttribute("fill-opacity"))]);
    for (const k of [0, 1, 3]) expect(paint[k][1], `cell ${k} changed nothing`).toBe(0);
    expect(paint[2][0]).toBe("rgb(33,102,172)"); // above the corrupted run: blue, faint
    expect(paint[2][1]).toBeCloseTo((-0.5 - mid) / (2 - mid), 3);
    expect(paint[4]).toEqual(["rgb(178,24,43)", 0.5]); // below it by half the reach: half red
    expect(paint[5]).toEqual(["rgb(33,102,172)", 1]); // the clean run's value: full blue
    // Legend: the middle tick is the corrupted run's value, marked; the ends are mid -+ 2.62.
    const labels = root.dataset.legend.split(" ");
    expect(labels[2]).toBe("-0.62");
    expect(labels[0]).toBe(fmt(mid - (2 - mid), 3));
    expect(labels[4]).toBe("2");
    const centreTick = part.el.querySelector("text.pw-legend-centre");
    expect(centreTick.getAttribute("data-tick")).toBe("2");
    expect(centreTick.textContent).toBe("-0.62 \u25c2");
    expect(part.el.querySelectorAll("text.pw-legend-centre").length).toBe(1);
    expect(root.dataset.centreRun).toBe("corrupted");
    const note = part.el.querySelector(".pw-legend-note").textContent;
    expect(note).toContain("change from the unpatched corrupted run");
    expect(note).toContain("clean run's 2");
    // The gradient's white (opacity 0) stop sits at the corrupted run's place on the bar.
    const stops = [...part.el.querySelectorAll("linearGradient stop")].map((st) => [Number(st.getAttribute("offset")), Number(st.getAttribute("stop-opacity"))]);
    expect(stops.length).toBe(3);
    expect(stops[1][1]).toBe(0);
    expect(stops[1][0]).toBeCloseTo(0.5, 12);
  });

  it("tells ticks apart around a baseline with a narrow spread (random GPT-2: all near -0.621)", () => {
    const mid = Math.fround(-0.621);
    const values = [mid, Math.fround(-0.623), Math.fround(-0.62), mid, Math.fround(-0.622), mid];
    const { root, cells } = heatmapPart({ metric: "logit_diff", heatmap: heatmap("logit_diff", values,
      { centre: { value: mid, run: "corrupted", source: Math.fround(-0.631), source_run: "clean" } }) });
    const labels = root.dataset.legend.split(" ");
    expect(new Set(labels).size).toBe(5);
    expect(labels[2]).toBe("-0.621");
    // The scale reaches the clean run (0.01 away), so a 0.002 change is pale, not deep red.
    const opacity = cells().map((r) => Number(r.getAttribute("fill-opacity")));
    expect(Math.max(...opacity)).toBeLessThan(0.25);
  });

  it("draws a payload without a centre (an older saved copy) around 0, as before", () => {
    const { root } = heatmapPart({ metric: "logit_diff", heatmap: heatmap("logit_diff", [-1, -0.5, 0, 0.5, 1, 2]) });
    expect(root.dataset.legend).toBe("-2 -1 0 1 2");
    expect(root.dataset.centreRun).toBeUndefined();
  });

  it("starts a KL legend at exactly 0, whatever float noise a cell holds", () => {
    const { root, cells } = heatmapPart({ metric: "kl", heatmap: heatmap("kl", [10.36, -5.14e-8, 10.4, 0.3, 5, 10.36]) });
    expect(root.dataset.scale).toBe("sequential");
    const labels = root.dataset.legend.split(" ");
    expect(labels[0]).toBe("0");
    expect(labels.some((t) => t.startsWith("-"))).toBe(false);
    expect(cells()[1].getAttribute("fill-opacity")).toBe("0");
  });

  it("never puts a logprob tick above 0 (a log-probability is at most 0)", () => {
    const { root } = heatmapPart({ metric: "logprob", heatmap: heatmap("logprob", [-10.4, -10.4, -0.01, -20.9, -9, -10.4],
      { centre: { value: Math.fround(-10.4), run: "corrupted", source: Math.fround(-0.0075), source_run: "clean" } }) });
    expect(root.dataset.scale).toBe("diverging");
    const ticks = root.dataset.legend.split(" ").map(Number);
    expect(Math.max(...ticks)).toBeLessThanOrEqual(0);
    expect(ticks[2]).toBeCloseTo(-10.4, 5);
  });

  it("moves the one tab stop with the arrow keys, and Enter calls onSelect", () => {
    const { cells, calls } = heatmapPart({ heatmap: heatmap("normalized", [0, 0.5, 1, -0.25, 0.1, 2]) });
    const tabStop = () => cells().filter((r) => r.getAttribute("tabindex") === "0");
    expect(tabStop()).toEqual([cells()[0]]);
    key(cells()[0], "ArrowRight");
    expect(document.activeElement).toBe(cells()[1]);
    key(cells()[1], "ArrowDown");
    expect(document.activeElement).toBe(cells()[4]);
    key(cells()[4], "ArrowDown"); // the edge: stays
    key(cells()[4], "End");
    expect(tabStop()).toEqual([cells()[5]]);
    expect(calls.select).toEqual([]);
    key(cells()[5], "Enter");
    expect(calls.select).toEqual([[1, 2]]);
    cells()[0].dispatchEvent(new MouseEvent("click", { bubbles: true }));
    expect(calls.select).toEqual([[1, 2], [0, 0]]);
  });

  it("toggles a receiver with Shift+Enter in the path view, and outlines the receivers", () => {
    const { cells, calls, model, root, part } = heatmapPart({ site: "path", heatmap: pathPayload(3, [1, 2, 3, 4, 5, 6]) });
    key(cells()[4], "Enter", true);
    expect(calls).toEqual({ select: [], toggle: ["1.1"] });
    model.py({ receivers: "1.1" });
    part.markReceivers();
    expect(root.dataset.receivers).toBe("1.1");
    expect(part.el.querySelector("path.pw-receiver-marks").getAttribute("d").match(/M/g)).toHaveLength(1);
  });

  it("paints only the job it names: a later job's partial picture keeps nothing of the earlier one", () => {
    const { cells, model, root, part } = heatmapPart({ site: "path", heatmap: pathPayload(3, [0.45, 0.1, 0.2, 0.3, 0.4, 0.5]) });
    expect(cells()[0].getAttribute("data-value")).toBe(String(Math.fround(0.45)));
    model.py({ heatmap: pathPayload(4, [NaN, NaN, NaN, 0.9, NaN, NaN], { state: "running", complete: false, done: 1 }) });
    part.update();
    expect(root.dataset.runId).toBe("4");
    expect(root.dataset.complete).toBe("false");
    expect(cells().map((r) => r.getAttribute("data-value"))).toEqual([null, null, null, String(Math.fround(0.9)), null, null]);
  });

  it("marks the heatmap stale when the inputs change", () => {
    const { model, part } = heatmapPart({ heatmap: heatmap("normalized", [0, 0, 0, 0, 0, 0], { inputs: { clean: "a b c", corrupted: "a x c", correct: " b", incorrect: " x", direction: "denoising", site: "resid_pre" } }) });
    const stale = part.el.querySelector(".pw-stale");
    expect(stale.classList.contains("pw-hidden")).toBe(true);
    model.py({ clean: "a b d" });
    part.markStale();
    expect(stale.classList.contains("pw-hidden")).toBe(false);
  });
});

describe("gridMove", () => {
  it("moves within a 2 x 3 grid and stops at its edges", () => {
    expect(gridMove(0, 6, 3, "ArrowRight")).toBe(1);
    expect(gridMove(0, 6, 3, "ArrowLeft")).toBe(0);
    expect(gridMove(1, 6, 3, "ArrowDown")).toBe(4);
    expect(gridMove(4, 6, 3, "ArrowDown")).toBe(4);
    expect(gridMove(3, 6, 3, "End")).toBe(5);
    expect(gridMove(5, 6, 3, "Home")).toBe(3);
    expect(gridMove(5, 6, 3, "PageUp")).toBe(2);
    expect(gridMove(0, 5, 3, "PageDown")).toBe(3);
    expect(gridMove(2, 5, 3, "ArrowDown")).toBe(2); // no cell below: stay
    expect(gridMove(0, 6, 3, "a")).toBeNull();
  });
});

describe("makeStatus", () => {
  it("says how far a cancelled sweep got, from the heatmap payload", () => {
    const { model, ctx } = context({ status: "cancelled", progress: [6, 6],
      heatmap: heatmap("normalized", [0.1, NaN, NaN, 0.3, NaN, NaN], { state: "cancelled", complete: false, done: 2, total: 6 }) });
    const status = makeStatus(ctx);
    expect(status.update()).toBe("cancelled");
    expect(status.progressRow.textContent).toBe("cancelled after 2/6 patches");
    expect(status.header.querySelector(".pw-status").className).toBe("pw-status pw-status-cancelled");
    model.py({ heatmap: heatmap("normalized", [0, 0, 0, 0, 0, 0]) }); // cancelled before its job started
    status.update();
    expect(status.progressRow.textContent).toBe("cancelled before the sweep started: the heatmap is the previous one");
  });

  it("counts a running sweep, times a finished one, and says 'no kernel' when nobody answers", () => {
    const { model, ctx, root } = context({ status: "running", progress: [3, 8] });
    const status = makeStatus(ctx);
    expect(status.update()).toBe("running");
    expect(status.progressRow.textContent).toBe("3/8 patches");
    model.py({ status: "done", progress: [8, 8], elapsed: 0.1234 });
    status.update();
    expect(status.progressRow.textContent).toBe("8 patches in 0.12 s");
    root.dataset.kernel = "missing";
    expect(status.update()).toBe("no kernel");
    expect(status.header.textContent).toBe("Activation patchingtoyno kernel");
  });
});

describe("makeInputs and the error boxes", () => {
  it("shows an error next to the field at fault, without moving anything", () => {
    const { model, ctx, root } = context();
    const inputs = makeInputs(ctx, { onRun: () => {} });
    const controls = makeControls(ctx, { onRun: () => {} });
    root.append(...inputs.els, controls.el);
    const layout = () => [...root.querySelectorAll("*")];
    const before = layout();
    const box = (field) => root.querySelector(`[data-error-for='${field}']`);
    expect(box("corrupted").textContent).toBe(""); // reserved, empty
    model.py({ errors: { corrupted: "the prompts differ in length", incorrect: "same as the correct answer" } });
    ctx.errors.update();
    expect(layout()).toEqual(before); // the same nodes, in the same places
    expect(box("corrupted").textContent).toBe("the prompts differ in length");
    expect(box("corrupted").parentElement).toBe(inputs.fields.corrupted.el);
    expect(box("clean").textContent).toBe("");
    expect(box("incorrect").parentElement).toBe(inputs.els[1]); // the answers' line
    expect(box("incorrect").classList.contains("pw-has-error")).toBe(true);
    expect(inputs.fields.corrupted.input.classList.contains("pw-invalid")).toBe(true);
    expect(inputs.fields.clean.input.classList.contains("pw-invalid")).toBe(false);
    expect(root.dataset.errors).toBe("corrupted incorrect");
  });

  it("syncs typing after a pause, and Enter asks for a Run", () => {
    vi.useFakeTimers();
    const { model, ctx } = context();
    const runs = [];
    const field = makeTextField(ctx, "clean", "Clean prompt", "pw-prompt", { onEnter: () => runs.push(model.get("clean")) });
    field.input.value = "a y c";
    field.input.dispatchEvent(new Event("input"));
    model.py({ clean: "from python" }); // while typing: the field keeps what is typed
    field.update();
    expect(field.input.value).toBe("a y c");
    vi.advanceTimersByTime(300);
    expect(model.get("clean")).toBe("a y c");
    field.input.value = "a z c";
    key(field.input, "Enter");
    expect(runs).toEqual(["a z c"]);
    expect([...ctx.state.edited]).toEqual(["clean"]);
  });
});

describe("Run and the link to Python", () => {
  it("sends only the edited inputs with a Run, text still being typed included", () => {
    const { model, ctx, root } = context();
    const inputs = makeInputs(ctx, { onRun: () => sendRun(ctx) });
    ctx.save("direction", "noising");
    inputs.fields.incorrect.input.value = " y";
    inputs.fields.incorrect.input.dispatchEvent(new Event("input"));
    root.dataset.requestedRun = "3";
    sendRun(ctx);
    expect(model.sent).toEqual([{ type: "run", state: { direction: "noising", incorrect: " y" } }]);
    expect(root.dataset.requestedRun).toBeUndefined(); // until Python names the new job
    sendRun(ctx);
    expect(model.sent[1]).toEqual({ type: "run", state: {} });
  });

  it("takes the job id from Python's ack, and says so when nobody answers", () => {
    vi.useFakeTimers();
    const { ctx, root } = context();
    let missing = 0;
    const link = makeKernelLink(ctx, { onMissing: () => missing++ });
    link.expect("a Run");
    vi.advanceTimersByTime(3100);
    expect([root.dataset.kernel, missing]).toEqual(["missing", 1]);
    expect(link.note.textContent).toContain("a Run cannot happen");
    link.heard({ type: "ack", run_id: 7 });
    expect([root.dataset.kernel, root.dataset.requestedRun, link.seen()]).toEqual(["connected", "7", true]);
    expect(link.note.classList.contains("pw-hidden")).toBe(true);
  });
});

describe("makeControls, makePathPanel, makeDataset, makeExplainPanel", () => {
  it("controls: show the settings, save changes, Cancel only while running", () => {
    const { model, ctx } = context({ direction: "noising" });
    const runs = [];
    const controls = makeControls(ctx, { onRun: () => runs.push(1) });
    controls.update();
    expect(controls.el.querySelector("[data-direction='noising']").getAttribute("aria-checked")).toBe("true");
    expect(controls.reminder.textContent).toContain("necessary");
    controls.el.querySelector("[data-direction='denoising']").click();
    expect(model.get("direction")).toBe("denoising");
    controls.el.querySelector("button[data-action='run']").click();
    expect(runs).toEqual([1]);
    const cancel = controls.el.querySelector("button[data-action='cancel']");
    controls.setRunning(false);
    expect(cancel.disabled).toBe(true);
    controls.setRunning(true);
    cancel.click();
    expect(model.sent).toEqual([{ type: "cancel" }]);
    model.py({ site: "path" });
    controls.update();
    expect(controls.el.querySelector("input[data-control='fast_preview']").disabled).toBe(true);
  });

  it("path panel: shown for site 'path', toggles receivers in its field", () => {
    const { model, ctx } = context({ receivers: "1.0" });
    const path = makePathPanel(ctx, { onRun: () => {} });
    path.update();
    expect(path.el.classList.contains("pw-hidden")).toBe(true);
    model.py({ site: "path" });
    path.update();
    expect(path.el.classList.contains("pw-hidden")).toBe(false);
    expect(path.el.querySelector("select[data-control='receiver_input']").disabled).toBe(false);
    path.toggleReceiver("0.1");
    expect([model.get("receivers"), path.field.input.value]).toEqual(["1.0, 0.1", "1.0, 0.1"]);
    path.toggleReceiver("1.0");
    expect(model.get("receivers")).toBe("0.1");
  });

  it("dataset: one line per pair; the prompts above join as a new pair", () => {
    const { model, ctx } = context({ dataset: [["p q", "p r", " q", " r"]] });
    const dataset = makeDataset(ctx);
    dataset.update();
    expect(dataset.el.querySelectorAll(".pw-dataset-row").length).toBe(1);
    dataset.el.querySelector("[data-action='add-pair']").click();
    expect(model.get("dataset")).toEqual([["p q", "p r", " q", " r"], ["a b c", "a x c", " b", " x"]]);
    dataset.update();
    expect(dataset.el.querySelector("summary").textContent).toBe("Dataset: 2 prompt pairs (the heatmap shows their mean)");
  });

  it("explanation panel: the words from Python, and an n x n grid per prompt", () => {
    const { model, ctx } = context();
    const side = makeExplainPanel(ctx);
    side.updateExplanation();
    expect(side.el.querySelector(".pw-explanation").textContent).toBe("Click a cell of the heatmap to see what it means.");
    model.py({ explanation: "Layer 1 restores 40%.", pattern: { layer: 1, head: 0,
      clean: { tokens: ["a", "b"], n: 2, values: f32([1, 0, 0.25, 0.75]) } } });
    side.updateExplanation();
    side.updatePattern();
    expect(side.el.querySelector(".pw-explanation").textContent).toBe("Layer 1 restores 40%.");
    const weights = [...side.el.querySelectorAll("svg[data-prompt='clean'] rect.pw-pcell")].map((r) => r.getAttribute("data-weight"));
    expect(weights).toEqual(["1.0000", "0.0000", "0.2500", "0.7500"]);
    expect(side.patterns.textContent).toContain("corrupted: no pattern");
  });
});
