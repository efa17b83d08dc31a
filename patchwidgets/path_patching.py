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

from .engine import Engine
from .errors import PatchingInputError
from .inputs import Prompts
from .results import PatchResult
from .sites import SITES, Dims
from .driver import DEFAULT_CACHE_BYTES, EngineGroup, SweepControl, check_cache_budget, run_sweep
from .streaming import PatchUpdate
from .sweep import cached_bytes_per_pair, new_result, prepare_request, run_unpatched, unpatched_logits
from .validation import as_int, check_restrictions
from .watch import SweepWatch

Head = tuple[int, int]


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
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise PatchingInputError(f"{what} must be a list of (layer, head) pairs, got {value!r}", "site")
    heads = []
    for pair in value:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise PatchingInputError(f"{what} must be a list of (layer, head) pairs, got {pair!r} in it", "site")
        layer, head = (as_int(x, f"{what}: {tuple(pair)}", "site") for x in pair)
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise PatchingInputError(
                f"{what}: head ({layer}, {head}) does not exist; layers are 0..{n_layers - 1} and heads "
                f"0..{n_heads - 1}", "site")
        heads.append((layer, head))
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


def _sender_groups(senders: Any, layers: Any, heads: Any, dims: Dims):
    """The sender groups (one patch each), their index tuples, the grid shape and axes."""
    if senders is None:
        site = SITES["head_out"]
        indices, shape = site.grid(dims, check_restrictions([site], dims, layers=layers, heads=heads))
        return [((l, h),) for l, h in indices], indices, shape, ("layer", "head")
    if layers is not None or heads is not None:
        raise PatchingInputError("give either senders=[...] or layers=/heads=, not both", "site")
    if isinstance(senders, (str, bytes)) or not isinstance(senders, (list, tuple)) or not senders:
        raise PatchingInputError(f"senders must be a non-empty list of (layer, head) pairs or groups of them, "
                                 f"got {senders!r}", "site")
    groups = []
    for entry in senders:
        is_pair = isinstance(entry, (list, tuple)) and len(entry) == 2 \
            and not any(isinstance(x, (tuple, list)) for x in entry)
        groups.append(tuple(_heads([entry] if is_pair else entry, "senders", dims.n_layers, dims.n_heads)))
    labels = [("+".join(f"L{l}H{h}" for l, h in g),) for g in groups]
    return groups, labels, (len(groups),), ("sender",)


