"""Property-based test of the input contract (issue 10, section 3).

Hypothesis generates whole calls of ``patch``, ``path_patch`` and ``attribution_patch`` on the
bundled toy-ioi model: a *valid* call (prompts as text, a dataset or token ids; answers; a
site; restrictions; direction, metrics, ablation and noise options), and then, in most
then each *fault* that applies to it injected on its own, drawn from the ways users break
calls. The generator knows which field a fault is in, independently of the code under test, so:

* the valid call either returns only finite values or raises ``PatchingInputError`` (some
  valid combinations are refused by design: ``normalized`` with a zero ablation, a discrete
  metric in attribution patching, a mean over one prompt);
* the faulty call raises ``PatchingInputError`` blaming the fault's field, or, when an
  earlier check already refuses the valid call, the same field that call blames;
* neither raises anything else (``KeyError``, ``IndexError``, ``RuntimeError``, ...).
"""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import patchwidgets as pw
from patchwidgets.attribution import attribution_patch
from patchwidgets.path_patching import path_patch

N_LAYERS, N_HEADS, D_MLP, VOCAB = 4, 8, 512, 366   # toy-ioi
NAMES = [" John", " Mary", " Tom", " Kate", " Paul", " Emma"]
TEMPLATE = "When{a} and{b} went to the store,{s} gave a drink to"  # 15 tokens with BOS
TOOLS = {"patch": pw.patch, "path": path_patch, "attribution": attribution_patch}
SITES = ["resid_pre", "attn_out", "mlp_out", "head_out", "head_v", "head_pattern", "head_q_by_pos",
         "head_pattern_by_pos", "neuron", "neuron_by_pos", "block", "blocks.1.hook_resid_pre"]


def _prompt(a, b, s):
    return TEMPLATE.format(a=a, b=b, s=s)


@st.composite
def valid_calls(draw):
    """``(tool, kwargs)`` of a call whose every argument is valid on its own."""
    tool = draw(st.sampled_from(list(TOOLS)))
    a, b = draw(st.lists(st.sampled_from(NAMES), min_size=2, max_size=2, unique=True))
    kind = draw(st.sampled_from(["text", "dataset", "tokens"]))
    if kind == "text":
        call = dict(clean=_prompt(a, b, b), corrupted=_prompt(a, b, a), answers=(a, b))
    elif kind == "dataset":
        call = dict(clean=[_prompt(a, b, b), _prompt(b, a, a)], corrupted=[_prompt(a, b, a), _prompt(b, a, b)],
                    answers=[(a, b), (b, a)])
    else:
        clean = torch.tensor([draw(st.lists(st.integers(2, VOCAB - 1), min_size=6, max_size=6))])
        corrupted = clean.clone()
        corrupted[0, 3] = (clean[0, 3] - 1) % (VOCAB - 2) + 2  # differs at position 3 only
        call = dict(clean=clean, corrupted=corrupted,
                    answers=tuple(draw(st.lists(st.integers(2, VOCAB - 1), min_size=2, max_size=2, unique=True))))
    seq_len = 6 if kind == "tokens" else 15
    if tool != "path":
        call["site"] = draw(st.sampled_from(SITES))
        if call["site"].startswith("blocks."):
            call["index"] = draw(st.sampled_from([[(3,)], [(0,), (5,)], [(3, 5)], [(slice(None),)]]))
    sizes = {"layers": N_LAYERS, "heads": N_HEADS}
    if tool != "path":
        sizes.update(positions=seq_len, neurons=D_MLP)
    for name, size in sizes.items():
        if draw(st.booleans()) or name == "layers":  # (restricting layers keeps the sweeps quick)
            call[name] = draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=2))
    call["direction"] = draw(st.sampled_from([None, "denoising", "noising"]))
    call["metrics"] = draw(st.sampled_from([("logit_diff", "normalized"), "logit_diff", ["prob", "kl", "logit"],
                                            ["rank", "accuracy"], {"ld": "logit_diff", "p": "prob"}]))
    ablation = draw(st.sampled_from([None, None, "zero", "mean", "noise"]))
    if ablation:
        call.update(ablation=ablation, corrupted=None)
        if ablation != "noise":
            call["direction"] = draw(st.sampled_from([None, "noising"]))
        else:
            call["noise"] = draw(st.sampled_from([3.0, 1, 0.25]))
            if draw(st.booleans()):
                call["noise_positions"] = [1, 2]
    return tool, call


