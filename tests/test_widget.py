"""Python-side tests of PatchingWidget: state, runs from code, errors, cancel, exactness,
the fast (attribution-patching) preview and the path-patching view.

The widget is driven the way the page drives it (``set_state`` for edits, custom
``{"type": "run"}`` messages for the Run button) and the way code drives it (traitlets,
``run(wait=True)``). No browser is needed; ``test_widget_browser.py`` covers the page.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

import patchwidgets
from patchwidgets.metrics import BUILTIN_METRICS
from patchwidgets.widget_jobs import sweep_metrics
from patchwidgets.widget import DEFAULT_CLEAN, DEFAULT_CORRUPTED, STATIC, PatchingWidget
from patchwidgets.errors import PatchingInputError
from patchwidgets import widget_colour
from patchwidgets.widget_contract import WIDGET_SITES
from patchwidgets.widget_jobs import parse_receivers
from patchwidgets.widget_payload import payload_estimate, payload_values, static_html, table_2d
from patchwidgets.widget_words import explain_cell

S2, END = 10, 14  # positions of the changed name and of the final token in the IOI prompts
ANSWERS = (" Mary", " John")


@pytest.fixture(scope="session")
def model():
    return patchwidgets.load_model("toy-ioi")


@pytest.fixture
def widget(model):
    w = PatchingWidget(model)
    yield w
    w.close()


def frontend_edit(w: PatchingWidget, **state) -> None:
    """Apply an edit as if it came from the page (a comm ``update`` message)."""
    w.set_state(state)


def press_run(w: PatchingWidget) -> None:
    """What the Run button sends."""
    w._handle_custom_msg({"type": "run"}, [])


# --------------------------------------------------------------------------- defaults
def test_no_argument_widget_loads_bundled_model_offline():
    w = PatchingWidget()
    try:
        assert w.model_name == "toy-ioi"
        assert w.model_info == {"n_layers": 4, "n_heads": 8}
    finally:
        w.close()


def test_defaults_prefill_answers_tokens_and_baselines(widget):
    assert widget.clean == DEFAULT_CLEAN and widget.corrupted == DEFAULT_CORRUPTED
    assert (widget.correct, widget.incorrect) == (" Mary", " John")  # the model's top predictions
    assert len(widget.tokens["clean"]) == len(widget.tokens["corrupted"]) == 15
    diff = [i for i, (a, b) in enumerate(zip(widget.tokens["clean"], widget.tokens["corrupted"])) if a != b]
    assert diff == [S2]
    assert widget.baseline["clean"] > 0 > widget.baseline["corrupted"]
    assert widget.errors == {} and widget.status == "idle"
    assert list(widget.contract["metrics"]) == list(BUILTIN_METRICS)
    assert [s for _, opts in widget.contract["sites"] for s, _ in opts] == WIDGET_SITES


def test_prefilled_answers_follow_prompts_until_typed(widget):
    widget.clean, widget.corrupted = DEFAULT_CORRUPTED, DEFAULT_CLEAN  # swap the names
    widget.wait()
    assert (widget.correct, widget.incorrect) == (" John", " Mary")
    widget.correct = " Mary"  # typed by the user: no longer follows the prompt
    widget.clean = DEFAULT_CLEAN
    widget.wait()
    assert widget.correct == " Mary" and widget.incorrect == " Mary"


# --------------------------------------------------------------------------- state round trips
def test_state_round_trip_code_and_frontend(widget):
    widget.clean = "When Lisa and Sarah went to the cinema, Lisa gave the ticket to"
    state = widget.get_state()
    assert state["clean"] == widget.clean  # what the page receives
    frontend_edit(widget, corrupted="When Lisa and Sarah went to the cinema, Sarah gave the ticket to",
                  direction="noising", metric="logit_diff", site="attn_out", auto_run=False)
    widget.wait()
    assert widget.direction == "noising" and widget.site == "attn_out" and widget.metric == "logit_diff"
    assert widget.tokens["corrupted"][10] == " Sarah"
    assert (widget.correct, widget.incorrect) == (" Sarah", " Lisa")

    press_run(widget)
    assert widget.wait(60)
    assert widget.status == "done"
    heatmap = widget.heatmap
    assert heatmap["site"] == "attn_out" and heatmap["direction"] == "noising" and heatmap["complete"]
    assert heatmap["inputs"]["clean"] == widget.clean

    # The synced state is JSON once ipywidgets has moved the bytes into binary buffers
    # (no NaN, no tensors), and a view restored from it shows the same heatmap.
    from ipywidgets.widgets.widget import _remove_buffers

    state, paths, buffers = _remove_buffers(widget.get_state())
    json.dumps(state, allow_nan=False)
    assert ["heatmap", "values"] in paths
    restored = dict(heatmap, values=bytes(buffers[paths.index(["heatmap", "values"])]))
    assert torch.equal(payload_values(restored), widget.result.grid("logit_diff"))


def test_setting_inputs_from_code_updates_view(widget):
    widget.clean = "When Mary and John went to the store, John gave a bottle of milk to"
    widget.wait()
    assert widget.tokens["clean"][-4:] == [" bottle", " of", " milk", " to"]
    assert len(widget.tokens["clean"]) == 17
    # The error sits at the prompt just edited, and says how long each is, not every token.
    assert set(widget.errors) == {"clean"}
    assert widget.errors["clean"].startswith("The clean prompt has 17 tokens and the corrupted prompt 15")
    widget.corrupted = "When Mary and John went to the store, Mary gave a drink of to"
    widget.wait()
    assert set(widget.errors) == {"corrupted"} and "has 16 tokens" in widget.errors["corrupted"]


# --------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("site,direction", [
    ("resid_pre", "denoising"), ("resid_pre", "noising"), ("head_out", "denoising"),
    ("head_v_by_pos", "denoising"), ("head_pattern_by_pos", "noising"), ("mlp_out", "noising"),
])
def test_result_equals_patch_exactly(widget, model, site, direction):
    widget.site, widget.direction = site, direction
    result = widget.run(wait=True)
    assert result is not None and widget.status == "done"
    ref = patchwidgets.patch(model, DEFAULT_CLEAN, DEFAULT_CORRUPTED, answers=(" Mary", " John"),
                             site=site, direction=direction, metrics=sweep_metrics(widget.metric))
    assert result.metrics == ref.metrics == ["logit_diff", "normalized", "logit"]
    for metric in ref.metrics:
        assert torch.equal(result.grid(metric), ref.grid(metric)), metric
    table = table_2d(ref, widget.metric)[0]
    assert torch.equal(payload_values(widget.heatmap), table)
    assert result.frame.equals(ref.frame)


def test_ioi_heatmap_pattern(widget):
    widget.run(wait=True)
    grid = widget.result.grid("normalized")
    assert grid.shape == (4, 15)
    assert int(grid[0].abs().argmax()) == S2
    assert int(grid[-1].abs().argmax()) == END


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("edit,field,words", [
    ({"corrupted": "When Mary and John went to the store, Mary gave a drink"}, "corrupted", "different token lengths"),
    ({"clean": "When Marry and John went to the store, John gave a drink to"}, "clean", "not in the"),
    ({"clean": "   "}, "clean", "empty"),
    ({"corrupted": ""}, "corrupted", "empty"),
    ({"corrupted": DEFAULT_CLEAN}, "corrupted", "identical"),
    ({"correct": " Mary John"}, "correct", "2 tokens"),
    ({"incorrect": " Jhon"}, "incorrect", "not in the"),
    ({"site": "block"}, "site", "the widget shows"),
    ({"site": "no_such_site"}, "site", "the widget shows"),
    ({"direction": "sideways"}, "direction", "direction must be"),
    ({"correct": " John", "incorrect": " John"}, "incorrect", "same token"),
])
def test_errors_surface_as_state_and_keep_last_heatmap(widget, edit, field, words):
    widget.run(wait=True)
    good = dict(widget.heatmap)
    frontend_edit(widget, **edit)
    widget.wait()
    result = widget.run(wait=True)
    assert result is None and widget.status == "error"
    assert field in widget.errors, widget.errors
    assert words in widget.errors[field]
    assert widget.heatmap["values"] == good["values"] and widget.heatmap["run_id"] == good["run_id"]
    assert widget.result is not None  # the last good result stays too


def test_degenerate_normalization_reported_for_normalized(widget):
    """A corruption that barely moves the answer: normalized is undefined, other metrics work."""
    frontend_edit(widget, corrupted=DEFAULT_CLEAN.replace("store", "park"))
    widget.wait()
    frontend_edit(widget, incorrect=" John")  # (the preview filled in the park prompt's prediction)
    widget.wait()
    assert widget.run(wait=True) is None
    assert "cannot normalise" in widget.errors["corrupted"]
    widget.metric = "accuracy"
    result = widget.run(wait=True)
    assert result is not None and "normalized" not in result.metrics
    widget.metric = "normalized"
    assert "not available" in widget.errors["metric"]


@pytest.mark.parametrize("metric", ["normalized", "logit_diff", "prob"])
def test_identical_answers_error_before_run_on_the_answer(widget, metric):
    """correct == incorrect: an error at the incorrect answer as soon as it is typed (before
    Run), the same for every metric, and never an all-zero heatmap marked done."""
    widget.metric = metric
    widget.run(wait=True)
    good = dict(widget.heatmap)
    frontend_edit(widget, incorrect=" Mary")  # the correct answer is ' Mary' too
    widget.wait()
    assert set(widget.errors) == {"incorrect"} and "same token" in widget.errors["incorrect"]
    press_run(widget)
    assert widget.wait(60) and widget.status == "error"
    assert set(widget.errors) == {"incorrect"}
    assert widget.heatmap == good


def test_internal_error_never_escapes(widget, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("kaboom")
    monkeypatch.setattr("patchwidgets.widget_jobs.patch", boom)
    assert widget.run(wait=True) is None
    assert widget.status == "error" and "kaboom" in widget.errors["general"]


# --------------------------------------------------------------------------- streaming, cancel
@pytest.mark.parametrize("fast_preview", [True, False])
def test_streams_partial_heatmaps(widget, fast_preview):
    widget.fast_preview = fast_preview
    widget.max_batch_tokens = 64  # a toy sweep fits one pass at the default budget
    seen = []
    widget.observe(lambda ch: seen.append(ch["new"]), names="heatmap")
    widget.run(wait=True)
    partial = [p for p in seen if not p["complete"] and torch.isfinite(payload_values(p)).any()]
    assert partial, "the first chunk is pushed before the sweep ends"
    assert all(("estimate" in p) == fast_preview for p in seen)
    values = payload_values(partial[0])
    assert torch.isnan(values).any() and torch.isfinite(values).any()
    assert seen[-1]["complete"] and not torch.isnan(payload_values(seen[-1])).any()


def _cancel_after_first_chunk(widget):
    """Make the widget cancel its sweep as soon as the first chunk has landed (with a budget
    small enough that the sweep takes several chunks)."""
    widget.max_batch_tokens = 64
    def cancel(change):
        done, total = change["new"]
        if 0 < done < total:
            widget.cancel()
    widget.observe(cancel, names="progress")
    return cancel


def test_cancel_mid_sweep(widget):
    widget.site = "head_out_by_pos"
    canceller = _cancel_after_first_chunk(widget)
    assert widget.run(wait=True) is None
    widget.unobserve(canceller, names="progress")
    assert widget.status == "cancelled"
    assert widget.result is not None and not widget.result.complete
    values = payload_values(widget.heatmap)
    assert torch.isnan(values).any() and torch.isfinite(values).any()
    assert not widget.heatmap["complete"]
    # A cancelled widget runs again normally.
    assert widget.run(wait=True) is not None and widget.status == "done"


def test_run_does_not_block_and_cancel_button(widget):
    widget.site = "head_pattern_by_pos"
    assert widget.run() is None  # returns at once; the sweep runs on the job thread
    widget._handle_custom_msg({"type": "cancel"}, [])
    assert widget.wait(60)
    assert widget.status in ("cancelled", "done")


def test_auto_run_debounces_edits(widget):
    completed = []
    widget.observe(lambda ch: completed.append(ch["new"]["run_id"]) if ch["new"].get("complete") else None,
                   names="heatmap")
    widget.auto_run_delay = 0.2
    widget.auto_run = True  # switching it on runs once, so the heatmap matches the inputs
    assert widget.wait(60) and widget.status == "done"
    first = len(set(completed))
    widget.direction = "noising"  # a burst of edits ...
    widget.site = "attn_out"
    widget.direction = "denoising"
    assert widget.wait(60)  # ... gives one sweep, after the last edit
    assert len(set(completed)) == first + 1
    assert widget.heatmap["inputs"]["site"] == "attn_out"
    assert widget.heatmap["inputs"]["direction"] == "denoising"


# --------------------------------------------------------------------------- views of the result
def test_metric_switch_redraws_without_rerun(widget):
    widget.run(wait=True)
    run_id = widget.heatmap["run_id"]
    widget.metric = "logit_diff"
    assert widget.heatmap["metric"] == "logit_diff" and widget.heatmap["run_id"] == run_id
    assert torch.equal(payload_values(widget.heatmap), widget.result.grid("logit_diff"))
    assert widget.heatmap["baselines"]["clean"] == pytest.approx(widget.baseline["clean"], abs=1e-4)


def test_select_cell_explains_and_head_cell_shows_pattern(widget):
    widget.run(wait=True)
    text = widget.select(layer=0, pos=S2)
    value = float(widget.result.grid("normalized")[0, S2])
    assert f"restores {value:.0%} of the clean logit difference" in text
    assert "' John' (position 10)" in text

    widget.site = "head_out"
    widget.run(wait=True)
    text = widget.select(layer=3, head=1)
    assert "head 3.1" in text
    widget.wait()
    assert (widget.pattern_layer, widget.pattern_head) == (3, 1)
    pattern = widget.pattern
    assert pattern["layer"] == 3 and pattern["head"] == 1
    for name in ("clean", "corrupted"):
        view = pattern[name]
        weights = torch.frombuffer(bytearray(view["values"]), dtype=torch.float32).reshape(view["n"], view["n"])
        assert view["n"] == 15 and torch.allclose(weights.sum(-1), torch.ones(15), atol=1e-4)
        assert torch.equal(weights.triu(1), torch.zeros(15, 15))  # causal
    # The pattern matches a plain run of the model.
    _, cache = widget.model.run_with_cache(widget.model.to_tokens(DEFAULT_CLEAN))
    expected = cache["blocks.3.attn.hook_pattern"][0, 1]
    got = torch.frombuffer(bytearray(pattern["clean"]["values"]), dtype=torch.float32).reshape(15, 15)
    assert torch.allclose(got, expected.float(), atol=1e-6)


def test_noising_explanation(widget):
    widget.direction = "noising"
    widget.run(wait=True)
    assert "destroys" in widget.select(layer=3, pos=END)


def test_figure(widget):
    with pytest.raises(RuntimeError, match="run"):
        widget.figure()
    widget.run(wait=True)
    fig = widget.figure()
    assert fig.data[0].z.shape == (4, 15)
    assert widget.figure("kl").layout.title.text.endswith("kl")


# --------------------------------------------------------------------------- fast preview
def record_heatmaps(w: PatchingWidget) -> list[dict]:
    seen: list[dict] = []
    w.observe(lambda ch: seen.append(ch["new"]), names="heatmap")
    return seen


@pytest.mark.parametrize("site,direction,metric", [
    ("resid_pre", "denoising", "normalized"), ("head_out", "noising", "logit_diff"),
    ("head_q_by_pos", "denoising", "logprob"), ("mlp_out", "denoising", "kl"),
])
def test_fast_preview_paints_estimate_then_exact(widget, model, site, direction, metric):
    widget.site, widget.direction, widget.metric = site, direction, metric
    assert widget.fast_preview  # on by default
    seen = record_heatmaps(widget)
    result = widget.run(wait=True)
    assert result is not None and widget.status == "done" and widget.errors == {}

    # The first picture of the run is the estimate alone: no exact value yet.
    first = seen[0]
    assert first["done"] == 0 and not first["complete"]
    assert torch.isnan(payload_values(first)).all()
    estimate = patchwidgets.attribution_patch(model, DEFAULT_CLEAN, DEFAULT_CORRUPTED, answers=ANSWERS,
                                              site=site, direction=direction, metrics=[metric])
    expected = table_2d(estimate, metric)[0]
    assert torch.allclose(payload_estimate(first), expected, atol=1e-5, rtol=1e-4)
    assert first["rows"] == table_2d(estimate, metric)[1]

    # Exact values come later and replace the estimate; the final grid is patch()'s.
    exact_at = next(i for i, p in enumerate(seen) if torch.isfinite(payload_values(p)).any())
    assert exact_at > 0
    assert all("estimate" in p for p in seen), "every picture of the run carries the estimate"
    final = seen[-1]
    assert final["complete"] and final["run_id"] == first["run_id"]
    ref = patchwidgets.patch(model, DEFAULT_CLEAN, DEFAULT_CORRUPTED, answers=ANSWERS, site=site,
                             direction=direction, metrics=sweep_metrics(metric))
    assert torch.equal(payload_values(final), table_2d(ref, metric)[0])
    for m in ref.metrics:
        assert torch.equal(result.grid(m), ref.grid(m)), m


def test_fast_preview_explains_approximate_cells(widget):
    seen = record_heatmaps(widget)
    widget.run(wait=True)
    first = seen[0]
    text = explain_cell(first, 0, S2, ANSWERS)
    assert "not computed exactly yet" in text and "Attribution patching estimates" in text
    assert "clean logit difference" in text
    # Once exact, the words are the exact ones.
    assert "estimates" not in widget.select(layer=0, pos=S2)


@pytest.mark.parametrize("metric", ["rank", "accuracy"])
def test_fast_preview_skipped_silently_for_discrete_metrics(widget, metric):
    widget.metric = metric
    seen = record_heatmaps(widget)
    assert widget.run(wait=True) is not None
    assert widget.errors == {} and widget.status == "done"
    assert seen and not any("estimate" in p for p in seen)
    assert "gradient" in widget.preview_skipped


def test_fast_preview_failure_is_silent(widget, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("no estimate today")
    monkeypatch.setattr("patchwidgets.widget_jobs.attribution_patch", boom)
    seen = record_heatmaps(widget)
    assert widget.run(wait=True) is not None and widget.errors == {}
    assert not any("estimate" in p for p in seen)
    assert "no estimate today" in widget.preview_skipped


def test_estimate_taken_back_when_exact_sweep_rejects_inputs(widget, monkeypatch):
    widget.run(wait=True)
    monkeypatch.setattr("patchwidgets.widget_jobs.PREVIEW_PAYS_S", 0.0)  # (an estimate on every Run)
    good = dict(widget.heatmap)

    def reject(*args, **kwargs):
        raise PatchingInputError("rejected by the exact sweep", "site")
    monkeypatch.setattr("patchwidgets.widget_jobs.patch", reject)
    seen = record_heatmaps(widget)
    assert widget.run(wait=True) is None and widget.status == "error"
    assert "estimate" in seen[0], "the estimate was shown first ..."
    assert widget.heatmap == good, "... and the last good heatmap is back after the error"
    assert widget.errors["site"] == "rejected by the exact sweep"


def test_cancel_leaves_estimates_on_unreached_cells(widget):
    widget.site = "head_out_by_pos"
    canceller = _cancel_after_first_chunk(widget)
    assert widget.run(wait=True) is None and widget.status == "cancelled"
    widget.unobserve(canceller, names="progress")
    exact, guess = payload_values(widget.heatmap), payload_estimate(widget.heatmap)
    missing = torch.isnan(exact)
    assert missing.any() and torch.isfinite(guess[missing]).all()
    row, col = (int(i) for i in missing.nonzero()[0])
    assert "Attribution patching estimates" in widget.select(row, col)


def test_step_delay_slows_each_stage(widget):
    progress = []
    widget.observe(lambda ch: progress.append(tuple(ch["new"])), names="progress")
    widget.step_delay = 0.15  # a pause after the estimate and after each exact chunk
    widget.max_batch_tokens = 64  # several chunks
    widget.run(wait=True)
    stages = len({p for p in progress if p[1]})  # (0, n) after the estimate, then one per chunk
    assert stages >= 3 and widget.elapsed >= 0.15 * stages - 0.01


# --------------------------------------------------------------------------- path patching view
def test_parse_receivers():
    assert parse_receivers("", 4, 8) is None and parse_receivers(" Logits ", 4, 8) is None
    assert parse_receivers("3.1, L3H5 2:0 3.1", 4, 8) == [(3, 1), (3, 5), (2, 0)]
    with pytest.raises(ValueError, match="no head 4.0"):
        parse_receivers("4.0", 4, 8)
    with pytest.raises(ValueError, match="could not read 'x'"):
        parse_receivers("3.1, x", 4, 8)


@pytest.mark.parametrize("receivers,receiver_input,heads,direction", [
    ("", "q", None, "denoising"), ("logits", "k", None, "noising"),
    ("3.1, L3H5", "k", [(3, 1), (3, 5)], "denoising"), ("2.3", "qkv", [(2, 3)], "noising"),
])
def test_path_view_equals_path_patch(widget, model, receivers, receiver_input, heads, direction):
    seen = record_heatmaps(widget)
    # As the page does it: the edited fields travel with the Run message.
    widget._handle_custom_msg({"type": "run", "state": {
        "site": "path", "receivers": receivers, "receiver_input": receiver_input, "direction": direction}}, [])
    assert widget.wait(60) and widget.status == "done" and widget.errors == {}
    ref = patchwidgets.path_patch(model, DEFAULT_CLEAN, DEFAULT_CORRUPTED, answers=ANSWERS, receivers=heads,
                                  receiver_input=receiver_input, direction=direction,
                                  metrics=sweep_metrics(widget.metric))
    for m in ref.metrics:
        assert torch.equal(widget.result.grid(m), ref.grid(m)), m
    hm = widget.heatmap
    assert hm["site"] == "path" and hm["complete"] and (hm["row_title"], hm["col_title"]) == ("sender layer", "sender head")
    assert hm["path"]["receivers"] == (None if heads is None else [list(h) for h in heads])
    assert (len(hm["rows"]), len(hm["cols"])) == (4, 8)
    assert torch.equal(payload_values(hm), ref.grid("normalized"))
    assert not any("estimate" in p for p in seen), "attribution patching has no path estimate"
    text = widget.select(layer=0, head=1)
    assert text.startswith("Patching the output of head 0.1 (only along its ")
    if heads is None:
        assert "direct path to the logits; every later head frozen)" in text
    else:
        inputs = {"k": "keys", "qkv": "queries, keys and values"}[receiver_input]
        names = ", ".join(f"{l}.{h}" for l, h in heads)
        assert f"into the {inputs} of head{'s' if len(heads) > 1 else ''} {names})" in text
    assert "path: senders -&gt;" in static_html(hm, "t")


@pytest.mark.parametrize("receivers,words", [
    ("9.1", "no head 9.1"), ("3.x", "could not read '3.x'"), ("1.8", "no head 1.8"),
])
def test_path_receiver_errors_in_place(widget, receivers, words):
    widget.site = "head_out"
    widget.run(wait=True)
    good = dict(widget.heatmap)
    widget.receivers = receivers  # not checked while another component is chosen
    assert "receivers" not in widget.errors
    widget.site = "path"
    assert words in widget.errors["receivers"], "checked as soon as the path view is chosen"
    assert widget.run(wait=True) is None and widget.status == "error"
    assert words in widget.errors["receivers"]
    assert widget.heatmap == good
    widget.receivers = "3.1"
    assert "receivers" not in widget.errors
    widget.receiver_input = "qx"
    assert widget.run(wait=True) is None
    assert "receiver_input must be" in widget.errors["receiver_input"]
    widget.receiver_input = "v"
    assert widget.run(wait=True) is not None and widget.errors == {}


# --------------------------------------------------------------------------- representations
def test_repr_is_deterministic(model):
    a, b = PatchingWidget(model), PatchingWidget(model)
    try:
        assert repr(a) == repr(b)
        assert not re.search(r"0x[0-9a-f]+", repr(a))
        a.run(wait=True)
        b.run(wait=True)
        html_a = a._repr_mimebundle_()[0]["text/html"]
        assert html_a == b._repr_mimebundle_()[0]["text/html"]
        assert html_a.count("<td") == 4 * 15 and "> John</th>" in html_a
        data, _ = a._repr_mimebundle_()
        assert "application/vnd.jupyter.widget-view+json" in data and data["text/plain"] == repr(a)
    finally:
        a.close()
        b.close()


def test_static_html_escapes_tokens():
    payload = {
        "run_id": 1, "site": "resid_pre", "metric": "logit_diff", "direction": "denoising",
        "rows": [{"layer": 0, "label": "0"}],
        "cols": [{"pos": 0, "label": "<img src=x onerror=alert(1)>", "token": "<img>"}],
        "row_title": "layer", "col_title": "position", "done": 1, "total": 1, "complete": True,
        "values": torch.tensor([0.5]).numpy().astype("<f4").tobytes(), "baselines": {}, "inputs": {},
    }
    html = static_html(payload, "<b>title</b>")
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "&lt;b&gt;title" in html
    assert "No heatmap yet" in static_html({}, "t")


def test_front_end_files_follow_anywidget_conventions():
    js = (STATIC / "widget.js").read_text()
    assert "export default { render }" in js
    assert ".innerHTML" not in js and "insertAdjacentHTML" not in js  # data only via textContent
    assert "http://" not in js.replace("http://www.w3.org/2000/svg", "") and "https://" not in js
    assert (STATIC / "widget.css").read_text().strip()


# --------------------------------------------------------------------------- defects of issue 12
class RecordingComm:
    """The comm's transport, recorded: what the widget sends to the page (custom messages)."""

    def __init__(self, widget: PatchingWidget):
        self.sent: list[dict] = []
        original = widget.comm.publish_msg

        def publish(msg_type, data=None, metadata=None, buffers=None, **keys):
            self.sent.append(data or {})
            return original(msg_type, data=data, metadata=metadata, buffers=buffers, **keys)
        widget.comm.publish_msg = publish

    def custom(self) -> list[dict]:
        return [m["content"] for m in self.sent if m.get("method") == "custom"]


