"""Checks for 02_metrics."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ._common import GradingError, to_tensor, call_learner, compare, report_pass, sweep_setup


# ---------------------------------------------------------------------------------------------
# 02_metrics
# ---------------------------------------------------------------------------------------------

def _metric_inputs(model: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Answer-position logits ``[batch, vocab]`` of real clean and corrupted runs, and answers."""
    setup = sweep_setup(model)
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
        got = call_learner(name, fn, *[a.clone() for a in args])
        compare(name, got, reference(*args), axes=("prompt",), atol=1e-4, rtol=1e-4)
    report_pass(name, what)


def check_logit_diff(logit_diff: Callable, model: Any = None) -> None:
    """``logit_diff(logits [batch, vocab], correct [batch], incorrect [batch]) -> [batch]``."""
    from ..metrics import logit_diff as ref

    clean, corrupted, c, i = _metric_inputs(model)
    _check_per_row("logit_diff", logit_diff, ref, [(clean, c, i), (corrupted, c, i), _random_logits()],
                   "logit[correct] - logit[incorrect], one value per prompt")


def _ref_normalized(patched: torch.Tensor, target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    return (patched.mean() - target.mean()) / (source.mean() - target.mean())


def _normalisation_hint(got: float, patched: torch.Tensor, target: torch.Tensor, source: torch.Tensor) -> str:
    """Name the usual slips in ``(patched - target) / (source - target)``, by the value they give."""
    p, t, s = float(patched.mean()), float(target.mean()), float(source.mean())
    right = (p - t) / (s - t)
    slips = [
        (p - t, "You subtracted the target but did not divide by the gap (source - target): that is "
                "the raw change in logit difference, not a fraction of the way to the source run."),
        (p, "That is the patched run's own mean logit difference: normalise it, "
            "(patched - target) / (source - target)."),
        (-right, "The sign is flipped: subtract in the order (patched - target) / (source - target)."),
        (1 - right, "That is 1 minus the right value: target and source are swapped (0 belongs to the "
                    "target, the run being patched)."),
    ]
    for value, why in slips:
        if math.isclose(got, value, abs_tol=1e-4):
            return " " + why
    return ""


def check_normalized_metric(normalized_metric: Callable, model: Any = None) -> None:
    """``normalized_metric(patched_ld, target_ld, source_ld) -> scalar`` (per-prompt LDs in)."""
    name = "normalized_metric"
    clean, corrupted, c, i = _metric_inputs(model)
    from ..metrics import logit_diff

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
        got = to_tensor(name, call_learner(name, normalized_metric, patched.clone(), target.clone(), source.clone()))
        if got.numel() != 1:
            raise GradingError(f"{name}: return one number for the whole batch (the mean over prompts), "
                               f"got a tensor of shape {tuple(got.shape)}")
        if not math.isclose(float(got), float(expected), abs_tol=1e-4):
            extra = f" (it should be exactly {value:g} here)" if value is not None else (
                " Average the patched and baseline logit differences over the batch first, then "
                "divide by the mean gap (not the mean of per-prompt ratios).")
            raise GradingError(f"{name}: for {what} expected {float(expected):.4f}, got {float(got):.4f}."
                               f"{extra}{_normalisation_hint(float(got), patched, target, source)}")
    report_pass(name, "0 = target run's behaviour, 1 = source run's behaviour")


def check_noising_metric(noising_metric: Callable, model: Any = None) -> None:
    """``noising_metric(patched_ld, clean_ld, corrupted_ld) -> scalar``: 0 = clean, 1 = broken."""
    name = "noising_metric"
    clean, corrupted, c, i = _metric_inputs(model)
    from ..metrics import logit_diff

    clean_ld, corrupted_ld = logit_diff(clean, c, i), logit_diff(corrupted, c, i)
    cases = [
        ("an unpatched clean run (nothing broke)", clean_ld, 0.0),
        ("a patch that gives the corrupted run's behaviour (fully broken)", corrupted_ld, 1.0),
        ("a patch that moves the logit difference 40% of the way to corrupted",
         clean_ld + 0.4 * (corrupted_ld - clean_ld), 0.4),
    ]
    for what, patched, value in cases:
        got = to_tensor(name, call_learner(name, noising_metric, patched.clone(), clean_ld.clone(),
                                           corrupted_ld.clone()))
        if got.numel() != 1:
            raise GradingError(f"{name}: return one number for the batch, got shape {tuple(got.shape)}")
        if not math.isclose(float(got), value, abs_tol=1e-4):
            hint = ""
            if math.isclose(float(got), 1 - value, abs_tol=1e-4):
                hint = (" That is 1 minus the expected value: in noising the run being patched "
                        "(the target, where 0 belongs) is the clean run.")
            raise GradingError(f"{name}: for {what} expected {value:g}, got {float(got):.4f}.{hint}")
    report_pass(name, "0 = clean behaviour kept, 1 = clean behaviour destroyed")


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
        got = to_tensor(name, call_learner(name, rank, *[a.clone() for a in args]))
        expected = ref(*args)
        if got.shape == expected.shape and bool(torch.equal(got, expected - 1)):
            raise GradingError(f"{name}: your ranks are 0-based; the top prediction should have rank 1")
        compare(name, got, expected, axes=("prompt",), atol=1e-6, rtol=0)
    report_pass(name, "1 + the number of tokens with a larger logit")


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
        got = to_tensor(name, call_learner(name, kl, *[a.clone() for a in args]))
        expected = ref(*args)
        swapped = ref(args[1], args[0])
        if got.shape == expected.shape and not bool(torch.isclose(got, expected, atol=1e-4).all()) and bool(
                torch.isclose(got, swapped, atol=1e-4).all()):
            raise GradingError(f"{name}: you computed KL(patched || clean); the clean distribution is the "
                               "reference: KL(clean || patched) = sum p_clean * (log p_clean - log p_patched)")
        compare(name, got, expected, axes=("prompt",), atol=1e-4, rtol=1e-4)
    report_pass(name, "KL(clean || patched), 0 when the distributions agree")
