"""One model, many callers (patchwidgets.sharing): every call gives what it gives alone.

The model's hooks are shared by every thread that uses it, so without the per-pass lock a
notebook call made during a widget's sweep runs through the widget's hooks. These tests make
many calls from several threads at once, in random interleavings, and compare each with the
same call made alone; ``PATCHWIDGETS_SHARING_ROUNDS`` repeats the whole mix (the issue asks
for 20 rounds in a row under CPU load when the code changes; CI runs it once).
"""

import os
import random
import threading
import time

import pytest
import torch

import patchwidgets as pw
from patchwidgets.errors import PatchingCancelled
from patchwidgets.grading import ioi_batch
from patchwidgets.sharing import ModelLock, lock_of

ROUNDS = int(os.environ.get("PATCHWIDGETS_SHARING_ROUNDS", "1"))


# ---------------------------------------------------------------------------- the lock itself
def test_the_lock_is_fair_a_releasing_thread_queues_behind_a_waiting_one():
    lock, order, started = ModelLock(), [], threading.Event()
    lock.acquire()

    def other():
        started.set()
        lock.acquire()
        order.append("other")
        lock.release()

    t = threading.Thread(target=other)
    t.start()
    started.wait()
    while not lock._queue:  # (until the other thread is in line)
        time.sleep(0.001)
    lock.release()
    lock.acquire()          # asks again at once, as a sweep does between chunks
    order.append("me")
    lock.release()
    t.join()
    assert order == ["other", "me"]


def test_the_lock_is_reentrant_and_says_who_holds_it():
    lock, heard = ModelLock(), []
    lock.acquire()
    lock.acquire()
    assert lock.depth == 2
    got = threading.Event()

    def other():
        lock.acquire(on_wait=heard.append)
        got.set()
        lock.release()

    t = threading.Thread(target=other, name="notebook-call")
    t.start()
    time.sleep(0.05)
    lock.release()
    assert not got.is_set()   # still held once
    lock.release()
    t.join(5)
    assert got.is_set() and heard == [threading.current_thread().name, ""]


def test_a_cancelled_caller_stops_waiting_for_the_lock():
    lock, cancel = ModelLock(), threading.Event()
    lock.acquire()
    errors = []

    def check():
        if cancel.is_set():
            raise PatchingCancelled(None)

    def other():
        try:
            lock.acquire(check=check)
        except PatchingCancelled as e:
            errors.append(e)

    t = threading.Thread(target=other)
    t.start()
    time.sleep(0.05)
    cancel.set()
    t.join(5)
    assert not t.is_alive() and len(errors) == 1
    assert not lock._queue   # it left the line
    lock.release()
    lock.acquire()           # and the lock is free for the next caller
    lock.release()


# ---------------------------------------------------------------------------- many callers
@pytest.fixture(scope="module")
def pairs(toy_model):
    """Two IOI datasets of different prompt lengths (a mix of shapes is what broke before)."""
    a = ioi_batch(toy_model, 4)
    b = ioi_batch(toy_model, 2, seed=5, include_reference=False)
    short = ("When John and Mary went to the store, Mary gave a drink to",
             "When John and Mary went to the store, John gave a drink to", (" John", " Mary"))
    return [(a.clean, a.corrupted, list(zip(a.correct, a.incorrect))),
            (b.clean, b.corrupted, list(zip(b.correct, b.incorrect))), short]