def test_metric_typo_from_code_is_refused(widget):
    """``w.metric = 'logitdiff'`` raises at once (with the likely name), so no sweep runs
    with a metric nobody can see and the heatmap always matches ``w.result``."""
    widget.clean, widget.corrupted = DEFAULT_CORRUPTED, DEFAULT_CLEAN
    with pytest.raises(Exception, match="unknown metric 'logitdiff'. Did you mean 'logit_diff'"):
        widget.metric = "logitdiff"
    assert widget.metric == "normalized"
    widget.metric = "normalised"  # an alias of the core is its name
    assert widget.metric == "normalized"
    result = widget.run(wait=True)
    assert result is not None and widget.status == "done"
    assert widget.heatmap["inputs"]["clean"] == DEFAULT_CORRUPTED
    assert torch.equal(payload_values(widget.heatmap), table_2d(result, "normalized")[0])


@pytest.mark.parametrize("fast_preview", [True, False])
def test_cancel_right_after_run_is_honest(widget, fast_preview):
    """Cancel as the sweep starts: every picture counts what it holds (the no-op cells are
    exact from the start), none is "complete", and the words no longer promise exact values."""
    widget.fast_preview = fast_preview
    widget.max_batch_tokens = 64
    seen = record_heatmaps(widget)

    def cancel_at_once(change):
        if change["new"].get("run_id", 0) > 0 and not change["new"]["complete"]:
            widget.cancel()
    widget.observe(cancel_at_once, names="heatmap")
    widget.run()
    widget.wait(60)
    widget.unobserve(cancel_at_once, names="heatmap")
    assert widget.status == "cancelled" and seen
    for payload in seen:
        exact = int(torch.isfinite(payload_values(payload)).sum())
        assert payload["done"] == exact and payload["total"] == 60, (payload["done"], exact)
        assert not payload["complete"]
    last = widget.heatmap
    assert last["state"] == "cancelled" and last["done"] < 60
    assert widget.progress == [last["done"], last["total"]]
    row, col = (int(i) for i in torch.isnan(payload_values(last)).nonzero()[0])
    text = widget.select(row, col)
    assert "cancelled before reaching this cell" in text and "replaced by the exact value" not in text


