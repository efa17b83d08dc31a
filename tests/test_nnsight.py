"""``pw.patch`` on nnsight models: the same grids as on a TransformerBridge of the same weights.

Two checkpoints, each loaded both ways: the bundled toy-ioi GPT-2 (fused ``c_attn``) and a random
Llama-shaped model with grouped-query attention saved to a temporary folder. Every site the
nnsight backend supports is compared in both directions with several metrics, plus ablations.
"""

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

nnsight = pytest.importorskip("nnsight")

import patchwidgets as pw  # noqa: E402
from patchwidgets.errors import PatchingInputError  # noqa: E402
from patchwidgets.grading import ioi_batch  # noqa: E402
from patchwidgets.loading import model_path  # noqa: E402

ATOL = 1e-5
METRICS = ["logit_diff", "normalized", "logit", "logprob", "prob", "kl", "rank", "accuracy"]
# The random Llama's clean and corrupted runs differ little (mean logit-difference gap ~0.1), so
# `normalized` divides float32 rounding by 0.1; it is compared at ATOL / gap instead.
LLAMA_METRICS = ["logit_diff", "normalized", "logprob", "prob", "kl", "rank"]


def _pair(bridge, lm, batch, metrics, **kw):
    answers = list(zip(batch.correct, batch.incorrect))
    corrupted = None if kw.get("ablation") else batch.corrupted
    expected = pw.patch(bridge, batch.clean, corrupted, answers, metrics=metrics, **kw)
    got = pw.patch(lm, batch.clean, corrupted, answers, metrics=metrics, **kw)
    return expected, got


def _assert_same(expected, got, atol=ATOL, normalized_atol=None):
    assert got.sites == expected.sites and got.axes == expected.axes and got.shape == expected.shape
    assert got.indices == expected.indices and got.direction == expected.direction
    assert got.clean_str_tokens == expected.clean_str_tokens
    assert got.corrupted_str_tokens == expected.corrupted_str_tokens
    assert got.complete and got.metrics == expected.metrics
    assert got.stats["patches"] == expected.stats["patches"]
    assert got.stats["skipped_noop"] == expected.stats["skipped_noop"]
    assert set(got.baselines) == set(expected.baselines)
    for metric in expected.metrics:
        tol = normalized_atol if (metric == "normalized" and normalized_atol) else atol
        torch.testing.assert_close(got.grid(metric), expected.grid(metric), atol=tol, rtol=0, msg=metric)
        # Single pairs (not averaged over 8) carry the full float32 rounding of logits ~10.
        torch.testing.assert_close(got.values[metric], expected.values[metric], atol=10 * tol, rtol=0,
                                   msg=metric)
        for run, values in expected.baselines.items():
            torch.testing.assert_close(got.baselines[run][metric], values[metric], atol=10 * tol, rtol=0)


# ------------------------------------------------------------------------------------ toy-ioi
@pytest.fixture(scope="module")
def toy():
    bridge = pw.load_model("toy-ioi", device="cpu")
    lm = nnsight.TransformersModel(str(model_path("toy-ioi")), task="text-generation", dispatch=True)
    return bridge, lm, ioi_batch(bridge, n=8)


TOY_SITES = [
    ("resid_pre", {}), ("resid_post", {}), ("attn_out", {}), ("mlp_out", {}), ("block", {}),
    ("head_out", {}), ("head_out_by_pos", {"layers": [2, 3]}),
    ("head_q", {}), ("head_k_by_pos", {"layers": [3], "positions": [4, 10, 14]}), ("head_v", {}),
    ("neuron", {"layers": [0, 3], "neurons": range(0, 512, 16)}),
    ("neuron_by_pos", {"layers": [2], "positions": [10, 14], "neurons": range(0, 512, 64)}),
]


@pytest.mark.parametrize("direction", ["denoising", "noising"])
@pytest.mark.parametrize("site,kw", TOY_SITES, ids=[s for s, _ in TOY_SITES])
def test_toy_grids_match_bridge(toy, site, kw, direction):
    bridge, lm, batch = toy
    expected, got = _pair(bridge, lm, batch, METRICS, site=site, direction=direction, **kw)
    _assert_same(expected, got)
    assert got.stats["forward_passes"] >= 1


TOY_ABLATIONS = [
    ("noise", "denoising", "resid_pre", {}),
    ("noise", "noising", "attn_out", {"noise_positions": [2, 4]}),
    ("mean", "noising", "head_out", {}),
    ("zero", "noising", "mlp_out", {"positions": [0, 10, 14]}),
]


