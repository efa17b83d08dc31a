"""Strict on every input: each class of bad input found by fuzzing raises PatchingInputError
with the field at fault, from every entry point (issue 10, section 3)."""

import math

import numpy as np
import pytest
import torch

import patchwidgets as pw
from patchwidgets.attribution import attribution_patch
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
