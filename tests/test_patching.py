"""The patching core against TransformerLens' own ``transformer_lens.patching``.

Every sweep must agree with TransformerLens to 1e-4 (float32); the engine's shortcuts
(batching, resuming at the patched layer, skipping unchanged positions and no-op patches)
must not change a single value.
"""

import threading

import pytest
import torch
from transformer_lens import patching as tlp

import patchwidgets as pw

TOL = 1e-4

TL_SWEEPS = [
    ("resid_pre", tlp.get_act_patch_resid_pre),
    ("resid_mid", tlp.get_act_patch_resid_mid),
    ("attn_out", tlp.get_act_patch_attn_out),
    ("mlp_out", tlp.get_act_patch_mlp_out),
    ("block", tlp.get_act_patch_block_every),
    ("head_out", tlp.get_act_patch_attn_head_out_all_pos),
    ("head_q", tlp.get_act_patch_attn_head_q_all_pos),
    ("head_k", tlp.get_act_patch_attn_head_k_all_pos),
    ("head_v", tlp.get_act_patch_attn_head_v_all_pos),
    ("head_pattern", tlp.get_act_patch_attn_head_pattern_all_pos),
    ("head_out_by_pos", tlp.get_act_patch_attn_head_out_by_pos),
    ("head_q_by_pos", tlp.get_act_patch_attn_head_q_by_pos),
    ("head_k_by_pos", tlp.get_act_patch_attn_head_k_by_pos),
    ("head_v_by_pos", tlp.get_act_patch_attn_head_v_by_pos),
    ("head_pattern_by_pos", tlp.get_act_patch_attn_head_pattern_by_pos),
    ("heads_every", tlp.get_act_patch_attn_head_all_pos_every),
]


def tl_reference(model, clean_tokens, corrupted_tokens, answer_pos, correct, incorrect, fn, direction):
    """TransformerLens' sweep with a mean logit-difference metric at the answer positions."""
    target, source = (corrupted_tokens, clean_tokens) if direction == "denoising" else (clean_tokens, corrupted_tokens)
    _, source_cache = model.run_with_cache(source)
    rows = torch.arange(target.shape[0])

    def metric(logits):
        final = logits[rows, answer_pos]
        return (final[rows, correct] - final[rows, incorrect]).mean()

    return fn(model, target, source_cache, metric)


@pytest.fixture(scope="module")
def random_pairs():
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 64, (3, 9), generator=g)
    corrupted = clean.clone()
    corrupted[:, 5] = (corrupted[:, 5] + 7) % 64  # one differing position, like an S2 swap
    return clean, corrupted, [(3, 4), (5, 6), (7, 8)]


@pytest.mark.parametrize("site,tl_fn", TL_SWEEPS, ids=[s for s, _ in TL_SWEEPS])
@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_parity_random_gpt2(random_gpt2, random_pairs, site, tl_fn, direction):
    clean, corrupted, answers = random_pairs
    ours = pw.patch(random_gpt2, clean, corrupted, answers=answers, site=site, direction=direction,
                    metrics="logit_diff", progress=False)
    ref = tl_reference(random_gpt2, clean, corrupted, torch.full((3,), 8),
                       torch.tensor([a for a, _ in answers]), torch.tensor([b for _, b in answers]), tl_fn, direction)
    assert ours.grid("logit_diff").shape == ref.shape
    assert (ours.grid("logit_diff") - ref).abs().max() <= TOL


@pytest.mark.parametrize("site,tl_fn", [TL_SWEEPS[0], TL_SWEEPS[4], TL_SWEEPS[5], TL_SWEEPS[10], TL_SWEEPS[15]],
                         ids=["resid_pre", "block", "head_out", "head_out_by_pos", "heads_every"])
def test_parity_toy_ioi_dataset(toy_model, site, tl_fn):
    clean = ["When Mary and John went to the store, John gave a drink to",
             "When Lisa and Sarah went to the cinema, Lisa gave the ticket to"]
    corrupted = ["When Mary and John went to the store, Mary gave a drink to",
                 "When Lisa and Sarah went to the cinema, Sarah gave the ticket to"]
    answers = [(" Mary", " John"), (" Sarah", " Lisa")]
    ours = pw.patch(toy_model, clean, corrupted, answers=answers, site=site, metrics="logit_diff", progress=False)
    ct, xt = toy_model.to_tokens(clean), toy_model.to_tokens(corrupted)
    assert ct.shape == xt.shape
    pos = torch.full((2,), ct.shape[1] - 1)
    correct = torch.tensor([toy_model.to_single_token(a) for a, _ in answers])
    incorrect = torch.tensor([toy_model.to_single_token(b) for _, b in answers])
    ref = tl_reference(toy_model, ct, xt, pos, correct, incorrect, tl_fn, "denoising")
    assert (ours.grid("logit_diff") - ref).abs().max() <= TOL


