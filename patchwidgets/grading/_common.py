"""The bundled model, the course dataset and the plumbing every check shares."""

from __future__ import annotations

import copy
import itertools
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ._learner_code import describe_args, notebook_globals, where_raised


#: What a passing check prints at the start of its one line; the grader looks for it.
PASS_MARK = "✅"

#: The exercises of each notebook, in order (notebook file stem -> exercise names). The grader
#: uses this to list exercises whose self-check cell was deleted.
EXERCISES: dict[str, list[str]] = {
    "02_metrics": ["logit_diff", "normalized_metric", "noising_metric", "logprob", "prob", "rank", "kl"],
    "03_residual_stream": ["patch_position", "patched_run", "get_act_patch_resid_pre", "get_act_patch_block_every"],
    "04_attention_heads": ["patch_head_vector", "get_act_patch_head_out", "get_act_patch_head_out_by_pos",
                           "get_act_patch_head_every", "mean_attention"],
    "05_noising_denoising": ["or_gate", "gate_predictions", "patch_gate_components", "classify_component",
                             "patch_with_kl", "ablate_head"],
    "06_corrupted_prompts": ["swap_names", "abc_corruption"],
    "07_path_patching": ["path_patch_to_logits", "path_patch_to_queries", "circuit_edges"],
    "08_attribution_patching": ["attribution_head_out", "attribution_resid_pre"],
    "09_nnsight": ["record_resid_pre", "patch_resid_pre", "resid_pre_sweep", "last_logits"],
    "10_ioi_circuit": ["direct_logit_attribution", "end_attention", "copy_scores", "path_at",
                       "mean_ablated_logit_diff", "faithfulness", "minimality"],
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

# Models a check hands to the learner's function, by name. The grader runs that function in
# the learner's kernel (see grader.py) and a model cannot travel there by pickle: the kernel
# builds its own from the name instead.
_MODEL_REFS: "weakref.WeakKeyDictionary[Any, tuple]" = weakref.WeakKeyDictionary()


def name_model(model: Any, *ref: Any) -> Any:
    """Record how the kernel can build its own copy of ``model`` (see :mod:`._worker`)."""
    _MODEL_REFS[model] = ref
    return model


def model_ref(model: Any) -> tuple | None:
    return _MODEL_REFS.get(model)


def bundled_model() -> Any:
    """The bundled ``toy-ioi`` model on the CPU, loaded once per process."""
    global _MODEL
    if _MODEL is None:
        from ..loading import load_model

        _MODEL = name_model(load_model("toy-ioi", device="cpu"), "bundled_model")
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


class NormalizedLDMetric:
    """The metric :func:`normalized_ld_metric` returns: ``metric(logits) -> scalar``.

    A class rather than a closure so that it can be pickled: the grader sends it, with the rest
    of a check's arguments, to the learner's kernel.
    """

    def __init__(self, clean_ld: torch.Tensor, corrupted_ld: torch.Tensor, correct_ids: torch.Tensor,
                 incorrect_ids: torch.Tensor, direction: str = "denoising"):
        self.clean_ld, self.corrupted_ld = clean_ld, corrupted_ld
        self.correct_ids, self.incorrect_ids, self.direction = correct_ids, incorrect_ids, direction

    def mean_ld(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of ``logit[correct] - logit[incorrect]`` at the last position."""
        final = logits[:, -1].float()
        rows = torch.arange(len(self.correct_ids))
        return (final[rows, self.correct_ids] - final[rows, self.incorrect_ids]).mean()

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        target, source = ((self.corrupted_ld, self.clean_ld) if self.direction == "denoising"
                          else (self.clean_ld, self.corrupted_ld))
        return (self.mean_ld(logits) - target) / (source - target)

    def copy(self) -> "NormalizedLDMetric":
        return NormalizedLDMetric(self.clean_ld.clone(), self.corrupted_ld.clone(), self.correct_ids.clone(),
                                  self.incorrect_ids.clone(), self.direction)


def normalized_ld_metric(
    clean_logits: torch.Tensor, corrupted_logits: torch.Tensor, correct_ids: torch.Tensor,
    incorrect_ids: torch.Tensor, direction: str = "denoising",
) -> NormalizedLDMetric:
    """A metric ``fn(logits [batch, pos, vocab]) -> scalar`` for hand-written sweeps.

    It reads the last position's logits, takes the mean logit difference
    ``logit[correct] - logit[incorrect]`` over the batch and normalises it so that 0 means "as
    the run being patched" and 1 means "as the run the patched values come from": for
    denoising 0 = corrupted and 1 = clean; for noising 0 = clean and 1 = corrupted.
    """
    metric = NormalizedLDMetric(torch.tensor(0.0), torch.tensor(0.0), correct_ids, incorrect_ids, direction)
    metric.clean_ld = metric.mean_ld(clean_logits).detach()
    metric.corrupted_ld = metric.mean_ld(corrupted_logits).detach()
    return metric


# ---------------------------------------------------------------------------------------------
# Plumbing shared by the checks
# ---------------------------------------------------------------------------------------------

def call_learner(name: str, fn: Callable, *args, **kwargs) -> Any:
    """Call the learner's ``fn``; a stub's NotImplementedError becomes a clear one, and any
    other exception a GradingError that says what the check passed in (see :func:`_crashed`)."""
    if not callable(fn):
        raise GradingError(f"{name}: expected a function, got {type(fn).__name__} {fn!r}")
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise NotImplementedError(
            f"{name} is not implemented yet: replace `raise NotImplementedError()` in the cell "
            "above with your code, run that cell, then run this check again") from None
    except GradingError:
        raise
    except Exception as err:
        raise GradingError(_crashed(name, fn, args, err)) from err


def _globals_read(fn: Callable) -> list[str]:
    # A RemoteFunction (the grader's stand-in) brings the list from the kernel.
    found = getattr(fn, "notebook_globals", None)
    return list(found) if found is not None else notebook_globals(fn)


def _globals_note(fn: Callable) -> str:
    names = _globals_read(fn)
    if not names:
        return ""
    listed = ", ".join(f"`{n}`" for n in names)
    return (f"Your function reads the notebook variable(s) {listed}; the check passes its own "
            "model, tokens, cache and metric as arguments, so use those instead.")


def _crashed(name: str, fn: Callable, args: Sequence[Any], err: Exception) -> str:
    """The message for a learner's function that raised: the error, where, and with what."""
    type_name = getattr(err, "type_name", type(err).__name__)  # a LearnerError keeps the kernel's type
    where = getattr(err, "where", None) or where_raised(err, fn)
    lines = [f"{name} raised {type_name}: {err}"]
    if where:
        lines.append(f"  at {where}")
    lines.append(f"The check called {name} with its own arguments: {describe_args(args)}.")
    note = _globals_note(fn)
    if note:
        lines.append(note)
    elif type_name in ("IndexError", "RuntimeError", "ValueError"):
        lines.append("A shape or index that does not fit these arguments often means the function "
                     "relies on the notebook's own batch (its size, its positions) somewhere.")
    return "\n".join(lines)


def report_pass(name: str, detail: str) -> None:
    print(f"{PASS_MARK} {name}: passed ({detail})")


def to_tensor(name: str, value: Any) -> torch.Tensor:
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


def compare(
    name: str,
    got: Any,
    expected: torch.Tensor,
    axes: Sequence[str],
    labels: dict[str, Sequence[str]] | None = None,
    alternatives: Sequence[tuple[str, Callable[[], torch.Tensor]]] = (),
    atol: float = ATOL,
    rtol: float = RTOL,
) -> torch.Tensor:
    """Raise a GradingError describing the first mismatch of ``got`` against ``expected``.

    After the mismatch itself, the message says what the wrong answer looks like, most specific
    first: one of the check's known ``alternatives`` (``(description, make_wrong_answer)``),
    else a pattern any wrong sweep can show (see :func:`_patterns`).
    """
    labels = labels or {}
    got = to_tensor(name, got)
    expected = expected.detach().cpu().float()
    shape_desc = " x ".join(f"{a}={n}" for a, n in zip(axes, expected.shape))
    if got.shape != expected.shape:
        raise GradingError(
            f"{name}: expected a tensor of shape {tuple(expected.shape)} ({shape_desc}), "
            f"got shape {tuple(got.shape)}.{_shape_hint(got, expected, axes, atol, rtol)}")
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

    def same(alt: torch.Tensor) -> bool:
        return alt.shape == got.shape and bool(torch.isclose(got, alt, atol=atol, rtol=rtol).all())

    for description, make in alternatives:
        try:
            alt = make().detach().cpu().float()
        except Exception:
            continue
        if same(alt):
            lines.append(f"Your values match what you get when you {description}.")
            break
    else:
        lines += _patterns(got, expected, axes, same)
    raise GradingError("\n".join(lines))


def _axes_order(axes: Sequence[str], perm: Sequence[int]) -> str:
    return "[" + ", ".join(axes[p] if p < len(axes) else f"axis {p}" for p in perm) + "]"


def _shape_hint(got: torch.Tensor, expected: torch.Tensor, axes: Sequence[str], atol: float, rtol: float) -> str:
    """Why the shape is wrong: axes in another order (say which, and the permute that fixes
    it) before "the right number of values", since reshaping permuted axes scrambles them."""
    if got.ndim == expected.ndim and sorted(got.shape) == sorted(expected.shape):
        orders = [p for p in itertools.permutations(range(expected.ndim))
                  if tuple(expected.permute(p).shape) == tuple(got.shape)]
        exact = [p for p in orders if torch.isclose(expected.permute(p), got, atol=atol, rtol=rtol).all()]
        p = (exact or orders)[0]
        back = tuple(p.index(i) for i in range(len(p)))  # got.permute(back) has the expected order
        fix = ".T" if got.ndim == 2 else f".permute{back}"
        kind = " It looks transposed." if got.ndim == 2 else ""
        values = "the right values, with " if exact else ""
        return (f"{kind} It has {values}the axes in the order {_axes_order(axes, p)}; the check wants "
                f"{_axes_order(axes, range(len(axes)))}: reorder them with {fix} (reshape or view "
                "would keep the values in the wrong places).")
    if got.numel() == expected.numel():
        return f" It has the right number of values: reshape it to {tuple(expected.shape)}."
    return ""


def _patterns(got: torch.Tensor, expected: torch.Tensor, axes: Sequence[str],
              same: Callable[[torch.Tensor], bool]) -> list[str]:
    """What a wrong grid looks like, for mistakes any check can recognise without knowing the
    exercise: nothing patched, every position patched at once, the axes scrambled by a
    reshape, a sign flip, a missing or different normalisation."""
    if bool((got.abs() < 1e-6).all()):
        return ["Every value is 0, the metric of the corrupted run with nothing patched. Is the patch "
                "applied at all? A hook that returns nothing changes the activation only if it writes "
                "into it in place; check the hook name and fwd_hooks=[(name, hook)]. (A results tensor "
                "that is never written to stays 0 too.)"]
    if "pos" in axes and got.ndim > 1:
        pos = list(axes).index("pos")
        flat = (got.amax(pos) - got.amin(pos)).abs().max() < 1e-6
        if flat and float((expected.amax(pos) - expected.amin(pos)).abs().max()) > 1e-3:
            everything = " (every value is 1: each patch restores the whole clean run)" if \
                bool(((got - 1).abs() < 1e-4).all()) else ""
            return [f"Your values do not change along the position axis{everything}: each patch "
                    "seems to paste every position at once. Paste only the one position, "
                    "activation[:, position] = ..., not the whole activation."]
    if got.numel() > 1 and float(got.max() - got.min()) < 1e-6:
        return [f"Every value is the same ({_fmt(float(got.flatten()[0]))}): do the results depend on the "
                "layer, position or head you patch?"]
    if 1 < expected.ndim <= 4:
        for p in itertools.permutations(range(expected.ndim)):
            if list(p) != sorted(p) and same(expected.permute(p).reshape(expected.shape)):
                return [f"Your values are the right ones in the wrong places: this is a tensor with the axes "
                        f"{_axes_order(axes, p)} reshaped (or viewed) to the expected shape. Reorder axes "
                        "with .permute(...), not reshape or view."]
    if same(-expected):
        return ["Every value has the opposite sign: subtract the other way round "
                "(correct - incorrect, clean - corrupted)."]
    if same(1 - expected):
        return ["Your values are 1 minus the expected ones: 0 and 1 are swapped. 0 is the run being "
                "patched, 1 the run the patched values come from."]
    return _affine_hint(got, expected)


def _affine_hint(got: torch.Tensor, expected: torch.Tensor) -> list[str]:
    """``got = a * expected + b`` exactly (but not the identity): a normalisation problem."""
    x, y = expected.flatten().double(), got.flatten().double()
    if x.numel() < 3 or float(x.std()) < 1e-6:
        return []
    a = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    b = float(y.mean() - a * x.mean())
    if float((y - (a * x + b)).abs().max()) > 1e-3 * max(1.0, float(y.abs().max())):
        return []
    return [f"Your values are exactly {a:.4g} x expected {'+' if b >= 0 else '-'} {abs(b):.4g}: the "
            "right experiment on a different scale. A missing or different normalisation? "
            "Normalised = (value - corrupted) / (clean - corrupted), so 0 = corrupted and 1 = clean."]


def _table(t: torch.Tensor) -> str:
    rows = t.reshape(1, -1) if t.ndim < 2 else t
    return "\n".join("  " + " ".join(f"{float(v):8.4f}" for v in row) for row in rows)


def _mean_ld(logits: torch.Tensor, correct: torch.Tensor, incorrect: torch.Tensor) -> torch.Tensor:
    final = logits[:, -1].float()
    rows = torch.arange(len(correct))
    return final[rows, correct] - final[rows, incorrect]


@dataclass
class SweepSetup:
    """What the sweep checks share, built once per process: the model, a 4-prompt batch, its
    clean run and cache, and the denoising metric.

    The learner's function never gets these objects themselves, only :meth:`learner_args`
    (fresh copies), and :meth:`guard` puts the model's weights back if a call changed them:
    a wrong answer that writes into ``clean_cache`` or the weights must not make a right answer
    fail in the next check.
    """

    model: Any
    batch: IOIBatch
    clean_logits: torch.Tensor
    corrupted_logits: torch.Tensor
    clean_cache: Any
    metric: NormalizedLDMetric
    labels: dict[str, list[str]]
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    #: Results the checks computed on this setup and keep (a check's own reference answers), by key.
    #: Valid only while :meth:`changed_weights` is empty; never copied to another setup.
    memos: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def learner_args(self) -> tuple[Any, torch.Tensor, Any, NormalizedLDMetric]:
        """``(model, corrupted_tokens, clean_cache, metric)``, all but the model copies."""
        return self.model, self.batch.corrupted_tokens.clone(), copy_cache(self.clean_cache), self.metric.copy()

    def guard(self, name: str) -> "_WeightGuard":
        return _WeightGuard(name, self.model, self.weights)

    def changed_weights(self) -> list[str]:
        """The parameters that are no longer those the setup was built with. A memo (:attr:`memos`)
        may be reused only while this is empty: the model is then the one it was computed on
        (:meth:`guard` puts back what a learner's function changes; this also sees a model
        changed between two checks)."""
        return _changed_parameters(self.model, self.weights)


def _changed_parameters(model: Any, weights: dict[str, torch.Tensor]) -> list[str]:
    """Names of ``model``'s parameters that differ from ``weights`` (values, dtype or device).
    Weights offloaded by accelerate sit on the ``meta`` device between calls: nothing to compare."""
    changed = []
    for n, p in model.named_parameters():
        if p.device.type == "meta":
            continue
        w = weights.get(n)
        if w is None or (p.dtype, p.device) != (w.dtype, w.device) or not torch.equal(p.detach(), w):
            changed.append(n)
    return changed


def copy_cache(cache: Any) -> Any:
    """A copy of an ActivationCache (or dict) whose tensors the learner may write into."""
    new = copy.copy(cache)
    if hasattr(cache, "cache_dict"):
        new.cache_dict = {k: v.clone() for k, v in cache.cache_dict.items()}
        return new
    return {k: v.clone() for k, v in cache.items()}


class _WeightGuard:
    """Around a call of the learner's function: no hooks before or after, and the same weights
    after as before (restored, and reported as a mistake, if the function changed them)."""

    def __init__(self, name: str, model: Any, weights: dict[str, torch.Tensor]):
        self.name, self.model, self.weights = name, model, weights

    def __enter__(self) -> None:
        self.model.reset_hooks()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.model.reset_hooks()
        changed = _changed_parameters(self.model, self.weights)
        if changed:
            with torch.no_grad():
                for n, p in self.model.named_parameters():
                    if p.device.type != "meta":
                        p.copy_(self.weights[n])
            if exc_type is None or issubclass(exc_type, Exception):
                raise GradingError(
                    f"{self.name} changed the model's weights ({', '.join(changed[:3])}"
                    f"{', ...' if len(changed) > 3 else ''}). Patching changes activations, through hooks, "
                    "never parameters. (The check has put the weights back.)") from exc


_SETUPS: dict[int, SweepSetup] = {}


def sweep_setup(model: Any = None, n: int = 4) -> SweepSetup:
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
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        _SETUPS[key] = SweepSetup(model, batch, clean_logits, corrupted_logits, clean_cache, metric, labels, weights)
    return _SETUPS[key]


def library_grid(setup: SweepSetup, site: str, direction: str = "denoising") -> torch.Tensor:
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


def _run_sweep_exercise(name: str, fn: Callable, setup: SweepSetup) -> Any:
    with setup.guard(name):
        return call_learner(name, fn, *setup.learner_args())


def run_sweep_check(name: str, fn: Callable, model: Any, site: str, axes: Sequence[str],
                 alternatives: Sequence[tuple[str, Callable[[Any, torch.Tensor], torch.Tensor]]] = (), *,
                 run: Callable = _run_sweep_exercise, library: Callable = library_grid,
                 library_name: str = "patchwidgets.patch", atol: float = ATOL) -> None:
    """Run a learner's sweep ``fn(model, corrupted_tokens, clean_cache, metric)`` and compare it
    with ``library(setup, site)``. Each alternative is ``(what went wrong, wrong(setup, expected))``:
    when the learner's grid equals a known wrong answer, the message says which mistake it is."""
    setup = sweep_setup(model)
    got = run(name, fn, setup)
    expected = library(setup, site)
    gap = setup.metric.clean_ld - setup.metric.corrupted_ld
    alternatives = [*alternatives, (
        "return the raw logit difference instead of the normalised metric (0 = corrupted, 1 = clean)",
        lambda _, expected: expected * gap + setup.metric.corrupted_ld)]
    try:
        compare(name, got, expected, axes, setup.labels, atol=atol, alternatives=[
            (why, (lambda wrong=wrong: wrong(setup, expected))) for why, wrong in alternatives])
    except GradingError as err:
        note = _globals_note(fn)  # a function that reads notebook data computes something else
        raise GradingError(f"{err}\n{note}" if note else str(err)) from None
    report_pass(name, f"{tuple(expected.shape)} grid matches {library_name}(site='{site}')")
