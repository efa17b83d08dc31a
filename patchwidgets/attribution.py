"""Attribution patching: estimate every patch at once from one backward pass.

Exact activation patching costs one forward pass per patch (batched, but still one per patch).
Attribution patching (AtP; Nanda 2023, Kramár et al. 2024) replaces each of them by a
first-order Taylor estimate. Write ``a`` for an activation, ``M`` for the metric and ``T``/``S``
for the target and source runs (corrupted/clean when denoising, clean/corrupted when noising)::

    M(patch a := a_S)  ≈  M(T) + (a_S - a_T) · ∂M/∂a |_T

so one forward pass of each run plus one backward pass of the target run (for the gradient of
the metric with respect to every activation at once) price every patch of every site: the
residual stream, attention and MLP outputs, each head's output, queries, keys, values and
pattern, and each neuron. The numbers fill a :class:`AttributionResult` whose ``grid`` has the
shape of :func:`patchwidgets.patch` for the same site, so it can be drawn first and replaced
by the exact values as they arrive.

Where the linear estimate is good, and where it breaks
------------------------------------------------------
The estimate is exact when the metric is linear in the patched activation, so it is good for
small, "additive" patches: one head's output or value among many. It breaks when the patch
moves the model far from the target run, where the gradient no longer describes it:

* **whole-residual patches** (``resid_pre``/``resid_mid``/``resid_post`` at the token that
  differs between the prompts, and everything in layer 0 there): the patch swaps the token's
  entire representation; the true effect saturates (all of the behaviour, ``normalized``
  ≈ 1), while the gradient at the target extrapolates linearly and can overshoot or even
  get the sign wrong.
* **attention saturation**: a query or key patch that moves a softmax from one key to another
  is strongly nonlinear. AtP* (below) fixes that part.
* **metrics at an extremum**: ``kl`` has zero gradient at the clean run, so noising estimates
  are all 0; discrete metrics (``rank``, ``accuracy``) have no gradient and are refused.

AtP* for queries and keys (``qk_fix=True``, the default)
--------------------------------------------------------
Queries and keys act on the output only through the attention pattern, ``softmax(q·k/√d)``.
Instead of linearising the softmax, the estimate recomputes the pattern *exactly* with the
patched queries or keys, and linearises only what comes after it::

    ΔM ≈ (pattern(q_S, k_T) - pattern(q_T, k_T)) · ∂M/∂pattern

Patching one query position changes one row of the pattern, so all positions are computed in
one softmax. Patching one key position ``t`` changes one score in each row; with ``p`` the
old attention to ``t``, ``δ`` the change of its score and ``ḡ`` the pattern-weighted mean
gradient of the *other* keys in that row, the new attention is ``p' = σ(logit(p) + δ)`` and
``ΔM_row = (p' - p) · (∂M/∂p_t - ḡ)`` (the mass gained by ``t`` is taken from the others in
proportion). GradDrop, the other half of AtP*, is not implemented. If the pattern cannot be
rebuilt from the hooked queries and keys (rotary embeddings, ALiBi, soft-capping), the plain
linear estimate is used and ``result.stats["qk_fix"]`` is 0.

Checking an estimate
--------------------
``result.compare(exact_result)`` (:func:`compare`) reports the Pearson correlation with exact
patching, per site and overall, and the cells the estimate missed by the most.

Backends
--------
This module is the bridge's implementation and the entry point: :func:`attribution_patch`
hands an nnsight model to :func:`patchwidgets.nnsight_backend.attribution_patch`. What both
backends share (the result type, the gradient groups, the per-site sums) is in
:mod:`patchwidgets.atp`, which imports neither.
"""

from __future__ import annotations

import inspect
import math
import warnings
import weakref
from typing import Any, Sequence

import torch

from .atp import (QK_SITES, AttributionResult, Comparison, attribution_result, compare, differentiated_metric,
                  gradient_groups, site_estimates)
from .inputs import Prompts
from .driver import own_arguments
from .sharing import exclusive
from .sources import ablation_values
from .sweep import prepare_request, sweep_cells