def test_gqa_model_does_not_crash_and_matches(make_random_bridge):
    model = make_random_bridge(n_layers=2, n_heads=4, gqa_kv_heads=2, d_model=64)
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(0, 64, (2, 7), generator=g)
    corrupted = clean.clone()
    corrupted[:, 4] = (corrupted[:, 4] + 1) % 64
    for site, fn in [("head_k", tlp.get_act_patch_attn_head_k_all_pos), ("head_q", tlp.get_act_patch_attn_head_q_all_pos),
                     ("resid_pre", tlp.get_act_patch_resid_pre)]:
        ours = pw.patch(model, clean, corrupted, answers=(1, 2), site=site, metrics="logit_diff", progress=False)
        ref = tl_reference(model, clean, corrupted, torch.full((2,), 6), torch.tensor([1, 1]), torch.tensor([2, 2]), fn,
                           "denoising")
        assert ours.grid().shape == ref.shape
        assert (ours.grid() - ref).abs().max() <= TOL
    assert pw.patch(model, clean, corrupted, answers=(1, 2), site="head_k", progress=False).grid().shape == (2, 2)


def test_noising_equals_denoising_swapped(random_gpt2, random_pairs):
    clean, corrupted, answers = random_pairs
    metrics = ["logit_diff", "normalized", "logit", "logprob", "prob", "rank", "accuracy"]
    for site in ["resid_pre", "head_out"]:
        noising = pw.patch(random_gpt2, clean, corrupted, answers=answers, site=site, direction="noising",
                           metrics=metrics, progress=False)
        swapped = pw.patch(random_gpt2, corrupted, clean, answers=answers, site=site, direction="denoising",
                           metrics=metrics, progress=False)
        for m in metrics:
            assert torch.allclose(noising.grid(m), swapped.grid(m), atol=TOL), (site, m)


def test_patching_a_whole_layer_recovers_the_source_run(random_gpt2, random_pairs):
    clean, corrupted, answers = random_pairs
    for layer in [0, 2]:
        for direction in ["denoising", "noising"]:
            r = pw.patch(random_gpt2, clean, corrupted, answers=answers, site=f"blocks.{layer}.hook_resid_pre",
                         index=[(slice(None),)], direction=direction,
                         metrics=["logit_diff", "normalized", "kl"], progress=False)
            source = "clean" if direction == "denoising" else "corrupted"
            assert torch.allclose(r.values["logit_diff"][0, 0], r.baselines[source]["logit_diff"], atol=TOL)
            assert torch.allclose(r.grid("normalized"), torch.ones(1), atol=TOL)
            if direction == "denoising":  # KL is measured from the clean run
                assert r.grid("kl").abs().max() < 1e-5


def test_metrics_match_hand_computation(random_gpt2, random_pairs):
    clean, corrupted, answers = random_pairs
    r = pw.patch(random_gpt2, clean, corrupted, answers=answers, site="resid_pre", layers=[1], positions=[5],
                 metrics=list(pw.BUILTIN_METRICS), progress=False)
    # Reproduce the single patch by hand with a TransformerLens hook.
    _, clean_cache = random_gpt2.run_with_cache(clean)

    def hook(act, hook):
        act = act.clone()
        act[:, 5] = clean_cache["blocks.1.hook_resid_pre"][:, 5]
        return act

    logits = random_gpt2.run_with_hooks(corrupted, fwd_hooks=[("blocks.1.hook_resid_pre", hook)])[:, -1]
    clean_logits = random_gpt2(clean)[:, -1]
    corrupted_logits = random_gpt2(corrupted)[:, -1]
    c, i = torch.tensor([a for a, _ in answers]), torch.tensor([b for _, b in answers])
    rows = torch.arange(3)
    ld = logits[rows, c] - logits[rows, i]
    ld_clean = clean_logits[rows, c] - clean_logits[rows, i]
    ld_corr = corrupted_logits[rows, c] - corrupted_logits[rows, i]
    lp = logits.log_softmax(-1)
    expected = {
        "logit_diff": ld,
        "normalized": (ld - ld_corr) / (ld_clean - ld_corr).mean(),
        "logit": logits[rows, c],
        "logprob": lp[rows, c],
        "prob": lp[rows, c].exp(),
        "rank": torch.tensor([1.0 + (logits[b] > logits[b, c[b]]).sum() for b in range(3)]),
        "accuracy": (logits.argmax(-1) == c).float(),
        "kl": torch.nn.functional.kl_div(lp, clean_logits.log_softmax(-1), log_target=True, reduction="none").sum(-1),
    }
    for name, value in expected.items():
        got = r.values[name][0, 0]
        assert torch.allclose(got, value.detach().float(), atol=1e-4), name
    # The dataset mean of the normalised metric is the ARENA ratio of means.
    assert torch.isclose(r.grid("normalized"), ((ld.mean() - ld_corr.mean()) / (ld_clean.mean() - ld_corr.mean())).detach(),
                         atol=1e-5).all()


