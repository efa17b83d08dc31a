"""Strict on every input: each class of bad input found by fuzzing raises PatchingInputError
with the field at fault, from every entry point (issue 10, section 3)."""

import math

import numpy as np
import pytest
import torch

import patchwidgets as pw
from patchwidgets.attribution import attribution_patch
from patchwidgets.inputs import tokenize
from patchwidgets.path_patching import path_patch

CLEAN = "When John and Mary went to the store, Mary gave a drink to"
CORRUPTED = "When John and Mary went to the store, John gave a drink to"
ANSWERS = (" John", " Mary")
TOKENS = dict(clean=torch.tensor([[0, 5, 7]]), corrupted=torch.tensor([[0, 6, 7]]), answers=(1, 2))
NOISE = dict(corrupted=None, ablation="noise")

# (reproducer, arguments replacing the valid call's, the field that must be blamed). toy-ioi has
# 4 layers of 8 heads, 512 MLP neurons, 366 tokens; the prompts are 15 tokens long.
SHARED = [  # accepted by patch, path_patch and attribution_patch alike
    ("layer past the end", dict(layers=[4]), "site"),
    ("negative layer", dict(layers=[-1]), "site"),
    ("head past the end", dict(heads=[8]), "site"),
    ("negative head", dict(heads=[-1]), "site"),
    ("empty layers", dict(layers=[]), "site"),
    ("float layer", dict(layers=[1.5]), "site"),
    ("bool layer", dict(layers=[True]), "site"),
    ("string layers", dict(layers="1"), "site"),
    ("bare int layers", dict(layers=1), "site"),
    ("metrics None", dict(metrics=None), "metrics"),
    ("metrics int", dict(metrics=3), "metrics"),
    ("float answer", dict(answers=(1.5, " Mary")), "answers"),
    ("dict answers", dict(answers={"correct": " John"}), "answers"),
    ("bool answers", dict(answers=(True, False)), "answers"),
    ("identical answers", dict(answers=(" John", " John")), "answers"),
    ("token id past the vocabulary", dict(TOKENS, clean=torch.tensor([[0, 5, 400]])), "clean"),
    ("negative token id", dict(TOKENS, corrupted=torch.tensor([[0, 6, -1]])), "corrupted"),
    ("bool tokens", dict(TOKENS, clean=torch.tensor([[0, 1, 1]], dtype=torch.bool)), "clean"),
    ("float tokens", dict(TOKENS, clean=torch.tensor([[0.0, 5.0, 7.0]])), "clean"),
    ("3-D tokens", dict(TOKENS, clean=torch.tensor([[[0, 5, 7]]]), corrupted=torch.tensor([[[0, 6, 7]]])), "clean"),
    ("empty direction", dict(direction=""), "direction"),
    ("noise as text", dict(NOISE, noise="3"), "noise"),
    ("negative noise", dict(NOISE, noise=-3.0), "noise"),
    ("nan noise", dict(NOISE, noise=float("nan")), "noise"),
    ("infinite noise", dict(NOISE, noise=math.inf), "noise"),
    ("noise position past the prompt", dict(NOISE, noise_positions=[99]), "noise"),
    ("negative noise position", dict(NOISE, noise_positions=[-1]), "noise"),
    ("noise positions without noise", dict(noise_positions=[2]), "noise"),
    ("literal [UNK]", dict(clean="When John and [UNK] went to the store, Mary gave a drink to"), "clean"),
]
PATCH_ONLY = [  # restrictions path and attribution patching have no axis for, or sites they refuse
    ("neuron past the end", dict(site="neuron", neurons=[512]), "site"),
    ("negative neuron", dict(site="neuron", neurons=[-1]), "site"),
    ("empty positions", dict(positions=[]), "site"),
    ("position past the prompt", dict(positions=[15]), "site"),
    ("heads past the end, on a site without heads", dict(site="resid_pre", heads=[8]), "site"),
    ("index past the activation", dict(site="blocks.0.hook_resid_pre", index=[(30,)]), "site"),
    ("negative index", dict(site="blocks.0.hook_resid_pre", index=[(-1,)]), "site"),
    ("float index", dict(site="blocks.0.hook_resid_pre", index=[(1.0,)]), "site"),
    ("index with too many axes", dict(site="blocks.0.hook_resid_pre", index=[(1, 2, 3)]), "site"),
    ("index on a named site", dict(site="resid_pre", index=[(0, 1)]), "site"),
]


