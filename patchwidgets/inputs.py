"""Turning what a user typed into checked token tensors.

Patching compares two runs position by position, so the clean and corrupted prompts must
tokenise to the same length, the answers must be single tokens, and so on. Every check here
raises a :mod:`patchwidgets.errors` exception that says what is wrong and how to fix it.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Sequence, Union

import numpy as np
import torch

from .errors import (
    AnswerTokenError,
    EmptyPromptError,
    IdenticalPromptsError,
    PatchingInputError,
    PromptTooLongError,
    TokenLengthMismatchError,
)

Prompts = Union[str, Sequence[str], torch.Tensor]
Answer = Union[str, int]


@dataclass
class PreparedInputs:
    """Checked inputs for one sweep; ``batch`` prompt pairs of ``seq_len`` tokens."""

    clean_tokens: torch.Tensor            # [batch, seq_len]
    corrupted_tokens: torch.Tensor | None  # [batch, seq_len], None for ablations
    answer_pos: torch.Tensor              # [batch] last real token of each prompt
    correct: torch.Tensor                 # [batch]
    incorrect: torch.Tensor | None        # [batch]
    clean_str_tokens: list[list[str]] | None
    corrupted_str_tokens: list[list[str]] | None

    @property
    def batch(self) -> int:
        return self.clean_tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.clean_tokens.shape[1]


def _as_list(prompts: Prompts, field: str, vocab: int) -> list[str] | torch.Tensor:
    """The prompts as a list of texts, or as ``[batch, pos]`` int64 token ids.

    Nothing empty gets through: an empty list, an empty or whitespace-only text (alone or in a
    list), a token tensor without rows or positions. This runs before anything is tokenised
    or reshaped, so an empty input is named here rather than failing deep inside torch.
    """
    if isinstance(prompts, np.ndarray) and prompts.dtype.kind in "iub":
        prompts = torch.from_numpy(prompts)
    if isinstance(prompts, torch.Tensor):
        return _token_ids(prompts, field, vocab)
    if not isinstance(prompts, (str, list, tuple)):
        raise PatchingInputError(
            f"{field} must be a prompt, a list of prompts or a [batch, pos] tensor of token ids, "
            f"got {type(prompts).__name__}", field)
    items = [prompts] if isinstance(prompts, str) else list(prompts)
    if not items:
        raise EmptyPromptError(
            f"the {field} prompt list is empty: give a prompt, or a list with one {field} prompt per "
            "prompt pair", field)
    for i, text in enumerate(items):
        # In a dataset, say which prompt (as indexed in Python, and counted) and how to drop it.
        where = (f"the {field} prompt", "") if len(items) == 1 else (
            f"{field}[{i}] (prompt {i + 1} of {len(items)})", ", or leave this pair out of the dataset")
        check_text(text, field, *where)
    return items


def check_text(text: Any, field: str, where: str, fix: str = "") -> str:
    """One prompt's text: a string with something in it besides whitespace.

    ``where`` names the prompt in messages (``"the clean prompt"``, ``"clean[1] (prompt 2 of
    3)"``) and ``fix`` ends the advice. Raises :class:`EmptyPromptError` (or, for a value that
    is not a string, :class:`PatchingInputError`) with ``err.field = field``.
    """
    if isinstance(text, (list, tuple)) and not text:  # [] where a string belongs: a dataset row left empty
        raise EmptyPromptError(f"{where} is an empty {type(text).__name__}, not a string: type a sentence "
                               f"for the model to complete{fix}", field)
    if not isinstance(text, str):
        raise PatchingInputError(
            f"{field} prompts must be strings or a token tensor, got {type(text).__name__} ({where})", field)
    if not text.strip():
        what = "empty" if not text else f"empty (only whitespace: {text!r})"
        raise EmptyPromptError(f"{where} is {what}: type a sentence for the model to complete{fix}", field)
    return text


def _token_ids(tokens: torch.Tensor, field: str, vocab: int) -> torch.Tensor:
    """``[batch, pos]`` int64 ids from a ``[batch, pos]`` or ``[pos]`` integer tensor.

    Any integer dtype is accepted (and widened: the embedding wants int64); bool and floating
    tensors are refused rather than cast, since their values are not token ids. A tensor with
    no positions (``[1, 0]``, ``[0]``) or no rows (``[0, 5]``) is refused before the reshape,
    which could not tell how many rows ``[-1, 0]`` has.
    """
    if tokens.dtype == torch.bool or tokens.dtype.is_floating_point or tokens.dtype.is_complex:
        raise PatchingInputError(f"{field} tokens must be integer token ids, got dtype {tokens.dtype}", field)
    if tokens.ndim not in (1, 2):
        raise PatchingInputError(
            f"{field} tokens must be [batch, pos] (or [pos] for one prompt), got shape {tuple(tokens.shape)}", field)
    if tokens.shape[-1] == 0:
        raise EmptyPromptError(
            f"the {field} prompt is empty: its tokens have shape {tuple(tokens.shape)}, with no positions; "
            "give at least one token id per prompt (model.to_tokens(text) makes them from a text)", field)
    if tokens.ndim == 2 and tokens.shape[0] == 0:
        raise EmptyPromptError(
            f"the {field} tokens have shape {tuple(tokens.shape)}: no prompts (0 rows); give "
            "[batch, pos] token ids with at least one row", field)
    tokens = tokens.reshape(-1, tokens.shape[-1]).cpu().long()
    outside = ((tokens < 0) | (tokens >= vocab)).nonzero()
    if len(outside):
        row, pos = outside[0].tolist()
        raise PatchingInputError(
            f"{field} token id {int(tokens[row, pos])} (prompt {row}, position {pos}) is outside the "
            f"vocabulary [0, {vocab})", field)
    return tokens


def tokenize(model: Any, texts: list[str], field: str) -> list[torch.Tensor]:
    """Each text's token ids ``[pos]`` (BOS first where the model prepends one).

    An unknown word of a strict tokenizer raises with ``err.field = field``.
    """
    if getattr(model, "tokenizer", None) is None:
        raise PatchingInputError(
            f"this model has no tokenizer: pass {field} as a tensor of token ids", field
        )
    out = []
    for text in texts:
        try:
            ids = model.to_tokens(text, truncate=False)[0].cpu()
        except PatchingInputError as err:  # e.g. an unknown word for a word-level tokenizer
            err.field = field
            raise
        if len(ids) == 0:  # no BOS, and a tokenizer that drops every character of the text
            raise EmptyPromptError(
                f"the {field} prompt {text!r} has no tokens (this model prepends no BOS token and its "
                "tokenizer drops every character): type a sentence for the model to complete", field)
        out.append(ids)
    return out


def str_tokens(model: Any, tokens: torch.Tensor) -> list[str]:
    """Readable token strings, or ``"#id"`` when the model has no tokenizer."""
    if getattr(model, "tokenizer", None) is None:
        return [f"#{int(t)}" for t in tokens]
    return list(model.to_str_tokens(tokens))


def _pad(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    return tokens, torch.tensor([len(r) - 1 for r in rows])


def _is_token_id(value: Any) -> bool:
    """An int of any kind (Python, NumPy) but not a bool, which is an int to Python only."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def answer_id(model: Any, answer: Answer, which: str) -> int:
    """The token id of one answer: a single-token string or a token id in the vocabulary."""
    vocab = model.cfg.d_vocab
    answer = _plain(answer)
    if _is_token_id(answer):
        token = int(answer)
        if not 0 <= token < vocab:
            raise AnswerTokenError(f"{which} answer id {token} is outside the vocabulary [0, {vocab})")
        return token
    if not isinstance(answer, str) or answer == "":
        raise AnswerTokenError(
            f"the {which} answer must be a non-empty string or an integer token id, got {answer!r}")
    if getattr(model, "tokenizer", None) is None:
        raise AnswerTokenError(f"this model has no tokenizer: give the {which} answer as a token id")
    try:
        ids = model.to_tokens(answer, prepend_bos=False)[0].tolist()
    except PatchingInputError as err:
        err.field = "answers"
        raise
    if len(ids) != 1:
        pieces = model.to_str_tokens(torch.tensor(ids))
        hint = ""
        if not answer.startswith(" "):
            try:
                if len(model.to_tokens(" " + answer, prepend_bos=False)[0]) == 1:
                    hint = f" Did you mean {' ' + answer!r}? Answers usually start with a space."
            except ValueError:
                pass
        raise AnswerTokenError(
            f"the {which} answer {answer!r} is {len(ids)} tokens {pieces}; patching metrics need "
            f"a single-token answer.{hint}"
        )
    return ids[0]


