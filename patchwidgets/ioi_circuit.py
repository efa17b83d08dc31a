"""The IOI circuit's classes of heads, measured as Wang et al. (2022) define them.

"Interpretability in the Wild" names the heads of GPT-2 small's indirect-object circuit by
what each does, and gives a measurement for each claim. This module makes those
measurements on any model that speaks the IOI prompts of :func:`patchwidgets.datasets.ioi_prompts`
(the bundled ``toy-ioi`` and ``toy-ioi-deep``, or GPT-2 itself when online):

* :func:`attention` from one role's position to another's, averaged over prompts
  (name movers attend END -> IO; S-inhibition heads END -> S2; duplicate-token heads
  S2 -> S1, induction heads S2 -> S1+1);
* :func:`direct_effects`: each head's path to the logits patched with the ABC run (the
  sentence with three different names), the drop in logit difference it causes
  (:func:`patchwidgets.path_patch`, ``receivers=None``);
* :func:`path_effects`: the same, for the path from every head into chosen receivers'
  queries, keys or values; :func:`path_effect_at` patches one sender at one role's position only;
* :func:`copy_scores`: what a head's OV circuit does to a name it attends to (the name's
  own logit is the largest, or the smallest, of all names'):
* :func:`direct_effects_ablated`: the direct effects again with some heads mean-ablated (the
  ABC mean at each position), to see backup heads take over (and
  :func:`direct_logit_attribution`, the strictly direct path through the final LayerNorm);
* :func:`faithfulness`: the logit difference a circuit of heads keeps when every other head
  is mean-ablated.

Every function takes the model and the prompt dicts of ``ioi_prompts`` (``clean``, ``abc``,
``correct``, ``incorrect``); positions are found from the tokens, so templates of any length
can be mixed. Means for ablation are taken per template and length, so each position is
averaged only with the same position of the same sentence shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from .path_patching import path_patch

__all__ = ["Roles", "roles", "attention", "direct_effects", "path_effects", "path_effect_at", "copy_scores",
           "direct_logit_attribution", "direct_effects_ablated", "abc_means", "ablation_hooks", "faithfulness",
           "IOICircuit", "find_circuit"]

Head = tuple[int, int]


@dataclass(frozen=True)
class Roles:
    """Token positions of each role in a batch of IOI prompts (each ``[n]``)."""

    tokens: torch.Tensor  # [n, pos], right-padded
    io: torch.Tensor
    s1: torch.Tensor
    s2: torch.Tensor
    end: torch.Tensor
    io_id: torch.Tensor
    s_id: torch.Tensor

    @property
    def n(self) -> int:
        return self.tokens.shape[0]


def _single_token(model: Any, text: str) -> int:
    ids = model.to_tokens(text, prepend_bos=False)[0]
    if len(ids) != 1:
        raise ValueError(f"{text!r} is not one token for this model")
    return int(ids[0])


def roles(model: Any, items: Sequence[dict], key: str = "clean") -> Roles:
    """Tokens of ``item[key]`` and the positions of IO, S1, S2 and END in each.

    Positions come from the *clean* prompt (``ABC`` prompts share its shape, names being
    single tokens), so ``roles(model, items, "abc")`` gives the ABC tokens at the clean roles.
    """
    rows, io, s1, s2, end, io_id, s_id = [], [], [], [], [], [], []
    for item in items:
        clean = model.to_tokens(item["clean"])[0]
        row = clean if key == "clean" else model.to_tokens(item[key])[0]
        if len(row) != len(clean):
            raise ValueError(f"{item[key]!r} and its clean prompt differ in length")
        i, s = _single_token(model, item["correct"]), _single_token(model, item["incorrect"])
        s_at = (clean == s).nonzero().flatten().tolist()
        io_at = (clean == i).nonzero().flatten().tolist()
        if len(s_at) != 2 or len(io_at) != 1:
            raise ValueError(f"not an IOI prompt (S twice, IO once): {item['clean']!r}")
        rows.append(row)
        io.append(io_at[0])
        s1.append(s_at[0])
        s2.append(s_at[1])
        end.append(len(row) - 1)
        io_id.append(i)
        s_id.append(s)
    width = max(len(r) for r in rows)
    pad = model.tokenizer.pad_token_id or 0
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    for k, r in enumerate(rows):
        tokens[k, : len(r)] = r
    as_t = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return Roles(tokens, as_t(io), as_t(s1), as_t(s2), as_t(end), as_t(io_id), as_t(s_id))


def _end_logit_diff(logits: torch.Tensor, r: Roles) -> torch.Tensor:
    """``logit(IO) - logit(S)`` at each prompt's END, ``[n]`` (the batch is right-padded, so END
    is ``r.end``, not position -1)."""
    rows = torch.arange(r.n)
    last = logits[rows, r.end]  # [n, vocab]
    return last[rows, r.io_id] - last[rows, r.s_id]


@torch.no_grad()
def attention(model: Any, r: Roles, query: str, key: str, offset: int = 0) -> torch.Tensor:
    """Mean attention ``[layer, head]`` from role ``query`` to role ``key`` (+ ``offset``).

    Roles are ``"io"``, ``"s1"``, ``"s2"``, ``"end"``: ``attention(m, r, "end", "io")`` is a
    name mover's signature, ``attention(m, r, "s2", "s1", offset=1)`` an induction head's.
    """
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(r.tokens, names_filter=lambda name: name in names)
    rows = torch.arange(r.n)
    q, k = getattr(r, query), getattr(r, key) + offset
    # each pattern: [batch, head, query_pos, key_pos]
    return torch.stack([cache[name][rows, :, q, k].float().mean(0) for name in names]).cpu()


def _answers(items: Sequence[dict]) -> list[tuple[str, str]]:
    return [(item["correct"], item["incorrect"]) for item in items]


def direct_effects(model: Any, items: Sequence[dict], **kwargs: Any) -> torch.Tensor:
    """Each head's direct effect on the logit difference, ``[layer, head]``.

    The head's path to the logits is patched with its output on the ABC prompt (noising): every
    other head keeps its clean output, the MLPs are recomputed, as in Wang et al. and ARENA's
    replication (``freeze_mlps=True`` keeps only the strictly direct path); the value is how
    much the clean logit difference
    *drops*: positive for a head that pushes IO over S, negative for one that pushes back.
    """
    result = path_patch(model, [it["clean"] for it in items], [it["abc"] for it in items],
                        _answers(items), receivers=None, direction="noising",
                        metrics="logit_diff", progress=False, **kwargs)
    clean = result.baselines["clean"]["logit_diff"].float().mean()
    return (clean - result.grid("logit_diff")).cpu()


def path_effects(model: Any, items: Sequence[dict], receivers: Sequence[Head], receiver_input: str,
                 **kwargs: Any) -> torch.Tensor:
    """Drop in logit difference, ``[layer, head]``, when each sender head's path into the
    ``receivers``' ``receiver_input`` (``"q"``, ``"k"``, ``"v"``) carries its ABC output."""
    result = path_patch(model, [it["clean"] for it in items], [it["abc"] for it in items],
                        _answers(items), receivers=list(receivers), receiver_input=receiver_input,
                        direction="noising", metrics="logit_diff", progress=False, **kwargs)
    clean = result.baselines["clean"]["logit_diff"].float().mean()
    return (clean - result.grid("logit_diff")).cpu()


