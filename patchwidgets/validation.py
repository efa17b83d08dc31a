"""Checking a sweep's arguments: one strict layer under every entry point.

:func:`patchwidgets.patch`, :func:`~patchwidgets.path_patch`,
:func:`~patchwidgets.attribution_patch`, ``patch`` on an nnsight model, and through them the
widget, all check their arguments here (prompts and answers in :func:`patchwidgets.inputs.prepare`),
so a bad value raises the same :class:`~patchwidgets.errors.PatchingInputError`, with the same
``.field``, whichever tool it was given to. The rules:

* **integers are integers**: Python and NumPy ints are taken; bools, floats and strings are
  refused, never truncated (``1.5``) or parsed (``"1"``);
* **no wrap-around**: ``-1`` is refused, not read as "the last one"; a value past the end is
  refused with the range it must lie in;
* **an empty list is refused**: it would select nothing (leave the argument out to sweep
  everything);
* **nothing empty is run**: an empty or whitespace-only prompt, an empty list of prompts (or
  ``[]``/``""`` inside one), a token tensor with no positions (``[1, 0]``, ``[0]``) or no rows
  (``[0, 5]``), empty answers (``[]``, ``()``, an empty pair) and an empty answer ``""`` are
  refused (:class:`~patchwidgets.errors.EmptyPromptError` blaming ``clean`` or ``corrupted``,
  :class:`~patchwidgets.errors.AnswerTokenError` blaming ``answers``) before anything is
  tokenised or reshaped; in a dataset the message names the entry (``clean[1]``, ``answers[1]``);
* **nothing invalid is ignored**: ``noise_positions=`` without a noise ablation and ``index=``
  on a named site are errors, not silent no-ops. A restriction the site has no axis for
  (``neurons=`` on ``resid_pre``) is allowed, so one set of restrictions can serve several
  sites, but its values must still exist in the model.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import numpy as np
import torch

from .errors import PatchingInputError
from .metrics import METRICS
from .sites import Dims, Site

DIRECTIONS = ("denoising", "noising")
ABLATIONS = ("zero", "mean", "noise")
# The restriction argument of each sweep axis, and what its values count.
RESTRICTIONS = {"layer": ("layers", "the model's {} layers"), "pos": ("positions", "the prompt ({} tokens)"),
                "head": ("heads", "the {} heads"), "neuron": ("neurons", "the {} MLP neurons")}


# ---------------------------------------------------------------------------- integers
def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (Python, NumPy or a one-element integer tensor), not a bool."""
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.dtype.is_floating_point and value.dtype != torch.bool \
            and not value.dtype.is_complex
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def as_int(value: Any, name: str, field: str) -> int:
    """``value`` as an int, or a :class:`PatchingInputError` naming ``name``."""
    if not is_int(value):
        raise PatchingInputError(f"{name} must be an integer, got {value!r} ({type(value).__name__})", field)
    return int(value)


def int_list(value: Any, name: str, field: str) -> list[int] | None:
    """A non-empty list of ints from a list, tuple, range, array or tensor (``None`` stays ``None``)."""
    if value is None:
        return None
    if isinstance(value, (torch.Tensor, np.ndarray)):
        value = value.reshape(-1).tolist() if value.ndim <= 1 else value
    if not isinstance(value, (list, tuple, range)):
        raise PatchingInputError(f"{name} must be a list of integers such as [0, 2], got {value!r}", field)
    if len(value) == 0:
        raise PatchingInputError(
            f"{name}=[] selects nothing; leave {name} out (None) to sweep every value", field)
    return [as_int(v, f"{name} entries", field) for v in value]


def check_range(values: Sequence[int], name: str, size: int, what: str, field: str) -> None:
    """Every value in ``0..size-1``; negative values are refused, not wrapped around.

    ``what`` says what the values count, with ``{}`` for ``size``: ``"the prompt ({} tokens)"``.
    """
    for v in values:
        if v < 0:
            raise PatchingInputError(
                f"{name}: {v} is negative; give indices from 0 to {size - 1} (negative values are not "
                "counted from the end)", field)
        if v >= size:
            raise PatchingInputError(
                f"{name}: {v} is outside {what.format(size)}: valid values are 0..{size - 1}", field)


# ---------------------------------------------------------------------------- the two runs
def check_direction(direction: Any, corrupted: Any, ablation: Any) -> str:
    """The sweep's direction, defaulted and checked against the ablation (if any)."""
    if ablation is not None:
        if ablation not in ABLATIONS:
            raise PatchingInputError(f"unknown ablation {ablation!r}; choose from {ABLATIONS}", "corrupted")
        if corrupted is not None:
            raise PatchingInputError("give either a corrupted prompt or an ablation, not both", "corrupted")
    elif corrupted is None:
        raise PatchingInputError("give a corrupted prompt (or ablation='zero'|'mean'|'noise')", "corrupted")
    if direction is None:
        direction = "noising" if ablation in ("zero", "mean") else "denoising"
    if direction not in DIRECTIONS:
        raise PatchingInputError(f"direction must be one of {DIRECTIONS} (or None), got {direction!r}",
                                 "direction")
    if ablation in ("zero", "mean") and direction != "noising":
        raise PatchingInputError(
            f"a {ablation} ablation replaces clean activations, so it is noising; "
            "use direction='noising'", "direction")
    return direction


