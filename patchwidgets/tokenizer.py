"""A word-level tokenizer for the toy world, and a strict mode for it.

Why word level?
---------------
Activation patching is easiest to learn when every token is a word you can
read. The ``toy-ioi`` tokenizer therefore maps **one word to one token**,
GPT-2 style: the space before a word belongs to the word, so ``" Mary"`` is
one token, while ``"When"`` at the very start of the text (no space before
it) is another. Punctuation gets its own token::

    "When Mary and John went to the store, John gave"
    -> "When", " Mary", " and", " John", " went", " to", " the", " store", ",", " John", " gave"

It is built with Hugging Face ``tokenizers``: a ``WordLevel`` model over a
fixed vocabulary, a regex pre-tokenizer that cuts the text into those
pieces, and a ``Fuse`` decoder (pieces already carry their spaces, so
decoding is plain concatenation). A post-processor prepends the BOS token
``<|endoftext|>`` (id 0), the same way every training sentence started.

Why strict?
-----------
A word-level vocabulary cannot spell an unknown word out of smaller pieces;
it maps it to ``[UNK]``. A model given ``[UNK]`` still produces confident
logits, which is a silent, confusing failure. :func:`make_strict` turns the
tokenizer into one that raises :class:`UnknownWordError` instead, naming the
word and suggesting close vocabulary words.
"""
from __future__ import annotations

import difflib
import json
import re
import unicodedata
from pathlib import Path
from typing import Any, Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .errors import PatchingInputError

__all__ = [
    "BOS_TOKEN", "UNK_TOKEN", "PRETOKENIZE_PATTERN", "UnknownWordError",
    "pretokenize", "build_vocab", "build_tokenizer", "save_tokenizer",
    "make_strict", "is_strict",
]

#: Beginning/end of text and padding token, id 0 (as in GPT-2).
BOS_TOKEN = "<|endoftext|>"
#: Stands for words outside the vocabulary, id 1. A strict tokenizer never emits it.
UNK_TOKEN = "[UNK]"

#: How text is cut into vocabulary pieces: a word (letters, digits,
#: apostrophes) with an optional leading space, or one punctuation
#: character with an optional leading space, or a run of other whitespace.
PRETOKENIZE_PATTERN = r" ?[A-Za-z0-9']+| ?[^\sA-Za-z0-9']|\s+"
_PIECE_RE = re.compile(PRETOKENIZE_PATTERN)


class UnknownWordError(PatchingInputError):
    """A word that is not in a word-level vocabulary (a ``ValueError``).

    Attributes:
        word: the unknown word as written, without its leading space.
        text: the full text that was being tokenized.
        token: the vocabulary piece that was looked up (with its space).
        suggestions: close vocabulary pieces, best first (may be empty).
    """

    def __init__(self, message: str, *, word: str, text: str, token: str = "",
                 suggestions: tuple[str, ...] = ()):
        super().__init__(message)
        self.word = word
        self.text = text
        self.token = token or word
        self.suggestions = suggestions


def pretokenize(text: str) -> list[str]:
    """Cut ``text`` into the pieces the tokenizer looks up (pure Python).

    Matches the tokenizer's own pre-tokenizer:
    ``pretokenize("the store, Mary")`` -> ``['the', ' store', ',', ' Mary']``.
    """
    return _PIECE_RE.findall(text)


def build_vocab(sentences: Iterable[str]) -> dict[str, int]:
    """Vocabulary of every piece in ``sentences``: ``{piece: id}``.

    Ids 0 and 1 are ``<|endoftext|>`` and ``[UNK]``; the rest are sorted,
    so the same sentences always give the same ids.
    """
    pieces = {piece for sentence in sentences for piece in pretokenize(sentence)}
    pieces -= {BOS_TOKEN, UNK_TOKEN}
    vocab = {BOS_TOKEN: 0, UNK_TOKEN: 1}
    for piece in sorted(pieces):
        vocab[piece] = len(vocab)
    return vocab


