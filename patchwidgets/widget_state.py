"""Helpers behind :class:`patchwidgets.widget.PatchingWidget` that need no widget.

The widget keeps all of its state in synced traitlets (plain JSON plus raw bytes), so a
saved notebook can draw the last heatmap without a kernel. This module turns the
patching core's objects into that state and back into words:

* :func:`heatmap_payload` flattens a :class:`~patchwidgets.results.PatchResult` into a 2-D
  table (rows x columns) with labels, ready for the front end to draw;
* :func:`explain_cell` says in plain words what one cell of that table means;
* :func:`static_html` renders the same table as self-contained HTML, the fallback that
  exported notebooks (nbconvert, GitHub) show instead of the live widget;
* :func:`preview` checks and runs the two prompts before any sweep: tokens, errors next to
  the right field, pre-filled answers, baseline logit differences, attention patterns.

The background thread that runs all of this, and the sweep job itself (attribution
estimate first, then the exact sweep or the path-patching sweep), live in
:mod:`patchwidgets.widget_jobs`.

Everything here is deterministic (no ids, no timestamps in text), so ``nbval`` can compare
the widget's outputs between runs.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from . import inputs as inputs_mod
from . import widget_colour as colours
from .path_patching import PathPatchResult

INPUT_FIELDS = ("clean", "corrupted", "correct", "incorrect")

#: The sites the widget offers, grouped as in its component selector: ``(value, label)``.
SITE_GROUPS: list[tuple[str, list[tuple[str, str]]]] = [
    ("Residual stream and blocks (layer x position)", [
        ("resid_pre", "residual stream (before each layer)"),
        ("resid_mid", "residual stream (between attention and MLP)"),
        ("resid_post", "residual stream (after each layer)"),
        ("attn_out", "attention output"),
        ("mlp_out", "MLP output"),
    ]),
    ("Attention heads, all positions (layer x head)", [
        ("head_out", "head outputs (z)"),
        ("head_q", "head queries (q)"),
        ("head_k", "head keys (k)"),
        ("head_v", "head values (v)"),
        ("head_pattern", "head attention patterns"),
    ]),
    ("Attention heads, by position (layer.head x position)", [
        ("head_out_by_pos", "head outputs (z) by position"),
        ("head_q_by_pos", "head queries (q) by position"),
        ("head_k_by_pos", "head keys (k) by position"),
        ("head_v_by_pos", "head values (v) by position"),
        ("head_pattern_by_pos", "head patterns by destination position"),
    ]),
    ("Paths between heads (sender layer x sender head)", [
        ("path", "path patching: senders \u2192 receivers"),
    ]),
]
WIDGET_SITES = [value for _, options in SITE_GROUPS for value, _ in options]

#: What each site patches, as a phrase: ``{layer}``, ``{head}`` are filled in.
_SITE_PHRASES = {
    "resid_pre": "the residual stream entering layer {layer}",
    "resid_mid": "the residual stream between attention and MLP of layer {layer}",
    "resid_post": "the residual stream leaving layer {layer}",
    "attn_out": "the attention output of layer {layer}",
    "mlp_out": "the MLP output of layer {layer}",
    "head_out": "the output of head {layer}.{head}",
    "head_q": "the queries of head {layer}.{head}",
    "head_k": "the keys of head {layer}.{head}",
    "head_v": "the values of head {layer}.{head}",
    "head_pattern": "the attention pattern of head {layer}.{head}",
}

#: Metric names as words, for explanations; ``{c}`` is the correct answer.
METRIC_WORDS = {
    "logit_diff": "logit difference",
    "normalized": "fraction of the logit difference restored",
    "logit": "logit of {c}",
    "logprob": "log-probability of {c}",
    "prob": "probability of {c}",
    "rank": "rank of {c}",
    "accuracy": "top-1 accuracy (is {c} the top prediction?)",
    "kl": "KL divergence from the clean run's prediction",
}


# --------------------------------------------------------------------------- heatmap payload
def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _token_label(token: str) -> str:
    return token if len(token) <= 14 else token[:12] + "\u2026"


def table_2d(result, metric: str, mask: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, list[dict], list[dict], str, str]:
    """The sweep's grid as a 2-D table: ``values [rows, cols]``, row and column descriptors,
    and the two axis titles.

    ``(layer, pos)`` and ``(layer, head)`` grids are already 2-D; the ``by_pos`` head sites,
    ``(layer, pos, head)`` and ``(layer, head, pos)``, become one row per (layer, head)
    with the positions as columns. Each descriptor carries the indices of its cells
    (``layer``, ``head``, ``pos``), a short ``label`` and, for positions, the clean and
    corrupted ``token`` there. ``mask`` (``result.done`` as it was when the caller looked) blanks
    the cells computed after that moment, so values and counts come from one instant even
    while the sweep fills the result in place on another thread.
    """
    grid = result.grid(metric).float()
    if mask is not None:
        grid = grid.masked_fill(~mask.reshape(grid.shape), float("nan"))
    axes, shape = tuple(result.axes), tuple(result.shape)
    clean = result.clean_str_tokens[0] if result.clean_str_tokens else None
    corrupted = result.corrupted_str_tokens[0] if result.corrupted_str_tokens else None

    def pos_cols(n: int) -> list[dict]:
        cols = []
        for p in range(n):
            tok = clean[p] if clean and p < len(clean) else str(p)
            col = {"pos": p, "label": _token_label(tok), "token": tok}
            if corrupted and p < len(corrupted):
                col["corrupted_token"] = corrupted[p]
                col["diff"] = corrupted[p] != tok
            cols.append(col)
        return cols

    if axes == ("layer", "pos"):
        rows = [{"layer": l, "label": str(l)} for l in range(shape[0])]
        return grid, rows, pos_cols(shape[1]), "layer", "position"
    if axes == ("layer", "head"):
        rows = [{"layer": l, "label": str(l)} for l in range(shape[0])]
        cols = [{"head": h, "label": str(h)} for h in range(shape[1])]
        return grid, rows, cols, "layer", "head"
    if axes in (("layer", "pos", "head"), ("layer", "head", "pos")):
        if axes == ("layer", "pos", "head"):
            grid = grid.permute(0, 2, 1)
        n_layers, n_heads, n_pos = grid.shape
        rows = [{"layer": l, "head": h, "label": f"L{l} H{h}"}
                for l in range(n_layers) for h in range(n_heads)]
        return grid.reshape(n_layers * n_heads, n_pos), rows, pos_cols(n_pos), "layer.head", "position"
    raise ValueError(f"the widget cannot draw a sweep with axes {axes}")


def _f32(values: torch.Tensor) -> bytes:
    return values.contiguous().numpy().astype("<f4").tobytes()


def sweep_progress(result, estimate=None) -> tuple[int, int, torch.Tensor | None]:
    """``(done, total, mask)`` of a sweep, read once from the result itself: ``mask`` is a
    copy of ``result.done`` (``None`` once complete). Before the first exact chunk (only the
    ``estimate``), nothing is done."""
    layout = result if result is not None else estimate
    total = len(layout.indices) * len(layout.sites)
    if result is None:
        return 0, total, None
    done = result.done
    if done is None:
        return total, total, None
    mask = done.clone()
    return int(mask.sum()), total, mask


def heatmap_payload(result, metric: str, inputs: dict, run_id: int, estimate=None,
                    state: str = "running") -> dict:
    """The ``heatmap`` traitlet: everything the front end needs to draw one metric.

    ``values`` is the row-major ``[rows, cols]`` table as little-endian float32 bytes
    (ipywidgets ships bytes as binary buffers; NaN marks cells not computed yet). ``done``
    and ``total`` count the cells with an exact value and all cells, read from the same
    snapshot as ``values`` (:func:`sweep_progress`); ``state`` is the sweep's own state when
    this picture was taken (``running``, ``done`` or ``cancelled``), so the page never has to
    pair a picture with a status that arrived in another message.

    ``estimate`` (an :class:`~patchwidgets.attribution.AttributionResult` of the same site,
    or ``None``) adds the fast preview: ``estimate`` holds its table in the same layout, and
    the page paints a cell from it, marked *approximate*, until ``values`` has the exact
    number. ``result`` may be ``None`` before the first exact chunk: the layout then comes
    from the estimate and every exact value is NaN. A path-patching sweep adds ``path``
    (its receivers, for words and captions) and names its axes after the senders.
    """
    done, total, mask = sweep_progress(result, estimate)
    has_estimate = estimate is not None and metric in estimate.metrics
    layout = result if result is not None else estimate
    values, rows, cols, row_title, col_title = table_2d(layout, metric, mask)
    if result is None:
        values = torch.full_like(values, float("nan"))
    baselines = {name: _finite(float(b[metric].float().mean())) if metric in b else None
                 for name, b in layout.baselines.items()}
    payload = {
        "run_id": run_id,
        "site": layout.sites[0],
        "metric": metric,
        "direction": layout.direction,
        "rows": rows,
        "cols": cols,
        "row_title": row_title,
        "col_title": col_title,
        "values": _f32(values),
        "done": int(done),
        "total": int(total),
        "complete": bool(total > 0 and done >= total),
        "state": "done" if state == "running" and total > 0 and done >= total else state,
        "baselines": baselines,
        "inputs": dict(inputs),
    }
    if isinstance(layout, PathPatchResult):
        recv = layout.receivers
        payload.update(site="path", row_title="sender layer", col_title="sender head", path={
            "label": layout.sites[0], "receiver_input": "".join(layout.receiver_input),
            "receivers": None if recv is None else [[int(l), int(h)] for l, h in recv]})
    if has_estimate:
        payload["estimate"] = _f32(table_2d(estimate, metric)[0])
        payload["estimate_method"] = getattr(estimate, "method", "atp")
    return payload


def payload_values(payload: dict) -> torch.Tensor:
    """Decode ``payload["values"]`` back into a ``[rows, cols]`` float tensor."""
    raw = payload["values"]
    flat = torch.frombuffer(bytearray(bytes(raw)), dtype=torch.float32) if len(raw) else torch.zeros(0)
    return flat.reshape(len(payload["rows"]), len(payload["cols"]))


def payload_estimate(payload: dict) -> torch.Tensor | None:
    """Decode the fast preview's estimates (``payload["estimate"]``), or ``None``."""
    if not payload.get("estimate"):
        return None
    return payload_values({**payload, "values": payload["estimate"]})


