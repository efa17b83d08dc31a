// @vitest-environment jsdom
// Unit tests of patchwidgets/static/widget.js: the pure helpers against the cases the Python
// tests check too (tests/shared/widget_cases.json), and the whole renderer against a fake anywidget
// model (fake_model.js). Its parts alone: parts.test.js.
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { beforeAll, describe, expect, it, vi } from "vitest";
import widget, { colour, domain, fmt, over, receiverHeads, tickLabels, ticks } from "../patchwidgets/static/widget.js";
import { METRIC_INFO, f32, fakeModel, heatmap } from "./fake_model.js";

const here = dirname(fileURLToPath(import.meta.url));
const cases = JSON.parse(readFileSync(join(here, "..", "tests", "shared", "widget_cases.json"), "utf8"));

beforeAll(() => {
  globalThis.ResizeObserver = class { observe() {} disconnect() {} };
  globalThis.requestAnimationFrame = (f) => setTimeout(() => f(performance.now()), 0);
});

describe("shared cases (also checked by tests/test_widget.py)", () => {
  it("formats numbers as Python does", () => {
    for (const [value, digits, text] of cases.fmt) expect(fmt(value, digits), `${value} ${digits}`).toBe(text);
  });
  it("picks the colour range and colours as Python does", () => {
    for (const c of cases.domain) {
      expect(domain(c.metric, c.values.filter((v) => v !== null), METRIC_INFO[c.metric])).toEqual(c.domain);
    }
    for (const c of cases.colour) expect(colour(c.value, c.domain[0], c.domain[1], c.kind), JSON.stringify(c)).toEqual(c.rgba);
    for (const c of cases.over) expect(over(c.rgba)).toBe(c.hex);
    for (const c of cases.ticks) {
      ticks(c.domain[0], c.domain[1]).forEach((v, i) => expect(v).toBeCloseTo(c.ticks[i], 12));
    }
  });
  it("centres a raw metric's colours on its target run as Python does", () => {
    for (const c of cases.centred_domain) {
      expect(domain(c.metric, c.values, METRIC_INFO[c.metric], c.mid, c.source), JSON.stringify(c)).toEqual(c.domain);
    }
    for (const c of cases.centred_colour) {
      expect(colour(c.value, c.domain[0], c.domain[1], c.kind, c.mid), JSON.stringify(c)).toEqual(c.rgba);
    }
    for (const c of cases.centred_ticks) expect(ticks(c.domain[0], c.domain[1], 5, c.mid)).toEqual(c.ticks);
    for (const c of cases.tick_labels) expect(tickLabels(c.values, c.digits)).toEqual(c.labels);
  });
  it("reads the receivers field as Python does", () => {
    for (const c of cases.receivers) expect(receiverHeads(c.text)).toEqual(c.heads.map(([l, h]) => `${l}.${h}`));
  });
});

function mount(state = {}) {
  const model = fakeModel(state);
  const el = document.createElement("div");
  document.body.append(el);
  const cleanup = widget.render({ model, el });
  return { model, el, cleanup, root: /** @type {HTMLElement} */ (el.querySelector(".pw-root")) };
}