def test_cancel_mid_sweep_counts_exact_cells(widget):
    widget.site = "head_out_by_pos"
    canceller = _cancel_after_first_chunk(widget)
    widget.run(wait=True)
    widget.unobserve(canceller, names="progress")
    hm = widget.heatmap
    assert hm["state"] == "cancelled" and not hm["complete"]
    assert hm["done"] == int(torch.isfinite(payload_values(hm)).sum()) < hm["total"] == 4 * 8 * 15
    assert widget.progress == [hm["done"], hm["total"]]


def test_typed_answer_is_kept_even_when_it_equals_the_prediction(widget):
    assert widget.correct == " Mary"  # the model's prediction, pre-filled
    frontend_edit(widget, correct=" John")
    frontend_edit(widget, correct=" Mary")  # typed back: the user's answer now
    widget.wait()
    frontend_edit(widget, clean=DEFAULT_CORRUPTED, corrupted=DEFAULT_CLEAN)
    widget.wait()
    assert widget.correct == " Mary", "a typed answer never follows the prediction"
    assert widget.incorrect == " Mary", "an untyped one does"
    frontend_edit(widget, correct="")  # cleared: follows the prediction again
    widget.wait()
    assert widget.correct == " John"


def test_empty_prompt_same_message_before_and_after_run(widget):
    frontend_edit(widget, clean="  ")
    widget.wait()
    before = widget.errors["clean"]
    press_run(widget)
    widget.wait(60)
    assert widget.status == "error" and widget.errors["clean"] == before


