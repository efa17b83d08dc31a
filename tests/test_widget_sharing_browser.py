"""Two widgets on one model in one notebook, both Run at once, in JupyterLab + Chromium.

The widgets' job threads share the model (patchwidgets.sharing): each heatmap must equal
:func:`patchwidgets.patch` computed alone in this process, round after round, under CPU load.
``PATCHWIDGETS_SHARING_ROUNDS`` sets the rounds (the issue asks for 20 in a row when the
sharing code changes; CI runs 3).
"""

from __future__ import annotations

import os

import pytest
from test_widget_browser import (CLEAN, CORRUPTED, cpu_load, missing_requirement,  # noqa: F401
                                 playwright_session, widget_page)

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(missing_requirement() is not None, reason=str(missing_requirement()))]

ROUNDS = int(os.environ.get("PATCHWIDGETS_SHARING_ROUNDS", "3"))

TWO_WIDGETS_CELL = """\
import os
os.environ["HF_HUB_OFFLINE"] = "1"
import ipywidgets, patchwidgets
model = patchwidgets.load_model("toy-ioi")
kw = dict(clean=%r, corrupted=%r, correct=" Sarah", incorrect=" Lisa")
w1 = patchwidgets.PatchingWidget(model, site="head_out_by_pos", max_batch_tokens=64, fast_preview=False, **kw)
w2 = patchwidgets.PatchingWidget(model, site="resid_pre", max_batch_tokens=64, fast_preview=False, **kw)
ipywidgets.VBox([w1, w2])""" % (CLEAN, CORRUPTED)


def _roots_state(page) -> list[dict]:
    return page.eval_on_selector_all(".pw-root", """els => els.map(r => ({
        run: r.dataset.runId, requested: r.dataset.requestedRun, state: r.dataset.runState,
        complete: r.dataset.complete}))""")


def _cells(page, index: int) -> list[dict]:
    return page.eval_on_selector_all(".pw-root", """(roots, i) => [...roots[i].querySelectorAll('rect.pw-cell')]
        .map(e => ({layer: Number(e.dataset.layer), pos: e.dataset.pos === undefined ? null : Number(e.dataset.pos),
                    head: e.dataset.head === undefined ? null : Number(e.dataset.head),
                    value: e.dataset.value === undefined ? null : Number(e.dataset.value)}))""", index)


def test_two_widgets_run_at_once_match_patch_alone(playwright_session, lab_server, cpu_load):  # noqa: F811
    import patchwidgets as pw

    model = pw.load_model("toy-ioi")
    answers = (" Sarah", " Lisa")
    expected = {
        0: pw.patch(model, CLEAN, CORRUPTED, answers, site="head_out_by_pos").grid("normalized"),  # [layer, pos, head]
        1: pw.patch(model, CLEAN, CORRUPTED, answers, site="resid_pre").grid("normalized"),        # [layer, pos]
    }
    with widget_page(playwright_session, lab_server, [TWO_WIDGETS_CELL], notebook="two_widgets.ipynb",
                     height=2400) as page:
        page.wait_for_function("() => document.querySelectorAll('.pw-root[data-status]').length === 2",
                               timeout=60_000)
        for round_ in range(ROUNDS):
            before = [int(s["run"] or -1) for s in _roots_state(page)]
            buttons = page.locator("button[data-action='run']")
            # Both at once: one script clicks both buttons in the same task.
            buttons.first.evaluate("""() => document.querySelectorAll("button[data-action='run']")
                                             .forEach(b => b.click())""")
            page.wait_for_function(
                """(before) => [...document.querySelectorAll('.pw-root')].every((r, i) =>
                    r.dataset.requestedRun !== undefined && r.dataset.runId === r.dataset.requestedRun
                    && r.dataset.runState === 'done' && r.dataset.complete === 'true'
                    && Number(r.dataset.runId) > before[i])""", arg=before, timeout=120_000)
            for index, grid in expected.items():
                cells = _cells(page, index)
                assert len(cells) == grid.numel(), f"round {round_}, widget {index}"
                for c in cells:
                    where = (c["layer"], c["pos"]) if c["head"] is None else (c["layer"], c["pos"], c["head"])
                    assert c["value"] == pytest.approx(float(grid[where]), abs=1e-6), \
                        f"round {round_}, widget {index}, cell {where}"