def test_dataset_frame_keeps_pairs_and_standard_error(random_gpt2, random_pairs):
    clean, corrupted, answers = random_pairs
    r = pw.patch(random_gpt2, clean, corrupted, answers=answers, site="resid_pre", metrics=["logit_diff"], progress=False)
    singles = [pw.patch(random_gpt2, clean[b:b + 1], corrupted[b:b + 1], answers=answers[b], site="resid_pre",
                        metrics=["logit_diff"], progress=False).grid() for b in range(3)]
    stacked = torch.stack(singles, -1)
    assert torch.allclose(r.grid(per_pair=True), stacked, atol=TOL)
    assert torch.allclose(r.grid(), stacked.mean(-1), atol=TOL)
    frame = r.frame
    assert list(frame.columns[:3]) == ["site", "layer", "pos"] and len(frame) == 3 * 9
    se = stacked.std(-1, unbiased=True).flatten() / 3 ** 0.5
    assert torch.allclose(torch.tensor(frame["logit_diff_se"].values), se, atol=1e-4)
    assert len(r.frame_per_pair) == 3 * 9 * 3


def test_noop_patches_are_skipped_but_reported(random_gpt2, random_pairs):
    clean, corrupted, answers = random_pairs
    r = pw.patch(random_gpt2, clean, corrupted, answers=answers, site="resid_pre", progress=False)
    # Positions before the differing one carry identical activations in both runs; at layer 0
    # every other position does too. 3 layers x 9 positions, 1 + 2 x 4 patches change something.
    assert r.stats["skipped_noop"] == 27 - 9
    assert torch.allclose(r.grid("normalized")[:, :5], torch.zeros(3, 5))


def test_hand_built_hooked_root_module_circuit():
    from transformer_lens import HookedRootModule
    from transformer_lens.hook_points import HookPoint

    class AndGate(HookedRootModule):
        """logit[1] = a AND b from two input tokens; a, b read off the token ids."""

        def __init__(self):
            super().__init__()
            self.hook_a, self.hook_b = HookPoint(), HookPoint()
            self.setup()

        def forward(self, tokens):
            a = self.hook_a(tokens[:, 0].float())
            b = self.hook_b(tokens[:, 1].float())
            logits = torch.zeros(tokens.shape[0], tokens.shape[1], 2)
            logits[:, -1, 1] = 4 * a * b
            return logits

    model = AndGate()
    model.cfg = type("Cfg", (), {"n_layers": 0, "n_heads": 0, "d_vocab": 2, "n_ctx": 2})()
    clean, corrupted = torch.tensor([[1, 1]]), torch.tensor([[0, 0]])
    for hook in ["hook_a", "hook_b"]:
        r = pw.patch(model, clean, corrupted, answers=(1, 0), site=hook, index=[()], progress=False)
        assert r.grid("logit_diff").item() == 0.0  # one input alone does not open an AND gate
        r = pw.patch(model, clean, corrupted, answers=(1, 0), site=hook, index=[()], direction="noising",
                     progress=False)
        assert r.grid("normalized").item() == 1.0  # but each is necessary


def test_ablations(random_gpt2, random_pairs):
    clean, _, answers = random_pairs
    zero = pw.patch(random_gpt2, clean, ablation="zero", answers=answers, site="attn_out", layers=[1],
                    metrics="logit_diff", progress=False)
    _, cache = random_gpt2.run_with_cache(clean)

    def zero_hook(act, hook):
        act = act.clone()
        act[:, 3] = 0
        return act

    logits = random_gpt2.run_with_hooks(clean, fwd_hooks=[("blocks.1.hook_attn_out", zero_hook)])[:, -1]
    c, i = torch.tensor([3, 5, 7]), torch.tensor([4, 6, 8])
    expected = (logits[torch.arange(3), c] - logits[torch.arange(3), i]).mean()
    assert torch.isclose(zero.grid()[0, 3], expected, atol=TOL)
    mean = pw.patch(random_gpt2, clean, ablation="mean", answers=answers, site="resid_pre", metrics="logit_diff",
                    progress=False)
    assert mean.direction == "noising" and mean.grid().shape == (3, 9)
    noise = pw.patch(random_gpt2, clean, ablation="noise", answers=answers, site="resid_post", noise=3.0,
                     metrics=["normalized", "logit_diff"], progress=False)
    # Causal tracing: the noised run has noise on every non-BOS position; restoring the final
    # residual stream at the answer position restores the clean answer exactly, while
    # restoring the untouched BOS position changes nothing.
    assert abs(float(noise.grid("normalized")[2, 8]) - 1.0) < TOL
    assert noise.grid("normalized")[:, 0].abs().max() < TOL
    assert noise.baselines["corrupted"]["logit_diff"].sub(noise.baselines["clean"]["logit_diff"]).abs().max() > 0.01
    with pytest.raises(pw.PatchingInputError):
        pw.patch(random_gpt2, clean, ablation="zero", answers=answers, metrics="normalized", progress=False)


