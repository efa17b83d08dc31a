"""Path patching against TransformerLens' direct-path patching and a slow reference.

The reference below is written to be obviously right rather than fast: one sender at a time,
full forward passes, every hook spelled out. The fast implementation batches senders, resumes
at the patched layer and skips unchanged positions; both must agree to 1e-4.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from patchwidgets.errors import IdenticalPromptsError, PatchingInputError
from patchwidgets.path_patching import path_patch

N_LAYERS, N_HEADS, VOCAB, SEQ, BATCH, CHANGED = 3, 4, 366, 9, 4, 5


@pytest.fixture(scope="session")
def model(make_random_bridge):
    """A small random GPT-2 with large weights: nonlinear enough to be interesting."""
    return make_random_bridge(n_layers=N_LAYERS, n_heads=N_HEADS, vocab=VOCAB, word_tokenizer=True,
                              initializer_range=0.2)


@pytest.fixture(scope="session")
def data():
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(2, VOCAB, (BATCH, SEQ), generator=g)
    corrupted = clean.clone()
    corrupted[:, CHANGED] = torch.randint(2, VOCAB, (BATCH,), generator=g)
    corrupted[0, CHANGED + 2] = 7  # one pair differs at a second position too
    answers = [tuple(int(t) for t in pair) for pair in torch.randint(2, VOCAB, (BATCH, 2), generator=g)]
    return clean, corrupted, answers


def logit_diff(logits, answers):
    c = torch.tensor([a for a, _ in answers])
    i = torch.tensor([b for _, b in answers])
    rows = torch.arange(len(answers))
    return logits[rows, -1, c] - logits[rows, -1, i]


def reference(model, target, source_cache, target_cache, sender, receivers, comps, freeze_mlps):
    """One sender, step by step: freeze every head (and maybe MLP) except the sender, record
    the receivers' inputs; then paste those into a fresh target run."""
    def freeze_z(layer):
        def hook(z, hook):
            z = target_cache[hook.name].clone()
            for l, h in sender:
                if l == layer:
                    z[:, :, h] = source_cache[hook.name][:, :, h]
            return z
        return hook

    hooks = [(f"blocks.{l}.attn.hook_z", freeze_z(l)) for l in range(N_LAYERS)]
    if freeze_mlps:
        hooks += [(f"blocks.{l}.hook_mlp_out", lambda a, hook: target_cache[hook.name].clone())
                  for l in range(N_LAYERS)]
    recorded = {}

    def record(act, hook):
        recorded[hook.name] = act.clone()

    rec_names = sorted({f"blocks.{l}.attn.hook_{c}" for l, _ in receivers or [] for c in comps})
    with torch.no_grad():
        logits = model.run_with_hooks(target, fwd_hooks=hooks + [(n, record) for n in rec_names])
        if not receivers:
            return logits

        def paste(act, hook):
            act = act.clone()
            layer = int(hook.name.split(".")[1])
            for l, h in receivers:
                if l == layer:
                    act[:, :, h] = recorded[hook.name][:, :, h]
            return act

        return model.run_with_hooks(target, fwd_hooks=[(n, paste) for n in rec_names])


@pytest.fixture(scope="session")
def caches(model, data):
    clean, corrupted, _ = data
    with torch.no_grad():
        return model.run_with_cache(clean)[1], model.run_with_cache(corrupted)[1]


CASES = [
    (None, "q", False, "denoising"),
    (None, "q", True, "noising"),
    ([(2, 1), (1, 3)], "q", False, "denoising"),
    ([(2, 1)], "kv", True, "denoising"),
    ([(2, 0), (2, 3)], "k", False, "noising"),
    ([(1, 2)], "v", False, "noising"),
]


@pytest.mark.parametrize("receivers,comps,freeze_mlps,direction", CASES)
def test_matches_slow_reference(model, data, caches, receivers, comps, freeze_mlps, direction):
    clean, corrupted, answers = data
    clean_cache, corrupted_cache = caches
    target, source_cache, target_cache = (corrupted, clean_cache, corrupted_cache) if direction == "denoising" \
        else (clean, corrupted_cache, clean_cache)
    result = path_patch(model, clean, corrupted, answers, receivers=receivers, receiver_input=comps,
                        direction=direction, metrics="logit_diff", freeze_mlps=freeze_mlps,
                        max_batch_tokens=40)  # small chunks: several passes per layer
    assert result.grid().shape == (N_LAYERS, N_HEADS)
    assert result.stats["forward_passes"] > N_LAYERS
    got = result.values["logit_diff"][0]
    for cell, (l, h) in enumerate(result.indices):
        want = logit_diff(reference(model, target, source_cache, target_cache, [(l, h)], receivers, comps,
                                    freeze_mlps), answers)
        assert (got[cell] - want).abs().max() <= 1e-4, (l, h)


def test_sender_groups_and_subsets(model, data, caches):
    clean, corrupted, answers = data
    result = path_patch(model, clean, corrupted, answers, receivers=[(2, 2)], metrics="logit_diff",
                        senders=[(0, 1), [(0, 1), (1, 2)]])
    assert result.axes == ("sender",) and result.grid().shape == (2,)
    assert result.indices == [("L0H1",), ("L0H1+L1H2",)]
    want = logit_diff(reference(model, corrupted, caches[0], caches[1], [(0, 1), (1, 2)], [(2, 2)], "q", False),
                      answers)
    assert (result.values["logit_diff"][0, 1] - want).abs().max() <= 1e-4
    sub = path_patch(model, clean, corrupted, answers, layers=[1, 2], heads=[0, 3], metrics="logit_diff")
    assert sub.grid("logit_diff").shape == (2, 2) and sub.indices == [(1, 0), (1, 3), (2, 0), (2, 3)]


