"""Checks for 09_nnsight: the same experiments written with nnsight instead of hooks.

Each check runs the learner's function on the bundled ``toy-ioi`` checkpoint loaded as an
nnsight model (:func:`nnsight_model`) with the sweep checks' four-prompt batch, and compares
what comes back with the **TransformerBridge** on the same weights: an independent
implementation (TransformerLens hooks, not nnsight), so a check cannot agree with a wrong
nnsight trace by sharing its mistake. The wrong answers a check names are computed with the
check's own nnsight traces (what ``.output`` instead of ``.input`` gives, and so on).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ._common import (GradingError, call_learner, compare, name_model, report_pass, sweep_setup, to_tensor)

_NNSIGHT: dict[str, Any] = {}

#: Prompt, position and vocabulary axes of the checks' batch.
AXES = ("layer", "prompt", "pos", "d_model")


def nnsight_model() -> Any:
    """The bundled ``toy-ioi`` checkpoint as an nnsight model (``load_model(..., backend="nnsight")``),
    built once per process. The grader's kernel builds its own from the same name."""
    if "model" not in _NNSIGHT:
        from ..loading import load_model

        _NNSIGHT["model"] = name_model(load_model("toy-ioi", backend="nnsight"), "nnsight_model")
    return _NNSIGHT["model"]


def _trace_hint(err: GradingError) -> str:
    """What an exception from inside a trace usually means, by its text."""
    text = str(err)
    if "NameError" in text or "UnboundLocalError" in text:
        return ("\nAfter a trace, only values you called .save() on exist: a variable assigned inside "
                "`with lm.trace(...)` without .save() is gone (NameError, or UnboundLocalError inside a "
                "function). Save the value you return, e.g. "
                "`torch.stack([...]).save()`; a plain list of saved tensors is not saved itself.")
    if "OutOfOrderError" in text:
        return ("\nnsight serves an invoke's reads in the order the model computes them: read "
                "lm.transformer.h[layer] before lm.lm_head, and earlier layers before later ones.")
    if "list index out of range" in text or "IndexError" in text:
        return ("\nInside a patch invoke, read the activation you patch first (`target = "
                "lm.transformer.h[layer].input`), then index the clean invoke's values: in `a[i] = b` Python "
                "evaluates `b` first, and the clean invoke has recorded a layer only once the model has "
                "reached it, which the patch invoke waits for only when it reads that layer itself.")
    return ""


def _call(name: str, fn: Callable, *args: Any) -> Any:
    try:
        with torch.no_grad():
            return call_learner(name, fn, *args)
    except GradingError as err:
        hint = _trace_hint(err)
        if hint:
            raise GradingError(f"{err}{hint}") from None
        raise


def _stack(cache: Any, hook: str, n_layers: int) -> torch.Tensor:
    return torch.stack([cache[f"blocks.{layer}.{hook}"] for layer in range(n_layers)]).detach().cpu().float()


def _nnsight_reads(tokens: torch.Tensor, read: Callable[[Any, int], Any]) -> torch.Tensor:
    """``[layer, ...]``: ``read(lm, layer)`` for every block, in one trace of the check's own."""
    lm = nnsight_model()
    n_layers = len(lm.transformer.h)
    with torch.no_grad(), lm.trace(tokens):
        values = torch.stack([read(lm, layer) for layer in range(n_layers)]).save()
    return values.detach().cpu().float()


# ---------------------------------------------------------------------------------------------
# Exercise 1: a trace that saves
# ---------------------------------------------------------------------------------------------

