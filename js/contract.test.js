// @vitest-environment jsdom
// The page against the widget's contract (patchwidgets/widget_contract.py, as PatchingWidget sends
// it: tests/shared/widget_contract.json, which tests/test_widget.py checks). Every field the
// contract lists must be handled by the page, so a contract entry without its part in widget.js
// fails here: a traitlet the page may set without a control that sets it, one Python sets that
// nothing redraws on, a sweep field the stale check misses, a run field a Run does not carry, a
// metric, site or receiver input missing from its menu, a traitlet or heatmap key the typedefs
// lack. (The other way round, the fake model refuses any traitlet the contract does not list.)
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterEach, beforeAll, describe, expect, it } from "vitest";
import widget, { makeContext, sendRun } from "../patchwidgets/static/widget.js";
import { CONTRACT, TOY_EDGES, circuit, f32, fakeModel, heatmap } from "./fake_model.js";

const here = dirname(fileURLToPath(import.meta.url));
const source = readFileSync(join(here, "..", "patchwidgets", "static", "widget.js"), "utf8");

beforeAll(() => {
  globalThis.ResizeObserver = class { observe() {} disconnect() {} };
});
afterEach(() => document.body.replaceChildren());

/** A different value of the same type (a string, a list of rows, a number, a flag, a dict). */
function another(value) {
  if (typeof value === "string") return `${value}!`;
  if (typeof value === "number") return value + 1;
  if (typeof value === "boolean") return !value;
  if (Array.isArray(value)) return [...value, ["p", "q", "r", "s"]];
  return { ...value, row: 0, col: 0 };
}

/** The sweep fields of the toy model's state, as a sweep would record them. */
function inputsOf(model) {
  return Object.fromEntries(CONTRACT.sweep_fields.map((k) => [k, structuredClone(model.get(k))]));
}

/** A dataset heatmap (two pairs) and a circuit whose inputs are the model's: every control of the page is drawn. */
function mount(state = {}) {
  const model = fakeModel({ dataset: [["a b c", "a x c", " b", " x"], ["a b d", "a x d", " b", " x"]], ...state });
  model.py({ heatmap: heatmap("normalized", [0, 0.5, 1, -0.25, 0.1, 2], { inputs: inputsOf(model), n_pairs: 2, pair: -1, se: f32([0, 0, 0, 0, 0, 0]) }) });
  model.py({ circuit: circuit(TOY_EDGES, { n_edges: 30, inputs: Object.fromEntries(CONTRACT.circuit_fields.map((k) => [k, structuredClone(model.get(k))])) }) });
  const el = document.createElement("div");
  document.body.append(el);
  widget.render({ model, el });
  return { model, root: /** @type {HTMLElement} */ (el.querySelector(".pw-root")) };
}

/** The property names of JSDoc typedef `name` in widget.js ("[key]" for optional ones). */
function typedefProperties(name) {
  const block = source.match(new RegExp(`@typedef \\{Object\\} ${name}\\n([\\s\\S]*?)\\*/`));
  expect(block, `typedef ${name} in widget.js`).not.toBeNull();
  return [...block[1].matchAll(/@property \{[^\n]*?\} (\[?\w+\]?)/g)].map((m) => m[1]);
}