def test_selection_does_not_carry_over_to_another_component(widget):
    widget.run(wait=True)
    widget.select(layer=0, pos=S2)
    assert widget.explanation
    widget.site = "head_out"
    widget.run(wait=True)
    assert widget.selected == {} and widget.explanation == ""
    widget.select(layer=1, head=2)
    widget.direction = "noising"  # same component and layout: the selection stays
    widget.run(wait=True)
    assert widget.selected == {"row": 1, "col": 2} and "head 1.2" in widget.explanation


def test_bad_input_mid_run_keeps_last_complete_heatmap(widget):
    widget.run(wait=True)
    good, good_result = dict(widget.heatmap), widget.result
    widget.site, widget.max_batch_tokens, widget.step_delay = "head_out_by_pos", 64, 0.3
    seen = record_heatmaps(widget)
    widget.run()
    deadline = time.monotonic() + 60
    while not any(p["run_id"] > good["run_id"] for p in seen) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert any(p["run_id"] > good["run_id"] for p in seen), "the new sweep took the screen"
    frontend_edit(widget, corrupted="When Mary and John went to the store")  # too short
    press_run(widget)
    assert widget.wait(60) and widget.status == "error" and "corrupted" in widget.errors
    assert widget.heatmap == good and widget.result is good_result


