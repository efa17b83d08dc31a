"""Turning what a user typed into checked token tensors.

Patching compares two runs position by position, so the clean and corrupted prompts must
tokenise to the same length, the answers must be single tokens, and so on. Every check here
raises a :mod:`patchwidgets.errors` exception that says what is wrong and how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union

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


def _as_list(prompts: Prompts, field: str) -> list[str] | torch.Tensor:
    if isinstance(prompts, torch.Tensor):
        if prompts.dtype.is_floating_point:
            raise PatchingInputError(f"{field} tokens must be integer token ids", field)
        tokens = prompts if prompts.ndim == 2 else prompts.reshape(1, -1)
        if tokens.numel() == 0:
            raise EmptyPromptError(f"the {field} prompt is empty", field)
        return tokens
    items = [prompts] if isinstance(prompts, str) else list(prompts)
    if not items:
        raise EmptyPromptError(f"the {field} prompt list is empty", field)
    for text in items:
        if not isinstance(text, str):
            raise PatchingInputError(f"{field} prompts must be strings or a token tensor, got {type(text).__name__}", field)
        if not text.strip():
            raise EmptyPromptError(f"the {field} prompt is empty: type a sentence for the model to complete", field)
    return items


def _tokenize(model: Any, texts: list[str], field: str) -> list[torch.Tensor]:
    if getattr(model, "tokenizer", None) is None:
        raise PatchingInputError(
            f"this model has no tokenizer: pass {field} as a tensor of token ids", field
        )
    out = []
    for text in texts:
        try:
            out.append(model.to_tokens(text, truncate=False)[0].cpu())
        except PatchingInputError as err:  # e.g. an unknown word for a word-level tokenizer
            err.field = field
            raise
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


def _answer_id(model: Any, answer: Answer, which: str) -> int:
    vocab = model.cfg.d_vocab
    if isinstance(answer, (int,)) or (isinstance(answer, torch.Tensor) and answer.numel() == 1):
        token = int(answer)
        if not 0 <= token < vocab:
            raise AnswerTokenError(f"{which} answer id {token} is outside the vocabulary [0, {vocab})")
        return token
    if not isinstance(answer, str) or answer == "":
        raise AnswerTokenError(f"the {which} answer must be a non-empty string or a token id, got {answer!r}")
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


def _answers(model: Any, answers: Any, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if answers is None:
        raise AnswerTokenError("give answers=(correct, incorrect), e.g. (' Mary', ' John')")
    if isinstance(answers, torch.Tensor):
        answers = answers.tolist()
    if isinstance(answers, (str, int)):
        pairs = [(answers, None)] * batch
    elif len(answers) and all(isinstance(a, (str, int)) for a in answers):
        if len(answers) > 2:
            raise AnswerTokenError("answers must be (correct, incorrect) or one such pair per prompt")
        pair = (answers[0], answers[1] if len(answers) == 2 else None)
        pairs = [pair] * batch
    else:
        pairs = [tuple(a) if not isinstance(a, (str, int)) else (a, None) for a in answers]
        if len(pairs) != batch:
            raise AnswerTokenError(f"got {len(pairs)} answer pairs for {batch} prompt pairs")
    correct = torch.tensor([_answer_id(model, p[0], "correct") for p in pairs])
    if any(len(p) < 2 or p[1] is None for p in pairs):
        return correct, None
    incorrect = torch.tensor([_answer_id(model, p[1], "incorrect") for p in pairs])
    return correct, incorrect


def prepare(model: Any, clean: Prompts, corrupted: Prompts | None, answers: Any) -> PreparedInputs:
    """Tokenise and check the prompts and answers of a sweep."""
    clean_items = _as_list(clean, "clean")
    corrupted_items = None if corrupted is None else _as_list(corrupted, "corrupted")
    pad_id = getattr(getattr(model, "tokenizer", None), "pad_token_id", None) or 0

    if isinstance(clean_items, torch.Tensor):
        clean_tokens = clean_items.cpu()
        answer_pos = torch.full((clean_tokens.shape[0],), clean_tokens.shape[1] - 1)
        clean_rows = list(clean_tokens)
    else:
        clean_rows = _tokenize(model, clean_items, "clean")
        clean_tokens, answer_pos = _pad(clean_rows, pad_id)

    corrupted_tokens = None
    if corrupted_items is not None:
        if isinstance(corrupted_items, torch.Tensor):
            corrupted_rows = list(corrupted_items.cpu())
        else:
            corrupted_rows = _tokenize(model, corrupted_items, "corrupted")
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
