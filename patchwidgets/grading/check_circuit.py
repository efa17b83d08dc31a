"""Checks for 10_ioi_circuit: the measurements of Wang et al.'s IOI paper, on ``toy-ioi-deep``.

Each check runs the learner's function on the bundled ``toy-ioi-deep`` checkpoint
(:func:`deep_model`) with its own dozen IOI prompts of *mixed* lengths (several templates,
right-padded into one batch, so END is not the last column for every prompt), and compares
the answer with :mod:`patchwidgets.ioi_circuit`, written independently of the notebook. The
wrong answers a check names (END taken as position -1, no LayerNorm scale, ``W_U[IO]`` alone,
MLP0 left out of the copy circuit, zero instead of mean ablation, one mean over every
template, the circuit ablated instead of its complement, the ratio upside down, ...) are
computed by the check's own variants of the measurement, below.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import torch

from ._common import GradingError, call_learner, compare, name_model, report_pass, to_tensor

_DEEP: dict[str, Any] = {}

Head = tuple[int, int]

#: The checks' prompts: held-out names and templates, a seed no notebook uses, several lengths.
CHECK_PROMPTS = {"n": 12, "split": "test", "seed": 11}
#: Circuits the faithfulness check asks about: the notebook's seven heads (END -> S2 heads 1.6 and 2.5,
#: positional copiers 3.3 and 3.4, IO finders 3.5-3.7), and a smaller one.
CHECK_CIRCUITS: list[list[Head]] = [[(1, 6), (2, 5), (3, 3), (3, 4), (3, 5), (3, 6), (3, 7)], [(2, 5), (3, 5)]]


def deep_model() -> Any:
    """The bundled ``toy-ioi-deep`` model on the CPU, loaded once per process (the grader's
    kernel builds its own from the name, see :mod:`._worker`)."""
    if "model" not in _DEEP:
        from ..loading import load_model

        _DEEP["model"] = name_model(load_model("toy-ioi-deep", device="cpu"), "deep_model")
    return _DEEP["model"]


def circuit_items() -> list[dict]:
    """The checks' IOI prompts (``ioi_prompts`` dicts); the same every time."""
    from ..datasets import ioi_prompts

    return ioi_prompts(CHECK_PROMPTS["n"], split=CHECK_PROMPTS["split"], seed=CHECK_PROMPTS["seed"])


def _later(variant: Callable, *args: Any, **kwargs: Any) -> Callable[[], torch.Tensor]:
    """``variant(*args, **kwargs)`` as a tensor, computed only when ``compare`` asks for it (a wrong
    answer that matches an earlier alternative never pays for the later ones)."""
    return lambda: torch.as_tensor(variant(*args, **kwargs))


def _roles(key: str = "clean") -> Any:
    from .. import ioi_circuit

    return ioi_circuit.roles(deep_model(), circuit_items(), key)


def _call(name: str, fn: Callable, *args: Any) -> Any:
    model = deep_model()
    model.reset_hooks()
    try:
        with torch.no_grad():
            return call_learner(name, fn, *args)
    finally:
        model.reset_hooks()  # a hook the learner's function left must not change the next check


# ---------------------------------------------------------------------------------------------
# Exercise 1: direct logit attribution
# ---------------------------------------------------------------------------------------------