describe("render with a fake model", () => {
  it("says hello, so a saved copy without Python can tell", () => {
    const { model } = mount();
    expect(model.sent[0]).toEqual({ type: "hello" });
  });

  it("draws every cell with its value and a legend of five ticks", () => {
    const { root, el } = mount({ heatmap: heatmap("normalized", [0, 0.5, 1, -0.25, 0.1, 2]) });
    const cells = el.querySelectorAll("rect.pw-cell");
    expect(cells.length).toBe(6);
    expect(Number(cells[5].getAttribute("data-value"))).toBe(2);
    expect(cells[0].getAttribute("fill-opacity")).toBe("0"); // no effect: the background shows
    expect(root.dataset.scale).toBe("diverging");
    expect(root.dataset.legend.split(" ")).toEqual(["-2", "-1", "0", "1", "2"]);
    expect(el.querySelectorAll("text[data-tick]").length).toBe(5);
  });

  it("draws a non-negative metric on a one-hue scale over its own range, saying which end is worse", () => {
    const { root, el } = mount({ metric: "rank", heatmap: heatmap("rank", [1, 2, 3, 5, 9, 1]) });
    expect(root.dataset.scale).toBe("sequential");
    expect(root.dataset.legend.split(" ")).toEqual(["1", "3", "5", "7", "9"]);
    const fills = [...el.querySelectorAll("rect.pw-cell")].map((r) => r.getAttribute("fill"));
    expect(new Set(fills)).toEqual(new Set(["rgb(84,39,143)"]));
    expect(el.querySelector(".pw-legend-note").textContent).toContain("worse");
  });

  it("sends the inputs edited on the page along with Run, and says so when nobody answers", () => {
    vi.useFakeTimers();
    try {
      const { model, root, el } = mount();
      const input = /** @type {HTMLInputElement} */ (el.querySelector("input[data-field='clean']"));
      input.value = "a y c";
      input.dispatchEvent(new Event("input"));
      /** @type {HTMLButtonElement} */ (el.querySelector("button[data-action='run']")).click();
      expect(model.sent.at(-1)).toEqual({ type: "run", state: { clean: "a y c" } });
      vi.advanceTimersByTime(3500);
      expect(root.dataset.kernel).toBe("missing");
      expect(el.querySelector(".pw-kernel-note").textContent).toContain("saved copy");
      expect(el.querySelector(".pw-status").textContent).toBe("no kernel");
      model.trigger("msg:custom", { type: "ack", run_id: 7 }); // Python answers after all
      expect(root.dataset.kernel).toBe("connected");
      expect(root.dataset.requestedRun).toBe("7");
    } finally {
      vi.useRealTimers();
    }
  });

  it("shows errors in boxes that keep their place, text only", () => {
    const { model, el } = mount();
    model.py({ errors: { corrupted: "<img src=x onerror=alert(1)>" } });
    const box = el.querySelector("[data-error-for='corrupted']");
    expect(box.textContent).toBe("<img src=x onerror=alert(1)>");
    expect(box.classList.contains("pw-has-error")).toBe(true);
    expect(el.querySelector("img")).toBeNull();
    model.py({ errors: {} });
    expect(el.querySelector("[data-error-for='corrupted']").isConnected).toBe(true);
  });

  it("says a cancelled sweep stopped, with honest counts", () => {
    const values = [0.1, NaN, NaN, 0.3, NaN, NaN];
    const { model, el } = mount({ status: "cancelled", progress: [2, 6] });
    model.py({ heatmap: heatmap("normalized", values, { state: "cancelled", complete: false, done: 2, estimate: f32([1, 1, 1, 1, 1, 1]) }) });
    expect(el.querySelector(".pw-progress-text").textContent).toBe("cancelled after 2/6 patches");
    expect(el.querySelector(".pw-approx-note").textContent).toContain("stopped before reaching");
  });

  it("never counts the previous picture as the cancelled sweep's", () => {
    const { model, el } = mount({ heatmap: heatmap("normalized", [0, 0.5, 1, -0.25, 0.1, 2]), progress: [6, 6] });
    model.py({ status: "cancelled" }); // cancelled before its job started: the picture is the last Run's
    expect(el.querySelector(".pw-progress-text").textContent).toBe("cancelled before the sweep started: the heatmap is the previous one");
  });

  it("names only the hint 'Type two prompts.' when both prompts are empty", () => {
    const { model, el } = mount({ tokens: { clean: null, corrupted: null }, clean: "qq", corrupted: "zz" });
    expect(el.querySelector(".pw-tokens").textContent).not.toContain("Type two prompts");
    model.py({ clean: "", corrupted: " " });
    expect(el.querySelector(".pw-tokens").textContent).toContain("Type two prompts.");
  });

  it("is one tab stop, moved with arrows; Enter selects; names carry the value", () => {
    const { model, el } = mount({ heatmap: heatmap("normalized", [0, 0.5, 1, -0.25, 0.1, 2]) });
    const tabbable = () => [...el.querySelectorAll("rect.pw-cell[tabindex='0']")];
    expect(tabbable().length).toBe(1);
    const first = tabbable()[0];
    expect(first.getAttribute("aria-label")).toBe("layer 0, position 0 'A': normalized 0");
    const key = (target, k, shiftKey = false) => target.dispatchEvent(new KeyboardEvent("keydown", { key: k, shiftKey, bubbles: true }));
    key(first, "ArrowRight");
    key(tabbable()[0], "ArrowDown");
    const now = tabbable();
    expect(now.length).toBe(1);
    expect([now[0].getAttribute("data-row"), now[0].getAttribute("data-col")]).toEqual(["1", "1"]);
    expect(now[0].getAttribute("aria-label")).toBe("layer 1, position 1 'B': normalized 0.1");
    key(now[0], "End");
    key(tabbable()[0], "ArrowDown"); // stays inside the grid
    expect(tabbable()[0].getAttribute("data-col")).toBe("2");
    key(tabbable()[0], "Enter");
    expect(model.get("selected")).toEqual({ row: 1, col: 2 });
  });

  it("opens a big (layer.head x position) sweep one position at a time", () => {
    const rows = [], values = [];
    for (let l = 0; l < 12; l++) for (let hd = 0; hd < 12; hd++) rows.push({ layer: l, head: hd, label: `L${l} H${hd}` });
    const cols = [0, 1, 2].map((p) => ({ pos: p, label: `t${p}`, token: `t${p}` }));
    for (let i = 0; i < rows.length * 3; i++) values.push(i);
    const { root, el } = mount({ heatmap: heatmap("logit_diff", values, { rows, cols, row_title: "layer.head", site: "head_out_by_pos" }) });
    const svg = el.querySelector("svg.pw-heatmap");
    expect([svg.getAttribute("data-view"), svg.getAttribute("data-rows"), svg.getAttribute("data-cols")]).toEqual(["position", "12", "12"]);
    expect(root.dataset.position).toBe("2");
    const cell = el.querySelector("rect.pw-cell[data-layer='3'][data-head='4']");
    expect(Number(cell.getAttribute("data-value"))).toBe((3 * 12 + 4) * 3 + 2);
  });

  it("unsubscribes everything when the view goes", () => {
    const { model, cleanup } = mount();
    cleanup();
    expect([...model.handlers.values()].every((list) => list.length === 0)).toBe(true);
  });
});
