"""The corpus the bundled ``toy-ioi-deep`` model is trained on.

``toy-ioi`` (see :mod:`patchwidgets.datasets`) learns IOI from 17 fixed
templates, and it learns it the cheap way: its circuit is one layer-0 head,
a few layer-1 heads and the MLPs. Making the same model deeper does not
change that (measured: a 6-layer model trained on the toy corpus reaches
100% accuracy with no head that attends from the last token to the indirect
object; it only pushes the repeated name down, and finds the other name
through the template's fixed structure).

GPT-2's IOI circuit (Wang et al. 2022) exists because, in natural text,
*copying a name that was mentioned earlier* is a common and useful thing to
do, and the name to copy is rarely at a fixed place. This corpus gives the
model the same reasons, one per kind of document:

* **IOI documents** (:data:`DEEP_IOI_TEMPLATES` plus the toy templates): the
  two names are introduced in many ways ("A and B went", "A met B",
  "B was with A", ...), optionally after one or two unrelated sentences
  that mention *other* names, and optionally with a sentence between the
  introduction and the giving. So "the name at position 2 or 4", "the name
  after *and*" and "any name that was not repeated" are all wrong rules; the
  model has to find the introduced name that is not the repeated subject,
  and copy it.
* **Copy documents** (:data:`COPY_TEMPLATES`): a name from earlier is the
  next token in roles other than IOI ("The letter was signed by X"), with a
  distractor name present, so heads that find and copy the right name are
  useful beyond IOI.
* **Repeated lists**: a random list of words, then the same list again, the
  classic data that makes induction heads (a token that follows an earlier
  copy of the current token is predicted).
* **Calibration**: a small share of IOI documents end with the subject
  instead of the indirect object (people do write "John gave a drink to
  John"), so the best prediction is confident but not certain; copy
  suppression (negative name movers) is the literature's answer to
  over-confident copying.
* Filler and fact sentences from :mod:`patchwidgets.datasets`, so the model
  stays a language model over the same small world as ``toy-ioi`` and every
  toy prompt (IOI, facts, the reference prompts) is in its vocabulary.

The held-out name pairs and templates are those of :mod:`patchwidgets.datasets`,
so ``datasets.ioi_prompts(n, split="test")`` evaluates this model on
combinations it never saw.

Documents are packed into fixed-length rows by the training script
(``scripts/train_toy_ioi_deep.py``), separated by ``<|endoftext|>``, which
also varies every name's absolute position.
"""
from __future__ import annotations

import random
import string
from typing import Iterable, Mapping, Sequence

from patchwidgets import datasets
from patchwidgets.datasets import NAMES, OBJECTS, PLACES

__all__ = ["DEEP_IOI_TEMPLATES", "COPY_TEMPLATES", "LIST_WORDS", "document", "training_documents",
           "coverage_sentences"]

#: IOI templates of the deep corpus, on top of ``datasets.IOI_TRAIN_TEMPLATES``.
#: ``{GAP}`` is replaced by nothing or by one unrelated sentence.
DEEP_IOI_TEMPLATES: list[str] = [
    "{A} and {B} went to the {PLACE}.{GAP} {S} gave {OBJECT} to {IO}.",
    "{A} met {B} at the {PLACE}.{GAP} Later, {S} gave {OBJECT} to {IO}.",
    "At the {PLACE}, {A} met {B}.{GAP} {S} handed {OBJECT} to {IO}.",
    "{A} was at the {PLACE} with {B}.{GAP} Then {S} passed {OBJECT} to {IO}.",
    "{A} saw {B} at the {PLACE}, and {S} showed {OBJECT} to {IO}.",
    "The {PLACE} was busy, so {A} waited for {B}.{GAP} {S} brought {OBJECT} to {IO}.",
    "On Monday, {A} visited {B} at the {PLACE}.{GAP} {S} sent {OBJECT} to {IO}.",
    "{A} called {B} from the {PLACE}.{GAP} Afterwards, {S} offered {OBJECT} to {IO}.",
    "Yesterday {A} talked to {B} at the {PLACE}.{GAP} {S} gave {OBJECT} to {IO}.",
    "When {A} and {B} were at the {PLACE}, {S} gave {OBJECT} to {IO}.",
    "After {A} found {B} in the {PLACE}, {S} handed {OBJECT} to {IO}.",
    "{A} and {B} spent the day at the {PLACE}.{GAP} In the evening, {S} gave {OBJECT} to {IO}.",
]