def _calls(pairs):
    """Every kind of call a learner makes, each a zero-argument function of the model."""
    calls = []
    for i, (clean, corrupted, answers) in enumerate(pairs):
        for site in ("resid_pre", "head_out", "head_out_by_pos", "attn_out", "head_v", "mlp_out"):
            for direction in ("denoising", "noising"):
                calls.append((f"patch {site} {direction} #{i}",
                              lambda m, c=clean, k=corrupted, a=answers, s=site, d=direction: pw.patch(
                                  m, c, k, a, site=s, direction=d, max_batch_tokens=256).grid("normalized")))
        calls.append((f"path_patch logits #{i}", lambda m, c=clean, k=corrupted, a=answers: pw.path_patch(
            m, c, k, a, max_batch_tokens=256).grid("normalized")))
        calls.append((f"path_patch q #{i}", lambda m, c=clean, k=corrupted, a=answers: pw.path_patch(
            m, c, k, a, receivers=[(2, 1), (3, 0)], receiver_input="q", max_batch_tokens=256).grid("logit_diff")))
        calls.append((f"attribution head_out #{i}", lambda m, c=clean, k=corrupted, a=answers: pw.attribution_patch(
            m, c, k, a, site="head_out").grid("normalized")))
        calls.append((f"attribution resid_pre #{i}", lambda m, c=clean, k=corrupted, a=answers:
                      pw.attribution_patch(m, c, k, a, site="resid_pre").grid("logit_diff")))
        calls.append((f"noise ablation #{i}", lambda m, c=clean, a=answers: pw.patch(
            m, c, answers=a, ablation="noise", site="resid_pre", max_batch_tokens=256).grid("logit_diff")))
        if isinstance(clean, str):
            continue  # (mean ablation averages over a dataset)
        calls.append((f"mean ablation #{i}", lambda m, c=clean, a=answers: pw.patch(
            m, c, answers=a, ablation="mean", site="head_out", metrics=("logit_diff", "kl")).grid("kl")))
    return calls


@pytest.fixture(scope="module")
def alone(toy_model, pairs):
    """Each call made alone, one after another (the reference)."""
    return {name: fn(toy_model) for name, fn in _calls(pairs)}