def test_callback_streams_and_cancel_stops(random_gpt2, random_pairs):
    clean, corrupted, answers = random_pairs
    updates = []
    pw.patch(random_gpt2, clean, corrupted, answers=answers, site="head_out_by_pos", max_batch_tokens=64,
             callback=lambda u: updates.append((u.done, u.total)), progress=False)
    assert len(updates) > 2 and updates[-1][0] == updates[-1][1]
    assert [d for d, _ in updates] == sorted(d for d, _ in updates)

    with pytest.raises(pw.PatchingCancelled) as info:
        pw.patch(random_gpt2, clean, corrupted, answers=answers, site="head_out_by_pos", max_batch_tokens=64,
                 callback=lambda u: False, progress=False)
    partial = info.value.partial
    assert not partial.complete and torch.isnan(partial.grid()).any() and not torch.isnan(partial.grid()).all()

    event = threading.Event()
    event.set()
    with pytest.raises(pw.PatchingCancelled):
        pw.patch(random_gpt2, clean, corrupted, answers=answers, site="resid_pre", cancel=event, progress=False)


def test_figure_and_repr(random_gpt2, random_pairs):
    clean, corrupted, answers = random_pairs
    r = pw.patch(random_gpt2, clean, corrupted, answers=answers, site="block", progress=False)
    fig = r.figure("normalized")
    assert len(fig.data) == 3 and fig.data[0].zmid == 0
    assert repr(r).startswith("PatchResult(resid_pre+attn_out+mlp_out, denoising, layer=3 x pos=9, pairs=3")


def test_neuron_sites_match_a_hand_written_hook(random_gpt2, random_pairs):
    clean, corrupted, answers = random_pairs
    _, clean_cache = random_gpt2.run_with_cache(clean)
    c, i = torch.tensor([a for a, _ in answers]), torch.tensor([b for _, b in answers])
    rows = torch.arange(3)

    def by_hand(layer, neuron, pos=None):
        def hook(act, hook):
            act = act.clone()
            where = (slice(None), slice(None) if pos is None else pos, neuron)
            act[where] = clean_cache[f"blocks.{layer}.mlp.hook_post"][where]
            return act

        logits = random_gpt2.run_with_hooks(corrupted, fwd_hooks=[(f"blocks.{layer}.mlp.hook_post", hook)])[:, -1]
        return (logits[rows, c] - logits[rows, i]).mean()

    all_pos = pw.patch(random_gpt2, clean, corrupted, answers=answers, site="neuron", layers=[1], neurons=[0, 7, 100],
                       metrics="logit_diff", progress=False)
    assert all_pos.grid().shape == (1, 3)
    for k, n in enumerate([0, 7, 100]):
        assert torch.isclose(all_pos.grid()[0, k], by_hand(1, n), atol=TOL)
    one_pos = pw.patch(random_gpt2, clean, corrupted, answers=answers, site="neuron_by_pos", layers=[2],
                       positions=[6, 8], neurons=[3], metrics="logit_diff", progress=False)
    assert one_pos.grid().shape == (1, 2, 1)
    assert torch.isclose(one_pos.grid()[0, 1, 0], by_hand(2, 3, pos=8), atol=TOL)
    assert torch.isclose(one_pos.grid()[0, 0, 0], by_hand(2, 3, pos=6), atol=TOL)


@pytest.mark.parametrize("site", ["resid_pre", "head_out", "head_out_by_pos", "head_pattern_by_pos", "neuron_by_pos"])
def test_figures_have_one_row_per_layer_and_component(random_gpt2, random_pairs, site):
    clean, corrupted, answers = random_pairs
    r = pw.patch(random_gpt2, clean, corrupted, answers=answers, site=site, neurons=[0, 1], progress=False)
    heat = r.figure("logit_diff").data[0]
    n_rows = {"resid_pre": 3, "head_out": 3, "head_out_by_pos": 12, "head_pattern_by_pos": 12, "neuron_by_pos": 6}[site]
    n_cols = {"head_out": 4}.get(site, 9)
    assert len(heat.z) == n_rows and len(heat.z[0]) == n_cols
    assert torch.allclose(torch.tensor(heat.z, dtype=torch.float64).flatten().sort().values,
                          r.grid("logit_diff").flatten().sort().values.double(), atol=1e-6)