# The result and its comparison with exact patching live with the steps both backends share
# (:mod:`patchwidgets.atp`); this module, the entry point, names them too.
__all__ = ["attribution_patch", "AttributionResult", "Comparison", "compare"]


class _Stop(Exception):
    """Ends a forward pass once the final residual stream is in hand."""


# Whether a model's logits are ``unembed(ln_final(final residual))`` (checked once per model).
_SHORTCUT_OK: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def _run(model: Any, tokens: torch.Tensor, hooks: list, names: Sequence[str], answer_pos: torch.Tensor,
         stop: bool) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """One forward pass: answer logits computed from the final residual stream (``ln_final``
    and the unembedding at the answer position only), the model's own answer logits (``None``
    with ``stop``: the pass ends before the unembedding) and the activations ``names``.

    Each hook returns the tensor it saved, so the model computes on the very tensor whose
    gradient we ask for (some hook names are reshaped views of another tensor).
    """
    acts: dict[str, torch.Tensor] = {}
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(act: torch.Tensor, hook) -> torch.Tensor:
            if torch.is_grad_enabled() and not act.requires_grad:  # frozen weights: start the graph here
                act = act.detach().requires_grad_(True)
            acts[name] = act
            return act
        return hook

    def grab(resid: torch.Tensor, hook) -> None:
        captured["resid"] = resid
        if stop:
            raise _Stop

    final = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    logits = None
    with exclusive(model):  # (the model's hooks are ours alone for this pass: patchwidgets.sharing)
        try:
            logits = model.run_with_hooks(tokens, fwd_hooks=[*hooks, *[(n, keep(n)) for n in names], (final, grab)])
        except _Stop:
            pass
        rows = torch.arange(tokens.shape[0], device=captured["resid"].device)
        pos = answer_pos.to(rows.device)
        short = model.unembed(model.ln_final(captured["resid"][rows, pos][:, None]))[:, 0]
    return short, (None if logits is None else logits[rows, pos]), acts


def _agrees(a: torch.Tensor, b: torch.Tensor) -> bool:
    b = b.detach().to(a.device)  # a model split over GPUs unembeds on its last one
    return float((a.detach() - b).abs().max()) <= 1e-4 * (1.0 + float(b.abs().max()))


