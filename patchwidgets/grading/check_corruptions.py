"""Checks for 06_corrupted_prompts."""

from __future__ import annotations

import re
from typing import Callable


from ._common import GradingError, call_learner, report_pass


# ---------------------------------------------------------------------------------------------
# 06_corrupted_prompts
# ---------------------------------------------------------------------------------------------

def _ref_swap(prompt: str, a: str, b: str) -> str:
    def repl(m: re.Match) -> str:
        return b if m.group(0) == a else a

    return re.sub(rf"\b({re.escape(a)}|{re.escape(b)})\b", repl, prompt)


def check_swap_names(swap_names: Callable) -> None:
    """``swap_names(prompt, a, b) -> str``: every ``a`` becomes ``b`` and every ``b`` becomes ``a``."""
    name = "swap_names"
    cases = [
        ("When Mary and John went to the store, John gave a drink to", "Mary", "John"),
        ("When Lisa and Sarah went to the park, Lisa gave the ticket to", "Lisa", "Sarah"),
        ("When Anna and Anne went to the zoo, Anne gave a book to", "Anna", "Anne"),
        ("Then, Sam and Samuel's friend Tom went home. Tom gave a gift to", "Sam", "Tom"),
    ]
    for prompt, a, b in cases:
        expected = _ref_swap(prompt, a, b)
        got = call_learner(name, swap_names, prompt, a, b)
        if got != expected:
            hint = ""
            if isinstance(got, str) and any(re.search(rf"\b{re.escape(n)}\b", got) is None for n in (a, b)):
                hint = (" Every name ended up the same: replacing a with b and then b with a "
                        "overwrites the first replacement; swap through a placeholder or a regex.")
            elif isinstance(got, str) and "Samuel" not in got and "Samuel" in prompt:
                hint = " Replace whole words only: 'Samuel' is not 'Sam'."
            raise GradingError(f"{name}({prompt!r}, {a!r}, {b!r}):\n  expected {expected!r}\n  got      {got!r}.{hint}")
    report_pass(name, "swaps two whole-word names everywhere")


def _ref_abc(prompt: str, io: str, s: str, x: str, y: str, z: str) -> str:
    out = re.sub(rf"\b{re.escape(io)}\b", x, prompt)
    out = re.sub(rf"\b{re.escape(s)}\b", y, out, count=1)
    return re.sub(rf"\b{re.escape(s)}\b", z, out)


def check_abc_corruption(abc_corruption: Callable) -> None:
    """``abc_corruption(prompt, io, s, x, y, z) -> str``: IO -> x, first S -> y, second S -> z."""
    name = "abc_corruption"
    cases = [
        ("When Mary and John went to the store, John gave a drink to", "Mary", "John", "Lisa", "Tom", "Kate"),
        ("When John and Mary went to the store, John gave a drink to", "Mary", "John", "Kate", "Paul", "Emma"),
        ("When Sam and Samuel went to the park, Sam gave a book to", "Samuel", "Sam", "Tom", "Anna", "Rose"),
    ]
    for prompt, io, s, x, y, z in cases:
        expected = _ref_abc(prompt, io, s, x, y, z)
        got = call_learner(name, abc_corruption, prompt, io, s, x, y, z)
        if got != expected:
            hint = ""
            if isinstance(got, str) and got.count(y) == 2:
                hint = " Both mentions of S became y: only the first one should; the second becomes z."
            raise GradingError(f"{name}({prompt!r}, io={io!r}, s={s!r}, x={x!r}, y={y!r}, z={z!r}):\n"
                               f"  expected {expected!r}\n  got      {got!r}.{hint}")
    report_pass(name, "three different names: no name is repeated any more")


def reference_swap_names(prompt: str, a: str, b: str) -> str:
    """The course's reference :func:`swap_names`: exchange two whole-word names everywhere."""
    return _ref_swap(prompt, a, b)


def reference_abc_corruption(prompt: str, io: str, s: str, x: str, y: str, z: str) -> str:
    """The course's reference ABC corruption: IO -> x, first S -> y, second S -> z."""
    return _ref_abc(prompt, io, s, x, y, z)