def test_page_learns_whether_a_python_widget_is_behind_it(widget):
    """The page says "hello" when it renders and sends its Run clicks; a live widget answers
    both (a view restored from a saved notebook gets no answer and says so)."""
    comm = RecordingComm(widget)
    widget._handle_custom_msg({"type": "hello"}, [])
    press_run(widget)
    widget.wait(60)
    replies = comm.custom()
    assert replies[0] == {"type": "hello"}
    assert replies[1] == {"type": "ack", "run_id": widget.heatmap["run_id"]}


def test_pushes_from_two_threads_never_mix(widget):
    """Metric switches redraw on the kernel thread while the job thread streams: every picture
    holds one sweep's values, with counts from the same instant."""
    widget.site, widget.max_batch_tokens, widget.fast_preview = "head_out_by_pos", 64, False
    seen = record_heatmaps(widget)
    widget.run()
    for i in range(400):
        if widget._jobs.idle():
            break
        widget.metric = ("logit_diff", "normalized")[i % 2]
        time.sleep(0.002)
    widget.wait(60)
    final = widget.result
    assert len(seen) > 2
    for payload in seen:
        values = payload_values(payload)
        exact = torch.isfinite(values)
        assert payload["done"] == int(exact.sum())
        ref = table_2d(final, payload["metric"])[0]
        assert torch.equal(values[exact], ref[exact]), "a value from another job or metric"


