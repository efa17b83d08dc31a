"""What a check can tell the learner about their own function when it goes wrong.

A check calls the learner's function with its *own* data (four prompts on the bundled model),
not with the notebook's. The most common way to crash there is a function that reads a
notebook variable (``ioi_metric``, ``batch``, ``clean_cache``, ...) instead of its arguments:
the shapes no longer agree and an ``IndexError`` comes out of the middle of a loop. These
helpers name those variables, say where the function raised, and describe what the check
passed in, so that the message explains the crash instead of just relaying it.

They run both in the grader's process (on a local function) and in the learner's kernel (see
:mod:`._worker`), so they import nothing from the rest of :mod:`patchwidgets.grading`.
"""

from __future__ import annotations

import traceback
import types
from typing import Any, Callable, Sequence


def _names_read(code: types.CodeType) -> set[str]:
    """Global names the code object (and the functions and lambdas nested in it) reads."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names_read(const)
    return names


def _looks_like_data(value: Any) -> bool:
    """Data a notebook builds for its own batch, which a check's data will not match."""
    import torch

    if isinstance(value, (torch.Tensor, torch.nn.Module)):
        return True
    kind = type(value).__name__
    if kind in ("ActivationCache", "IOIBatch", "NormalizedLDMetric"):
        return True
    # A metric written in the notebook: it closes over the notebook's own batch.
    return callable(value) and "metric" in getattr(value, "__name__", "").lower() and \
        getattr(value, "__module__", None) == "__main__"


def notebook_globals(fn: Callable) -> list[str]:
    """Names of notebook variables holding data (tensors, caches, models, batches, metrics)
    that ``fn`` reads as globals rather than taking as arguments."""
    code = getattr(fn, "__code__", None)
    namespace = getattr(fn, "__globals__", None)
    if code is None or namespace is None:  # a builtin, a functools.partial, a class...
        return []
    return sorted(name for name in _names_read(code)
                  if name in namespace and _looks_like_data(namespace[name]))


def where_raised(error: BaseException, fn: Callable | None = None) -> str:
    """``"line 7 of get_act_patch_resid_pre: results[l, p] = ioi_metric(logits)"``: the last
    line of the learner's own code (the cell ``fn`` was defined in) the error passed through."""
    filename = getattr(getattr(fn, "__code__", None), "co_filename", None)
    frames = traceback.extract_tb(error.__traceback__)
    mine = [f for f in frames if f.filename == filename] if filename else []
    if not mine:
        return ""
    frame = mine[-1]
    return f"line {frame.lineno} of {frame.name}: {(frame.line or '').strip()}"


def describe_args(args: Sequence[Any]) -> str:
    """A short account of what a check passed to the learner's function."""
    return ", ".join(_describe(a) for a in args)


def _describe(value: Any) -> str:
    import torch

    kind = type(value).__name__
    if isinstance(value, torch.nn.Module):
        name = str(getattr(getattr(value, "cfg", None), "model_name", "") or "")
        return f"the {name.rstrip('/').split('/')[-1]} model" if name else f"a {kind} model"  # a path: its last part
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)}"
    if kind == "ActivationCache":
        first = next(iter(value.cache_dict.values()), None)
        n = f" of {first.shape[0]} prompts" if first is not None and first.ndim else ""
        return f"an ActivationCache{n}"
    if kind == "NormalizedLDMetric":
        return f"a metric for {len(value.correct_ids)} prompts"
    if isinstance(value, dict):
        keys = list(value)[:3]
        return f"a dict with keys {keys}{'...' if len(value) > 3 else ''}"
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"
