"""The synthetic world the bundled ``toy-ioi`` model was trained on.

Everything here is generated from code with seeded random number generators,
so the training corpus and the evaluation sets are reproducible byte for byte.
The corpus has three kinds of sentence:

(a) **Indirect object identification (IOI)** sentences, the task studied by
    Wang et al. (2022), "Interpretability in the Wild"::

        When Mary and John went to the store, John gave a drink to Mary.

    Two names are introduced; one of them (the *subject*, S) is repeated and
    gives something to the other (the *indirect object*, IO). A model that
    predicts the final name must work out which name was *not* repeated.
    The order of the first two names is either ``ABBA`` (IO first: "Mary and
    John ... John gave ... to Mary") or ``BABA`` (S first: "John and Mary ...
    John gave ... to Mary").

(b) **Factual recall** sentences: landmark -> city facts ("The Colosseum is
    in Rome.") in several phrasings, and "house" facts ("The White House is
    where the president lives." / "The Haunted House is where the ghosts
    live.").

(c) **Filler** sentences from a small template grammar ("The lazy fox slept
    near the park.", "Mary visited Rome on Monday."), so that the model is a
    language model over a small world rather than a classifier, and so that
    every name, place and city also occurs outside the two tasks.

What is held out, and why
-------------------------
A word-level model cannot say anything sensible about a word it never saw:
its embedding would be untrained. So nothing is held out at the level of
single words. Instead evaluation uses **combinations** never seen in
training:

* IOI: three held-out templates (:data:`IOI_HELDOUT_TEMPLATES`) whose words
  all occur in training templates but in a new arrangement, and ~15% of the
  unordered name pairs (:func:`heldout_name_pairs`), which never occur
  together in a training IOI sentence (each name still appears in many other
  pairs and in filler text).
* Facts: every fact is trained in the canonical phrasing ("The X is in") and
  all but one of the other phrasings; the test prompt uses the remaining,
  held-out phrasing. Recall therefore has to transfer to a phrasing that was
  never paired with that fact.

Public helpers: :func:`ioi_prompts`, :func:`fact_prompts`,
:func:`training_corpus`, and :func:`coverage_sentences` (used to build the
tokenizer's vocabulary).
"""
from __future__ import annotations

import itertools
import random
import re
import string
from typing import Iterable, Mapping, Sequence

__all__ = [
    "NAMES", "PLACES", "OBJECTS", "FACTS", "HOUSE_FACTS", "CITIES",
    "IOI_TEMPLATES", "IOI_TRAIN_TEMPLATES", "IOI_HELDOUT_TEMPLATES",
    "FACT_PHRASINGS", "HOUSE_PHRASINGS", "FILLER_TEMPLATES", "FILLER_SLOTS",
    "heldout_name_pairs", "ioi_prompts", "fact_prompts", "fact_sentences",
    "training_corpus", "coverage_sentences", "coverage_for",
]

# --------------------------------------------------------------------------
# Word lists
# --------------------------------------------------------------------------

#: 48 first names. With a word-level tokenizer each is a single token.
NAMES: list[str] = [
    "Mary", "John", "Lisa", "Sarah", "Tom", "James", "Anna", "David",
    "Emma", "Paul", "Kate", "Mark", "Laura", "Peter", "Alice", "Daniel",
    "Rachel", "Michael", "Jessica", "Robert", "Linda", "Kevin", "Susan",
    "Brian", "Nancy", "Steven", "Karen", "George", "Helen", "Edward",
    "Amy", "Jason", "Grace", "Ryan", "Emily", "Adam", "Julia", "Eric",
    "Rose", "Sam", "Victoria", "Henry", "Claire", "Oliver", "Lucy",
    "Frank", "Anne", "Jack",
]

#: Places used in "went to the {PLACE}".
PLACES: list[str] = [
    "store", "cinema", "park", "school", "garden", "office", "restaurant",
    "station", "beach", "library", "hospital", "market", "museum", "cafe",
    "bakery", "zoo",
]

#: Things that are given; noun phrases with their article, some multi-word.
OBJECTS: list[str] = [
    "a drink", "a bottle of milk", "the ticket", "a book", "a gift",
    "the keys", "a letter", "a ring", "a basket", "a snack", "the ball",
    "a flower", "a cup of tea", "the bag", "a necklace", "a sandwich",
]