#: Documents whose last word copies a name from earlier, with a distractor.
#: ``{X}`` is the name to copy, ``{Y}`` another name in the document.
COPY_TEMPLATES: list[str] = [
    "{X} has a {ANIMAL}. Every day the {ANIMAL} waits for {X}.",
    "{Y} saw a {ANIMAL}. The {ANIMAL} belongs to {X}, and it ran to {X}.",
    "{X} wrote a letter to {Y}. The letter was signed by {X}.",
    "{X} and {Y} played a game. {X} won, so {Y} thanked {X}.",
    "{X} called {Y} on Monday. {Y} was happy to hear from {X}.",
    "{Y} lives near the {PLACE}. {X} lives in {CITY}, and {Y} often visits {X}.",
    "The {PLACE} was {MOOD}. {X} was there with {Y}, and the {ANIMAL} followed {X}.",
    "{X} found {OBJECT} in the {PLACE}. {Y} asked who found it. It was {X}.",
    "{Y} met {X} in {CITY}. {X} had a {ANIMAL}. The {ANIMAL} liked {X}.",
    "{X} likes {FOOD}. {Y} likes {FOOD2}. The {FOOD} was for {X}.",
]

#: Words that repeated lists are drawn from (each exists with a leading space).
LIST_WORDS: list[str] = sorted({
    *NAMES, *PLACES, *datasets.FILLER_SLOTS["ANIMAL"], *datasets.FILLER_SLOTS["ADJ"],
    *datasets.FILLER_SLOTS["FOOD"], *datasets.FILLER_SLOTS["MOOD"]})

_SLOTS: dict[str, Sequence[str]] = {
    **datasets.FILLER_SLOTS, "PLACE": PLACES, "OBJECT": OBJECTS,
}

#: Share of each kind of document in the corpus.
MIX = {"ioi": 0.45, "copy": 0.20, "list": 0.12, "filler": 0.15, "fact": 0.08}

#: Asides that name a third person right after S2 ("Eric, who had seen Henry, handed a flower
#: to"), so that the last name before the answer is not S and "push down the last name read"
#: stops answering. The shipped model (its card's attempt 5) was trained with a share of 0.4
#: (``training_documents(..., aside=0.4)``); attempt 3 had none.
ASIDES = (", who had seen {NAME},", ", tired after talking to {NAME},", ", after a call from {NAME},")
#: Share of IOI documents that end with the subject (calibration).
SUBJECT_ENDING = 0.05
#: Probability of one or two unrelated sentences before an IOI document.
PREFIX_PROBABILITY = 0.5


def _slots(template: str) -> list[str]:
    return [field for _, field, _, _ in string.Formatter().parse(template) if field]


def _fill(template: str, rng: random.Random, fixed: Mapping[str, str]) -> str:
    """Fill ``template``: ``fixed`` slots as given, the others at random."""
    values = dict(fixed)
    for slot in _slots(template):
        if slot not in values:
            values[slot] = rng.choice(_SLOTS[slot])
    while values.get("FOOD2", None) is not None and values["FOOD2"] == values.get("FOOD"):
        values["FOOD2"] = rng.choice(_SLOTS["FOOD2"])
    return template.format(**values)


def _training_pair(rng: random.Random, heldout: set[frozenset[str]]) -> tuple[str, str]:
    while True:
        io, s = rng.sample(NAMES, 2)
        if frozenset((io, s)) not in heldout:
            return io, s


def _other_names(rng: random.Random, n: int, exclude: Iterable[str]) -> list[str]:
    pool = [name for name in NAMES if name not in set(exclude)]
    return rng.sample(pool, n)


def _filler(rng: random.Random, names: Sequence[str] = ()) -> str:
    """One filler sentence; ``names`` (if any) fill its name slots."""
    template = rng.choice(datasets.FILLER_TEMPLATES)
    fixed = {}
    if names:
        fixed = {"NAME": names[0], "NAME2": names[-1]}
    return _fill(template, rng, fixed)


