"""Tests for the bundled toy-ioi model, its tokenizer, data and loader.

The accuracy tests recompute everything from raw logits (argmax and logit
differences) on held-out prompts, independently of the training script's
own evaluation.
"""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # must precede any Hugging Face import

import importlib.util
import json
import re
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from patchwidgets import datasets
from patchwidgets.loading import ModelNotAvailableError, list_models, load_model, model_path
from patchwidgets.tokenizer import UnknownWordError, make_strict, pretokenize

REPO_ROOT = Path(__file__).resolve().parents[1]

REFERENCE_PROMPTS = datasets.REFERENCE_PROMPTS


@pytest.fixture(scope="session")
def model():
    return load_model("toy-ioi", device="cpu")


def single_token(model, piece):
    tokens = model.to_tokens(piece, prepend_bos=False)
    assert tokens.shape == (1, 1), (piece, tokens)
    return int(tokens[0, 0])


@torch.no_grad()
def last_logits(model, prompts):
    """Next-token logits for each prompt, batching prompts of equal length."""
    by_length = defaultdict(list)
    for i, prompt in enumerate(prompts):
        by_length[model.to_tokens(prompt).shape[1]].append(i)
    out = torch.empty(len(prompts), model.cfg.d_vocab)
    for indices in by_length.values():
        tokens = model.to_tokens([prompts[i] for i in indices])
        out[indices] = model(tokens)[:, -1].float().cpu()
    return out


# ---------------------------------------------------------------- packaging

def test_package_imports():
    import patchwidgets
    import patchwidgets.tokenizer

    assert patchwidgets.load_model is load_model
    assert patchwidgets.list_models is list_models
    assert patchwidgets.ModelNotAvailableError is ModelNotAvailableError
    assert patchwidgets.UnknownWordError is patchwidgets.tokenizer.UnknownWordError


def test_list_models():
    assert "toy-ioi" in list_models()