def _call(fn, model, changes):
    args = dict(clean=CLEAN, corrupted=CORRUPTED, answers=ANSWERS, metrics="logit_diff")
    if fn is not path_patch:
        args.update(site="head_out")
    args.update(changes)
    if fn is path_patch:
        args.pop("site", None)
    extra = {} if fn is attribution_patch else {"progress": False}
    return fn(model, args.pop("clean"), args.pop("corrupted"), **args, **extra)


@pytest.mark.parametrize("fn", [pw.patch, path_patch, attribution_patch], ids=["patch", "path", "attribution"])
@pytest.mark.parametrize("name,changes,field", SHARED, ids=[c[0] for c in SHARED])
def test_bad_input_names_its_field(toy_model, fn, name, changes, field):
    with pytest.raises(pw.PatchingInputError) as info:
        _call(fn, toy_model, changes)
    assert info.value.field == field, str(info.value)


@pytest.mark.parametrize("fn", [pw.patch, attribution_patch], ids=["patch", "attribution"])
@pytest.mark.parametrize("name,changes,field", PATCH_ONLY, ids=[c[0] for c in PATCH_ONLY])
def test_bad_restriction_names_its_field(toy_model, fn, name, changes, field):
    with pytest.raises(pw.PatchingInputError) as info:
        _call(fn, toy_model, changes)
    assert info.value.field == field, str(info.value)


@pytest.mark.parametrize("word,text", [("Jöhn", "When Jöhn and Mary went to the store, Mary gave a drink to"),
                                       ("Ma\u0301ry", "When John and Ma\u0301ry went to the store, Mary gave a drink to")])
def test_unknown_non_ascii_word_is_named_whole(toy_model, word, text):
    with pytest.raises(pw.UnknownWordError) as info:
        pw.patch(toy_model, text, CORRUPTED, answers=ANSWERS)
    assert info.value.word == word and info.value.field == "clean"
    assert f"{word!r} is not in the toy-ioi vocabulary" in str(info.value)


def test_integer_kinds_are_accepted_alike(toy_model):
    """NumPy ints and narrow integer token dtypes are integers: the same sweep as Python ints."""
    reference = pw.patch(toy_model, **TOKENS, site="head_out", layers=[1], heads=[2, 3], progress=False)
    same = [
        pw.patch(toy_model, TOKENS["clean"].to(torch.uint8), TOKENS["corrupted"].to(torch.int16),
                 answers=(np.int64(1), np.int32(2)), site="head_out", layers=np.array([1]),
                 heads=torch.tensor([2, 3]), progress=False),
        pw.patch(toy_model, TOKENS["clean"][0], TOKENS["corrupted"][0], answers=torch.tensor([1, 2]),
                 site="head_out", layers=(1,), heads=range(2, 4), progress=False),
    ]
    for result in same:
        for metric in reference.metrics:
            torch.testing.assert_close(result.grid(metric), reference.grid(metric), rtol=0, atol=0)


# ------------------------------------------------------------------------ empty inputs (issue 18)
# Every class of empty input, in each prompt field (and with an ablation), from every entry point:
# PatchingInputError naming the field, raised before anything is tokenised or reshaped. (A [1, 0]
# token tensor used to reach torch's reshape: "RuntimeError: cannot reshape tensor of 0 elements".)
CLEAN_2 = "When Tom and Kate went to the store, Kate gave a drink to"
CORRUPTED_2 = "When Tom and Kate went to the store, Tom gave a drink to"
TEXT = dict(clean=CLEAN, corrupted=CORRUPTED, answers=ANSWERS)
DATASET = dict(clean=[CLEAN, CLEAN_2], corrupted=[CORRUPTED, CORRUPTED_2], answers=[ANSWERS, (" Tom", " Kate")])
VALID_CALLS = {"tokens": TOKENS, "text": TEXT, "dataset": DATASET}
EMPTY_PROMPTS = [  # (class of empty input, the valid call it goes into, the empty value: in a dataset, its row 1)
    ("tokens [1, 0] (no positions)", "tokens", torch.zeros((1, 0), dtype=torch.long)),
    ("tokens [0, 3] (no rows)", "tokens", torch.zeros((0, 3), dtype=torch.long)),
    ("tokens [0, 0]", "tokens", torch.zeros((0, 0), dtype=torch.long)),
    ("1-D tokens [0]", "tokens", torch.zeros(0, dtype=torch.int32)),
    ("NumPy tokens [1, 0]", "tokens", np.zeros((1, 0), dtype=np.int64)),
    ("empty string", "text", ""),
    ("whitespace only", "text", " \t\n"),
    ("empty list", "text", []),
    ("empty tuple", "text", ()),
    ("empty string in a dataset", "dataset", ""),
    ("whitespace in a dataset", "dataset", "  "),
    ("empty list in a dataset", "dataset", []),
]
EMPTY_ANSWERS = [  # (class of empty answers, the valid call they go into, the answers)
    ("empty correct answer", "text", ("", " Mary")),
    ("empty incorrect answer", "text", (" John", "")),
    ("one empty answer", "text", ""),
    ("empty list", "text", []),
    ("empty tuple", "text", ()),
    ("empty tensor", "tokens", torch.zeros(0, dtype=torch.long)),
    ("empty pair in a dataset", "dataset", [ANSWERS, ()]),
    ("empty list pair in a dataset", "dataset", [ANSWERS, []]),
    ("empty answer in a dataset", "dataset", [ANSWERS, (" Tom", "")]),
]
ENTRY_POINTS = ["patch", "path_patch", "attribution_patch", "nnsight patch", "nnsight attribution_patch"]
PROMPT_FIELDS = ["clean", "corrupted", "clean, noise ablation"]


