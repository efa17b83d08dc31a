"""The execution engine: run many patches, fast and exactly.

A sweep is a list of *patches*; each patch copies one slice of one activation from the
*source* run into the *target* run (the run being patched) and reads the answer logits. The
obvious loop, one full forward pass per patch (``transformer_lens.patching``), recomputes a
lot that cannot change. The engine skips that work in four ways, none of which changes a
single result:

1. **Batching.** Patches on the same hook are stacked along the batch axis: a chunk of ``k``
   patches runs the target batch ``k`` times over in one forward pass, patch ``i`` owning
   rows ``i*B .. (i+1)*B - 1``. Chunks are sized to a token budget.
2. **Resuming at the patched layer.** Blocks before the patched layer see no change, so the
   pass starts at that block from the target run's cached residual stream. (TransformerLens
   4's ``start_at_layer`` still executes the earlier blocks and throws their output away, so
   the engine calls the blocks itself, with the arguments a forward pre-hook recorded from
   the target run's own forward pass: attention masks, position ids, rotary tables, ALiBi
   biases. Per-row arguments are tiled ``k`` times like the batch.)
3. **Skipping unchanged positions.** The model is causal: if a patch first changes position
   ``f``, positions ``0..f-1`` are identical to the target run in every later layer. The pass
   runs only positions ``f..`` and attends to the target run's keys and values for the
   earlier ones.
4. **No-op patches and logits.** A patch whose source slice equals the target slice changes
   nothing; its result is the target run's, without running it. And only the answer
   position is unembedded.

How the prefix keys and values get into attention
-------------------------------------------------
Attention still needs the keys and values of the skipped positions. The engine hands every
block a stand-in for its Hugging Face KV cache that prepends the target run's keys and values
(:class:`~patchwidgets.kv_tap.KVTap`; :mod:`patchwidgets.kv_tap` explains how it reaches
attention in every implementation the bridge runs).

Planning: which patches share a pass
------------------------------------
How patches are grouped into chunks within the token budget, and what a chunk costs, are
pure functions of a few numbers (:mod:`patchwidgets.planning`); :meth:`Engine.plan` and
:meth:`Engine.work` call them with this target run's numbers.

Trust, but verify
-----------------
Before a sweep, :meth:`Engine.run_target` checks each shortcut against the plain forward pass
of the same model (:mod:`patchwidgets.selfcheck`: two passes, whose result the engine
applies in one place, :meth:`Engine._apply`). A shortcut that does not reproduce the plain
logits is turned off and the engine falls back to plain batched ``run_with_hooks`` (still
batched, still skipping no-ops), or to running every position. :meth:`Engine.shortcut_report`
says which shortcut is off and why, and a :class:`ShortcutWarning` is emitted once per engine
when a TransformerBridge falls back. Hand-built ``HookedRootModule`` models (no ``blocks`` to
resume at) use the plain path by design, without a warning.

One caller at a time, one pass at a time
---------------------------------------
Every method that makes forward passes (:meth:`Engine.run_target`, :meth:`Engine.run_source`,
:meth:`Engine.run_pass`, :meth:`Engine.run_chunk`) holds the model's lock
(:func:`patchwidgets.sharing.exclusive`) for its length, hooks included. Between them the
engine keeps what it recorded in its own attributes, never on the model, so other callers of
the same model (a widget, a notebook cell) can run their passes in between.

Models split over devices or offloaded to disk
----------------------------------------------
A model loaded with a ``device_map`` (:func:`patchwidgets.load_model`) has its blocks on
several devices, or keeps some weights on disk (or in CPU memory) and lets accelerate's hooks
bring them in for each module's forward call. The shortcuts need nothing special there: the
engine calls the bridge's own block modules with the arguments the model's own forward pass
gave them, so accelerate moves activations from block to block exactly as in that pass, and
the keys/values a block recorded stay on that block's device. Three details:

* target tokens go where the embedding runs (:func:`patchwidgets.devices.input_device`);
* answer logits of every pass are moved to the device of the target run's logits, so metrics
  always see one device;
* the unembedding columns of the column shortcut are read inside
  :func:`patchwidgets.devices.materialized`, which loads offloaded weights the way accelerate
  does for a forward call; if that still gives ``meta`` tensors the column shortcut is
  skipped (the full unembedding module runs instead).
"""

