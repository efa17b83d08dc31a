"""Self-checks for the course's exercise notebooks.

Every exercise in ``exercises/*.ipynb`` is a function stub; the cell after it calls one of the
``check_*`` functions below with the learner's function. A check runs that function on the
bundled ``toy-ioi`` model (whatever model the notebook itself uses) and compares what comes
back with the library's own answer (:func:`patchwidgets.patch` or :mod:`patchwidgets.metrics`):

* on success it prints exactly one line, ``✅ <exercise>: passed (...)``;
* on a wrong answer it raises :class:`GradingError` (an ``AssertionError``) that says what was
  expected, what came back and where the first mismatch is (for a sweep: the layer, position
  or head, with the token at that position), and, when the mistake is a common one, what the
  wrong answer looks like (patching ``resid_post`` instead of ``resid_pre``, say);
* on a stub that still raises ``NotImplementedError`` it re-raises ``NotImplementedError``, so
  the grader (``patchwidgets grade NOTEBOOK``, see :mod:`patchwidgets.cli`) can report the
  exercise as *not attempted* rather than *failed*.

The course helpers :func:`ioi_batch` and :func:`normalized_ld_metric` build the data and the
metric the exercises use, so that the learner's experiment and the check's agree.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch

__all__ = [
    "GradingError", "EXERCISES", "PASS_MARK", "bundled_model", "ioi_batch", "IOIBatch",
    "normalized_ld_metric",
    # 02_metrics
    "check_logit_diff", "check_normalized_metric", "check_noising_metric", "check_logprob",
    "check_prob", "check_rank", "check_kl",
    # 03_residual_stream
    "check_patch_position", "check_get_act_patch_resid_pre", "check_get_act_patch_block_every",
    # 04_attention_heads
    "check_patch_head_vector", "check_get_act_patch_head_out", "check_get_act_patch_head_out_by_pos",
    "check_get_act_patch_head_every", "check_mean_attention",
    # 05_noising_denoising
    "check_or_gate", "check_patch_gate_components", "check_gate_predictions", "check_classify_component",
    # 06_corrupted_prompts
    "check_swap_names", "check_abc_corruption", "reference_swap_names", "reference_abc_corruption",
    # 07_path_patching
    "check_path_patch_to_logits", "check_path_patch_to_queries",
    # 08_attribution_patching
    "check_attribution_head_out", "check_attribution_resid_pre",
]

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
        from .loading import load_model

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
    from .datasets import ioi_prompts

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
    from .patching import patch

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


# ---------------------------------------------------------------------------------------------
# 02_metrics
# ---------------------------------------------------------------------------------------------

def _metric_inputs(model: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Answer-position logits ``[batch, vocab]`` of real clean and corrupted runs, and answers."""
    setup = _sweep_setup(model)
    b = setup.batch
    return setup.clean_logits[:, -1].float(), setup.corrupted_logits[:, -1].float(), b.correct_ids, b.incorrect_ids


def _random_logits(batch: int = 5, vocab: int = 11, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=gen) * 3
    correct = torch.randint(0, vocab, (batch,), generator=gen)
    incorrect = (correct + 1 + torch.randint(0, vocab - 1, (batch,), generator=gen)) % vocab
    return logits, correct, incorrect


def _check_per_row(name: str, fn: Callable, reference: Callable, arg_sets: list[tuple], what: str) -> None:
    for args in arg_sets:
        got = _call(name, fn, *[a.clone() for a in args])
        _compare(name, got, reference(*args), axes=("prompt",), atol=1e-4, rtol=1e-4)
    _passed(name, what)


def check_logit_diff(logit_diff: Callable, model: Any = None) -> None:
    """``logit_diff(logits [batch, vocab], correct [batch], incorrect [batch]) -> [batch]``."""
    from .metrics import logit_diff as ref

    clean, corrupted, c, i = _metric_inputs(model)
    _check_per_row("logit_diff", logit_diff, ref, [(clean, c, i), (corrupted, c, i), _random_logits()],
                   "logit[correct] - logit[incorrect], one value per prompt")


