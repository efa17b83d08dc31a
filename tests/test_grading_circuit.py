"""The self-checks of 10_ioi_circuit pass right answers and fail at least five wrong ones each,
naming the mistake; and the direct logit attribution they compare with decomposes the logit
difference exactly. The wrong answers below are written as a learner would write them, with a
keyword per mistake, not taken from the checks' own variants. (The checks load toy-ioi-deep
once per process, as the grader's kernel does.)"""

import functools

import pytest
import torch

from patchwidgets import grading, ioi_circuit as ic
from patchwidgets.datasets import ioi_prompts
from patchwidgets.grading import check_circuit

from grading_helpers import fails, passes, stub


@pytest.fixture(scope="session")
def deep():
    return check_circuit.deep_model()


def _at(r, end_last):
    return torch.full_like(r.end, r.tokens.shape[1] - 1) if end_last else r.end


# ------------------------------------------------------------------------------- 1. DLA

def dla(model, r, end_last=False, scale=True, weight=True, io_only=False, total=False, flip=False):
    """A hand-written direct_logit_attribution; the keywords make the usual mistakes."""
    with torch.no_grad():
        _, cache = model.run_with_cache(r.tokens)
    rows, end = torch.arange(r.n), _at(r, end_last)
    d = model.W_U[:, r.io_id].T if io_only else (model.W_U[:, r.io_id] - model.W_U[:, r.s_id]).T
    if flip:
        d = -d
    if weight:
        d = d * model.ln_final.w
    s = cache["ln_final.hook_scale"][rows, end] if scale else 1.0
    out = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            v = cache[f"blocks.{layer}.attn.hook_z"][rows, end, head] @ model.W_O[layer, head]  # [n, d_model]
            v = v - v.mean(-1, keepdim=True)
            per_prompt = (v * d).sum(-1) / (s[:, 0] if scale else s)
            out[layer, head] = per_prompt.sum() if total else per_prompt.mean()
    return out


def test_direct_logit_attribution(capsys, deep):
    check = grading.check_direct_logit_attribution
    passes(check, dla, capsys)
    fails(check, functools.partial(dla, end_last=True), r"position -1", "right-padded", "r.end")
    fails(check, functools.partial(dla, scale=False), "scale", "hook_scale")
    fails(check, functools.partial(dla, weight=False), "LayerNorm's weight", r"ln_final\.w")
    fails(check, functools.partial(dla, io_only=True), r"W_U\[IO\] alone")
    fails(check, functools.partial(dla, total=True), "sum over the prompts")
    fails(check, functools.partial(dla, flip=True), "opposite sign")
    with pytest.raises(NotImplementedError):
        check(stub)


@torch.no_grad()
def test_dla_decomposes_the_logit_difference(deep):
    """Every component of the final residual stream at END (embeddings, each head, each attention
    bias, each MLP), through the final LayerNorm with its scale frozen, plus the LayerNorm's bias and
    b_U, sums to the model's logit difference; the heads' part is the library's DLA. Computed here from
    the cache, not with the library's code (which once left out the LayerNorm's weight: 5.6 for 7.2)."""
    model = deep
    items = ioi_prompts(10, split="train", seed=4)
    r = ic.roles(model, items)
    with torch.no_grad():
        logits, cache = model.run_with_cache(r.tokens)
    rows = torch.arange(r.n)
    last = logits[rows, r.end]
    logit_diff = last[rows, r.io_id] - last[rows, r.s_id]  # [n]
    parts = [cache["hook_embed"][rows, r.end] + cache["hook_pos_embed"][rows, r.end]]
    heads = []
    for layer in range(model.cfg.n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"][rows, r.end]  # [n, head, d_head]
        heads += [z[:, h] @ model.W_O[layer, h] for h in range(model.cfg.n_heads)]
        parts += [model.b_O[layer].expand(r.n, -1), cache[f"blocks.{layer}.hook_mlp_out"][rows, r.end]]
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][rows, r.end]
    assert torch.allclose(sum(parts) + sum(heads), final, atol=1e-4)  # the residual stream is this sum
    scale = cache["ln_final.hook_scale"][rows, r.end][:, 0]
    direction = (model.W_U[:, r.io_id] - model.W_U[:, r.s_id]).T  # [n, d_model]

    def through_ln(v):  # [n, d_model] -> [n]
        return ((v - v.mean(-1, keepdim=True)) * model.ln_final.w * direction).sum(-1) / scale

    bias = (model.ln_final.b * direction).sum(-1) + model.b_U[r.io_id] - model.b_U[r.s_id]
    head_part = sum(through_ln(v) for v in heads)
    total = sum(through_ln(v) for v in parts) + head_part + bias
    assert torch.allclose(total, logit_diff, atol=1e-3), (total, logit_diff)
    library = ic.direct_logit_attribution(model, items)
    by_head = torch.stack([through_ln(v).mean() for v in heads]).reshape(model.cfg.n_layers, model.cfg.n_heads)
    assert torch.allclose(library, by_head.float(), atol=1e-4), (library - by_head).abs().max()
    assert abs(float(library.sum()) - float(head_part.mean())) < 1e-3