@pytest.mark.parametrize("ablation,direction,site,kw", TOY_ABLATIONS, ids=[a for a, *_ in TOY_ABLATIONS])
def test_toy_ablations_match_bridge(toy, ablation, direction, site, kw):
    bridge, lm, batch = toy
    metrics = METRICS if ablation == "noise" else ["logit_diff", "logprob", "kl"]
    expected, got = _pair(bridge, lm, batch, metrics, site=site, direction=direction, ablation=ablation, **kw)
    _assert_same(expected, got)


def test_chunking_and_streaming(toy):
    """One patch per trace gives the same grid; the callback sees every chunk."""
    bridge, lm, batch = toy
    answers = list(zip(batch.correct, batch.incorrect))
    updates = []
    kw = dict(site="attn_out", layers=[1], metrics=["logit_diff"])
    whole = pw.patch(lm, batch.clean, batch.corrupted, answers, **kw)
    one_by_one = pw.patch(lm, batch.clean, batch.corrupted, answers, max_batch_tokens=1,
                          callback=lambda u: updates.append(u.done), **kw)
    assert whole.stats["forward_passes"] == 1
    assert one_by_one.stats["forward_passes"] == whole.stats["patches"] - whole.stats["skipped_noop"]
    assert updates[-1] == whole.stats["patches"] and len(updates) == one_by_one.stats["forward_passes"]
    torch.testing.assert_close(one_by_one.grid(), whole.grid(), atol=ATOL, rtol=0)


def test_prompts_of_different_lengths(toy):
    """Right-padded datasets: each prompt's own answer position, as on a bridge."""
    bridge, lm, _ = toy
    clean = ["When Mary and John went to the store, John gave a drink to",
             "When Mary and John went to the big store, John gave a drink to"]
    corrupted = [c.replace("John gave", "Mary gave") for c in clean]
    answers = [(" Mary", " John")] * 2
    expected = pw.patch(bridge, clean, corrupted, answers, site="head_out", metrics=METRICS)
    got = pw.patch(lm, clean, corrupted, answers, site="head_out", metrics=METRICS)
    _assert_same(expected, got)