def faults(tool, call):
    """``{name: strategy of (changes to the call, the field at fault)}`` for faults that apply."""
    text = isinstance(call["clean"], (str, list))
    tokens = not text
    out = {
        "answers": st.sampled_from([(1.5, " Mary"), {"correct": " Mary"}, (True, False), None, ("", " Mary"),
                                    (" John", " John"), (" John and", " Mary"), (VOCAB, 2), (-1, 2),
                                    (" John", " Mary", " Tom"), [(" John", " Mary")] * 3]).map(
            lambda v: ({"answers": v}, "answers")),
        "direction": st.sampled_from(["", "sideways", 1]).map(lambda v: ({"direction": v}, "direction")),
        "metrics": st.sampled_from([None, 3, ["no_such_metric"], [], {1: "prob"}]).map(
            lambda v: ({"metrics": v}, "metrics")),
        "restriction": st.tuples(
            st.sampled_from(["layers", "heads"] + (["positions", "neurons"] if tool != "path" else [])),
            st.sampled_from(["past", [-1], [], [1.5], [True], "1", 1])).map(
            lambda t: ({t[0]: [{"layers": N_LAYERS, "heads": N_HEADS, "positions": 15 if text else 6,
                                "neurons": D_MLP}[t[0]]] if t[1] == "past" else t[1]}, "site")),
        "noise": st.sampled_from([{"noise": v} for v in (-3.0, 0.0, math.nan, math.inf, "3", True)]
                                 + [{"noise_positions": v} for v in ([99], [-1], [], [1.5])]).map(
            lambda c: (c, "noise")),
    }
    # Empty inputs (issue 18): each prompt field emptied in every way its kind allows, empty answers.
    prompt_fields = ["clean"] + ([] if call.get("ablation") else ["corrupted"])
    out["empty prompt"] = st.sampled_from([({name: e}, name) for name in prompt_fields for e in _empties(call[name])])
    empty_answers = ["", ("", " Mary"), (" John", ""), [], (), torch.zeros(0, dtype=torch.long)]
    if isinstance(call["answers"], list):  # a dataset: its second pair emptied
        empty_answers += [[call["answers"][0], ()], [call["answers"][0], (call["answers"][1][0], "")]]
    out["empty answers"] = st.sampled_from(empty_answers).map(lambda v: ({"answers": v}, "answers"))
    if tool != "path":
        out["site"] = st.just(({"site": "not_a_site"}, "site"))
    if "index" in call:
        out["index"] = st.sampled_from([[(99,)], [(-1,)], [(1.0,)], [], None, [(0, 0, 0, 0)]]).map(
            lambda v: ({"index": v}, "site"))
    if call.get("ablation"):
        out["both"] = st.just(({"corrupted": call["clean"]}, "corrupted"))
    else:
        out["bogus ablation"] = st.just(({"ablation": "bogus", "corrupted": None}, "corrupted"))
        out["identical"] = st.just(({"corrupted": call["clean"]}, "corrupted"))
        if text:
            first = call["clean"] if isinstance(call["clean"], str) else call["clean"][0]
            out["unknown word"] = st.sampled_from([" Zorblax", " Jöhn", " [UNK]", " Ma\u0301ry"]).map(
                lambda w: ({"clean": first.replace(" went", w, 1)}, "clean"))
            out["length"] = st.just(({"corrupted": first.replace("store", "big store")}, "corrupted"))
    if tokens:
        clean = call["clean"]
        out["bad tokens"] = st.sampled_from([
            ({"clean": clean.masked_fill(torch.arange(6) == 2, VOCAB)}, "clean"),
            ({"clean": clean.bool()}, "clean"),
            ({"clean": clean.float()}, "clean"),
            ({"clean": clean[None]}, "clean"),
        ] + ([({"corrupted": call["corrupted"].masked_fill(torch.arange(6) == 2, -1)}, "corrupted")]
             if call.get("corrupted") is not None else []))
    return out


def _empties(value):
    """Empty stand-ins for the prompts ``value``: tokens with no positions or no rows, empty or
    blank texts and lists, and (in a dataset) an empty second prompt."""
    if isinstance(value, torch.Tensor):
        return [value[:, :0], value[:0], value[0, :0]]
    out = ["", " \t\n", [], ()]
    if isinstance(value, list):
        out += [[value[0], ""], [value[0], []]]
    return out


def _run(model, tool, call):
    kwargs = dict(call)
    clean, corrupted, answers = kwargs.pop("clean"), kwargs.pop("corrupted", None), kwargs.pop("answers")
    if tool != "attribution":
        kwargs["progress"] = False
    try:
        return TOOLS[tool](model, clean, corrupted, answers, **kwargs)
    except pw.PatchingInputError as err:
        assert err.field in (None, "clean", "corrupted", "answers", "site", "metrics", "direction", "noise")
        return err


@pytest.mark.slow
@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_every_input_is_accepted_correctly_or_refused_with_its_field(toy_model, data):
    tool, call = data.draw(valid_calls(), label="valid call")
    outcome = _run(toy_model, tool, call)
    if isinstance(outcome, pw.PatchingInputError):
        event(f"{tool}: a valid combination refused ({outcome.field})")
    else:
        event(f"{tool}: accepted")
        for name, values in outcome.values.items():
            assert torch.isfinite(values).all(), f"non-finite {name} from {tool}({call})"

    for name, strategy in faults(tool, call).items():  # each fault on its own (refusals are cheap)
        changes, field = data.draw(strategy, label=name)
        faulty = _run(toy_model, tool, {**call, **changes})
        assert isinstance(faulty, pw.PatchingInputError), f"accepted a call with a fault ({name}): {changes}"
        if isinstance(outcome, pw.PatchingInputError) and faulty.field == outcome.field:
            continue  # an earlier check already refuses the valid call
        assert faulty.field == field, f"{name} {changes}: blamed {faulty.field!r}, not {field!r}: {faulty}"
        event(f"fault {name}: refused")