def _ref_normalized(patched: torch.Tensor, target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    return (patched.mean() - target.mean()) / (source.mean() - target.mean())


def check_normalized_metric(normalized_metric: Callable, model: Any = None) -> None:
    """``normalized_metric(patched_ld, target_ld, source_ld) -> scalar`` (per-prompt LDs in)."""
    name = "normalized_metric"
    clean, corrupted, c, i = _metric_inputs(model)
    from .metrics import logit_diff

    clean_ld, corrupted_ld = logit_diff(clean, c, i), logit_diff(corrupted, c, i)
    mixed = logit_diff(0.25 * clean + 0.75 * corrupted, c, i)
    cases = [
        ("the corrupted run itself (denoising target)", corrupted_ld, corrupted_ld, clean_ld, 0.0),
        ("the clean run itself (denoising source)", clean_ld, corrupted_ld, clean_ld, 1.0),
        ("logits 1/4 of the way from corrupted to clean", mixed, corrupted_ld, clean_ld, 0.25),
        ("a patch that overshoots the clean run", 2 * clean_ld - corrupted_ld, corrupted_ld, clean_ld, 2.0),
        ("per-prompt values whose gaps differ", torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0]),
         torch.tensor([4.0, 1.0]), None),
    ]
    for what, patched, target, source, value in cases:
        expected = _ref_normalized(patched, target, source)
        got = _as_tensor(name, _call(name, normalized_metric, patched.clone(), target.clone(), source.clone()))
        if got.numel() != 1:
            raise GradingError(f"{name}: return one number for the whole batch (the mean over prompts), "
                               f"got a tensor of shape {tuple(got.shape)}")
        if not math.isclose(float(got), float(expected), abs_tol=1e-4):
            extra = f" (it should be exactly {value:g} here)" if value is not None else (
                " Average the patched and baseline logit differences over the batch first, then "
                "divide by the mean gap (not the mean of per-prompt ratios).")
            raise GradingError(f"{name}: for {what} expected {float(expected):.4f}, got {float(got):.4f}.{extra}")
    _passed(name, "0 = target run's behaviour, 1 = source run's behaviour")


def check_noising_metric(noising_metric: Callable, model: Any = None) -> None:
    """``noising_metric(patched_ld, clean_ld, corrupted_ld) -> scalar``: 0 = clean, 1 = broken."""
    name = "noising_metric"
    clean, corrupted, c, i = _metric_inputs(model)
    from .metrics import logit_diff

    clean_ld, corrupted_ld = logit_diff(clean, c, i), logit_diff(corrupted, c, i)
    cases = [
        ("an unpatched clean run (nothing broke)", clean_ld, 0.0),
        ("a patch that gives the corrupted run's behaviour (fully broken)", corrupted_ld, 1.0),
        ("a patch that moves the logit difference 40% of the way to corrupted",
         clean_ld + 0.4 * (corrupted_ld - clean_ld), 0.4),
    ]
    for what, patched, value in cases:
        got = _as_tensor(name, _call(name, noising_metric, patched.clone(), clean_ld.clone(), corrupted_ld.clone()))
        if got.numel() != 1:
            raise GradingError(f"{name}: return one number for the batch, got shape {tuple(got.shape)}")
        if not math.isclose(float(got), value, abs_tol=1e-4):
            hint = ""
            if math.isclose(float(got), 1 - value, abs_tol=1e-4):
                hint = (" That is 1 minus the expected value: in noising the run being patched "
                        "(the target, where 0 belongs) is the clean run.")
            raise GradingError(f"{name}: for {what} expected {value:g}, got {float(got):.4f}.{hint}")
    _passed(name, "0 = clean behaviour kept, 1 = clean behaviour destroyed")


def check_logprob(logprob: Callable, model: Any = None) -> None:
    """``logprob(logits [batch, vocab], correct [batch]) -> [batch]``."""
    clean, corrupted, c, _ = _metric_inputs(model)
    r, rc, _ = _random_logits()

    def ref(logits, correct):
        return logits.log_softmax(-1).gather(-1, correct[:, None])[:, 0]

    _check_per_row("logprob", logprob, ref, [(clean, c), (corrupted, c), (r, rc)], "log_softmax(logits)[correct]")


def check_prob(prob: Callable, model: Any = None) -> None:
    """``prob(logits [batch, vocab], correct [batch]) -> [batch]``."""
    clean, corrupted, c, _ = _metric_inputs(model)
    r, rc, _ = _random_logits()

    def ref(logits, correct):
        return logits.softmax(-1).gather(-1, correct[:, None])[:, 0]

    _check_per_row("prob", prob, ref, [(clean, c), (corrupted, c), (r, rc)], "softmax(logits)[correct]")