@torch.no_grad()
def copy_scores(model: Any, names: Iterable[str], top: int = 1, whole_vocab: bool = False) -> torch.Tensor:
    """How each head's OV circuit treats a name it attends to, ``[layer, head]`` in [-1, 1].

    For every name (``" Mary"``), its embedding plus the first MLP's output on it (the first
    MLP acts as part of the embedding in GPT-2, so Wang et al. include it) goes through the
    head's value and output weights and the unembedding. Positive: the fraction of names
    whose own logit is among the ``top`` largest (a copying head); negative: minus the
    fraction whose own logit is among the ``top`` smallest (a copy-suppressing head);
    whichever is larger in size.

    The default compares a name with the other *names* and asks for the largest (``top=1``),
    a strict test. Wang et al. count a name among the 5 largest logits of the whole vocabulary
    (``top=5, whole_vocab=True``), which is looser the smaller the vocabulary: 5 of GPT-2's
    50,257 tokens, but 5 of a toy model's few hundred.
    """
    ids = torch.tensor([_single_token(model, name) for name in names])
    block0 = model.blocks[0]
    embed = model.W_E[ids]  # [n, d_model]
    resid = embed + block0.mlp(block0.ln2(embed[:, None]))[:, 0]
    unembed = model.W_U if whole_vocab else model.W_U[:, ids]  # [d_model, vocab or names]
    own = (ids if whole_vocab else torch.arange(len(ids)))[:, None].to(unembed.device)  # [n, 1]: each name's column
    out = []
    for layer in range(model.cfg.n_layers):
        block = model.blocks[layer]
        x = block.ln1(resid[:, None])[:, 0]  # [n, d_model]
        ov = torch.einsum("nm,hmd,hde->hne", x, model.W_V[layer], model.W_O[layer])
        logits = model.ln_final(ov) @ unembed  # [head, n, vocab or names]
        highest = (logits.topk(top, -1).indices == own).any(-1).float().mean(-1)  # [head]
        lowest = (logits.topk(top, -1, largest=False).indices == own).any(-1).float().mean(-1)
        out.append(torch.where(highest >= lowest, highest, -lowest))
    return torch.stack(out).cpu()