# --------------------------------------------------------------------------- words
_fmt = colours.fmt


_INPUT_WORDS = {"q": "queries", "k": "keys", "v": "values"}


def describe_path(cell: dict, path: dict) -> str:
    """What one cell of a path-patching sweep patches: the sender's output, along one path."""
    sender = f"the output of head {cell.get('layer', '?')}.{cell.get('head', '?')}"
    receivers = path.get("receivers")
    if not receivers:
        return f"{sender} (only along its direct path to the logits; every later head frozen)"
    words = [_INPUT_WORDS[c] for c in path.get("receiver_input", "q") if c in _INPUT_WORDS]
    inputs = ", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else "".join(words)
    heads = ", ".join(f"{l}.{h}" for l, h in receivers)
    return f"{sender} (only along its path into the {inputs} of head{'s' if len(receivers) > 1 else ''} {heads})"


def describe_cell(site: str, cell: dict, path: dict | None = None) -> str:
    """What one cell patches: "the output of head 3.2 at ' Mary' (position 10)".

    ``path`` is a path-patching payload's ``path`` entry (its receivers), for ``site="path"``.
    """
    if site == "path":
        return describe_path(cell, path or {})
    base = site[: -len("_by_pos")] if site.endswith("_by_pos") else site
    phrase = _SITE_PHRASES.get(base, f"{site} at layer {{layer}}")
    text = phrase.format(layer=cell.get("layer", "?"), head=cell.get("head", "?"))
    if "pos" in cell:
        where = "from destination position" if base == "head_pattern" else "at"
        tok = cell.get("token")
        text += f" {where} {tok!r} (position {cell['pos']})" if tok is not None else f" {where} position {cell['pos']}"
    return text


