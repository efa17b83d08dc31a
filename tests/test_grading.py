"""The self-checks must pass right answers and fail wrong ones, saying where and, for the
usual mistakes, which mistake; no wrong answer may change what a later check sees.

The grader that runs them on a learner's notebook is tested in tests/test_grader.py."""

import functools

import pytest
import torch

from patchwidgets import grading
from patchwidgets.grading import GradingError


@pytest.fixture(scope="module")
def setup():
    return grading.sweep_setup()


from grading_helpers import fails, passes, stub  # noqa: E402


# ------------------------------------------------------------------------------- 02_metrics

def rows(x):
    return torch.arange(x.shape[0])


def test_logit_diff(capsys):
    passes(grading.check_logit_diff, lambda l, c, i: l[rows(l), c] - l[rows(l), i], capsys)
    fails(grading.check_logit_diff, lambda l, c, i: l[rows(l), i] - l[rows(l), c], "First mismatch at prompt 0")
    fails(grading.check_logit_diff, lambda l, c, i: l[:, c] - l[:, i], r"expected a tensor of shape \(\d+,\)")


def test_normalized_and_noising_metric(capsys):
    good = lambda p, t, s: (p.mean() - t.mean()) / (s.mean() - t.mean())  # noqa: E731
    passes(grading.check_normalized_metric, good, capsys)
    fails(grading.check_normalized_metric, lambda p, t, s: ((p - t) / (s - t)).mean(), "mean gap")
    fails(grading.check_normalized_metric, lambda p, t, s: (p - t) / (s - t), "one number")
    passes(grading.check_noising_metric, lambda p, clean, corr: good(p, clean, corr), capsys)
    fails(grading.check_noising_metric, lambda p, clean, corr: good(p, corr, clean), "1 minus the expected")


def test_probability_metrics(capsys):
    passes(grading.check_logprob, lambda l, c: l.log_softmax(-1)[rows(l), c], capsys)
    fails(grading.check_logprob, lambda l, c: l.softmax(-1)[rows(l), c])
    passes(grading.check_prob, lambda l, c: l.softmax(-1)[rows(l), c], capsys)
    fails(grading.check_prob, lambda l, c: l[rows(l), c].exp())
    passes(grading.check_rank, lambda l, c: 1 + (l > l[rows(l), c][:, None]).sum(-1), capsys)
    fails(grading.check_rank, lambda l, c: (l > l[rows(l), c][:, None]).sum(-1), "0-based")
    fails(grading.check_rank, lambda l, c: 1 + (l >= l[rows(l), c][:, None]).sum(-1))


def test_kl(capsys):
    def kl(p, q):
        p, q = p.log_softmax(-1), q.log_softmax(-1)
        return (p.exp() * (p - q)).sum(-1)

    passes(grading.check_kl, kl, capsys)
    fails(grading.check_kl, lambda p, q: kl(q, p), r"KL\(patched \|\| clean\)")
    fails(grading.check_kl, lambda p, q: kl(p, q).sum(), "shape")


# ------------------------------------------------------------------------------- hooks

def test_patch_position(capsys):
    def good(act, hook, position, cache):
        act[:, position] = cache[hook.name][:, position]
        return act

    def in_place_only(act, hook, position, cache):
        act[:, position] = cache[hook.name][:, position]

    def next_position(act, hook, position, cache):
        act[:, position + 1] = cache[hook.name][:, position + 1]
        return act

    def everything(act, hook, position, cache):
        return cache[hook.name]

    def first_prompt_only(act, hook, position, cache):
        act[0, position] = cache[hook.name][0, position]
        return act

    passes(grading.check_patch_position, good, capsys)
    passes(grading.check_patch_position, in_place_only, capsys)
    fails(grading.check_patch_position, next_position, "only position 3")
    fails(grading.check_patch_position, everything, "whole activation")
    fails(grading.check_patch_position, lambda act, hook, p, c: act, "unchanged")
    fails(grading.check_patch_position, first_prompt_only, r"index \(1, 3, 0\)")


