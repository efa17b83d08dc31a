"""The bundled model, the course dataset and the plumbing every check shares."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch


#: What a passing check prints at the start of its one line; the grader looks for it.
PASS_MARK = "✅"

#: The exercises of each notebook, in order (notebook file stem -> exercise names). The grader
#: uses this to list exercises whose self-check cell was deleted.
EXERCISES: dict[str, list[str]] = {
    "02_metrics": ["logit_diff", "normalized_metric", "noising_metric", "logprob", "prob", "rank", "kl"],
    "03_residual_stream": ["patch_position", "get_act_patch_resid_pre", "get_act_patch_block_every"],
    "04_attention_heads": ["patch_head_vector", "get_act_patch_head_out", "get_act_patch_head_out_by_pos",
                           "get_act_patch_head_every", "mean_attention"],
    "05_noising_denoising": ["or_gate", "gate_predictions", "patch_gate_components", "classify_component"],
    "06_corrupted_prompts": ["swap_names", "abc_corruption"],
    "07_path_patching": ["path_patch_to_logits", "path_patch_to_queries"],
    "08_attribution_patching": ["attribution_head_out", "attribution_resid_pre"],
}

#: The IOI template the course's datasets use: all its prompts have the same number of tokens
#: once the object is a two-word phrase ("a drink", "the ticket", ...).
IOI_TEMPLATE = "When {A} and {B} went to the {PLACE}, {S} gave {OBJECT} to {IO}."
REFERENCE_PAIR = ("When Mary and John went to the store, John gave a drink to",
                  "When Mary and John went to the store, Mary gave a drink to", " Mary", " John")

ATOL = 1e-3
RTOL = 1e-3


class GradingError(AssertionError):
    """A self-check found a wrong answer; the message says what and where."""


# ---------------------------------------------------------------------------------------------
# The bundled model and the course's dataset
# ---------------------------------------------------------------------------------------------

_MODEL: Any = None


def bundled_model() -> Any:
    """The bundled ``toy-ioi`` model on the CPU, loaded once per process."""
    global _MODEL
    if _MODEL is None:
        from ..loading import load_model

        _MODEL = load_model("toy-ioi", device="cpu")
    return _MODEL


@dataclass
class IOIBatch:
    """A batch of IOI prompt pairs that all have the same number of tokens.

    ``clean`` prompts end where the indirect object (IO) should be predicted; ``corrupted``
    prompts repeat the IO instead of the subject (S) in the second clause, which flips the
    answer. ``correct`` is the IO name and ``incorrect`` the S name, both with their leading
    space. Token tensors are ``[batch, pos]``; ``correct_ids``/``incorrect_ids`` are ``[batch]``.
    """

    clean: list[str]
    corrupted: list[str]
    correct: list[str]
    incorrect: list[str]
    clean_tokens: torch.Tensor
    corrupted_tokens: torch.Tensor
    correct_ids: torch.Tensor
    incorrect_ids: torch.Tensor
    str_tokens: list[str]

    @property
    def answers(self) -> list[tuple[str, str]]:
        """One ``(correct, incorrect)`` pair per prompt, the form :func:`patchwidgets.patch` takes."""
        return list(zip(self.correct, self.incorrect))

    def __len__(self) -> int:
        return len(self.clean)

    def position_labels(self) -> list[str]:
        """``"10: ' John'"``-style labels for the positions of the first clean prompt."""
        return [f"{i}: {t!r}" for i, t in enumerate(self.str_tokens)]


def ioi_batch(model: Any = None, n: int = 8, seed: int = 0, include_reference: bool = True) -> IOIBatch:
    """``n`` IOI prompt pairs of equal token length, from :func:`patchwidgets.datasets.ioi_prompts`.

    The first pair is the course's running example ("When Mary and John went to the store, John
    gave a drink to" -> " Mary") unless ``include_reference=False``. The rest alternate between
    the ABBA and BABA name orders. The same arguments always give the same batch.
    """
    from ..datasets import ioi_prompts

    model = bundled_model() if model is None else model
    items: list[tuple[str, str, str, str]] = [REFERENCE_PAIR] if include_reference else []
    candidates = ioi_prompts(6 * n + 12, split="test", seed=seed, templates=[IOI_TEMPLATE])
    target_len = None

    def n_tokens(text: str) -> int | None:
        try:
            return int(model.to_tokens(text).shape[1])
        except Exception:  # e.g. a word a word-level tokenizer does not know
            return None

    if items:
        target_len = n_tokens(items[0][0])
    else:
        lengths = [n_tokens(c["clean"]) for c in candidates]
        known = [x for x in lengths if x is not None]
        target_len = max(set(known), key=known.count)
    for c in candidates:
        if len(items) >= n:
            break
        if n_tokens(c["clean"]) == target_len and n_tokens(c["corrupted"]) == target_len:
            items.append((c["clean"], c["corrupted"], c["correct"], c["incorrect"]))
    if len(items) < n:
        raise ValueError(f"could only find {len(items)} IOI prompts of {target_len} tokens; ask for fewer")
    clean, corrupted, correct, incorrect = (list(x) for x in zip(*items[:n]))

    def ids(words: list[str]) -> torch.Tensor:
        return torch.tensor([int(model.to_tokens(w, prepend_bos=False)[0, 0]) for w in words])

    clean_tokens = model.to_tokens(clean).cpu()
    return IOIBatch(
        clean=clean, corrupted=corrupted, correct=correct, incorrect=incorrect,
        clean_tokens=clean_tokens, corrupted_tokens=model.to_tokens(corrupted).cpu(),
        correct_ids=ids(correct), incorrect_ids=ids(incorrect),
        str_tokens=list(model.to_str_tokens(clean_tokens[0])),
    )


def normalized_ld_metric(
    clean_logits: torch.Tensor, corrupted_logits: torch.Tensor, correct_ids: torch.Tensor,
    incorrect_ids: torch.Tensor, direction: str = "denoising",
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A metric ``fn(logits [batch, pos, vocab]) -> scalar`` for hand-written sweeps.

    It reads the last position's logits, takes the mean logit difference
    ``logit[correct] - logit[incorrect]`` over the batch and normalises it so that 0 means "as
    the run being patched" and 1 means "as the run the patched values come from": for
    denoising 0 = corrupted and 1 = clean; for noising 0 = clean and 1 = corrupted.
    """
    rows = torch.arange(len(correct_ids))

    def mean_ld(logits: torch.Tensor) -> torch.Tensor:
        final = logits[:, -1].float()
        return (final[rows, correct_ids] - final[rows, incorrect_ids]).mean()

    clean_ld, corrupted_ld = mean_ld(clean_logits).detach(), mean_ld(corrupted_logits).detach()
    target, source = (corrupted_ld, clean_ld) if direction == "denoising" else (clean_ld, corrupted_ld)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return (mean_ld(logits) - target) / (source - target)

    return metric