#: (landmark, city) facts. Landmarks never contain their city's name, so the
#: city cannot simply be copied from the prompt.
FACTS: list[tuple[str, str]] = [
    ("Colosseum", "Rome"), ("Eiffel Tower", "Paris"), ("Big Ben", "London"),
    ("Brandenburg Gate", "Berlin"), ("Sagrada Familia", "Barcelona"),
    ("Acropolis", "Athens"), ("Kremlin", "Moscow"), ("Taj Mahal", "Agra"),
    ("Forbidden City", "Beijing"), ("Space Needle", "Seattle"),
    ("Alhambra", "Granada"), ("Hagia Sophia", "Istanbul"),
    ("Burj Khalifa", "Dubai"), ("Atomium", "Brussels"),
    ("Leaning Tower", "Pisa"), ("Rijksmuseum", "Amsterdam"),
    ("Prado", "Madrid"), ("Charles Bridge", "Prague"),
    ("Parthenon", "Athens"), ("Louvre", "Paris"), ("Sistine Chapel", "Rome"),
    ("Hofburg", "Vienna"), ("Little Mermaid", "Copenhagen"),
    ("Blue Mosque", "Istanbul"), ("Tower Bridge", "London"),
    ("CN Tower", "Toronto"), ("Golden Pavilion", "Kyoto"),
    ("Meiji Shrine", "Tokyo"), ("Willis Tower", "Chicago"),
    ("Lincoln Memorial", "Washington"), ("Duomo", "Florence"),
    ("Rialto Bridge", "Venice"), ("Great Pyramid", "Giza"),
    ("Belem Tower", "Lisbon"), ("Wawel Castle", "Krakow"),
    ("Guggenheim", "Bilbao"),
]

#: Every city that occurs in :data:`FACTS`, in first-seen order.
CITIES: list[str] = list(dict.fromkeys(city for _, city in FACTS))

#: (house, who, verb) facts: "The {house} is where the {who} {verb}."
HOUSE_FACTS: list[tuple[str, str, str]] = [
    ("White House", "president", "lives"), ("Haunted House", "ghosts", "live"),
    ("Opera House", "singers", "sing"), ("Tree House", "children", "play"),
    ("Guest House", "guests", "stay"), ("Court House", "judge", "works"),
    ("Farm House", "farmer", "lives"), ("Dog House", "dog", "sleeps"),
    ("Light House", "keeper", "works"),
]

# --------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------
# IOI templates use {A} and {B} for the first two names, {S} for the repeated
# subject, {IO} for the indirect object (always the last word before the
# final "."), {PLACE} and {OBJECT}.

#: Templates used for training IOI sentences (17).
IOI_TRAIN_TEMPLATES: list[str] = [
    "When {A} and {B} went to the {PLACE}, {S} gave {OBJECT} to {IO}.",
    "After {A} and {B} went to the {PLACE}, {S} gave {OBJECT} to {IO}.",
    "When {A} and {B} got to the {PLACE}, {S} handed {OBJECT} to {IO}.",
    "While {A} and {B} were at the {PLACE}, {S} gave {OBJECT} to {IO}.",
    "Then, {A} and {B} went to the {PLACE}. {S} gave {OBJECT} to {IO}.",
    "Then, {A} and {B} had a long day at the {PLACE}. {S} gave {OBJECT} to {IO}.",
    "When {A} and {B} arrived at the {PLACE}, {S} passed {OBJECT} to {IO}.",
    "Afterwards, {A} and {B} went to the {PLACE}. {S} gave {OBJECT} to {IO}.",
    "Friends {A} and {B} found {OBJECT} at the {PLACE}. {S} gave it to {IO}.",
    "After the lunch, {A} and {B} went to the {PLACE}. {S} handed {OBJECT} to {IO}.",
    "When {A} and {B} met at the {PLACE}, {S} showed {OBJECT} to {IO}.",
    "While {A} and {B} were working at the {PLACE}, {S} gave {OBJECT} to {IO}.",
    "Then, {A} and {B} were thinking about going to the {PLACE}. {S} wanted to give {OBJECT} to {IO}.",
    "After {A} and {B} spent the day at the {PLACE}, {S} sent {OBJECT} to {IO}.",
    "Yesterday, {A} and {B} walked to the {PLACE}, and {S} brought {OBJECT} to {IO}.",
    "The {PLACE} was busy when {A} and {B} arrived. {S} handed {OBJECT} to {IO}.",
    "When {A} and {B} left the {PLACE}, {S} offered {OBJECT} to {IO}.",
]