def test_at_least_fifty_calls_from_several_threads_match_the_same_calls_alone(toy_model, pairs, alone):
    calls = _calls(pairs)
    assert len(calls) >= 50
    for round_ in range(ROUNDS):
        rng = random.Random(round_)
        order = calls[:]
        rng.shuffle(order)
        n_threads = 4
        got, failures = {}, []

        def worker(mine, seed, got=got, failures=failures):
            r = random.Random(seed)
            for name, fn in mine:
                time.sleep(r.random() * 0.01)
                try:
                    got[name] = fn(toy_model)
                except Exception as e:  # (reported below with the call's name)
                    failures.append(f"{name}: {type(e).__name__}: {e}")

        threads = [threading.Thread(target=worker, args=(order[k::n_threads], 1000 * round_ + k), name=f"caller-{k}")
                   for k in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        assert not failures, f"round {round_}: " + "; ".join(failures)
        for name, value in alone.items():
            diff = float((got[name] - value).abs().max())
            assert diff <= 1e-6, f"round {round_}: {name} differs from the call made alone by {diff}"


def test_a_cancel_reaches_only_its_own_sweep(toy_model, pairs, alone):
    """The watch's block hooks (cancel, progress) are attached per pass, by the thread whose
    sweep it is: another thread's passes never run them, even while that sweep is paused
    between chunks with its cancel already set."""
    clean, corrupted, answers = pairs[0]
    cancel, paused, resume = threading.Event(), threading.Event(), threading.Event()
    outcome = []

    def pause_after_first_chunk(update):
        if not cancel.is_set():
            cancel.set()     # cancelled ...
            paused.set()
            resume.wait(60)  # ... but still between two chunks while the other thread works

    def doomed():
        try:
            pw.patch(toy_model, clean, corrupted, answers, site="head_out_by_pos", cancel=cancel,
                     callback=pause_after_first_chunk, max_batch_tokens=64)
            outcome.append("finished")
        except PatchingCancelled:
            outcome.append("cancelled")

    t = threading.Thread(target=doomed)
    t.start()
    assert paused.wait(60)
    try:
        grid = pw.patch(toy_model, clean, corrupted, answers, site="head_out", direction="noising",
                        max_batch_tokens=256).grid("normalized")
    finally:
        resume.set()
        t.join(60)
    assert float((grid - alone["patch head_out noising #0"]).abs().max()) <= 1e-6
    assert outcome == ["cancelled"]


def test_a_call_made_during_a_long_sweep_waits_about_one_chunk(toy_model, pairs):
    """Fairness in practice: the long sweep runs at most a couple of chunks per pass of the
    short call, not the rest of its sweep."""
    clean, corrupted, answers = pairs[0]
    chunks_done, total, started = [0], [0], threading.Event()

    def count(update):
        chunks_done[0] += 1
        total[0] = update.total
        started.set()

    long = threading.Thread(target=lambda: pw.patch(
        toy_model, clean, corrupted, answers, site="head_out_by_pos", max_batch_tokens=64, callback=count))
    long.start()
    started.wait(60)
    before = chunks_done[0]
    short = pw.patch(toy_model, pairs[2][0], pairs[2][1], pairs[2][2], site="resid_pre")
    during = chunks_done[0] - before
    long.join(300)
    passes = short.stats["forward_passes"] + 4   # chunks + target, source, two self-check passes
    assert chunks_done[0] > 3 * passes, "the long sweep is too short to show anything"
    assert during <= passes + 1, f"the long sweep ran {during} chunks during a call of {passes} passes"


def test_the_widget_says_when_it_waits_for_a_notebook_call(toy_model, pairs):
    """A widget job that meets a notebook call's pass says so (``waiting_for``), then clears it."""
    clean, corrupted, answers = pairs[2]
    w = pw.PatchingWidget(toy_model, clean=clean, corrupted=corrupted, correct=answers[0], incorrect=answers[1])
    seen = []
    w.observe(lambda change: seen.append(change["new"]), names="waiting_for")
    lock = lock_of(toy_model)
    lock.acquire()                    # a notebook cell in the middle of a pass
    try:
        w.run(wait=False)
        deadline = time.time() + 30
        while not seen and time.time() < deadline:
            time.sleep(0.01)
    finally:
        lock.release()
    assert w.wait(60)
    assert seen and "notebook cell" in seen[0] and seen[-1] == "" and w.waiting_for == ""
    expected = pw.patch(toy_model, clean, corrupted, answers, site=w.site).grid("normalized")
    assert float((w.result.grid("normalized") - expected).abs().max()) <= 1e-6


def test_widgets_and_notebook_calls_on_one_model(toy_model, pairs, alone):
    """Two widgets sweeping (one by position, like the report's), a third created meanwhile,
    and notebook calls in between: every number equals the same computation alone."""
    clean, corrupted, answers = pairs[2]
    widgets = [pw.PatchingWidget(toy_model, clean=clean, corrupted=corrupted, correct=answers[0],
                                 incorrect=answers[1]) for _ in range(2)]
    widgets[0].site, widgets[1].site = "head_out_by_pos", "resid_pre"
    for w in widgets:
        w.max_batch_tokens = 64
    expected = {w.site: pw.patch(toy_model, clean, corrupted, answers, site=w.site).grid("normalized")
                for w in widgets}
    for round_ in range(ROUNDS):
        for w in widgets:
            w.run(wait=False)
        third = pw.PatchingWidget(toy_model, clean=pairs[0][0][0], corrupted=pairs[0][1][0])
        assert third.tokens["clean"] and not third.errors
        grid = pw.patch(toy_model, *pairs[1], site="head_out", direction="noising",
                        max_batch_tokens=256).grid("normalized")
        assert float((grid - alone["patch head_out noising #1"]).abs().max()) <= 1e-6
        for w in widgets:
            assert w.wait(120), f"round {round_}: widget did not finish"
            assert w.status == "done", f"round {round_}: {w.status} {w.errors}"
            diff = float((w.result.grid("normalized") - expected[w.site]).abs().max())
            assert diff <= 1e-6, f"round {round_}: widget {w.site} differs by {diff}"


def test_your_own_passes_can_take_part(toy_model, pairs, alone):
    """``pw.exclusive(model)`` is public: while user code holds it, a sweep from another thread
    waits (its first pass comes after the user's block), then gives what it gives alone."""
    clean, corrupted, answers = pairs[0]
    events, started = [], threading.Event()

    def sweep():
        started.set()
        grid = pw.patch(toy_model, clean, corrupted, answers, site="head_out", direction="noising",
                        max_batch_tokens=256).grid("normalized")
        events.append(("sweep done", grid))

    with pw.exclusive(toy_model):
        t = threading.Thread(target=sweep)
        t.start()
        started.wait(10)
        time.sleep(0.3)                     # (the sweep alone takes well under this on toy-ioi)
        with torch.no_grad():
            logits = toy_model(pairs[2][0])  # the user's own pass, hooks and all, undisturbed
        events.append(("user done", None))
    t.join(60)
    assert [name for name, _ in events] == ["user done", "sweep done"]
    assert float((events[1][1] - alone["patch head_out noising #0"]).abs().max()) <= 1e-6
    assert logits.shape[0] == 1 and torch.isfinite(logits).all()