def _shape_key(item: dict, length: int) -> tuple[str, int]:
    return item["template"], length


@torch.no_grad()
def abc_means(model: Any, items: Sequence[dict]) -> torch.Tensor:
    """Every head's output ``z`` averaged over the ABC prompts of the same shape.

    Returns ``[n, pos, layer, head, d_head]``: for each prompt, the mean of ``hook_z`` over
    the ABC prompts with its template and length (Wang et al.'s per-template mean).
    """
    r = roles(model, items, "abc")
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(r.tokens, names_filter=lambda name: name in names)
    z = torch.stack([cache[name] for name in names], 2)  # [n, pos, layer, head, d_head]
    keys = [_shape_key(item, int(e) + 1) for item, e in zip(items, r.end)]
    means = torch.empty_like(z)
    for key in set(keys):
        members = torch.tensor([k == key for k in keys])
        means[members] = z[members].mean(0, keepdim=True)
    return means


def ablation_hooks(model: Any, heads: Iterable[Head], means: torch.Tensor | None) -> list:
    """``(hook name, hook)`` pairs that replace each of ``heads``' output (``hook_z``, every
    position) by ``means[:, :pos, layer, head]`` (``[n, pos, layer, head, d_head]``, e.g. from
    :func:`abc_means`), for ``model.hooks(fwd_hooks=...)``."""
    heads = list(heads)
    if not heads:
        return []
    assert means is not None  # callers compute them when something is ablated
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)

    def hook_for(layer: int, chosen: list[int]):
        def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:  # [batch, pos, head, d_head]
            z = z.clone()
            z[:, :, chosen] = means[:, : z.shape[1], layer, chosen].to(z.dtype)
            return z
        return hook

    return [(f"blocks.{layer}.attn.hook_z", hook_for(layer, chosen)) for layer, chosen in by_layer.items()]


@torch.no_grad()
def direct_logit_attribution(model: Any, items: Sequence[dict], ablate: Iterable[Head] = (),
                             means: torch.Tensor | None = None) -> torch.Tensor:
    """Each head's direct contribution to the logit difference at END, ``[layer, head]``.

    The head's output at END, through the final LayerNorm of that run with its scale frozen
    (centred, divided by the scale, times the LayerNorm's weight), on ``W_U[IO] - W_U[S]``. The
    same for every other component (embeddings, each MLP, the attention biases) plus the
    LayerNorm's bias and ``b_U`` on that direction sums to the logit difference exactly.
    ``ablate`` heads are replaced by their ABC mean (``means`` from :func:`abc_means`) first,
    so the other heads' values show who takes over.
    """
    r = roles(model, items)
    ablate = list(ablate)
    if ablate and means is None:
        means = abc_means(model, items)
    z_names = [f"blocks.{layer}.attn.hook_z" for layer in range(model.cfg.n_layers)]
    hooks = ablation_hooks(model, ablate, means)
    with model.hooks(fwd_hooks=hooks):
        _, cache = model.run_with_cache(
            r.tokens, names_filter=lambda name: name in z_names or name == "ln_final.hook_scale")
    rows = torch.arange(r.n)
    scale = cache["ln_final.hook_scale"][rows, r.end]  # [n, 1]
    direction = (model.W_U[:, r.io_id] - model.W_U[:, r.s_id]).T  # [n, d_model]
    # The LayerNorm's weight multiplies every component on its way to W_U. Only a model whose
    # weight was folded into W_U ("LNPre") has none; any other model without one is an error,
    # not a reason to leave the weight out silently.
    if model.cfg.normalization_type != "LNPre":
        direction = direction * model.ln_final.w
    out = []
    for layer, name in enumerate(z_names):
        z = cache[name][rows, r.end]  # [n, head, d_head]
        head_out = torch.einsum("nhd,hde->nhe", z, model.W_O[layer])
        head_out = head_out - head_out.mean(-1, keepdim=True)  # LayerNorm centres
        out.append((torch.einsum("nhe,ne->nh", head_out, direction) / scale).mean(0))
    return torch.stack(out).float().cpu()