def check_rank(rank: Callable, model: Any = None) -> None:
    """``rank(logits [batch, vocab], correct [batch]) -> [batch]``, 1 = the top prediction."""
    clean, corrupted, c, _ = _metric_inputs(model)
    r, rc, _ = _random_logits()

    def ref(logits, correct):
        return 1.0 + (logits > logits.gather(-1, correct[:, None])).sum(-1).float()

    name = "rank"
    for args in [(clean, c), (corrupted, c), (r, rc)]:
        got = _as_tensor(name, _call(name, rank, *[a.clone() for a in args]))
        expected = ref(*args)
        if got.shape == expected.shape and bool(torch.equal(got, expected - 1)):
            raise GradingError(f"{name}: your ranks are 0-based; the top prediction should have rank 1")
        _compare(name, got, expected, axes=("prompt",), atol=1e-6, rtol=0)
    _passed(name, "1 + the number of tokens with a larger logit")


def check_kl(kl: Callable, model: Any = None) -> None:
    """``kl(clean_logits [batch, vocab], patched_logits [batch, vocab]) -> [batch]``: KL(clean || patched)."""
    clean, corrupted, _, _ = _metric_inputs(model)
    r1, _, _ = _random_logits(seed=1)
    r2, _, _ = _random_logits(seed=2)

    def ref(p_logits, q_logits):
        p = p_logits.log_softmax(-1)
        return (p.exp() * (p - q_logits.log_softmax(-1))).sum(-1)

    name = "kl"
    for args in [(clean, corrupted), (clean, clean), (r1, r2)]:
        got = _as_tensor(name, _call(name, kl, *[a.clone() for a in args]))
        expected = ref(*args)
        swapped = ref(args[1], args[0])
        if got.shape == expected.shape and not bool(torch.isclose(got, expected, atol=1e-4).all()) and bool(
                torch.isclose(got, swapped, atol=1e-4).all()):
            raise GradingError(f"{name}: you computed KL(patched || clean); the clean distribution is the "
                               "reference: KL(clean || patched) = sum p_clean * (log p_clean - log p_patched)")
        _compare(name, got, expected, axes=("prompt",), atol=1e-4, rtol=1e-4)
    _passed(name, "KL(clean || patched), 0 when the distributions agree")


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
    out = _call(name, fn, passed_in, hook, *index_args, cache)
    got = passed_in if out is None else _as_tensor(name, out)
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
    _passed(name, "copies one position of the source activation and leaves the rest alone")


def check_get_act_patch_resid_pre(get_act_patch_resid_pre: Callable, model: Any = None) -> None:
    """``get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, metric) -> [layer, pos]``."""
    name = "get_act_patch_resid_pre"
    setup = _sweep_setup(model)
    got = _run_sweep_exercise(name, get_act_patch_resid_pre, setup)
    expected = _library_grid(setup, "resid_pre")
    _compare(name, got, expected, ("layer", "pos"), setup.labels, alternatives=[
        ("patch resid_post instead of resid_pre", lambda: _library_grid(setup, "resid_post")),
        ("patch resid_mid instead of resid_pre", lambda: _library_grid(setup, "resid_mid")),
        ("patch corrupted values into the clean run (noising) instead of clean values into the "
         "corrupted run", lambda: _library_grid(setup, "resid_pre", "noising")),
    ])
    _passed(name, f"{tuple(expected.shape)} grid matches patchwidgets.patch(site='resid_pre')")


def check_get_act_patch_block_every(get_act_patch_block_every: Callable, model: Any = None) -> None:
    """``get_act_patch_block_every(model, corrupted_tokens, clean_cache, metric) -> [3, layer, pos]``."""
    name = "get_act_patch_block_every"
    setup = _sweep_setup(model)
    got = _run_sweep_exercise(name, get_act_patch_block_every, setup)
    expected = _library_grid(setup, "block")
    _compare(name, got, expected, ("site", "layer", "pos"), setup.labels, alternatives=[
        ("patch corrupted values into the clean run (noising) instead of clean values into the "
         "corrupted run", lambda: _library_grid(setup, "block", "noising")),
        ("use the order (resid_pre, mlp_out, attn_out) instead of (resid_pre, attn_out, mlp_out)",
         lambda: _library_grid(setup, "block")[[0, 2, 1]]),
    ])
    _passed(name, f"{tuple(expected.shape)} grid matches patchwidgets.patch(site='block')")


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
    _passed(name, "copies one head's vectors at every position")