@pytest.mark.parametrize("component", ["q", "k", "v"])
def test_matches_transformer_lens_direct_path(model, data, caches, component):
    """With MLPs frozen, our path into one receiver is TL's direct path patch (denoising)."""
    from transformer_lens.patching import get_act_patch_direct_path

    clean, corrupted, answers = data
    receiver = (2, 1)
    result = path_patch(model, clean, corrupted, answers, receivers=[receiver], receiver_input=component,
                        metrics="logit_diff", freeze_mlps=True)
    grid = result.grid("logit_diff")
    for src_layer, src_head in [(0, 1), (0, 3), (1, 0), (1, 2)]:  # TL sweeps every later head per source
        tl = get_act_patch_direct_path(model, corrupted, *caches, lambda lg: logit_diff(lg, answers).mean(),
                                       src_layer, src_head, component=component, verbose=False)
        assert abs(float(tl[receiver]) - float(grid[src_layer, src_head])) <= 1e-4


def test_noising_matches_transformer_lens_with_runs_swapped(model, data, caches):
    from transformer_lens.patching import get_act_patch_direct_path

    clean, corrupted, answers = data
    result = path_patch(model, clean, corrupted, answers, receivers=[(1, 0)], receiver_input="v",
                        direction="noising", metrics="logit_diff", freeze_mlps=True)
    tl = get_act_patch_direct_path(model, clean, caches[1], caches[0], lambda lg: logit_diff(lg, answers).mean(),
                                   0, 2, component="v", verbose=False)
    assert abs(float(tl[1, 0]) - float(result.grid()[0, 2])) <= 1e-4


def test_direct_path_to_logits_is_the_sender_write(model, data, caches):
    """Frozen MLPs: the final residual stream is the target's plus the sender's Δz @ W_O."""
    clean, corrupted, answers = data
    result = path_patch(model, clean, corrupted, answers, metrics="logit_diff", freeze_mlps=True)
    clean_cache, corrupted_cache = caches
    final = corrupted_cache[f"blocks.{N_LAYERS - 1}.hook_resid_post"]
    for cell, (l, h) in enumerate(result.indices):
        name = f"blocks.{l}.attn.hook_z"
        delta = (clean_cache[name][:, :, h] - corrupted_cache[name][:, :, h]) @ model.blocks[l].attn.W_O[h]
        with torch.no_grad():
            logits = model.unembed(model.ln_final(final + delta))
        assert (result.values["logit_diff"][0, cell] - logit_diff(logits, answers)).abs().max() <= 1e-4


def test_unreachable_senders_and_normalisation(model, data):
    clean, corrupted, answers = data
    # The random answers' clean - corrupted gaps (-0.83, -0.01, +0.31, +0.48) cancel, which
    # normalisation refuses (test_validation.py); asked the other way round in the first two
    # pairs, every gap is positive.
    answers = [pair[::-1] for pair in answers[:2]] + answers[2:]
    result = path_patch(model, clean, corrupted, answers, receivers=[(1, 0)])
    grid = result.grid("normalized")
    assert torch.all(grid[1:] == 0)  # layers 1, 2 cannot reach a layer-1 receiver
    assert result.stats["skipped_noop"] == 2 * N_HEADS
    assert result.baselines["clean"]["logit_diff"].shape == (BATCH,)
    assert "L1H0" in result.sites[0] and "Path" in repr(result)


def test_ablation_and_streaming(model, data):
    clean, _, answers = data
    updates = []
    result = path_patch(model, clean, answers=answers, ablation="mean", metrics="logit_diff",
                        callback=updates.append)
    assert result.direction == "noising" and updates[-1].done == updates[-1].total == N_LAYERS * N_HEADS


def test_bad_inputs(model, data):
    clean, corrupted, answers = data
    with pytest.raises(IdenticalPromptsError):
        path_patch(model, clean, clean, answers)
    with pytest.raises(PatchingInputError, match="receiver_input"):
        path_patch(model, clean, corrupted, answers, receivers=[(1, 0)], receiver_input="x")
    with pytest.raises(PatchingInputError, match="does not exist"):
        path_patch(model, clean, corrupted, answers, receivers=[(5, 0)])
    with pytest.raises(PatchingInputError, match="not both"):
        path_patch(model, clean, corrupted, answers, senders=[(0, 0)], layers=[0])
    with pytest.raises(PatchingInputError, match="incorrect answer"):
        path_patch(model, clean, corrupted, [(a,) for a, _ in answers])


def test_grouped_query_models_refuse_key_value_receivers(make_random_bridge):
    model = make_random_bridge(n_layers=2, n_heads=4, gqa_kv_heads=2)
    clean = torch.randint(2, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    corrupted = clean.clone()
    corrupted[:, 3] = (clean[:, 3] + 1) % 64
    with pytest.raises(PatchingInputError, match="key/value heads"):
        path_patch(model, clean, corrupted, [(5, 6), (7, 8)], receivers=[(1, 0)], receiver_input="kv")
    assert path_patch(model, clean, corrupted, [(5, 6), (7, 8)], receivers=[(1, 0)]).grid().shape == (2, 4)
