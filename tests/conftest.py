"""Shared fixtures. Everything runs offline: the hub is never contacted."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest
import torch


def _tiny_tokenizer(directory):
    """A throwaway word-level tokenizer: random models are driven by token tensors, but
    ``boot_transformers`` needs some tokenizer to attach."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "[UNK]": 1}
    for w in ["When", " Mary", " John", " and", " went", ",", " gave", " to"]:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?[A-Za-z]+| ?[^\sA-Za-z]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", unk_token="[UNK]", clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="session")
def make_random_bridge(tmp_path_factory):
    """Factory for randomly initialised GPT-2 (or GQA Llama) bridges, booted through the same
    ``TransformerBridge.boot_transformers(..., hf_model=...)`` path that loads GPT-2 online."""
    from transformer_lens.model_bridge import TransformerBridge

    tokenizer = _tiny_tokenizer(tmp_path_factory.mktemp("tok"))

    def make(n_layers=3, n_heads=4, d_model=64, vocab=64, n_ctx=32, gqa_kv_heads=None, seed=0,
             initializer_range=0.02, dtype=torch.float32, word_tokenizer=False):
        """``word_tokenizer=True`` attaches the bundled toy-ioi tokenizer (vocab 366), so
        string prompts work on the random model too."""
        torch.manual_seed(seed)
        if gqa_kv_heads is None:
            from transformers import GPT2Config, GPT2LMHeadModel

            hf = GPT2LMHeadModel(GPT2Config(n_layer=n_layers, n_head=n_heads, n_embd=d_model,
                                            vocab_size=vocab, n_positions=n_ctx,
                                            initializer_range=initializer_range))
        else:
            from transformers import LlamaConfig, LlamaForCausalLM

            hf = LlamaForCausalLM(LlamaConfig(
                num_hidden_layers=n_layers, num_attention_heads=n_heads,
                num_key_value_heads=gqa_kv_heads, hidden_size=d_model, intermediate_size=2 * d_model,
                vocab_size=vocab, max_position_embeddings=n_ctx))
        tok = tokenizer
        if word_tokenizer:
            from transformers import AutoTokenizer

            from patchwidgets.loading import model_path

            tok = AutoTokenizer.from_pretrained(model_path("toy-ioi"))
        bridge = TransformerBridge.boot_transformers("gpt2", hf_model=hf.eval(), tokenizer=tok)
        bridge.eval()
        return bridge.to(dtype) if dtype != torch.float32 else bridge

    return make


@pytest.fixture(scope="session")
def random_gpt2(make_random_bridge):
    return make_random_bridge()


@pytest.fixture(scope="session")
def toy_model():
    from patchwidgets import load_model

    return load_model("toy-ioi")


@pytest.fixture(scope="session")
def lab_server():
    """One JupyterLab server for every browser test of the session (starting one costs seconds,
    and six fixtures open notebooks): each writes its notebook into the server's root and shuts
    that notebook's kernel down when it ends (``test_widget_browser.widget_page``). The server
    stops, with any kernel left, when the session ends."""
    from test_widget_browser import JupyterLab

    with JupyterLab() as lab:
        yield lab