def explain_cell(payload: dict, row: int, col: int, answers: tuple[str, str]) -> str:
    """One or two sentences saying what cell ``(row, col)`` of a heatmap means.

    A cell that has no exact value yet but an attribution-patching estimate (the fast
    preview) is explained from the estimate, and says that it is one.
    """
    values = payload_values(payload)
    cell = {**payload["rows"][row], **payload["cols"][col]}
    cell.pop("label", None)
    value = float(values[row, col])
    denoising = payload["direction"] == "denoising"
    what = describe_cell(payload["site"], cell, payload.get("path"))
    source, target = ("clean", "corrupted") if denoising else ("corrupted", "clean")
    lead = f"Patching {what} from the {source} run into the {target} run"
    metric = payload["metric"]
    words = METRIC_WORDS.get(metric, metric).format(c=repr(answers[0]))
    verb = "restores" if denoising else "destroys"

    def percent(x: float) -> str:  # (no "-0%" for a tiny negative number)
        return f"{x if abs(x) >= 0.005 else 0.0:.0%}"
    if not math.isfinite(value):
        stopped = payload.get("state") == "cancelled"
        estimates = payload_estimate(payload)
        guess = float(estimates[row, col]) if estimates is not None else float("nan")
        if not math.isfinite(guess):
            return (f"{lead}: not computed: the sweep was cancelled before reaching this cell. Press Run "
                    f"for its value.") if stopped else f"{lead}: not computed yet."
        said = (f"it {verb} about {percent(guess)} of the clean logit difference" if metric == "normalized"
                else f"a {words} of about {_fmt(guess)}")
        then = ("the sweep was cancelled before reaching this cell, so this estimate stays until you "
                "press Run again." if stopped else "replaced by the exact value when the sweep reaches this cell.")
        return (f"{lead}: not computed exactly yet. Attribution patching estimates {said}; this is a "
                f"first-order approximation, {then}")
    base = payload.get("baselines", {})
    if metric == "normalized":
        goal = "the clean answer" if denoising else "the clean answer's lead"
        sentence = f"{lead} {verb} {percent(value)} of the clean logit difference"
        if value < -0.05:
            sentence += " (negative: it pushes the other way)"
        meaning = ("sufficient" if denoising else "necessary")
        return (f"{sentence}. 0% means no effect, 100% means {goal} is fully "
                f"{'back' if denoising else 'gone'}: high values mark activations that are {meaning}.")
    return (f"{lead} gives a {words} of {_fmt(value)} (unpatched: {target} run "
            f"{_fmt(base.get(target))}, {source} run {_fmt(base.get(source))}).")


