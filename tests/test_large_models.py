"""Big-model options of ``load_model``: split/offloaded models and half precision.

A random Llama-shaped checkpoint (grouped-query attention, rotary embeddings) is saved to a
temporary folder and loaded twice through :func:`patchwidgets.load_model`: in memory, and
with a ``device_map`` that keeps the embedding and the first layers on the CPU and offloads
the other layers and the head to disk (accelerate loads those from ``offload_folder`` for
each forward call and keeps ``meta`` placeholders in between). Every kind of sweep must give
the in-memory model's numbers, with the engine's shortcuts still on, and results on the CPU.

No GPU is needed: a multi-GPU split goes through the same code (the engine calls the bridge's
blocks, whose accelerate hooks move activations between devices as in the model's own forward
pass), but cannot be run here.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import warnings
import weakref

import pytest
import torch

import patchwidgets
import patchwidgets.engine as engine_module
from patchwidgets.devices import input_device
from patchwidgets.engine import Engine
from patchwidgets.selfcheck import ShortcutCheck

N_LAYERS, N_HEADS, N_KV_HEADS, D_MODEL, SEQ = 4, 4, 2, 64, 9
ATOL = 1e-5

OFFLOAD_MAP = {
    "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
    "model.layers.2": "disk", "model.layers.3": "disk", "model.norm": "disk", "lm_head": "disk",
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random 4-layer Llama (GQA: 4 query heads, 2 key/value heads) in Hugging Face format."""
    from conftest import _tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama")
    tokenizer = _tiny_tokenizer(folder)
    torch.manual_seed(0)
    # Larger-than-default weights: logit differences of order 1, so `normalized` is well defined.
    hf = LlamaForCausalLM(LlamaConfig(
        num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS, num_key_value_heads=N_KV_HEADS,
        hidden_size=D_MODEL, intermediate_size=2 * D_MODEL, vocab_size=len(tokenizer),
        max_position_embeddings=64, initializer_range=0.1, bos_token_id=0, eos_token_id=0, pad_token_id=0))
    hf.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(checkpoint, tmp_path_factory):
    """The checkpoint in memory and offloaded (loaded once for the module)."""
    memory = patchwidgets.load_model(str(checkpoint), "cpu")
    offloaded = patchwidgets.load_model(str(checkpoint), device_map=OFFLOAD_MAP,
                                        offload_folder=tmp_path_factory.mktemp("offload"))
    return memory, offloaded


@pytest.fixture(scope="module")
def data():
    """Two pairs differing at positions 3 and 7: resumed passes skip a prefix (offset 3)."""
    clean = torch.tensor([[0, 2, 3, 5, 4, 6, 7, 3, 8], [0, 2, 4, 5, 3, 6, 7, 4, 8]])
    corrupted = clean.clone()
    corrupted[:, 7] = torch.tensor([4, 3])
    corrupted[1, 3] = 9
    answers = [(3, 4), (4, 3)]
    return clean, corrupted, answers


def _same(expected, got, atol=ATOL):
    """Every metric's values and baselines agree; ``got`` lives on the CPU."""
    assert expected.values.keys() == got.values.keys()
    for name, v in got.values.items():
        assert v.device.type == "cpu", name
        diff = float((v - expected.values[name]).abs().max())
        assert diff <= atol, (name, diff)
    for run, values in got.baselines.items():
        for name, v in values.items():
            assert v.device.type == "cpu"
            assert float((v - expected.baselines[run][name]).abs().max()) <= atol, (run, name)


# ---------------------------------------------------------------------------- loading
def test_offloaded_model_is_really_offloaded(models):
    memory, offloaded = models
    hf = offloaded.original_model
    assert hf.hf_device_map == OFFLOAD_MAP
    assert hf.model.layers[3].mlp.down_proj.weight.device.type == "meta"   # on disk
    assert hf.lm_head.weight.device.type == "meta"
    assert offloaded.cfg.device == "cpu" and input_device(offloaded).type == "cpu"
    assert not offloaded.training and not memory.training


def test_offloaded_logits_match(models, data):
    memory, offloaded = models
    clean, _, _ = data
    with torch.no_grad():
        diff = float((memory(clean) - offloaded(clean)).abs().max())
    assert diff <= 1e-6, diff