def check_get_act_patch_head_out(get_act_patch_head_out: Callable, model: Any = None) -> None:
    """``get_act_patch_head_out(model, corrupted_tokens, clean_cache, metric) -> [layer, head]``."""
    name = "get_act_patch_head_out"
    setup = _sweep_setup(model)
    got = _run_sweep_exercise(name, get_act_patch_head_out, setup)
    expected = _library_grid(setup, "head_out")
    _compare(name, got, expected, ("layer", "head"), setup.labels, alternatives=[
        ("patch the head's values (hook_v) instead of its output (hook_z)", lambda: _library_grid(setup, "head_v")),
        ("patch the head's queries (hook_q) instead of its output (hook_z)", lambda: _library_grid(setup, "head_q")),
        ("patch corrupted values into the clean run (noising)", lambda: _library_grid(setup, "head_out", "noising")),
    ])
    _passed(name, f"{tuple(expected.shape)} grid matches patchwidgets.patch(site='head_out')")


def check_get_act_patch_head_out_by_pos(get_act_patch_head_out_by_pos: Callable, model: Any = None) -> None:
    """``get_act_patch_head_out_by_pos(model, corrupted_tokens, clean_cache, metric) -> [layer, pos, head]``."""
    name = "get_act_patch_head_out_by_pos"
    setup = _sweep_setup(model)
    got = _run_sweep_exercise(name, get_act_patch_head_out_by_pos, setup)
    expected = _library_grid(setup, "head_out_by_pos")
    _compare(name, got, expected, ("layer", "pos", "head"), setup.labels, alternatives=[
        ("order the axes [layer, head, pos] instead of [layer, pos, head]",
         lambda: _library_grid(setup, "head_out_by_pos").permute(0, 2, 1)),
    ])
    _passed(name, f"{tuple(expected.shape)} grid matches patchwidgets.patch(site='head_out_by_pos')")


def check_get_act_patch_head_every(get_act_patch_head_every: Callable, model: Any = None) -> None:
    """``get_act_patch_head_every(model, corrupted_tokens, clean_cache, metric) -> [5, layer, head]``."""
    name = "get_act_patch_head_every"
    setup = _sweep_setup(model)
    got = _run_sweep_exercise(name, get_act_patch_head_every, setup)
    expected = _library_grid(setup, "heads_every")
    _compare(name, got, expected, ("component", "layer", "head"), setup.labels)
    _passed(name, f"{tuple(expected.shape)} grid matches patchwidgets.patch(site='heads_every')")


def check_mean_attention(mean_attention: Callable, model: Any = None) -> None:
    """``mean_attention(cache, layer, head) -> [query_pos, key_pos]``, averaged over prompts."""
    name = "mean_attention"
    setup = _sweep_setup(model)
    for layer, head in [(0, 0), (setup.model.cfg.n_layers - 1, setup.model.cfg.n_heads - 1), (1, 3)]:
        expected = setup.clean_cache[f"blocks.{layer}.attn.hook_pattern"][:, head].mean(0)
        got = _call(name, mean_attention, setup.clean_cache, layer, head)
        _compare(f"{name} (layer {layer}, head {head})", got, expected, ("query pos", "key pos"),
                 {"query pos": setup.labels["pos"], "key pos": setup.labels["pos"]}, atol=1e-5, rtol=1e-4)
    _passed(name, "the head's attention pattern, averaged over the batch")


# ---------------------------------------------------------------------------------------------
# 05_noising_denoising
# ---------------------------------------------------------------------------------------------

def check_or_gate(or_gate: Callable) -> None:
    """``or_gate(a, b) -> c`` on tensors of values in [0, 1]: 1 when either input is on."""
    name = "or_gate"
    a = torch.tensor([0.0, 0.0, 1.0, 1.0])
    b = torch.tensor([0.0, 1.0, 0.0, 1.0])
    got = _as_tensor(name, _call(name, or_gate, a.clone(), b.clone()))
    expected = torch.tensor([0.0, 1.0, 1.0, 1.0])
    if got.shape == expected.shape and torch.allclose(got, torch.tensor([0.0, 1.0, 1.0, 2.0])):
        raise GradingError(f"{name}: a + b gives 2 when both inputs are on; an OR gate's output "
                           "should stay at 1 (try torch.maximum(a, b))")
    if got.shape == expected.shape and torch.allclose(got, a * b):
        raise GradingError(f"{name}: that is an AND gate (a * b); OR is on when either input is on")
    _compare(name, got, expected, ("case (a, b) = (0,0), (0,1), (1,0), (1,1)",), atol=1e-5, rtol=0)
    _passed(name, "truth table 0, 1, 1, 1")