@pytest.fixture(scope="module")
def toy_nnsight():
    """The bundled toy-ioi checkpoint as an nnsight model (as in test_nnsight.py)."""
    nnsight = pytest.importorskip("nnsight")
    from patchwidgets.loading import model_path

    return nnsight.TransformersModel(str(model_path("toy-ioi")), task="text-generation", dispatch=True)


def _entry_call(request, entry, call, **kw):
    """``entry`` (a name from ENTRY_POINTS) on the toy model with the prompts and answers of ``call``."""
    model = request.getfixturevalue("toy_nnsight" if entry.startswith("nnsight") else "toy_model")
    fn = {"patch": pw.patch, "path_patch": path_patch, "attribution_patch": attribution_patch}[entry.split()[-1]]
    call = dict(call, metrics="logit_diff", **kw)
    if fn is not path_patch:
        call.setdefault("site", "head_out")
    if fn is not attribution_patch:
        call["progress"] = False
    return fn(model, call.pop("clean"), call.pop("corrupted"), **call)


def _with_empty(kind, field, value):
    """The valid call ``kind`` with ``value`` in ``field`` (``"clean, noise ablation"``: in clean,
    with no corrupted prompt and a noise ablation); in a dataset, as its row 1."""
    call = dict(VALID_CALLS[kind])
    if field.endswith("ablation"):
        field = "clean"
        call.update(corrupted=None, ablation="noise")
    call[field] = [call[field][0], value] if kind == "dataset" else value
    return call, field


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("kind", list(VALID_CALLS))
def test_empty_input_reproducers_start_from_valid_calls(request, entry, kind):
    """Each valid call the empty inputs go into runs, so each refusal below is the empty input's."""
    result = _entry_call(request, entry, VALID_CALLS[kind], layers=[0])
    assert torch.isfinite(result.values["logit_diff"]).all()


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("field", PROMPT_FIELDS)
@pytest.mark.parametrize("name,kind,value", EMPTY_PROMPTS, ids=[c[0] for c in EMPTY_PROMPTS])
def test_empty_prompt_names_its_field(request, entry, field, name, kind, value):
    call, blamed = _with_empty(kind, field, value)
    with pytest.raises(pw.EmptyPromptError) as info:
        _entry_call(request, entry, call)
    assert info.value.field == blamed, str(info.value)
    message = str(info.value)
    assert "empty" in message or "no prompts" in message, message
    if kind == "dataset":  # which prompt of the dataset, and what to do about it
        assert f"{blamed}[1] (prompt 2 of 2)" in message and "leave this pair out" in message, message


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("name,kind,answers", EMPTY_ANSWERS, ids=[c[0] for c in EMPTY_ANSWERS])
def test_empty_answers_name_their_field(request, entry, name, kind, answers):
    with pytest.raises(pw.AnswerTokenError) as info:
        _entry_call(request, entry, dict(VALID_CALLS[kind], answers=answers))
    assert info.value.field == "answers" and "is empty" in str(info.value), str(info.value)
    if kind == "dataset":
        assert "answers[1] (pair 2 of 2)" in str(info.value), str(info.value)


