"""The self-checks of 09_nnsight pass right answers and fail at least five wrong ones each,
naming the mistake where it is a common one. (The grader that runs them on a notebook, with the
nnsight model rebuilt in the learner's kernel, is tested in tests/test_grader.py.)"""

import functools

import pytest
import torch

pytest.importorskip("nnsight")

from patchwidgets import grading  # noqa: E402


from grading_helpers import fails, passes, stub  # noqa: E402


def n_layers(lm):
    return len(lm.transformer.h)


# ------------------------------------------------------------------------------- 1. trace and save

def record(lm, tokens, read=lambda lm, layer: lm.transformer.h[layer].input, save=True, order=None):
    """A hand-written record_resid_pre; the keywords make the usual mistakes."""
    with lm.trace(tokens):
        stacked = torch.stack([read(lm, layer) for layer in range(n_layers(lm))])
        if order:
            stacked = stacked.permute(*order)
        if save:
            stacked = stacked.save()
        else:
            kept = stacked  # noqa: F841  (not saved: gone after the trace)
    return stacked


def record_list_of_saved(lm, tokens):
    with lm.trace(tokens):
        values = [lm.transformer.h[layer].input.save() for layer in range(n_layers(lm))]
    return torch.stack(values)


def test_record_resid_pre(capsys):
    passes(grading.check_record_resid_pre, record, capsys)
    fails(grading.check_record_resid_pre, functools.partial(record, read=lambda lm, l: lm.transformer.h[l].output),
          "output \\(the residual stream after the block, resid_post\\)")
    fails(grading.check_record_resid_pre, functools.partial(record, read=lambda lm, l: lm.transformer.h[l].output[0]),
          "prompt axis is missing", r"output\[0\]", "transformers 5")
    fails(grading.check_record_resid_pre, functools.partial(record, read=lambda lm, l: lm.transformer.h[l].ln_1.output),
          "LayerNorm")
    fails(grading.check_record_resid_pre, functools.partial(record, read=lambda lm, l: lm.transformer.h[l].mlp.output),
          "MLP's output")
    fails(grading.check_record_resid_pre, functools.partial(record, save=False), "UnboundLocalError", r"\.save\(\)")
    fails(grading.check_record_resid_pre, record_list_of_saved, "NameError", "list of saved tensors")
    fails(grading.check_record_resid_pre, functools.partial(record, order=(1, 0, 2, 3)),
          r"axes \[prompt, layer, pos, d_model\]", "Reorder axes")  # (4 layers, 4 prompts: same shape)
    with pytest.raises(NotImplementedError):
        grading.check_record_resid_pre(stub)


# ------------------------------------------------------------------------------- 2. intervention

def intervene(lm, corrupted_tokens, clean_resid, layer, position, where="input", rows=slice(None), positions=None,
              copy=False, last=True, offset=0):
    """A hand-written patch_resid_pre; the keywords make the usual mistakes."""
    pos = position if positions is None else positions
    with lm.trace(corrupted_tokens):
        block = lm.transformer.h[layer + offset]
        target = getattr(block, where)
        if copy:
            target = target.clone()
        target[rows, pos] = clean_resid[layer][rows, pos]
        logits = lm.lm_head.output
        out = (logits[:, -1] if last else logits).save()
    return out


def test_patch_resid_pre(capsys):
    passes(grading.check_patch_resid_pre, intervene, capsys)
    fails(grading.check_patch_resid_pre, functools.partial(intervene, where="output"), r"output \(resid_post\)",
          r"h\[layer\]\.input")
    fails(grading.check_patch_resid_pre, functools.partial(intervene, positions=slice(None)), "every position")
    fails(grading.check_patch_resid_pre, functools.partial(intervene, rows=0), "only the first prompt")
    fails(grading.check_patch_resid_pre, functools.partial(intervene, copy=True), "unpatched", "a copy")
    fails(grading.check_patch_resid_pre, functools.partial(intervene, last=False), "every position",
          r"lm_head\.output\[:, -1\]")
    fails(grading.check_patch_resid_pre, functools.partial(intervene, offset=1), "differ from the reference")
    with pytest.raises(NotImplementedError):
        grading.check_patch_resid_pre(stub)


# ------------------------------------------------------------------------------- 3. batched invokes