def check_patch_gate_components(patch_gate_components: Callable) -> None:
    """``patch_gate_components(model, direction) -> {"A": effect, "B": effect, "C": effect}``.

    ``model`` is a :func:`gate_model`; the effect is the normalised metric of patching that
    one component (0 = no change, 1 = the source run's behaviour).
    """
    name = "patch_gate_components"
    for gate in ("and", "or"):
        model = gate_model(gate)
        for direction in ("denoising", "noising"):
            got = _call(name, patch_gate_components, model, direction)
            expected = _gate_effects(model, direction)
            if not isinstance(got, dict) or set(got) != set(expected):
                raise GradingError(f"{name}: return a dict with keys {sorted(expected)}, got {got!r}")
            for comp in expected:
                value = float(_as_tensor(name, got[comp]).reshape(-1)[0])
                if not math.isclose(value, expected[comp], abs_tol=1e-3):
                    raise GradingError(
                        f"{name}: {gate.upper()} gate, {direction}, component {comp}: expected "
                        f"{expected[comp]:.3f}, got {value:.3f}. (Denoising runs the corrupted input and "
                        "pastes clean values; noising runs the clean input and pastes corrupted values.)")
    _passed(name, "AND and OR gates, both directions")


#: The ground truth for :func:`check_gate_predictions`: which components show a large effect.
_GATE_TRUTH = {
    "and": {"denoising": {"C"}, "noising": {"A", "B", "C"}},
    "or": {"denoising": {"A", "B", "C"}, "noising": {"C"}},
}


def check_gate_predictions(predictions: Any) -> None:
    """``predictions[gate][direction]`` is the set of components whose single patch matters."""
    name = "gate_predictions"
    if callable(predictions):
        predictions = _call(name, predictions)
    if not isinstance(predictions, dict):
        raise GradingError(f"{name}: expected a dict like {{'and': {{'denoising': {{...}}, ...}}, ...}}")
    for gate, by_direction in _GATE_TRUTH.items():
        for direction, truth in by_direction.items():
            try:
                guess = set(predictions[gate][direction])
            except (KeyError, TypeError):
                raise GradingError(f"{name}: missing predictions[{gate!r}][{direction!r}]") from None
            if guess != truth:
                why = {
                    ("and", "denoising"): "restoring A alone leaves B corrupted, and A AND (corrupted B) is still off",
                    ("and", "noising"): "breaking any one input of an AND turns its output off",
                    ("or", "denoising"): "restoring either input alone turns an OR back on",
                    ("or", "noising"): "breaking A alone leaves B clean, and (corrupted A) OR B is still on",
                }[(gate, direction)]
                raise GradingError(f"{name}: {gate.upper()} gate, {direction}: you predicted {sorted(guess)}, "
                                   f"but it is {sorted(truth)}: {why}.")
    _passed(name, "denoising finds a cross-section of an AND and all of an OR; noising the reverse")


_TABLE = {
    (True, True): "necessary and sufficient",
    (True, False): "sufficient but not necessary",
    (False, True): "necessary but not sufficient",
    (False, False): "neither",
}


def check_classify_component(classify_component: Callable) -> None:
    """``classify_component(denoising_effect, noising_effect, threshold=0.5) -> str`` (2x2 table)."""
    name = "classify_component"
    cases = [(0.9, 0.95), (0.8, 0.1), (0.05, 0.7), (0.1, 0.2), (0.5, 0.49), (1.2, -0.1)]
    for d, n in cases:
        got = _call(name, classify_component, d, n)
        expected = _TABLE[(d >= 0.5, n >= 0.5)]
        if not isinstance(got, str) or got.strip().lower() != expected:
            raise GradingError(
                f"{name}: denoising effect {d}, noising effect {n}: expected {expected!r}, got {got!r}. "
                "Denoising (restoring it alone brings the behaviour back) tests sufficiency; "
                "noising (corrupting it alone breaks the behaviour) tests necessity; an effect "
                "counts from the threshold up (>= 0.5).")
    _passed(name, "the necessary / sufficient 2x2 table")


class _Cfg(SimpleNamespace):
    pass


