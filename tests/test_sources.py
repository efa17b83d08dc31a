"""Source runs: ablation values and the deterministic choice of no-op patches.

Which patches a sweep skips must not depend on the machine: it is decided from the tokens
(a causal model's activation at position p depends on positions 0..p only), never by
comparing floats that differ in their last bits between CPU kernel sets.
"""

import pytest
import torch

import patchwidgets as pw
from patchwidgets.sources import ablation_values, differing_positions
from patchwidgets.inputs import prepare


def test_mean_of_equal_rows_is_bit_identical_to_them():
    # float32 sums of equal values round (e.g. 3 x 0.1 != 0.3 exactly), so a float32 mean
    # of identical rows can differ from the row in the last bit; the float64 mean cannot.
    g = torch.Generator().manual_seed(0)
    row = torch.randn(1, 7, 5, generator=g)
    for n in (3, 5, 6, 7, 8, 11):
        acts = row.expand(n, -1, -1).contiguous()
        mean = ablation_values({"a": acts}, "mean")["a"]
        assert torch.equal(mean, acts)
    # The check above can fail: float32 means of equal rows do miss the row somewhere.
    misses = sum(not torch.equal(row.expand(n, -1, -1).mean(0), row[0]) for n in (3, 5, 6, 7, 11, 13))
    assert misses > 0


def test_mean_ablation_values_are_the_dataset_mean():
    acts = torch.tensor([[1.0, 2.0], [3.0, 6.0]])[:, :, None]  # [batch=2, pos=2, 1]
    mean = ablation_values({"a": acts}, "mean")["a"]
    assert mean.dtype == acts.dtype and mean.shape == acts.shape
    assert mean[:, :, 0].tolist() == [[2.0, 4.0], [2.0, 4.0]]
    assert torch.equal(ablation_values({"a": acts}, "zero")["a"], torch.zeros_like(acts))


def test_differing_positions_by_source(toy_model):
    clean = ["When John and Mary went to the store, Mary gave a drink to",
             "When John and Mary went to the park, John gave a drink to"]
    corrupted = ["When John and Mary went to the store, John gave a drink to",
                 "When John and Mary went to the park, Mary gave a drink to"]
    inputs = prepare(toy_model, clean, corrupted, [(" John", " Mary"), (" Mary", " John")])
    tokens = inputs.clean_str_tokens[0]
    s2 = tokens.index(" Mary", tokens.index(" Mary") + 1)
    assert differing_positions(inputs, None).nonzero().flatten().tolist() == [s2]
    store = tokens.index(" store")
    assert differing_positions(inputs, "mean").nonzero().flatten().tolist() == [store, s2]
    assert differing_positions(inputs, "zero").all()
    assert differing_positions(inputs, "noise", [2, 4]).nonzero().flatten().tolist() == [2, 4]
    assert differing_positions(inputs, "noise").nonzero().flatten().tolist() == list(range(1, inputs.seq_len))


@pytest.mark.parametrize("site", ["head_pattern_by_pos", "resid_pre", "head_out"])
def test_mean_ablation_skips_exactly_the_shared_prefix(toy_model, site):
    """Under a mean ablation a patch is a no-op exactly where every prompt agrees up to its
    position (at layer 0's resid_pre: at its position). Counted by hand from the tokens."""
    from patchwidgets.grading import ioi_batch

    batch = ioi_batch(toy_model, n=8)
    r = pw.patch(toy_model, batch.clean, answers=batch.answers, site=site, ablation="mean",
                 metrics="logit_diff", progress=False)
    tokens = toy_model.to_tokens(batch.clean)  # [8, pos]
    same_at = (tokens == tokens[:1]).all(0)    # [pos]
    same_prefix = same_at.int().cumprod(0).bool()
    n_layers, n_heads = toy_model.cfg.n_layers, toy_model.cfg.n_heads
    if site == "head_pattern_by_pos":
        expected = n_layers * n_heads * int(same_prefix.sum())
    elif site == "resid_pre":
        expected = int(same_at.sum()) + (n_layers - 1) * int(same_prefix.sum())
    else:  # every position of a head: only a no-op if the prompts agree everywhere
        expected = 0
    assert 0 < int(same_prefix.sum()) < tokens.shape[1]
    assert r.stats["skipped_noop"] == expected
    # A skipped patch pastes the mean into positions where it equals every row: no change.
    grid = r.grid("logit_diff")
    assert torch.isfinite(grid).all()