def build_tokenizer(sentences: Iterable[str], *, model_max_length: int = 64
                    ) -> PreTrainedTokenizerFast:
    """Build the word-level tokenizer whose vocabulary covers ``sentences``.

    Pass every sentence that can occur (see
    :func:`patchwidgets.datasets.coverage_sentences`), so each word appears
    in each form it can take (``"Mary"`` at the start of a text,
    ``" Mary"`` elsewhere). The returned tokenizer prepends BOS; it is
    *not* strict (training wants speed; call :func:`make_strict` for users).
    """
    vocab = build_vocab(sentences)
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(
        Regex(PRETOKENIZE_PATTERN), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B:1",
        special_tokens=[(BOS_TOKEN, 0)])
    # Registering them as special tokens means the text "<|endoftext|>" is
    # matched whole before the regex pre-tokenizer could split it up.
    backend.add_special_tokens([BOS_TOKEN, UNK_TOKEN])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS_TOKEN, eos_token=BOS_TOKEN,
        pad_token=BOS_TOKEN, unk_token=UNK_TOKEN,
        clean_up_tokenization_spaces=False, model_max_length=model_max_length)


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, directory: str | Path) -> None:
    """``save_pretrained`` the tokenizer, in a form older transformers can read.

    transformers 5 records ``"tokenizer_class": "TokenizersBackend"``, a
    class transformers 4 does not have; ``PreTrainedTokenizerFast`` loads
    the same ``tokenizer.json`` in both.
    """
    tokenizer.save_pretrained(str(directory))
    config_path = Path(directory) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------
# Strict mode
# --------------------------------------------------------------------------

_STRICT_CLASSES: dict[type, type] = {}


def is_strict(tokenizer: Any) -> bool:
    """Whether :func:`make_strict` has been applied to ``tokenizer``."""
    return type(tokenizer) in _STRICT_CLASSES.values()


def _strings(value: Any) -> list[str]:
    """All strings inside a tokenizer input (a str, or nested lists of str)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [s for item in value for s in _strings(item)]
    return []


def _contains(ids: Any, target: int) -> bool:
    """Whether ``target`` occurs in ``ids`` (a tensor, array, or nested lists)."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return ids == target
    return any(_contains(item, target) for item in ids or ())


def _unknown_word_error(tokenizer: Any, text: str, piece: str) -> UnknownWordError:
    """Build the error for ``piece`` (a pre-tokenized piece of ``text``)."""
    vocab = tokenizer.get_vocab()
    word = piece.strip() or piece
    name = getattr(tokenizer, "vocabulary_name", None) or "model's"
    message = (f"{word!r} is not in the {name} vocabulary (word-level tokenizer: "
               f"every word must be known).")
    close: tuple[str, ...] = ()
    if not piece.strip():
        message += (" Only single spaces before words are supported; remove "
                    "extra spaces, tabs and newlines (and any trailing space).")
    else:
        other_form = word if piece.startswith(" ") else " " + word
        if other_form in vocab:
            message += (f" But {other_form!r} is: each word is a token together "
                        f"with the space before it, and only the first word of a "
                        f"text has no space.")
        words = {p.strip() for p in vocab if p not in (BOS_TOKEN, UNK_TOKEN)}
        close = tuple(difflib.get_close_matches(word, sorted(words - {word}),
                                                n=5, cutoff=0.6))
        message += (f" Close words: {', '.join(repr(c) for c in close)}."
                    if close else " No close words.")
        message += f" See tokenizer.get_vocab() for all {len(vocab)} tokens."
    return UnknownWordError(message, word=word, text=text, token=piece,
                            suggestions=close)


def _check_known(tokenizer: Any, inputs: Iterable[Any]) -> None:
    """Raise :class:`UnknownWordError` for the first unknown piece in ``inputs``.

    The literal text ``[UNK]`` is refused too: it encodes to the unknown-word id, which is
    exactly the silent failure strict mode exists to prevent.
    """
    unk_id = tokenizer.unk_token_id
    backend = tokenizer.backend_tokenizer
    for text in (s for value in inputs for s in _strings(value)):
        if UNK_TOKEN in text:
            raise UnknownWordError(
                f"{UNK_TOKEN!r} is the tokenizer's placeholder for unknown words, not a word: "
                "the model would read it as 'some word I do not know'. Type a word from the "
                "vocabulary instead.", word=UNK_TOKEN, text=text)
        encoding = backend.encode(text, add_special_tokens=False)
        for token_id, (start, end) in zip(encoding.ids, encoding.offsets):
            if token_id == unk_id:
                raise _unknown_word_error(tokenizer, text, _whole_word(text, start, end))


