"""GPT-2's own tokenizer, offline: the real vocabulary and merges, no Hugging Face hub.

Why
---
The course notebooks say things about GPT-2's tokens (" Colosseum" is four tokens, the names
are single tokens) and must run when a learner loads GPT-2. Without the hub, the closest thing
is a random-weight model of GPT-2's shape with GPT-2's real tokenizer
(``tests/test_course_gpt2.py``), and that needs the tokenizer files offline. They ship with
the package, gzip-compressed, under ``patchwidgets/vocab/gpt2/`` (see the README there for
where they come from and their licence).

How
---
GPT-2's tokenizer is a byte-level BPE: the text is cut into words by a regex (a leading space
stays with the word that follows it), each word's UTF-8 bytes are mapped to printable
characters (space -> ``Ġ``), and the merges, in rank order, join those characters into the
tokens of ``encoder.json``. ``tokenizers``' ``BPE`` model with a ``ByteLevel`` pre-tokenizer
and decoder does exactly this; the result is wrapped as a ``GPT2TokenizerFast`` with
``<|endoftext|>`` (id 50256) as its BOS, EOS and unknown token, as GPT-2's own.
"""
from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

__all__ = ["VOCAB_DIR", "gpt2_tokenizer", "gpt2_vocabulary"]

#: Where GPT-2's ``encoder.json.gz`` and ``vocab.bpe.gz`` live.
VOCAB_DIR = Path(__file__).resolve().parent / "vocab" / "gpt2"
ENDOFTEXT = "<|endoftext|>"


@lru_cache(maxsize=1)
def gpt2_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """GPT-2's vocabulary (token -> id, 50,257 entries) and its merges (50,000, in rank order)."""
    with gzip.open(VOCAB_DIR / "encoder.json.gz", "rt", encoding="utf-8") as f:
        vocab = json.load(f)
    with gzip.open(VOCAB_DIR / "vocab.bpe.gz", "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # The first line is "#version: 0.2"; each other non-empty line is one merge, "Ġ t".
    merges: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line:
            left, sep, right = line.partition(" ")
            if not sep or " " in right:
                raise ValueError(f"{VOCAB_DIR / 'vocab.bpe.gz'}: {line!r} is not a merge of two symbols")
            merges.append((left, right))
    return vocab, merges


def gpt2_tokenizer(model_max_length: int = 1024, directory: str | os.PathLike | None = None):
    """GPT-2's tokenizer as a ``transformers.GPT2TokenizerFast``, built from the bundled files.

    The same ids as GPT-2's tokenizer on the hub: ``"When Mary and John"`` -> ``[2215, 5335,
    290, 1757]``. Like GPT-2's, it adds no BOS token itself (TransformerLens prepends one).

    With ``directory``, the tokenizer is saved there and loaded back from it. Pass one when the
    tokenizer goes to ``TransformerBridge.boot_transformers(..., tokenizer=...)``: the bridge
    loads its own copy from where the tokenizer was loaded (``name_or_path``), which a tokenizer
    built in memory does not have. The directory must exist until the model is booted.
    """
    from transformers import AutoTokenizer, GPT2TokenizerFast  # type: ignore[attr-defined]  # (lazy export)

    vocab, merges = gpt2_vocabulary()
    bpe = Tokenizer(models.BPE(vocab=dict(vocab), merges=list(merges)))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.add_special_tokens([ENDOFTEXT])
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT,
                                  unk_token=ENDOFTEXT, model_max_length=model_max_length)
    if directory is None:
        return tokenizer
    tokenizer.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)
