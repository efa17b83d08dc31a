"""Cancel within a block and a progress bar over the whole sweep (patchwidgets.watch)."""

import threading

import pytest

import patchwidgets as pw
import patchwidgets.watch as watch_mod
from patchwidgets.errors import PatchingCancelled
from patchwidgets.grading import ioi_batch


@pytest.fixture(scope="module")
def batch(toy_model):
    b = ioi_batch(toy_model, 4)
    return b.clean, b.corrupted, list(zip(b.correct, b.incorrect))


def _block_calls(model, on_call):
    """Pre-hooks on every block calling ``on_call(rows)``; returns the handles."""
    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        on_call(hidden.shape[0])
    return [b.register_forward_pre_hook(hook, with_kwargs=True) for b in model.blocks]


def test_cancel_during_the_unpatched_run_stops_within_a_block(toy_model, batch):
    clean, corrupted, answers = batch
    cancel, calls = threading.Event(), []

    def on_call(rows):
        calls.append(rows)
        cancel.set()  # cancelled during the very first block of the target run

    handles = _block_calls(toy_model, on_call)
    try:
        with pytest.raises(PatchingCancelled) as stop:
            pw.patch(toy_model, clean, corrupted, answers, site="resid_pre", cancel=cancel)
    finally:
        for h in handles:
            h.remove()
    assert stop.value.partial is None  # nothing was measured yet
    assert len(calls) == 1  # (our hook runs first; the sweep's own refuses the block)


def test_cancel_inside_a_patched_pass_keeps_the_finished_cells(toy_model, batch):
    clean, corrupted, answers = batch
    cancel, n_rows = threading.Event(), len(clean)
    chunks_done, blocks_after_cancel = [0], [0]

    def callback(update):
        chunks_done[0] += 1

    def on_call(rows):
        if cancel.is_set():
            blocks_after_cancel[0] += 1
        elif chunks_done[0] >= 1 and rows > n_rows:  # inside the second patched pass
            cancel.set()

    handles = _block_calls(toy_model, on_call)
    try:
        with pytest.raises(PatchingCancelled) as stop:
            pw.patch(toy_model, clean, corrupted, answers, site="head_out_by_pos", max_batch_tokens=256,
                     callback=callback, cancel=cancel)
            raise AssertionError("not cancelled")
    finally:
        for h in handles:
            h.remove()
    partial = stop.value.partial
    assert partial is not None and not partial.complete
    assert chunks_done[0] == 1 and partial.done.any() and not partial.done.all()
    assert blocks_after_cancel[0] == 0  # the block it was cancelled in did not run


def test_progress_covers_the_unpatched_runs(toy_model, batch, monkeypatch):
    clean, corrupted, answers = batch
    closed = []
    real_close = watch_mod.SweepWatch.close

    def close(self):
        closed.append((self.work_done, self.total))
        real_close(self)

    pw.patch(toy_model, clean, corrupted, answers)  # (a model's first sweep may learn with one more pass)
    monkeypatch.setattr(watch_mod.SweepWatch, "close", close)
    for site in ("resid_pre", "head_out_by_pos"):
        result = pw.patch(toy_model, clean, corrupted, answers, site=site)
        work_done, total = closed[-1]
        # The estimate is the work: unpatched runs, self-check and every patched pass.
        assert work_done == total
        unpatched = 3 * len(clean) * len(result.clean_str_tokens[0]) * toy_model.cfg.n_layers
        assert total > unpatched
    pw.path_patch(toy_model, clean, corrupted, answers, receivers=[(3, 0)])
    work_done, total = closed[-1]
    assert 0.5 * total <= work_done <= total  # path patching's estimate is an upper bound


def test_a_cancelled_sweep_leaves_no_hook_behind(toy_model, batch):
    clean, corrupted, answers = batch
    before = [len(b._forward_pre_hooks) for b in toy_model.blocks]
    cancel = threading.Event()
    cancel.set()  # cancelled before it starts
    with pytest.raises(PatchingCancelled):
        pw.patch(toy_model, clean, corrupted, answers, cancel=cancel)
    assert [len(b._forward_pre_hooks) for b in toy_model.blocks] == before
    assert pw.patch(toy_model, clean, corrupted, answers).complete