def gate_model(gate: str = "and", backup: float = 0.0):
    """A hand-built three-component circuit ``C = gate(A, B)`` with known ground truth.

    Input: ``[batch, 2]`` tokens, each 0 (feature off) or 1 (feature on). ``A`` reads token 0,
    ``B`` reads token 1 and ``C`` combines them with ``gate`` (``"and"``: ``A * B``;
    ``"or"``: ``max(A, B)``; ``"backup"``: a main component ``A`` plus a backup ``B`` that
    only steps in, with strength ``backup``, when ``A`` is off). The logits are
    ``[batch, 2, 2]`` with the last position's logit difference ``yes - no`` = ``4 C - 2``:
    +2 on the clean input ``[1, 1]`` and -2 on the corrupted input ``[0, 0]``.

    Hooks: ``hook_a``, ``hook_b``, ``hook_c`` (each ``[batch, 1]``), so
    ``patchwidgets.patch(model, clean, corrupted, site="hook_a", index=[(0,)])`` patches A.
    """
    from transformer_lens import HookedRootModule
    from transformer_lens.hook_points import HookPoint

    class GateModel(HookedRootModule):
        def __init__(self):
            super().__init__()
            self.gate = gate
            self.cfg = _Cfg(n_layers=1, n_heads=1, d_model=1, d_vocab=2, n_ctx=2, d_mlp=None)
            self.hook_a = HookPoint()
            self.hook_b = HookPoint()
            self.hook_c = HookPoint()
            self.setup()

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            x = tokens.float()
            a = self.hook_a(x[:, :1])
            b = self.hook_b(x[:, 1:2])
            if gate == "and":
                c = a * b
            elif gate == "or":
                c = torch.maximum(a, b)
            elif gate == "backup":
                c = torch.clamp(a + backup * (1 - a) * b, max=1.0)
            else:
                raise ValueError(f"unknown gate {gate!r}")
            c = self.hook_c(c)
            ld = 4 * c - 2
            logits = torch.zeros(tokens.shape[0], tokens.shape[1], 2)
            logits[:, -1, 1] = ld[:, 0]  # token 1 = "yes", token 0 = "no"
            return logits

    return GateModel()


GATE_CLEAN = torch.tensor([[1, 1]])
GATE_CORRUPTED = torch.tensor([[0, 0]])


def _gate_effects(model: Any, direction: str) -> dict[str, float]:
    from .patching import patch

    out = {}
    for comp in ("A", "B", "C"):
        r = patch(model, GATE_CLEAN, GATE_CORRUPTED, answers=(1, 0), site=f"hook_{comp.lower()}",
                  index=[(0,)], direction=direction, metrics="normalized", progress=False)
        out[comp] = float(r.grid("normalized")[0])
    return out


# ---------------------------------------------------------------------------------------------
# 06_corrupted_prompts
# ---------------------------------------------------------------------------------------------

def _ref_swap(prompt: str, a: str, b: str) -> str:
    def repl(m: re.Match) -> str:
        return b if m.group(0) == a else a

    return re.sub(rf"\b({re.escape(a)}|{re.escape(b)})\b", repl, prompt)


def check_swap_names(swap_names: Callable) -> None:
    """``swap_names(prompt, a, b) -> str``: every ``a`` becomes ``b`` and every ``b`` becomes ``a``."""
    name = "swap_names"
    cases = [
        ("When Mary and John went to the store, John gave a drink to", "Mary", "John"),
        ("When Lisa and Sarah went to the park, Lisa gave the ticket to", "Lisa", "Sarah"),
        ("When Anna and Anne went to the zoo, Anne gave a book to", "Anna", "Anne"),
        ("Then, Sam and Samuel's friend Tom went home. Tom gave a gift to", "Sam", "Tom"),
    ]
    for prompt, a, b in cases:
        expected = _ref_swap(prompt, a, b)
        got = _call(name, swap_names, prompt, a, b)
        if got != expected:
            hint = ""
            if isinstance(got, str) and any(re.search(rf"\b{re.escape(n)}\b", got) is None for n in (a, b)):
                hint = (" Every name ended up the same: replacing a with b and then b with a "
                        "overwrites the first replacement; swap through a placeholder or a regex.")
            elif isinstance(got, str) and "Samuel" not in got and "Samuel" in prompt:
                hint = " Replace whole words only: 'Samuel' is not 'Sam'."
            raise GradingError(f"{name}({prompt!r}, {a!r}, {b!r}):\n  expected {expected!r}\n  got      {got!r}.{hint}")
    _passed(name, "swaps two whole-word names everywhere")


def _ref_abc(prompt: str, io: str, s: str, x: str, y: str, z: str) -> str:
    out = re.sub(rf"\b{re.escape(io)}\b", x, prompt)
    out = re.sub(rf"\b{re.escape(s)}\b", y, out, count=1)
    return re.sub(rf"\b{re.escape(s)}\b", z, out)


