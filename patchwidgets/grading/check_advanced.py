"""Checks for 07_path_patching and 08_attribution_patching."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ._common import (ATOL, GradingError, SweepSetup, call_learner, copy_cache, library_grid, report_pass,
                      run_sweep_check, sweep_setup, to_tensor)


# ---------------------------------------------------------------------------------------------
# 07_path_patching
# ---------------------------------------------------------------------------------------------

_CORRUPTED_CACHES: dict[int, Any] = {}


def _corrupted_cache(setup: SweepSetup) -> Any:
    key = id(setup)
    if key not in _CORRUPTED_CACHES:
        with torch.no_grad():
            _, _CORRUPTED_CACHES[key] = setup.model.run_with_cache(setup.batch.corrupted_tokens)
    return _CORRUPTED_CACHES[key]


def _answers(setup: SweepSetup) -> torch.Tensor:
    return torch.stack([setup.batch.correct_ids, setup.batch.incorrect_ids], 1)


def _library_path(setup: SweepSetup, sender: tuple[int, int], **kwargs) -> float:
    from ..path_patching import path_patch

    b = setup.batch
    result = path_patch(setup.model, b.clean_tokens, b.corrupted_tokens, answers=_answers(setup),
                        senders=[sender], metrics="normalized", progress=False, **kwargs)
    return float(result.grid("normalized")[0])


def _scalar(name: str, value: Any) -> float:
    t = to_tensor(name, value)
    if t.numel() != 1:
        raise GradingError(f"{name}: return one number (the metric of the patched run), got shape {tuple(t.shape)}")
    return float(t)


def check_path_patch_to_logits(path_patch_to_logits: Callable, model: Any = None) -> None:
    """``path_patch_to_logits(model, corrupted_tokens, clean_cache, corrupted_cache, sender, metric,
    freeze_mlps=False) -> scalar``: the path from one sender head to the logits."""
    name = "path_patch_to_logits"
    setup = sweep_setup(model)
    corrupted_cache = _corrupted_cache(setup)
    for sender in [(0, 0), (1, 5), (2, 1)]:
        for freeze in (False, True):
            model, tokens, clean_cache, metric = setup.learner_args()
            with torch.no_grad(), setup.guard(name):
                got = _scalar(name, call_learner(name, path_patch_to_logits, model, tokens, clean_cache,
                                          copy_cache(corrupted_cache), sender, metric, freeze_mlps=freeze))
            expected = _library_path(setup, sender, freeze_mlps=freeze)
            if not math.isclose(got, expected, abs_tol=ATOL):
                hint = ""
                plain = float(library_grid(setup, "head_out")[sender])
                if math.isclose(got, plain, abs_tol=ATOL):
                    hint = (" That is plain activation patching of the head: freeze every *other* head's "
                            "output to the corrupted run, so its effect cannot travel through them.")
                elif freeze and math.isclose(got, _library_path(setup, sender), abs_tol=ATOL):
                    hint = " With freeze_mlps=True the MLP outputs must be frozen to the corrupted run too."
                raise GradingError(f"{name}: sender L{sender[0]}H{sender[1]}, freeze_mlps={freeze}: expected "
                                   f"{expected:.4f}, got {got:.4f}.{hint}")
    report_pass(name, "matches patchwidgets.path_patch(receivers=None) with and without frozen MLPs")


NAME_MOVERS = [(1, 0), (1, 1), (1, 3), (1, 5), (1, 7)]


def check_path_patch_to_queries(path_patch_to_queries: Callable, model: Any = None) -> None:
    """``path_patch_to_queries(model, corrupted_tokens, clean_cache, corrupted_cache, sender, receivers,
    metric) -> scalar``: the path from one sender head to the receivers' queries."""
    name = "path_patch_to_queries"
    setup = sweep_setup(model)
    corrupted_cache = _corrupted_cache(setup)
    for sender, receivers in [((0, 0), NAME_MOVERS), ((0, 3), NAME_MOVERS), ((0, 0), [(1, 5)]),
                              ((1, 5), NAME_MOVERS)]:
        model, tokens, clean_cache, metric = setup.learner_args()
        with torch.no_grad(), setup.guard(name):
            got = _scalar(name, call_learner(name, path_patch_to_queries, model, tokens, clean_cache,
                                      copy_cache(corrupted_cache), sender, list(receivers), metric))
        expected = _library_path(setup, sender, receivers=list(receivers), receiver_input="q")
        if not math.isclose(got, expected, abs_tol=ATOL):
            hint = ""
            if math.isclose(got, _library_path(setup, sender), abs_tol=ATOL):
                hint = (" That is the path to the logits: in step 2, run the corrupted prompt again with "
                        "only the receivers' queries replaced, and let everything else recompute.")
            raise GradingError(
                f"{name}: sender L{sender[0]}H{sender[1]} -> queries of "
                f"{', '.join(f'L{l}H{h}' for l, h in receivers)}: expected {expected:.4f}, got {got:.4f}.{hint}")
    report_pass(name, "matches patchwidgets.path_patch(receivers=..., receiver_input='q')")


# ---------------------------------------------------------------------------------------------
# 08_attribution_patching
# ---------------------------------------------------------------------------------------------

def _library_attribution(setup: SweepSetup, site: str) -> torch.Tensor:
    from ..attribution import attribution_patch

    b = setup.batch
    result = attribution_patch(setup.model, b.clean_tokens, b.corrupted_tokens, answers=_answers(setup),
                               site=site, metrics="normalized")
    return result.grid("normalized")


def _run_attribution_exercise(name: str, fn: Callable, setup: SweepSetup) -> Any:
    try:
        with torch.enable_grad(), setup.guard(name):
            return call_learner(name, fn, *setup.learner_args())
    finally:
        setup.model.zero_grad(set_to_none=True)


def check_attribution_head_out(attribution_head_out: Callable, model: Any = None) -> None:
    """``attribution_head_out(model, corrupted_tokens, clean_cache, metric) -> [layer, head]``."""
    _check_attribution("attribution_head_out", attribution_head_out, model, "head_out", ("layer", "head"))


def check_attribution_resid_pre(attribution_resid_pre: Callable, model: Any = None) -> None:
    """``attribution_resid_pre(model, corrupted_tokens, clean_cache, metric) -> [layer, pos]``."""
    _check_attribution("attribution_resid_pre", attribution_resid_pre, model, "resid_pre", ("layer", "pos"))


def _check_attribution(name: str, fn: Callable, model: Any, site: str, axes: tuple[str, ...]) -> None:
    run_sweep_check(name, fn, model, site, axes, [
        ("return the exact patching result instead of the gradient estimate",
         lambda setup, _: library_grid(setup, site)),
        ("use (corrupted - clean) instead of (clean - corrupted) as the change", lambda _, expected: -expected),
    ], run=_run_attribution_exercise, library=_library_attribution,
        library_name="patchwidgets.attribution_patch", atol=1e-4)
