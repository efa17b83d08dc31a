"""Planning without a model: chunks, offsets, joins and work, against hand-computed numbers.

Throughout: a batch of 2 prompts of 10 tokens, 4 layers, the answer read at position 9
(unless a test says otherwise). A patch joining at layer ``l`` from position ``offset``
costs ``2 * (4 - l) * (10 - offset)`` block-tokens.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from patchwidgets.engine import Engine
from patchwidgets.planning import Chunk, Patch, pass_overhead_tokens, patch_offset, plan, target_work, work
from patchwidgets.sites import SITES, Site

BATCH, SEQ, LAYERS, ANSWER = 2, 10, 4, 9
RESID, HEADS = SITES["resid_pre"], SITES["head_out"]   # index (layer, pos); (layer, head)
RAW = Site("blocks.1.attn.hook_z", "blocks.1.attn.hook_z", ("index",), "raw")


def _plan(patches, budget=10_000, resume=True, skip_prefix=True, overhead=10.0, answer_min=ANSWER):
    return plan(patches, batch=BATCH, seq_len=SEQ, n_layers=LAYERS, answer_min=answer_min,
                max_batch_tokens=budget, resume=resume, skip_prefix=skip_prefix, overhead=overhead)


def _slots(chunks):
    return [[p.slot for p in c.patches] for c in chunks]


def test_a_budget_that_fits_exactly_k_patches_gives_chunks_of_k():
    # Seven heads of layer 2, each first changed at position 5: 2 rows x 5 positions = 10 tokens each.
    patches = [Patch(HEADS, (2, h), h, 5) for h in range(7)]
    chunks = _plan(patches, budget=30)
    assert _slots(chunks) == [[0, 1, 2], [3, 4, 5], [6]]
    assert [(c.layer, c.offset) for c in chunks] == [(2, 5)] * 3
    assert _slots(_plan(patches, budget=29)) == [[0, 1], [2, 3], [4, 5], [6]]


def test_a_budget_smaller_than_one_patch_still_runs_one_patch_per_chunk():
    fast = [Patch(HEADS, (2, h), h, 5) for h in range(3)]
    assert _slots(_plan(fast, budget=1)) == [[0], [1], [2]]
    plain = [Patch(SITES["resid_pre"], (0, 5), 0, 5)]  # (any site: shortcuts off makes every pass plain)
    plain += [Patch(HEADS, (1, h), h + 1, 5) for h in range(2)]
    chunks = _plan(plain, budget=1, resume=False)
    assert _slots(chunks) == [[0], [1], [2]]
    assert all(c.layer is None and c.offset == 0 for c in chunks)


def test_patches_on_different_layers_share_a_pass_and_join_in_layer_order():
    patches = [Patch(HEADS, (3, 0), 0, 9), Patch(HEADS, (1, 0), 1, 9), Patch(HEADS, (2, 1), 2, 9),
               Patch(HEADS, (1, 1), 3, 9)]
    [chunk] = _plan(patches)
    assert chunk.layer == 1 and chunk.offset == 9
    assert _slots([chunk]) == [[1, 3, 2, 0]]          # layer 1, 1, 2, 3 (ties in the given order)
    assert chunk.joins() == {1: 2, 2: 1, 3: 1}
    assert list(chunk.joins()) == [1, 2, 3]
    # Taken latest offset first (layer 3 from position 8, then layer 1 from 6), the rows still
    # join in layer order.
    [chunk] = _plan([Patch(RESID, (3, 8), 0, 8), Patch(RESID, (1, 6), 1, 6)])
    assert (chunk.layer, chunk.offset) == (1, 6)
    assert _slots([chunk]) == [[1, 0]] and list(chunk.joins()) == [1, 3]


def test_the_offset_of_a_patch_is_its_first_changed_position_capped_at_the_answer():
    assert patch_offset(Patch(RESID, (2, 4), 0, 4), answer_min=9, skip_prefix=True) == 4
    assert patch_offset(Patch(HEADS, (2, 0), 0, 3), answer_min=2, skip_prefix=True) == 2   # capped
    assert patch_offset(Patch(RESID, (2, 4), 0, 4), answer_min=9, skip_prefix=False) == 0
    assert patch_offset(Patch(RAW, (0, 1), 0, 4), answer_min=9, skip_prefix=True) == 0     # layout unknown


def test_the_offset_of_a_chunk_is_the_smallest_of_its_patches():
    # Layer 3 patches first changed at 8 and 6: taking the second costs the first's 2 rows one
    # block over 2 more positions (extra = 2 * 1 * 2 = 4 block-tokens).
    patches = [Patch(RESID, (3, 6), 0, 6), Patch(RESID, (3, 8), 1, 8)]
    [chunk] = _plan(patches, overhead=4.0)
    assert (chunk.layer, chunk.offset) == (3, 6)
    assert _slots([chunk]) == [[1, 0]]                # taken latest offset first
    # ...unless that costs more than a pass's overhead over the blocks the new patch runs (3 x 1).
    chunks = _plan(patches, overhead=3.0)
    assert [(c.offset, [p.slot for p in c.patches]) for c in chunks] == [(8, [1]), (6, [0])]
    # An answer read earlier caps both offsets: they share a pass from position 5.
    [chunk] = _plan(patches, overhead=0.0, answer_min=5)
    assert chunk.offset == 5


def test_the_docstring_example():
    """planning's module docstring: four layer-3 patches at positions 6..9."""
    patches = [Patch(RESID, (3, pos), pos, pos) for pos in range(6, 10)]
    [chunk] = _plan(patches, budget=32)
    assert chunk.offset == 6 and _slots([chunk]) == [[9, 8, 7, 6]]
    chunks = _plan(patches, budget=31)
    assert [(c.offset, [p.slot for p in c.patches]) for c in chunks] == [(7, [9, 8, 7]), (6, [6])]