def attribution_patch(
    model: Any,
    clean: Prompts,
    corrupted: Prompts | None = None,
    answers: Any = None,
    site: str = "head_out",
    direction: str | None = None,
    metrics: Any = ("logit_diff", "normalized"),
    *,
    qk_fix: bool = True,
    ablation: str | None = None,
    noise: float = 3.0,
    noise_positions: Sequence[int] | None = None,
    noise_seed: int = 0,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    neurons: Sequence[int] | None = None,
    index: Sequence[tuple] | None = None,
    remote: bool = False,
) -> AttributionResult:
    """Estimate every patch of ``site`` from two forward passes and one backward pass per metric.

    Takes the arguments of :func:`patchwidgets.patch` (same defaults, same checks and errors)
    and returns the same layout: ``result.grid(metric)`` has the shape ``patch(...)`` gives
    for the same site and restrictions. ``logit_diff`` and ``normalized`` share one backward
    pass; every other metric costs one more.

    Args:
        qk_fix: AtP*: recompute the attention softmax exactly for query and key patches
            (module docstring). ``False`` gives plain AtP everywhere.
        remote: for an nnsight model (``nnsight.TransformersModel``, which this function also
            accepts, see :func:`patchwidgets.nnsight_backend.attribution_patch`): run the
            traces on NDIF.

    Raises:
        PatchingInputError: as :func:`patchwidgets.patch`, and for a discrete metric
            (``rank``, ``accuracy``), which has no gradient.
    """
    from . import nnsight_backend  # (imports nnsight only for an nnsight model)

    if remote or nnsight_backend.is_nnsight_model(model):
        return nnsight_backend.attribution_patch(model, own_arguments(_PARAMETERS, locals()))
    request = prepare_request(model, clean, corrupted, answers, direction, metrics, ablation=ablation,
                              noise=noise, noise_positions=noise_positions, noise_seed=noise_seed, gradient=True)
    inputs, metric_fns = request.inputs, request.metric_fns
    cells = sweep_cells(model, inputs, site, layers=layers, positions=positions, heads=heads, neurons=neurons,
                        index=index)
    sites, indices = cells.sites, cells.indices
    qk_layers = sorted({int(i[0]) for s in sites if s.name in QK_SITES for i in indices}) if qk_fix else []
    names = sorted(set(cells.hook_names()) | {
        f"blocks.{l}.attn.hook_{c}" for l in qk_layers for c in ("q", "k", "pattern")})
    target_run, source_run = request.runs(model)

    # --- Forward passes: the source without gradients, the target with them. Both stop before
    # the unembedding once this model has shown that unembedding the answer rows ourselves
    # gives its logits (checked on the first pass ever run on it).
    shortcut = _SHORTCUT_OK.get(model)
    source_logits = None
    if source_run is not None:
        with torch.no_grad():
            source_logits, full, source_acts = _run(model, source_run.tokens, source_run.hooks, names,
                                                    inputs.answer_pos, stop=bool(shortcut))
        if shortcut is None:
            assert full is not None  # (a pass not stopped early returns the model's logits)
            shortcut = _SHORTCUT_OK[model] = _agrees(source_logits, full)
        source_logits = source_logits if shortcut or full is None else full
    with torch.enable_grad():
        short, full, target_acts = _run(model, target_run.tokens, target_run.hooks, names, inputs.answer_pos,
                                        stop=bool(shortcut))
        if shortcut is None:
            assert full is not None
            shortcut = _SHORTCUT_OK[model] = _agrees(short, full)
        target_logits = short if shortcut or full is None else full
    cells.check_activations(target_acts)
    if source_run is None:
        source_acts = ablation_values({n: a.detach() for n, a in target_acts.items()}, request.ablation or "")
    measure = request.measure(target_logits.detach(), source_logits)
    ctx = measure.ctx

    # --- One backward pass per distinct gradient (normalized is an affine map of logit_diff).
    groups = gradient_groups(metric_fns)
    tensors = list({id(target_acts[n]): target_acts[n] for n in names}.values())
    per_group: dict[str, list[torch.Tensor]] = {}
    qk_ok = bool(qk_layers)
    for g, key in enumerate(groups):
        with torch.enable_grad():
            scalar = differentiated_metric(key, metric_fns, target_logits, ctx)
            grads = torch.autograd.grad(scalar.sum(), tensors, retain_graph=g < len(groups) - 1, allow_unused=True)
        grad_of = {id(t): gr for t, gr in zip(tensors, grads)}
        grad = {n: grad_of[id(target_acts[n])] for n in names}
        qk = _qk_estimates(model, qk_layers, target_acts, source_acts, grad) if qk_ok else None
        if qk_ok and qk is None:
            qk_ok = False
            warnings.warn("cannot rebuild the attention pattern from hook_q/hook_k on this model (rotary, "
                          "ALiBi or soft-capped scores?): using plain AtP for queries and keys", stacklevel=2)
        per_group[key] = [site_estimates(s, indices, inputs.batch, target_acts, source_acts, grad, qk) for s in sites]

    n_cells = len(indices)
    result = attribution_result(request, cells, measure, groups, per_group,
                                method="atp*" if qk_fix and (qk_ok or not qk_layers) else "atp")
    result.stats = {"patches": n_cells * len(sites), "forward_passes": 1 + (source_run is not None),
                    "backward_passes": len(groups), "qk_fix": int(qk_ok), "logits_shortcut": int(shortcut)}
    return result


_PARAMETERS = tuple(inspect.signature(attribution_patch).parameters)


# ---------------------------------------------------------------------------- AtP* for q and k
def _attention_scale(cfg: Any, layer: int, d_head: int) -> float:
    scale = 1.0
    if getattr(cfg, "use_attn_scale", True):
        given = getattr(cfg, "attn_scale", -1.0)
        scale = given if given and given > 0 else math.sqrt(d_head)
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
        scale *= layer + 1
    return scale