@pytest.mark.parametrize("field", ["clean", "corrupted"])
@pytest.mark.parametrize("name,kind,value", [c for c in EMPTY_PROMPTS if c[1] != "tokens"],
                         ids=[c[0] for c in EMPTY_PROMPTS if c[1] != "tokens"])
def test_empty_prompts_are_refused_before_tokenising(toy_model, monkeypatch, field, name, kind, value):
    calls = []
    to_tokens = toy_model.to_tokens
    monkeypatch.setattr(toy_model, "to_tokens", lambda *a, **k: calls.append(a) or to_tokens(*a, **k))
    call, _ = _with_empty(kind, field, value)
    with pytest.raises(pw.EmptyPromptError):
        pw.patch(toy_model, call.pop("clean"), call.pop("corrupted"), **call, progress=False)
    assert calls == [], "no prompt is tokenised once one of them is empty"


def test_one_numpy_answer_is_not_taken_for_empty_answers(toy_model):
    """The emptiness checks compare lists, not values: a NumPy integer alone (whose ``== []`` is an
    empty array) is one answer, as a Python int is."""
    kw = dict(TOKENS, metrics="logprob", site="resid_pre", layers=[0], progress=False)
    reference = pw.patch(toy_model, **dict(kw, answers=1))
    result = pw.patch(toy_model, **dict(kw, answers=np.int64(1)))
    torch.testing.assert_close(result.grid("logprob"), reference.grid("logprob"), rtol=0, atol=0)


def test_a_text_with_no_tokens_is_an_empty_prompt(toy_model):
    """A model that prepends no BOS, and a text its tokenizer keeps nothing of: the prompt has
    no tokens (its answer position would be -1)."""
    class NoBos:  # toy-ioi without its BOS token
        tokenizer = toy_model.tokenizer

        def to_tokens(self, text, truncate=True):
            return toy_model.to_tokens(text, prepend_bos=False)

    assert NoBos().to_tokens("").shape == (1, 0)
    with pytest.raises(pw.EmptyPromptError) as info:
        tokenize(NoBos(), [""], "corrupted")
    assert info.value.field == "corrupted" and "has no tokens" in str(info.value)


# ------------------------------------------------------------------------ empty inputs in the widget
@pytest.fixture
def widget(toy_model):
    from patchwidgets.widget import PatchingWidget

    w = PatchingWidget(toy_model)
    yield w
    w.close()


@pytest.mark.parametrize("field", ["clean", "corrupted"])
@pytest.mark.parametrize("typed", ["", "   ", "\t\n"])
def test_widget_empty_prompt_typed_on_the_page(widget, field, typed):
    """The page's one empty-prompt message, before Run and after it."""
    from patchwidgets.widget_preview import empty_prompt_message

    widget.set_state({field: typed})  # as the page sends an edit
    widget.wait()
    assert widget.errors[field] == empty_prompt_message(field)
    widget._handle_custom_msg({"type": "run"}, [])  # the Run button
    widget.wait(60)
    assert widget.status == "error" and widget.errors[field] == empty_prompt_message(field)


GOOD_ROW = (CLEAN, CORRUPTED, " John", " Mary")
BAD_ROWS = [  # (what is empty, the row, the field blamed, words of the message)
    ("clean prompt", ("", CORRUPTED, " John", " Mary"), "clean", "clean prompt of dataset[1] (pair 2 of 2) is empty"),
    ("whitespace corrupted prompt", (CLEAN, " \n", " John", " Mary"), "corrupted", "only whitespace"),
    ("corrupted prompt as []", (CLEAN, [], " John", " Mary"), "corrupted", "is an empty list"),
    ("correct answer", (CLEAN, CORRUPTED, "", " Mary"), "answers", "correct answer of dataset[1] (pair 2 of 2)"),
    ("incorrect answer as []", (CLEAN, CORRUPTED, " John", []), "answers", "incorrect answer of dataset[1]"),
]


@pytest.mark.parametrize("name,row,field,words", BAD_ROWS, ids=[r[0] for r in BAD_ROWS])
def test_widget_dataset_with_an_empty_row_is_refused_from_code(toy_model, widget, name, row, field, words):
    from patchwidgets.widget import PatchingWidget

    with pytest.raises(pw.PatchingInputError) as info:
        PatchingWidget(toy_model, dataset=[GOOD_ROW, row])
    assert info.value.field == field and words in str(info.value), str(info.value)
    widget.dataset = [list(GOOD_ROW)]
    with pytest.raises(pw.PatchingInputError) as info:
        widget.dataset = [list(GOOD_ROW), list(row)]
    assert info.value.field == field and words in str(info.value), str(info.value)
    assert widget.dataset == [list(GOOD_ROW)], "the refused rows are not kept"