def test_plain_passes_hold_one_hook_and_come_after_resumed_ones():
    # resume off: 45 // (2 x 10) = 2 patches per full pass, hook by hook.
    patches = [Patch(HEADS, (1, 0), 0, 3), Patch(HEADS, (2, 0), 1, 3), Patch(HEADS, (1, 1), 2, 3),
               Patch(HEADS, (1, 2), 3, 3)]
    chunks = _plan(patches, budget=45, resume=False)
    assert _slots(chunks) == [[0, 2], [3], [1]]
    assert all(c.layer is None and c.offset == 0 for c in chunks)
    # resume on: the embedding (outside every block) still runs plainly, after the resumed chunk.
    embed = Site("hook_embed", "hook_embed", ("index",), "raw")
    mixed = [Patch(embed, (3,), 0, 0), Patch(HEADS, (1, 0), 1, 3)]
    chunks = _plan(mixed)
    assert [(c.layer, c.offset, [p.slot for p in c.patches]) for c in chunks] == [(1, 3, [1]), (None, 0, [0])]


def test_no_op_patches_are_not_planned():
    patches = [Patch(HEADS, (1, 0), 0, None), Patch(HEADS, (1, 1), 1, 4), Patch(HEADS, (2, 0), 2, None)]
    assert _slots(_plan(patches)) == [[1]]
    assert _plan([Patch(HEADS, (1, 0), 0, None)]) == []


def test_work_counts_block_tokens():
    plain = Chunk(None, 0, [Patch(HEADS, (1, h), h, 0) for h in range(3)])
    assert work([plain], batch=BATCH, seq_len=SEQ, n_layers=LAYERS) == 3 * 2 * 10 * 4          # 240
    resumed = Chunk(1, 6, [Patch(HEADS, (1, 0), 0, 6), Patch(HEADS, (3, 0), 1, 7)])
    assert work([resumed], batch=BATCH, seq_len=SEQ, n_layers=LAYERS) == 2 * 3 * 4 + 2 * 1 * 4  # 32
    assert work([plain, resumed], batch=BATCH, seq_len=SEQ, n_layers=LAYERS) == 272
    assert work([], batch=BATCH, seq_len=SEQ, n_layers=LAYERS) == 0


def test_target_work_counts_the_run_and_the_self_check():
    # Pass (B) from position 9: copies join at blocks 0, 2 and 3, so blocks 0..3 run 1, 1, 2, 3
    # copies: 7 x 2 rows x 1 position = 14. The run and pass (A): 2 x 10 x 4 = 80 each.
    assert target_work(batch=BATCH, seq_len=SEQ, n_layers=LAYERS, answer_min=ANSWER, taps_verified=False) == 174
    assert target_work(batch=BATCH, seq_len=SEQ, n_layers=LAYERS, answer_min=ANSWER, taps_verified=True) == 94


def test_pass_overhead_tokens():
    # 10 tokens of weight reads, plus 50 MFLOP of call overhead over 24 d_model^2 FLOPs a token.
    assert pass_overhead_tokens(768) == pytest.approx(10 + 50e6 / (24 * 768 ** 2))   # GPT-2 small: ~13.5
    assert pass_overhead_tokens(768) == pytest.approx(13.532, abs=1e-3)
    assert pass_overhead_tokens(None) == pass_overhead_tokens(768)
    assert pass_overhead_tokens(64) == pytest.approx(10 + 50e6 / 98304)              # ~518.6


def test_engine_plan_and_work_need_no_model_run():
    """Engine.plan and Engine.work read only the target run's numbers and the model's shape."""
    shape = SimpleNamespace(blocks=[None] * LAYERS, cfg=SimpleNamespace(d_model=64))  # no weights at all
    engine = Engine(shape, torch.zeros(BATCH, SEQ, dtype=torch.long), torch.full((BATCH,), ANSWER),
                    max_batch_tokens=30)
    patches = [Patch(HEADS, (2, h), h, 5) for h in range(7)]
    # Shortcuts off (the target run has not run): plain passes of 30 // 20 = 1 patch each.
    assert _slots(engine.plan(patches)) == [[h] for h in range(7)]
    engine.can_resume = engine.can_skip_prefix = True
    chunks = engine.plan(patches)
    assert _slots(chunks) == [[0, 1, 2], [3, 4, 5], [6]]
    assert engine.work(chunks) == 7 * 2 * (4 - 2) * (10 - 5)   # 140
    assert engine.work() == 174                                 # a model not yet verified