@torch.no_grad()
def logit_diff(model: Any, items: Sequence[dict], ablate: Iterable[Head] = (),
               means: torch.Tensor | None = None) -> torch.Tensor:
    """Per-prompt logit difference ``[n]``, with ``ablate`` heads mean-ablated."""
    r = roles(model, items)
    ablate = list(ablate)
    if ablate and means is None:
        means = abc_means(model, items)
    hooks = ablation_hooks(model, ablate, means)
    with model.hooks(fwd_hooks=hooks):
        logits = model(r.tokens)
    return _end_logit_diff(logits, r).float().cpu()


@torch.no_grad()
def direct_effects_ablated(model: Any, items: Sequence[dict], ablate: Iterable[Head] = (),
                           means: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`direct_effects` in a model whose ``ablate`` heads are replaced by their ABC mean.

    Written out with hooks, one forward pass per head (the engine's batched passes reorder
    and trim the batch, which per-prompt means cannot follow): every head's output is frozen
    to its value in the ablated clean run except the head measured, which gets its value in
    the ablated ABC run; the MLPs are recomputed. With nothing ablated it equals
    :func:`direct_effects` (a test checks that, so the two implementations check each other).
    """
    ablate = list(ablate)
    if ablate and means is None:
        means = abc_means(model, items)
    clean_r, abc_r = roles(model, items), roles(model, items, "abc")
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(model.cfg.n_layers)]
    hooks = ablation_hooks(model, ablate, means)
    with model.hooks(fwd_hooks=hooks):
        clean_logits, clean_cache = model.run_with_cache(clean_r.tokens, names_filter=lambda n: n in names)
        _, abc_cache = model.run_with_cache(abc_r.tokens, names_filter=lambda n: n in names)

    def ld(logits: torch.Tensor) -> torch.Tensor:
        return _end_logit_diff(logits, clean_r).float().mean()

    def freeze(layer: int, head: int | None):
        def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:  # [batch, pos, head, d_head]
            z = clean_cache[names[layer]].clone()
            if head is not None:
                z[:, :, head] = abc_cache[names[layer]][:, :, head]
            return z
        return hook

    base = ld(clean_logits)  # the ablated clean run
    out = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            frozen = [(names[k], freeze(k, head if k == layer else None)) for k in range(model.cfg.n_layers)]
            with model.hooks(fwd_hooks=frozen):
                out[layer, head] = base - ld(model(clean_r.tokens))
    return out


@torch.no_grad()
def path_effect_at(model: Any, items: Sequence[dict], sender: Head, role: str | None = None,
                   receivers: Sequence[Head] = (), receiver_input: str = "q") -> float:
    """Position-specific path patching: the drop in mean logit difference when ``sender``'s
    output carries its ABC value only at ``role``'s position (``"io"``, ``"s1"``, ``"s2"``,
    ``"end"``; ``None``: every position).

    Every other head keeps its clean output and the MLPs are recomputed, so only paths that
    start at the sender remain. With no ``receivers`` the path ends at the logits (at every
    position this is :func:`direct_effects`); with ``receivers`` it ends at their
    ``receiver_input`` (``"q"``, ``"k"`` or ``"v"``): those inputs are read from the frozen run
    and pasted into a clean run, in which everything after them is recomputed (at every position
    this is :func:`path_effects`). Written with hooks rather than the engine, which patches a
    sender at every position; the tests check the two agree where both apply.
    """
    if receiver_input not in ("q", "k", "v"):
        raise ValueError(f"receiver_input must be 'q', 'k' or 'v', not {receiver_input!r}")
    clean_r, abc_r = roles(model, items), roles(model, items, "abc")
    n, width = clean_r.tokens.shape
    if role is None:
        at = torch.ones(n, width, dtype=torch.bool)  # [n, pos]
    else:
        at = torch.arange(width)[None] == getattr(clean_r, role)[:, None]  # [n, pos]: one True per prompt
    z_names = [f"blocks.{layer}.attn.hook_z" for layer in range(model.cfg.n_layers)]
    clean_logits, clean_z = model.run_with_cache(clean_r.tokens, names_filter=lambda name: name in z_names)
    _, abc_z = model.run_with_cache(abc_r.tokens, names_filter=lambda name: name in z_names)
    layer_s, head_s = sender
    sent = torch.where(at[:, :, None].to(clean_z[z_names[layer_s]].device),
                       abc_z[z_names[layer_s]][:, :, head_s], clean_z[z_names[layer_s]][:, :, head_s])

    def frozen(layer: int):
        def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:  # [batch, pos, head, d_head]
            z = clean_z[z_names[layer]].clone()
            if layer == layer_s:
                z[:, :, head_s] = sent
            return z
        return hook

    freeze_heads = [(name, frozen(layer)) for layer, name in enumerate(z_names)]

    def mean_ld(logits: torch.Tensor) -> float:
        return float(_end_logit_diff(logits, clean_r).float().mean())

    if not receivers:
        with model.hooks(fwd_hooks=freeze_heads):
            patched = mean_ld(model(clean_r.tokens))
    else:
        inputs = {layer: f"blocks.{layer}.attn.hook_{receiver_input}" for layer, _ in receivers}
        with model.hooks(fwd_hooks=freeze_heads):
            _, moved = model.run_with_cache(clean_r.tokens, names_filter=lambda name: name in inputs.values())

        def paste(layer: int):
            def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:  # [batch, pos, head (or kv head), d_head]
                group = model.cfg.n_heads // x.shape[2]  # query heads per key-value head (1 without GQA)
                heads = sorted({h // group for l, h in receivers if l == layer})
                x[:, :, heads] = moved[inputs[layer]][:, :, heads]
                return x
            return hook

        with model.hooks(fwd_hooks=[(name, paste(layer)) for layer, name in inputs.items()]):
            patched = mean_ld(model(clean_r.tokens))
    return mean_ld(clean_logits) - patched


def faithfulness(model: Any, items: Sequence[dict], circuit: Iterable[Head],
                 means: torch.Tensor | None = None) -> float:
    """F(circuit) / F(model): the mean logit difference kept when every head *outside*
    ``circuit`` is replaced by its ABC mean, over the model's own (Wang et al.)."""
    keep = set(map(tuple, circuit))
    outside = [(layer, head) for layer in range(model.cfg.n_layers)
               for head in range(model.cfg.n_heads) if (layer, head) not in keep]
    if means is None:
        means = abc_means(model, items)
    full = logit_diff(model, items).mean()
    kept = logit_diff(model, items, outside, means).mean()
    return float(kept / full)