def check_record_resid_pre(record_resid_pre: Callable) -> None:
    """``record_resid_pre(lm, tokens) -> [n_layers, batch, pos, d_model]``: the residual stream
    entering each block (``lm.transformer.h[layer].input``), saved in one trace."""
    name = "record_resid_pre"
    setup = sweep_setup()
    tokens = setup.batch.clean_tokens
    n_layers = setup.model.cfg.n_layers
    expected = _stack(setup.clean_cache, "hook_resid_pre", n_layers)  # the bridge's, not nnsight's
    got = to_tensor(name, _call(name, record_resid_pre, nnsight_model(), tokens.clone()))
    if got.shape == expected.shape[:1] + expected.shape[2:]:
        raise GradingError(
            f"{name}: got shape {tuple(got.shape)}, [layer, pos, d_model]: the prompt axis is missing. "
            "`.output[0]` (or `.input[0]`) picks the first prompt: in transformers 5 a GPT-2 block's output "
            "is the hidden-states tensor itself, not the tuple that `output[0]` unpacked in older versions "
            "(nnsight's tutorial was written then). Use `lm.transformer.h[layer].input` whole.")
    compare(name, got, expected, AXES, setup.labels, alternatives=[
        ("save each block's output (the residual stream after the block, resid_post) instead of its "
         "input (the stream entering it, resid_pre)", lambda: _stack(setup.clean_cache, "hook_resid_post", n_layers)),
        ("save the first LayerNorm's output (ln_1: the normalised stream the attention reads) instead of the "
         "block's input", lambda: _nnsight_reads(tokens, lambda lm, layer: lm.transformer.h[layer].ln_1.output)),
        ("save the MLP's output instead of the block's input",
         lambda: _nnsight_reads(tokens, lambda lm, layer: lm.transformer.h[layer].mlp.output)),
    ], atol=1e-4, rtol=1e-4)
    report_pass(name, "every block's input, as the bridge's hook_resid_pre")


# ---------------------------------------------------------------------------------------------
# Exercise 2: an intervention
# ---------------------------------------------------------------------------------------------