# ---------------------------------------------------------------------------------------------
# Plumbing shared by the checks
# ---------------------------------------------------------------------------------------------

def _call(name: str, fn: Callable, *args, **kwargs) -> Any:
    """Call the learner's ``fn``; a stub's NotImplementedError becomes a clear one."""
    if not callable(fn):
        raise GradingError(f"{name}: expected a function, got {type(fn).__name__} {fn!r}")
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise NotImplementedError(
            f"{name} is not implemented yet: replace `raise NotImplementedError()` in the cell "
            "above with your code, run that cell, then run this check again") from None


def _passed(name: str, detail: str) -> None:
    print(f"{PASS_MARK} {name}: passed ({detail})")


def _as_tensor(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().float()
    try:
        return torch.as_tensor(value, dtype=torch.float32)
    except Exception:
        raise GradingError(f"{name}: expected a tensor, got {type(value).__name__}: {value!r}") from None


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.4f}"


def _describe_index(idx: Sequence[int], axes: Sequence[str], labels: dict[str, Sequence[str]]) -> str:
    parts = []
    for i, axis in zip(idx, axes):
        if axis in labels and i < len(labels[axis]):
            parts.append(f"{axis} {i} ({labels[axis][i]})")
        else:
            parts.append(f"{axis} {i}")
    return ", ".join(parts)