def test_in_memory_hf_model(toy):
    """An nnsight wrapper of a model already in memory (its own tokenizer copy, see nnsight)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bridge, _, batch = toy
    path = model_path("toy-ioi")
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    lm = nnsight.TransformersModel(hf, tokenizer=AutoTokenizer.from_pretrained(path), task="text-generation")
    expected, got = _pair(bridge, lm, batch, ["logit_diff", "kl"], site="mlp_out", layers=[2])
    _assert_same(expected, got)


def test_inputs_are_checked(toy):
    _, lm, _ = toy
    tokenizer_class = type(lm.tokenizer)
    with pytest.raises(pw.UnknownWordError, match="Zorblax"):  # strict word-level tokenizer
        pw.patch(lm, "When Zorblax and John went", "When Mary and John went", (" Mary", " John"))
    assert type(lm.tokenizer) is tokenizer_class  # (made strict on a copy, nnsight's untouched)
    with pytest.raises(pw.TokenLengthMismatchError):
        pw.patch(lm, "When Mary and John went to the store", "When Mary went to the store", (" Mary", " John"))
    with pytest.raises(pw.AnswerTokenError):
        pw.patch(lm, "When Mary and John went", "When John and Mary went", (" Mary John", " John"))


@pytest.mark.parametrize("site", ["head_pattern", "head_pattern_by_pos", "heads_every", "resid_mid",
                                  "blocks.0.attn.hook_z", "nonsense"])
def test_unsupported_sites_say_what_is_supported(toy, site):
    _, lm, batch = toy
    with pytest.raises(PatchingInputError, match="resid_pre, resid_post") as err:
        pw.patch(lm, batch.clean, batch.corrupted, list(zip(batch.correct, batch.incorrect)), site=site,
                 index=[(0,)] if site.startswith("blocks.") else None)
    assert err.value.field == "site"


def test_out_of_range_axes(toy):
    _, lm, batch = toy
    answers = list(zip(batch.correct, batch.incorrect))
    for kw in ({"layers": [4]}, {"site": "head_out", "heads": [8]}, {"positions": [99]}):
        with pytest.raises(PatchingInputError):
            pw.patch(lm, batch.clean, batch.corrupted, answers, **{"site": "resid_pre", **kw})


def test_remote_needs_an_nnsight_model(toy):
    bridge, _, batch = toy
    with pytest.raises(PatchingInputError, match="nnsight model"):
        pw.patch(bridge, batch.clean, batch.corrupted, list(zip(batch.correct, batch.incorrect)), remote=True)


def _record_remote_flags(lm, monkeypatch) -> list:
    """From now on, ``lm.trace`` runs locally and records the ``remote=`` each call asked for."""
    real_trace, flags = type(lm).trace, []

    def trace(self, *args, **kwargs):
        flags.append(kwargs.pop("remote", None))
        return real_trace(self, *args, **kwargs)

    monkeypatch.setattr(type(lm), "trace", trace)
    return flags


def test_remote_sends_every_trace_to_ndif(toy, monkeypatch):
    """``remote=True`` is the local code path with ``remote=True`` on every trace. NDIF cannot
    be reached offline, so the traces are run locally; what is checked is that none of them
    would have stayed local, and that the sweep is otherwise the same."""
    bridge, lm, batch = toy
    answers = list(zip(batch.correct, batch.incorrect))
    local = pw.patch(lm, batch.clean, batch.corrupted, answers, site="head_out")
    flags = _record_remote_flags(lm, monkeypatch)
    remote = pw.patch(lm, batch.clean, batch.corrupted, answers, site="head_out", remote=True)
    assert len(flags) >= 3 and all(flag is True for flag in flags), flags
    torch.testing.assert_close(remote.grid("normalized"), local.grid("normalized"), atol=0, rtol=0)


def test_import_does_not_import_nnsight():
    code = ("import sys, patchwidgets, patchwidgets.patching, patchwidgets.nnsight_backend as nb\n"
            "assert not nb.is_nnsight_model(object())\n"
            "assert 'nnsight' not in sys.modules, 'nnsight was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------------------------ Llama (GQA)
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("llama-gqa")
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
        intermediate_size=128, vocab_size=366, max_position_embeddings=64, initializer_range=0.2))
    hf.save_pretrained(path)
    AutoTokenizer.from_pretrained(model_path("toy-ioi")).save_pretrained(path)  # word-level, 366 words
    bridge = TransformerBridge.boot_transformers(
        str(path), hf_model=LlamaForCausalLM.from_pretrained(path).eval(),
        tokenizer=AutoTokenizer.from_pretrained(path), device="cpu")
    bridge.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # LanguageModel: nnsight's deprecated alias
        lm = nnsight.LanguageModel(str(path), dispatch=True)
    batch = ioi_batch(bridge, n=8)
    answers = list(zip(batch.correct, batch.incorrect))
    clean = pw.patch(bridge, batch.clean, batch.corrupted, answers, metrics="logit_diff", layers=[0],
                     positions=[0]).baselines
    gap = float((clean["clean"]["logit_diff"] - clean["corrupted"]["logit_diff"]).mean())
    return bridge, lm, batch, abs(gap)


LLAMA_SITES = [
    ("resid_pre", {}), ("resid_post", {}), ("attn_out", {}), ("mlp_out", {}), ("block", {}),
    ("head_out", {}), ("head_out_by_pos", {"layers": [1]}),
    ("head_q", {}), ("head_k", {}), ("head_v_by_pos", {"layers": [0]}),
    ("neuron", {"neurons": range(0, 128, 8)}), ("neuron_by_pos", {"layers": [1], "neurons": [3, 64]}),
]


@pytest.mark.parametrize("direction", ["denoising", "noising"])
@pytest.mark.parametrize("site,kw", LLAMA_SITES, ids=[s for s, _ in LLAMA_SITES])
def test_llama_gqa_grids_match_bridge(llama, site, kw, direction):
    bridge, lm, batch, gap = llama
    expected, got = _pair(bridge, lm, batch, LLAMA_METRICS, site=site, direction=direction, **kw)
    if site in ("head_k", "head_v_by_pos"):
        assert got.shape[-1] == 2  # key/value heads of grouped-query attention
    _assert_same(expected, got, normalized_atol=ATOL / min(gap, 1.0))


@pytest.mark.parametrize("ablation,direction,site", [("mean", "noising", "head_k"),
                                                     ("noise", "denoising", "resid_pre")])
def test_llama_ablations_match_bridge(llama, ablation, direction, site):
    bridge, lm, batch, gap = llama
    metrics = ["logit_diff", "prob", "kl"]
    expected, got = _pair(bridge, lm, batch, metrics, site=site, direction=direction, ablation=ablation)
    _assert_same(expected, got)


# ------------------------------------------------------------------------------------ attribution patching
def _atp_pair(bridge, lm, batch, metrics, **kw):
    answers = list(zip(batch.correct, batch.incorrect))
    corrupted = None if kw.get("ablation") else batch.corrupted
    expected = pw.attribution_patch(bridge, batch.clean, corrupted, answers, metrics=metrics, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (plain AtP for q/k: asserted below)
        got = pw.attribution_patch(lm, batch.clean, corrupted, answers, metrics=metrics, **kw)
    return expected, got


ATP_SITES = [
    ("resid_pre", {}), ("attn_out", {}), ("mlp_out", {"direction": "noising"}), ("head_out", {}),
    ("head_out_by_pos", {"layers": [2, 3]}), ("head_v", {}), ("head_q", {"qk_fix": False}),
    ("head_k_by_pos", {"layers": [3], "qk_fix": False}), ("neuron", {"layers": [1], "neurons": range(0, 512, 32)}),
    ("resid_post", {"ablation": "noise"}), ("head_out", {"ablation": "mean", "direction": "noising"}),
]


@pytest.mark.parametrize("site,kw", ATP_SITES, ids=[f"{s}-{'-'.join(map(str, kw.values()))}" for s, kw in ATP_SITES])
def test_toy_attribution_matches_bridge(toy, site, kw):
    """The nnsight traces (forward, nnsight's backward block) give the bridge's estimates: an
    independent implementation (TransformerLens hooks and torch.autograd on the bridge)."""
    bridge, lm, batch = toy
    metrics = ["logit_diff", "normalized", "logprob", "kl"] if not kw.get("ablation") else ["logit_diff", "prob"]
    expected, got = _atp_pair(bridge, lm, batch, metrics, site=site, **kw)
    assert isinstance(got, pw.AttributionResult) and got.method == expected.method
    assert got.sites == expected.sites and got.shape == expected.shape and got.indices == expected.indices
    for metric in metrics:
        assert got.values[metric].abs().max() > 0
        torch.testing.assert_close(got.values[metric], expected.values[metric], atol=2e-4, rtol=1e-4, msg=metric)
    # The estimates move away from the unpatched value (a gradient of zero would also "agree").
    assert (got.values["logit_diff"] - got.baselines[("clean" if got.direction == "noising" else "corrupted")]
            ["logit_diff"]).abs().max() > 1e-2


def test_toy_attribution_qk_is_plain_atp(toy):
    """No attention pattern on nnsight: queries and keys get plain AtP, with a warning, equal to
    the bridge's plain AtP; AtP* on the bridge differs (so the comparison can tell them apart)."""
    bridge, lm, batch = toy
    answers = list(zip(batch.correct, batch.incorrect))
    with pytest.warns(UserWarning, match="plain AtP"):
        got = pw.attribution_patch(lm, batch.clean, batch.corrupted, answers, site="head_q")
    plain = pw.attribution_patch(bridge, batch.clean, batch.corrupted, answers, site="head_q", qk_fix=False)
    star = pw.attribution_patch(bridge, batch.clean, batch.corrupted, answers, site="head_q")
    assert got.method == "atp" and got.stats["qk_fix"] == 0 and star.method == "atp*"
    torch.testing.assert_close(got.grid(), plain.grid(), atol=2e-4, rtol=1e-4)
    assert (star.grid() - plain.grid()).abs().max() > 1e-3


def test_attribution_refuses_unsupported(toy):
    _, lm, batch = toy
    answers = list(zip(batch.correct, batch.incorrect))
    with pytest.raises(PatchingInputError, match="resid_pre, resid_post") as err:
        pw.attribution_patch(lm, batch.clean, batch.corrupted, answers, site="head_pattern")
    assert err.value.field == "site"
    with pytest.raises(PatchingInputError) as err:
        pw.attribution_patch(lm, batch.clean, batch.corrupted, answers, metrics="rank")
    assert err.value.field == "metrics"


def test_attribution_frozen_weights(toy):
    """Weights that do not require gradients (a frozen model) still give the estimates."""
    bridge, lm, batch = toy
    answers = list(zip(batch.correct, batch.incorrect))
    expected = pw.attribution_patch(bridge, batch.clean, batch.corrupted, answers, site="attn_out")
    flags = [p.requires_grad for p in lm._module.parameters()]
    try:
        for p in lm._module.parameters():
            p.requires_grad_(False)
        got = pw.attribution_patch(lm, batch.clean, batch.corrupted, answers, site="attn_out")
    finally:
        for p, flag in zip(lm._module.parameters(), flags):
            p.requires_grad_(flag)
    torch.testing.assert_close(got.grid(), expected.grid(), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("site", ["head_out", "head_v_by_pos", "mlp_out"])
def test_llama_attribution_matches_bridge(llama, site):
    bridge, lm, batch, gap = llama
    expected, got = _atp_pair(bridge, lm, batch, ["logit_diff", "kl"], site=site)
    for metric in ("logit_diff", "kl"):
        torch.testing.assert_close(got.values[metric], expected.values[metric], atol=2e-4, rtol=1e-4, msg=metric)


def test_attribution_remote_sends_every_trace_to_ndif(toy, monkeypatch):
    """As for ``patch``: ``remote=True`` only sets the flag on every trace (run locally here)."""
    _, lm, batch = toy
    answers = list(zip(batch.correct, batch.incorrect))
    local = pw.attribution_patch(lm, batch.clean, batch.corrupted, answers, site="head_out")
    flags = _record_remote_flags(lm, monkeypatch)
    remote = pw.attribution_patch(lm, batch.clean, batch.corrupted, answers, site="head_out", remote=True)
    assert len(flags) == 3 and all(flag is True for flag in flags), flags  # target, source, gradient
    torch.testing.assert_close(remote.grid("normalized"), local.grid("normalized"), atol=0, rtol=0)


# ------------------------------------------------------------------------------------ pw.load_model(backend="nnsight")
def _lazy(lm) -> bool:
    """No weights loaded: nnsight's module tree is on the meta device."""
    return not lm.dispatched and {p.device.type for p in lm._module.parameters()} == {"meta"}


@pytest.mark.parametrize("site", ["head_out", "resid_pre"])
def test_load_model_nnsight_matches_bridge(toy, site):
    """The bundled model built for nnsight (lazily: no weights until the sweep's first trace)
    gives the bridge's grids."""
    bridge, _, batch = toy
    lm = pw.load_model("toy-ioi", backend="nnsight", device="cpu")
    assert isinstance(lm, nnsight.TransformersModel) and _lazy(lm)
    expected, got = _pair(bridge, lm, batch, METRICS, site=site)
    _assert_same(expected, got)
    assert lm.dispatched and {p.device.type for p in lm._module.parameters()} == {"cpu"}


def test_load_model_nnsight_half_precision_checkpoint_runs_in_float32():
    """toy-ioi-deep is stored in float16 (to keep the package small): built for nnsight without
    a dtype it runs in float32 like its bridge, and gives the bridge's grids (in float16 on a
    CPU the head_out logit differences are off by ~4e-3)."""
    from patchwidgets.datasets import ioi_prompts

    if "toy-ioi-deep" not in pw.list_models():
        pytest.skip("the toy-ioi-deep checkpoint is not bundled")
    assert '"dtype": "float16"' in (model_path("toy-ioi-deep") / "config.json").read_text()
    bridge = pw.load_model("toy-ioi-deep", device="cpu")
    lm = pw.load_model("toy-ioi-deep", backend="nnsight", device="cpu")
    items = ioi_prompts(4, split="test")
    clean, corrupted = [p["clean"] for p in items], [p["corrupted"] for p in items]
    answers = [(p["correct"], p["incorrect"]) for p in items]
    expected = pw.patch(bridge, clean, corrupted, answers, site="head_out", metrics=["logit_diff"])
    got = pw.patch(lm, clean, corrupted, answers, site="head_out", metrics=["logit_diff"])
    assert {p.dtype for p in lm._module.parameters()} == {torch.float32}
    _assert_same(expected, got, atol=1e-4)
    half = pw.load_model("toy-ioi-deep", backend="nnsight", device="cpu", dtype="float16")
    assert {p.dtype for p in half._module.parameters()} == {torch.float16}, "an explicit dtype is kept"


def test_load_model_nnsight_options():
    lm = pw.load_model("toy-ioi", backend="nnsight", device="cpu", dtype="bfloat16")
    assert _lazy(lm) and {p.dtype for p in lm._module.parameters()} == {torch.bfloat16}
    lm.dispatch()  # the weights, loaded by Hugging Face with the options given
    assert {(p.device.type, p.dtype) for p in lm._module.parameters()} == {("cpu", torch.bfloat16)}
    with pytest.raises(pw.UnknownWordError, match="Zorblax"):  # the bundled strict tokenizer
        lm.tokenizer("When Zorblax and John went")


def test_load_model_bad_backend():
    with pytest.raises(ValueError, match=r"unknown backend 'transformerlens'.*'bridge'.*'nnsight'"):
        pw.load_model("toy-ioi", backend="transformerlens")
    with pytest.raises(ValueError, match="device_map='auto'"):
        pw.load_model("toy-ioi", backend="nnsight", n_devices=2)


def test_load_model_nnsight_remote_loads_no_weights(toy, monkeypatch):
    """``remote=True`` on the lazily built model: the first trace goes to NDIF (stopped here)
    while the model still has no weights, so none were downloaded for it."""
    _, _, batch = toy
    lm = pw.load_model("toy-ioi", backend="nnsight")
    seen = []

    class Sent(Exception):
        pass

    def trace(self, *args, **kwargs):
        seen.append((kwargs.get("remote"), _lazy(self)))
        raise Sent

    monkeypatch.setattr(type(lm), "trace", trace)
    with pytest.raises(Sent):
        pw.patch(lm, batch.clean, batch.corrupted, list(zip(batch.correct, batch.incorrect)),
                 site="head_out", remote=True)
    assert seen == [(True, True)]


def test_load_model_nnsight_local_folder(llama):
    """A local checkpoint folder (not bundled), built lazily, gives the bridge's grids."""
    bridge, direct, batch, gap = llama
    lm = pw.load_model(direct.repo_id, backend="nnsight", device="cpu")
    assert _lazy(lm)
    expected, got = _pair(bridge, lm, batch, LLAMA_METRICS, site="head_out")
    _assert_same(expected, got, normalized_atol=ATOL / min(gap, 1.0))


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python that imports this checkout's patchwidgets."""
    root = str(model_path("toy-ioi").parents[2])
    env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_load_model_nnsight_hub_name_without_weights(tmp_path):
    """A Hub name whose cache holds only ``config.json`` and the tokenizer (what the lazy build
    downloads; no weights) builds, and a ``remote=True`` sweep reaches its first trace. An
    uncached Hub name fails at once with the bundled names. (In a fresh process: the Hub cache
    location is read when huggingface_hub is imported.)"""
    from transformers import AutoTokenizer, LlamaConfig

    repo, commit = tmp_path / "hub" / "models--someorg--tiny-llama", "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                intermediate_size=128, vocab_size=366, max_position_embeddings=64).save_pretrained(snapshot)
    AutoTokenizer.from_pretrained(model_path("toy-ioi")).save_pretrained(snapshot)
    code = """if True:
        import patchwidgets as pw

        lm = pw.load_model("someorg/tiny-llama", backend="nnsight", dtype="bfloat16")
        params = list(lm._module.parameters())
        assert not lm.dispatched and {(p.device.type, p.dtype) for p in params} == {("meta", torch.bfloat16)}
        assert lm.tokenizer("When Mary and John went")["input_ids"][-1] != lm.tokenizer.unk_token_id

        class Sent(Exception):
            pass

        def trace(self, *args, **kwargs):
            assert kwargs.get("remote") is True and not self.dispatched
            raise Sent

        type(lm).trace = trace
        try:
            pw.patch(lm, "When Mary and John went to the store, John gave a drink to",
                     "When Mary and John went to the store, Mary gave a drink to", (" Mary", " John"),
                     site="head_out", remote=True)
            raise AssertionError("no trace was sent")
        except Sent:
            pass
        try:
            pw.load_model("someorg/not-cached", backend="nnsight")
            raise AssertionError("an uncached Hub name loaded offline")
        except pw.ModelNotAvailableError as err:
            assert "'toy-ioi'" in str(err) and err.offline, err
        print("ok")
    """
    done = _python("import torch\n" + textwrap.dedent(code), HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_load_model_without_nnsight():
    """Without nnsight the bridge still loads (nnsight is never imported), and asking for the
    nnsight backend says how to install it."""
    code = """if True:
        import sys
        sys.modules["nnsight"] = None  # as if not installed: `import nnsight` raises ImportError
        import patchwidgets as pw
        pw.load_model("toy-ioi", device="cpu")
        try:
            pw.load_model("toy-ioi", backend="nnsight")
            raise AssertionError("no error without nnsight")
        except ImportError as err:
            assert "pip install 'patchwidgets[nnsight]'" in str(err), err
        print("ok")
    """
    done = _python(textwrap.dedent(code))
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
