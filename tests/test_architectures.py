"""Every model family the engine claims, against TransformerLens' own ``transformer_lens.patching``.

Each family is a tiny, randomly initialised Hugging Face model (2 layers, d_model 64, 4 heads,
vocabulary 64) booted through ``TransformerBridge.boot_transformers(..., hf_model=...)``, the
path that loads real checkpoints. The architectures differ where the engine's shortcuts could
go wrong: how blocks take their KV cache (``cache=``, ``layer_past=``), rotary tables (full,
partial, GPT-J's interleaved), grouped- and multi-query attention, sliding windows shorter than
the prompt, ALiBi (a per-row bias of shape ``[batch * heads, 1, pos]``), parallel attention and
MLP, post-norms, scaled residuals and logits (Granite), soft-capped logits (Gemma 2) and a
mixture-of-experts MLP.

For each family, ``patchwidgets.patch`` must reproduce ``transformer_lens.patching`` on every
site below in both directions to ``TOL`` (measured: at most 1.5e-7 on float32), and the two
shortcuts (resuming at the patched layer, reusing the unchanged prefix's keys and values) must
be on: a dependency update that silently turns one off fails here, with the engine's reason.
"""

import warnings

import pytest
import torch
import transformers
from transformer_lens import patching as tlp
from transformer_lens.model_bridge import TransformerBridge

import patchwidgets as pw
from patchwidgets.engine import Engine, Patch, ShortcutWarning
from patchwidgets.sites import resolve_sites

TOL = 1e-5
N_LAYERS, N_HEADS, D_MODEL, VOCAB, N_CTX = 2, 4, 64, 64, 32
SEQ, CHANGED, ANSWERS = 10, 6, [(3, 4), (5, 6)]  # 2 pairs x 10 tokens, differing at position 6

SWEEPS = [
    ("resid_pre", tlp.get_act_patch_resid_pre),
    ("attn_out", tlp.get_act_patch_attn_out),
    ("mlp_out", tlp.get_act_patch_mlp_out),
    ("head_out", tlp.get_act_patch_attn_head_out_all_pos),
    ("head_pattern", tlp.get_act_patch_attn_head_pattern_all_pos),
    ("head_v", tlp.get_act_patch_attn_head_v_all_pos),
]


def _rope(partial_rotary_factor=None):
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if partial_rotary_factor is not None:
        rope["partial_rotary_factor"] = partial_rotary_factor
    return rope


def _llama_like(**fields):
    """The config fields most rotary decoders share; ``fields`` override them."""
    return {"num_hidden_layers": N_LAYERS, "num_attention_heads": N_HEADS, "num_key_value_heads": N_HEADS,
            "hidden_size": D_MODEL, "intermediate_size": 2 * D_MODEL, "vocab_size": VOCAB,
            "max_position_embeddings": N_CTX, **fields}


_GPT2_LIKE = {"n_layer": N_LAYERS, "n_head": N_HEADS, "n_embd": D_MODEL, "vocab_size": VOCAB, "n_positions": N_CTX}