def test_load_model_rejects_contradictory_options(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="device_map"):
        patchwidgets.load_model("toy-ioi", "cpu", device_map="auto")
    with pytest.raises(ValueError, match="offload_folder"):
        patchwidgets.load_model("toy-ioi", offload_folder=tmp_path)
    with pytest.raises(ValueError, match="max_memory"):
        patchwidgets.load_model("toy-ioi", max_memory={"cpu": "1GiB"})
    with pytest.raises(ValueError, match="positive integer"):
        patchwidgets.load_model("toy-ioi", n_devices=0)
    if torch.cuda.device_count() < 2:
        with pytest.raises(ValueError, match="CUDA GPUs"):
            patchwidgets.load_model("toy-ioi", n_devices=2)
    with pytest.raises(ValueError, match="dtype"):
        patchwidgets.load_model("toy-ioi", dtype=torch.int8)
    with pytest.raises(ValueError, match="meta"):
        patchwidgets.load_model(str(checkpoint), device_map={"": "meta"})


def test_bundled_model_takes_the_same_options(tmp_path):
    """toy-ioi (GPT-2: tied embedding and head, kept together) split over CPU and disk,
    with the strict tokenizer still on."""
    from patchwidgets.tokenizer import UnknownWordError

    device_map = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu",
                  "transformer.h.0": "cpu", "transformer.h.1": "cpu", "transformer.h.2": "disk",
                  "transformer.h.3": "disk", "transformer.ln_f": "disk", "lm_head": "cpu"}
    split = patchwidgets.load_model("toy-ioi", device_map=device_map, offload_folder=tmp_path / "off")
    whole = patchwidgets.load_model("toy-ioi", "cpu")
    assert split.original_model.transformer.h[3].attn.c_attn.weight.device.type == "meta"
    with pytest.raises(UnknownWordError):
        split.to_tokens("When Zorblax and John went")
    prompt = "When Mary and John went to the store, John gave a drink to"
    with torch.no_grad():
        assert float((split(prompt) - whole(prompt)).abs().max()) <= 1e-6


# ---------------------------------------------------------------------------- sweeps
SITES = ["resid_pre", "attn_out", "mlp_out", "head_out", "head_out_by_pos", "head_pattern", "head_v", "neuron"]


@pytest.mark.parametrize("direction", ["denoising", "noising"])
@pytest.mark.parametrize("site", SITES)
def test_patch_offloaded_matches_memory(models, data, site, direction):
    memory, offloaded = models
    clean, corrupted, answers = data
    kwargs = dict(site=site, direction=direction, progress=False)
    expected = patchwidgets.patch(memory, clean, corrupted, answers, **kwargs)
    got = patchwidgets.patch(offloaded, clean, corrupted, answers, **kwargs)
    _same(expected, got)
    # Resuming at the patched layer and reusing the prefix's keys/values stay on.
    assert got.stats["resumed"] == 1 and got.stats["prefix_skipped"] == 1, got.stats
    assert got.stats["fallback_reason"] is None
    assert got.stats["forward_passes"] == expected.stats["forward_passes"]


def test_full_vocabulary_metrics_offloaded(models, data):
    """kl/logprob need every logit: the offloaded head is run as a module, not read."""
    memory, offloaded = models
    clean, corrupted, answers = data
    kwargs = dict(site="resid_pre", metrics=("logit_diff", "kl", "logprob", "rank"), progress=False)
    _same(patchwidgets.patch(memory, clean, corrupted, answers, **kwargs),
          patchwidgets.patch(offloaded, clean, corrupted, answers, **kwargs))


@pytest.mark.parametrize("ablation, site, metrics", [
    ("zero", "head_out", "logit_diff"),
    ("mean", "resid_pre", "logit_diff"),
    ("noise", "resid_pre", ("logit_diff", "normalized")),
])
def test_ablations_offloaded(models, data, ablation, site, metrics):
    memory, offloaded = models
    clean, _, answers = data
    kwargs = dict(site=site, ablation=ablation, metrics=metrics, progress=False)
    expected = patchwidgets.patch(memory, clean, None, answers, **kwargs)
    got = patchwidgets.patch(offloaded, clean, None, answers, **kwargs)
    _same(expected, got)
    assert got.stats["resumed"] == 1


@pytest.mark.parametrize("receivers", [None, [(3, 1), (2, 0)]])
def test_path_patch_offloaded(models, data, receivers):
    memory, offloaded = models
    clean, corrupted, answers = data
    for freeze_mlps in (False, True):
        kwargs = dict(receivers=receivers, receiver_input="q", freeze_mlps=freeze_mlps, progress=False)
        expected = patchwidgets.path_patch(memory, clean, corrupted, answers, **kwargs)
        got = patchwidgets.path_patch(offloaded, clean, corrupted, answers, **kwargs)
        _same(expected, got)
        assert got.stats["resumed"] == 1 and got.stats["prefix_skipped"] == 1


