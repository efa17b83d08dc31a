"""Checks for 03_residual_stream and 04_attention_heads."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable

import torch

from ._common import (run_sweep_check, GradingError, to_tensor, call_learner, compare, copy_cache, library_grid,
                      report_pass, sweep_setup)


# ---------------------------------------------------------------------------------------------
# 03_residual_stream
# ---------------------------------------------------------------------------------------------

def _check_hook(name: str, fn: Callable, shape: tuple[int, ...], hook_name: str, index_args: tuple,
                select: Callable[[torch.Tensor], Any], axes_desc: str) -> None:
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(*shape, generator=gen)
    source = torch.randn(*shape, generator=gen)
    cache = {hook_name: source.clone()}
    hook = SimpleNamespace(name=hook_name)
    passed_in = target.clone()
    out = call_learner(name, fn, passed_in, hook, *index_args, cache)
    got = passed_in if out is None else to_tensor(name, out)
    expected = target.clone()
    expected[select(expected)] = source[select(source)]
    if got.shape != expected.shape:
        raise GradingError(f"{name}: return the whole activation, shape {tuple(shape)}; got {tuple(got.shape)}")
    if torch.equal(got, target):
        raise GradingError(f"{name}: the activation came back unchanged; copy the source cache's values "
                           f"into {axes_desc} and return the activation")
    if torch.equal(got, source):
        raise GradingError(f"{name}: you replaced the whole activation; copy only {axes_desc}")
    if not torch.equal(cache[hook_name], source):
        raise GradingError(f"{name}: you changed the source cache; read from it, write into the activation")
    if not torch.allclose(got, expected):
        wrong = torch.nonzero(~torch.isclose(got, expected))[0].tolist()
        raise GradingError(f"{name}: only {axes_desc} should take the source values; the first wrong "
                           f"element is at index {tuple(wrong)} of the activation (batch first)")


def check_patch_position(patch_position: Callable) -> None:
    """``patch_position(activation [batch, pos, d_model], hook, position, source_cache)``."""
    name = "patch_position"
    _check_hook(name, patch_position, (2, 6, 5), "blocks.1.hook_resid_pre", (3,),
                lambda t: (slice(None), 3), "position 3 (every prompt in the batch, every dimension)")
    _check_hook(name, patch_position, (3, 4, 5), "blocks.2.hook_attn_out", (0,),
                lambda t: (slice(None), 0), "position 0")
    report_pass(name, "copies one position of the source activation and leaves the rest alone")


def _patched_by_hand(model: Any, tokens: torch.Tensor, source: torch.Tensor, hook_name: str,
                     positions: Any) -> torch.Tensor:
    """``tokens`` run with ``source`` pasted at ``positions`` of ``hook_name``."""
    def paste(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        activation[:, positions] = source[:, positions]
        return activation

    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=[(hook_name, paste)])


def _canonical_name(model: Any, tokens: torch.Tensor, hook_name: str) -> str:
    """What ``hook.name`` says inside a hook registered on ``hook_name`` (TransformerLens 4 trap)."""
    seen: list[str] = []

    def remember(activation: torch.Tensor, hook: Any) -> torch.Tensor:
        seen.append(hook.name)
        return activation

    with torch.no_grad():
        model.run_with_hooks(tokens[:1], fwd_hooks=[(hook_name, remember)])
    return seen[0] if seen else hook_name


def check_patched_run(patched_run: Callable, model: Any = None) -> None:
    """``patched_run(model, corrupted_tokens, source_cache, name, position) -> logits [batch, pos, vocab]``.

    The corrupted run with the source cache's activation at hook point ``name`` pasted at
    ``position``. The check passes a clean-run cache made with ``names_filter`` that keeps only
    ``name`` (a large model's cache keeps only what is patched), then a full one. Inside a hook,
    TransformerLens 4's ``hook.name`` is the canonical name (``blocks.1.hook_in`` for
    ``blocks.1.hook_resid_pre``), which the filtered cache does not hold: the hook must index
    the cache with ``name``.
    """
    name = "patched_run"
    setup = sweep_setup(model)
    m, b = setup.model, setup.batch
    s2 = int((b.clean_tokens[0] != b.corrupted_tokens[0]).nonzero()[0])
    end = b.clean_tokens.shape[1] - 1
    for hook_name, position in [("blocks.1.hook_resid_pre", s2), ("blocks.0.hook_attn_out", end),
                                ("blocks.2.hook_mlp_out", end)]:
        source = setup.clean_cache[hook_name]
        expected = _patched_by_hand(m, b.corrupted_tokens, source, hook_name, position)
        canonical = _canonical_name(m, b.corrupted_tokens, hook_name)
        for filtered in (True, False):
            if filtered:
                with torch.no_grad():
                    _, cache = m.run_with_cache(b.clean_tokens, names_filter=lambda n, keep=hook_name: n == keep)
                what = f"a cache filtered to {hook_name!r}"
            else:
                cache, what = copy_cache(setup.clean_cache), "a full cache"
            try:
                with torch.no_grad(), setup.guard(name):
                    out = call_learner(name, patched_run, m, b.corrupted_tokens.clone(), cache, hook_name, position)
            except GradingError as err:
                if "KeyError" in str(err) and canonical != hook_name and canonical in str(err):
                    raise GradingError(
                        f"{name}: with {what}, your hook looked up {canonical!r}: inside a hook, hook.name is "
                        f"TransformerLens 4's canonical name, not the {hook_name!r} you registered, and a cache "
                        f"made with names_filter keeps only the names the filter matched. Index the cache with "
                        f"`name`, the hook point your function was given.\n{err}") from None
                raise
            got = to_tensor(name, out)
            where = f"{hook_name} at position {position}, with {what}"
            if got.shape != expected.shape:
                raise GradingError(f"{name}: return the patched run's logits, shape {tuple(expected.shape)} "
                                   f"[batch, pos, vocab]; got {tuple(got.shape)} ({where})")
            if torch.allclose(got, expected, atol=1e-4, rtol=1e-4):
                continue
            known = [
                (setup.corrupted_logits, "that is the unpatched corrupted run: the hook changed nothing. Write "
                 "into the activation (or a copy of it) and return it from the hook"),
                (_patched_by_hand(m, b.corrupted_tokens, source, hook_name, slice(None)),
                 "that pastes every position: copy only activation[:, position]"),
                (_patched_by_hand(m, b.clean_tokens, source, hook_name, position),
                 "that runs the clean tokens: run the corrupted tokens, with the source's value pasted in"),
            ]
            matches = [why for wrong, why in known if torch.allclose(got, wrong.to(got.dtype), atol=1e-4, rtol=1e-4)]
            hint = f" Your logits match {'; or '.join(matches)}." if matches else ""
            worst = (got - expected).abs().max()
            raise GradingError(f"{name}: {where}: your logits differ from the expected patched run by up to "
                               f"{float(worst):.4f}.{hint}")
    report_pass(name, "pastes one position at the hook point it was given, with a filtered or a full cache")


def check_get_act_patch_resid_pre(get_act_patch_resid_pre: Callable, model: Any = None) -> None:
    """``get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, metric) -> [layer, pos]``."""
    run_sweep_check("get_act_patch_resid_pre", get_act_patch_resid_pre, model, "resid_pre", ("layer", "pos"), [
        ("patch resid_post instead of resid_pre", lambda setup, _: library_grid(setup, "resid_post")),
        ("patch resid_mid instead of resid_pre", lambda setup, _: library_grid(setup, "resid_mid")),
        ("patch corrupted values into the clean run (noising) instead of clean values into the "
         "corrupted run", lambda setup, _: library_grid(setup, "resid_pre", "noising")),
    ])


def check_get_act_patch_block_every(get_act_patch_block_every: Callable, model: Any = None) -> None:
    """``get_act_patch_block_every(model, corrupted_tokens, clean_cache, metric) -> [3, layer, pos]``."""
    run_sweep_check("get_act_patch_block_every", get_act_patch_block_every, model, "block", ("site", "layer", "pos"), [
        ("patch corrupted values into the clean run (noising) instead of clean values into the "
         "corrupted run", lambda setup, _: library_grid(setup, "block", "noising")),
        ("use the order (resid_pre, mlp_out, attn_out) instead of (resid_pre, attn_out, mlp_out)",
         lambda _, expected: expected[[0, 2, 1]]),
    ])


# ---------------------------------------------------------------------------------------------
# 04_attention_heads
# ---------------------------------------------------------------------------------------------

def check_patch_head_vector(patch_head_vector: Callable) -> None:
    """``patch_head_vector(activation [batch, pos, head, d_head], hook, head, source_cache)``."""
    name = "patch_head_vector"
    _check_hook(name, patch_head_vector, (2, 5, 4, 3), "blocks.1.attn.hook_z", (2,),
                lambda t: (slice(None), slice(None), 2), "head 2 at every position")
    _check_hook(name, patch_head_vector, (3, 4, 6, 2), "blocks.0.attn.hook_v", (0,),
                lambda t: (slice(None), slice(None), 0), "head 0 at every position")
    report_pass(name, "copies one head's vectors at every position")


def check_get_act_patch_head_out(get_act_patch_head_out: Callable, model: Any = None) -> None:
    """``get_act_patch_head_out(model, corrupted_tokens, clean_cache, metric) -> [layer, head]``."""
    run_sweep_check("get_act_patch_head_out", get_act_patch_head_out, model, "head_out", ("layer", "head"), [
        ("patch the head's values (hook_v) instead of its output (hook_z)",
         lambda setup, _: library_grid(setup, "head_v")),
        ("patch the head's queries (hook_q) instead of its output (hook_z)",
         lambda setup, _: library_grid(setup, "head_q")),
        ("patch corrupted values into the clean run (noising)",
         lambda setup, _: library_grid(setup, "head_out", "noising")),
    ])


def check_get_act_patch_head_out_by_pos(get_act_patch_head_out_by_pos: Callable, model: Any = None) -> None:
    """``get_act_patch_head_out_by_pos(model, corrupted_tokens, clean_cache, metric) -> [layer, pos, head]``."""
    run_sweep_check("get_act_patch_head_out_by_pos", get_act_patch_head_out_by_pos, model, "head_out_by_pos",
                 ("layer", "pos", "head"), [
                     ("order the axes [layer, head, pos] instead of [layer, pos, head]",
                      lambda _, expected: expected.permute(0, 2, 1)),
                 ])


def check_get_act_patch_head_every(get_act_patch_head_every: Callable, model: Any = None) -> None:
    """``get_act_patch_head_every(model, corrupted_tokens, clean_cache, metric) -> [5, layer, head]``."""
    run_sweep_check("get_act_patch_head_every", get_act_patch_head_every, model, "heads_every",
                 ("component", "layer", "head"))


def check_mean_attention(mean_attention: Callable, model: Any = None) -> None:
    """``mean_attention(cache, layer, head) -> [query_pos, key_pos]``, averaged over prompts."""
    name = "mean_attention"
    setup = sweep_setup(model)
    for layer, head in [(0, 0), (setup.model.cfg.n_layers - 1, setup.model.cfg.n_heads - 1), (1, 3)]:
        expected = setup.clean_cache[f"blocks.{layer}.attn.hook_pattern"][:, head].mean(0)
        got = call_learner(name, mean_attention, copy_cache(setup.clean_cache), layer, head)
        compare(f"{name} (layer {layer}, head {head})", got, expected, ("query pos", "key pos"),
                 {"query pos": setup.labels["pos"], "key pos": setup.labels["pos"]}, atol=1e-5, rtol=1e-4)
    report_pass(name, "the head's attention pattern, averaged over the batch")