# --------------------------------------------------------------------------- static HTML
def static_html(payload: dict | None, title: str) -> str:
    """A self-contained HTML table of the heatmap (no scripts), for exported notebooks: the
    same colours as the page (:mod:`patchwidgets.widget_colour`) over white, and a legend
    with five ticks and what the high end means."""
    esc = html.escape
    if not payload or not payload.get("rows"):
        return (f"<div><b>{esc(title)}</b><br><i>No heatmap yet: press Run in the widget, or "
                f"call <code>w.run(wait=True)</code>.</i></div>")
    values = payload_values(payload)
    metric = payload["metric"]
    kind = colours.scale_kind(metric)
    lo, hi = colours.domain(metric, values.flatten().tolist())
    paint = lambda v: colours.over(colours.colour(v, lo, hi, kind))  # noqa: E731
    cell = "padding:0;width:28px;height:18px;font-size:9px;text-align:center;color:#222"
    head = "".join(
        f'<th style="font-size:10px;font-weight:{"bold" if c.get("diff") else "normal"};'
        f'writing-mode:vertical-rl;transform:rotate(180deg)">{esc(c["label"])}</th>'
        for c in payload["cols"])
    body = []
    for r, row in enumerate(payload["rows"]):
        cells = "".join(
            f'<td style="{cell};background:{paint(float(v))}" title="{esc(colours.fmt(float(v), 4))}">'
            f'{"" if not math.isfinite(float(v)) else f"{float(v):.2f}"}</td>'
            for v in values[r].tolist())
        body.append(f'<tr><th style="font-size:10px;text-align:right">{esc(row["label"])}</th>{cells}</tr>')
    status = "" if payload.get("complete") else f" (partial: {payload['done']}/{payload['total']} patches)"
    where = (payload.get("path") or {}).get("label") or payload["site"]
    legend = "".join(f'<span style="display:inline-block;padding:0 6px;background:{paint(v)}">'
                     f'{esc(colours.fmt(v, 2))}</span>' for v in colours.ticks(lo, hi))
    caption = (f"{payload['direction']} {esc(where)}, {esc(metric)}{status}")
    return (f'<div class="pw-static"><b>{esc(title)}</b><div style="font-size:11px">{caption}</div>'
            f'<div style="font-size:11px" data-legend="{kind}">{esc(metric)}: {legend} '
            f'({esc(colours.legend_words(metric))})</div>'
            f'<table style="border-collapse:collapse"><tr><th>{esc(payload["row_title"])}</th>{head}</tr>'
            f'{"".join(body)}</table></div>')