def _is_word_character(ch: str) -> bool:
    # Letters and digits of any script, apostrophes, and combining marks (the accent of a
    # decomposed "a\u0301" is a separate character the pre-tokenizer cuts the word at).
    return ch.isalnum() or ch == "'" or unicodedata.category(ch).startswith("M")


def _whole_word(text: str, start: int, end: int) -> str:
    """The unknown piece ``text[start:end]`` grown to the whole word around it.

    The pre-tokenizer's pattern knows only ASCII letters, so it cuts "J\u00f6hn" into
    " J", "\u00f6", "hn"; the error should name "J\u00f6hn", not the fragment " J".
    """
    if not text[start:end].strip():
        return text[start:end]  # a whitespace piece: the message explains spacing instead
    while _is_word_character(text[start]) and start > 0 and _is_word_character(text[start - 1]):
        start -= 1
    while end < len(text) and _is_word_character(text[end]):
        end += 1
    return text[start:end]


def _strict_class(base: type) -> type:
    """The strict subclass of tokenizer class ``base`` (created once, cached)."""
    if base in _STRICT_CLASSES:
        return _STRICT_CLASSES[base]

    class Strict(base):
        """``base`` tokenizer that raises UnknownWordError instead of emitting [UNK]."""

        def __call__(self, text=None, text_pair=None, *args, **kwargs):
            out = super().__call__(text, text_pair, *args, **kwargs)
            # Fast path: only look for the culprit if [UNK] was produced.
            if _contains(out["input_ids"], self.unk_token_id):
                _check_known(self, (text, text_pair, kwargs.get("text_target"),
                                    kwargs.get("text_pair_target")))
            return out

        def encode(self, text, text_pair=None, *args, **kwargs):
            ids = super().encode(text, text_pair, *args, **kwargs)
            if _contains(ids, self.unk_token_id):
                _check_known(self, (text, text_pair))
            return ids

        def save_pretrained(self, *args, **kwargs):
            # transformers records type(self).__name__ as "tokenizer_class";
            # save as the base class so the files load without patchwidgets.
            self.__class__ = base
            try:
                return base.save_pretrained(self, *args, **kwargs)
            finally:
                self.__class__ = Strict

    Strict.__name__ = Strict.__qualname__ = f"Strict{base.__name__}"
    # Registered as a module attribute so pickle can find the class by name.
    globals()[Strict.__name__] = Strict
    _STRICT_CLASSES[base] = Strict
    return Strict


def make_strict(tokenizer: PreTrainedTokenizerBase, vocabulary_name: str | None = None
                ) -> PreTrainedTokenizerBase:
    """Make ``tokenizer`` raise :class:`UnknownWordError` on unknown words.

    The tokenizer object is changed **in place** (its class is swapped for
    a subclass whose ``__call__`` and ``encode`` check for ``[UNK]``), so
    every holder of a reference to it, such as a ``TransformerBridge`` and
    its driver, becomes strict too. It is also returned for convenience.
    Applying it twice is harmless.

    Works for fast (``tokenizers``-backed) tokenizers with an unk token.
    ``vocabulary_name`` (e.g. ``"toy-ioi"``) is used in error messages.
    """
    if tokenizer.unk_token_id is None:
        raise ValueError("make_strict needs a tokenizer with an unk token")
    if not hasattr(tokenizer, "backend_tokenizer"):
        raise TypeError("make_strict needs a fast (tokenizers-backed) tokenizer")
    if vocabulary_name is not None:
        tokenizer.vocabulary_name = vocabulary_name
    if not is_strict(tokenizer):
        tokenizer.__class__ = _strict_class(type(tokenizer))
    return tokenizer
