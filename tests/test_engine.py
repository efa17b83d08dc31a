"""What the engine computes, counted: promises about work and memory that a refactor or a
dependency update could silently break while every result stays right."""

import torch

import patchwidgets as pw
from patchwidgets.engine import Engine
from patchwidgets.grading import ioi_batch


def _count_block_tokens(model):
    """Install pre-hooks counting rows x positions of every block call; returns (counts, handles)."""
    counts = [0]

    def count(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        counts[0] += hidden.shape[0] * hidden.shape[1]
    return counts, [b.register_forward_pre_hook(count, with_kwargs=True) for b in model.blocks]


def test_unembedding_sees_only_answer_rows(toy_model):
    """The unpatched runs and every patched pass unembed the answer position only: full
    [batch, pos, vocab] logits would be the largest tensor of a sweep (GPT-2, 64 pairs x 20
    tokens: 257 MB per run)."""
    batch = ioi_batch(toy_model, 4)
    answers = list(zip(batch.correct, batch.incorrect))
    shapes = []
    handle = toy_model.unembed.register_forward_hook(lambda m, args, out: shapes.append(tuple(out.shape)))
    try:
        for site in ("resid_pre", "head_out", "hook_embed"):  # fast path, and a plain pass
            kw = {"index": [(p,) for p in range(3)]} if site == "hook_embed" else {}
            pw.patch(toy_model, batch.clean, batch.corrupted, answers, site=site, metrics="logit_diff", **kw)
            pw.patch(toy_model, batch.clean, batch.corrupted, answers, site=site, metrics="kl", **kw)
    finally:
        handle.remove()
    assert shapes and all(shape[1] == 1 for shape in shapes), sorted(set(shapes))


def test_target_run_and_self_check_cost_about_one_pass_after_the_first_sweep(toy_model):
    """The target run plus the self-check of the shortcuts. On a model's first sweep: one plain
    pass, one pass over every block by the engine with taps recording keys and values (A),
    and one short pass at the answer positions (B) (it used to be four full passes' worth, a
    third of a GPT-2-small sweep). Once (A) has shown the taps reproduce the plain pass, the
    target run records through the taps itself: one full pass and (B). (GPT-2 blocks in
    transformers 5 do not pass the KV cache on to TransformerLens' attention; the engine
    learns that on the first sweep too, and remembers it.)"""
    batch = ioi_batch(toy_model, 4)
    tokens = toy_model.to_tokens(batch.corrupted)  # [batch, pos]
    answer_pos = torch.full((tokens.shape[0],), tokens.shape[1] - 1)
    Engine(toy_model, tokens, answer_pos).run_target([])  # (the model's first sweep, maybe)
    engine = Engine(toy_model, tokens, answer_pos, columns=torch.tensor([1, 2]))
    expected = engine.work()
    counts, handles = _count_block_tokens(toy_model)
    try:
        final, _ = engine.run_target([])
    finally:
        for h in handles:
            h.remove()
    assert engine.shortcut_report() == {"resumed": 1, "prefix_skipped": 1, "fallback_reason": None}
    one_pass = tokens.numel() * toy_model.cfg.n_layers
    assert counts[0] <= one_pass + 3 * tokens.shape[0] * toy_model.cfg.n_layers, counts[0] / one_pass
    assert expected == counts[0]  # what the progress bar expects
    # ...and the logits are the model's own.
    with torch.no_grad():
        plain = toy_model(tokens)[:, -1][:, torch.tensor([1, 2])]
    torch.testing.assert_close(final, plain, atol=1e-5, rtol=0)


def test_target_run_through_taps_is_redone_when_in_doubt(toy_model, monkeypatch):
    """If the taps the target run records through are not all read once (here: the engine has
    forgotten that GPT-2's attention must be handed its tap directly), the engine does not
    trust those logits: it runs the target again, plainly, and checks the long way."""
    import weakref

    import patchwidgets.engine as engine_module

    batch = ioi_batch(toy_model, 4)
    tokens = toy_model.to_tokens(batch.corrupted)
    answer_pos = torch.full((tokens.shape[0],), tokens.shape[1] - 1)
    Engine(toy_model, tokens, answer_pos).run_target([])
    assert toy_model in engine_module._TAPS_VERIFIED
    monkeypatch.setattr(engine_module, "_TAP_ATTENTION", weakref.WeakKeyDictionary())
    engine = Engine(toy_model, tokens, answer_pos)
    counts, handles = _count_block_tokens(toy_model)
    try:
        final, _ = engine.run_target([])
    finally:
        for h in handles:
            h.remove()
    one_pass = tokens.numel() * toy_model.cfg.n_layers
    assert counts[0] >= 3 * one_pass  # the tapped run, the plain one, and pass (A) again (and its hand-off)
    assert engine.shortcut_report()["prefix_skipped"] == 1
    with torch.no_grad():
        plain = toy_model(tokens)[:, -1]
    torch.testing.assert_close(final, plain, atol=1e-5, rtol=0)
