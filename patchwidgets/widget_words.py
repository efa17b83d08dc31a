"""The widget's words: what a heatmap cell patches and what its value means."""

from __future__ import annotations

import math

from .widget_colour import fmt as _fmt
from .widget_payload import payload_estimate, payload_values


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
    tail = ""
    if payload.get("n_pairs", 1) > 1:  # a dataset: the mean and its standard error, or one pair
        if payload.get("pair", -1) >= 0:
            tail = f" (pair {payload['pair']} of {payload['n_pairs']} alone)"
        elif payload.get("se"):
            se = float(payload_values({**payload, "values": payload["se"]})[row, col])
            tail = (f" (mean over {payload['n_pairs']} prompt pairs; standard error {_fmt(se)})")
    return _explain_exact(payload, lead, value, metric, words, verb, denoising, target, source, percent) + tail


def _explain_exact(payload, lead, value, metric, words, verb, denoising, target, source, percent) -> str:
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