def test_widget_dataset_row_emptied_on_the_page_is_refused_at_run(widget):
    """The page's edit is taken (refusing it would put the page and Python out of step); its Run
    is refused, naming the row."""
    widget.set_state({"dataset": [list(GOOD_ROW), ["", CORRUPTED, " John", " Mary"]]})
    assert widget.dataset[1][0] == ""
    assert widget.run(wait=True) is None and widget.status == "error"
    assert "clean[1] (prompt 2 of 2) is empty" in widget.errors["clean"], widget.errors


def test_widget_dataset_row_in_a_run_message_is_taken_as_typed(widget):
    """The same edit arriving with the Run click (a state update the page's widget manager
    still holds back) is applied as the state update would be: taken, and the Run refused."""
    widget._handle_custom_msg({"type": "run", "state": {
        "dataset": [list(GOOD_ROW), ["", CORRUPTED, " John", " Mary"]]}}, [])
    assert widget.wait(60) and widget.dataset[1][0] == ""
    assert widget.status == "error" and "clean[1] (prompt 2 of 2) is empty" in widget.errors["clean"], widget.errors


# ------------------------------------------------------------------------ normalisation
def _logit_diffs(model, prompts, answers):
    """Per-prompt logit differences from plain forward passes (independent of the sweep)."""
    with torch.no_grad():
        final = model(model.to_tokens(prompts))[:, -1]
    ids = [[model.to_single_token(a) for a in pair] for pair in answers]
    return torch.tensor([float(final[i, c] - final[i, x]) for i, (c, x) in enumerate(ids)])


def test_a_corruption_that_barely_moves_the_answer_cannot_be_normalised(toy_model):
    park = CLEAN.replace("store", "park")
    gap = float(_logit_diffs(toy_model, [CLEAN], [ANSWERS]) - _logit_diffs(toy_model, [park], [ANSWERS]))
    assert 0 < abs(gap) < 0.1  # the answer barely moves: ~0.05 of a logit difference of ~7.9
    with pytest.raises(pw.DegenerateNormalizationError) as info:
        pw.patch(toy_model, CLEAN, park, answers=ANSWERS, progress=False)
    assert info.value.field == "corrupted"
    assert "barely changes" in str(info.value) and f"Per-pair gaps: [{gap:+.3g}]" in str(info.value)
    # The same corruption measured without normalising is fine, in both tools that normalise.
    assert pw.patch(toy_model, CLEAN, park, answers=ANSWERS, metrics="logit_diff", layers=[0],
                    progress=False).complete


def test_per_pair_gaps_that_cancel_cannot_be_normalised(toy_model):
    # The second pair asks for the answers the other way round: gaps +g and -g average to 0.
    clean, corrupted = [CLEAN, CLEAN], [CORRUPTED, CORRUPTED]
    answers = [ANSWERS, ANSWERS[::-1]]
    gaps = _logit_diffs(toy_model, clean, answers) - _logit_diffs(toy_model, corrupted, answers)
    assert gaps[0] > 10 and gaps[1] < -10
    for fn in (pw.patch, path_patch, attribution_patch):
        with pytest.raises(pw.DegenerateNormalizationError) as info:
            fn(toy_model, clean, corrupted, answers=answers, metrics="normalized")
        assert "opposite signs" in str(info.value)
        assert f"[{gaps[0]:+.3g}, {gaps[1]:+.3g}]" in str(info.value) and "pairs [1]" in str(info.value)
    # Answers the right way round: the same prompts normalise.
    assert pw.patch(toy_model, clean, corrupted, answers=[ANSWERS, ANSWERS], layers=[0], progress=False).complete


def test_noising_reports_gaps_clean_minus_corrupted(toy_model):
    park = CLEAN.replace("store", "park")
    with pytest.raises(pw.DegenerateNormalizationError) as denoising:
        pw.patch(toy_model, CLEAN, park, answers=ANSWERS, progress=False)
    with pytest.raises(pw.DegenerateNormalizationError) as noising:
        pw.patch(toy_model, CLEAN, park, answers=ANSWERS, direction="noising", progress=False)
    assert str(denoising.value) == str(noising.value)