@pytest.mark.parametrize("site", ["head_out", "resid_pre", "mlp_out", "head_q_by_pos"])
def test_attribution_patch_offloaded(models, data, site):
    memory, offloaded = models
    clean, corrupted, answers = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rotary: no AtP* for queries (plain AtP, on both)
        expected = patchwidgets.attribution_patch(memory, clean, corrupted, answers, site=site)
        got = patchwidgets.attribution_patch(offloaded, clean, corrupted, answers, site=site)
    _same(expected, got)
    assert got.stats == expected.stats


def test_engine_shortcuts_on_offloaded_model(models, data):
    """Both shortcuts and the answer-columns unembedding stay on; reading the head's columns
    loads it from disk for a moment and puts it back."""
    _, offloaded = models
    clean, _, _ = data
    engine = Engine(offloaded, clean, torch.full((2,), SEQ - 1), columns=torch.tensor([3, 4]))
    engine.run_target([])
    assert engine.shortcut_report() == {"resumed": 1, "prefix_skipped": 1, "fallback_reason": None}
    assert engine.column_unembed is not None
    assert engine.column_unembed[0].device.type == "cpu" and engine.column_unembed[0].shape == (D_MODEL, 2)
    assert offloaded.original_model.lm_head.weight.device.type == "meta"


def test_everything_on_disk(checkpoint, tmp_path, data):
    """Embedding offloaded too: its weight is `meta`, so tokens go to its execution device (the
    CPU) and a noise ablation reads the embedding's standard deviation from disk."""
    memory = patchwidgets.load_model(str(checkpoint), "cpu")
    disk = patchwidgets.load_model(str(checkpoint), device_map={**OFFLOAD_MAP, "model.embed_tokens": "disk"},
                                   offload_folder=tmp_path / "off")
    assert disk.original_model.model.embed_tokens.weight.device.type == "meta"
    assert disk.cfg.device == "cpu"
    clean, corrupted, answers = data
    for kwargs in (dict(site="head_out_by_pos"), dict(site="resid_pre", ablation="noise")):
        c = None if "ablation" in kwargs else corrupted
        _same(patchwidgets.patch(memory, clean, c, answers, progress=False, **kwargs),
              patchwidgets.patch(disk, clean, c, answers, progress=False, **kwargs))


TOY_SPLIT = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu",
             "transformer.h.0": "cpu", "transformer.h.1": "disk", "transformer.h.2": "disk",
             "transformer.h.3": "disk", "transformer.ln_f": "disk", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def toy_split(tmp_path_factory):
    """toy-ioi with its first block on the CPU and the rest (and the final norm) on disk."""
    return patchwidgets.load_model("toy-ioi", device_map=TOY_SPLIT, offload_folder=tmp_path_factory.mktemp("off"))


def test_widget_on_offloaded_toy_model(toy_split):
    """The widget's sweep (with its attribution preview) and its attention pattern on a split
    model: the numbers of patch() on the in-memory model, the pattern of its plain run."""
    assert toy_split.original_model.transformer.h[2].mlp.c_fc.weight.device.type == "meta"  # on disk
    memory = patchwidgets.load_model("toy-ioi")
    w = patchwidgets.PatchingWidget(toy_split, site="head_out", metric="logit_diff")
    result = w.run(wait=True, timeout=300)
    assert w.status == "done" and result is not None, w.errors
    expected = patchwidgets.patch(memory, w.clean, w.corrupted, (w.correct, w.incorrect), site="head_out",
                                  metrics=result.metrics, progress=False)
    _same(expected, result)
    assert result.stats["resumed"] == 1 and result.stats["prefix_skipped"] == 1
    w.select(layer=3, head=1)
    w.wait(300)
    view = w.pattern["clean"]
    got = torch.frombuffer(bytearray(view["values"]), dtype=torch.float32).reshape(view["n"], view["n"])
    _, cache = memory.run_with_cache(memory.to_tokens(w.clean))
    torch.testing.assert_close(got, cache["blocks.3.attn.hook_pattern"][0, 1].float(), atol=1e-6, rtol=0)