# family -> (model name the bridge is booted with, HF model class, HF config class, config fields).
# The bridge picks its architecture adapter from ``config.architectures`` (set to the class name
# below), which random models otherwise leave empty.
FAMILIES = {
    "gpt2": ("gpt2", "GPT2LMHeadModel", "GPT2Config", _GPT2_LIKE),
    "pythia": ("EleutherAI/pythia-70m", "GPTNeoXForCausalLM", "GPTNeoXConfig",
               _llama_like(use_parallel_residual=True, rope_parameters=_rope(0.25))),  # partial rotary
    "llama_gqa": ("meta-llama/Llama-3.2-1B", "LlamaForCausalLM", "LlamaConfig", _llama_like(num_key_value_heads=2)),
    "llama_mqa": ("meta-llama/Llama-3.2-1B", "LlamaForCausalLM", "LlamaConfig", _llama_like(num_key_value_heads=1)),
    "gpt_bigcode_mqa": ("bigcode/tiny_starcoder_py", "GPTBigCodeForCausalLM", "GPTBigCodeConfig",
                        {**_GPT2_LIKE, "multi_query": True}),
    "mistral_window4": ("mistralai/Mistral-7B-v0.1", "MistralForCausalLM", "MistralConfig",
                        _llama_like(num_key_value_heads=2, sliding_window=4)),  # window < prompt
    "qwen2": ("Qwen/Qwen2-0.5B", "Qwen2ForCausalLM", "Qwen2Config", _llama_like(num_key_value_heads=2)),
    "qwen3": ("Qwen/Qwen3-0.6B", "Qwen3ForCausalLM", "Qwen3Config", _llama_like(num_key_value_heads=2, head_dim=16)),
    "gemma": ("google/gemma-2b", "GemmaForCausalLM", "GemmaConfig", _llama_like(num_key_value_heads=1, head_dim=16)),
    "gemma2": ("google/gemma-2-2b", "Gemma2ForCausalLM", "Gemma2Config",
               _llama_like(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                           final_logit_softcapping=2.0)),  # a cap small enough to matter at random logits
    "gemma3": ("google/gemma-3-270m", "Gemma3ForCausalLM", "Gemma3TextConfig",
               _llama_like(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention"])),
    "phi": ("microsoft/phi-2", "PhiForCausalLM", "PhiConfig", _llama_like(rope_parameters=_rope(0.5))),
    "phi3": ("microsoft/Phi-3-mini-4k-instruct", "Phi3ForCausalLM", "Phi3Config", _llama_like(pad_token_id=0)),
    "olmo2": ("allenai/OLMo-2-0425-1B", "Olmo2ForCausalLM", "Olmo2Config", _llama_like(pad_token_id=0)),
    "opt": ("facebook/opt-125m", "OPTForCausalLM", "OPTConfig",
            {"num_hidden_layers": N_LAYERS, "num_attention_heads": N_HEADS, "hidden_size": D_MODEL,
             "ffn_dim": 2 * D_MODEL, "word_embed_proj_dim": D_MODEL, "vocab_size": VOCAB,
             "max_position_embeddings": N_CTX, "pad_token_id": 0}),
    "gptj": ("EleutherAI/gpt-j-6b", "GPTJForCausalLM", "GPTJConfig", {**_GPT2_LIKE, "rotary_dim": 8}),
    "falcon": ("tiiuae/falcon-7b", "FalconForCausalLM", "FalconConfig",  # multi-query, parallel attn
               {"num_hidden_layers": N_LAYERS, "num_attention_heads": N_HEADS, "hidden_size": D_MODEL,
                "vocab_size": VOCAB, "max_position_embeddings": N_CTX}),
    "stablelm": ("stabilityai/stablelm-2-1_6b", "StableLmForCausalLM", "StableLmConfig",
                 _llama_like(rope_parameters=_rope(0.25))),
    "granite": ("ibm-granite/granite-3.0-2b-base", "GraniteForCausalLM", "GraniteConfig",
                _llama_like(num_key_value_heads=2, embedding_multiplier=4.0, residual_multiplier=0.5,
                            attention_multiplier=0.125, logits_scaling=0.5)),  # (8.0 shrinks logits to ~4e-3)
    "bloom": ("bigscience/bloom-560m", "BloomForCausalLM", "BloomConfig",  # ALiBi
              {"n_layer": N_LAYERS, "n_head": N_HEADS, "hidden_size": D_MODEL, "vocab_size": VOCAB}),
    "mixtral_moe": ("mistralai/Mixtral-8x7B-v0.1", "MixtralForCausalLM", "MixtralConfig",
                    _llama_like(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
}

# Where the shortcuts must be on, whatever else changes: the families named in the issue.
MUST_SHORTCUT = ["gpt2", "llama_gqa", "qwen2", "gemma2", "pythia"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine the threads'
    spin-waiting makes them ~10x slower; other test modules get the setting back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bridge_for():
    """``bridge_for(family)``: the family's random bridge, built once per module."""
    from transformers import AutoTokenizer

    from patchwidgets.loading import model_path

    # Random models are driven by token tensors, but boot_transformers needs some tokenizer.
    tokenizer = AutoTokenizer.from_pretrained(model_path("toy-ioi"))
    built = {}

    def get(family: str):
        if family not in built:
            name, model_cls, config_cls, fields = FAMILIES[family]
            torch.manual_seed(0)
            config = getattr(transformers, config_cls)(**fields)
            config.architectures = [model_cls]
            hf_model = getattr(transformers, model_cls)(config).eval()
            bridge = TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer)
            built[family] = bridge.eval()
        return built[family]

    return get


@pytest.fixture(scope="module")
def pairs():
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    corrupted = clean.clone()
    corrupted[:, CHANGED] = (corrupted[:, CHANGED] + 7) % VOCAB
    return clean, corrupted


def tl_reference(model, target, source, tl_fn):
    """``transformer_lens.patching``'s sweep with a mean logit difference at the last position."""
    _, source_cache = model.run_with_cache(source)
    rows = torch.arange(target.shape[0])
    correct, incorrect = torch.tensor([a for a, _ in ANSWERS]), torch.tensor([b for _, b in ANSWERS])

    def metric(logits):
        final = logits[rows, -1]
        return (final[rows, correct] - final[rows, incorrect]).mean()

    with torch.no_grad():
        return tl_fn(model, target, source_cache, metric)


# OPT and GPT-J: the bridge runs Hugging Face's own attention and only reports its pattern
# afterwards, so a head_pattern patch has no effect there, in transformer_lens.patching too
# (TransformerLens warns; both sides agree that nothing changes).
@pytest.mark.filterwarnings("ignore:A hook on .*hook_pattern returned a modified tensor")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_transformer_lens(bridge_for, pairs, family):
    model = bridge_for(family)
    clean, corrupted = pairs
    for direction in ["denoising", "noising"]:
        target, source = (corrupted, clean) if direction == "denoising" else (clean, corrupted)
        for site, tl_fn in SWEEPS:
            ours = pw.patch(model, clean, corrupted, answers=ANSWERS, site=site, direction=direction,
                            metrics="logit_diff", progress=False)
            ref = tl_reference(model, target, source, tl_fn)
            assert ours.grid("logit_diff").shape == ref.shape, (site, direction)
            gap = float((ours.grid("logit_diff") - ref).abs().max())
            assert gap <= TOL, f"{family} {site} {direction}: differs from transformer_lens by {gap:.1e}"
            # Exact with the shortcuts on: a sweep that matches by falling back proves nothing.
            assert ours.stats["resumed"] == 1 and ours.stats["prefix_skipped"] == 1, (site, direction)
            # ... and the source run resumed from the target's prefix (head_pattern: not a
            # [batch, pos, ...] activation, so that source runs plainly).
            assert ours.stats["source_resumed"] == int(site != "head_pattern"), (site, direction)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_shortcuts_are_on(bridge_for, pairs, family):
    """Every family resumes at the patched layer and reuses the prefix; the report says why not."""
    engine = Engine(bridge_for(family), pairs[1], torch.full((2,), SEQ - 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ShortcutWarning)  # a fallback fails here, with its reason
        engine.run_target([])
    assert engine.shortcut_report() == {"resumed": 1, "prefix_skipped": 1, "fallback_reason": None}


@pytest.mark.parametrize("family", [*MUST_SHORTCUT, "toy-ioi"])
def test_patch_stats_report_the_shortcuts(bridge_for, toy_model, pairs, family):
    model = toy_model if family == "toy-ioi" else bridge_for(family)
    clean, corrupted = pairs
    # (logit_diff only: on random weights the two pairs' gaps can cancel, which normalized refuses)
    result = pw.patch(model, clean, corrupted, answers=ANSWERS, site="resid_pre", metrics="logit_diff",
                      progress=False)
    assert result.stats["resumed"] == 1
    assert result.stats["prefix_skipped"] == 1
    assert result.stats["source_resumed"] == 1


def test_prefix_reuse_really_skips_work(bridge_for, pairs):
    """Count what the blocks compute for a chunk, not just the flags."""
    model = bridge_for("llama_gqa")
    clean, corrupted = pairs
    answer_pos = torch.full((2,), SEQ - 1)
    target, source = Engine(model, corrupted, answer_pos), Engine(model, clean, answer_pos)
    _, source_acts = source.run_target([f"blocks.{N_LAYERS - 1}.hook_resid_pre"], record=False)
    target.run_target([])
    # Patch the last layer's residual stream at the positions from CHANGED on: one chunk.
    site = resolve_sites("resid_pre")[0]
    patches = [Patch(site, (N_LAYERS - 1, pos), slot, pos) for slot, pos in enumerate(range(CHANGED, SEQ))]
    chunks = target.plan(patches)
    assert len(chunks) == 1 and chunks[0].offset == CHANGED

    calls = {l: [] for l in range(N_LAYERS)}  # layer -> [rows, positions] of each call

    def counter(layer):
        def count(module, args, kwargs):
            calls[layer].append(tuple((args[0] if args else kwargs["hidden_states"]).shape[:2]))
        return count

    handles = [b.register_forward_pre_hook(counter(l), with_kwargs=True) for l, b in enumerate(model.blocks)]
    try:
        logits = target.run_chunk(chunks[0], source_acts)
    finally:
        for h in handles:
            h.remove()
    # Resumed at the last layer, on positions CHANGED.. only, for all patches at once.
    assert calls == {**{l: [] for l in range(N_LAYERS - 1)}, N_LAYERS - 1: [(2 * len(patches), SEQ - CHANGED)]}
    # ...and still the numbers of full forward passes.
    hook_name = f"blocks.{N_LAYERS - 1}.hook_resid_pre"
    for i, patch in enumerate(chunks[0].patches):  # (the plan orders them by first position)
        def paste(act, hook, pos=patch.index[1]):
            act = act.clone()
            act[:, pos] = source_acts[hook_name][:, pos]
            return act

        with torch.no_grad():
            full = model.run_with_hooks(corrupted, fwd_hooks=[(hook_name, paste)])
        assert (logits[i] - full[:, -1]).abs().max() <= TOL


def test_fallback_is_reported_and_warned_once(make_random_bridge, pairs):
    """A bridge whose blocks cannot be called directly falls back, says why, and stays exact."""
    model = make_random_bridge(n_layers=2)
    inside = []  # non-empty while the model runs its own forward pass (embedding .. final norm)

    def refuse_direct_calls(module, args, kwargs):
        if not inside:
            raise TypeError("this block only runs inside the model's own forward pass")

    handles = [model.embed.register_forward_pre_hook(lambda module, args: inside.append(True)),
               model.ln_final.register_forward_hook(lambda module, args, output: inside.clear()),
               model.blocks[1].register_forward_pre_hook(refuse_direct_calls, with_kwargs=True)]
    clean, corrupted = pairs
    try:
        engine = Engine(model, corrupted, torch.full((2,), SEQ - 1))
        with pytest.warns(ShortcutWarning, match="TypeError") as caught:
            engine.run_target([])
        assert len([w for w in caught if issubclass(w.category, ShortcutWarning)]) == 1
        report = engine.shortcut_report()
        assert report["resumed"] == 0 and report["prefix_skipped"] == 0
        assert "TypeError: this block only runs inside" in report["fallback_reason"]
        with pytest.warns(ShortcutWarning, match="resuming at the patched layer is off"):
            result = pw.patch(model, clean, corrupted, answers=ANSWERS, site="resid_pre", metrics="logit_diff",
                              progress=False)
        assert result.stats["resumed"] == 0
        ref = tl_reference(model, corrupted, clean, tlp.get_act_patch_resid_pre)
        assert (result.grid("logit_diff") - ref).abs().max() <= TOL
    finally:
        for h in handles:
            h.remove()


def test_hand_built_model_uses_the_plain_path_without_a_warning():
    from transformer_lens import HookedRootModule
    from transformer_lens.hook_points import HookPoint

    class Doubler(HookedRootModule):
        def __init__(self):
            super().__init__()
            self.hook_x = HookPoint()
            self.setup()

        def forward(self, tokens):
            return self.hook_x(torch.nn.functional.one_hot(tokens, 4).float() * 2)

    engine = Engine(Doubler(), torch.tensor([[1, 2, 3]]), torch.tensor([2]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ShortcutWarning)
        engine.run_target(["hook_x"])
    report = engine.shortcut_report()
    assert report["resumed"] == 0 and report["prefix_skipped"] == 0
    assert "not a TransformerBridge" in report["fallback_reason"]