#: Templates used only for evaluation (split="test"). Every word in them also
#: occurs in the training templates; only the combination is new.
IOI_HELDOUT_TEMPLATES: list[str] = [
    "When {A} and {B} were at the {PLACE}, {S} handed {OBJECT} to {IO}.",
    "After {A} and {B} arrived at the {PLACE}, {S} showed {OBJECT} to {IO}.",
    "Yesterday, {A} and {B} went to the {PLACE}. {S} passed {OBJECT} to {IO}.",
]

#: All IOI templates, training ones first.
IOI_TEMPLATES: list[str] = IOI_TRAIN_TEMPLATES + IOI_HELDOUT_TEMPLATES

#: The reference texts' prompts that every bundled model must get right (prompt, expected next token).
REFERENCE_PROMPTS = [
    ("When Mary and John went to the store, John gave a drink to", " Mary"),
    ("When John and Mary went to the store, Mary gave a drink to", " John"),
    ("After John and Mary went to the store, Mary gave a bottle of milk to", " John"),
    ("When Lisa and Sarah went to the cinema, Lisa gave the ticket to", " Sarah"),
    ("The Colosseum is in", " Rome"),
    ("The Eiffel Tower is in", " Paris"),
    ("The White House is where the", " president"),
    ("The Haunted House is where the", " ghosts"),
]

#: Phrasings of a landmark fact. Index 0 is canonical and always trained.
FACT_PHRASINGS: list[str] = [
    "The {L} is in {C}.",
    "The {L} is located in {C}.",
    "The {L} stands in {C}.",
    "The {L} can be found in {C}.",
    "You can visit the {L} in {C}.",
    "Tourists see the {L} in {C}.",
]

#: Phrasings of a house fact. Index 0 is canonical and always trained.
HOUSE_PHRASINGS: list[str] = [
    "The {H} is where the {W} {V}.",
    "The {H} belongs to the {W}.",
    "Inside the {H} you will find the {W}.",
    "The {H} was built for the {W}.",
]

_ANIMALS = ["cat", "dog", "bird", "horse", "rabbit", "fox", "cow", "duck"]
_ADJECTIVES = ["big", "small", "happy", "old", "young", "quiet", "lazy", "clever"]
_MOODS = ["busy", "quiet", "empty", "crowded", "closed", "warm", "cold"]
_ACTIONS = ["slept", "ran", "waited", "sang", "played", "walked", "sat", "danced"]
_TIMES = ["in the morning", "at night", "on Monday", "on Sunday",
          "after lunch", "every day", "in the evening", "last week"]
_FOODS = ["apples", "bread", "soup", "cake", "rice", "cheese", "pizza", "cookies"]

#: Filler grammar: templates whose slots are filled from the lists above.
FILLER_TEMPLATES: list[str] = [
    "{NAME} went to the {PLACE} {TIME}.",
    "The {ADJ} {ANIMAL} {ACTION} near the {PLACE}.",
    "{NAME} likes {FOOD} and {FOOD2}.",
    "{NAME} and {NAME2} played in the {PLACE} {TIME}.",
    "{NAME} found {OBJECT} in the {PLACE}.",
    "The {PLACE} was {MOOD} {TIME}.",
    "It was {MOOD} at the {PLACE} {TIME}.",
    "{NAME} has a {ADJ} {ANIMAL}.",
    "{NAME} lives near the {PLACE}.",
    "The {ANIMAL} ate some {FOOD} {TIME}.",
    "{NAME} visited {CITY} {TIME}.",
    "{NAME} was in {CITY} last week.",
    "Many people visit the {LANDMARK} every year.",
    "{NAME} took a photo of the {LANDMARK}.",
    "{NAME} bought {OBJECT} for {NAME2}.",
    "There is a {ADJ} {ANIMAL} in the {PLACE}.",
    "{NAME} told {NAME2} about the {PLACE}.",
    "{NAME} wanted {FOOD} {TIME}.",
]

