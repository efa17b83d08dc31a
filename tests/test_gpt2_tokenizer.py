"""GPT-2's own tokenizer, built offline from the bundled files (``patchwidgets.gpt2_tokenizer``).

Three independent checks that it is GPT-2's: the files' hashes are the ones ``tiktoken`` pins for
OpenAI's ``gpt2`` files; token ids quoted by others (nnsight's tutorial prints ``' John': 1757``
and ``' Mary': 5335``; the issue quotes "When Mary and John" and the landmarks' token counts);
and a from-scratch implementation of OpenAI's own BPE algorithm (``encoder.py`` of the GPT-2
release: regex words, bytes to printable characters, merges by rank), which must give the same
ids as the ``tokenizers`` build on every sentence of the course's corpus.
"""

from __future__ import annotations

import gzip
import hashlib

import pytest
import regex

from patchwidgets import datasets
from patchwidgets.gpt2_tokenizer import VOCAB_DIR, gpt2_tokenizer, gpt2_vocabulary

#: The sha256 of OpenAI's ``encoder.json`` and ``vocab.bpe`` (as pinned by tiktoken).
SHA256 = {"encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
          "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"}


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


def ids(tokenizer, text):
    return tokenizer(text)["input_ids"]


@pytest.mark.parametrize("name", sorted(SHA256))
def test_the_files_are_openais(name):
    with gzip.open(VOCAB_DIR / f"{name}.gz", "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == SHA256[name]
    assert "MIT License" in (VOCAB_DIR / "LICENSE").read_text()


def test_known_ids(tokenizer):
    assert ids(tokenizer, "When Mary and John") == [2215, 5335, 290, 1757]
    assert ids(tokenizer, " John") == [1757] and ids(tokenizer, " Mary") == [5335]  # nnsight's tutorial
    assert len(ids(tokenizer, " Colosseum")) == 4
    assert len(ids(tokenizer, " Space Needle")) == 3
    assert ids(tokenizer, "<|endoftext|>") == [50256] and tokenizer.bos_token_id == 50256
    assert len(tokenizer) == 50257


def test_decoding_gives_the_text_back(tokenizer):
    text = "When Mary and John went to the store, John gave a drink to Mary.\n  Café, 東京, 3.14 <|endoftext|>"
    assert tokenizer.decode(ids(tokenizer, text)) == text


# ------------------------------------------------------------------------- OpenAI's algorithm

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to printable characters: printable Latin-1 maps to itself, the
    other bytes to the characters from 256 up, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in kept}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


WORDS = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def reference_encode(text: str) -> list[int]:
    """OpenAI's GPT-2 BPE, written from its description: merge the lowest-ranked adjacent pair,
    everywhere in the word, until no pair has a rank."""
    vocab, merges = gpt2_vocabulary()
    rank = {pair: r for r, pair in enumerate(merges)}
    to_char = _bytes_to_unicode()
    out = []
    for word in WORDS.findall(text):
        parts = [to_char[b] for b in word.encode("utf-8")]
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda pair: rank.get(pair, float("inf")))
            if best not in rank:
                break
            merged, k = [], 0
            while k < len(parts):
                if k + 1 < len(parts) and (parts[k], parts[k + 1]) == best:
                    merged.append(parts[k] + parts[k + 1])
                    k += 2
                else:
                    merged.append(parts[k])
                    k += 1
            parts = merged
        out += [vocab[p] for p in parts]
    return out


def test_the_reference_algorithm_is_right():
    """The reference itself, on the ids quoted from elsewhere (so it cannot agree by accident)."""
    assert reference_encode("When Mary and John") == [2215, 5335, 290, 1757]
    assert reference_encode(" John") == [1757]


def test_same_ids_as_openais_algorithm(tokenizer):
    texts = datasets.training_corpus(300) + datasets.coverage_sentences()[:300]
    texts += [" " + landmark for landmark, _ in datasets.FACTS] + [" " + name for name in datasets.NAMES]
    texts += ["It's   two  spaces\n\nand newlines, don't we'll 1234567 ÅÄÖ ünïcödé 😀 tabs\tend"]
    for text in texts:
        assert ids(tokenizer, text) == reference_encode(text), text