# --------------------------------------------------------------------------- model side
def quiet_load(name: str):
    """``load_model(name)`` without transformers' "Loading weights" bar in the cell output."""
    from .loading import load_model

    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        return load_model(name)
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return load_model(name)
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def field_of(err: BaseException, values: dict[str, str]) -> str:
    """Which input an error is about, from the core's structured fields only (``err.field``,
    and ``err.text`` for an unknown word: the field whose text it is). Never from the
    message's words."""
    name = getattr(err, "field", None)
    text = getattr(err, "text", None)
    if name in (None, "answers") and text is not None:
        for field_name, value in values.items():
            if text == value:
                return field_name
    return {"metrics": "metric"}.get(name, name) or "general"


@dataclass
class Preview:
    """What :func:`preview` found out about the current inputs."""

    tokens: dict[str, list[str] | None]
    errors: dict[str, str]
    fills: dict[str, str]                 # answers to pre-fill with the model's prediction
    baseline: dict[str, Any]              # logit differences and top predictions
    patterns: dict[str, Any] = field(default_factory=dict)  # [layer, head, q, k] per prompt


def _device(model: Any) -> torch.device:
    from .engine import input_device  # where the embedding runs (its weight may be offloaded: meta)

    try:
        return input_device(model)
    except (AttributeError, TypeError):
        return torch.device("cpu")


def empty_prompt_message(name: str) -> str:
    """The one message for an empty prompt (the preview and Run both show it)."""
    return f"The {name} prompt is empty: type a sentence for the model to complete."


def length_message(tokens: dict[str, list[str]], edited: str) -> str:
    """A short message for prompts of different token lengths, about the prompt just edited:
    the two counts (never the whole token lists, which can be hundreds long)."""
    other = "clean" if edited == "corrupted" else "corrupted"
    return (f"The {edited} prompt has {len(tokens[edited])} tokens and the {other} prompt "
            f"{len(tokens[other])}: prompts of different token lengths cannot be patched position by "
            f"position. Make them the same length (swap a word for one of the same token length).")


def same_answers_message(token: str) -> str:
    return (f"The correct and incorrect answers are the same token ({token!r}): their logit difference is 0 "
            f"whatever is patched. Type the answer the corrupted prompt leads to as the incorrect one.")