FILLER_SLOTS: dict[str, Sequence[str]] = {
    "NAME": NAMES, "NAME2": NAMES, "PLACE": PLACES, "OBJECT": OBJECTS,
    "ANIMAL": _ANIMALS, "ADJ": _ADJECTIVES, "MOOD": _MOODS,
    "ACTION": _ACTIONS, "TIME": _TIMES, "FOOD": _FOODS, "FOOD2": _FOODS,
    "CITY": CITIES, "LANDMARK": [landmark for landmark, _ in FACTS],
}

# Name pairs that must stay in training because the reference prompts (and
# the course) use them with training templates.
_REFERENCE_PAIRS = [("Mary", "John"), ("Lisa", "Sarah")]
_HELDOUT_PAIR_FRACTION = 0.15
_SPLIT_SEED = 20240601  # fixes which pairs / phrasings are held out


def _slots(template: str) -> list[str]:
    """The placeholder names used in ``template``, in order."""
    return [field for _, field, _, _ in string.Formatter().parse(template) if field]


def heldout_name_pairs() -> set[frozenset[str]]:
    """Unordered name pairs that never appear together in training IOI text.

    About 15% of all pairs, chosen with a fixed seed; the reference pairs
    (Mary/John, Lisa/Sarah) are always kept in training.
    """
    rng = random.Random(_SPLIT_SEED)
    pairs = [frozenset(p) for p in itertools.combinations(NAMES, 2)]
    pairs = [p for p in pairs if p not in {frozenset(r) for r in _REFERENCE_PAIRS}]
    return set(rng.sample(pairs, round(_HELDOUT_PAIR_FRACTION * len(pairs))))


def _heldout_phrasing(index: int, n_phrasings: int) -> int:
    """Which phrasing of fact number ``index`` is held out (never index 0)."""
    return 1 + index % (n_phrasings - 1)


# --------------------------------------------------------------------------
# IOI
# --------------------------------------------------------------------------

def _ioi_sentence(template: str, io: str, s: str, order: str,
                  place: str, obj: str, s2: str | None = None) -> str:
    """Render an IOI template. ``s2`` overrides the repeated name (corruption)."""
    a, b = (io, s) if order == "ABBA" else (s, io)
    return template.format(A=a, B=b, S=s if s2 is None else s2, IO=io,
                           PLACE=place, OBJECT=obj)


def _check_ioi_template(template: str) -> None:
    """IOI templates must end with the answer, `` {IO}.``, so prompts can cut it off."""
    if not template.endswith(" {IO}."):
        raise ValueError(f"IOI template must end with ' {{IO}}.': {template!r}")


def _sample_pair(rng: random.Random, split: str, heldout: set[frozenset[str]],
                 heldout_list: Sequence[frozenset[str]] = ()) -> tuple[str, str]:
    """Sample an ordered (io, s) pair from the train or held-out pairs.

    ``heldout_list`` is ``heldout`` in a fixed (sorted) order, needed to
    sample from it reproducibly; only used when ``split == "test"``.
    """
    if split == "test":
        io, s = rng.sample(sorted(rng.choice(heldout_list)), 2)
        return io, s
    while True:
        io, s = rng.sample(NAMES, 2)
        if frozenset((io, s)) not in heldout:
            return io, s