# --------------------------------------------------------------------------- colours (shared with JS)
SHARED = json.loads((Path(__file__).parent / "shared" / "widget_cases.json").read_text())


def test_shared_cases_number_format():
    for value, digits, text in SHARED["fmt"]:
        assert widget_colour.fmt(value, digits) == text, (value, digits)


def test_shared_cases_colour_scales():
    for case in SHARED["domain"]:
        values = [v for v in case["values"] if v is not None]
        assert list(widget_colour.domain(case["metric"], values)) == case["domain"], case
    for case in SHARED["colour"]:
        assert widget_colour.scale_kind(case["metric"]) == case["kind"]
        got = widget_colour.colour(case["value"], *case["domain"], case["kind"])
        assert (None if got is None else list(got)) == case["rgba"], case
    for case in SHARED["over"]:
        assert widget_colour.over(None if case["rgba"] is None else tuple(case["rgba"])) == case["hex"]
    for case in SHARED["ticks"]:
        assert widget_colour.ticks(*case["domain"]) == case["ticks"]


def test_shared_cases_receivers():
    for case in SHARED["receivers"]:
        heads = parse_receivers(case["text"], 4, 8)
        assert ([] if heads is None else [list(h) for h in heads]) == case["heads"], case


@pytest.mark.parametrize("metric,kind", [("normalized", "diverging"), ("logit_diff", "diverging"),
                                         ("prob", "sequential"), ("rank", "sequential"),
                                         ("kl", "sequential"), ("accuracy", "sequential")])
def test_scale_follows_the_metric_registry(metric, kind):
    """Non-negative metrics get a one-hue scale over their own range (no unused negative
    half); signed ones a symmetric red-blue one."""
    from patchwidgets.metrics import METRICS

    assert widget_colour.scale_kind(metric) == METRICS[metric].scale == kind
    if metric == "rank":
        lo, hi = widget_colour.domain("rank", [1.0, 3.0, 12.0])
        assert (lo, hi) == (1.0, 12.0)
        assert widget_colour.colour(1.0, lo, hi, kind)[3] == 0  # best rank: the background
        assert "worse" in widget_colour.legend_words("rank")
    assert len(widget_colour.ticks(*widget_colour.domain(metric, [0.5]))) >= 5


def test_export_copy_follows_the_last_heatmap(widget):
    """The static copy shown by exported notebooks is redrawn once a sweep ends (never a
    partial one), legend included."""
    class Handle:  # IPython's DisplayHandle, recorded
        def __init__(self):
            self.updates = []

        def update(self, obj, raw=False):
            self.updates.append(obj)
    handle = widget._export_handle = Handle()
    widget._export_key = widget._export_state()
    assert "No heatmap yet" in widget.export_html()
    widget.run(wait=True)
    html = handle.updates[-1]["text/html"]
    assert 'class="pw-static-export"' in html and html.count("<td") == 60 and 'data-legend="diverging"' in html
    n = len(handle.updates)
    widget.wait()
    assert len(handle.updates) == n, "redrawn only when the picture changed"
    widget.metric = "rank"
    widget.wait()
    assert 'data-legend="sequential"' in handle.updates[-1]["text/html"]