def test_patch_head_vector(capsys):
    def good(act, hook, head, cache):
        act[:, :, head] = cache[hook.name][:, :, head]
        return act

    def position_axis(act, hook, head, cache):
        act[:, head] = cache[hook.name][:, head]
        return act

    passes(grading.check_patch_head_vector, good, capsys)
    fails(grading.check_patch_head_vector, position_axis, "head 2 at every position")


def patched_run(model, corrupted_tokens, source_cache, name, position, key=None, positions=None, tokens=None,
                returns=True):
    """A hand-written patched_run (03); the keywords make the usual mistakes."""
    def paste(act, hook):
        source = source_cache[hook.name if key == "hook.name" else name]
        if not returns:
            act = act.clone()
        act[:, position if positions is None else positions] = source[:, position if positions is None else positions]
        return act if returns else None

    return model.run_with_hooks(corrupted_tokens if tokens is None else tokens, fwd_hooks=[(name, paste)])


def test_patched_run(setup, capsys):
    """The TransformerLens 4 trap: hook.name is canonical, a names_filter cache keeps the registered name."""
    passes(grading.check_patched_run, patched_run, capsys)
    fails(grading.check_patched_run, functools.partial(patched_run, key="hook.name"),
          "filtered to 'blocks.1.hook_resid_pre'", r"looked up 'blocks\.1\.hook_in'", "canonical name",
          "Index the cache with `name`")
    fails(grading.check_patched_run, functools.partial(patched_run, positions=slice(None)), "pastes every position")
    fails(grading.check_patched_run, functools.partial(patched_run, returns=False), "changed nothing")
    fails(grading.check_patched_run, functools.partial(patched_run, tokens=setup.batch.clean_tokens),
          "runs the clean tokens")
    fails(grading.check_patched_run, lambda m, t, c, n, p: patched_run(m, t, c, n, p)[:, -1], r"shape \(4, 15, \d+\)")
    fails(grading.check_patched_run, lambda m, t, c, n, p: patched_run(m, t, c, n, p + 1 if p < 14 else p - 1),
          "differ from the expected patched run")
    with pytest.raises(NotImplementedError):
        grading.check_patched_run(stub)


# ------------------------------------------------------------------------------- sweeps

def library(setup, site, direction="denoising"):
    grid = grading.library_grid(setup, site, direction)
    return lambda model, corrupted_tokens, clean_cache, metric: grid.clone()


def paste_position(act, hook, position, cache):
    act[:, position] = cache[hook.name][:, position]
    return act