# ---------------------------------------------------------------------------- the sweep
class _Stop(Exception):
    """Raised by a hook to end a forward pass once it has recorded everything it needs."""


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
    max_cache_bytes: int = DEFAULT_CACHE_BYTES,
    progress: bool | None = None,
    callback: Callable[[PatchUpdate], Any] | None = None,
    cancel: threading.Event | None = None,
) -> PathPatchResult:
    """Patch the path from every sender head to the logits or to chosen receiver heads.

    See the module docstring for which activation comes from which run.

    Args:
        model, clean, corrupted, answers, direction, metrics, ablation, noise,
            noise_positions, noise_seed, max_batch_tokens, max_cache_bytes, progress, callback, cancel:
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
    request = prepare_request(model, clean, corrupted, answers, direction, metrics, ablation=ablation,
                              noise=noise, noise_positions=noise_positions, noise_seed=noise_seed)
    inputs, cfg = request.inputs, model.cfg
    dims = Dims.of(cfg, inputs.seq_len)
    n_layers, n_heads, batch = cfg.n_layers, cfg.n_heads, inputs.batch
    comps = _receiver_inputs(receiver_input)
    recv = None if receivers is None or isinstance(receivers, str) and receivers in ("logits", "resid_final") \
        else _heads(receivers, "receivers", n_layers, n_heads)
    if recv and dims.n_kv_heads != n_heads and set(comps) & {"k", "v"}:
        raise PatchingInputError(
            f"this model shares keys and values between heads ({dims.n_kv_heads} key/value heads for "
            f"{n_heads} query heads), so a single receiver's k or v input is not defined; use 'q'",
            "site")
    groups, indices, shape, axes = _sender_groups(senders, layers, heads, dims)
    if "blocks.0.attn.hook_z" not in (getattr(model, "hook_dict", None) or {}):
        raise PatchingInputError("path patching needs a model with per-head hooks (blocks.L.attn.hook_z)", "site")


    # --- Every head's output (and every MLP's, to freeze them), recorded by the unpatched runs.
    names = [f"blocks.{l}.attn.hook_z" for l in range(n_layers)]
    if freeze_mlps:
        names += [f"blocks.{l}.hook_mlp_out" for l in range(n_layers)]
    backend = PathBackend(model, names, groups, indices, shape, axes, recv, comps, freeze_mlps, max_batch_tokens)
    full_pass = batch * inputs.seq_len * n_layers
    control = SweepControl(max_batch_tokens, check_cache_budget(max_cache_bytes), progress, callback, cancel)
    result = run_sweep(backend, request, control, worst_case_work=full_pass * len(groups) * backend.passes_per_job)
    assert isinstance(result, PathPatchResult)
    return result


@dataclass
class PathBackend:
    """:func:`path_patch` for :func:`~patchwidgets.driver.run_sweep`: sender groups are the
    cells, and each chunk runs the engine's resumed passes with the paths' hooks."""

    model: Any
    names: list[str]
    groups: list[list[Head]]
    indices: list[tuple]
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    recv: list[Head] | None
    comps: tuple[str, ...]
    freeze_mlps: bool
    max_batch_tokens: int

    @property
    def passes_per_job(self) -> int:
        return 2 if self.recv else 1   # receivers: record their inputs, then paste them

    def first_positions(self, request: Any) -> list[int | None]:
        """Which senders change anything, and from which position on."""
        last_receiver_layer = max(l for l, _ in self.recv) if self.recv else self.model.cfg.n_layers
        first_pos: list[int | None] = []
        for group in self.groups:
            firsts = [SITES["head_out"].first_changed_position((l, h), request.changed) for l, h in group]
            changes = [f for f in firsts if f is not None]
            reaches = min(l for l, _ in group) < last_receiver_layer
            first_pos.append(min(changes) if changes and reaches else None)
        return first_pos

    def new_result(self, request: Any, measure: Any, first_pos: list[int | None]) -> PathPatchResult:
        return new_result(
            PathPatchResult, request, measure, sites=[_site_label(self.recv, self.comps)], axes=self.axes,
            shape=self.shape, indices=self.indices, first_pos=first_pos, senders=self.groups, receivers=self.recv,
            receiver_input=self.comps if self.recv else (), freeze_mlps=self.freeze_mlps)

    def bytes_per_pair(self, request: Any) -> int:
        return cached_bytes_per_pair(self.model, request.inputs.seq_len, self.names)

    def baselines(self, request: Any, watch: SweepWatch, mean: bool) -> tuple:
        return unpatched_logits(self.model, request, self.names, None, watch, mean)

    def group(self, request: Any, watch: SweepWatch, means: dict | None) -> "_PathRuns":
        runs = run_unpatched(self.model, request, self.names, self.max_batch_tokens, watch=watch, means=means)
        return _PathRuns(runs, self, request)


@dataclass
class _PathRuns(EngineGroup):
    """One group's unpatched runs; each chunk patches paths from them."""

    backend: PathBackend
    request: Any

    def jobs(self, todo: list[int]) -> list:
        b, inputs, runs = self.backend, self.request.inputs, self.runs
        first_pos = b.first_positions(self.request)
        first_pos = [f if c in set(todo) else None for c, f in enumerate(first_pos)]
        self.chunks = _plan(b.groups, first_pos, inputs.batch, inputs.seq_len, int(inputs.answer_pos.min()),
                            b.max_batch_tokens)
        n_layers = b.model.cfg.n_layers

        def run(cells, offset):
            with torch.no_grad():
                logits = _run_chunk(runs.target, [b.groups[c] for c in cells], offset, runs.target_acts,
                                    runs.source_acts, b.recv, b.comps, b.freeze_mlps, n_layers)
            return logits.reshape(len(cells), inputs.batch, -1)
        return [(cells, functools.partial(run, cells, offset)) for cells, offset in self.chunks]

    def work(self, jobs: list) -> int:
        # (An estimate: each pass runs every block from the first sender's on.)
        inputs = self.request.inputs
        return sum(len(cells) * inputs.batch * (inputs.seq_len - offset) * self.backend.model.cfg.n_layers
                   * self.backend.passes_per_job for cells, offset in self.chunks)

    def report(self) -> dict:
        return self.runs.target.shortcut_report()


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
        return engine.run_pass(start, offset, k, hooks)

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
        engine.run_pass(start, offset, k, step1)
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
    return engine.run_pass(min(l for l, _ in wanted), offset, k, step2)