from __future__ import annotations

import contextlib
import functools
import re
import warnings
import weakref
from typing import Any, Callable, Iterable, Sequence

import torch

from .devices import input_device, materialized
from .kv_tap import KVTap, hand_tap_to_attention, hand_tap_to_block, is_cache_argument
from .planning import Chunk, Patch, pass_overhead_tokens, plan, target_work, work
from .selfcheck import PassSetup, ShortcutCheck, check_shortcuts
from .sharing import exclusive

__all__ = ["Engine", "Patch", "Chunk", "ShortcutWarning"]

Hook = tuple[str, Callable]


# model -> the layers whose attention module must be handed its tap (:mod:`patchwidgets.kv_tap`).
# A fact about the architecture, learnt by one extra pass over every block on a model's first
# sweep (:mod:`patchwidgets.selfcheck`) and remembered so later sweeps (the widget, a course
# notebook) skip that pass.
_TAP_ATTENTION: "weakref.WeakKeyDictionary[Any, frozenset[int]]" = weakref.WeakKeyDictionary()


# Models on which pass (A) of the self-check (the engine running every block itself, taps
# recording the keys and values) reproduced the plain forward pass with every tap read once.
# On such a model the target run itself records the keys and values through the taps, so
# later sweeps skip pass (A); pass (B) still checks every sweep, and any doubt sends the
# sweep back the long way.
_TAPS_VERIFIED: "weakref.WeakSet[Any]" = weakref.WeakSet()


# Hook points whose activation is ``[batch, pos, ...]``: a source run that resumes from the
# target's prefix rebuilds these from the target's first positions and its own later ones.
_POSITION_SECOND = re.compile(
    r"blocks\.\d+\.(hook_resid_(pre|mid|post)|hook_attn_out|hook_mlp_out|attn\.hook_[qkvz]|mlp\.hook_(pre|post))")


class _StopPass(Exception):
    """Ends a forward pass once the residual stream entering block 0 is in hand."""


def _one_caller(method: Callable) -> Callable:
    """Run an :class:`Engine` method that makes forward passes as the model's only user
    (:func:`patchwidgets.sharing.exclusive`): its hooks are attached and removed while no other
    caller of the model runs, and other callers get their turn between such calls."""
    @functools.wraps(method)
    def run(self: "Engine", *args: Any, **kwargs: Any) -> Any:
        with exclusive(self.model):
            return method(self, *args, **kwargs)
    return run


class ShortcutWarning(UserWarning):
    """A TransformerBridge model could not use one of the engine's shortcuts (results stay exact)."""


