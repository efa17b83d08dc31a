"""Bad input gets a clear error, never a wrong heatmap."""

import pytest
import torch

import patchwidgets as pw

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
ANSWERS = (" Mary", " John")


def test_different_token_lengths_names_both(toy_model):
    with pytest.raises(pw.TokenLengthMismatchError) as info:
        pw.patch(toy_model, CLEAN, "When Mary and John went to the big store, Mary gave a drink to", answers=ANSWERS)
    msg = str(info.value)
    assert "15 tokens" in msg and "16 tokens" in msg and "' big'" in msg and "same number of tokens" in msg
    assert info.value.field == "corrupted"


def test_multi_token_answer(toy_model):
    with pytest.raises(pw.AnswerTokenError) as info:
        pw.patch(toy_model, CLEAN, CORRUPTED, answers=(" Mary and", " John"))
    assert "2 tokens" in str(info.value) and info.value.field == "answers"
    with pytest.raises(pw.AnswerTokenError) as info:
        pw.patch(toy_model, CLEAN, CORRUPTED, answers=(" Mary", 10**9))
    assert "outside the vocabulary" in str(info.value)


def test_unknown_word_names_the_word(toy_model):
    with pytest.raises(ValueError) as info:
        pw.patch(toy_model, "When Mary and Zorblax went to the store, Zorblax gave a drink to", CORRUPTED,
                 answers=ANSWERS)
    assert "Zorblax" in str(info.value)
    assert isinstance(info.value, pw.PatchingInputError) and info.value.field == "clean"


@pytest.mark.parametrize("clean,corrupted,field", [("", CORRUPTED, "clean"), ("   ", CORRUPTED, "clean"),
                                                   (CLEAN, "", "corrupted"), ([], [], "clean")])
def test_empty_prompts(toy_model, clean, corrupted, field):
    with pytest.raises(pw.EmptyPromptError) as info:
        pw.patch(toy_model, clean, corrupted, answers=ANSWERS)
    assert info.value.field == field


def test_prompt_longer_than_context(random_gpt2):
    tokens = torch.randint(0, 64, (1, random_gpt2.cfg.n_ctx + 5))
    corrupted = tokens.clone()
    corrupted[0, 3] = (corrupted[0, 3] + 1) % 64
    with pytest.raises(pw.PromptTooLongError) as info:
        pw.patch(random_gpt2, tokens, corrupted, answers=(1, 2))
    assert "context window is 32 tokens" in str(info.value)


def test_identical_prompts(toy_model):
    with pytest.raises(pw.IdenticalPromptsError):
        pw.patch(toy_model, CLEAN, CLEAN, answers=ANSWERS)


def test_identical_answers_blame_the_answers(random_gpt2):
    """The same token as correct and incorrect answer: the answers are at fault, not the prompt
    (the zero gap it leaves used to surface as a normalisation error blaming 'corrupted')."""
    tokens = torch.randint(0, 64, (1, 6))
    corrupted = tokens.clone()
    corrupted[0, 2] = (corrupted[0, 2] + 1) % 64
    for metrics in ("normalized", "logit_diff"):
        with pytest.raises(pw.PatchingInputError) as info:
            pw.patch(random_gpt2, tokens, corrupted, answers=(3, 3), metrics=metrics)
        assert info.value.field == "answers" and "same token" in str(info.value)


def test_unknown_site_lists_valid_ones(random_gpt2):
    with pytest.raises(pw.UnknownSiteError) as info:
        pw.patch(random_gpt2, torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long),
                 answers=(1, 2), site="resid_middle")
    msg = str(info.value)
    assert "resid_middle" in msg and "resid_pre" in msg and "head_pattern" in msg


def test_unknown_metric_and_direction(random_gpt2):
    args = (random_gpt2, torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(pw.UnknownMetricError) as info:
        pw.patch(*args, answers=(1, 2), metrics=["logit_dif"])
    assert "logit_diff" in str(info.value)
    with pytest.raises(pw.PatchingInputError) as info:
        pw.patch(*args, answers=(1, 2), direction="sideways")
    assert info.value.field == "direction"
    with pytest.raises(pw.PatchingInputError):
        pw.patch(*args, answers=1, metrics="logit_diff")  # logit_diff needs an incorrect answer


def test_position_out_of_range(random_gpt2):
    with pytest.raises(pw.PatchingInputError):
        pw.patch(random_gpt2, torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long),
                 answers=(1, 2), positions=[7])
