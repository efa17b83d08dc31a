"""Latency of the widget in a real browser: Run click -> complete heatmap on screen.

Starts JupyterLab (as ``tests/test_widget_browser.py`` does), opens a notebook that displays
a ``PatchingWidget``, and times, inside the page, from the Run button's click to the first
animation frame after the heatmap of the sweep that click started (its id comes back with
the kernel's acknowledgement) is complete on screen. Everything in between counts: the comm
message to the kernel, the patching sweep on the job thread, the streamed traitlet updates
and the SVG drawing.

Models (``--model``):

* ``toy-ioi``: the bundled 4-layer model;
* ``gpt2-shaped``: a randomly initialised model with GPT-2 small's shape (12 layers, 12 heads,
  d_model 768, vocabulary 50257) and GPT-2's own tokenizer, on which the IOI prompt is 15
  tokens as on toy-ioi (the weights do not matter for timing).

Usage (from the repository root)::

    python benchmarks/bench_widget_latency.py [--model toy-ioi] [--site resid_pre] [--runs 5]

Prints one line per run and the median. Targets (issues 12 and 19): toy-ioi resid_pre <= 150 ms;
gpt2-shaped resid_pre <= 0.5 s and head_out_by_pos <= 2.5 s, with the default settings
(``--fast-preview``). Timings on a shared CPU are noisy:
compare medians, not single runs. Needs JupyterLab, playwright and ``/usr/bin/chromium``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_widget_browser import (  # noqa: E402
    WIDGET_CELL, JupyterLab, gpt2_shaped_cell, launch_browser, missing_requirement, open_widget,
)

GPT2_SHAPED_CELL = gpt2_shaped_cell(n_embd=768)
TARGETS_MS = {("toy-ioi", "resid_pre"): 150, ("gpt2-shaped", "resid_pre"): 500,      # issue 19
              ("gpt2-shaped", "head_out_by_pos"): 2500}

# Runs in the page: click Run, then resolve on the first frame after the heatmap of the run
# that click started is complete. performance.now() is the browser's own monotonic clock.
TIME_ONE_RUN = """async (limitMs) => {
    const root = document.querySelector('.pw-root');
    const before = Number(root.dataset.runId || -1);
    const t0 = performance.now();
    root.querySelector("button[data-action='run']").click();
    await new Promise((resolve, reject) => {
        const check = () => {
            if (root.dataset.requestedRun !== undefined && root.dataset.runId === root.dataset.requestedRun
                && root.dataset.runState === 'done' && Number(root.dataset.runId) > before) return resolve();
            if (root.dataset.status === 'error') return reject(new Error(root.dataset.errors));
            if (performance.now() > t0 + limitMs) return reject(new Error('timeout'));
            requestAnimationFrame(check);
        };
        check();
    });
    await new Promise((r) => requestAnimationFrame(r));
    return {ms: performance.now() - t0, cells: root.querySelectorAll('rect.pw-cell').length};
}"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["toy-ioi", "gpt2-shaped"], default="toy-ioi")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--site", default="resid_pre")
    parser.add_argument("--fast-preview", action="store_true", help="keep the attribution estimate on")
    args = parser.parse_args()
    reason = missing_requirement()
    if reason:
        print(f"skipped: {reason}")
        return 0

    from playwright.sync_api import sync_playwright

    cell = WIDGET_CELL if args.model == "toy-ioi" else GPT2_SHAPED_CELL
    with JupyterLab([cell]) as lab, sync_playwright() as p:
        browser = launch_browser(p)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            open_widget(page, lab, timeout_ms=300_000)
            page.select_option("select[data-control='site']", args.site)
            if page.is_checked("input[data-control='fast_preview']") != args.fast_preview:
                page.click("input[data-control='fast_preview']")
            times = []
            for i in range(args.warmup + args.runs):
                out = page.evaluate(TIME_ONE_RUN, 600_000)
                python_s = float(page.evaluate("() => document.querySelector('.pw-root')"
                                               ".querySelector('.pw-progress-text').textContent"
                                               ".match(/in ([0-9.]+) s/)?.[1] ?? 'nan'"))
                tag = "warm-up" if i < args.warmup else f"run {i - args.warmup + 1}"
                print(f"{tag:>8}: {out['ms']:8.1f} ms click -> heatmap "
                      f"({out['cells']} cells; sweep {python_s * 1000:.0f} ms in Python)", flush=True)
                if i >= args.warmup:
                    times.append(out["ms"])
        finally:
            browser.close()
    median = statistics.median(times)
    target = TARGETS_MS.get((args.model, args.site))
    verdict = "" if target is None else f" (target <= {target} ms: {'met' if median <= target else 'NOT met'})"
    print(f"\n{args.site} on {args.model}, Run click -> complete heatmap, {len(times)} runs: "
          f"median {median:.0f} ms, min {min(times):.0f} ms, max {max(times):.0f} ms{verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