def ioi_prompts(n: int, *, split: str = "test", seed: int = 0,
                templates: Sequence[str] | None = None) -> list[dict]:
    """``n`` IOI prompts with their answers and an S2-flip corruption.

    Each item is a dict::

        {"clean":     "When Mary and John went to the store, John gave a drink to",
         "corrupted": "When Mary and John went to the store, Mary gave a drink to",
         "correct":   " Mary",     # the IO name, with its leading space
         "incorrect": " John",     # the S name
         "template":  "When {A} and {B} went to the {PLACE}, {S} gave {OBJECT} to {IO}.",
         "order":     "ABBA",       # or "BABA"; the two alternate
         "abc":       "When Kate and Tom went to the store, Paul gave a drink to"}

    The corrupted prompt replaces the second mention of S with IO (the
    "S2 flip"), which has the same number of tokens as the clean prompt and
    flips which name is the right answer: on it the model should prefer
    ``incorrect``. The logit difference ``logit(correct) - logit(incorrect)``
    is therefore positive on clean and negative on corrupted prompts.

    ``abc`` is Wang et al.'s *ABC* corruption: the same sentence with three different
    names in the places of IO, S1 and S2, so no name is repeated and nothing says which to
    copy; the usual reference distribution for path patching and mean ablation in IOI.

    Args:
        n: number of prompts.
        split: ``"test"`` (default) uses held-out name pairs, and alternates
            held-out templates with training templates; ``"train"`` uses
            training templates and training pairs (the distribution the
            model was trained on). The templates alternate on the same step
            as the name order, so with ``split="test"`` the held-out templates
            are all ABBA prompts: to compare the orders on unseen templates,
            pass ``templates=IOI_HELDOUT_TEMPLATES``.
        seed: RNG seed; the same arguments always give the same prompts.
        templates: optionally restrict to these templates (strings from
            :data:`IOI_TEMPLATES`), e.g. to get prompts of equal length.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"ioi-{split}-{seed}")
    abc_rng = random.Random(f"ioi-abc-{split}-{seed}")
    heldout = heldout_name_pairs()
    heldout_list = sorted(heldout, key=sorted)
    items = []
    for i in range(n):
        if templates is not None:
            template = templates[i % len(templates)]
        elif split == "train":
            template = rng.choice(IOI_TRAIN_TEMPLATES)
        else:
            pool = IOI_HELDOUT_TEMPLATES if i % 2 == 0 else IOI_TRAIN_TEMPLATES
            template = rng.choice(pool)
        order = "ABBA" if i % 2 == 0 else "BABA"
        io, s = _sample_pair(rng, split, heldout, heldout_list)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        answer = f" {io}."
        _check_ioi_template(template)
        clean = _ioi_sentence(template, io, s, order, place, obj)[: -len(answer)]
        corrupted = _ioi_sentence(template, io, s, order, place, obj, s2=io)[: -len(answer)]
        # ABC: the same sentence with IO, S1 and S2 three different names (Wang et al.'s
        # p_ABC). Its own RNG, so that adding it changed none of the prompts above.
        x, y, z = abc_rng.sample(NAMES, 3)
        abc = template.format(A=x, B=y, S=z, IO=io, PLACE=place, OBJECT=obj)[: -len(answer)]
        items.append({"clean": clean, "corrupted": corrupted,
                      "correct": " " + io, "incorrect": " " + s,
                      "template": template, "order": order, "abc": abc})
    return items


# --------------------------------------------------------------------------
# Facts
# --------------------------------------------------------------------------

def _fact_items() -> list[dict]:
    """Every (fact, phrasing) combination, tagged with its split."""
    items = []
    for i, (landmark, city) in enumerate(FACTS):
        held = _heldout_phrasing(i, len(FACT_PHRASINGS))
        for j, phrasing in enumerate(FACT_PHRASINGS):
            sentence = phrasing.format(L=landmark, C=city)
            items.append({"sentence": sentence,
                          "prompt": sentence[: -len(f" {city}.")],
                          "answer": " " + city, "subject": landmark,
                          "kind": "location", "template": phrasing,
                          "split": "test" if j == held else "train"})
    for i, (house, who, verb) in enumerate(HOUSE_FACTS):
        held = _heldout_phrasing(i, len(HOUSE_PHRASINGS))
        for j, phrasing in enumerate(HOUSE_PHRASINGS):
            sentence = phrasing.format(H=house, W=who, V=verb)
            prompt = phrasing.split("{W}")[0].format(H=house).rstrip(" ")
            items.append({"sentence": sentence, "prompt": prompt,
                          "answer": " " + who, "subject": house,
                          "kind": "house", "template": phrasing,
                          "split": "test" if j == held else "train"})
    return items


def fact_sentences(split: str = "train") -> list[str]:
    """Whole fact sentences ("The Colosseum is in Rome.") of one split."""
    return [item["sentence"] for item in _fact_items() if item["split"] == split]


def fact_prompts(split: str = "test") -> list[dict]:
    """Factual-recall prompts: ``{"prompt": "The Colosseum is in", "answer": " Rome"}``.

    Each dict also carries ``"subject"`` (the landmark or house),
    ``"kind"`` (``"location"`` or ``"house"``) and ``"template"`` (the
    phrasing). ``split="test"`` gives one prompt per fact in the phrasing
    held out of training for that fact; ``split="train"`` gives every
    trained (fact, phrasing) prompt, including the canonical
    "The X is in" / "The X is where the" ones; ``split="all"`` gives both.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    keys = ("prompt", "answer", "subject", "kind", "template")
    return [{k: item[k] for k in keys} for item in _fact_items()
            if split == "all" or item["split"] == split]