def check_abc_corruption(abc_corruption: Callable) -> None:
    """``abc_corruption(prompt, io, s, x, y, z) -> str``: IO -> x, first S -> y, second S -> z."""
    name = "abc_corruption"
    cases = [
        ("When Mary and John went to the store, John gave a drink to", "Mary", "John", "Lisa", "Tom", "Kate"),
        ("When John and Mary went to the store, John gave a drink to", "Mary", "John", "Kate", "Paul", "Emma"),
        ("When Sam and Samuel went to the park, Sam gave a book to", "Samuel", "Sam", "Tom", "Anna", "Rose"),
    ]
    for prompt, io, s, x, y, z in cases:
        expected = _ref_abc(prompt, io, s, x, y, z)
        got = _call(name, abc_corruption, prompt, io, s, x, y, z)
        if got != expected:
            hint = ""
            if isinstance(got, str) and got.count(y) == 2:
                hint = " Both mentions of S became y: only the first one should; the second becomes z."
            raise GradingError(f"{name}({prompt!r}, io={io!r}, s={s!r}, x={x!r}, y={y!r}, z={z!r}):\n"
                               f"  expected {expected!r}\n  got      {got!r}.{hint}")
    _passed(name, "three different names: no name is repeated any more")


def reference_swap_names(prompt: str, a: str, b: str) -> str:
    """The course's reference :func:`swap_names`: exchange two whole-word names everywhere."""
    return _ref_swap(prompt, a, b)


def reference_abc_corruption(prompt: str, io: str, s: str, x: str, y: str, z: str) -> str:
    """The course's reference ABC corruption: IO -> x, first S -> y, second S -> z."""
    return _ref_abc(prompt, io, s, x, y, z)



# ---------------------------------------------------------------------------------------------
# 07_path_patching
# ---------------------------------------------------------------------------------------------

_CORRUPTED_CACHES: dict[int, Any] = {}


def _corrupted_cache(setup: _SweepSetup) -> Any:
    key = id(setup)
    if key not in _CORRUPTED_CACHES:
        with torch.no_grad():
            _, _CORRUPTED_CACHES[key] = setup.model.run_with_cache(setup.batch.corrupted_tokens)
    return _CORRUPTED_CACHES[key]


def _answers(setup: _SweepSetup) -> torch.Tensor:
    return torch.stack([setup.batch.correct_ids, setup.batch.incorrect_ids], 1)


def _library_path(setup: _SweepSetup, sender: tuple[int, int], **kwargs) -> float:
    from .path_patching import path_patch

    b = setup.batch
    result = path_patch(setup.model, b.clean_tokens, b.corrupted_tokens, answers=_answers(setup),
                        senders=[sender], metrics="normalized", progress=False, **kwargs)
    return float(result.grid("normalized")[0])


def _scalar(name: str, value: Any) -> float:
    t = _as_tensor(name, value)
    if t.numel() != 1:
        raise GradingError(f"{name}: return one number (the metric of the patched run), got shape {tuple(t.shape)}")
    return float(t)


def check_path_patch_to_logits(path_patch_to_logits: Callable, model: Any = None) -> None:
    """``path_patch_to_logits(model, corrupted_tokens, clean_cache, corrupted_cache, sender, metric,
    freeze_mlps=False) -> scalar``: the path from one sender head to the logits."""
    name = "path_patch_to_logits"
    setup = _sweep_setup(model)
    corrupted_cache = _corrupted_cache(setup)
    for sender in [(0, 0), (1, 5), (2, 1)]:
        for freeze in (False, True):
            setup.model.reset_hooks()
            with torch.no_grad():
                got = _scalar(name, _call(name, path_patch_to_logits, setup.model, setup.batch.corrupted_tokens,
                                          setup.clean_cache, corrupted_cache, sender, setup.metric,
                                          freeze_mlps=freeze))
            setup.model.reset_hooks()
            expected = _library_path(setup, sender, freeze_mlps=freeze)
            if not math.isclose(got, expected, abs_tol=ATOL):
                hint = ""
                plain = float(_library_grid(setup, "head_out")[sender])
                if math.isclose(got, plain, abs_tol=ATOL):
                    hint = (" That is plain activation patching of the head: freeze every *other* head's "
                            "output to the corrupted run, so its effect cannot travel through them.")
                elif freeze and math.isclose(got, _library_path(setup, sender), abs_tol=ATOL):
                    hint = " With freeze_mlps=True the MLP outputs must be frozen to the corrupted run too."
                raise GradingError(f"{name}: sender L{sender[0]}H{sender[1]}, freeze_mlps={freeze}: expected "
                                   f"{expected:.4f}, got {got:.4f}.{hint}")
    _passed(name, "matches patchwidgets.path_patch(receivers=None) with and without frozen MLPs")