describe("the contract's fields", () => {
  it("the contract is self-consistent: run and sweep fields are page fields, static ones shown", () => {
    const page = new Set(CONTRACT.page_fields);
    for (const k of [...CONTRACT.sweep_fields, ...CONTRACT.run_fields]) expect(page.has(k), k).toBe(true);
    for (const k of CONTRACT.path_fields) expect(CONTRACT.sweep_fields, k).toContain(k);
    for (const k of CONTRACT.static_fields) expect(CONTRACT.shown_fields, k).toContain(k);
  });

  it("the State typedef names every traitlet of the contract, and nothing else", () => {
    expect(typedefProperties("State").sort()).toEqual([...CONTRACT.page_fields, ...CONTRACT.shown_fields].sort());
  });

  it("the Heatmap typedef names every heatmap key, the optional ones as optional", () => {
    expect(typedefProperties("Heatmap").sort()).toEqual(
      [...CONTRACT.heatmap_keys, ...CONTRACT.heatmap_optional_keys.map((k) => `[${k}]`)].sort());
  });

  it("the Circuit typedef names every circuit key, and the circuit fields are page fields", () => {
    expect(typedefProperties("Circuit").sort()).toEqual([...CONTRACT.circuit_keys].sort());
    for (const k of CONTRACT.circuit_fields) expect(CONTRACT.page_fields, k).toContain(k);
  });

  it("every field the page may set has a control on the page, which sets it", () => {
    for (const name of CONTRACT.page_fields) {
      const { model, root } = mount();
      const control = root.querySelector(`[data-control="${name}"], [data-field="${name}"]`);
      expect(control, `a control with data-control or data-field "${name}"`).not.toBeNull();
      const before = JSON.stringify(model.get(name));
      if (control instanceof HTMLSelectElement) {
        const other = [...control.options].find((o) => o.value !== control.value);
        expect(other, `another choice in the ${name} menu`).toBeDefined();
        control.value = other.value;
        control.dispatchEvent(new Event("change"));
      } else if (control instanceof HTMLInputElement && control.type === "checkbox") {
        control.click();
      } else if (control instanceof HTMLInputElement && control.type === "range") { // released at another stop
        control.value = String(Number(control.value) === 0 ? 1 : 0);
        control.dispatchEvent(new Event("change"));
      } else if (control instanceof HTMLInputElement) {
        control.value = `${control.value}!`;
        control.dispatchEvent(new Event("change"));
      } else { // a group: press the choice that is not on (a button, a heatmap cell, an edge of the circuit)
        const target = control.querySelector("button:not(.pw-on), rect.pw-cell, g.pw-edge");
        expect(target, `something to press in the ${name} control`).not.toBeNull();
        target.dispatchEvent(new MouseEvent("click", { bubbles: true }));
      }
      expect(JSON.stringify(model.get(name)), `${name} set by its control`).not.toBe(before);
      expect(model.saved.at(-1)[name], `${name} saved`).toEqual(model.get(name));
    }
  });

  it("every field only Python sets is redrawn when it changes (the static ones are read once)", () => {
    const { model } = mount();
    for (const name of CONTRACT.shown_fields) {
      if (CONTRACT.static_fields.includes(name)) continue;
      expect((model.handlers.get(`change:${name}`) || []).length, `a redraw on change:${name}`).toBeGreaterThan(0);
    }
  });

  it("a heatmap is stale once any sweep field differs from what it was computed with", () => {
    const { model, root } = mount({ site: "path" });
    const stale = () => !root.querySelector(".pw-stale").classList.contains("pw-hidden");
    expect(stale()).toBe(false);
    for (const name of CONTRACT.sweep_fields) {
      const value = model.get(name);
      model.py({ [name]: another(value) });
      expect(stale(), `stale after ${name} changed`).toBe(true);
      model.py({ [name]: value });
      expect(stale(), `fresh again once ${name} is back`).toBe(false);
    }
    // The path view's own fields do not count for a sweep of another site.
    model.py({ site: "resid_pre" });
    model.py({ heatmap: heatmap("normalized", [0, 0, 0, 0, 0, 0], { inputs: inputsOf(model) }) });
    for (const name of CONTRACT.path_fields) {
      model.py({ [name]: another(model.get(name)) });
      expect(stale(), `${name} is not the path view's sweep`).toBe(false);
    }
  });

  it("a circuit is stale once any circuit field differs from what it was scored with", () => {
    const { model, root } = mount({ site: "circuit" });
    const stale = () => !root.querySelector(".pw-circuit-panel .pw-stale").classList.contains("pw-hidden");
    expect(stale()).toBe(false);
    for (const name of CONTRACT.circuit_fields) {
      const value = model.get(name);
      model.py({ [name]: another(value) });
      expect(stale(), `stale after ${name} changed`).toBe(true);
      model.py({ [name]: value });
      expect(stale(), `fresh again once ${name} is back`).toBe(false);
    }
  });

  it("a Run carries exactly the run fields edited on the page", () => {
    const model = fakeModel();
    const ctx = makeContext(model);
    for (const name of CONTRACT.page_fields) ctx.save(name, another(model.get(name)));
    sendRun(ctx);
    const sent = model.sent.at(-1);
    expect(sent.type).toBe("run");
    expect(Object.keys(sent.state).sort()).toEqual([...CONTRACT.run_fields].sort());
    for (const name of CONTRACT.run_fields) expect(sent.state[name], name).toEqual(model.get(name));
  });
});

describe("the contract's menus and labels", () => {
  it("offers every metric with its label, and captions the heatmap with it", () => {
    const { root } = mount();
    const options = [...root.querySelectorAll("select[data-control='metric'] option")];
    expect(options.map((o) => o.value)).toEqual(Object.keys(CONTRACT.metrics));
    for (const o of options) expect(o.textContent).toBe(`${o.value}: ${CONTRACT.metrics[o.value].label}`);
    expect(root.querySelector(".pw-caption").textContent).toContain(CONTRACT.metrics.normalized.label);
  });

  it("offers every site, grouped, and every receiver input", () => {
    const { root } = mount();
    const groups = [...root.querySelectorAll("select[data-control='site'] optgroup")];
    expect(groups.map((g) => [g.label, [...g.querySelectorAll("option")].map((o) => [o.value, o.textContent])])).toEqual(CONTRACT.sites);
    const inputs = [...root.querySelectorAll("select[data-control='receiver_input'] option")];
    expect(inputs.map((o) => [o.value, o.textContent])).toEqual(CONTRACT.receiver_inputs);
    const methods = [...root.querySelectorAll("select[data-control='circuit_method'] option")];
    expect(methods.map((o) => [o.value, o.textContent])).toEqual(CONTRACT.circuit_methods);
  });
});