def variant_dla(model: Any, r: Any, *, end_last: bool = False, scale: bool = True, direction: str = "io - s",
                centre: bool = True, ln_weight: bool = True, reduce: str = "mean") -> torch.Tensor:
    """``[layer, head]``: the direct logit attribution written out here, with switches that make
    the usual mistakes (the right answer is every switch at its default)."""
    rows = torch.arange(r.n)
    end = torch.full_like(r.end, r.tokens.shape[1] - 1) if end_last else r.end
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(r.tokens, names_filter=lambda n: n in names or n == "ln_final.hook_scale")
    s = cache["ln_final.hook_scale"][rows, end] if scale else torch.ones(r.n, 1)  # [n, 1]
    w_io, w_s = model.W_U[:, r.io_id].T, model.W_U[:, r.s_id].T  # [n, d_model]
    d = {"io - s": w_io - w_s, "io": w_io}[direction]
    if ln_weight:
        d = d * model.ln_final.w
    out = []
    for layer, name in enumerate(names):
        head_out = torch.einsum("nhd,hde->nhe", cache[name][rows, end], model.W_O[layer])  # [n, head, d_model]
        if centre:
            head_out = head_out - head_out.mean(-1, keepdim=True)
        per_prompt = torch.einsum("nhe,ne->nh", head_out, d) / s
        out.append(per_prompt.sum(0) if reduce == "sum" else per_prompt.mean(0))
    return torch.stack(out).detach().float().cpu()


def check_direct_logit_attribution(direct_logit_attribution: Callable) -> None:
    """``direct_logit_attribution(model, r) -> [layer, head]``: each head's output at END (``r.end``),
    through the final LayerNorm of that run with its scale frozen (centred, divided by the scale,
    times the LayerNorm's weight), on ``W_U[IO] - W_U[S]``, averaged over prompts."""
    from .. import ioi_circuit

    name = "direct_logit_attribution"
    model, items, r = deep_model(), circuit_items(), _roles()
    expected = ioi_circuit.direct_logit_attribution(model, items)
    got = to_tensor(name, _call(name, direct_logit_attribution, model, r))
    compare(name, got, expected, ("layer", "head"), alternatives=[
        ("read every prompt at the last column (position -1) instead of at END: the prompts have different "
         "lengths and are right-padded, so -1 is a pad token for the shorter ones; use r.end",
         lambda: variant_dla(model, r, end_last=True)),
        ("leave out the final LayerNorm's scale: divide each prompt's head output by "
         "cache['ln_final.hook_scale'] at END (frozen: the scale of this run, as the model applied it)",
         lambda: variant_dla(model, r, scale=False)),
        ("leave out the final LayerNorm's weight (model.ln_final.w): it multiplies every normalised vector "
         "before W_U, so multiply the direction W_U[IO] - W_U[S] by it",
         lambda: variant_dla(model, r, ln_weight=False)),
        ("project on W_U[IO] alone instead of W_U[IO] - W_U[S]: the logit difference needs both columns",
         lambda: variant_dla(model, r, direction="io")),
        ("sum over the prompts instead of averaging", lambda: variant_dla(model, r, reduce="sum")),
        # (Leaving out the LayerNorm's centring, head_out - head_out.mean(-1), moves these values by
        # under 1e-3 on this model: within the tolerance, so not named.)
    ], atol=2e-3, rtol=1e-3)
    report_pass(name, "matches patchwidgets.ioi_circuit.direct_logit_attribution")


# ---------------------------------------------------------------------------------------------
# Exercise 2: attention from END
# ---------------------------------------------------------------------------------------------