class Engine:
    """Runs chunks of patches against one target run.

    Args:
        model: a ``TransformerBridge`` (fast path) or any ``HookedRootModule`` whose
            ``run_with_hooks(tokens)`` returns logits ``[batch, pos, vocab]`` (plain path).
        target_tokens: ``[batch, pos]`` tokens of the run being patched.
        answer_pos: ``[batch]`` position whose logits the metrics read.
        target_hooks: hooks that define the target run itself (e.g. embedding noise); they
            are attached to every plain forward pass.
        max_batch_tokens: memory budget: rows x positions processed in one forward pass.
        columns: vocabulary ids the metrics read (``None``: all). Logits are returned for these
            columns only, in this order; on the fast path only these columns of the unembedding
            are multiplied (for GPT-2's 50257-token vocabulary that is most of the unembedding).

    After :meth:`run_target`, :meth:`shortcut_report` says which shortcuts are on.
    """

    def __init__(
        self,
        model: Any,
        target_tokens: torch.Tensor,
        answer_pos: torch.Tensor,
        target_hooks: Sequence[Hook] = (),
        max_batch_tokens: int = 4096,
        columns: torch.Tensor | None = None,
    ):
        self.model = model
        # Tokens go where the embedding runs, so a model on a GPU is patched on the GPU.
        if hasattr(model, "parameters"):
            target_tokens = target_tokens.to(input_device(model))
        self.columns = columns
        self.target_tokens = target_tokens
        self.answer_pos = answer_pos
        self.target_hooks = list(target_hooks)
        self.max_batch_tokens = max_batch_tokens
        self.batch, self.seq_len = target_tokens.shape
        # What the target run handed each block: positional and keyword arguments.
        self.block_args: dict[int, tuple] = {}
        self.block_kwargs: dict[int, dict] = {}
        self.resid_pre: dict[int, torch.Tensor] = {}  # layer -> [batch, pos, d_model]
        # What the engine's own passes read besides those recordings (the target run's keys
        # and values, ...), as the self-check settled it.
        self.setup = PassSetup()
        self.can_resume = False
        self.can_skip_prefix = False
        self.fallback_reason: str | None = "the target run has not been run yet"
        # Where the target run's logits came out: every pass's answer logits are moved there
        # (a split model unembeds on its last device, while its forward pass may return the
        # logits to the embedding's device).
        self.logits_device: torch.device | None = None
        self._warned = False

    # ------------------------------------------------------------------ shortcut report
    def shortcut_report(self) -> dict:
        """Which shortcuts the patched passes use, and why one is off.

        Returns ``{"resumed": 0 | 1, "prefix_skipped": 0 | 1, "fallback_reason": str | None}``:
        ``resumed`` is 1 when passes start at the patched layer, ``prefix_skipped`` when they
        also skip the positions before the first changed one; ``fallback_reason`` is ``None``
        when both are on, else a sentence saying why the first one that is off is off.
        """
        return {"resumed": int(self.can_resume), "prefix_skipped": int(self.can_skip_prefix),
                "fallback_reason": self.fallback_reason}

    @property
    def column_unembed(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(W_U[:, columns], b_U[columns])`` when passes unembed only the metrics' columns."""
        return self.setup.column_unembed

    def _apply(self, check: ShortcutCheck) -> None:
        """Turn the shortcuts on or off as ``check`` found (the one place that does), remember
        what it learnt about the model, and warn once per engine where a bridge falls back."""
        self.can_resume, self.can_skip_prefix = check.resume, check.skip_prefix
        self.fallback_reason, self.setup = check.reason, check.setup
        if check.learnt_tap_attention is not None:
            with contextlib.suppress(TypeError):  # (a model that cannot be weakly referenced)
                if check.learnt_tap_attention:
                    _TAP_ATTENTION[self.model] = check.learnt_tap_attention
                else:  # what this model needed before fails now
                    _TAP_ATTENTION.pop(self.model, None)
        if check.taps_verified:
            _TAPS_VERIFIED.add(self.model)
        if check.reason is not None and check.warn and not self._warned:
            self._warned = True
            what = "resuming at the patched layer" if not self.can_resume else "reusing the unchanged prefix"
            name = type(getattr(self.model, "adapter", self.model)).__name__
            warnings.warn(f"patchwidgets: {what} is off for this model ({name}): {check.reason}. "
                          "Results stay exact; the sweep only runs slower.", ShortcutWarning, stacklevel=4)

    # ------------------------------------------------------------------ target run
    @_one_caller
    def run_target(
        self, names: Iterable[str], record: bool = True
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run once: the answer logits, the activations ``names`` and, with ``record`` on a
        TransformerBridge, everything the resumed passes need (block inputs and K/V)."""
        names = set(names)
        blocks = getattr(self.model, "blocks", None)
        is_bridge = blocks is not None and len(blocks) > 0 and hasattr(blocks[0], "original_component")
        record = record and is_bridge
        self.block_args, self.block_kwargs, self.setup = {}, {}, PassSetup()
        self.can_resume = self.can_skip_prefix = False
        handles = []
        taps: dict[int, KVTap] | None = None
        if record:
            names |= {f"blocks.{l}.hook_resid_pre" for l in range(len(blocks))}
            for layer, block in enumerate(blocks):
                handles.append(block.register_forward_pre_hook(self._recorder(layer), with_kwargs=True))
            if self.model in _TAPS_VERIFIED and int(self.answer_pos.min()) > 0:
                taps = {l: KVTap(record=True) for l in range(len(blocks))}
                # (after the recorder: it records the call as made)
                handles += self._give_taps(taps, frozenset(_TAP_ATTENTION.get(self.model, ())))
        acts: dict[str, torch.Tensor] = {}

        def saver(name: str):
            def save(activation: torch.Tensor, hook) -> None:
                acts[name] = activation.detach()
            return save

        answer_only = self._answer_only_hooks(names)
        try:
            with torch.no_grad():
                logits = self.model.run_with_hooks(
                    self.target_tokens,
                    fwd_hooks=[*self.target_hooks, *[(n, saver(n)) for n in sorted(names)], *answer_only],
                )
        finally:
            for h in handles:
                h.remove()
        final = self._answer_logits(logits, answer_only=bool(answer_only))
        self.logits_device = final.device
        if record:
            self.resid_pre = {l: acts[f"blocks.{l}.hook_resid_pre"] for l in range(len(blocks))}
            with torch.no_grad():
                check = self._self_check(final, taps)
            if check.redo:  # the logits came through the taps, and the taps are in doubt
                _TAPS_VERIFIED.discard(self.model)
                return self.run_target(names, record)
        elif is_bridge:
            check = ShortcutCheck(False, False, "the target run was not recorded (record=False)", warn=False)
        else:
            check = ShortcutCheck(False, False, "not a TransformerBridge (no blocks to resume at): "
                                                "plain run_with_hooks by design", warn=False)
        self._apply(check)
        return final, acts

    @_one_caller
    def run_source(self, tokens: torch.Tensor, hooks: Sequence[Hook], names: Iterable[str],
                   changed: torch.Tensor, target_acts: dict[str, torch.Tensor],
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """The source run, resumed from this target run: its answer logits and activations
        ``names``, or ``None`` where that cannot be done (then run the source plainly).

        Before the first position where the two runs' inputs differ (``changed``: ``[pos]``
        bool) the source computes exactly what the target did: same tokens, and causal
        attention never looks ahead. So the source's own embeddings (one pass through the
        embedding, stopped at block 0) enter a resumed pass over the later positions only,
        which attends to the target's keys and values for the earlier ones: the same
        machinery, checked by the same self-check, as a ``resid_pre`` patch of layer 0. The
        activations are the target's over the shared prefix and the pass's own after it, so
        only ``[batch, pos, ...]`` hook points qualify (``_POSITION_SECOND``).
        """
        names = sorted(set(names))
        if not (self.can_resume and self.can_skip_prefix) or tuple(tokens.shape) != (self.batch, self.seq_len):
            return None
        if not all(_POSITION_SECOND.fullmatch(n) and n in target_acts for n in names):
            return None
        offset = self._source_offset(changed)
        if offset == 0:
            return None
        captured: dict[str, torch.Tensor] = {}

        def stop(resid: torch.Tensor, hook) -> None:  # [batch, pos, d_model]
            captured["resid"] = resid.detach()
            raise _StopPass

        try:
            self.model.run_with_hooks(tokens.to(self.target_tokens.device),
                                      fwd_hooks=[*hooks, ("blocks.0.hook_resid_pre", stop)])
        except _StopPass:
            pass
        if "resid" not in captured:
            return None
        entering = captured["resid"][:, offset:]                     # [batch, pos - offset, d_model]
        acts: dict[str, torch.Tensor] = {}

        def enter(resid: torch.Tensor, hook) -> torch.Tensor:
            return entering.to(resid.device, resid.dtype)

        def saver(name: str):
            def save(activation: torch.Tensor, hook) -> None:
                acts[name] = activation.detach()
            return save

        # (`enter` first: a saver on the same hook point sees the source's values.)
        final = self._run_blocks({0: 1}, offset, [("blocks.0.hook_resid_pre", enter),
                                                  *[(n, saver(n)) for n in names]])
        full = {}
        for n in names:
            prefix, rest = target_acts[n][:, :offset], acts.get(n)
            expected = (self.batch, self.seq_len - offset, *prefix.shape[2:])
            if rest is None or tuple(rest.shape) != expected:
                return None
            full[n] = torch.cat([prefix, rest.to(prefix.device)], 1)
        return final, full

    def _source_offset(self, changed: torch.Tensor) -> int:
        """The first position a resumed source run computes: where the runs' inputs first
        differ, or the first answer position if that comes earlier."""
        differs = changed.nonzero()
        return min(int(differs[0]) if len(differs) else self.seq_len, int(self.answer_pos.min()))

    def source_work(self, changed: torch.Tensor) -> int:
        """Block-tokens of :meth:`run_source` (what the progress bar counts): block 0 entered
        once by the embedding pass, then every block over the positions after the prefix."""
        n_layers = len(self.model.blocks)
        return self.batch * self.seq_len + self.batch * (self.seq_len - self._source_offset(changed)) * n_layers

    def _give_taps(self, taps: dict[int, KVTap], tap_attention: frozenset[int]) -> list:
        """Forward pre-hooks handing each block (or, for the layers in ``tap_attention``, its
        attention) its recording tap in place of the model's own cache, as the engine's passes
        do; returns the hook handles."""
        handles = []
        for layer, block in enumerate(self.model.blocks):
            handles.append(block.register_forward_pre_hook(hand_tap_to_block(taps[layer]), with_kwargs=True))
            if layer in tap_attention:
                handles.append(block.attn.register_forward_pre_hook(hand_tap_to_attention(taps[layer]),
                                                                    with_kwargs=True))
        return handles

    def _answer_only_hooks(self, names: set[str]) -> list[Hook]:
        """A hook that unembeds the answer positions only, where the model has an unembedding
        hook point that nothing asked to read.

        The metrics read one position per row, and the full ``[batch, pos, vocab]`` logits of
        an unpatched run are the largest tensor of a sweep (64 pairs x 20 tokens of GPT-2:
        257 MB) and a third of its FLOPs. Cutting the unembedding's input to ``[batch, 1,
        d_model]`` keeps neither. It is also how every patched pass unembeds (one row at a
        time), so the target logits and the patched ones come from the same computation.
        """
        if "unembed.hook_in" not in (getattr(self.model, "hook_dict", None) or {}):
            return []
        if any(n.startswith("unembed.") or n == "hook_unembed" for n in names):
            return []  # someone reads the unembedding itself: leave it whole

        def keep_answer_rows(resid: torch.Tensor, hook) -> torch.Tensor:  # [rows, pos, d_model]
            rows = torch.arange(resid.shape[0], device=resid.device)
            pos = self.answer_pos.to(resid.device).repeat(resid.shape[0] // self.batch)
            return resid[rows, pos][:, None]  # [rows, 1, d_model]
        return [("unembed.hook_in", keep_answer_rows)]

    def _recorder(self, layer: int):
        def record(module, args, kwargs):
            # As given, not bound to the signature: some adapters wrap a block's forward in
            # `(*args, **kwargs)` (Falcon), and the call must be replayed the same way.
            self.block_args[layer], self.block_kwargs[layer] = tuple(args), dict(kwargs)
        return record

    def _self_check(self, target_final: torch.Tensor, recorded: dict[int, KVTap] | None = None) -> ShortcutCheck:
        """Which shortcuts reproduce the plain forward pass (:func:`patchwidgets.selfcheck.check_shortcuts`),
        checked against ``target_final``, the target run's answer logits; ``recorded``: the taps
        the target run recorded its keys and values through, if it did."""
        def trial(joins: dict[int, int], offset: int, setup: PassSetup,
                  taps: dict[int, KVTap] | None = None) -> torch.Tensor:
            return self._run_blocks(joins, offset, [], taps, setup)

        return check_shortcuts(
            self.model, target_final, trial, self._column_unembed, batch=self.batch, seq_len=self.seq_len,
            answer_min=int(self.answer_pos.min()), called=set(self.block_kwargs),
            known_tap_attention=frozenset(_TAP_ATTENTION.get(self.model, ())), recorded=recorded)

    # ------------------------------------------------------------------ forward passes
    def _answer_logits(self, logits: torch.Tensor, answer_only: bool = False) -> torch.Tensor:
        """``[rows, pos, vocab]`` logits (or ``[rows, 1, vocab]`` with ``answer_only``: already
        cut to the answer positions) -> ``[rows, n_columns]`` at the answer positions."""
        if answer_only:
            final = logits[:, 0]
        else:
            rows = torch.arange(logits.shape[0], device=logits.device)
            final = logits[rows, self.answer_pos.to(logits.device).repeat(logits.shape[0] // self.batch)]
        return final if self.columns is None else final[:, self.columns.to(final.device)]

    def _output_transform(self, logits: torch.Tensor) -> torch.Tensor:
        """What the model does to logits after the unembedding (Gemma 2's soft cap, Granite's
        ``/ logits_scaling``), as the bridge's architecture adapter declares it."""
        transform = getattr(getattr(self.model, "adapter", None), "apply_output_logits_transform", None)
        return transform(logits) if callable(transform) else logits

    def _unembed(self, final: torch.Tensor,
                 column_unembed: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Answer-position residual ``[rows, 1, d_model]`` -> logits ``[rows, n_columns]``
        (multiplying only ``column_unembed``'s columns where given)."""
        normed = self.model.ln_final(final)
        if column_unembed is not None:
            weight, bias = column_unembed
            # (The transform is elementwise: fine on a subset of the columns.)
            return self._output_transform((normed.to(weight.device) @ weight + bias)[:, 0])
        logits = self._output_transform(self.model.unembed(normed)[:, 0])
        return logits if self.columns is None else logits[:, self.columns.to(logits.device)]

    def _column_unembed(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The unembedding columns the metrics read, ``(W_U[:, columns], b_U[columns])``, to
        multiply instead of the whole unembedding (the self-check then verifies it); ``None``
        where there is nothing to gain or they cannot be read."""
        if self.columns is None:
            return None
        try:
            # Read inside `materialized`: an offloaded unembedding is on `meta` between calls.
            with materialized(getattr(self.model, "unembed", None)):
                weight, bias = self.model.W_U, self.model.b_U
                if weight.device.type == "meta" or bias.device.type == "meta":
                    return None
                weight = weight[:, self.columns.to(weight.device)].detach().clone()
                bias = bias[self.columns.to(bias.device)].detach().clone().to(weight.device)
            return (weight, bias)
        except Exception:  # no W_U/b_U (a hand-built model) or another layout: unembed everything
            return None

    def _block_inputs(self, layer: int, hidden: torch.Tensor, offset: int, k: int,
                      tap: KVTap) -> tuple[tuple, dict]:
        """Block ``layer``'s recorded arguments for a pass over positions ``offset..`` of ``k``
        copies of the batch: the hidden states replaced, the cache replaced by ``tap``, every
        other tensor cut to those positions and tiled."""
        def adapt(name: str | None, value: Any) -> Any:
            if is_cache_argument(name, value):
                return tap
            if name == "use_cache":
                return False  # nothing to hand back: the tap is the cache
            return self._cut_and_tile(value, offset, k)

        args, kwargs = self.block_args[layer], self.block_kwargs[layer]
        if args and isinstance(args[0], torch.Tensor):  # hidden states first, as blocks are called
            return (hidden, *(adapt(None, a) for a in args[1:])), {n: adapt(n, v) for n, v in kwargs.items()}
        kwargs = {n: adapt(n, v) for n, v in kwargs.items() if n != "hidden_states"}
        return tuple(adapt(None, a) for a in args), {"hidden_states": hidden, **kwargs}

    def _cut_and_tile(self, t: Any, offset: int, k: int) -> Any:
        """One recorded block argument, cut to positions ``offset..`` and tiled ``k`` times.

        Recognised by shape, not name: ``[.., pos, pos]`` masks lose their first ``offset``
        query rows (keys still span every position), ``[batch, pos, ..]`` tensors (position
        ids, rotary cos/sin, 3-d masks) and ``[pos]`` ones (cache positions) lose their first
        ``offset`` positions; ALiBi's ``[batch * heads, 1, pos]`` is per key, so it stays.
        Then a tensor whose first axis is a multiple of the batch (``[batch, ..]`` or
        ``[batch * heads, ..]``) is per-row and is repeated ``k`` times, as the batch is;
        one with a first axis of 1 broadcasts over any batch.
        """
        if isinstance(t, (tuple, list)):
            items = [self._cut_and_tile(v, offset, k) for v in t]
            return type(t)(*items) if hasattr(t, "_fields") else type(t)(items)  # (named tuples too)
        if isinstance(t, dict):
            return {n: self._cut_and_tile(v, offset, k) for n, v in t.items()}
        if not isinstance(t, torch.Tensor):
            return t
        seq = self.seq_len
        if offset:
            if t.ndim == 4 and t.shape[-2] == seq and t.shape[-1] == seq:
                t = t[..., offset:, :]
            elif t.ndim == 1 and t.shape[0] == seq:
                t = t[offset:]
            elif t.ndim >= 2 and t.shape[1] == seq:
                t = t[:, offset:]
        if k > 1 and t.ndim >= 2 and t.shape[0] != 1 and t.shape[0] % self.batch == 0:
            t = t.repeat(k, *([1] * (t.ndim - 1)))
        return t

    def _run_blocks(self, joins: dict[int, int], offset: int, hooks: Sequence[Hook],
                    taps: dict[int, KVTap] | None = None, setup: PassSetup | None = None) -> torch.Tensor:
        """Answer logits ``[k * batch, vocab]`` of a pass over blocks ``min(joins)..``,
        computing positions ``offset..`` only, where ``joins[l]`` copies of the target batch
        join the pass at block ``l`` (``k = sum(joins.values())``; rows in order of joining).

        Each copy enters from the target run's residual stream at its block. Layer ``l``'s
        cache is ``taps[l]`` when given (the self-check's recording taps), else a tap serving
        the target run's keys and values of positions ``0..offset-1`` to every row present.
        ``setup``: what the pass reads besides the recordings (default: the engine's own; the
        self-check tries others).
        """
        model = self.model
        setup = self.setup if setup is None else setup
        hidden: torch.Tensor | None = None   # [rows, pos - offset, d_model]
        k = 0
        with model.hooks(fwd_hooks=list(hooks)):
            for l in range(min(joins), len(model.blocks)):
                if joins.get(l):
                    entering = self.resid_pre[l][:, offset:].repeat(joins[l], 1, 1)
                    hidden = entering if hidden is None else torch.cat([hidden, entering.to(hidden.device)])
                    k += joins[l]
                tap = taps[l] if taps is not None else self._prefix_tap(l, offset, k, setup.kv)
                handle = None
                if l in setup.tap_attention:
                    handle = model.blocks[l].attn.register_forward_pre_hook(hand_tap_to_attention(tap),
                                                                              with_kwargs=True)
                try:
                    args, kwargs = self._block_inputs(l, hidden, offset, k, tap)
                    out = model.blocks[l](*args, **kwargs)
                finally:
                    if handle is not None:
                        handle.remove()
                hidden = out[0] if isinstance(out, tuple) else out
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            pos = self.answer_pos.to(hidden.device).repeat(k) - offset
            logits = self._unembed(hidden[rows, pos][:, None, :], setup.column_unembed)
            return logits if self.logits_device is None else logits.to(self.logits_device)

    def _prefix_tap(self, layer: int, offset: int, k: int,
                    kv: tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]] | None) -> KVTap:
        """Layer ``layer``'s cache for ``k`` copies of the batch: the target run's keys and
        values ``kv`` of positions ``0..offset-1`` (none when ``offset`` is 0)."""
        if not offset:
            return KVTap()
        keys, values = kv
        tile = lambda t: t[..., :offset, :].repeat(k, *([1] * (t.ndim - 1)))  # noqa: E731
        return KVTap(prefix=(tile(keys[layer]), tile(values[layer])))

    def _resumed(self, layer: int, offset: int, k: int, hooks: Sequence[Hook]) -> torch.Tensor:
        """Answer logits ``[k * batch, vocab]`` of a pass that starts at block ``layer`` with
        all ``k`` copies of the batch and computes positions ``offset..`` only, attending to
        the target run's keys and values for positions ``0..offset-1``."""
        return self._run_blocks({layer: k}, offset, hooks)

    @_one_caller
    def run_pass(self, layer: int | None, offset: int, k: int, hooks: Sequence[Hook]) -> torch.Tensor:
        """Answer logits ``[k * batch, vocab]`` of ``k`` copies of the target run with ``hooks``.

        The public way to run the engine's fastest exact pass with hooks of one's own (path
        patching uses it): resumed at block ``layer`` and from position ``offset`` where the
        shortcuts are on, else a plain forward pass from the embeddings. Hooks see every row
        from the start; they must leave rows and positions before ``offset`` as the target's.
        """
        if layer is not None and self.can_resume:
            return self._resumed(layer, offset if self.can_skip_prefix else 0, k, hooks)
        return self._plain(k, hooks)

    def _plain(self, k: int, hooks: Sequence[Hook]) -> torch.Tensor:
        tokens = self.target_tokens.repeat(k, 1)
        answer_only = self._answer_only_hooks({name for name, _ in hooks})
        logits = self.model.run_with_hooks(tokens, fwd_hooks=[*self.target_hooks, *hooks, *answer_only])
        return self._answer_logits(logits, answer_only=bool(answer_only))

    # ------------------------------------------------------------------ patches
    def plan(self, patches: Sequence[Patch]) -> list[Chunk]:
        """Group the patches that need running into chunks that each fit the token budget
        (:func:`patchwidgets.planning.plan`, with this target run's numbers and shortcuts).

        On the fast path a chunk mixes hooks and layers (each patch's rows join the pass at
        its own layer); patches are taken in order of their offset, so the ones that skip the
        same prefix share a pass. The budget bounds the rows present at the last block times
        the positions computed. A plain pass (a hook outside the blocks, or shortcuts off)
        holds patches on one hook.
        """
        d_model = getattr(getattr(self.model, "cfg", None), "d_model", None)
        return plan(patches, batch=self.batch, seq_len=self.seq_len, n_layers=self._n_layers(),
                    answer_min=int(self.answer_pos.min()), max_batch_tokens=self.max_batch_tokens,
                    resume=self.can_resume, skip_prefix=self.can_skip_prefix,
                    overhead=pass_overhead_tokens(d_model))

    def work(self, chunks: Sequence[Chunk] | None = None) -> int:
        """Block-tokens (one block run over one token of one row) of running ``chunks``, or,
        without chunks, of one unpatched run plus the self-check (:mod:`patchwidgets.planning`).
        What the progress bar (:class:`patchwidgets.watch.SweepWatch`) counts."""
        if chunks is None:
            return target_work(batch=self.batch, seq_len=self.seq_len, n_layers=self._n_layers(),
                               answer_min=int(self.answer_pos.min()), taps_verified=self.model in _TAPS_VERIFIED)
        return work(chunks, batch=self.batch, seq_len=self.seq_len, n_layers=self._n_layers())

    def _n_layers(self) -> int:
        return len(getattr(self.model, "blocks", ()) or ()) or 1

    @_one_caller
    def run_chunk(self, chunk: Chunk, sources: dict[str, torch.Tensor]) -> torch.Tensor:
        """Answer logits ``[n_patches, batch, vocab]`` for one chunk of patches, in the order
        of ``chunk.patches``."""
        batch, offset = self.batch, chunk.offset
        # hook name -> [(copy of the batch, slice of the activation, source values)]
        writes: dict[str, list[tuple[int, tuple, torch.Tensor]]] = {}
        for i, p in enumerate(chunk.patches):
            source = sources[p.hook_name]
            if offset and p.site.pos_axis is not None:
                source = source.narrow(p.site.pos_axis, offset, self.seq_len - offset)
            sl = p.site.slice(p.index, offset)
            writes.setdefault(p.hook_name, []).append((i, sl, source[sl]))

        def patch_hook(entries: list[tuple[int, tuple, torch.Tensor]]):
            # (One hook per name, bound here: inside a hook, `hook.name` is the bridge's
            # canonical name, which need not be the alias the patch was given.)
            def write(activation: torch.Tensor, hook) -> torch.Tensor:
                # Write into a copy: a hook's tensor can share storage with the residual stream
                # (the bridge's hook_resid_mid is the MLP's LayerNorm input), and an in-place
                # edit would leak the patch into activations the hook does not own.
                activation = activation.clone()
                for i, sl, values in entries:
                    activation[i * batch:(i + 1) * batch][sl] = values
                return activation
            return write

        hooks = [(name, patch_hook(entries)) for name, entries in writes.items()]
        k = len(chunk.patches)
        with torch.no_grad():
            if chunk.layer is not None:
                logits = self._run_blocks(chunk.joins(), offset, hooks)
            else:
                logits = self._plain(k, hooks)
        return logits.reshape(k, batch, -1)