# ------------------------------------------------------------------------------- 2. attention

def attention(model, r, key, end_last=False, swap=False, scores=False, shift=0, all_queries=False):
    """A hand-written end_attention; the keywords make the usual mistakes."""
    with torch.no_grad():
        _, cache = model.run_with_cache(r.tokens)
    rows, end, k = torch.arange(r.n), _at(r, end_last), getattr(r, key) + shift
    out = []
    for layer in range(model.cfg.n_layers):
        p = cache[f"blocks.{layer}.attn.hook_{'attn_scores' if scores else 'pattern'}"]  # [b, head, q, k]
        if swap:
            out.append(p[rows, :, k, end].mean(0))
        elif all_queries:
            out.append(p[rows, :, :, k].mean(-1).mean(0))
        else:
            out.append(p[rows, :, end, k].mean(0))
    return torch.stack(out)


def test_end_attention(capsys, deep):
    check = grading.check_end_attention
    passes(check, attention, capsys)
    fails(check, functools.partial(attention, end_last=True), r"position -1", "r.end")
    fails(check, functools.partial(attention, swap=True), r"\[key, query\]")
    fails(check, functools.partial(attention, scores=True), "hook_attn_scores")
    fails(check, functools.partial(attention, shift=1), r"key \+ 1")
    fails(check, functools.partial(attention, shift=-1), r"key - 1")
    fails(check, functools.partial(attention, all_queries=True), "every query position")
    with pytest.raises(NotImplementedError):
        check(stub)


# ------------------------------------------------------------------------------- 3. copy scores

def copying(model, names, mlp0=True, ln1=True, ln_final=True, vocab=False, wrong_axis=False, top_only=False):
    """A hand-written copy_scores; the keywords make the usual mistakes."""
    ids = [model.to_tokens(n, prepend_bos=False)[0, 0].item() for n in names]
    out = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    with torch.no_grad():
        e = model.W_E[ids]
        if mlp0:
            e = e + model.blocks[0].mlp(model.blocks[0].ln2(e.unsqueeze(1))).squeeze(1)
        for layer in range(model.cfg.n_layers):
            x = model.blocks[layer].ln1(e.unsqueeze(1)).squeeze(1) if ln1 else e
            for head in range(model.cfg.n_heads):
                v = x @ model.W_V[layer, head] @ model.W_O[layer, head]  # [names, d_model]
                if ln_final:
                    v = model.ln_final(v.unsqueeze(1)).squeeze(1)
                logits = v @ (model.W_U if vocab else model.W_U[:, ids])
                if wrong_axis:
                    logits = logits.T
                target = torch.tensor(ids) if vocab else torch.arange(len(ids))
                top = (logits.argmax(1) == target).float().mean()
                bottom = (logits.argmin(1) == target).float().mean()
                out[layer, head] = top if top_only or top >= bottom else -bottom
    return out