def _plain(value: Any) -> Any:
    """Tensors and arrays as the (nested) Python values they hold; lists and tuples as lists."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _is_answer(value: Any) -> bool:
    return isinstance(value, str) or _is_token_id(value)


def _answer_pairs(answers: Any, batch: int) -> list[tuple[Any, Any]]:
    """``answers`` as one ``(correct, incorrect or None)`` pair per prompt pair.

    Accepted: one answer; ``(correct, incorrect)``; or a list of one such pair (or one
    answer) per prompt pair. Tensors and arrays are read as the nested lists they hold.
    Nothing empty: no ``[]``, no empty pair, no ``""`` answer (checked before tokenising).
    """
    example = "e.g. (' Mary', ' John') or [(' Mary', ' John'), ...] with one pair per prompt"
    if answers is None:
        raise AnswerTokenError(f"give answers=(correct, incorrect), {example}")
    answers = _plain(answers)  # (a bool or float tensor holds bools or floats: refused below)
    if isinstance(answers, list) and not answers:
        raise AnswerTokenError(f"answers is empty: give the answer tokens to compare, {example}")
    if _is_answer(answers):
        return _given([(answers, None)] * batch, each=False)
    if not isinstance(answers, list):
        raise AnswerTokenError(f"answers must be (correct, incorrect) or one pair per prompt, {example}; "
                               f"got {answers!r}")
    if all(_is_answer(a) for a in answers):
        if len(answers) > 2:
            raise AnswerTokenError(f"answers must be (correct, incorrect) or one pair per prompt, {example}; "
                                   f"got {len(answers)} answers")
        return _given([(answers[0], answers[1] if len(answers) == 2 else None)] * batch, each=False)
    pairs = []
    for i, pair in enumerate(answers):
        if _is_answer(pair):
            pair = (pair,)
        if isinstance(pair, list) and not pair:
            raise AnswerTokenError(f"answers[{i}] (pair {i + 1} of {len(answers)}) is empty: give "
                                   f"(correct, incorrect) for every prompt pair, {example}")
        if not isinstance(pair, list) or not 1 <= len(pair) <= 2 or not all(_is_answer(a) for a in pair):
            raise AnswerTokenError(
                f"answers must be strings or integer token ids, as (correct, incorrect) or one such pair "
                f"per prompt; got {pair!r} ({type(pair).__name__}) in answers={answers!r}")
        pairs.append((pair[0], pair[1] if len(pair) == 2 else None))
    if len(pairs) != batch:
        raise AnswerTokenError(f"got {len(pairs)} answer pairs for {batch} prompt pairs")
    if len({p[1] is None for p in pairs}) > 1:
        raise AnswerTokenError("give an incorrect answer for every prompt pair or for none")
    return _given(pairs, each=True)


def _given(pairs: list[tuple[Any, Any]], each: bool, name: str = "answers") -> list[tuple[Any, Any]]:
    """``pairs``, refusing an empty answer ``""``; ``each``: the pairs were given one per prompt
    pair, in the list ``name``, so a message names the pair. (A whitespace answer such as ``" "``
    or ``"\\n"`` is a token in most vocabularies, so it is left to the tokenizer.)"""
    for i, pair in enumerate(pairs):
        for which, answer in zip(("correct", "incorrect"), pair):
            if isinstance(answer, str) and not answer:
                where = f" of {name}[{i}] (pair {i + 1} of {len(pairs)})" if each else ""
                raise AnswerTokenError(
                    f"the {which} answer{where} is empty: give a single-token string such as ' Mary' "
                    "(answers usually start with a space) or an integer token id")
    return pairs


def dataset_rows(rows: Any) -> list[list[str]]:
    """A widget dataset: ``[clean, corrupted, correct, incorrect]`` rows, every one filled in.

    The checks :func:`prepare` makes of a dataset's prompts and answers that need no model
    (nothing empty, nothing that is not text), with messages that name the row
    (``dataset[1]``), so a bad row is refused when it is set rather than on the next Run. An
    integer answer is written as text, as the page would show it.
    """
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, str) or not isinstance(row, (list, tuple)) or len(row) != 4:
            raise PatchingInputError("dataset rows are (clean, corrupted, correct, incorrect)")
        where = f"dataset[{i}] (pair {i + 1} of {len(rows)})"
        for field, text in zip(("clean", "corrupted"), row):
            check_text(text, field, f"the {field} prompt of {where}", ", or leave this pair out of the dataset")
        for which, answer in zip(("correct", "incorrect"), row[2:]):
            if not _is_answer(answer):
                raise AnswerTokenError(f"the {which} answer of {where} must be a single-token string such as "
                                       f"' Mary', got {answer!r} ({type(answer).__name__})")
        out.append([str(x) for x in row])
    _given([(r[2], r[3]) for r in out], each=True, name="dataset")
    return out


def _answers(model: Any, answers: Any, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    pairs = _answer_pairs(answers, batch)
    correct = torch.tensor([answer_id(model, p[0], "correct") for p in pairs])
    if pairs[0][1] is None:
        return correct, None
    incorrect = torch.tensor([answer_id(model, p[1], "incorrect") for p in pairs])
    return correct, incorrect


def prepare(model: Any, clean: Prompts, corrupted: Prompts | None, answers: Any) -> PreparedInputs:
    """Tokenise and check the prompts and answers of a sweep."""
    vocab = model.cfg.d_vocab
    clean_items = _as_list(clean, "clean", vocab)
    corrupted_items = None if corrupted is None else _as_list(corrupted, "corrupted", vocab)
    pad_id = getattr(getattr(model, "tokenizer", None), "pad_token_id", None) or 0

    if isinstance(clean_items, torch.Tensor):
        clean_tokens = clean_items.cpu()
        answer_pos = torch.full((clean_tokens.shape[0],), clean_tokens.shape[1] - 1)
        clean_rows = list(clean_tokens)
    else:
        clean_rows = tokenize(model, clean_items, "clean")
        clean_tokens, answer_pos = _pad(clean_rows, pad_id)

    corrupted_tokens = None
    if corrupted_items is not None:
        if isinstance(corrupted_items, torch.Tensor):
            corrupted_rows = list(corrupted_items.cpu())
        else:
            corrupted_rows = tokenize(model, corrupted_items, "corrupted")
        if len(corrupted_rows) != len(clean_rows):
            raise PatchingInputError(
                f"got {len(clean_rows)} clean and {len(corrupted_rows)} corrupted prompts; "
                "give one corrupted prompt per clean prompt", "corrupted")
        for i, (c, x) in enumerate(zip(clean_rows, corrupted_rows)):
            if len(c) != len(x):
                where = f" (pair {i})" if len(clean_rows) > 1 else ""
                raise TokenLengthMismatchError(
                    f"clean and corrupted prompts{where} have different token lengths: clean has "
                    f"{len(c)} tokens {str_tokens(model, c)}, corrupted has {len(x)} tokens "
                    f"{str_tokens(model, x)}. Positions must line up for patching: change the "
                    "corrupted prompt so it has the same number of tokens (e.g. swap one name "
                    "for another single-token name)."
                )
        corrupted_tokens = torch.stack(corrupted_rows) if isinstance(corrupted_items, torch.Tensor) \
            else _pad(corrupted_rows, pad_id)[0]
        if torch.equal(clean_tokens, corrupted_tokens):
            raise IdenticalPromptsError(
                "the clean and corrupted prompts are identical, so every patch would change "
                "nothing. Change the corrupted prompt, e.g. swap the name the answer depends on."
            )

    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx is not None and clean_tokens.shape[1] > n_ctx:
        raise PromptTooLongError(
            f"the prompt is {clean_tokens.shape[1]} tokens but the model's context window is "
            f"{n_ctx} tokens; shorten it", "clean")

    correct, incorrect = _answers(model, answers, clean_tokens.shape[0])
    return PreparedInputs(
        clean_tokens=clean_tokens,
        corrupted_tokens=corrupted_tokens,
        answer_pos=answer_pos,
        correct=correct,
        incorrect=incorrect,
        clean_str_tokens=[str_tokens(model, r) for r in clean_rows],
        corrupted_str_tokens=None if corrupted_tokens is None else [
            str_tokens(model, r) for r in corrupted_tokens],
    )