# ------------------------------------------------------------------ naming the heads
#: Thresholds for each class, as fractions of the model's mean clean logit difference where
#: they are effects. Chosen before looking at any model, from the issue's definitions.
NAME_MOVER_ATTENTION = 0.4      # END -> IO, in ABBA and in BABA prompts alike
NAME_MOVER_EFFECT = 0.05        # direct effect >= 5% of the logit difference
COPY = 0.8                      # own name the top (or, negated, the bottom) name logit
NEGATIVE_EFFECT = -0.02         # direct effect <= -2% of the logit difference
NEGATIVE_ATTENTION = 0.2        # END -> IO
S_INHIBITION_EFFECT = 0.05      # via the name movers' queries, >= 5%
S_INHIBITION_ATTENTION = 0.3    # END -> S2
DUPLICATE_ATTENTION = 0.3       # S2 -> S1 (duplicate-token) or S2 -> S1+1 (induction)
DUPLICATE_EFFECT = 0.02         # via the S-inhibition heads' values, >= 2%
BACKUP_RISE = 0.2               # direct effect rises by >= 20% of what the name movers lost


@dataclass
class IOICircuit:
    """The heads of each class and the measurements that put them there."""

    logit_diff: float
    name_movers: list[Head]
    negative_name_movers: list[Head]
    s_inhibition: list[Head]
    duplicate_token: list[Head]
    induction: list[Head]
    backup: list[Head]
    #: In no class, yet moving the logit difference by >= 5%: directly, or through the queries of
    #: heads that attend the IO in both orders but fail the copy score (so that S-inhibition,
    #: whose receivers are name movers by definition, cannot name what steers them).
    unclassified: list[Head]
    measurements: dict[str, torch.Tensor]

    @property
    def heads(self) -> list[Head]:
        """Every head of the circuit, each once, in layer order."""
        classes = (self.name_movers, self.negative_name_movers, self.s_inhibition,
                   self.duplicate_token, self.induction, self.backup, self.unclassified)
        return sorted({h for heads in classes for h in heads})


