"""Colours that do not mislead: every heatmap (the widget's page, its exported copy, the plotly
figure) draws "no effect" as the background and never shows a tick a metric cannot take.

* ``kl``, ``prob``, ``accuracy`` (and ``rank``, from 1) start at their bound exactly: a KL of
  -5e-8 is float noise, and a legend reading ``-5.14e-8`` suggested a negative divergence.
* ``logit_diff``, ``logit``, ``logprob`` are coloured by their change from the unpatched target
  run: centred on 0, a corrupted run at logit difference -0.62 painted every cell whose patch
  changed nothing deep red.

The sweeps are real ones on the bundled toy-ioi model; the expected centres come from
``result.baselines`` and the no-op cells are found independently of the colour code (positions
before the first token where the two prompts differ hold identical activations, so patching
them is a no-op and leaves the target run's own value).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import patchwidgets as pw
from patchwidgets import widget_colour as colours
from patchwidgets.widget_payload import heatmap_payload, payload_values, static_html

SHARED = json.loads((Path(__file__).parent / "shared" / "widget_cases.json").read_text())
CLEAN = "When Lisa and Sarah went to the cinema, Lisa gave the ticket to"
CORRUPTED = "When Lisa and Sarah went to the cinema, Sarah gave the ticket to"
ANSWERS = (" Sarah", " Lisa")
S2 = 10  # the first position where the prompts differ


@pytest.fixture(scope="module")
def sweep(toy_model):
    """A denoising resid_pre sweep of toy-ioi with the metrics whose colours are at stake."""
    return pw.patch(toy_model, CLEAN, CORRUPTED, answers=ANSWERS, site="resid_pre", progress=False,
                    metrics=["logit_diff", "kl", "logprob", "prob", "rank", "normalized"])


def legend_of(html: str) -> list[str]:
    """The tick labels of a static heatmap's legend (the spans of its data-legend line)."""
    line = re.search(r'data-legend="\w+">(.*?)</div>', html).group(1)
    return re.findall(r"<span[^>]*>([^<]*)</span>", line)


def cell_colours(html: str) -> list[list[str]]:
    """The background colour of every cell of a static heatmap, row by row."""
    rows = re.findall(r"<tr><th[^>]*>[^<]*</th>(<td.*?)</tr>", html)
    cells = [re.findall(r"<td[^>]*background:(#[0-9a-f]{6})", row) for row in rows]
    assert cells and all(len(row) == len(cells[0]) > 0 for row in cells), "a static heatmap"
    return cells


# --------------------------------------------------------------------------- shared with the JS
def test_shared_centred_cases():
    """The cases js/widget.test.js checks too: centred ranges, colours, ticks, tick labels."""
    for case in SHARED["centred_domain"]:
        got = colours.domain(case["metric"], case["values"], case["mid"], case["source"])
        assert list(got) == case["domain"], case
    for case in SHARED["centred_colour"]:
        got = colours.colour(case["value"], *case["domain"], case["kind"], case["mid"])
        assert list(got) == case["rgba"], case
    for case in SHARED["centred_ticks"]:
        assert colours.ticks(*case["domain"], mid=case["mid"]) == case["ticks"], case
    for case in SHARED["tick_labels"]:
        assert colours.tick_labels(case["values"], case["digits"]) == case["labels"], case


def test_noise_below_a_bound_is_not_a_tick():
    """By hand: KL values [-5.14e-8, 0.5, 2] span 0..2, not -5.14e-8..2; ranks start at 1."""
    assert colours.domain("kl", [-5.14e-8, 0.5, 2.0]) == (0.0, 2.0)
    assert colours.domain("prob", [-1e-9, 0.3]) == (0.0, 1.0)
    assert colours.domain("accuracy", [0.0, 1.0 + 1e-7]) == (0.0, 1.0)
    assert colours.domain("rank", [1.0, 4.0]) == (1.0, 4.0)
    assert colours.scale("kl", [-5.14e-8, 0.5, 2.0]).labels() == ["0", "0.5", "1", "1.5", "2"]


# --------------------------------------------------------------------------- non-negative metrics
@pytest.mark.parametrize("metric,bottom", [("kl", "0"), ("prob", "0"), ("rank", "1")])
def test_one_sign_legend_starts_at_its_bound(sweep, metric, bottom):
    """On a real sweep: the legend's lowest tick is the bound, and none is below it, in the
    exported copy and in the plotly figure."""
    payload = heatmap_payload(sweep, metric, {}, 1)
    labels = legend_of(static_html(payload, "t"))
    assert labels[0] == bottom and len(labels) == 5
    assert all(float(t) >= float(bottom) for t in labels), labels
    bar = sweep.figure(metric).data[0]
    assert bar.zmin == float(bottom) and min(bar.colorbar.tickvals) == float(bottom)
    assert bar.colorscale[0][1] == "#ffffff", "the bound is the background"


def test_kl_float_noise_gives_no_negative_tick(sweep):
    """The case the issue measured: a cell whose patch restores the clean run exactly has a KL
    of ~0 that float rounding may put below 0 (-5.14e-8 was measured; here the noise is put in
    by hand so that the test does not depend on this CPU's rounding)."""
    noisy = pw.PatchResult(**{**sweep.__dict__, "values": {k: v.clone() for k, v in sweep.values.items()}})
    noisy.values["kl"][0, S2] = -5.14e-8           # layer 0, position S2 (resid_pre: [layer, pos])
    assert float(noisy.grid("kl").min()) < 0
    payload = heatmap_payload(noisy, "kl", {}, 1)
    labels = legend_of(static_html(payload, "t"))
    assert labels[0] == "0" and not any(t.startswith("-") for t in labels), labels
    fig = noisy.figure("kl").data[0]
    assert fig.zmin == 0 and min(fig.colorbar.tickvals) == 0


