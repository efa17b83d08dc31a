"""The sweep driver (patchwidgets.driver): groups of pairs give what one group gives.

A dataset whose cached activations exceed ``max_cache_bytes`` is swept in groups; the
metrics' baselines, the normalisation gap, the mean of a mean ablation and the noise draws
are the whole dataset's, so every value, mean and standard error equals the one-group sweep.
"""

import threading

import pytest
import torch

import patchwidgets as pw
from patchwidgets.driver import pair_groups
from patchwidgets.errors import PatchingCancelled, PatchingInputError
from patchwidgets.grading import ioi_batch
from patchwidgets.sweep import cached_bytes_per_pair


# ---------------------------------------------------------------------------- grouping, by hand
def test_pair_groups_fit_the_budget_and_are_as_equal_as_it_allows():
    assert pair_groups(64, 100, 10_000) == [slice(0, 64)]                 # 6,400 bytes fit
    assert pair_groups(64, 100, 800) == [slice(i, i + 8) for i in range(0, 64, 8)]
    # 10 pairs, 3 per group -> 4 groups, made as equal as possible: 3, 3, 3, 1
    assert pair_groups(10, 100, 300) == [slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 10)]
    assert pair_groups(5, 1000, 10) == [slice(i, i + 1) for i in range(5)]  # never empty groups
    assert pair_groups(7, 0, 1) == [slice(0, 7)]                          # nothing cached: one group


def test_bytes_per_pair_counts_the_residual_stream_keys_values_and_both_runs(toy_model):
    cfg = toy_model.cfg                      # 4 layers, d_model 128, 8 heads of 16
    names = [f"blocks.{l}.hook_resid_pre" for l in range(cfg.n_layers)]
    per_position = 4 * (128 + 2 * 8 * 16) + 2 * 4 * 128   # resid_pre + k + v per layer; both runs' names
    assert cached_bytes_per_pair(toy_model, 15, names) == per_position * 15 * 4


# ---------------------------------------------------------------------------- 8 groups == 1 group
@pytest.fixture(scope="module")
def dataset(toy_model):
    b = ioi_batch(toy_model, 64)
    return b.clean, b.corrupted, list(zip(b.correct, b.incorrect))


def _eight_groups(model, dataset, names) -> int:
    per_pair = cached_bytes_per_pair(model, model.to_tokens(dataset[0][0]).shape[1], names)
    return per_pair * 8


