"""Path patching: *how* components connect, not just *which* ones matter.

Activation patching a head changes everything downstream of it, so a big effect says "this
head matters" but not *through what*. Path patching lets a patch travel along one path only:
from some **sender** heads to some **receivers**, with the rest of the model held fixed.

Two kinds of receiver are supported, each sweeping every sender head (one patch per sender):

* **the logits** (``receivers=None``): the sender's output reaches the final residual stream
  directly, not through any later attention head. Which heads write the answer?
* **the queries, keys or values of chosen receiver heads** (``receivers=[(9, 6), (9, 9)]``,
  ``receiver_input="q"``, ``"k"``, ``"v"`` or a combination like ``"kv"``): the sender's output
  reaches those inputs directly, and only the receivers' changed outputs travel on. Which
  heads tell the name movers where to look?

Which activation comes from which run
-------------------------------------
There are two unpatched runs, as in :func:`patchwidgets.patch`: the **target** (the run being
patched: corrupted when denoising, clean when noising) and the **source** (where the pasted
values come from: clean when denoising, corrupted when noising).

*Step 1, the sender run* (one per sender, batched): run the target, and

=========================================  =====================================================
sender head's output (``hook_z``)          **source**, at every position
every other head's output (``hook_z``)     **frozen** to the target run: they are not allowed
                                           to react, so no path through them is counted
MLP outputs (``hook_mlp_out``)             recomputed (default, as in Wang et al. 2022 and the
                                           ARENA course: MLPs count as part of the direct
                                           path), or frozen with ``freeze_mlps=True``
layer norms, embeddings                    recomputed / unchanged
=========================================  =====================================================

With ``receivers=None`` the answer logits of this run are the result: the final residual
stream holds the target's plus the sender's change (plus what the MLPs made of it).

*Step 2, the receiver run* (only with receivers): run the target again, replace each receiver
head's chosen input (``hook_q``/``hook_k``/``hook_v``, that head only, every position) by its
value in step 1, and let everything downstream of the receivers recompute. The sender itself
is not patched in step 2; it reaches the logits only through the receivers.

With ``freeze_mlps=True`` the receiver's input in step 1 is exactly the target's residual
stream plus the sender's change in output (``Δz @ W_O``), passed through the receiver's own
LayerNorm, which is what ``transformer_lens.patching.get_act_patch_direct_path`` computes.

Reading the result: with ``direction="denoising"`` a sender whose path restores the clean
answer (``normalized`` near 1) is *sufficient* along that path; with ``"noising"`` a path
whose corruption breaks the answer is *necessary*. A sender in a layer at or after every
receiver has no path to it; its cell holds the unpatched target value (0 normalised).

Speed
-----
Each sender costs one (step 1) or two (step 1 + 2) forward passes, but like the engine
(:mod:`patchwidgets.engine`) many senders share a pass, each owning ``batch`` rows; a pass
resumes at the first layer it changes and skips the positions before the first changed one.
Step 1 stops as soon as the last receiver input has been recorded.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from . import metrics as metrics_mod
from .engine import Engine
from .errors import PatchingInputError
from .inputs import PreparedInputs, Prompts, prepare
from .patching import PatchUpdate, check_request, metric_context, run_streaming
from .results import PatchResult
from .sites import SITES, enumerate_indices
from .sources import ablation_values, check_direction, differing_positions, noise_hooks

Head = tuple[int, int]


# ---------------------------------------------------------------------------- shared setup
@dataclass
class Runs:
    """The two unpatched runs of a sweep, described (not yet run).

    Shared by :func:`path_patch` and :func:`patchwidgets.attribution.attribution_patch`, so
    both accept exactly the inputs and raise exactly the errors of :func:`patchwidgets.patch`.
    """

    inputs: PreparedInputs
    direction: str
    metric_fns: dict
    ablation: str | None
    target_tokens: torch.Tensor
    target_hooks: list
    source_tokens: torch.Tensor | None    # None: a zero/mean ablation, built from the target
    source_hooks: list
    changed: torch.Tensor                 # [pos] bool: where the source's input differs from the target's


def setup_runs(model: Any, clean: Prompts, corrupted: Prompts | None, answers: Any,
               direction: str | None, metrics: Any, ablation: str | None = None,
               noise: float = 3.0, noise_positions: Sequence[int] | None = None,
               noise_seed: int = 0) -> Runs:
    """Check every input as :func:`patchwidgets.patch` does and say which run is which."""
    direction = check_direction(direction, corrupted, ablation)
    metric_fns = metrics_mod.resolve_metrics(metrics)
    inputs = prepare(model, clean, None if ablation else corrupted, answers)
    check_request(metric_fns, inputs, ablation)
    noise = noise_hooks(model, inputs, noise, noise_positions, noise_seed) if ablation == "noise" else []
    clean_run = (inputs.clean_tokens, [])
    corrupted_run = (inputs.clean_tokens if ablation else inputs.corrupted_tokens, noise)
    target, source = (corrupted_run, clean_run) if direction == "denoising" else (clean_run, corrupted_run)
    if ablation in ("zero", "mean"):
        source = (None, [])
    changed = differing_positions(inputs, ablation, noise_positions)
    return Runs(inputs, direction, metric_fns, ablation, target[0], target[1], source[0], source[1], changed)


# ---------------------------------------------------------------------------- the result
@dataclass
class PathPatchResult(PatchResult):
    """A :class:`PatchResult` whose cells are sender heads (or groups of heads).

    ``grid(metric)`` is ``[n_layers, n_heads]`` for the default sweep over every head (like
    ``patch(..., site="head_out")``), or ``[n_senders]`` for an explicit ``senders=`` list.
    """

    senders: list[tuple[Head, ...]] = field(default_factory=list)
    receivers: list[Head] | None = None          # None: the logits (final residual stream)
    receiver_input: tuple[str, ...] = ()
    freeze_mlps: bool = False

    def __repr__(self) -> str:
        return "Path" + super().__repr__()


# ---------------------------------------------------------------------------- argument checks
def _heads(value: Any, what: str, n_layers: int, n_heads: int) -> list[Head]:
    try:
        heads = [(int(l), int(h)) for l, h in value]
    except (TypeError, ValueError):
        raise PatchingInputError(f"{what} must be a list of (layer, head) pairs, got {value!r}", "site") from None
    for l, h in heads:
        if not (0 <= l < n_layers and 0 <= h < n_heads):
            raise PatchingInputError(
                f"{what}: head ({l}, {h}) does not exist; layers are 0..{n_layers - 1} and heads "
                f"0..{n_heads - 1}", "site")
    if not heads:
        raise PatchingInputError(f"{what} is empty: name at least one (layer, head)", "site")
    return heads


def _receiver_inputs(receiver_input: Any) -> tuple[str, ...]:
    items = tuple(receiver_input) if not isinstance(receiver_input, str) else tuple(receiver_input)
    if not items or any(c not in "qkv" for c in items) or len(set(items)) != len(items):
        raise PatchingInputError(
            f"receiver_input must be 'q', 'k', 'v' or a combination such as 'kv', got {receiver_input!r}",
            "site")
    return tuple(c for c in "qkv" if c in items)


def _sender_groups(senders: Any, layers, heads, n_layers: int, n_heads: int, seq_len: int):
    """The sender groups (one patch each), their index tuples, the grid shape and axes."""
    if senders is None:
        indices, shape = enumerate_indices(
            SITES["head_out"], n_layers=n_layers, n_heads=n_heads, n_kv_heads=None, d_mlp=None,
            seq_len=seq_len, layers=layers, heads=heads)
        return [((l, h),) for l, h in indices], indices, shape, ("layer", "head")
    if layers is not None or heads is not None:
        raise PatchingInputError("give either senders=[...] or layers=/heads=, not both", "site")
    groups = []
    for entry in senders:
        is_pair = len(entry) == 2 and not any(isinstance(x, (tuple, list)) for x in entry)
        groups.append(tuple(_heads([entry] if is_pair else entry, "senders", n_layers, n_heads)))
    if not groups:
        raise PatchingInputError("senders is empty: name at least one (layer, head)", "site")
    labels = [("+".join(f"L{l}H{h}" for l, h in g),) for g in groups]
    return groups, labels, (len(groups),), ("sender",)


# ---------------------------------------------------------------------------- the sweep
class _Stop(Exception):
    """Raised by a hook to end a forward pass once it has recorded everything it needs."""


def _tiled_forward(engine: Engine, k: int, hooks: list, layer: int | None, offset: int) -> torch.Tensor:
    """Answer logits ``[k * batch, vocab]`` of the target tiled ``k`` times, with ``hooks``."""
    return engine.run_pass(layer, offset, k, hooks)


def path_patch(
    model: Any,
    clean: Prompts,
    corrupted: Prompts | None = None,
    answers: Any = None,
    receivers: Sequence[Head] | None = None,
    receiver_input: str = "q",
    direction: str | None = None,
    metrics: Any = ("logit_diff", "normalized"),
    *,
    senders: Sequence[Any] | None = None,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    freeze_mlps: bool = False,
    ablation: str | None = None,
    noise: float = 3.0,
    noise_positions: Sequence[int] | None = None,
    noise_seed: int = 0,
    max_batch_tokens: int = 4096,
    progress: bool | None = None,
    callback: Callable[[PatchUpdate], Any] | None = None,
    cancel: threading.Event | None = None,
) -> PathPatchResult:
    """Patch the path from every sender head to the logits or to chosen receiver heads.

    See the module docstring for which activation comes from which run.

    Args:
        model, clean, corrupted, answers, direction, metrics, ablation, noise,
            noise_positions, noise_seed, max_batch_tokens, progress, callback, cancel:
            as in :func:`patchwidgets.patch`.
        receivers: ``None`` (or ``"logits"``) for the path to the logits (the final residual
            stream), or a list of ``(layer, head)`` receiver heads, all patched together.
        receiver_input: which input of the receivers the path enters: ``"q"``, ``"k"``, ``"v"``
            or a combination (``"kv"``, ``"qkv"``).
        senders: ``None`` sweeps every head (``layers=``/``heads=`` restrict the sweep) into a
            ``[layer, head]`` grid; or a list whose entries are ``(layer, head)`` pairs or lists
            of pairs (a group patched together), giving a 1-D grid in that order.
        freeze_mlps: also freeze every MLP output to the target run (the pure direct path);
            by default MLPs are recomputed.

    Returns:
        A :class:`PathPatchResult`.
    """
    runs = setup_runs(model, clean, corrupted, answers, direction, metrics, ablation,
                      noise, noise_positions, noise_seed)
    inputs, cfg = runs.inputs, model.cfg
    n_layers, n_heads, batch = cfg.n_layers, cfg.n_heads, inputs.batch
    comps = _receiver_inputs(receiver_input)
    recv = None if receivers is None or isinstance(receivers, str) and receivers in ("logits", "resid_final") \
        else _heads(receivers, "receivers", n_layers, n_heads)
    kv_heads = getattr(cfg, "n_key_value_heads", None)
    if recv and kv_heads and kv_heads != n_heads and set(comps) & {"k", "v"}:
        raise PatchingInputError(
            f"this model shares keys and values between heads ({kv_heads} key/value heads for "
            f"{n_heads} query heads), so a single receiver's k or v input is not defined; use 'q'",
            "site")
    groups, indices, shape, axes = _sender_groups(senders, layers, heads, n_layers, n_heads, inputs.seq_len)
    if "blocks.0.attn.hook_z" not in (getattr(model, "hook_dict", None) or {}):
        raise PatchingInputError("path patching needs a model with per-head hooks (blocks.L.attn.hook_z)", "site")

    # --- The two unpatched runs: every head's output (and every MLP's, to freeze them).
    z_name = "blocks.{}.attn.hook_z".format
    names = [z_name(l) for l in range(n_layers)]
    if freeze_mlps:
        names += [f"blocks.{l}.hook_mlp_out" for l in range(n_layers)]
    target = Engine(model, runs.target_tokens, inputs.answer_pos, runs.target_hooks, max_batch_tokens)
    with torch.no_grad():  # (the engine's self-check runs passes of its own)
        target_logits, target_acts = target.run_target(names)
        if runs.source_tokens is None:
            source_logits, source_acts = None, ablation_values(target_acts, runs.ablation)
        else:
            source = Engine(model, runs.source_tokens, inputs.answer_pos, runs.source_hooks)
            source_logits, source_acts = source.run_target(names, record=False)
    clean_logits = source_logits if runs.direction == "denoising" else target_logits
    ctx, target_values, baselines = metric_context(
        runs.metric_fns, inputs, runs.direction, target_logits, source_logits, clean_logits)

    # --- Which senders change anything, and from which position on.
    last_receiver_layer = max(l for l, _ in recv) if recv else n_layers
    first_pos: list[int | None] = []
    for group in groups:
        firsts = [SITES["head_out"].first_changed_position((l, h), runs.changed) for l, h in group]
        firsts = [f for f in firsts if f is not None]
        reaches = min(l for l, _ in group) < last_receiver_layer
        first_pos.append(min(firsts) if firsts and reaches else None)

    n_cells = len(groups)
    values = {k: v.cpu().expand(n_cells, -1).clone() for k, v in target_values.items()}
    done = torch.tensor([f is None for f in first_pos])
    result = PathPatchResult(
        sites=[_site_label(recv, comps)], axes=axes, shape=shape, indices=list(indices),
        values={k: v.view(1, n_cells, -1) for k, v in values.items()}, direction=runs.direction,
        baselines=baselines, clean_str_tokens=inputs.clean_str_tokens,
        corrupted_str_tokens=inputs.corrupted_str_tokens, done=done.view(1, n_cells),
        senders=groups, receivers=recv, receiver_input=comps if recv else (), freeze_mlps=freeze_mlps)

    chunks = _plan(groups, first_pos, batch, inputs.seq_len, int(inputs.answer_pos.min()), max_batch_tokens)
    result.stats = {"patches": n_cells, "skipped_noop": int(done.sum()),
                    "forward_passes": len(chunks) * (2 if recv else 1), **target.shortcut_report()}

    def run(cells, offset):
        with torch.no_grad():
            logits = _run_chunk(target, [groups[c] for c in cells], offset, target_acts, source_acts, recv, comps,
                                freeze_mlps, n_layers)
        return logits.reshape(len(cells), batch, -1)

    def measure(logits):
        return metrics_mod.compute(runs.metric_fns, logits, ctx)

    jobs = [(cells, functools.partial(run, cells, offset)) for cells, offset in chunks]
    return run_streaming(result, values, done, jobs, measure, progress=progress, callback=callback, cancel=cancel)


def _site_label(recv: list[Head] | None, comps: tuple[str, ...]) -> str:
    if recv is None:
        return "path: senders -> logits"
    return f"path: senders -> {','.join(f'L{l}H{h}' for l, h in recv)} ({''.join(comps)})"


def _plan(groups, first_pos, batch: int, seq_len: int, answer_min: int, budget: int):
    """Chunks ``(cells, offset)``: senders sharing a first layer, within the token budget."""
    todo = [c for c, f in enumerate(first_pos) if f is not None]
    todo.sort(key=lambda c: (min(l for l, _ in groups[c]), -first_pos[c]))
    chunks: list[tuple[list[int], int]] = []
    current_layer = None
    for c in todo:
        layer, offset = min(l for l, _ in groups[c]), min(first_pos[c], answer_min)
        if chunks and layer == current_layer:
            cells, chunk_offset = chunks[-1]
            new_offset = min(offset, chunk_offset)
            if (len(cells) + 1) * batch * (seq_len - new_offset) <= budget:
                cells.append(c)
                chunks[-1] = (cells, new_offset)
                continue
        chunks.append(([c], offset))
        current_layer = layer
    return chunks


def _run_chunk(engine: Engine, groups, offset: int, target_acts, source_acts, recv, comps,
               freeze_mlps: bool, n_layers: int) -> torch.Tensor:
    """Answer logits ``[k * batch, vocab]`` of one chunk of ``k`` sender groups."""
    k, batch = len(groups), engine.batch
    start = min(l for g in groups for l, _ in g)

    def rows(i: int) -> slice:
        return slice(i * batch, (i + 1) * batch)

    def freeze_z(layer: int):
        tgt, src = target_acts[f"blocks.{layer}.attn.hook_z"], source_acts[f"blocks.{layer}.attn.hook_z"]
        per_row = [[h for l, h in g if l == layer] for g in groups]

        def hook(act: torch.Tensor, hook) -> torch.Tensor:
            n = act.shape[1]   # positions present: the pass may skip a prefix
            out = tgt[:, -n:].repeat(k, 1, 1, 1).to(act.dtype)
            for i, hs in enumerate(per_row):
                if hs:
                    out[rows(i), :, hs] = src[:, -n:, hs].to(act.dtype)
            return out
        return hook

    def freeze_mlp(layer: int):
        tgt = target_acts[f"blocks.{layer}.hook_mlp_out"]
        return lambda act, hook: tgt[:, -act.shape[1]:].repeat(k, 1, 1).to(act.dtype)

    hooks = [(f"blocks.{l}.attn.hook_z", freeze_z(l)) for l in range(start, n_layers)]
    if freeze_mlps:
        hooks += [(f"blocks.{l}.hook_mlp_out", freeze_mlp(l)) for l in range(start, n_layers)]
    if recv is None:
        return _tiled_forward(engine, k, hooks, start, offset)

    # Step 1: record the receivers' inputs, then stop the pass.
    wanted = {(l, c): [h for rl, h in recv if rl == l] for l, _ in recv for c in comps if l >= start}
    recorded: dict[tuple[int, str], torch.Tensor] = {}

    def record(key):
        def hook(act: torch.Tensor, hook) -> None:
            recorded[key] = act[:, :, wanted[key]].clone()
            if len(recorded) == len(wanted):
                raise _Stop
        return hook

    step1 = hooks + [(f"blocks.{l}.attn.hook_{c}", record((l, c))) for l, c in wanted]
    try:
        _tiled_forward(engine, k, step1, start, offset)
    except _Stop:
        pass
    if len(recorded) != len(wanted):
        raise RuntimeError(f"receiver hooks did not fire: {sorted(set(wanted) - set(recorded))}")

    # Step 2: paste them into the receivers of a fresh target run; the rest recomputes.
    def paste(key):
        def hook(act: torch.Tensor, hook) -> torch.Tensor:
            out = act.clone()
            out[:, :, wanted[key]] = recorded[key].to(act.dtype)
            return out
        return hook

    step2 = [(f"blocks.{l}.attn.hook_{c}", paste((l, c))) for l, c in wanted]
    return _tiled_forward(engine, k, step2, min(l for l, _ in wanted), offset)