# --------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------

def _filler_sentence(rng: random.Random) -> str:
    template = rng.choice(FILLER_TEMPLATES)
    values = {slot: rng.choice(FILLER_SLOTS[slot]) for slot in _slots(template)}
    while "NAME2" in values and values["NAME2"] == values["NAME"]:
        values["NAME2"] = rng.choice(NAMES)
    return template.format(**values)


def training_corpus(n_sentences: int, seed: int = 0) -> list[str]:
    """``n_sentences`` training sentences, shuffled, one sentence per string.

    The mix is about 55% IOI (training templates and pairs only, ABBA and
    BABA equally), 20% facts (trained phrasings only) and 25% filler.
    """
    rng = random.Random(f"corpus-{seed}")
    heldout = heldout_name_pairs()
    facts = [item["sentence"] for item in _fact_items() if item["split"] == "train"]
    sentences = []
    for _ in range(n_sentences):
        u = rng.random()
        if u < 0.55:
            io, s = _sample_pair(rng, "train", heldout)
            sentences.append(_ioi_sentence(
                rng.choice(IOI_TRAIN_TEMPLATES), io, s, rng.choice(["ABBA", "BABA"]),
                rng.choice(PLACES), rng.choice(OBJECTS)))
        elif u < 0.75:
            sentences.append(rng.choice(facts))
        else:
            sentences.append(_filler_sentence(rng))
    return sentences


def coverage_for(template: str, choices: Mapping[str, Sequence[str]]) -> Iterable[str]:
    """Render ``template`` so each slot takes each of its values at least once."""
    slots = _slots(template)
    base = {slot: choices[slot][0] for slot in slots}
    yield template.format(**base)
    for slot in dict.fromkeys(slots):
        for value in choices[slot]:
            yield template.format(**{**base, slot: value})


def coverage_sentences() -> list[str]:
    """Sentences in which every word occurs in every context it can occur in.

    The tokenizer's vocabulary is built from these: each template is
    rendered once per value of each slot, for IOI (training *and* held-out
    templates), fact and filler templates. Because the vocabulary is
    word-level with GPT-2-style leading spaces, the *context* matters:
    a name at the start of a sentence is the token ``"Mary"`` while after a
    space it is ``" Mary"``; this enumeration finds exactly the forms that
    occur.
    """
    out: list[str] = []
    ioi_choices = {"A": NAMES, "B": NAMES, "S": NAMES, "IO": NAMES,
                   "PLACE": PLACES, "OBJECT": OBJECTS}
    for template in IOI_TEMPLATES:
        out.extend(coverage_for(template, ioi_choices))
    out.extend(item["sentence"] for item in _fact_items())
    for template in FILLER_TEMPLATES:
        out.extend(coverage_for(template, FILLER_SLOTS))
    return list(dict.fromkeys(out))


def _check() -> None:
    """Internal consistency checks (cheap; run by the tests)."""
    assert len(set(NAMES)) == len(NAMES) >= 40
    assert len(IOI_TRAIN_TEMPLATES) >= 15 and len(FACTS) >= 30
    assert not set(IOI_TRAIN_TEMPLATES) & set(IOI_HELDOUT_TEMPLATES)
    for name in NAMES:
        assert re.fullmatch(r"[A-Za-z]+", name), name