CASES = {
    "resid_pre denoising": dict(site="resid_pre"),
    "head_out noising": dict(site="head_out", direction="noising"),
    "mean ablation": dict(site="head_out", ablation="mean"),
    "noise ablation": dict(site="resid_pre", ablation="noise", noise_seed=3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_eight_groups_give_the_grid_and_standard_errors_of_one(toy_model, dataset, case):
    kwargs = dict(CASES[case])
    clean, corrupted, answers = dataset
    if "ablation" in kwargs:
        corrupted = None
    metrics = ("logit_diff", "normalized", "kl", "prob") if "ablation" not in kwargs or kwargs["ablation"] == "noise" \
        else ("logit_diff", "kl", "prob")
    one = pw.patch(toy_model, clean, corrupted, answers, metrics=metrics, **kwargs)
    site_names = sorted({n for s in [kwargs["site"]] for n in toy_model.hook_dict if n.endswith(
        "hook_resid_pre" if s == "resid_pre" else "attn.hook_z")})
    budget = _eight_groups(toy_model, dataset, site_names)
    grouped = pw.patch(toy_model, clean, corrupted, answers, metrics=metrics, max_cache_bytes=budget, **kwargs)
    assert one.stats["groups"] == 1 and grouped.stats["groups"] == 8
    for m in metrics:
        assert close(grouped.grid(m), one.grid(m)), m
        # Every pair, every cell: float32 noise through four layers of other matrix shapes
        # reaches 3.8e-6 on single pairs (noise ablation; a wrong noise row or mean moves
        # values by 0.1 and more), and averages out in the grid.
        assert close(grouped.values[m], one.values[m], 1e-5), m
    se = [c for c in one.frame.columns if c.endswith("_se")]
    assert se, "a dataset's frame reports standard errors"
    assert close(torch.tensor(grouped.frame[se].to_numpy()), torch.tensor(one.frame[se].to_numpy()))
    for run in one.baselines:
        for m in metrics:
            assert close(grouped.baselines[run][m], one.baselines[run][m])


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> bool:
    """Equal to ``tol``, relative to the size of the value where that is above 1: a group of 8
    pairs runs its matrix products on other shapes than 64 pairs, which moves float32 results
    by an ulp or two (a logit difference of 12.35 by 1.9e-6)."""
    return bool(((a - b).abs() <= tol * torch.clamp(b.abs(), min=1.0)).all())


def test_a_grouped_mean_ablation_uses_the_whole_datasets_mean(toy_model, dataset):
    """Independent check: the mean ablation of a head equals pasting the mean over all 64
    pairs by hand (a group's own mean would differ)."""
    clean, _, answers = dataset
    budget = _eight_groups(toy_model, dataset, ["blocks.0.attn.hook_z"])
    grouped = pw.patch(toy_model, clean, None, answers, site="head_out", ablation="mean", metrics=("logit_diff",),
                       layers=[0], heads=[1], max_cache_bytes=budget)
    tokens = toy_model.to_tokens(clean)
    with torch.no_grad():
        _, cache = toy_model.run_with_cache(tokens, names_filter="blocks.0.attn.hook_z")
    mean = cache["blocks.0.attn.hook_z"].double().mean(0).float()    # [pos, head, d_head]

    def paste(z, hook):
        z = z.clone()
        z[:, :, 1] = mean[:, 1]
        return z
    with torch.no_grad():
        logits = toy_model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", paste)])
    rows = torch.arange(len(clean))
    final = logits[rows, -1]
    correct = torch.tensor([toy_model.to_single_token(a) for a, _ in answers])
    incorrect = torch.tensor([toy_model.to_single_token(b) for _, b in answers])
    expected = (final[rows, correct] - final[rows, incorrect]).mean()
    assert abs(float(grouped.grid("logit_diff")[0, 0]) - float(expected)) <= 1e-4
    assert grouped.stats["groups"] == 8


def test_path_patching_in_groups(toy_model, dataset):
    clean, corrupted, answers = dataset
    names = [f"blocks.{l}.attn.hook_z" for l in range(4)]
    for receivers in (None, [(3, 0)]):
        one = pw.path_patch(toy_model, clean, corrupted, answers, receivers=receivers)
        grouped = pw.path_patch(toy_model, clean, corrupted, answers, receivers=receivers,
                                max_cache_bytes=_eight_groups(toy_model, dataset, names))
        assert grouped.stats["groups"] == 8
        assert close(grouped.grid("normalized"), one.grid("normalized"))


def test_grouped_progress_reaches_the_end_and_cancel_stops(toy_model, dataset):
    clean, corrupted, answers = dataset
    budget = _eight_groups(toy_model, dataset, [f"blocks.{l}.hook_resid_pre" for l in range(4)])
    updates = []
    pw.patch(toy_model, clean, corrupted, answers, max_cache_bytes=budget,
             callback=lambda u: updates.append((u.done, u.total)))
    assert updates[-1][0] == updates[-1][1] and all(a[0] <= b[0] for a, b in zip(updates, updates[1:]))
    cancel = threading.Event()

    def stop_in_the_third_group(update):
        if update.done > 2 * update.total // 8:
            cancel.set()
    with pytest.raises(PatchingCancelled) as err:
        pw.patch(toy_model, clean, corrupted, answers, max_cache_bytes=budget, cancel=cancel,
                 callback=stop_in_the_third_group)
    partial = err.value.partial
    assert partial is not None and partial.done is not None and not bool(partial.done.all())


def test_a_bad_cache_budget_is_refused(toy_model, dataset):
    clean, corrupted, answers = dataset
    for bad in (0, -5, 1.5, "1GiB", True):
        with pytest.raises(PatchingInputError) as err:
            pw.patch(toy_model, clean[:2], corrupted[:2], answers[:2], max_cache_bytes=bad)
        assert err.value.field == "max_cache_bytes"