# --------------------------------------------------------------------------- datasets (§5)
IOI_PAIRS = [
    (DEFAULT_CLEAN, DEFAULT_CORRUPTED, " Mary", " John"),
    (DEFAULT_CORRUPTED, DEFAULT_CLEAN, " John", " Mary"),
    ("When Lisa and Sarah went to the cinema, Lisa gave the ticket to",
     "When Lisa and Sarah went to the cinema, Sarah gave the ticket to", " Sarah", " Lisa"),
]


def test_dataset_mean_standard_error_and_one_pair(model):
    w = PatchingWidget(model, dataset=IOI_PAIRS)
    try:
        assert (w.clean, w.correct) == (DEFAULT_CLEAN, " Mary"), "the fields show the first pair"
        result = w.run(wait=True)
        assert result is not None and result.n_pairs == 3
        ref = patchwidgets.patch(model, [p[0] for p in IOI_PAIRS], [p[1] for p in IOI_PAIRS],
                                 answers=[(p[2], p[3]) for p in IOI_PAIRS], metrics=sweep_metrics(w.metric))
        hm = w.heatmap
        assert hm["n_pairs"] == 3 and hm["pair"] == -1
        assert torch.allclose(payload_values(hm), ref.grid("normalized"), atol=1e-6), "the heatmap is the mean"
        per = ref.grid("normalized", per_pair=True)
        se = payload_values({**hm, "values": hm["se"]})
        assert torch.allclose(se, per.std(-1) / 3 ** 0.5, atol=1e-6)
        text = w.select(layer=0, pos=S2)
        assert f"mean over 3 prompt pairs; standard error {widget_colour.fmt(float(se[0, S2]))}" in text
        w.pair = 2  # one pair's own heatmap and tokens
        hm = w.heatmap
        assert hm["pair"] == 2 and torch.allclose(payload_values(hm), per[..., 2], atol=1e-6)
        assert hm["cols"][10]["token"] == " Lisa" and "se" not in hm
        assert "pair 2 of 3 alone" in w.select(layer=0, pos=S2)
    finally:
        w.close()


# --------------------------------------------------------------------------- the contract with the page
# patchwidgets/widget_contract.py is the one place that says what the page and Python agree on;
# js/contract.test.js checks the page against the same file.
import anywidget  # noqa: E402

from patchwidgets import widget_contract as contract  # noqa: E402
from patchwidgets.metrics import METRICS  # noqa: E402

SHARED_CONTRACT = Path(__file__).parent / "shared" / "widget_contract.json"


def test_shared_contract_file_is_what_the_widget_sends(widget):
    """The page's fake model (js/fake_model.js) starts from tests/shared/widget_contract.json:
    it must be the contract the widget sends over the wire and the traitlets' defaults."""
    assert SHARED_CONTRACT.read_text(encoding="utf-8") == contract.shared_json(PatchingWidget.default_state()), (
        "tests/shared/widget_contract.json is out of date: run python scripts/write_widget_contract.py")
    shared = json.loads(SHARED_CONTRACT.read_text(encoding="utf-8"))
    sent = json.loads(json.dumps(widget.get_state()["contract"]))  # as the page receives it
    assert sent == shared["contract"]
    assert list(sent["metrics"]) == list(BUILTIN_METRICS), "the menu's order"
    fresh = widget.get_state()
    from_the_model = {"tokens", "baseline", "model_name", "model_info", "correct", "incorrect", "pattern"}
    for name, value in shared["defaults"].items():
        if name not in from_the_model:
            assert json.loads(json.dumps(fresh[name])) == value, name


def test_every_synced_traitlet_is_in_the_contract():
    """A synced traitlet the contract does not list fails here: the page may set it
    (``PAGE_FIELDS``) or only Python sets it (``SHOWN_FIELDS``), never both, never neither."""
    synced = set(PatchingWidget.class_traits(sync=True)) - set(anywidget.AnyWidget.class_traits(sync=True))
    page, shown = set(contract.PAGE_FIELDS), set(contract.SHOWN_FIELDS)
    assert not page & shown
    assert synced == page | shown, (f"not in the contract: {sorted(synced - page - shown)}; "
                                    f"in the contract but no synced traitlet: {sorted((page | shown) - synced)}")
    assert len(contract.PAGE_FIELDS) == len(page) and len(contract.SHOWN_FIELDS) == len(shown)
    assert set(contract.SWEEP_FIELDS) | set(contract.RUN_FIELDS) <= page
    assert set(contract.PATH_FIELDS) <= set(contract.CONTROL_FIELDS) <= set(contract.SWEEP_FIELDS)
    assert set(contract.STATIC_FIELDS) <= shown
    # The metrics' words and scales come from the registry, one source for Python and the page.
    assert {name: (m["label"], m["scale"], m["high_means"]) for name, m in contract.CONTRACT["metrics"].items()} == {
        name: (m.label, m.scale, m.high_means) for name, m in METRICS.items()}
    assert contract.CONTRACT["metrics"]["prob"]["lo"] == 0.0 and contract.CONTRACT["metrics"]["rank"]["lo"] == 1.0
    assert [v for v, _ in contract.RECEIVER_INPUTS] == ["q", "k", "v", "kv", "qkv"]


def test_sweep_reads_and_payload_records_exactly_the_sweep_fields(widget):
    assert widget.sweep_inputs().keys() == set(contract.SWEEP_FIELDS)
    widget.run(wait=True)
    assert list(widget.heatmap["inputs"]) == list(contract.SWEEP_FIELDS)