def check_noise(ablation: str | None, noise: Any, noise_positions: Any, noise_seed: Any,
                seq_len: int) -> list[int] | None:
    """Check the noise options (field ``"noise"``); the noised positions, if given."""
    if not isinstance(noise, numbers.Real) or isinstance(noise, (bool, np.bool_)):
        raise PatchingInputError(f"noise must be a number (standard deviations), got {noise!r}", "noise")
    if not math.isfinite(noise) or noise <= 0:
        raise PatchingInputError(
            f"noise must be a finite positive number of standard deviations (ROME uses 3), got {noise!r}",
            "noise")
    as_int(noise_seed, "noise_seed", "noise")
    positions = int_list(noise_positions, "noise_positions", "noise")
    if positions is None:
        return None
    if ablation != "noise":
        raise PatchingInputError("noise_positions is for ablation='noise'", "noise")
    check_range(positions, "noise_positions", seq_len, "the prompt ({} tokens)", "noise")
    return positions


def check_request(metric_fns: dict, inputs: Any, ablation: str | None, *, gradient: bool = False) -> None:
    """Checks that need both the metrics and the prepared inputs (shared by every sweep kind).

    ``gradient``: the metrics will be differentiated (attribution patching).
    """
    names = [m for m in metric_fns.values() if isinstance(m, str)]
    needs_incorrect = [m for m in names if METRICS[m].needs_incorrect]
    if needs_incorrect and inputs.incorrect is None:
        raise PatchingInputError(
            f"metric {needs_incorrect[0]!r} needs an incorrect answer: answers=(correct, incorrect)",
            "answers")
    if inputs.incorrect is not None:
        same = (inputs.correct == inputs.incorrect).nonzero()[:, 0].tolist()
        if same:
            where = f" (pairs {same})" if inputs.batch > 1 else ""
            raise PatchingInputError(
                f"the correct and incorrect answers are the same token{where}, so their logit "
                "difference is always 0: give the answer the corrupted prompt leads to as the "
                "incorrect one", "answers")
    if ablation == "mean" and inputs.batch < 2:
        raise PatchingInputError("mean ablation averages over a dataset: give several clean prompts", "clean")
    if ablation in ("zero", "mean") and "normalized" in names:
        raise PatchingInputError(
            "'normalized' needs a corrupted run to normalise against; a zero or mean ablation has "
            "none. Use 'logit_diff' (or ablation='noise').", "metrics")
    if gradient:
        discrete = [m for m in names if not METRICS[m].differentiable]
        if discrete:
            raise PatchingInputError(
                f"metric {discrete[0]!r} is discrete, so it has no gradient to estimate patches with; use "
                "exact patchwidgets.patch() for it, or a smooth metric (logit_diff, normalized, logprob, ...)",
                "metrics")


# ---------------------------------------------------------------------------- the cells
def check_restrictions(sites: Sequence[Site], dims: Dims, *, layers: Any = None, positions: Any = None,
                       heads: Any = None, neurons: Any = None) -> dict[str, list[int] | None]:
    """The chosen values of each axis (``None``: all of them), checked against the model and prompt.

    Values must exist on every site of a group that sweeps the axis (``heads=[5]`` is refused
    for ``head_k`` of a model with 4 key/value heads), or in the model if no site does.
    """
    given = {"layer": layers, "pos": positions, "head": heads, "neuron": neurons}
    chosen: dict[str, list[int] | None] = {}
    for axis, value in given.items():
        name, what = RESTRICTIONS[axis]
        values = chosen[axis] = int_list(value, name, "site")
        if values is not None:
            size = min([s.axis_size(axis, dims) for s in sites if axis in s.axes] or [dims.size(axis)])
            check_range(values, name, size, what, "site")
    return chosen


def check_index(index: Any, site: Site) -> list[tuple]:
    """The index tuples of a hook-name site: ints and slices (a bare one is a 1-tuple; ``()`` is
    the whole activation)."""
    if site.kind != "raw":
        if index is not None:
            raise PatchingInputError(
                f"index= is for hook-name sites; site {site.name!r} sweeps its axes {site.axes} "
                "(restrict them with layers=, positions=, heads=, neurons=)", "site")
        return []
    if index is None:
        raise PatchingInputError(
            f"site {site.name!r} is a hook name: say which slices to patch with index=[(...), ...]", "site")
    if not isinstance(index, (list, tuple)) or not index:
        raise PatchingInputError(f"index must be a non-empty list of index tuples, got {index!r}", "site")
    rows = []
    for entry in index:
        entry = tuple(entry) if isinstance(entry, (list, tuple)) else (entry,)
        rows.append(tuple(i if isinstance(i, slice) else as_int(i, f"index entries ({entry!r})", "site")
                          for i in entry))
    return rows


def check_index_ranges(site: Site, indices: Sequence[tuple], shape: Sequence[int]) -> None:
    """Each index tuple inside an activation of ``shape`` (batch axis excluded)."""
    for ix in indices:
        if len(ix) > len(shape):
            raise PatchingInputError(
                f"index {ix} has {len(ix)} entries but {site.name!r} has only {len(shape)} axes after the "
                f"batch axis (shape {tuple(shape)})", "site")
        for axis, (i, n) in enumerate(zip(ix, shape)):
            if not isinstance(i, slice):
                check_range([i], f"index {ix} of {site.name!r}", n, f"axis {axis + 1} (size {{}})", "site")