def _compare(
    name: str,
    got: Any,
    expected: torch.Tensor,
    axes: Sequence[str],
    labels: dict[str, Sequence[str]] | None = None,
    alternatives: Sequence[tuple[str, Callable[[], torch.Tensor]]] = (),
    atol: float = ATOL,
    rtol: float = RTOL,
) -> torch.Tensor:
    """Raise a GradingError describing the first mismatch of ``got`` against ``expected``."""
    labels = labels or {}
    got = _as_tensor(name, got)
    expected = expected.detach().cpu().float()
    shape_desc = " x ".join(f"{a}={n}" for a, n in zip(axes, expected.shape))
    if got.shape != expected.shape:
        hint = ""
        if got.ndim == 2 and expected.ndim == 2 and got.shape == expected.shape[::-1]:
            hint = " It looks transposed: put the first axis first."
        elif got.numel() == expected.numel():
            hint = f" It has the right number of values: reshape it to {tuple(expected.shape)}."
        raise GradingError(
            f"{name}: expected a tensor of shape {tuple(expected.shape)} ({shape_desc}), "
            f"got shape {tuple(got.shape)}.{hint}")
    if torch.isnan(got).any() and not torch.isnan(expected).any():
        idx = [int(i) for i in torch.nonzero(torch.isnan(got))[0]]
        raise GradingError(
            f"{name}: got NaN at {_describe_index(idx, axes, labels)} (expected "
            f"{_fmt(float(expected[tuple(idx)]))}). Did you divide by zero, or leave a cell unfilled?")
    close = torch.isclose(got, expected, atol=atol, rtol=rtol, equal_nan=True)
    if bool(close.all()):
        return got
    idx = [int(i) for i in torch.nonzero(~close)[0]]
    n_bad = int((~close).sum())
    lines = [
        f"{name}: {n_bad} of {expected.numel()} values differ from the reference "
        f"(tolerance {atol:g}).",
        f"First mismatch at {_describe_index(idx, axes, labels)}: expected "
        f"{_fmt(float(expected[tuple(idx)]))}, got {_fmt(float(got[tuple(idx)]))}.",
    ]
    if expected.numel() <= 64 and expected.ndim <= 2:
        lines.append(f"Expected:\n{_table(expected)}\nGot:\n{_table(got)}")
    if bool((got == 0).all()):
        lines.append("Everything you returned is 0: did you fill in the results tensor?")
    elif got.numel() > 1 and float(got.max() - got.min()) < 1e-6:
        lines.append("Every value is the same: is the patch applied at all (the hook name, "
                     "fwd_hooks=..., returning the patched activation)?")
    for description, make in alternatives:
        try:
            alt = make().detach().cpu().float()
        except Exception:
            continue
        if alt.shape == got.shape and bool(torch.isclose(got, alt, atol=atol, rtol=rtol).all()):
            lines.append(f"Your values match what you get when you {description}.")
            break
    raise GradingError("\n".join(lines))


def _table(t: torch.Tensor) -> str:
    rows = t.reshape(1, -1) if t.ndim < 2 else t
    return "\n".join("  " + " ".join(f"{float(v):8.4f}" for v in row) for row in rows)


def _mean_ld(logits: torch.Tensor, correct: torch.Tensor, incorrect: torch.Tensor) -> torch.Tensor:
    final = logits[:, -1].float()
    rows = torch.arange(len(correct))
    return final[rows, correct] - final[rows, incorrect]