#: A new value for each run field, all valid together (a path sweep into head 3.1's keys; the circuit
#: view's method and k go with it, for when the circuit component is chosen).
RUN_VALUES = {"clean": DEFAULT_CORRUPTED, "corrupted": DEFAULT_CLEAN, "correct": " John", "incorrect": " Mary",
              "direction": "noising", "site": "path", "receivers": "3.1", "receiver_input": "k", "metric": "logit_diff",
              "circuit_method": "eap", "circuit_k": 7, "dataset": [list(p) for p in IOI_PAIRS[:2]]}


def test_a_run_carries_every_field_a_job_reads():
    """A custom message overtakes a state update that the page's widget manager holds back while
    the kernel is busy: a field a sweep or the circuit view reads but a Run cannot carry (as the
    dataset once was) makes a Run clicked right after its edit sweep the old value."""
    assert set(contract.SWEEP_FIELDS) | set(contract.CIRCUIT_FIELDS) <= set(contract.RUN_FIELDS)


def test_run_message_sets_exactly_the_run_fields(widget):
    """The Run button's message carries the edited run fields (``RUN_FIELDS``): each is applied
    before the sweep; any other field in it is ignored (the page saves those through the model)."""
    assert set(RUN_VALUES) == set(contract.RUN_FIELDS), "give each run field a value here"
    others = {"fast_preview": False, "pattern_layer": 2, "auto_run": True, "pair": 1}
    before = {name: getattr(widget, name) for name in others}
    widget._handle_custom_msg({"type": "run", "state": {**RUN_VALUES, **others}}, [])
    assert widget.wait(60) and widget.status == "done", widget.errors
    assert {name: getattr(widget, name) for name in RUN_VALUES} == RUN_VALUES
    assert {name: getattr(widget, name) for name in others} == before
    inputs = widget.heatmap["inputs"]
    assert {k: inputs[k] for k in contract.SWEEP_FIELDS if k in RUN_VALUES} == {
        k: v for k, v in RUN_VALUES.items() if k in contract.SWEEP_FIELDS}
    assert widget.heatmap["path"]["receivers"] == [[3, 1]] and widget.heatmap["metric"] == "logit_diff"
    assert widget.heatmap["n_pairs"] == 2, "the sweep ran on the dataset the message carried"


def test_run_message_refuses_values_its_traitlets_refuse(widget):
    """A value of the wrong type (or an unknown metric) in a Run message is left out, as the
    same value in a state update would be refused; the Run still happens."""
    widget._handle_custom_msg({"type": "run", "state": {"clean": 5, "metric": "logitdiff", "direction": "noising"}}, [])
    assert widget.wait(60) and widget.status == "done"
    assert (widget.clean, widget.metric, widget.direction) == (DEFAULT_CLEAN, "normalized", "noising")


def test_heatmap_payload_keys_are_the_contracts(model):
    """Every payload the widget sends has the contract's keys (``HEATMAP_KEYS``) and only
    optional ones besides, and each optional key occurs: a key the page's typedef would lack
    (js/contract.test.js checks the typedef against the same lists) cannot appear unnoticed."""
    required, optional = set(contract.HEATMAP_KEYS), set(contract.HEATMAP_OPTIONAL_KEYS)
    seen: set[str] = set()
    w = PatchingWidget(model, dataset=IOI_PAIRS[:2])
    try:
        payloads = []
        w.run(wait=True)                   # a dataset's mean, with the fast preview's estimate
        payloads.append(w.heatmap)
        w.pair = 1                         # one pair
        payloads.append(w.heatmap)
        w.dataset, w.site, w.receivers = [], "path", "logits"
        w.run(wait=True)                   # the path view
        payloads.append(w.heatmap)
    finally:
        w.close()
    for payload in payloads:
        keys = set(payload)
        assert required <= keys, sorted(required - keys)
        assert keys <= required | optional, sorted(keys - required - optional)
        seen |= keys
    assert optional <= seen, f"optional keys no payload has: {sorted(optional - seen)}"


# --------------------------------------------------------------------------- what a sweep computes (issue 19 §4)
def test_a_sweep_computes_the_metric_on_screen_and_the_rest_on_demand(widget, model):
    """The answer-column metrics come together (one unembedding of two columns); a metric that
    needs the whole vocabulary is computed when asked for, equal to patch()'s."""
    assert sweep_metrics("normalized") == ["logit_diff", "normalized", "logit"]
    assert sweep_metrics("kl") == list(BUILTIN_METRICS)
    first = widget.run(wait=True)
    assert first.metrics == ["logit_diff", "normalized", "logit"]
    run_id = widget.heatmap["run_id"]
    widget.metric = "kl"          # not computed yet: a sweep for it starts by itself
    assert widget.wait(60) and widget.status == "done"
    assert widget.heatmap["metric"] == "kl" and widget.heatmap["run_id"] > run_id
    ref = patchwidgets.patch(model, DEFAULT_CLEAN, DEFAULT_CORRUPTED, answers=ANSWERS, metrics=list(BUILTIN_METRICS))
    assert torch.equal(payload_values(widget.heatmap), table_2d(ref, "kl")[0])
    assert set(widget.result.metrics) == set(BUILTIN_METRICS)
    kl_run = widget.heatmap["run_id"]
    widget.metric = "logit_diff"  # now on hand: redrawn from the same sweep
    assert widget.wait(10) and widget.heatmap["metric"] == "logit_diff" and widget.heatmap["run_id"] == kl_run


def test_no_estimate_first_when_the_exact_sweep_was_fast(widget):
    widget.run(wait=True)                      # the first sweep of a site: estimate first
    assert widget.sweeps.preview_skipped == ""
    seen = record_heatmaps(widget)
    widget.run(wait=True)                      # toy-ioi's exact sweep takes well under a second
    assert "under 1 s" in widget.sweeps.preview_skipped
    assert all("estimate" not in p for p in seen), "no estimate painted before the exact values"
    widget.step_delay = 0.01                   # slow motion always shows the estimate
    seen.clear()
    widget.run(wait=True)
    assert widget.sweeps.preview_skipped == "" and "estimate" in seen[0]
