"""Metrics: *how much* a patch moved the model's answer.

Every metric reads only the logits at the answer position (the last real token of each
prompt), so the engine never unembeds any other position. All metrics are computed from the
same patched forward pass, so asking for all of them costs nothing extra.

Notation, for one prompt pair, with ``c`` the correct and ``i`` the incorrect answer token:

==============  =====================================================================
``logit_diff``  ``logit[c] - logit[i]``: the workhorse. Linear in the residual stream,
                 so it is not saturated by the softmax.
``normalized``  ``(LD_patched - LD_target) / mean(LD_source - LD_target)``: the fraction
                 of the gap between the run being patched (*target*) and the run the
                 activations come from (*source*) that this patch moved. **0 = the patch
                 did nothing, 1 = the patch gave the source run's behaviour**, in both
                 directions. Denoising (target = corrupted, source = clean): 0 = corrupted
                 behaviour, 1 = clean behaviour fully restored, i.e. "sufficient".
                 Noising (target = clean, source = corrupted): 0 = nothing broke, 1 = the
                 clean behaviour was fully destroyed, i.e. "necessary". The gap is
                 averaged over the dataset (the ARENA convention), so the dataset mean is
                 ``(mean LD_patched - mean LD_target) / (mean LD_source - mean LD_target)``.
``logit``       ``logit[c]``.
``logprob``     ``log_softmax(logits)[c]``.
``prob``        ``softmax(logits)[c]``: bounded and saturating, see the course.
``rank``        1 + the number of tokens with a larger logit than ``c`` (1 = top).
``accuracy``    1.0 if ``c`` is the top prediction else 0.0 (discrete: flips or not).
``kl``          ``KL(clean || patched)`` over the whole vocabulary at the answer
                 position: the clean run's distribution is the reference in both
                 directions (0 = the patched run predicts exactly like the clean run:
                 fully restored when denoising, nothing broken when noising). The clean
                 run is the behaviour being explained, and the reference against which
                 circuit discovery (Conmy et al. 2023) scores a circuit; the course (02,
                 05) and its checks use this same definition.
==============  =====================================================================

A custom metric is any callable ``fn(logits)`` or ``fn(logits, correct, incorrect)`` with
``logits`` of shape ``[batch, vocab]`` (answer position only) and token-id tensors
``correct``/``incorrect`` of shape ``[batch]``, returning a ``[batch]`` tensor (or a scalar).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, Union

import torch

from .errors import DegenerateNormalizationError, UnknownMetricError

MetricFn = Callable[..., torch.Tensor]
MetricSpec = Union[str, Sequence[Union[str, MetricFn]], Mapping[str, Union[str, MetricFn]]]



@dataclass(frozen=True)
class MetricInfo:
    """What the rest of the package needs to know about a built-in metric.

    ``label``: the metric in a few words (the widget's menu and heatmap caption).
    ``answer_only``: reads only the answer tokens' logits, so the engine may unembed just
    those columns. ``differentiable``: attribution patching can estimate it from a gradient.
    ``scale``: ``"diverging"`` for a signed value whose 0 means "no effect" (drawn red-white-
    blue around 0), ``"sequential"`` for a value of one sign (drawn light to dark).
    ``high_means``: how to read a high value, for legends.
    """

    name: str
    label: str
    needs_incorrect: bool
    answer_only: bool
    differentiable: bool
    scale: str
    high_means: str


#: The built-in metrics, in the order menus show them.
METRICS: dict[str, MetricInfo] = {m.name: m for m in [
    MetricInfo("logit_diff", "logit difference (correct - incorrect)", True, True, True, "diverging",
               "the correct answer is preferred"),
    MetricInfo("normalized", "normalised logit difference (0 = no effect, 1 = full effect)", True, True, True,
               "diverging", "the patch gave the source run's behaviour (1 = all of it)"),
    MetricInfo("logit", "logit of the correct answer", False, True, True, "diverging",
               "the correct answer's logit is high"),
    MetricInfo("logprob", "log-probability of the correct answer", False, False, True, "sequential",
               "the correct answer is likely (0 = certain)"),
    MetricInfo("prob", "probability of the correct answer", False, False, True, "sequential",
               "the correct answer is likely"),
    MetricInfo("rank", "rank of the correct answer (1 = top)", False, False, False, "sequential",
               "the correct answer is far down the ranking (worse)"),
    MetricInfo("accuracy", "accuracy (correct answer on top)", False, False, False, "sequential",
               "the correct answer is the top prediction"),
    MetricInfo("kl", "KL(clean || patched)", False, False, True, "sequential",
               "the prediction moved away from the clean run's"),
]}
BUILTIN_METRICS = tuple(METRICS)
ALIASES = {"normalised": "normalized", "logit_difference": "logit_diff", "ld": "logit_diff",
           "log_prob": "logprob", "probability": "prob", "top1": "accuracy", "acc": "accuracy"}


@dataclass
class MetricContext:
    """What the metrics need besides the patched logits, one entry per prompt pair."""

    correct: torch.Tensor                 # [batch] token ids
    incorrect: torch.Tensor | None        # [batch] token ids
    clean_logprobs: torch.Tensor          # [batch, vocab] at the answer position
    target_logit_diff: torch.Tensor | None = None  # LD of the unpatched run being patched
    source_logit_diff: torch.Tensor | None = None  # LD of the run the activations come from
    dataset_gap: torch.Tensor | None = None  # the whole dataset's gap, when these are some of its pairs

    @property
    def gap(self) -> torch.Tensor:
        """The mean ``LD_source - LD_target`` over the dataset, which ``normalized`` divides by."""
        if self.dataset_gap is not None:
            return self.dataset_gap
        assert self.source_logit_diff is not None and self.target_logit_diff is not None
        return (self.source_logit_diff - self.target_logit_diff).mean()

    def rows(self, rows: slice) -> "MetricContext":
        """The context of pairs ``rows`` of this dataset (a group of a grouped sweep): their own
        answers and baselines, the whole dataset's gap."""
        def part(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[rows]
        has_gap = self.source_logit_diff is not None and self.target_logit_diff is not None
        return MetricContext(self.correct[rows], part(self.incorrect), self.clean_logprobs[rows],
                             part(self.target_logit_diff), part(self.source_logit_diff),
                             self.gap if has_gap else None)


def resolve_metrics(metrics: MetricSpec) -> dict[str, Union[str, MetricFn]]:
    """Normalise the ``metrics=`` argument into an ordered ``{column name: metric}`` dict."""
    if isinstance(metrics, str) or callable(metrics):
        metrics = [metrics]
    if not isinstance(metrics, (Mapping, list, tuple)):
        raise UnknownMetricError(
            f"metrics must be a metric name, a callable, or a list or dict of them, got {metrics!r}")
    items = metrics.items() if isinstance(metrics, Mapping) else [
        (m if isinstance(m, str) else getattr(m, "__name__", f"metric_{k}"), m)
        for k, m in enumerate(metrics)
    ]
    resolved: dict[str, Union[str, MetricFn]] = {}
    for name, m in items:
        if not isinstance(name, str):
            raise UnknownMetricError(f"metric names (the dict's keys) must be strings, got {name!r}")
        if isinstance(m, str):
            key = ALIASES.get(m, m)
            if key not in BUILTIN_METRICS:
                raise UnknownMetricError(
                    f"unknown metric {m!r}. Built-in metrics: {', '.join(BUILTIN_METRICS)}; "
                    "or pass a callable fn(logits) -> [batch] tensor."
                )
            resolved[ALIASES.get(name, name) if name == m else name] = key
        elif callable(m):
            resolved[name] = m
        else:
            raise UnknownMetricError(f"metric {name!r} must be a name or a callable, got {m!r}")
    if not resolved:
        raise UnknownMetricError("metrics is empty: ask for at least one metric")
    return resolved


def logit_diff(logits: torch.Tensor, correct: torch.Tensor, incorrect: torch.Tensor) -> torch.Tensor:
    """``logit[correct] - logit[incorrect]`` per row; ``logits`` is ``[..., batch, vocab]``."""
    c = logits.gather(-1, correct.expand(logits.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    i = logits.gather(-1, incorrect.expand(logits.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    return c - i


#: ``normalized`` divides by the mean gap ``mean(LD_clean - LD_corrupted)``; below these
#: fractions that gap measures no effect, and dividing by it turns noise into big numbers.
MIN_GAP_FRACTION = 0.05   # of the typical size of the two runs' logit differences
MIN_GAP_AGREEMENT = 0.2   # of the mean size of the per-pair gaps (they cancel below it)


def check_normalization(clean_ld: torch.Tensor, corrupted_ld: torch.Tensor) -> None:
    """Refuse to normalise by a gap that does not measure an effect.

    ``clean_ld``/``corrupted_ld`` are the unpatched runs' logit differences, ``[batch]``.
    The criterion is relative, so it does not depend on the model's logit scale:

    * the mean gap is under :data:`MIN_GAP_AGREEMENT` of the mean per-pair gap size (pairs
      whose gaps have opposite signs cancel: gaps +17 and -17 average to ~0), or
    * the mean gap is under :data:`MIN_GAP_FRACTION` of the logit differences themselves
      (a corruption that barely moves the answer: 7.48 -> 7.44 gives "normalised" values of
      +-3 from rounding-sized changes).

    Raises :class:`DegenerateNormalizationError` listing the per-pair gaps.
    """
    gaps = (clean_ld.double() - corrupted_ld.double()).cpu()     # [batch]
    mean_gap = float(gaps.mean())
    size = float(torch.maximum(clean_ld.abs(), corrupted_ld.abs()).double().mean())
    spread = float(gaps.abs().mean())
    listed = _listed(gaps)
    advice = "Choose a corrupted prompt that changes the answer, or use metric 'logit_diff'."
    if not math.isfinite(mean_gap) or not math.isfinite(size):
        raise DegenerateNormalizationError(
            f"cannot normalise: the logit differences are not finite (per-pair gaps clean - "
            f"corrupted: {listed}).")
    if abs(mean_gap) < MIN_GAP_AGREEMENT * spread:
        # Correct answer = the clean prompt's answer, so a pair's gap should be positive: the
        # negative ones likely give their answers the wrong way round. (Not "the minority sign":
        # when the gaps balance, which sign the mean takes is rounding.)
        against = [i for i, g in enumerate(gaps.tolist()) if g < 0]
        raise DegenerateNormalizationError(
            f"cannot normalise: the per-pair gaps (clean - corrupted logit difference) have "
            f"opposite signs and cancel: mean {mean_gap:+.3g} against a mean size of {spread:.3g}. "
            f"Per-pair gaps: {listed}. Check pairs {against}: are their answers the right way "
            f"round? Or use metric 'logit_diff'.")
    if abs(mean_gap) <= MIN_GAP_FRACTION * size:
        raise DegenerateNormalizationError(
            f"cannot normalise: the corrupted run barely changes the logit difference (mean gap "
            f"clean - corrupted {mean_gap:+.3g}, {_percent(mean_gap, size)} of the logit "
            f"differences' size {size:.3g}; normalising needs at least {MIN_GAP_FRACTION:.0%}), so "
            f"'fraction of the effect restored' would divide by almost nothing. Per-pair gaps: "
            f"{listed}. {advice}")


def _listed(values: torch.Tensor, limit: int = 32) -> str:
    shown = ", ".join(f"{v:+.3g}" for v in values[:limit].tolist())
    more = f", ... ({len(values) - limit} more)" if len(values) > limit else ""
    return f"[{shown}{more}]"


def _percent(part: float, whole: float) -> str:
    return f"{abs(part) / whole:.1%}" if whole > 0 else "all"


def compute(
    metrics: Mapping[str, Union[str, MetricFn]], logits: torch.Tensor, ctx: MetricContext
) -> dict[str, torch.Tensor]:
    """Every requested metric from one set of answer-position logits.

    ``logits`` is ``[n_patches, batch, vocab]``; each returned tensor is ``[n_patches, batch]``.
    Shared intermediate results (log-softmax, the logit difference) are computed once.
    """
    logits = logits.float()
    out: dict[str, torch.Tensor] = {}
    cache: dict[str, torch.Tensor] = {}

    def logprobs() -> torch.Tensor:
        if "lp" not in cache:
            cache["lp"] = logits.log_softmax(-1)
        return cache["lp"]

    def ld() -> torch.Tensor:
        assert ctx.incorrect is not None  # (validation: these metrics need an incorrect answer)
        if "ld" not in cache:
            cache["ld"] = logit_diff(logits, ctx.correct, ctx.incorrect)
        return cache["ld"]

    correct = ctx.correct.expand(logits.shape[:-1]).unsqueeze(-1)
    for name, m in metrics.items():
        if m == "logit_diff":
            v = ld()
        elif m == "normalized":
            assert ctx.target_logit_diff is not None
            v = (ld() - ctx.target_logit_diff) / ctx.gap
        elif m == "logit":
            v = logits.gather(-1, correct).squeeze(-1)
        elif m == "logprob":
            v = logprobs().gather(-1, correct).squeeze(-1)
        elif m == "prob":
            v = logprobs().gather(-1, correct).squeeze(-1).exp()
        elif m == "rank":
            c = logits.gather(-1, correct)
            v = 1.0 + (logits > c).sum(-1).float()
        elif m == "accuracy":
            v = (logits.argmax(-1, keepdim=True) == correct).squeeze(-1).float()
        elif m == "kl":
            p_clean = ctx.clean_logprobs
            v = (p_clean.exp() * (p_clean - logprobs())).sum(-1)
        else:
            assert callable(m)
            v = _call_custom(name, m, logits, ctx)
        out[name] = v
    return out


def _call_custom(name: str, fn: MetricFn, logits: torch.Tensor, ctx: MetricContext) -> torch.Tensor:
    n, b, vocab = logits.shape
    flat = logits.reshape(n * b, vocab)
    try:
        n_params = len(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        n_params = 1
    if n_params >= 3:
        value = fn(flat, ctx.correct.repeat(n), None if ctx.incorrect is None else ctx.incorrect.repeat(n))
    else:
        value = fn(flat)
    value = torch.as_tensor(value, dtype=torch.float32)
    if value.ndim == 0:
        raise UnknownMetricError(
            f"custom metric {name!r} returned a scalar; return one value per row ([batch] tensor) "
            "so the engine can batch many patches in one forward pass"
        )
    if value.shape != (n * b,):
        raise UnknownMetricError(
            f"custom metric {name!r} must return shape [{n * b}] (one value per row), got "
            f"{tuple(value.shape)}"
        )
    return value.reshape(n, b)