@dataclass
class _SweepSetup:
    model: Any
    batch: IOIBatch
    clean_logits: torch.Tensor
    corrupted_logits: torch.Tensor
    clean_cache: Any
    metric: Callable[[torch.Tensor], torch.Tensor]
    labels: dict[str, list[str]]


_SETUPS: dict[int, _SweepSetup] = {}


def _sweep_setup(model: Any = None, n: int = 4) -> _SweepSetup:
    """Model, a small IOI batch, the clean cache and the denoising metric for sweep checks."""
    model = bundled_model() if model is None else model
    key = id(model) * 100 + n
    if key not in _SETUPS:
        batch = ioi_batch(model, n=n)
        with torch.no_grad():
            clean_logits, clean_cache = model.run_with_cache(batch.clean_tokens)
            corrupted_logits = model(batch.corrupted_tokens)
        metric = normalized_ld_metric(clean_logits, corrupted_logits, batch.correct_ids, batch.incorrect_ids)
        labels = {"pos": [repr(t) for t in batch.str_tokens],
                  "site": ["resid_pre", "attn_out", "mlp_out"],
                  "component": ["output (z)", "query", "key", "value", "pattern"]}
        _SETUPS[key] = _SweepSetup(model, batch, clean_logits, corrupted_logits, clean_cache, metric, labels)
    return _SETUPS[key]


def _library_grid(setup: _SweepSetup, site: str, direction: str = "denoising") -> torch.Tensor:
    """The library's normalised-logit-difference grid for ``site`` on the setup's batch."""
    from ..patching import patch

    b = setup.batch
    if direction == "denoising":
        result = patch(setup.model, b.clean_tokens, b.corrupted_tokens, answers=torch.stack(
            [b.correct_ids, b.incorrect_ids], 1), site=site, metrics="normalized", progress=False)
        return result.grid("normalized")
    # Noising, but measured with the denoising metric (0 = corrupted, 1 = clean): what a learner
    # gets by patching corrupted values into the clean run and keeping the metric.
    result = patch(setup.model, b.clean_tokens, b.corrupted_tokens, answers=torch.stack(
        [b.correct_ids, b.incorrect_ids], 1), site=site, direction="noising", metrics="logit_diff",
        progress=False)
    clean_ld = _mean_ld(setup.clean_logits, b.correct_ids, b.incorrect_ids).mean()
    corrupted_ld = _mean_ld(setup.corrupted_logits, b.correct_ids, b.incorrect_ids).mean()
    return (result.grid("logit_diff") - corrupted_ld) / (clean_ld - corrupted_ld)


def _run_sweep_exercise(name: str, fn: Callable, setup: _SweepSetup) -> Any:
    setup.model.reset_hooks()
    try:
        return _call(name, fn, setup.model, setup.batch.corrupted_tokens, setup.clean_cache, setup.metric)
    finally:
        setup.model.reset_hooks()


def _check_sweep(name: str, fn: Callable, model: Any, site: str, axes: Sequence[str],
                 alternatives: Sequence[tuple[str, Callable[[Any, torch.Tensor], torch.Tensor]]] = (), *,
                 run: Callable = _run_sweep_exercise, library: Callable = _library_grid,
                 library_name: str = "patchwidgets.patch", atol: float = ATOL) -> None:
    """Run a learner's sweep ``fn(model, corrupted_tokens, clean_cache, metric)`` and compare it
    with ``library(setup, site)``. Each alternative is ``(what went wrong, wrong(setup, expected))``:
    when the learner's grid equals a known wrong answer, the message says which mistake it is."""
    setup = _sweep_setup(model)
    got = run(name, fn, setup)
    expected = library(setup, site)
    _compare(name, got, expected, axes, setup.labels, atol=atol, alternatives=[
        (why, (lambda wrong=wrong: wrong(setup, expected))) for why, wrong in alternatives])
    _passed(name, f"{tuple(expected.shape)} grid matches {library_name}(site='{site}')")