# --------------------------------------------------------------------------- raw metrics
def test_logit_diff_is_centred_on_the_corrupted_run(sweep):
    """Denoising: a cell whose patch changed nothing gets no colour, the legend's middle tick is
    the corrupted run's value and says so, and restoring the clean run is full blue."""
    corrupted = float(sweep.baselines["corrupted"]["logit_diff"].mean())
    clean = float(sweep.baselines["clean"]["logit_diff"].mean())
    assert corrupted < -1 and clean > 1, "toy-ioi: the corrupted run prefers the wrong name"
    payload = heatmap_payload(sweep, "logit_diff", {}, 1)
    assert payload["centre"]["run"] == "corrupted" and payload["centre"]["value"] == corrupted
    assert payload["centre"]["source"] == clean
    values = payload_values(payload)
    assert torch.equal(values[:, :S2], torch.full_like(values[:, :S2], corrupted)), "no-op cells"
    html = static_html(payload, "t")
    colour = cell_colours(html)
    assert all(c == "#ffffff" for row in colour for c in row[:S2]), "no effect = no colour"
    assert colour[0][S2] == colours.over((*colours.BLUE, 1.0)), "layer 0 at S2 restores the clean run"
    labels = legend_of(html)
    assert labels[2] == f"{colours.fmt(corrupted, 3)} (corrupted run)"
    assert "change from the unpatched corrupted run" in html


def test_logit_diff_noising_is_centred_on_the_clean_run(toy_model):
    result = pw.patch(toy_model, CLEAN, CORRUPTED, answers=ANSWERS, site="resid_pre", direction="noising",
                      metrics="logit_diff", progress=False)
    clean = float(result.baselines["clean"]["logit_diff"].mean())
    payload = heatmap_payload(result, "logit_diff", {}, 1)
    assert (payload["centre"]["run"], payload["centre"]["value"]) == ("clean", clean)
    colour = cell_colours(static_html(payload, "t"))
    assert all(c == "#ffffff" for row in colour for c in row[:S2])
    fig = result.figure("logit_diff").data[0]
    assert fig.zmid == clean and "(clean run)" in fig.colorbar.ticktext[2]


def test_one_pair_is_centred_on_its_own_target_value(toy_model):
    """Over a dataset, the mean picture is centred on the mean target value, one pair's picture
    on that pair's."""
    clean = [CLEAN, "When Mary and John went to the store, Mary gave a drink to"]
    corrupted = [CORRUPTED, "When Mary and John went to the store, John gave a drink to"]
    result = pw.patch(toy_model, clean, corrupted, answers=[ANSWERS, (" John", " Mary")], site="resid_pre",
                      metrics="logit_diff", progress=False)
    per_pair = result.baselines["corrupted"]["logit_diff"]
    assert abs(float(per_pair[0]) - float(per_pair[1])) > 0.1
    mean = heatmap_payload(result, "logit_diff", {}, 1)
    one = heatmap_payload(result, "logit_diff", {}, 1, pair=1)
    assert mean["centre"]["value"] == pytest.approx(float(per_pair.mean()), abs=1e-6)
    assert one["centre"]["value"] == float(per_pair[1])
    colour = cell_colours(static_html(one, "t"))
    assert all(c == "#ffffff" for row in colour for c in row[:S2])


def test_logprob_is_centred_and_never_above_zero(sweep):
    scale = colours.scale("logprob", sweep.grid("logprob").flatten().tolist(),
                          colours.centre("logprob", sweep.direction, sweep.baselines))
    assert scale.kind == "diverging" and scale.mid == float(sweep.baselines["corrupted"]["logprob"].mean())
    assert max(scale.ticks()) <= 0 and scale.hi <= 0


def test_normalized_stays_centred_on_zero(sweep):
    payload = heatmap_payload(sweep, "normalized", {}, 1)
    assert payload["centre"] is None
    assert legend_of(static_html(payload, "t"))[2] == "0"
    assert sweep.figure("normalized").data[0].zmid == 0


def test_figure_puts_white_at_the_target_run(sweep):
    """The plotly figure: zmid at the corrupted run's value, the colorscale's white stop there,
    the same colours as the widget (lo and hi painted as widget_colour paints them)."""
    corrupted = float(sweep.baselines["corrupted"]["logit_diff"].mean())
    fig = sweep.figure("logit_diff").data[0]
    assert fig.zmid == corrupted
    (p0, c0), (pm, cm), (p1, c1) = fig.colorscale
    assert (p0, p1, cm) == (0, 1, "#ffffff")
    assert pm == pytest.approx((corrupted - fig.zmin) / (fig.zmax - fig.zmin))
    scale = colours.scale("logit_diff", sweep.grid("logit_diff").flatten().tolist(),
                          colours.centre("logit_diff", "denoising", sweep.baselines))
    assert (fig.zmin, fig.zmax) == (scale.lo, scale.hi)
    assert (c0, c1) == (colours.over(scale.colour(scale.lo)), colours.over(scale.colour(scale.hi)))
    assert fig.colorbar.ticktext[2].endswith("(corrupted run)")
    no_op = fig.customdata[0][0]
    assert no_op == 0, "hover: the change from the corrupted run"