def preview(model: Any, texts: dict[str, str], answers: dict[str, str],
            follow: dict[str, bool], edited: str = "corrupted") -> Preview:
    """Check and run the prompts once, before any sweep.

    Each prompt is tokenised on its own, so both can show an error at once; prompts of
    different token lengths are reported at ``edited`` (the prompt edited last); then the
    core's own checks run (identical prompts, context window). Each prompt that tokenises
    is run once, giving its top prediction and attention patterns. An answer whose
    ``follow[answer]`` is true (the user has not typed one) is filled with the prediction:
    the *correct* answer with the clean prompt's, the *incorrect* with the corrupted's.
    """
    errors: dict[str, str] = {}
    ids: dict[str, torch.Tensor] = {}
    for name, text in texts.items():
        if not text.strip():
            errors[name] = empty_prompt_message(name)
            continue
        try:
            ids[name] = inputs_mod.tokenize(model, [text], name)[0]
        except ValueError as err:
            errors[name] = str(err)
    tokens = {n: (inputs_mod.str_tokens(model, ids[n]) if n in ids else None) for n in texts}
    if len(ids) == 2 and len(ids["clean"]) != len(ids["corrupted"]):
        errors[edited if edited in texts else "corrupted"] = length_message(tokens, edited)
    elif len(ids) == 2:
        try:  # the core's prompt checks; token id 0 stands in for (valid) answers
            inputs_mod.prepare(model, texts["clean"], texts["corrupted"], (0, 0))
        except ValueError as err:
            errors[field_of(err, {**texts, **answers})] = str(err)

    logits, patterns = {}, {"tokens": tokens}
    n_ctx = getattr(model.cfg, "n_ctx", None) or 10**9
    with torch.no_grad():
        for name, toks in ids.items():
            if len(toks) > n_ctx:
                continue
            out, cache = model.run_with_cache(
                toks[None].to(_device(model)), names_filter=lambda n: n.endswith("attn.hook_pattern"))
            logits[name] = out[0, -1].float().cpu()
            patterns[name] = torch.stack([cache[f"blocks.{l}.attn.hook_pattern"][0].float().cpu()
                                          for l in range(model.cfg.n_layers)])
    top = {n: inputs_mod.str_tokens(model, logits[n].argmax()[None])[0] for n in logits}

    fills = {}
    for answer, prompt in (("correct", "clean"), ("incorrect", "corrupted")):
        if prompt in top and follow.get(answer, not answers[answer]) and answers[answer] != top[prompt]:
            fills[answer] = top[prompt]
    answer_ids = {}
    for answer in ("correct", "incorrect"):
        value = fills.get(answer, answers[answer])
        if not value:
            errors[answer] = f"Type the {answer} answer token, e.g. ' Mary'."
            continue
        try:
            answer_ids[answer] = inputs_mod.answer_id(model, value, answer)
        except ValueError as err:
            errors[answer] = str(err)
    if len(answer_ids) == 2 and answer_ids["correct"] == answer_ids["incorrect"]:
        errors["incorrect"] = same_answers_message(fills.get("incorrect", answers["incorrect"]))
    baseline: dict[str, Any] = {f"{n}_top": top.get(n) for n in texts}
    for name in texts:
        baseline[name] = None
        if name in logits and len(answer_ids) == 2:
            ld = float(logits[name][answer_ids["correct"]] - logits[name][answer_ids["incorrect"]])
            baseline[name] = ld if math.isfinite(ld) else None
    return Preview(tokens, errors, fills, baseline, patterns)


def pattern_payload(patterns: dict[str, Any], layer: int, head: int) -> dict:
    """The ``pattern`` traitlet: head ``layer.head``'s attention on both prompts, as float32
    bytes (row = query position, column = key position)."""
    payload: dict[str, Any] = {"layer": layer, "head": head}
    for name in ("clean", "corrupted"):
        grids = patterns.get(name)
        if grids is None:
            continue
        if not (0 <= layer < grids.shape[0] and 0 <= head < grids.shape[1]):
            payload["error"] = f"no head {layer}.{head} in this model"
            continue
        grid = grids[layer, head]
        payload[name] = {"tokens": patterns["tokens"][name], "n": int(grid.shape[0]),
                         "values": grid.contiguous().numpy().astype("<f4").tobytes()}
    return payload