def test_grading_check_on_offloaded_toy_model(toy_split):
    """A grading check (which calls patch) on a toy-ioi split over CPU and disk."""
    from patchwidgets.grading import check_get_act_patch_resid_pre

    model = toy_split

    def get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, metric):
        out = torch.zeros(model.cfg.n_layers, corrupted_tokens.shape[1])
        for layer in range(model.cfg.n_layers):
            for pos in range(corrupted_tokens.shape[1]):
                def hook(act, hook, pos=pos):
                    act[:, pos] = clean_cache[hook.name][:, pos]
                    return act
                logits = model.run_with_hooks(corrupted_tokens, fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", hook)])
                out[layer, pos] = metric(logits)
        return out

    with torch.no_grad():
        check_get_act_patch_resid_pre(get_act_patch_resid_pre, model)


# ---------------------------------------------------------------------------- half precision
# How far half-precision sweeps are from float32 on toy-ioi: 8 IOI pairs (grading.ioi_batch;
# logit differences up to ~15, a clean-corrupted gap of ~23), sites resid_pre / head_out /
# head_out_by_pos, default metrics, every cell of every pair. Measured (torch 2.13, CPU):
#   bfloat16: max |logit_diff - fp32| 0.097, max |normalized - fp32| 0.0048
#   float16:  max |logit_diff - fp32| 0.011, max |normalized - fp32| 0.00054
# (means over the 8 pairs differ about 3x less). The bounds are those numbers plus ~50%.
# This is the models' own rounding, not the engine's: bfloat16 keeps 8 significant bits
# (relative error 2^-9 ~ 0.2% per rounding), so logits of ~10 carry errors of a few hundredths
# that add up over 4 layers; float16 keeps 11 bits, 8x less. The same sweeps with the engine's
# shortcuts forced off agree with the shortcut results to 0.002 (test below), and `normalized`
# divides the logit-difference error by the gap. The patch() docstring quotes these figures.
HALF_BOUNDS = {torch.bfloat16: {"logit_diff": 0.15, "normalized": 0.0075},
               torch.float16: {"logit_diff": 0.02, "normalized": 0.001}}
HALF_SITES = ("resid_pre", "head_out", "head_out_by_pos")


@pytest.fixture(scope="module")
def ioi_fp32():
    from patchwidgets.grading import ioi_batch

    model = patchwidgets.load_model("toy-ioi", "cpu")
    batch = ioi_batch(model, n=8)
    answers = torch.stack([batch.correct_ids, batch.incorrect_ids], 1)
    results = {site: patchwidgets.patch(model, batch.clean_tokens, batch.corrupted_tokens, answers,
                                         site=site, progress=False) for site in HALF_SITES}
    return batch, answers, results


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_float32(ioi_fp32, dtype):
    batch, answers, reference = ioi_fp32
    model = patchwidgets.load_model("toy-ioi", "cpu", dtype=dtype)
    assert model.cfg.dtype == dtype and model.W_E.dtype == dtype
    for site in HALF_SITES:
        got = patchwidgets.patch(model, batch.clean_tokens, batch.corrupted_tokens, answers, site=site,
                                 progress=False)
        assert got.stats["resumed"] == 1 and got.stats["prefix_skipped"] == 1, got.stats
        for name, bound in HALF_BOUNDS[dtype].items():
            value = got.values[name]
            assert value.dtype == torch.float32 and value.device.type == "cpu"  # metrics in float32
            diff = float((value - reference[site].values[name]).abs().max())
            assert diff <= bound, (site, name, diff)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_shortcuts_add_no_error(ioi_fp32, dtype, monkeypatch):
    """Resumed, prefix-skipping passes in half precision give the plain forward passes' numbers
    (to a fraction of one rounding step of a logit): the difference from float32 above is
    the model's, not the engine's."""
    batch, answers, _ = ioi_fp32
    model = patchwidgets.load_model("toy-ioi", "cpu", dtype=dtype)
    args = (model, batch.clean_tokens, batch.corrupted_tokens, answers)
    fast = patchwidgets.patch(*args, site="head_out", progress=False)
    # Shortcuts off, and a target run that records nothing through the engine's taps.
    monkeypatch.setattr(Engine, "_self_check",
                        lambda self, final, recorded=None: ShortcutCheck(False, False, "forced off", warn=False))
    monkeypatch.setattr(engine_module, "_TAPS_VERIFIED", weakref.WeakSet())
    plain = patchwidgets.patch(*args, site="head_out", progress=False)
    assert fast.stats["resumed"] == 1 and plain.stats["resumed"] == 0
    assert float((fast.values["logit_diff"] - plain.values["logit_diff"]).abs().max()) <= 0.01