NAME_MOVERS = [(1, 0), (1, 1), (1, 3), (1, 5), (1, 7)]


def check_path_patch_to_queries(path_patch_to_queries: Callable, model: Any = None) -> None:
    """``path_patch_to_queries(model, corrupted_tokens, clean_cache, corrupted_cache, sender, receivers,
    metric) -> scalar``: the path from one sender head to the receivers' queries."""
    name = "path_patch_to_queries"
    setup = _sweep_setup(model)
    corrupted_cache = _corrupted_cache(setup)
    for sender, receivers in [((0, 0), NAME_MOVERS), ((0, 3), NAME_MOVERS), ((0, 0), [(1, 5)]),
                              ((1, 5), NAME_MOVERS)]:
        setup.model.reset_hooks()
        with torch.no_grad():
            got = _scalar(name, _call(name, path_patch_to_queries, setup.model, setup.batch.corrupted_tokens,
                                      setup.clean_cache, corrupted_cache, sender, list(receivers), setup.metric))
        setup.model.reset_hooks()
        expected = _library_path(setup, sender, receivers=list(receivers), receiver_input="q")
        if not math.isclose(got, expected, abs_tol=ATOL):
            hint = ""
            if math.isclose(got, _library_path(setup, sender), abs_tol=ATOL):
                hint = (" That is the path to the logits: in step 2, run the corrupted prompt again with "
                        "only the receivers' queries replaced, and let everything else recompute.")
            raise GradingError(
                f"{name}: sender L{sender[0]}H{sender[1]} -> queries of "
                f"{', '.join(f'L{l}H{h}' for l, h in receivers)}: expected {expected:.4f}, got {got:.4f}.{hint}")
    _passed(name, "matches patchwidgets.path_patch(receivers=..., receiver_input='q')")


# ---------------------------------------------------------------------------------------------
# 08_attribution_patching
# ---------------------------------------------------------------------------------------------

def _library_attribution(setup: _SweepSetup, site: str) -> torch.Tensor:
    from .attribution import attribution_patch

    b = setup.batch
    result = attribution_patch(setup.model, b.clean_tokens, b.corrupted_tokens, answers=_answers(setup),
                               site=site, metrics="normalized")
    return result.grid("normalized")


def _run_attribution_exercise(name: str, fn: Callable, setup: _SweepSetup) -> Any:
    setup.model.reset_hooks()
    try:
        with torch.enable_grad():
            return _call(name, fn, setup.model, setup.batch.corrupted_tokens, setup.clean_cache, setup.metric)
    finally:
        setup.model.reset_hooks()
        setup.model.zero_grad(set_to_none=True)


def check_attribution_head_out(attribution_head_out: Callable, model: Any = None) -> None:
    """``attribution_head_out(model, corrupted_tokens, clean_cache, metric) -> [layer, head]``."""
    name = "attribution_head_out"
    setup = _sweep_setup(model)
    got = _run_attribution_exercise(name, attribution_head_out, setup)
    expected = _library_attribution(setup, "head_out")
    _compare(name, got, expected, ("layer", "head"), setup.labels, alternatives=[
        ("return the exact patching result instead of the gradient estimate",
         lambda: _library_grid(setup, "head_out")),
        ("use (corrupted - clean) instead of (clean - corrupted) as the change", lambda: -expected),
    ], atol=1e-4)
    _passed(name, "matches patchwidgets.attribution_patch(site='head_out')")


def check_attribution_resid_pre(attribution_resid_pre: Callable, model: Any = None) -> None:
    """``attribution_resid_pre(model, corrupted_tokens, clean_cache, metric) -> [layer, pos]``."""
    name = "attribution_resid_pre"
    setup = _sweep_setup(model)
    got = _run_attribution_exercise(name, attribution_resid_pre, setup)
    expected = _library_attribution(setup, "resid_pre")
    _compare(name, got, expected, ("layer", "pos"), setup.labels, alternatives=[
        ("return the exact patching result instead of the gradient estimate",
         lambda: _library_grid(setup, "resid_pre")),
        ("use (corrupted - clean) instead of (clean - corrupted) as the change", lambda: -expected),
    ], atol=1e-4)
    _passed(name, "matches patchwidgets.attribution_patch(site='resid_pre')")
