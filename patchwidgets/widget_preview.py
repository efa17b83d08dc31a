"""Checking the widget's inputs before any sweep (the *preview* job).

:func:`preview` tokenises each prompt, runs the core's own checks, runs each prompt once
(top prediction, attention patterns, baseline logit differences) and pre-fills the answers
the user has not typed. Errors come back as ``{field: message}``, placed from the core's
structured fields (:func:`field_of`), never from the words of a message; the widget refuses
a Run while any is left, so a message reads the same before and after Run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from . import inputs as inputs_mod
from .sharing import exclusive


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
    from .devices import input_device  # where the embedding runs (its weight may be offloaded: meta)

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
            with exclusive(model):  # (another caller's hooks must not be in this run: patchwidgets.sharing)
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