def _qk_estimates(model: Any, layers: list[int], target_acts, source_acts, grad):
    """AtP* estimates ``{(layer, site name): reduced tensor}`` for the q/k sites of ``layers``,
    or ``None`` when the hooked pattern cannot be rebuilt from the hooked q and k."""
    out = {}
    for layer in layers:
        name = f"blocks.{layer}.attn.hook_{{}}".format
        q_t, k_t = target_acts[name("q")].detach().double(), target_acts[name("k")].detach().double()
        q_s, k_s = source_acts[name("q")].double(), source_acts[name("k")].double()
        g = grad[name("pattern")]
        g = torch.zeros_like(target_acts[name("pattern")], dtype=torch.float64) if g is None else g.double()
        n_heads, n_kv = q_t.shape[2], k_t.shape[2]
        if n_heads % n_kv:
            return None
        rep = n_heads // n_kv
        k_t, k_s = k_t.repeat_interleave(rep, 2), k_s.repeat_interleave(rep, 2)
        scale = _attention_scale(model.cfg, layer, q_t.shape[-1])
        n = q_t.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=q_t.device).tril()

        def log_pattern(q, k, scale=scale, causal=causal):  # (this layer's scale and mask, bound now)
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / scale
            return scores.masked_fill(~causal, float("-inf")).log_softmax(-1)

        logp = log_pattern(q_t, k_t)
        p = logp.exp()
        if not _agrees(p, target_acts[name("pattern")].double()):
            return None
        # Queries: a query position is one row of the pattern, so every row at once is every
        # single-position patch at once; the all-positions patch is their sum.
        dq = ((log_pattern(q_s, k_t).exp() - p) * g).sum(-1)                      # [b, head, q]
        out[(layer, "head_q_by_pos")] = dq.transpose(1, 2)
        out[(layer, "head_q")] = dq.sum(-1)
        # Keys, all positions together: recompute the whole pattern.
        dk_all = ((log_pattern(q_t, k_s).exp() - p) * g).sum((-1, -2))            # [b, head]
        out[(layer, "head_k")] = dk_all.reshape(-1, n_kv, rep).sum(-1)
        # Keys one position at a time: one score per row changes (closed form, module docstring).
        out[(layer, "head_k_by_pos")] = _key_by_pos(logp, g, torch.einsum(
            "bqhd,bkhd->bhqk", q_t, k_s - k_t) / scale, causal).reshape(-1, n_kv, rep, n).sum(2).transpose(1, 2)
    return out


def _key_by_pos(logp: torch.Tensor, g: torch.Tensor, delta: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
    """``[b, head, key]``: summed over query rows, the change of ``pattern · g`` when the score
    of one key position rises by ``delta[b, h, q, key]`` and the row is re-softmaxed.

    ``p' = σ(logit p + δ)`` and ``Δ = (p' - p)(g_key - ḡ_others)``, in float64. The attention
    left for the other keys, ``1 - p``, is summed from their own entries rather than subtracted
    from 1, so a key holding all but 1e-17 of the attention still moves correctly when knocked
    out; a key that holds all of it (nothing else attended) or none (masked) contributes nothing.
    """
    p = logp.exp()
    rest = _sum_of_others(p)                                     # 1 - p, without cancellation
    new_p = torch.sigmoid(logp - rest.log() + delta)
    others = _sum_of_others(p * g) / rest                        # mean gradient of the other keys
    change = (new_p - p) * (g - others)
    change = torch.where(causal & (rest > 0), change, torch.zeros_like(change))
    return torch.nan_to_num(change, nan=0.0, posinf=0.0, neginf=0.0).sum(-2)


def _sum_of_others(x: torch.Tensor) -> torch.Tensor:
    """``Σ_{u≠t} x_u`` along the last axis, from sums before and after ``t`` (no subtraction)."""
    zero = torch.zeros_like(x[..., :1])
    before = torch.cat([zero, x.cumsum(-1)[..., :-1]], -1)
    after = torch.cat([zero, x.flip(-1).cumsum(-1)[..., :-1]], -1).flip(-1)
    return before + after