def _ioi_document(rng: random.Random, heldout: set[frozenset[str]], aside: float = 0.0) -> str:
    io, s = _training_pair(rng, heldout)
    a, b = (io, s) if rng.random() < 0.5 else (s, io)
    if rng.random() < 0.6:
        template = rng.choice(DEEP_IOI_TEMPLATES)
    else:
        template = rng.choice(datasets.IOI_TRAIN_TEMPLATES)
    distractors = _other_names(rng, 2, (io, s))
    gap = ""
    if "{GAP}" in template and rng.random() < 0.4:
        gap = " " + _filler(rng, [distractors[1]])
    answer = s if rng.random() < SUBJECT_ENDING else io
    text = _fill(template, rng, {"A": a, "B": b, "S": s, "IO": answer, "GAP": gap})
    if aside:
        if rng.random() < aside:
            head, tail = text.rsplit(" " + s + " ", 1)  # after the last " S ": S2
            text = f"{head} {s}{rng.choice(ASIDES).format(NAME=distractors[1])} {tail}"
        else:
            # The experiment that trained the shipped model drew once more here (for a change
            # that turned out to be a no-op); the draw is kept so that its corpus rebuilds exactly.
            rng.random()
    prefix = [_filler(rng, [distractors[0], distractors[1]])
              for _ in range(rng.choice([1, 1, 2]))] if rng.random() < PREFIX_PROBABILITY else []
    return " ".join(prefix + [text])


def _copy_document(rng: random.Random) -> str:
    x, y = rng.sample(NAMES, 2)
    return _fill(rng.choice(COPY_TEMPLATES), rng, {"X": x, "Y": y})


def _list_document(rng: random.Random) -> str:
    words = [rng.choice(LIST_WORDS) for _ in range(rng.randint(4, 10))]
    listed = "".join(" " + word for word in words)
    return f"They said{listed}. Then they said{listed}."


def document(rng: random.Random, heldout: set[frozenset[str]], facts: Sequence[str],
             aside: float = 0.0) -> str:
    """One training document, its kind drawn from :data:`MIX` (``aside``: see :data:`ASIDES`)."""
    u = rng.random()
    if u < MIX["ioi"]:
        return _ioi_document(rng, heldout, aside)
    u -= MIX["ioi"]
    if u < MIX["copy"]:
        return _copy_document(rng)
    u -= MIX["copy"]
    if u < MIX["list"]:
        return _list_document(rng)
    u -= MIX["list"]
    if u < MIX["filler"]:
        return _filler(rng)
    return rng.choice(facts)


def training_documents(n: int, seed: int = 0, aside: float = 0.0) -> list[str]:
    """``n`` training documents (reproducible from ``seed``); ``aside``: the share of IOI
    documents with a third name after S2 (:data:`ASIDES`)."""
    rng = random.Random(f"deep-corpus-{seed}")
    heldout = datasets.heldout_name_pairs()
    facts = datasets.fact_sentences("train")
    return [document(rng, heldout, facts, aside) for _ in range(n)]


def coverage_sentences(asides: bool = False) -> list[str]:
    """Every word form of the deep corpus (the toy corpus's included; ``asides``: and of
    :data:`ASIDES`, whose words are in no other sentence)."""
    out = list(datasets.coverage_sentences())
    choices = {**_SLOTS, "A": NAMES, "B": NAMES, "S": NAMES, "IO": NAMES, "X": NAMES, "Y": NAMES,
               "GAP": [""]}
    for template in DEEP_IOI_TEMPLATES + COPY_TEMPLATES:
        out.extend(datasets.coverage_for(template, choices))
    out.append("They said" + "".join(" " + word for word in LIST_WORDS) + ". Then they said.")
    if asides:
        out.extend(f"Tom{aside.format(NAME=name)} gave" for name in NAMES for aside in ASIDES)
    # Documents are joined by spaces, so every sentence also starts after one.
    out.extend([" " + sentence for sentence in out])
    return list(dict.fromkeys(out))