def _where(mask: torch.Tensor) -> list[Head]:
    return [(int(layer), int(head)) for layer, head in mask.nonzero().tolist()]


def find_circuit(model: Any, items: Sequence[dict], names: Iterable[str]) -> IOICircuit:
    """Measure every head and name the classes by the thresholds above.

    ``names`` are the name tokens for copy scores (``" Mary"``, ...). Each class is found
    from the measurements alone, in the order the circuit computes: name movers first,
    then the heads that feed their queries, then the heads that feed those.
    """
    r = roles(model, items)
    ld = float(logit_diff(model, items).mean())
    # A head that attends "the first name" sits on the IO in half the prompts (ABBA) and on
    # S1 in the other half: 0.5 on average, and no name mover. So name movers must attend the
    # IO in each order on its own; the average is kept for the report.
    orders = sorted({item["order"] for item in items})
    by_order = [attention(model, roles(model, [it for it in items if it["order"] == order]), "end", "io")
                for order in orders]
    m = {
        "end_io": torch.stack(by_order).min(0).values,
        "end_io_mean": attention(model, r, "end", "io"),
        "end_s2": attention(model, r, "end", "s2"),
        "s2_s1": attention(model, r, "s2", "s1"),
        "s2_s1_plus_1": attention(model, r, "s2", "s1", offset=1),
        "direct": direct_effects(model, items),
        "copy": copy_scores(model, names),
    }
    attends_io = (m["end_io"] >= NAME_MOVER_ATTENTION) & (m["direct"] >= NAME_MOVER_EFFECT * ld)
    movers = _where(attends_io & (m["copy"] >= COPY))
    negative = _where((m["end_io"] >= NEGATIVE_ATTENTION) & (m["direct"] <= NEGATIVE_EFFECT * ld)
                      & (m["copy"] <= -COPY))

    def steering(receivers: list[Head], key: str) -> list[Head]:
        """Heads before the receivers that read S2 from END and move the logit difference
        through the receivers' queries (Wang et al.'s S-inhibition test)."""
        m[key] = path_effects(model, items, receivers, "q")
        earlier = torch.tensor([[layer < min(h[0] for h in receivers)] * model.cfg.n_heads
                                for layer in range(model.cfg.n_layers)])
        return _where(earlier & (m[key] >= S_INHIBITION_EFFECT * ld) & (m["end_s2"] >= S_INHIBITION_ATTENTION))

    s_inhibition = steering(movers, "into_movers_q") if movers else []
    # Heads that attend the IO like name movers but do not copy names: whatever steers them
    # matters as much, but is not S-inhibition by definition; it joins the unclassified heads.
    io_attenders = [h for h in _where(attends_io) if h not in movers]
    steers_attenders = steering(io_attenders, "into_io_attenders_q") if io_attenders else []
    duplicate: list[Head] = []
    induction: list[Head] = []
    if s_inhibition:
        m["into_s_inhibition_v"] = path_effects(model, items, s_inhibition, "v")
        feeds = m["into_s_inhibition_v"] >= DUPLICATE_EFFECT * ld
        duplicate = _where(feeds & (m["s2_s1"] >= DUPLICATE_ATTENTION))
        induction = _where(feeds & (m["s2_s1_plus_1"] >= DUPLICATE_ATTENTION))
    backup: list[Head] = []
    if movers:
        means = abc_means(model, items)
        before = m["direct"]
        after = direct_effects_ablated(model, items, movers, means)
        m["direct_movers_ablated"] = after
        lost = float(sum(before[h] - after[h] for h in movers))
        rise = after - before
        for h in movers:
            rise[h] = 0.0
        backup = _where(rise >= BACKUP_RISE * lost) if lost > 0 else []
    # A head that moves the answer this much but fits no class must still be in the circuit
    # (and named as unexplained), or faithfulness would measure a circuit with a hole.
    named = set(movers + negative + s_inhibition + duplicate + induction + backup)
    direct = _where(m["direct"].abs() >= NAME_MOVER_EFFECT * ld)
    unclassified = [h for h in sorted(set(direct + steers_attenders)) if h not in named]
    return IOICircuit(ld, movers, negative, s_inhibition, duplicate, induction, backup, unclassified, m)