def resid_pre_sweep(hook_fn):
    """A real hook-by-hook get_act_patch_resid_pre (plain forward passes) around ``hook_fn``."""
    def sweep(model, corrupted_tokens, clean_cache, metric):
        out = torch.zeros(model.cfg.n_layers, corrupted_tokens.shape[1])
        with torch.no_grad():
            for layer in range(model.cfg.n_layers):
                for pos in range(corrupted_tokens.shape[1]):
                    fn = functools.partial(hook_fn, position=pos, cache=clean_cache)
                    out[layer, pos] = metric(model.run_with_hooks(
                        corrupted_tokens, fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", fn)]))
        return out

    return sweep


def test_resid_pre_hand_written_solution_passes(capsys):
    """A real hook-by-hook implementation (plain forward passes) agrees with the engine."""
    passes(grading.check_get_act_patch_resid_pre, resid_pre_sweep(paste_position), capsys)


def test_resid_pre_wrong_answers(setup, capsys):
    passes(grading.check_get_act_patch_resid_pre, library(setup, "resid_pre"), capsys)
    fails(grading.check_get_act_patch_resid_pre, library(setup, "resid_post"), "patch resid_post instead")
    fails(grading.check_get_act_patch_resid_pre, library(setup, "resid_pre", "noising"), r"\(noising\)")
    grid = grading.library_grid(setup, "resid_pre")
    fails(grading.check_get_act_patch_resid_pre, lambda *a: grid.T, "transposed")
    fails(grading.check_get_act_patch_resid_pre, lambda *a: torch.zeros_like(grid), "Every value is 0")
    # One wrong cell: the message names its layer, position and token.
    s2 = int((setup.batch.clean_tokens[0] != setup.batch.corrupted_tokens[0]).nonzero()[0])
    wrong = grid.clone()
    wrong[1, s2] += 0.5
    message = fails(grading.check_get_act_patch_resid_pre, lambda *a: wrong,
                    rf"First mismatch at layer 1, pos {s2} \(' John'\)", "1 of 60 values differ")
    assert "expected" in message and "got" in message
    with pytest.raises(NotImplementedError, match="not implemented yet"):
        grading.check_get_act_patch_resid_pre(stub)


def test_block_every(setup, capsys):
    passes(grading.check_get_act_patch_block_every, library(setup, "block"), capsys)
    grid = grading.library_grid(setup, "block")
    fails(grading.check_get_act_patch_block_every, lambda *a: grid[[0, 2, 1]], "mlp_out, attn_out")
    fails(grading.check_get_act_patch_block_every, lambda *a: grid[0], r"shape \(3, 4, 15\)")


def test_head_sweeps(setup, capsys):
    passes(grading.check_get_act_patch_head_out, library(setup, "head_out"), capsys)
    fails(grading.check_get_act_patch_head_out, library(setup, "head_v"), "hook_v")
    passes(grading.check_get_act_patch_head_out_by_pos, library(setup, "head_out_by_pos"), capsys)
    by_pos = grading.library_grid(setup, "head_out_by_pos")
    fails(grading.check_get_act_patch_head_out_by_pos, lambda *a: by_pos.permute(0, 2, 1), "shape")
    wrong = by_pos.clone()
    wrong[2, 14, 5] = 9.0
    fails(grading.check_get_act_patch_head_out_by_pos, lambda *a: wrong,
          r"layer 2, pos 14 \(' to'\), head 5: expected -?\d+\.\d+, got 9\.0000")
    passes(grading.check_get_act_patch_head_every, library(setup, "heads_every"), capsys)
    every = grading.library_grid(setup, "heads_every").clone()
    every[4] = every[0]  # the pattern panel copied from the output panel
    fails(grading.check_get_act_patch_head_every, lambda *a: every, "component 4 \\(pattern\\)")


def test_mean_attention(capsys):
    passes(grading.check_mean_attention, lambda c, l, h: c[f"blocks.{l}.attn.hook_pattern"][:, h].mean(0), capsys)
    fails(grading.check_mean_attention, lambda c, l, h: c[f"blocks.{l}.attn.hook_pattern"][:, h], "shape")
    fails(grading.check_mean_attention, lambda c, l, h: c[f"blocks.{l}.attn.hook_pattern"][0, h])


# ------------------------------------------------------------------------------- 05 gates

def test_gates(capsys):
    passes(grading.check_or_gate, torch.maximum, capsys)
    fails(grading.check_or_gate, lambda a, b: a + b, "torch.maximum")
    fails(grading.check_or_gate, lambda a, b: a * b, "AND gate")

    truth = {"and": {"denoising": {"C"}, "noising": {"A", "B", "C"}},
             "or": {"denoising": {"A", "B", "C"}, "noising": {"C"}}}
    passes(grading.check_gate_predictions, lambda: truth, capsys)
    flipped = {"and": truth["or"], "or": truth["and"]}
    fails(grading.check_gate_predictions, lambda: flipped, "AND gate, denoising")
    fails(grading.check_gate_predictions, lambda: {"and": {}}, "missing")


def gate_effects(model, direction, swap=False):
    clean, corrupted = grading.GATE_CLEAN, grading.GATE_CORRUPTED
    target, source = (corrupted, clean) if (direction == "denoising") != swap else (clean, corrupted)
    _, cache = model.run_with_cache(source)
    ld = lambda logits: float(logits[0, -1, 1] - logits[0, -1, 0])  # noqa: E731
    out = {}
    for comp in "ABC":
        patched = model.run_with_hooks(target, fwd_hooks=[(f"hook_{comp.lower()}", lambda a, hook: cache[hook.name])])
        out[comp] = (ld(patched) - ld(model(target))) / (ld(model(source)) - ld(model(target)))
    return out


def test_patch_gate_components(capsys):
    passes(grading.check_patch_gate_components, gate_effects, capsys)
    fails(grading.check_patch_gate_components, functools.partial(gate_effects, swap=True), "AND gate, denoising")
    fails(grading.check_patch_gate_components, lambda m, d: [0, 0, 1], "dict")


def test_classify_component(capsys):
    def good(d, n, threshold=0.5):
        return {(True, True): "necessary and sufficient", (True, False): "sufficient but not necessary",
                (False, True): "necessary but not sufficient", (False, False): "neither"}[(d >= threshold, n >= threshold)]

    def strict(d, n, threshold=0.5):
        return good(d - 1e-9, n - 1e-9, threshold)

    def swapped(d, n, threshold=0.5):
        return good(n, d, threshold)

    passes(grading.check_classify_component, good, capsys)
    fails(grading.check_classify_component, strict, ">= 0.5")
    fails(grading.check_classify_component, swapped, "sufficiency")


def kl_02(clean_logits, patched_logits):
    """Notebook 02's kl: KL(clean || patched) for each row, [batch, vocab] x 2 -> [batch]."""
    p, q = clean_logits.log_softmax(-1), patched_logits.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)


def kl_patch(model, components, direction="denoising", reverse=False, absolute=False, first_only=False,
             from_source=False, kl=kl_02):
    """A hand-written patch_with_kl whose KL is ``kl`` (notebook 02's by default); the keywords make
    the usual mistakes."""
    clean, corrupted = grading.GATE_CLEAN, grading.GATE_CORRUPTED
    target, source = (corrupted, clean) if direction == "denoising" else (clean, corrupted)
    source_logits, cache = model.run_with_cache(source)
    hooks = [(f"hook_{c.lower()}", lambda a, hook: cache[hook.name]) for c in components[:1 if first_only else None]]
    patched = model.run_with_hooks(target, fwd_hooks=hooks)
    ld = lambda logits: float(logits[0, -1, 1] - logits[0, -1, 0])  # noqa: E731
    normalized = (ld(patched) - ld(model(target))) / (ld(source_logits) - ld(model(target)))
    reference = source_logits if from_source else model(clean)
    p, q = (patched, reference) if reverse else (reference, patched)
    return {"normalized": abs(normalized) if absolute else normalized, "kl": float(kl(p[:, -1], q[:, -1])[0])}


def test_patch_with_kl(capsys):
    passes(grading.check_patch_with_kl, kl_patch, capsys)
    fails(grading.check_patch_with_kl, functools.partial(kl_patch, reverse=True), r"KL\(patched \|\| clean\)")
    fails(grading.check_patch_with_kl, functools.partial(kl_patch, from_source=True), "noising",
          "KL from the corrupted run", "reference in both directions")
    fails(grading.check_patch_with_kl, functools.partial(kl_patch, absolute=True), "patching B", "absolute value")
    fails(grading.check_patch_with_kl, functools.partial(kl_patch, first_only=True), "only A")
    fails(grading.check_patch_with_kl, lambda m, c, d="denoising": 0.5, "return a dict")
    with pytest.raises(NotImplementedError):
        grading.check_patch_with_kl(stub)


def test_one_kl_in_02_05_and_the_library(capsys):
    """Notebooks 02 and 05 and ``patch(metrics="kl")`` define KL the same way (KL(clean || patched)
    in both directions): a learner who takes 02's ``kl`` into 05 passes 05's check, the library's
    KL of each gate patch is the one 05's check expects, and a KL that passes one check but not
    the other does not exist. (They once disagreed when noising: 05 measured from the source.)"""
    from patchwidgets import patch
    from patchwidgets.grading import check_gates

    passes(grading.check_kl, kl_02, capsys)
    passes(grading.check_patch_with_kl, kl_patch, capsys)

    def kl_from_source(p_logits, q_logits):  # what 05 used to ask for, written as 02's function
        return kl_02(p_logits, q_logits)

    fails(grading.check_patch_with_kl, functools.partial(kl_patch, from_source=True, kl=kl_from_source))
    for gate in ("negative", "and"):
        model = check_gates.gate_model(gate)
        for direction in ("denoising", "noising"):
            for component in "AB":
                library = patch(model, grading.GATE_CLEAN, grading.GATE_CORRUPTED, answers=(1, 0),
                                site=f"hook_{component.lower()}", index=[(0,)], direction=direction,
                                metrics="kl", progress=False)
                expected = check_gates._gate_patch(model, [component], direction)["kl"]
                assert float(library.grid("kl")[0]) == pytest.approx(expected, abs=1e-5), (gate, direction, component)
                assert kl_patch(model, [component], direction)["kl"] == pytest.approx(expected, abs=1e-5)


def test_the_negative_gate_prefers_the_answer_when_clean():
    """A negative component is measured against a clean run that prefers the answer (it was once
    a coin flip: C = A - 0.5 B gave a clean logit difference of 0)."""
    from patchwidgets.grading import check_gates

    for gate in ("and", "or", "negative", "backup"):
        logits = check_gates.gate_model(gate, 0.7)(grading.GATE_CLEAN)[0, -1]
        assert float(logits[1] - logits[0]) == pytest.approx(2.0), gate
        assert float(logits.softmax(-1)[1]) > 0.85


def ablate(model, tokens, head, ablation, metric, over=(0,), whole_layer=False):
    """A hand-written ablate_head; the keywords make the usual mistakes."""
    layer, h = head
    heads = slice(None) if whole_layer else h

    def replace(z, hook):
        z[:, :, heads] = 0.0 if ablation == "zero" else z[:, :, heads].mean(over, keepdim=True)
        return z

    return float(metric(model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", replace)])))


def test_ablate_head(capsys):
    passes(grading.check_ablate_head, ablate, capsys)
    fails(grading.check_ablate_head, functools.partial(ablate, over=(0, 1)), "mean ablation of L0H0", "positions")
    fails(grading.check_ablate_head, functools.partial(ablate, whole_layer=True), "every head of layer 0")
    fails(grading.check_ablate_head, lambda *a: torch.zeros(3), "one number")


# ------------------------------------------------------------------------------- 06 prompts

def test_swap_names(capsys):
    passes(grading.check_swap_names, grading.reference_swap_names, capsys)
    fails(grading.check_swap_names, lambda p, a, b: p.replace(a, b).replace(b, a), "placeholder")
    fails(grading.check_swap_names, lambda p, a, b: p.replace(a, "#").replace(b, a).replace("#", b), "Samuel")


def test_abc_corruption(capsys):
    passes(grading.check_abc_corruption, grading.reference_abc_corruption, capsys)
    fails(grading.check_abc_corruption, lambda p, io, s, x, y, z: p.replace(io, x).replace(s, y), "only the first one")


def test_stubs_are_not_attempted_and_non_functions_fail():
    for check in [grading.check_logit_diff, grading.check_patch_position, grading.check_or_gate,
                  grading.check_swap_names, grading.check_gate_predictions]:
        with pytest.raises(NotImplementedError):
            check(stub)
    with pytest.raises(GradingError, match="expected a function"):
        grading.check_logit_diff(42)


def test_ioi_batch_is_deterministic_and_equal_length():
    a, b = grading.ioi_batch(n=8), grading.ioi_batch(n=8)
    assert a.clean == b.clean and a.corrupted == b.corrupted
    assert a.clean_tokens.shape == a.corrupted_tokens.shape == (8, 15)
    assert a.clean[0] == "When Mary and John went to the store, John gave a drink to"
    assert (a.clean_tokens != a.corrupted_tokens).sum(1).tolist() == [1] * 8


# ------------------------------------------------------------------------------- 07 / 08

def test_path_patch_to_logits(setup, capsys):
    def library_path(model, tokens, clean_cache, corrupted_cache, sender, metric, freeze_mlps=False):
        return grading._library_path(setup, sender, freeze_mlps=freeze_mlps)

    def plain_patching(model, tokens, clean_cache, corrupted_cache, sender, metric, freeze_mlps=False):
        return grading.library_grid(setup, "head_out")[sender]

    def mlps_never_frozen(model, tokens, clean_cache, corrupted_cache, sender, metric, freeze_mlps=False):
        return grading._library_path(setup, sender)

    passes(grading.check_path_patch_to_logits, library_path, capsys)
    fails(grading.check_path_patch_to_logits, plain_patching, "sender L0H0", "plain activation patching")
    fails(grading.check_path_patch_to_logits, mlps_never_frozen, "freeze_mlps=True", "MLP outputs must be frozen")
    with pytest.raises(NotImplementedError):
        grading.check_path_patch_to_logits(stub)


def test_path_patch_to_queries(setup, capsys):
    def library_path(model, tokens, clean_cache, corrupted_cache, sender, receivers, metric):
        return grading._library_path(setup, sender, receivers=receivers, receiver_input="q")

    def to_logits(model, tokens, clean_cache, corrupted_cache, sender, receivers, metric):
        return grading._library_path(setup, sender)

    def to_values(model, tokens, clean_cache, corrupted_cache, sender, receivers, metric):
        return grading._library_path(setup, sender, receivers=receivers, receiver_input="v")

    passes(grading.check_path_patch_to_queries, library_path, capsys)
    fails(grading.check_path_patch_to_queries, to_logits, "path to the logits")
    fails(grading.check_path_patch_to_queries, to_values, r"L0H0 -> queries of L1H0")
    fails(grading.check_path_patch_to_queries, lambda *a: torch.zeros(2), "one number")


def test_attribution_checks(setup, capsys):
    head_est = grading._library_attribution(setup, "head_out")
    resid_est = grading._library_attribution(setup, "resid_pre")
    passes(grading.check_attribution_head_out, lambda *a: head_est.clone(), capsys)
    fails(grading.check_attribution_head_out, lambda *a: -head_est, r"\(corrupted - clean\)")
    fails(grading.check_attribution_head_out, lambda *a: grading.library_grid(setup, "head_out"),
          "exact patching result", r"layer 0, head 0")
    passes(grading.check_attribution_resid_pre, lambda *a: resid_est.clone(), capsys)
    fails(grading.check_attribution_resid_pre, lambda *a: resid_est.T, "transposed")
    with pytest.raises(NotImplementedError):
        grading.check_attribution_resid_pre(stub)


def test_circuit_edges(capsys):
    edges = grading.reference_circuit_edges
    passes(grading.check_circuit_edges, edges, capsys)
    fails(grading.check_circuit_edges, functools.partial(edges, signed=True), "missing", "negative value")
    fails(grading.check_circuit_edges, functools.partial(edges, receiver_input="v"), "keys or values instead of their queries")
    fails(grading.check_circuit_edges, lambda *a: edges(*a)[1:], "missing L0H0 -> logits")
    fails(grading.check_circuit_edges, functools.partial(edges, freeze_mlps=True), "freeze the MLPs")
    fails(grading.check_circuit_edges, lambda *a: {"L0H0": 1.0}, "list of")
    with pytest.raises(NotImplementedError):
        grading.check_circuit_edges(stub)


def test_circuit_edges_reference_is_memoised_per_setup_and_weights(monkeypatch):
    """The check's own reference edges (six path_patch calls a set) are computed once per setup
    and arguments; another setup, or a model whose weights changed since, has them computed
    afresh, and a changed model's are not kept."""
    import dataclasses

    from patchwidgets.grading import check_advanced

    calls = []
    reference = check_advanced.reference_circuit_edges
    monkeypatch.setattr(check_advanced, "reference_circuit_edges",
                        lambda *a, **kw: calls.append(kw) or reference(*a, **kw))
    setup = dataclasses.replace(grading.sweep_setup())  # a setup of its own: no memos of the tests before
    assert setup.memos == {}
    edges = functools.partial(check_advanced._reference_edges, freeze_mlps=True)

    first = edges(setup)
    assert edges(setup) == first and len(calls) == 1, "the second time comes from the memo"
    assert edges(setup, receiver_input="k") != first and len(calls) == 2, "other arguments, other edges"
    other = dataclasses.replace(setup)  # the same model and batch, another setup: its memos start empty
    assert other.memos == {} and setup.memos != {}
    assert edges(other) == first and len(calls) == 3

    name, embed = next(iter(setup.model.named_parameters()))  # the token embedding
    try:
        with torch.no_grad():
            embed.add_(0.1 * embed.std() * torch.randn(embed.shape, generator=torch.Generator().manual_seed(0)))
        assert setup.changed_weights() == [name]
        changed = edges(setup)
        assert changed != first and len(calls) == 4, "not the memo made before the weights changed"
        assert edges(setup) == changed and len(calls) == 5, "nor one made after"
    finally:
        with torch.no_grad():
            embed.copy_(setup.weights[name])
    assert setup.changed_weights() == []
    assert edges(setup) == first and len(calls) == 5, "the weights are back: so is the memo"


# ------------------------------------------------------------------------------- no poisoning

def test_a_sweep_that_writes_into_clean_cache_cannot_poison_the_next_check(capsys):
    """A wrong answer that zeroes the cache it was given fails; a right answer after it still
    passes (the check hands out copies; before, it handed out the cache it compares against)."""
    def poisoning(model, corrupted_tokens, clean_cache, metric):
        for name in list(clean_cache.cache_dict):
            clean_cache.cache_dict[name].zero_()
        return torch.zeros(model.cfg.n_layers, corrupted_tokens.shape[1])

    fails(grading.check_get_act_patch_resid_pre, poisoning)
    passes(grading.check_get_act_patch_resid_pre, resid_pre_sweep(paste_position), capsys)
    passes(grading.check_mean_attention, lambda c, l, h: c[f"blocks.{l}.attn.hook_pattern"][:, h].mean(0), capsys)


def test_a_sweep_that_changes_the_weights_is_told_and_cannot_poison_the_next_check(capsys):
    def zero_unembed(model, corrupted_tokens, clean_cache, metric):
        with torch.no_grad():
            list(model.parameters())[-1].zero_()
        return torch.zeros(model.cfg.n_layers, corrupted_tokens.shape[1])

    fails(grading.check_get_act_patch_resid_pre, zero_unembed, "changed the model's weights", "put the weights back")
    passes(grading.check_get_act_patch_resid_pre, resid_pre_sweep(paste_position), capsys)


def test_a_hook_left_on_the_model_is_removed(capsys):
    def leaves_a_hook(model, corrupted_tokens, clean_cache, metric):
        model.add_hook("blocks.0.hook_resid_pre", lambda act, hook: act * 0)
        return torch.zeros(model.cfg.n_layers, corrupted_tokens.shape[1])

    fails(grading.check_get_act_patch_resid_pre, leaves_a_hook)
    passes(grading.check_get_act_patch_resid_pre, resid_pre_sweep(paste_position), capsys)


# ------------------------------------------------------------------------------- diagnoses

def test_patching_every_position_is_named():
    """It used to get "Every value is the same: is the patch applied at all?"."""
    def every_position(act, hook, position, cache):
        act[:] = cache[hook.name]
        return act

    message = fails(grading.check_get_act_patch_resid_pre, resid_pre_sweep(every_position),
                    "do not change along the position axis", "every value is 1", "paste every position")
    assert "is the patch applied" not in message


def test_a_hook_that_returns_nothing_is_named():
    """It used to get "did you fill in the results tensor?"."""
    def rebinds(act, hook, position, cache):
        act = act.clone()
        act[:, position] = cache[hook.name][:, position]  # patches a copy, returns nothing

    message = fails(grading.check_get_act_patch_resid_pre, resid_pre_sweep(rebinds),
                    "Every value is 0", "Is the patch applied at all", "returns nothing")
    assert message.index("returns nothing") < message.index("results tensor")


def test_axes_in_the_wrong_order_get_the_permute_hint_before_the_reshape_hint(setup):
    """[layer, head, pos] used to get "reshape it to (4, 15, 8)", and the reshape then failed."""
    by_pos = grading.library_grid(setup, "head_out_by_pos")
    permuted = by_pos.permute(0, 2, 1)
    message = fails(grading.check_get_act_patch_head_out_by_pos, lambda *a: permuted,
                    r"the axes in the order \[layer, head, pos\]", r"\.permute\(0, 2, 1\)")
    assert "reshape it to" not in message
    fails(grading.check_get_act_patch_head_out_by_pos, lambda *a: permuted.reshape(by_pos.shape),
          "right ones in the wrong places", r"\[layer, head, pos\]", "not reshape")


def test_a_forgotten_normalisation_is_named(setup, capsys):
    grid = grading.library_grid(setup, "resid_pre")
    m = setup.metric
    fails(grading.check_get_act_patch_resid_pre, lambda *a: grid * (m.clean_ld - m.corrupted_ld) + m.corrupted_ld,
          "raw logit difference instead of the normalised metric")
    fails(grading.check_get_act_patch_resid_pre, lambda *a: grid * 3.5, r"exactly 3\.5 x expected", "normalisation")
    fails(grading.check_normalized_metric, lambda p, t, s: p.mean() - t.mean(), "did not divide by the gap")
    fails(grading.check_normalized_metric, lambda p, t, s: p.mean(), "normalise it")


def test_a_sign_flip_is_named(setup):
    grid = grading.library_grid(setup, "resid_pre")
    fails(grading.check_get_act_patch_resid_pre, lambda *a: -grid, "opposite sign")
    fails(grading.check_logit_diff, lambda l, c, i: l[rows(l), i] - l[rows(l), c], "opposite sign")
    fails(grading.check_normalized_metric, lambda p, t, s: (t.mean() - p.mean()) / (s.mean() - t.mean()),
          "sign is flipped")


#: What a notebook defines before its sweep exercises: 8 prompts, where the checks use 4.
NOTEBOOK_BATCH = grading.ioi_batch(n=8)
_clean_logits = grading.bundled_model()(NOTEBOOK_BATCH.clean_tokens)
ioi_metric = grading.normalized_ld_metric(_clean_logits, grading.bundled_model()(NOTEBOOK_BATCH.corrupted_tokens),
                                          NOTEBOOK_BATCH.correct_ids, NOTEBOOK_BATCH.incorrect_ids)


def test_a_function_that_reads_notebook_variables_is_told_what_the_check_passes():
    """It used to be a raw IndexError from inside the learner's loop."""
    def uses_the_notebooks_metric(model, corrupted_tokens, clean_cache, metric):
        out = torch.zeros(model.cfg.n_layers, corrupted_tokens.shape[1])
        for layer in range(model.cfg.n_layers):
            out[layer] = ioi_metric(model(corrupted_tokens))
        return out

    message = fails(grading.check_get_act_patch_resid_pre, uses_the_notebooks_metric,
                    "raised IndexError", r"at line \d+ of uses_the_notebooks_metric: out\[layer\] = ioi_metric",
                    "its own arguments: the toy-ioi model", r"a tensor of shape \[4, 15\]", "an ActivationCache of 4 prompts",
                    "a metric for 4 prompts", "`ioi_metric`")
    assert "NOTEBOOK_BATCH" not in message  # read by the module, not by the function


def test_gate_predictions_keys_are_case_insensitive(capsys):
    """Keys "AND"/"OR" used to fail on a case rule nobody stated."""
    truth = {"AND": {"Denoising": {"c"}, "noising": {"A", "B", "C"}},
             "Or": {"denoising": {"A", "b", "C"}, "NOISING": {"C"}}}
    passes(grading.check_gate_predictions, lambda: truth, capsys)
    passes(grading.check_gate_predictions, truth, capsys)
    fails(grading.check_gate_predictions, {"AND": truth["AND"]}, "missing", "case-insensitive")