def test_copy_scores(capsys, deep):
    check = grading.check_copy_scores
    passes(check, copying, capsys)
    fails(check, functools.partial(copying, mlp0=False), "MLP0", "part of the embedding")
    fails(check, functools.partial(copying, ln1=False), r"\(ln1\)")
    fails(check, functools.partial(copying, ln_final=False), r"\(ln_final\)")
    fails(check, functools.partial(copying, vocab=True), "every token of the vocabulary")
    fails(check, functools.partial(copying, wrong_axis=True), "wrong axis")
    fails(check, functools.partial(copying, top_only=True), "top fraction", "copy-\\*suppressing\\*")
    with pytest.raises(NotImplementedError):
        check(stub)


# ------------------------------------------------------------------------------- 4. path patching at a position

def path_at(model, items, sender, role, receivers=(), end_last=False, unfrozen=False, everywhere=False,
            from_abc=False, frozen_logits=False, mlps_frozen=False, layer_queries=False, flip=False):
    """A hand-written position-specific path patch; the keywords make the usual mistakes."""
    r = ic.roles(model, items)
    base_tokens, source_tokens = r.tokens, ic.roles(model, items, "abc").tokens
    if from_abc:
        base_tokens, source_tokens = source_tokens, base_tokens
    rows, end = torch.arange(r.n), _at(r, end_last)
    with torch.no_grad():
        base_logits, base = model.run_with_cache(base_tokens)
        _, source = model.run_with_cache(source_tokens)
    positions = {"end": end, "s2": r.s2, "io": r.io, "s1": r.s1}

    def ld(logits):
        return (logits[rows, end, r.io_id] - logits[rows, end, r.s_id]).mean().item()

    def z_hook(z, hook, layer):  # (hook.name is the bridge's own name, not the cache's: pass the layer)
        name = f"blocks.{layer}.attn.hook_z"
        if not unfrozen:
            z[:] = base[name]
        if layer == sender[0]:
            if role is None or everywhere:
                z[:, :, sender[1]] = source[name][:, :, sender[1]]
            else:
                at = positions[role]
                z[rows, at, sender[1]] = source[name][rows, at, sender[1]]
        return z

    hooks = [(f"blocks.{layer}.attn.hook_z", functools.partial(z_hook, layer=layer))
             for layer in range(model.cfg.n_layers)]
    if mlps_frozen:
        hooks += [(f"blocks.{layer}.hook_mlp_out", lambda x, hook, layer=layer: base[f"blocks.{layer}.hook_mlp_out"])
                  for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        if receivers and not frozen_logits:
            q_names = [f"blocks.{layer}.attn.hook_q" for layer, _ in receivers]
            with model.hooks(fwd_hooks=hooks):
                _, frozen = model.run_with_cache(base_tokens, names_filter=lambda n: n in q_names)

            def q_hook(q, hook, layer):
                name = f"blocks.{layer}.attn.hook_q"
                for l, h in receivers:
                    if l == layer:
                        if layer_queries:
                            q[:] = frozen[name]
                        else:
                            q[:, :, h] = frozen[name][:, :, h]
                return q

            logits = model.run_with_hooks(base_tokens, fwd_hooks=[
                (f"blocks.{layer}.attn.hook_q", functools.partial(q_hook, layer=layer))
                for layer in sorted({l for l, _ in receivers})])
        else:
            logits = model.run_with_hooks(base_tokens, fwd_hooks=hooks)
    drop = ld(logits) - ld(base_logits) if from_abc else ld(base_logits) - ld(logits)
    return -drop if flip else drop


def test_path_at(capsys, deep):
    check = grading.check_path_at
    passes(check, path_at, capsys)
    fails(check, functools.partial(path_at, end_last=True), r"position -1", "right-padded")
    fails(check, functools.partial(path_at, unfrozen=True), "let the other heads recompute")
    fails(check, functools.partial(path_at, everywhere=True), "at every position")
    fails(check, functools.partial(path_at, from_abc=True), "other way round", "noising")
    fails(check, functools.partial(path_at, frozen_logits=True), "frozen run's own logits")
    fails(check, functools.partial(path_at, mlps_frozen=True), "freeze the MLPs")
    fails(check, functools.partial(path_at, layer_queries=True), "every head in the receivers' layers")
    fails(check, functools.partial(path_at, flip=True), "opposite sign")
    with pytest.raises(NotImplementedError):
        check(stub)


@torch.no_grad()
def test_path_effect_at_agrees_with_the_engine_and_with_causality(deep):
    """The check's reference, ``ic.path_effect_at``, is written with hooks. At every position it
    equals the engine's ``direct_effects`` / ``path_effects`` (``pw.path_patch``, checked against a
    slow reference in test_path_patching.py). Patched at one position, a path to the logits at END
    can only start at END: attention is causal and every other head is frozen, so only the
    residual stream at END reaches END's logits. So it equals the every-position value at END and is
    exactly zero at S2 and the IO, whatever the model."""
    items = ioi_prompts(10, split="test", seed=3)
    receivers = [(3, 5), (3, 6), (3, 7)]
    direct = ic.direct_effects(deep, items)
    into_q = ic.path_effects(deep, items, receivers, "q")
    into_k = ic.path_effects(deep, items, [(3, 5)], "k")
    for sender in [(3, 5), (2, 5), (0, 3)]:
        assert ic.path_effect_at(deep, items, sender) == pytest.approx(float(direct[sender]), abs=1e-4)
        assert ic.path_effect_at(deep, items, sender, "end") == pytest.approx(float(direct[sender]), abs=1e-4)
        assert ic.path_effect_at(deep, items, sender, "s2") == 0.0
        assert ic.path_effect_at(deep, items, sender, "io") == 0.0
    for sender in [(2, 5), (1, 6)]:
        assert ic.path_effect_at(deep, items, sender, None, receivers) == pytest.approx(float(into_q[sender]), abs=1e-4)
        assert ic.path_effect_at(deep, items, sender, None, [(3, 5)], "k") == pytest.approx(float(into_k[sender]),
                                                                                             abs=1e-4)
    assert abs(float(into_q[(2, 5)])) > 0.1  # the agreement above is about a path that exists


# ------------------------------------------------------------------------------- 5. mean ablation

def ablated(model, items, heads, source="abc", per="shape", zero=False, flat=False, end_last=False):
    """A hand-written mean_ablated_logit_diff; the keywords make the usual mistakes: ``per`` is
    "shape" (template and length), "everything" (one mean) or "prompt" (each its own ABC run)."""
    r, src = ic.roles(model, items), ic.roles(model, items, source)
    with torch.no_grad():
        _, cache = model.run_with_cache(src.tokens)
    lengths = (r.end + 1).tolist()
    groups = {"shape": [(it["template"], n) for it, n in zip(items, lengths)], "everything": [0] * len(items),
              "prompt": list(range(len(items)))}[per]
    replace = {}
    for layer, head in heads:
        z = cache[f"blocks.{layer}.attn.hook_z"][:, :, head].clone()  # [n, pos, d_head]
        new = torch.zeros_like(z)
        if not zero:
            for g in set(groups):
                members = [i for i, x in enumerate(groups) if x == g]
                if per == "everything":  # at each position, the prompts long enough to have it
                    for pos in range(z.shape[1]):
                        have = [i for i in members if pos < lengths[i]]
                        new[members, pos] = z[have, pos].mean(0)
                else:
                    new[members] = z[members].mean(0)
            if flat:
                new = torch.stack([new[i, : lengths[i]].mean(0).expand(z.shape[1], -1) for i in range(len(items))])
        replace[layer, head] = new

    def hook(z, hook):
        layer = int(hook.name.split(".")[1])
        for (l, h), value in replace.items():
            if l == layer:
                z[:, :, h] = value
        return z

    fwd = [(f"blocks.{layer}.attn.hook_z", hook) for layer in sorted({l for l, _ in heads})]
    with torch.no_grad():
        logits = model.run_with_hooks(r.tokens, fwd_hooks=fwd)
    rows, end = torch.arange(r.n), _at(r, end_last)
    return logits[rows, end, r.io_id] - logits[rows, end, r.s_id]


def test_mean_ablated_logit_diff(capsys, deep):
    check = grading.check_mean_ablated_logit_diff
    passes(check, ablated, capsys)
    fails(check, functools.partial(ablated, zero=True), "to zero")
    fails(check, functools.partial(ablated, per="everything"), "one mean over every prompt", "per template")
    fails(check, functools.partial(ablated, source="clean"), "clean prompts instead of the ABC")
    fails(check, functools.partial(ablated, per="prompt"), "resample ablation")
    fails(check, functools.partial(ablated, flat=True), "over positions")
    fails(check, functools.partial(ablated, end_last=True), r"position -1")
    with pytest.raises(NotImplementedError):
        check(stub)


# ------------------------------------------------------------------------------- 6. faithfulness

def faith(model, items, circuit, inside=False, inverted=False, raw=False, mean_of_ratios=False, lost=False,
          **ablation):
    """A hand-written faithfulness; the keywords make the usual mistakes (``ablation`` goes to
    :func:`ablated`)."""
    every = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    chosen = [h for h in every if (h in circuit) == inside]
    full = ablated(model, items, [])
    kept = ablated(model, items, chosen, **ablation)
    if mean_of_ratios:
        return float((kept / full).mean())
    if raw:
        return float(kept.mean())
    ratio = float(full.mean() / kept.mean()) if inverted else float(kept.mean() / full.mean())
    return 1 - ratio if lost else ratio


def test_faithfulness(capsys, deep):
    check = grading.check_faithfulness
    passes(check, faith, capsys)
    fails(check, functools.partial(faith, inside=True), "circuit instead of its complement")
    fails(check, functools.partial(faith, inverted=True), "other way round")
    fails(check, functools.partial(faith, raw=True), "F\\(C\\) itself")
    fails(check, functools.partial(faith, zero=True), "zero-ablate")
    fails(check, functools.partial(faith, per="everything"), "one mean over every prompt")
    fails(check, functools.partial(faith, mean_of_ratios=True), "per-prompt ratios")
    fails(check, functools.partial(faith, lost=True), "share lost")
    with pytest.raises(NotImplementedError):
        check(stub)


# ------------------------------------------------------------------------------- 7. minimality

def minimal(model, items, circuit, v, K, from_model=False, forget_k=False, signed=False, divide=False, **ablation):
    """A hand-written minimality; the keywords make the usual mistakes (``ablation`` goes to :func:`ablated`)."""
    every = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    base = set(every) if from_model else set(circuit)
    removed = set() if forget_k else set(K)

    def f(kept):
        return float(ablated(model, items, [h for h in every if h not in kept], **ablation).mean())

    a, b = f(base - removed - {v}), f(base - removed)
    if divide:
        return a / b
    return a - b if signed else abs(a - b)


def test_minimality(capsys, deep):
    check = grading.check_minimality
    passes(check, minimal, capsys)
    fails(check, functools.partial(minimal, from_model=True), "whole model instead of from the circuit")
    fails(check, functools.partial(minimal, forget_k=True), "forget K")
    fails(check, functools.partial(minimal, signed=True), "keep the sign")
    fails(check, functools.partial(minimal, divide=True), "divide instead of subtracting")
    fails(check, functools.partial(minimal, zero=True), "zero-ablate")
    fails(check, functools.partial(minimal, per="everything"), "one mean over every prompt")
    with pytest.raises(NotImplementedError):
        check(stub)


def test_the_checks_are_registered():
    assert grading.EXERCISES["10_ioi_circuit"] == ["direct_logit_attribution", "end_attention", "copy_scores",
                                                    "path_at", "mean_ablated_logit_diff", "faithfulness", "minimality"]
    for name in grading.EXERCISES["10_ioi_circuit"]:
        assert grading.CHECKS[name] is getattr(check_circuit, f"check_{name}")