def sweep(lm, clean_tokens, corrupted_tokens, correct, incorrect, read_first=True, where="input", noising=False,
          normalise=True, whole=False, mean_of_ratios=False):
    """A hand-written resid_pre_sweep (nnsight's batched-invokes recipe); the keywords make the
    usual mistakes."""
    layers, n_pos = n_layers(lm), clean_tokens.shape[1]
    rows = torch.arange(len(correct))
    source_tokens, target_tokens = (corrupted_tokens, clean_tokens) if noising else (clean_tokens, corrupted_tokens)
    results = {}
    with lm.trace() as tracer:
        with tracer.invoke(source_tokens):
            source = []
            for layer in range(layers):
                source.append(getattr(lm.transformer.h[layer], where))
            final = lm.lm_head.output[:, -1]
            source_ld = (final[rows, correct] - final[rows, incorrect]).save()
        with tracer.invoke(target_tokens):
            final = lm.lm_head.output[:, -1]
            target_ld = (final[rows, correct] - final[rows, incorrect]).save()
        for layer in range(layers):
            for pos in range(n_pos):
                with tracer.invoke(target_tokens):
                    if read_first:
                        target = getattr(lm.transformer.h[layer], where)
                        if whole:
                            target[:] = source[layer]
                        else:
                            target[:, pos] = source[layer][:, pos]
                    else:  # the tutorial's one-liner: the right-hand side is read first
                        getattr(lm.transformer.h[layer], where)[:, pos] = source[layer][:, pos]
                    final = lm.lm_head.output[:, -1]
                    results[layer, pos] = (final[rows, correct] - final[rows, incorrect]).save()
    out = torch.zeros(layers, n_pos)
    for (layer, pos), ld in results.items():
        if mean_of_ratios:
            out[layer, pos] = ((ld - target_ld) / (source_ld - target_ld)).mean()
        elif normalise:
            out[layer, pos] = (ld.mean() - target_ld.mean()) / (source_ld.mean() - target_ld.mean())
        else:
            out[layer, pos] = ld.mean()
    if noising:  # scored with the denoising metric, as a learner who swaps the runs would
        clean_ld, corrupted_ld = target_ld.mean(), source_ld.mean()
        out = torch.stack([(results[k].mean() - corrupted_ld) / (clean_ld - corrupted_ld)
                           for k in sorted(results)]).reshape(layers, n_pos)
    return out


def test_resid_pre_sweep(capsys):
    passes(grading.check_resid_pre_sweep, sweep, capsys)
    fails(grading.check_resid_pre_sweep, functools.partial(sweep, where="output"), "resid_post")
    fails(grading.check_resid_pre_sweep, functools.partial(sweep, noising=True), r"\(noising\)")
    fails(grading.check_resid_pre_sweep, functools.partial(sweep, normalise=False), "raw logit difference")
    fails(grading.check_resid_pre_sweep, functools.partial(sweep, whole=True), "position axis",
          "paste every position")
    fails(grading.check_resid_pre_sweep, functools.partial(sweep, read_first=False), "IndexError",
          "read the activation you patch first")
    fails(grading.check_resid_pre_sweep, lambda *a: sweep(*a).T, "transposed")
    message = fails(grading.check_resid_pre_sweep, functools.partial(sweep, mean_of_ratios=True), "values differ")
    assert "First mismatch" in message
    with pytest.raises(NotImplementedError):
        grading.check_resid_pre_sweep(stub)


# ------------------------------------------------------------------------------- 4. last logits

def last(lm, tokens, keep=1, index=None, module="lm_head", post=None):
    """A hand-written last_logits; the keywords make the usual mistakes."""
    kwargs = {"logits_to_keep": keep} if keep else {}
    with lm.trace(tokens, **kwargs):
        value = getattr(lm, module).output if module == "lm_head" else lm.transformer.ln_f.output
        if index is not None:
            value = value[index]
        if post is not None:
            value = post(value)
        value = value.save()
    return value


def test_last_logits(capsys):
    passes(grading.check_last_logits, last, capsys)
    fails(grading.check_last_logits, functools.partial(last, keep=None), "every position", "logits_to_keep=1")
    fails(grading.check_last_logits, functools.partial(last, keep=None, index=(slice(None), -1)),
          r"\[batch, vocab\]", "drops the position axis")
    fails(grading.check_last_logits, functools.partial(last, keep=2), "2 positions kept")
    fails(grading.check_last_logits, functools.partial(last, keep=None, index=(slice(None), slice(0, 1))),
          "first position")
    fails(grading.check_last_logits, functools.partial(last, post=lambda x: x.softmax(-1)), "probabilities")
    fails(grading.check_last_logits, functools.partial(last, module="ln_f"), "final LayerNorm")
    with pytest.raises(NotImplementedError):
        grading.check_last_logits(stub)