def _bridge_patched(setup: Any, hook: str, layer: int, positions: Any, rows: Any = slice(None),
                    source_hook: str = "hook_resid_pre") -> torch.Tensor:
    """The bridge's corrupted run with the clean ``source_hook`` of ``layer`` pasted into ``hook``
    at ``positions``: last-position logits ``[batch, vocab]``."""
    name = f"blocks.{layer}.{hook}"
    source = setup.clean_cache[f"blocks.{layer}.{source_hook}"]

    def paste(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        activation[rows, positions] = source[rows, positions]
        return activation

    with torch.no_grad():
        logits = setup.model.run_with_hooks(setup.batch.corrupted_tokens, fwd_hooks=[(name, paste)])
    return logits[:, -1].detach().cpu().float()


def _intervention_mistakes(setup: Any, layer: int, position: int) -> list[tuple[str, Callable[[], torch.Tensor]]]:
    """The usual wrong versions of ``patch_resid_pre`` at ``(layer, position)``, as ``compare`` takes them."""
    return [
        ("return the corrupted run unpatched: an assignment to a copy (or to a new variable) changes "
         "nothing; write into lm.transformer.h[layer].input[:, position] itself",
         lambda: setup.corrupted_logits[:, -1].detach().cpu().float()),
        ("paste into the block's output (resid_post) instead of its input: the stream entering block "
         "`layer` is lm.transformer.h[layer].input",
         lambda: _bridge_patched(setup, "hook_resid_post", layer, position)),
        ("paste every position at once instead of the one position",
         lambda: _bridge_patched(setup, "hook_resid_pre", layer, slice(None))),
        ("patch only the first prompt ([0, position]); every prompt of the batch takes its clean value",
         lambda: _bridge_patched(setup, "hook_resid_pre", layer, position, rows=0)),
    ]


def check_patch_resid_pre(patch_resid_pre: Callable) -> None:
    """``patch_resid_pre(lm, corrupted_tokens, clean_resid, layer, position) -> [batch, vocab]``:
    one trace of the corrupted tokens with the clean residual stream pasted into block ``layer``'s
    input at ``position`` (every prompt), returning the last position's logits."""
    name = "patch_resid_pre"
    setup = sweep_setup()
    b, n_layers = setup.batch, setup.model.cfg.n_layers
    clean_resid = _stack(setup.clean_cache, "hook_resid_pre", n_layers)
    s2 = int((b.clean_tokens[0] != b.corrupted_tokens[0]).nonzero()[0])
    end = b.clean_tokens.shape[1] - 1
    for layer, position in [(1, s2), (0, s2), (2, end), (1, end)]:
        expected = _bridge_patched(setup, "hook_resid_pre", layer, position)
        got = to_tensor(name, _call(name, patch_resid_pre, nnsight_model(), b.corrupted_tokens.clone(),
                                    clean_resid.clone(), layer, position))
        where = f"layer {layer}, position {position} ({setup.labels['pos'][position]})"
        if got.ndim == 3 and got.shape[:1] + got.shape[2:] == expected.shape:
            raise GradingError(f"{name}: {where}: got logits of shape {tuple(got.shape)}, every position; "
                               "return the last position's, lm.lm_head.output[:, -1] ([batch, vocab]).")
        compare(name, got, expected, ("prompt", "vocab"), alternatives=_intervention_mistakes(setup, layer, position),
                atol=1e-3, rtol=1e-4)
    report_pass(name, "the patched run's last-position logits match the bridge's hooked run")


# ---------------------------------------------------------------------------------------------
# Exercise 3: the batched-invokes sweep (nnsight's tutorial recipe)
# ---------------------------------------------------------------------------------------------

def _run_invokes(name: str, fn: Callable, setup: Any) -> Any:
    b = setup.batch
    return _call(name, fn, nnsight_model(), b.clean_tokens.clone(), b.corrupted_tokens.clone(),
                 b.correct_ids.clone(), b.incorrect_ids.clone())


def check_resid_pre_sweep(resid_pre_sweep: Callable) -> None:
    """``resid_pre_sweep(lm, clean_tokens, corrupted_tokens, correct, incorrect) -> [n_layers, pos]``:
    denoising every block's input at every position, as the normalised logit difference
    (0 = corrupted, 1 = clean, batch means), in one trace of batched invokes."""
    from ._common import library_grid, run_sweep_check

    run_sweep_check("resid_pre_sweep", resid_pre_sweep, None, "resid_pre", ("layer", "pos"), [
        ("patch each block's output (resid_post) instead of its input",
         lambda setup, _: library_grid(setup, "resid_post")),
        ("patch corrupted values into the clean run (noising) instead of clean values into the corrupted run",
         lambda setup, _: library_grid(setup, "resid_pre", "noising")),
    ], run=_run_invokes, library_name="patchwidgets.patch")


# ---------------------------------------------------------------------------------------------
# Exercise 4: keeping only the last logits
# ---------------------------------------------------------------------------------------------

def check_last_logits(last_logits: Callable) -> None:
    """``last_logits(lm, tokens) -> [batch, 1, vocab]``: ``lm.lm_head.output`` itself, saved from a
    trace that unembeds the last position only (``lm.trace(tokens, logits_to_keep=1)``)."""
    name = "last_logits"
    setup = sweep_setup()
    tokens = setup.batch.clean_tokens
    full = setup.clean_logits.detach().cpu().float()  # the bridge's [batch, pos, vocab]
    expected = full[:, -1:]
    got = to_tensor(name, _call(name, last_logits, nnsight_model(), tokens.clone()))
    how = ("pass logits_to_keep=1 to lm.trace (a forward argument of Hugging Face's causal LMs), so that "
           "lm_head unembeds the last position only, and save lm.lm_head.output itself")
    if got.shape == full.shape:
        raise GradingError(f"{name}: got {tuple(got.shape)}, the logits of every position: {how}.")
    if got.shape == expected.shape[:1] + expected.shape[2:]:
        raise GradingError(f"{name}: got {tuple(got.shape)}, [batch, vocab]: indexing [:, -1] drops the "
                           f"position axis after every position was unembedded; {how} ([batch, 1, vocab]).")
    if got.ndim == 3 and got.shape[0] == full.shape[0] and got.shape[2] == full.shape[2] and got.shape[1] not in (
            1, full.shape[1]):
        raise GradingError(f"{name}: got {tuple(got.shape)}: {got.shape[1]} positions kept; logits_to_keep is "
                           "the number of last positions to unembed: 1.")
    if got.ndim == 3 and got.shape[-1] == setup.model.cfg.d_model:
        raise GradingError(f"{name}: got {tuple(got.shape)}: d_model values per position, not the vocabulary's: "
                           "that is the final LayerNorm's output; save lm.lm_head.output.")
    compare(name, got, expected, ("prompt", "pos", "vocab"), alternatives=[
        ("take the first position's logits instead of the last one's", lambda: full[:, :1]),
        ("return probabilities (softmax) instead of logits", lambda: expected.softmax(-1)),
        ("return log-probabilities (log_softmax) instead of logits", lambda: expected.log_softmax(-1)),
    ], atol=1e-4, rtol=1e-4)
    report_pass(name, "lm_head's output for the last position only, [batch, 1, vocab]")