def variant_attention(model: Any, r: Any, key: str, *, end_last: bool = False, transpose: bool = False,
                      scores: bool = False, offset: int = 0, every_query: bool = False) -> torch.Tensor:
    """``[layer, head]`` mean attention from END to ``key``, with switches for the usual mistakes."""
    hook = "attn_scores" if scores else "pattern"
    names = [f"blocks.{layer}.attn.hook_{hook}" for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(r.tokens, names_filter=lambda n: n in names)
    rows = torch.arange(r.n)
    q = torch.full_like(r.end, r.tokens.shape[1] - 1) if end_last else r.end
    k = getattr(r, key) + offset
    out = []
    for n in names:
        p = cache[n].float()  # [batch, head, query, key]
        if transpose:
            p = p.transpose(-1, -2)
        out.append(p[rows, :, :, k].mean(-1).mean(0) if every_query else p[rows, :, q, k].mean(0))
    return torch.stack(out).cpu()


def check_end_attention(end_attention: Callable) -> None:
    """``end_attention(model, r, key) -> [layer, head]``: the attention probability from END to the
    role ``key`` (``"io"``, ``"s1"`` or ``"s2"``), averaged over the prompts."""
    from .. import ioi_circuit

    name = "end_attention"
    model, r = deep_model(), _roles()
    for key in ("io", "s2"):
        expected = ioi_circuit.attention(model, r, "end", key)
        got = to_tensor(name, _call(name, end_attention, model, r, key))
        v = functools.partial(_later, variant_attention, model, r, key)
        try:
            compare(name, got, expected, ("layer", "head"), alternatives=[
                ("take END as the last column (position -1): the prompts are right-padded to the longest, so "
                 "for the shorter ones -1 is padding; query at r.end", v(end_last=True)),
                ("index the pattern [key, query] instead of [query, key]: hook_pattern is [batch, head, "
                 "query_pos, key_pos], and a later query cannot be attended by an earlier key (0 everywhere)",
                 v(transpose=True)),
                ("read hook_attn_scores (before the softmax) instead of hook_pattern (probabilities)",
                 v(scores=True)),
                ("look one position after the role (key + 1): r.io, r.s1, r.s2 already count the BOS token",
                 v(offset=1)),
                ("look one position before the role (key - 1)", v(offset=-1)),
                ("average over every query position instead of reading the END query only",
                 v(every_query=True)),
            ], atol=1e-3, rtol=1e-3)
        except GradingError as err:
            raise GradingError(f"{err}\n(with key={key!r})") from None
    report_pass(name, "END -> IO and END -> S2 match patchwidgets.ioi_circuit.attention")


# ---------------------------------------------------------------------------------------------
# Exercise 3: copy scores
# ---------------------------------------------------------------------------------------------

def variant_copy_scores(model: Any, names: Sequence[str], *, mlp0: bool = True, ln1: bool = True,
                        ln_final: bool = True, whole_vocab: bool = False, transpose: bool = False,
                        signed: bool = True) -> torch.Tensor:
    """``[layer, head]`` copy scores, with switches for the usual mistakes."""
    ids = torch.tensor([int(model.to_tokens(n, prepend_bos=False)[0, 0]) for n in names])
    block0 = model.blocks[0]
    with torch.no_grad():
        resid = model.W_E[ids]
        if mlp0:
            resid = resid + block0.mlp(block0.ln2(resid[:, None]))[:, 0]
        own = ids if whole_vocab else torch.arange(len(ids))
        out = []
        for layer in range(model.cfg.n_layers):
            x = model.blocks[layer].ln1(resid[:, None])[:, 0] if ln1 else resid
            ov = torch.einsum("nm,hmd,hde->hne", x, model.W_V[layer], model.W_O[layer])
            if ln_final:
                ov = model.ln_final(ov)
            logits = ov @ (model.W_U if whole_vocab else model.W_U[:, ids])  # [head, n, names or vocab]
            if transpose and not whole_vocab:
                logits = logits.transpose(-1, -2)
            top = (logits.argmax(-1) == own).float().mean(-1)
            bottom = (logits.argmin(-1) == own).float().mean(-1)
            out.append(torch.where(top >= bottom, top, -bottom) if signed else top)
    return torch.stack(out).cpu()


def check_copy_scores(copy_scores: Callable) -> None:
    """``copy_scores(model, names) -> [layer, head]``: for each head, the fraction of ``names``
    whose own logit is the largest of the names' after embedding + MLP0 -> ln1 -> W_V W_O ->
    ln_final -> W_U (negated fraction of smallest where that is larger)."""
    from .. import ioi_circuit
    from ..datasets import NAMES

    name = "copy_scores"
    model = deep_model()
    names = [" " + n for n in NAMES]
    expected = ioi_circuit.copy_scores(model, names)
    got = to_tensor(name, _call(name, copy_scores, model, list(names)))
    compare(name, got, expected, ("layer", "head"), alternatives=[
        ("leave MLP0 out: in GPT-2-style models the first MLP acts as part of the embedding (Wang et al. and "
         "ARENA add it): resid = W_E[name] + MLP0(ln2(W_E[name])) before the head's ln1",
         lambda: variant_copy_scores(model, names, mlp0=False)),
        ("skip the head's own LayerNorm (ln1) before W_V", lambda: variant_copy_scores(model, names, ln1=False)),
        ("skip the final LayerNorm (ln_final) before W_U", lambda: variant_copy_scores(model, names, ln_final=False)),
        ("compare with every token of the vocabulary instead of the names: the score asks whether the head "
         "prefers the name it reads over the *other names*", lambda: variant_copy_scores(model, names,
                                                                                         whole_vocab=True)),
        ("take the argmax over the wrong axis (which input name raises a given name's logit most): logits "
         "are [head, input name, output name]; the argmax is over output names",
         lambda: variant_copy_scores(model, names, transpose=True)),
        ("keep only the top fraction: a copy-*suppressing* head has the name's own logit the smallest, and "
         "scores minus that fraction where it is the larger of the two",
         lambda: variant_copy_scores(model, names, signed=False)),
    ], atol=1e-4, rtol=1e-4)
    report_pass(name, "matches patchwidgets.ioi_circuit.copy_scores (MLP0 included)")


# ---------------------------------------------------------------------------------------------
# Exercise 4: position-specific path patching
# ---------------------------------------------------------------------------------------------

#: (sender, role, receivers) cases: 3.5's path to the logits at END; 2.5's path into the IO finders'
#: queries at END, at S2 (nothing there), and at every position.
PATH_CASES: list[tuple[Head, str | None, list[Head]]] = [
    ((3, 5), "end", []),
    ((2, 5), "end", [(3, 5), (3, 6), (3, 7)]),
    ((2, 5), "s2", [(3, 5), (3, 6), (3, 7)]),
    ((1, 6), None, [(3, 5), (3, 6), (3, 7)]),
]


def variant_path_at(model: Any, items: Sequence[dict], sender: Head, role: str | None, receivers: Sequence[Head],
                    *, end_last: bool = False, freeze: bool = True, every_position: bool = False,
                    denoise: bool = False, frozen_logits: bool = False, freeze_mlps: bool = False,
                    whole_layer: bool = False) -> float:
    """The drop in mean logit difference, position-specific path patching written out here, with
    switches for the usual mistakes: ``end_last`` (END read as position -1), ``freeze`` (other heads
    frozen to the base run), ``every_position`` (role ignored), ``denoise`` (the ABC run with the
    sender's clean value, rise over the ABC run), ``frozen_logits`` (with receivers: the frozen run's
    own logits), ``freeze_mlps`` (the MLPs frozen too), ``whole_layer`` (every head of a receiver's
    layer gets the frozen run's queries)."""
    from .. import ioi_circuit

    clean_r, abc_r = ioi_circuit.roles(model, items), ioi_circuit.roles(model, items, "abc")
    base_r, other_r = (abc_r, clean_r) if denoise else (clean_r, abc_r)
    rows = torch.arange(clean_r.n)
    end = torch.full_like(clean_r.end, clean_r.tokens.shape[1] - 1) if end_last else clean_r.end
    where = None if role is None or every_position else (end if role == "end" else getattr(clean_r, role))
    z_names = [f"blocks.{layer}.attn.hook_z" for layer in range(model.cfg.n_layers)]
    mlp_names = [f"blocks.{layer}.hook_mlp_out" for layer in range(model.cfg.n_layers)]
    keep = set(z_names) | (set(mlp_names) if freeze_mlps else set())
    with torch.no_grad():
        _, base = model.run_with_cache(base_r.tokens, names_filter=lambda n: n in keep)
        _, other = model.run_with_cache(other_r.tokens, names_filter=lambda n: n in keep)

    def z_hook(layer: int):
        def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
            if freeze:
                z = base[z_names[layer]].clone()
            if layer == sender[0]:
                src = other[z_names[layer]][:, :, sender[1]]
                if where is None:
                    z[:, :, sender[1]] = src
                else:
                    z[rows, where, sender[1]] = src[rows, where]
            return z
        return hook

    hooks = [(n, z_hook(k)) for k, n in enumerate(z_names)]
    if freeze_mlps:
        hooks += [(n, lambda act, hook, n=n: base[n]) for n in mlp_names]

    def ld(logits: torch.Tensor) -> float:
        last = logits[rows, end]
        return float((last[rows, clean_r.io_id] - last[rows, clean_r.s_id]).float().mean())

    with torch.no_grad():
        base_ld = ld(model(base_r.tokens))
        if not receivers or frozen_logits:
            with model.hooks(fwd_hooks=hooks):
                patched = ld(model(base_r.tokens))
        else:
            q_names = {layer: f"blocks.{layer}.attn.hook_q" for layer, _ in receivers}
            with model.hooks(fwd_hooks=hooks):
                _, moved = model.run_with_cache(base_r.tokens, names_filter=lambda n: n in q_names.values())

            def paste(layer: int):
                heads = slice(None) if whole_layer else [h for l, h in receivers if l == layer]

                def hook(q: torch.Tensor, hook: Any) -> torch.Tensor:
                    q[:, :, heads] = moved[q_names[layer]][:, :, heads]
                    return q
                return hook

            with model.hooks(fwd_hooks=[(n, paste(layer)) for layer, n in q_names.items()]):
                patched = ld(model(base_r.tokens))
    return patched - base_ld if denoise else base_ld - patched


def check_path_at(path_at: Callable) -> None:
    """``path_at(model, items, sender, role, receivers=()) -> float``: the drop in mean logit
    difference when ``sender``'s output takes its ABC value only at ``role``'s position (``None``:
    every position), every other head frozen to its clean output, MLPs recomputed; the path ends at
    the logits (no ``receivers``) or at the ``receivers``' queries, pasted into a clean run."""
    from .. import ioi_circuit

    name = "path_at"
    model, items = deep_model(), circuit_items()
    for sender, role, receivers in PATH_CASES:
        expected = torch.tensor(ioi_circuit.path_effect_at(model, items, sender, role, receivers))
        got = to_tensor(name, _call(name, path_at, model, [dict(it) for it in items], sender, role,
                                    list(receivers))).reshape(())
        v = functools.partial(_later, variant_path_at, model, items, sender, role, receivers)
        try:
            compare(name, got, expected, (), alternatives=[
                ("read END as the last column (position -1): the prompts are right-padded, so for the shorter "
                 "ones -1 is padding; patch and read the logits at r.end", v(end_last=True)),
                ("let the other heads recompute: path patching freezes every head except the sender to its clean "
                 "output, so the sender's effect cannot travel through them (what you measured is the total "
                 "effect of patching the sender at that position)", v(freeze=False)),
                ("patch the sender at every position: only the role's position takes the ABC value, the others "
                 "keep the clean one", v(every_position=True)),
                ("patch the other way round: start from the *clean* run and give the sender its ABC value "
                 "(noising), and report how much the clean logit difference drops", v(denoise=True)),
                ("read the frozen run's own logits: with receivers, take their queries from the frozen run and "
                 "paste them into a fresh clean run, in which everything after them is recomputed",
                 v(frozen_logits=True)),
                ("freeze the MLPs as well: Wang et al.'s path patching recomputes them (only heads are frozen)",
                 v(freeze_mlps=True)),
                ("paste the queries of every head in the receivers' layers: only the receiver heads' queries move",
                 v(whole_layer=True)),
            ], atol=2e-3, rtol=1e-3)
        except GradingError as err:
            where = "every position" if role is None else role
            raise GradingError(f"{err}\n(with sender={sender}, role={where}, receivers={receivers})") from None
    report_pass(name, "matches patchwidgets.ioi_circuit.path_effect_at (to the logits, and into the queries)")


# ---------------------------------------------------------------------------------------------
# Exercise 5: mean ablation with the per-template ABC mean
# ---------------------------------------------------------------------------------------------

def variant_ablated_ld(model: Any, items: Sequence[dict], heads: Sequence[Head], *, source: str = "abc",
                       grouping: str = "template", zero: bool = False, over_positions: bool = False,
                       end_last: bool = False) -> torch.Tensor:
    """``[n]`` logit differences with ``heads`` replaced, with switches for the usual mistakes:
    ``source`` "abc" or "clean" (which run the mean is taken over), ``grouping`` "template"
    (Wang et al.), "all" (one mean over every prompt) or "own" (each prompt its own ABC value,
    resample ablation), ``zero``, ``over_positions`` (also averaged over positions)."""
    from .. import ioi_circuit

    r = ioi_circuit.roles(model, items)
    src = ioi_circuit.roles(model, items, source)
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(src.tokens, names_filter=lambda n: n in names)
    z = torch.stack([cache[n] for n in names], 2)  # [n, pos, layer, head, d_head]
    real = torch.arange(z.shape[1])[None] <= src.end[:, None]  # [n, pos]: not padding
    if zero:
        means = torch.zeros_like(z)
    elif grouping == "own":
        means = z
    else:
        keys = ([(it["template"], int(e)) for it, e in zip(items, src.end)] if grouping == "template"
                else [0] * len(items))
        means = torch.empty_like(z)
        for key in set(keys):
            members = torch.tensor([k == key for k in keys])
            if grouping == "all":  # each position's mean over the prompts that reach it
                w = real[members].float()[:, :, None, None, None]
                means[members] = (z[members] * w).sum(0, keepdim=True) / w.sum(0, keepdim=True).clamp(min=1)
            else:
                means[members] = z[members].mean(0, keepdim=True)
    if over_positions:
        w = real.float()[:, :, None, None, None]
        means = ((means * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)).expand_as(means)
    hooks = ioi_circuit.ablation_hooks(model, heads, means)
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        logits = model(r.tokens)
    rows = torch.arange(r.n)
    end = torch.full_like(r.end, r.tokens.shape[1] - 1) if end_last else r.end
    last = logits[rows, end]
    return (last[rows, r.io_id] - last[rows, r.s_id]).float().cpu()


#: Heads the mean-ablation check removes: the positional copiers, and heads of three layers.
ABLATION_HEADS: list[list[Head]] = [[(3, 3), (3, 4)], [(1, 6), (3, 5), (4, 1)]]


def check_mean_ablated_logit_diff(mean_ablated_logit_diff: Callable) -> None:
    """``mean_ablated_logit_diff(model, items, heads) -> [n]``: each prompt's logit difference at END
    with every head in ``heads`` replaced (``hook_z``, every position) by its mean over the ABC
    prompts of the same template (Wang et al.'s mean ablation)."""
    from .. import ioi_circuit

    name = "mean_ablated_logit_diff"
    model, items = deep_model(), circuit_items()
    for heads in ABLATION_HEADS:
        expected = ioi_circuit.logit_diff(model, items, heads)
        got = to_tensor(name, _call(name, mean_ablated_logit_diff, model, [dict(it) for it in items], list(heads)))
        v = functools.partial(_later, variant_ablated_ld, model, items, heads)
        try:
            compare(name, got, expected, ("prompt",), alternatives=[
                ("set the heads to zero instead of their mean: zero is far from anything the model saw "
                 "(Wang et al. replace a head by its mean over the ABC prompts)", v(zero=True)),
                ("take one mean over every prompt instead of one per template: positions of different templates "
                 "hold different words, so average only prompts of the same template", v(grouping="all")),
                ("average the clean prompts instead of the ABC ones: the clean mean still carries which name is "
                 "repeated; the ABC prompts (three different names) do not", v(source="clean")),
                ("give each prompt its own ABC run's value (resample ablation) instead of the template's mean",
                 v(grouping="own")),
                ("average over positions as well: the mean is taken at each position separately",
                 v(over_positions=True)),
                ("read the logits at the last column (position -1) instead of at END: the batch is right-padded",
                 v(end_last=True)),
            ], atol=2e-3, rtol=1e-3)
        except GradingError as err:
            raise GradingError(f"{err}\n(with heads={heads})") from None
    report_pass(name, "matches patchwidgets.ioi_circuit.logit_diff with ablate= (per-template ABC mean)")


# ---------------------------------------------------------------------------------------------
# Exercise 6: faithfulness
# ---------------------------------------------------------------------------------------------

def _every_head(model: Any) -> list[Head]:
    return [(layer, head) for layer in range(model.cfg.n_layers) for head in range(model.cfg.n_heads)]


def variant_faithfulness(model: Any, items: Sequence[dict], circuit: Sequence[Head], *, ablate_circuit: bool = False,
                         upside_down: bool = False, ratio: bool = True, per_prompt: bool = False,
                         **ablation: Any) -> float:
    """F(C) / F(M) with switches for the usual mistakes (``ablation`` goes to
    :func:`variant_ablated_ld`)."""
    keep = set(map(tuple, circuit))
    outside = [h for h in _every_head(model) if h not in keep]
    full = variant_ablated_ld(model, items, [])
    kept = variant_ablated_ld(model, items, sorted(keep) if ablate_circuit else outside, **ablation)
    if per_prompt:
        return float((kept / full).mean())
    if not ratio:
        return float(kept.mean())
    return float(full.mean() / kept.mean()) if upside_down else float(kept.mean() / full.mean())


def check_faithfulness(faithfulness: Callable) -> None:
    """``faithfulness(model, items, circuit) -> float``: F(C) / F(M), the mean logit difference with
    every head *outside* ``circuit`` mean-ablated (per-template ABC mean), over the model's own."""
    from .. import ioi_circuit

    name = "faithfulness"
    model, items = deep_model(), circuit_items()
    for circuit in CHECK_CIRCUITS:
        expected = torch.tensor(ioi_circuit.faithfulness(model, items, circuit))
        value = _call(name, faithfulness, model, [dict(it) for it in items], list(circuit))
        got = to_tensor(name, value).reshape(())
        v = functools.partial(_later, variant_faithfulness, model, items, circuit)
        try:
            compare(name, got, expected, (), alternatives=[
                ("mean-ablate the circuit instead of its complement: F(C) keeps the circuit and ablates every "
                 "other head", v(ablate_circuit=True)),
                ("divide the other way round: faithfulness is F(C) / F(M), the circuit's logit difference over "
                 "the full model's", v(upside_down=True)),
                ("return F(C) itself (a logit difference) instead of the ratio F(C) / F(M)", v(ratio=False)),
                ("zero-ablate the complement instead of mean-ablating it", v(zero=True)),
                ("take one mean over every prompt instead of one per template", v(grouping="all")),
                ("average per-prompt ratios instead of dividing the mean logit differences", v(per_prompt=True)),
                ("return 1 - F(C)/F(M) (the share lost) instead of the share kept",
                 _later(torch.sub, torch.tensor(1.0), expected)),
            ], atol=2e-3, rtol=1e-3)
        except GradingError as err:
            raise GradingError(f"{err}\n(with circuit={circuit})") from None
    report_pass(name, "matches patchwidgets.ioi_circuit.faithfulness")


# ---------------------------------------------------------------------------------------------
# Exercise 7: minimality
# ---------------------------------------------------------------------------------------------

#: (circuit, v, K) cases the minimality check asks about.
MINIMALITY_CASES: list[tuple[list[Head], Head, list[Head]]] = [
    (CHECK_CIRCUITS[0], (3, 3), [(3, 4)]),
    (CHECK_CIRCUITS[0], (3, 6), []),
    (CHECK_CIRCUITS[0], (1, 6), [(2, 5)]),
]


def variant_minimality(model: Any, items: Sequence[dict], circuit: Sequence[Head], v: Head, k: Sequence[Head], *,
                       whole_model: bool = False, keep_k: bool = False, signed: bool = False, ratio: bool = False,
                       **ablation: Any) -> float:
    """|F(C \\ (K + v)) - F(C \\ K)| with switches for the usual mistakes: ``whole_model`` removes
    from the model instead of the circuit, ``keep_k`` forgets to remove K, ``signed`` keeps the
    sign, ``ratio`` divides instead of subtracting (``ablation`` goes to :func:`variant_ablated_ld`)."""
    base = list(_every_head(model)) if whole_model else [tuple(h) for h in circuit]

    def f(removed: Sequence[Head]) -> float:
        kept = set(base) - set(map(tuple, removed))
        outside = [h for h in _every_head(model) if h not in kept]
        return float(variant_ablated_ld(model, items, outside, **ablation).mean())

    k = [] if keep_k else list(k)
    without_v, with_v = f(k + [tuple(v)]), f(k)
    if ratio:
        return without_v / with_v
    return without_v - with_v if signed else abs(without_v - with_v)


def check_minimality(minimality: Callable) -> None:
    """``minimality(model, items, circuit, v, K) -> float``: |F(C \\ (K ∪ {v})) - F(C \\ K)|, where
    F(H) is the mean logit difference with every head outside H mean-ablated (per-template ABC
    mean), as Wang et al. score a head's place in the circuit."""
    from .. import ioi_circuit

    name = "minimality"
    model, items = deep_model(), circuit_items()
    means = ioi_circuit.abc_means(model, items)

    def F(kept: set) -> float:
        outside = [h for h in _every_head(model) if h not in kept]
        return float(ioi_circuit.logit_diff(model, items, outside, means).mean())

    for circuit, v, k in MINIMALITY_CASES:
        c_minus_k = set(circuit) - set(k)
        expected = torch.tensor(abs(F(c_minus_k - {v}) - F(c_minus_k)))
        got = to_tensor(name, _call(name, minimality, model, [dict(it) for it in items], list(circuit), v,
                                    list(k))).reshape(())
        alt = functools.partial(_later, variant_minimality, model, items, circuit, v, k)
        try:
            compare(name, got, expected, (), alternatives=[
                ("remove K and v from the whole model instead of from the circuit: minimality asks whether v "
                 "matters *to the circuit*, F(C \\ (K ∪ {v})) against F(C \\ K)", alt(whole_model=True)),
                ("forget K: remove K from both sides (F(C \\ K) and F(C \\ (K ∪ {v}))); K is there so that "
                 "a partner that does v's job does not hide it", alt(keep_k=True)),
                ("keep the sign: Wang et al. score the size of the change, |F(C \\ (K ∪ {v})) - F(C \\ K)|",
                 alt(signed=True)),
                ("divide instead of subtracting: the score is a difference of logit differences", alt(ratio=True)),
                ("zero-ablate instead of mean-ablating", alt(zero=True)),
                ("take one mean over every prompt instead of one per template", alt(grouping="all")),
            ], atol=2e-3, rtol=1e-3)
        except GradingError as err:
            raise GradingError(f"{err}\n(with v={v}, K={k})") from None
    report_pass(name, "matches |F(C \\ (K + v)) - F(C \\ K)| from patchwidgets.ioi_circuit.logit_diff")