def test_checkpoint_is_standard_hf_format():
    path = model_path("toy-ioi")
    for name in ("config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "MODEL_CARD.md"):
        assert (path / name).is_file(), name
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"]
    assert (config["n_layer"], config["n_head"], config["n_embd"]) == (4, 8, 128)
    from safetensors import safe_open
    with safe_open(path / "model.safetensors", "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys())


# ------------------------------------------------------------------ loading

def test_loads_offline_fast_and_fresh(model):
    start = time.perf_counter()
    other = load_model("toy-ioi", device="cpu")
    assert time.perf_counter() - start < 5.0  # well under 1 s on an idle CPU
    assert other is not model and not other.training
    assert model.cfg.n_layers == 4 and model.cfg.n_heads == 8 and model.cfg.d_model == 128


def test_to_tokens(model):
    prompt = REFERENCE_PROMPTS[0][0]
    tokens = model.to_tokens(prompt)
    assert tokens.shape == (1, 15) and int(tokens[0, 0]) == 0
    assert model.to_str_tokens(prompt)[:4] == ["<|endoftext|>", "When", " Mary", " and"]
    assert model.to_str_tokens(prompt, prepend_bos=False)[7:11] == [
        " store", ",", " John", " gave"]


@pytest.mark.parametrize("prompt", [p for p, _ in REFERENCE_PROMPTS] + [
    item["clean"] for item in datasets.ioi_prompts(20, split="test")] + [
    item["prompt"] for item in datasets.fact_prompts("test")[:10]])
def test_str_tokens_round_trip(model, prompt):
    str_tokens = model.to_str_tokens(prompt)
    assert str_tokens[0] == "<|endoftext|>"
    assert "".join(str_tokens[1:]) == prompt
    assert str_tokens[1:] == pretokenize(prompt)  # one token per word


def test_unknown_word_raises(model):
    with pytest.raises(UnknownWordError, match="Zorblax") as info:
        model.to_tokens("When Zorblax and John went to the store, John gave a drink to")
    assert info.value.word == "Zorblax" and isinstance(info.value, ValueError)
    with pytest.raises(UnknownWordError, match="Jon"):
        model.to_str_tokens(["When Mary and John went to the store,", "When Jon left"])
    with pytest.raises(UnknownWordError, match="Zorblax"):
        model("The Zorblax is in")
    with pytest.raises(UnknownWordError, match="Zorblax"):
        model.tokenizer.encode("The Zorblax is in")
    assert make_strict(model.tokenizer) is model.tokenizer  # idempotent


# ----------------------------------------------------------------- accuracy

@pytest.mark.parametrize("prompt,answer", REFERENCE_PROMPTS)
def test_reference_prompts(model, prompt, answer):
    logits = last_logits(model, [prompt])[0]
    assert int(logits.argmax()) == single_token(model, answer), (
        model.to_str_tokens(logits.argmax().reshape(1, 1))[0])


def test_ioi_held_out_accuracy(model):
    items = datasets.ioi_prompts(300, split="test", seed=123)
    io = torch.tensor([single_token(model, it["correct"]) for it in items])
    s = torch.tensor([single_token(model, it["incorrect"]) for it in items])
    rows = torch.arange(len(items))
    clean = last_logits(model, [it["clean"] for it in items])
    accuracy = (clean.argmax(-1) == io).float().mean().item()
    logit_diff = (clean[rows, io] - clean[rows, s]).mean().item()
    assert accuracy >= 0.98, accuracy
    assert logit_diff >= 3.0, logit_diff
    # The S2-flipped prompt must flip the preference: that is what makes the
    # clean/corrupted pair useful for patching.
    corrupted = last_logits(model, [it["corrupted"] for it in items])
    assert (corrupted[rows, io] - corrupted[rows, s]).mean().item() <= -3.0


def test_toy_ioi_has_none_of_wang_et_al_s_classes(model):
    """Notebooks 04, 05 and 07 say that toy-ioi has no name movers, negative name movers,
    S-inhibition, duplicate-token, induction or backup heads by Wang et al.'s definitions (its
    layer-1 heads are "name-mover-like"): ``find_circuit``'s thresholds, on held-out prompts."""
    from patchwidgets import ioi_circuit

    items = datasets.ioi_prompts(40, split="test", seed=5)
    circuit = ioi_circuit.find_circuit(model, items, [" " + name for name in datasets.NAMES])
    named = {"name movers": circuit.name_movers, "negative name movers": circuit.negative_name_movers,
             "S-inhibition": circuit.s_inhibition, "duplicate-token": circuit.duplicate_token,
             "induction": circuit.induction, "backup": circuit.backup}
    assert all(not heads for heads in named.values()), named
    assert (0, 0) in circuit.unclassified  # the measurement ran: L0H0 carries the task (notebooks 03-07)


def test_fact_held_out_accuracy(model):
    items = datasets.fact_prompts("test")
    answers = torch.tensor([single_token(model, it["answer"]) for it in items])
    logits = last_logits(model, [it["prompt"] for it in items])
    accuracy = (logits.argmax(-1) == answers).float().mean().item()
    assert accuracy >= 0.95, accuracy


# --------------------------------------------------------------------- data

def test_datasets_shape_and_splits():
    datasets._check()
    assert len(datasets.IOI_TRAIN_TEMPLATES) >= 15 and len(datasets.NAMES) >= 40
    items = datasets.ioi_prompts(50, split="test", seed=1)
    assert items == datasets.ioi_prompts(50, split="test", seed=1)
    assert {it["order"] for it in items} == {"ABBA", "BABA"}
    heldout = datasets.heldout_name_pairs()
    for it in items:
        assert len(pretokenize(it["clean"])) == len(pretokenize(it["corrupted"]))
        assert frozenset((it["correct"][1:], it["incorrect"][1:])) in heldout
    assert any(it["template"] in datasets.IOI_HELDOUT_TEMPLATES for it in items)
    corpus = set(datasets.training_corpus(3000, seed=0))
    patterns = [re.compile(re.sub(r"\\\{\w+\\\}", "(.+)", re.escape(t)))
                for t in datasets.IOI_HELDOUT_TEMPLATES]
    assert not any(p.fullmatch(sentence) for p in patterns for sentence in corpus)
    for fact in datasets.fact_prompts("test"):
        assert fact["prompt"] + fact["answer"] + "." not in corpus
    assert "The Colosseum is in Rome." in corpus  # canonical phrasings are trained


def test_boot_random_gpt2_through_bridge(model):
    """The path used for Hub models, exercised offline with random weights."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    from transformer_lens.model_bridge import TransformerBridge

    path = model_path("toy-ioi")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64,
                                    n_embd=64, n_layer=2, n_head=4)).eval()
    for name in ("gpt2", str(path)):
        bridge = TransformerBridge.boot_transformers(name, hf_model=hf, tokenizer=tokenizer,
                                                     device="cpu")
        logits, cache = bridge.run_with_cache(REFERENCE_PROMPTS[0][0])
        assert logits.shape == (1, 15, len(tokenizer))
        assert cache["blocks.1.attn.hook_pattern"].shape == (1, 4, 15, 15)


def test_unavailable_model_fails_fast():
    start = time.perf_counter()
    with pytest.raises(ModelNotAvailableError) as info:
        load_model("definitely-not-a-model", device="cpu")
    assert time.perf_counter() - start < 10
    assert "toy-ioi" in str(info.value) and "offline" in str(info.value)
    assert info.value.bundled == list_models() and isinstance(info.value, RuntimeError)


def test_training_script_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "train_toy_models", REPO_ROOT / "scripts" / "train_toy_models.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    threads = torch.get_num_threads()
    try:
        script.main(["--steps", "3", "--out", str(tmp_path), "--eval-prompts", "8",
                     "--log-every", "1"])
    finally:
        torch.set_num_threads(threads)
    # The vocabulary is rebuilt from code: it must match the bundled one, or
    # the bundled checkpoint no longer fits patchwidgets.datasets.
    bundled = json.loads((model_path("toy-ioi") / "tokenizer.json").read_text())
    rebuilt = json.loads((tmp_path / "tokenizer.json").read_text())
    assert rebuilt["model"]["vocab"] == bundled["model"]["vocab"]

    from transformers import AutoTokenizer, GPT2LMHeadModel
    from transformer_lens.model_bridge import TransformerBridge
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    hf = GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    bridge = TransformerBridge.boot_transformers(str(tmp_path), hf_model=hf,
                                                 tokenizer=tokenizer, device="cpu")
    assert bridge(REFERENCE_PROMPTS[4][0]).shape == (1, 5, len(tokenizer))
