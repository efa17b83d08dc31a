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
Every attention implementation the bridge runs, Hugging Face's own or TransformerLens'
re-implementation, hands the keys and values of the positions it computes to a KV cache,
``cache.update(k, v, layer_idx)``, and attends over whatever comes back. The engine passes
each block a :class:`_KVTap`, a one-layer stand-in for that cache, in place of the cache
argument it recorded (recognised by its type, so it does not matter whether the block calls
it ``cache``, ``past_key_values`` or ``layer_past``). The tap records keys and values on the
first (all positions) pass and prepends the prefix ones on later passes. Where the block's
attention never reads the argument (TransformerLens 4.3 re-implements attention and reads
only ``past_key_values``/``layer_past``, while transformers 5 blocks pass ``cache=``), the
tap is handed to that attention module directly by a forward pre-hook.

Trust, but verify
-----------------
Before a sweep, :meth:`Engine.run_target` checks each shortcut against the plain forward pass
of the same model (and, for the prefix, that every layer's attention read its tap exactly
once). A shortcut that does not reproduce the plain logits is turned off and the engine falls
back to plain batched ``run_with_hooks`` (still batched, still skipping no-ops), or to running
every position. :meth:`Engine.shortcut_report` says which shortcut is off and why, and a
:class:`ShortcutWarning` is emitted once per engine when a TransformerBridge falls back.
Hand-built ``HookedRootModule`` models (no ``blocks`` to resume at) use the plain path by
design, without a warning.

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

* target tokens go where the embedding runs (:func:`input_device`; a disk-offloaded
  embedding's weights sit on the ``meta`` device between calls, so the first parameter's
  device says nothing);
* answer logits of every pass are moved to the device of the target run's logits, so metrics
  always see one device;
* weights read directly (the unembedding columns of the column shortcut, the embedding's
  standard deviation for noise) are read inside :func:`materialized`, which loads offloaded
  weights the way accelerate does for a forward call; if that still gives ``meta`` tensors
  the column shortcut is skipped (the full unembedding module runs instead).
"""

from __future__ import annotations

import contextlib
import functools
import re
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

from .sharing import exclusive
from .sites import Site

Hook = tuple[str, Callable]

# Names under which Hugging Face blocks have taken a layer's KV cache. A recorded argument is
# recognised as the cache by its type first (a ``transformers`` ``Cache``); the names only
# catch a cache argument that happened to be ``None`` in the target run.
_CACHE_NAMES = frozenset({"cache", "past_key_values", "past_key_value", "layer_past"})


# model -> the layers whose attention module must be handed its tap (see `_record_prefix`).
# A fact about the architecture, learnt by one extra pass over every block on a model's first
# sweep and remembered so later sweeps (the widget, a course notebook) skip that pass.
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


class _Redo(Exception):
    """The target run that recorded through taps cannot be trusted: run it again, plainly."""


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


@dataclass
class Patch:
    """One patch of a sweep: ``site`` at ``index``, first changing position ``first_pos``."""

    site: Site
    index: tuple
    slot: int                  # where its values go in the result (row-major grid order)
    first_pos: int | None      # None: a no-op, never run

    @property
    def hook_name(self) -> str:
        return self.site.hook_template if self.site.kind == "raw" else self.site.hook_name(self.index[0])

    @property
    def layer(self) -> int | None:
        """The block whose input or inside the patch changes (``None``: not inside a block)."""
        return _layer_of_hook(self.hook_name)


@dataclass
class Chunk:
    """Patches run together in one forward pass, each on its own copy of the target batch.

    On the fast path the pass starts at ``layer``, the lowest patched layer, and a patch's
    copy of the batch *joins* the pass at its own layer: blocks below it cannot see the patch,
    so its rows would only repeat the target run there. A sweep over every layer then runs
    each block once per chunk instead of once per layer below it. ``layer`` is ``None`` for a
    plain pass from the embeddings (every copy present from the start). ``offset`` is the
    first position the pass computes.
    """

    layer: int | None
    offset: int
    patches: list[Patch] = field(default_factory=list)

    def joins(self) -> dict[int, int]:
        """How many copies of the batch join the pass at each layer, in row order."""
        counts: dict[int, int] = {}
        for p in self.patches:
            counts[p.layer] = counts.get(p.layer, 0) + 1
        return counts


class _KVTap:
    """Stands in for one layer's Hugging Face KV cache during a pass the engine runs itself.

    With ``prefix`` (the target run's keys and values of positions ``0..offset-1``, each
    ``[rows, kv_heads, offset, d_head]``) it prepends them to the keys and values of the
    positions being computed; with ``record`` it keeps what it returns. It serves a single
    layer, so it ignores the layer index it is given (whatever that counts from). ``calls``
    counts the updates: the engine checks that each layer's attention read its tap once.
    """

    def __init__(self, prefix: tuple[torch.Tensor, torch.Tensor] | None = None, record: bool = False):
        self.prefix, self.record = prefix, record
        self.recorded: tuple[torch.Tensor, torch.Tensor] | None = None
        self.calls = 0

    def update(self, key: torch.Tensor, value: torch.Tensor, *args, **kwargs):
        self.calls += 1
        if self.prefix is not None:
            key = torch.cat([self.prefix[0], key], dim=-2)  # [rows, kv_heads, pos, d_head]
            value = torch.cat([self.prefix[1], value], dim=-2)
        if self.record:
            self.recorded = (key.detach(), value.detach())
        return key, value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.prefix is None else self.prefix[0].shape[-2]


def _accelerate_hooks(module: Any) -> list:
    """The accelerate hooks attached to ``module`` itself, ``SequentialHook`` chains unrolled
    (accelerate's own ``align_module_device`` does not look into those)."""
    found, pending = [], [getattr(module, "_hf_hook", None)]
    while pending:
        hook = pending.pop()
        if isinstance(getattr(hook, "hooks", None), (list, tuple)):  # a SequentialHook
            pending.extend(hook.hooks)
        elif hook is not None:
            found.append(hook)
    return found


def _offload_hook(module: Any) -> Any:
    """The accelerate hook that keeps ``module``'s own weights offloaded (CPU or disk), if any."""
    return next((h for h in _accelerate_hooks(module)
                 if getattr(h, "offload", False) and callable(getattr(h, "pre_forward", None))), None)


@contextlib.contextmanager
def materialized(module: Any):
    """Inside this context, every offloaded weight under ``module`` holds real values.

    Accelerate keeps offloaded weights (``device_map`` entries ``"cpu"`` or ``"disk"`` next to
    other targets) on the ``meta`` device and loads them only around each module's forward
    call. Code that reads a weight directly (``model.W_U``, ``model.W_E``) gets a ``meta``
    tensor outside that window; inside this context it gets the values, on the module's
    execution device, as the forward call would. Values read here stay valid after the
    context if copied (the module's parameter goes back to ``meta``). A no-op for modules
    without offloaded weights.
    """
    entered: list[tuple[Any, Any]] = []
    try:
        if isinstance(module, torch.nn.Module):
            for sub in module.modules():
                hook = _offload_hook(sub)
                if hook is not None:
                    hook.pre_forward(sub)
                    entered.append((hook, sub))
        yield module
    finally:
        for hook, sub in reversed(entered):
            hook.post_forward(sub, None)


def input_device(model: Any) -> torch.device:
    """The device a model's input tokens go to: where its token embedding runs.

    For a model dispatched by accelerate (``hf_device_map``) that is the embedding's execution
    device, which is not the device of its weight when the weight is offloaded (``meta``);
    otherwise the device of the first parameter that is not on ``meta``, or the CPU."""
    hf = getattr(model, "original_model", None)
    if getattr(hf, "hf_device_map", None):
        try:
            embed = hf.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            embed = None
        if isinstance(embed, torch.nn.Module):
            for hook in _accelerate_hooks(embed):
                if getattr(hook, "execution_device", None) is not None:
                    return torch.device(hook.execution_device)
            for p in embed.parameters():
                if p.device.type != "meta":
                    return p.device
    params = model.parameters() if hasattr(model, "parameters") else ()
    for p in params:
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _is_cache(value: Any) -> bool:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # no transformers, so no Hugging Face cache
        return False
    return isinstance(value, (Cache, _KVTap))


def _hand_tap_to_attention(tap: _KVTap):
    """Forward pre-hook giving an attention module its tap under the name it reads."""
    def pre_hook(module, args, kwargs):
        # TransformerLens' attention re-implementations read the cache as `past_key_values`
        # (then `layer_past`), whatever name the Hugging Face block passed it on under.
        return args, {**kwargs, "past_key_values": tap}
    return pre_hook


def _layer_of_hook(hook_name: str) -> int | None:
    m = re.match(r"blocks\.(\d+)\.", hook_name)
    return int(m.group(1)) if m else None


def _error(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


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
        self.column_unembed: tuple[torch.Tensor, torch.Tensor] | None = None
        self.target_tokens = target_tokens
        self.answer_pos = answer_pos
        self.target_hooks = list(target_hooks)
        self.max_batch_tokens = max_batch_tokens
        self.batch, self.seq_len = target_tokens.shape
        # What the target run handed each block: positional and keyword arguments.
        self.block_args: dict[int, tuple] = {}
        self.block_kwargs: dict[int, dict] = {}
        self.resid_pre: dict[int, torch.Tensor] = {}  # layer -> [batch, pos, d_model]
        # The target run's keys and values: layer -> [batch, kv_heads, pos, d_head].
        self.kv: tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]] | None = None
        self.can_resume = False
        self.can_skip_prefix = False
        self.fallback_reason: str | None = "the target run has not been run yet"
        self._tap_attention: set[int] = set()  # layers whose attention module gets its tap directly
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

    def _off(self, reason: str, warn: bool = True) -> None:
        """Record why a shortcut is off; warn once per engine where a bridge falls back."""
        self.fallback_reason = reason
        if warn and not self._warned:
            self._warned = True
            what = "resuming at the patched layer" if not self.can_resume else "reusing the unchanged prefix"
            name = type(getattr(self.model, "adapter", self.model)).__name__
            warnings.warn(f"patchwidgets: {what} is off for this model ({name}): {reason}. "
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
        self.block_args, self.block_kwargs, self.kv, self._tap_attention = {}, {}, None, set()
        self.can_resume = self.can_skip_prefix = False
        self.column_unembed = None
        handles = []
        taps: dict[int, _KVTap] | None = None
        if record:
            names |= {f"blocks.{l}.hook_resid_pre" for l in range(len(blocks))}
            for layer, block in enumerate(blocks):
                handles.append(block.register_forward_pre_hook(self._recorder(layer), with_kwargs=True))
            if self.model in _TAPS_VERIFIED and int(self.answer_pos.min()) > 0:
                taps = {l: _KVTap(record=True) for l in range(len(blocks))}
                self._tap_attention = set(_TAP_ATTENTION.get(self.model, ()))
                handles += self._give_taps(taps)  # (after the recorder: it records the call as made)
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
            try:
                with torch.no_grad():
                    self._self_check(final, taps)
            except _Redo:
                _TAPS_VERIFIED.discard(self.model)
                return self.run_target(names, record)
        elif is_bridge:
            self.fallback_reason = "the target run was not recorded (record=False)"
        else:
            self.fallback_reason = ("not a TransformerBridge (no blocks to resume at): "
                                    "plain run_with_hooks by design")
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

    def _give_taps(self, taps: dict[int, _KVTap]) -> list:
        """Forward pre-hooks handing each block (or its attention) its recording tap in place
        of the model's own cache, as the engine's passes do; returns the hook handles."""
        def give(tap: _KVTap):
            def pre_hook(module, args, kwargs):
                args = tuple(tap if _is_cache(a) else a for a in args)
                kwargs = {n: tap if _is_cache(v) or (v is None and n in _CACHE_NAMES)
                          else (False if n == "use_cache" else v) for n, v in kwargs.items()}
                return args, kwargs
            return pre_hook

        handles = []
        for layer, block in enumerate(self.model.blocks):
            handles.append(block.register_forward_pre_hook(give(taps[layer]), with_kwargs=True))
            if layer in self._tap_attention:
                handles.append(block.attn.register_forward_pre_hook(_hand_tap_to_attention(taps[layer]),
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

    def _self_check(self, target_final: torch.Tensor, recorded: dict[int, _KVTap] | None = None) -> None:
        """Turn on the shortcuts that reproduce the plain forward pass; say why any is off.

        Two passes in the usual case: (A) every block from the recorded inputs, all
        positions, recording each layer's keys and values; (B) one staggered pass over the
        answer positions only, with copies of the batch joining at the first, the middle and
        the last block, which exercises resuming, tiling per-row arguments, the reused
        prefix and the column unembedding at once. Only when (B) fails do further passes
        find out which shortcut to turn off.
        """
        n_layers = len(self.model.blocks)
        if not all(hasattr(self.model, name) for name in ("ln_final", "unembed")):
            return self._off("the bridge has no ln_final and unembed to finish a resumed pass with")
        missing = [l for l in range(n_layers) if l not in self.block_kwargs]
        if missing:
            return self._off(f"blocks {missing} were not called in the target run")
        eps = torch.finfo(target_final.dtype).eps if target_final.is_floating_point() else 0.0
        tol = max(1e-5, 30 * eps) * (1.0 + float(target_final.abs().max()))

        def gap(logits: torch.Tensor) -> float:
            return float((logits - target_final.repeat(logits.shape[0] // self.batch, 1)).abs().max())

        if recorded is not None:
            # The target run recorded the keys and values itself (a model that passed (A)
            # before): check that it did so completely, then only (B) is left.
            if any(t.calls != 1 or t.recorded is None or t.recorded[0].shape[-2] != self.seq_len
                   for t in recorded.values()):
                raise _Redo
            if self._record_prefix(recorded, tol, gap) is not None:
                raise _Redo
            self._check_b(gap, tol)
            if not self.can_skip_prefix:
                raise _Redo  # (the target logits came through the taps: not a reference)
            return

        # (A) Every block, every position; the taps record keys and values.
        self._tap_attention = set(_TAP_ATTENTION.get(self.model, ()))
        taps = {l: _KVTap(record=True) for l in range(n_layers)}
        try:
            diff = gap(self._run_blocks({0: 1}, 0, [], taps))
            if diff > tol and self._tap_attention:  # what this model needed before fails now
                _TAP_ATTENTION.pop(self.model, None)
                self._tap_attention = set()
                taps = {l: _KVTap(record=True) for l in range(n_layers)}
                diff = gap(self._run_blocks({0: 1}, 0, [], taps))
        except Exception as e:  # an architecture whose blocks cannot be called like this
            return self._off(f"calling the blocks directly raised {_error(e)}")
        if diff > tol:
            return self._off(f"the resumed pass differs from the plain forward pass by {diff:.1e}")

        prefix_problem = self._record_prefix(taps, tol, gap)
        if prefix_problem is None:
            prefix_problem = self._check_b(gap, tol)
            if prefix_problem is None:
                _TAPS_VERIFIED.add(self.model)
                return

        # Prefix off: is resuming (with the batch tiled) still exact?
        try:
            diff = gap(self._resumed(n_layers // 2, 0, 2, []))
        except Exception as e:
            return self._off(f"calling the blocks directly raised {_error(e)}")
        if diff > tol:
            return self._off(f"the resumed pass differs from the plain forward pass by {diff:.1e}")
        self.can_resume = True
        self._enable_column_unembed()
        if self.column_unembed is not None and gap(self._resumed(n_layers - 1, 0, 1, [])) > tol:
            self.column_unembed = None
        self._off(prefix_problem, warn=not prefix_problem.startswith("no unchanged prefix"))

    def _check_b(self, gap: Callable[[torch.Tensor], float], tol: float) -> str | None:
        """(B) Resume + tiling + prefix (+ column unembedding) in one short pass; on success
        turns both shortcuts on, else says why the prefix is off (and forgets the K/V)."""
        n_layers = len(self.model.blocks)
        joins = {0: 1, n_layers // 2: 1, n_layers - 1: 1}
        offset = int(self.answer_pos.min())
        self._enable_column_unembed()
        try:
            diff = gap(self._run_blocks(joins, offset, []))
            if diff > tol and self.column_unembed is not None:
                self.column_unembed = None  # perhaps only the column shortcut is off
                diff = gap(self._run_blocks(joins, offset, []))
        except Exception as e:
            diff, problem = float("inf"), f"running positions {offset}.. only raised {_error(e)}"
        else:
            problem = f"reusing the cached keys/values differs from the plain forward pass by {diff:.1e}"
        if diff <= tol:
            self.can_resume = self.can_skip_prefix = True
            self.fallback_reason = None
            return None
        self.kv, self.column_unembed = None, None
        return problem

    def _record_prefix(self, taps: dict[int, _KVTap], tol: float,
                       gap: Callable[[torch.Tensor], float]) -> str | None:
        """Keep the keys and values pass (A) recorded, if every layer's attention read its tap
        exactly once over every position; else say why the prefix cannot be reused."""
        n_layers = len(self.model.blocks)
        if int(self.answer_pos.min()) == 0:
            return "no unchanged prefix to reuse: an answer is read at position 0"
        unread = [l for l in range(n_layers) if taps[l].calls == 0]
        if unread:
            no_attn = [l for l in unread
                       if not isinstance(getattr(self.model.blocks[l], "attn", None), torch.nn.Module)]
            if no_attn:
                return f"block {no_attn[0]} never read the KV cache and has no `attn` to hand it to"
            # The block did not pass its cache on: hand the tap to the attention module itself.
            self._tap_attention = set(unread)
            taps.update({l: _KVTap(record=True) for l in range(n_layers)})
            try:
                diff = gap(self._run_blocks({0: 1}, 0, [], taps))
            except Exception as e:
                diff, reason = float("inf"), f"handing attention its KV cache raised {_error(e)}"
            else:
                reason = f"handing attention its KV cache changes the logits by {diff:.1e}"
            if diff > tol:
                self._tap_attention = set()
                return reason
            with contextlib.suppress(TypeError):  # (a model that cannot be weakly referenced)
                _TAP_ATTENTION[self.model] = frozenset(self._tap_attention)
        for l in range(n_layers):
            if taps[l].calls != 1:
                return f"layer {l}'s attention read the KV cache {taps[l].calls} times, not once"
            if taps[l].recorded[0].shape[-2] != self.seq_len:
                return f"layer {l}'s cached keys cover {taps[l].recorded[0].shape[-2]} positions, not {self.seq_len}"
        self.kv = ({l: t.recorded[0] for l, t in taps.items()}, {l: t.recorded[1] for l, t in taps.items()})
        return None

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

    def _unembed(self, final: torch.Tensor) -> torch.Tensor:
        """Answer-position residual ``[rows, 1, d_model]`` -> logits ``[rows, n_columns]``."""
        normed = self.model.ln_final(final)
        if self.column_unembed is not None:
            weight, bias = self.column_unembed
            # (The transform is elementwise: fine on a subset of the columns.)
            return self._output_transform((normed.to(weight.device) @ weight + bias)[:, 0])
        logits = self._output_transform(self.model.unembed(normed)[:, 0])
        return logits if self.columns is None else logits[:, self.columns.to(logits.device)]

    def _enable_column_unembed(self) -> None:
        """Multiply only the needed unembedding columns (the self-check then verifies it)."""
        self.column_unembed = None
        if self.columns is None:
            return
        try:
            # Read inside `materialized`: an offloaded unembedding is on `meta` between calls.
            with materialized(getattr(self.model, "unembed", None)):
                weight, bias = self.model.W_U, self.model.b_U
                if weight.device.type == "meta" or bias.device.type == "meta":
                    return
                weight = weight[:, self.columns.to(weight.device)].detach().clone()
                bias = bias[self.columns.to(bias.device)].detach().clone().to(weight.device)
            self.column_unembed = (weight, bias)
        except Exception:  # no W_U/b_U (a hand-built model) or another layout: unembed everything
            self.column_unembed = None

    def _block_inputs(self, layer: int, hidden: torch.Tensor, offset: int, k: int,
                      tap: _KVTap) -> tuple[tuple, dict]:
        """Block ``layer``'s recorded arguments for a pass over positions ``offset..`` of ``k``
        copies of the batch: the hidden states replaced, the cache replaced by ``tap``, every
        other tensor cut to those positions and tiled."""
        def adapt(name: str | None, value: Any) -> Any:
            if _is_cache(value) or (value is None and name in _CACHE_NAMES):
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
                    taps: dict[int, _KVTap] | None = None) -> torch.Tensor:
        """Answer logits ``[k * batch, vocab]`` of a pass over blocks ``min(joins)..``,
        computing positions ``offset..`` only, where ``joins[l]`` copies of the target batch
        join the pass at block ``l`` (``k = sum(joins.values())``; rows in order of joining).

        Each copy enters from the target run's residual stream at its block. Layer ``l``'s
        cache is ``taps[l]`` when given (the self-check's recording taps), else a tap serving
        the target run's keys and values of positions ``0..offset-1`` to every row present.
        """
        model = self.model
        hidden: torch.Tensor | None = None   # [rows, pos - offset, d_model]
        k = 0
        with model.hooks(fwd_hooks=list(hooks)):
            for l in range(min(joins), len(model.blocks)):
                if joins.get(l):
                    entering = self.resid_pre[l][:, offset:].repeat(joins[l], 1, 1)
                    hidden = entering if hidden is None else torch.cat([hidden, entering.to(hidden.device)])
                    k += joins[l]
                tap = taps[l] if taps is not None else self._prefix_tap(l, offset, k)
                handle = None
                if l in self._tap_attention:
                    handle = model.blocks[l].attn.register_forward_pre_hook(_hand_tap_to_attention(tap),
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
            logits = self._unembed(hidden[rows, pos][:, None, :])
            return logits if self.logits_device is None else logits.to(self.logits_device)

    def _prefix_tap(self, layer: int, offset: int, k: int) -> _KVTap:
        """Layer ``layer``'s cache for ``k`` copies of the batch: the target run's keys and
        values of positions ``0..offset-1`` (none when ``offset`` is 0)."""
        if not offset:
            return _KVTap()
        keys, values = self.kv
        tile = lambda t: t[..., :offset, :].repeat(k, *([1] * (t.ndim - 1)))  # noqa: E731
        return _KVTap(prefix=(tile(keys[layer]), tile(values[layer])))

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
        """Group the patches that need running into chunks that each fit the token budget.

        On the fast path a chunk mixes hooks and layers (each patch's rows join the pass at
        its own layer); patches are taken in order of their offset, so the ones that skip the
        same prefix share a pass. The budget bounds the rows present at the last block times
        the positions computed. A plain pass (a hook outside the blocks, or shortcuts off)
        holds patches on one hook.
        """
        todo = [p for p in patches if p.first_pos is not None]
        answer_min = int(self.answer_pos.min())

        def offset_of(p: Patch) -> int:
            if self.can_skip_prefix and p.site.pos_axis is not None:
                return min(p.first_pos, answer_min)
            return 0

        fast = [p for p in todo if self.can_resume and p.layer is not None]
        plain: dict[str, list[Patch]] = {}
        for p in todo:
            if not (self.can_resume and p.layer is not None):
                plain.setdefault(p.hook_name, []).append(p)

        chunks: list[Chunk] = []
        fast.sort(key=lambda p: (-offset_of(p), p.layer))
        n_layers = len(getattr(self.model, "blocks", ()) or ()) or 1
        current: Chunk | None = None
        work = 0  # token-layers of `current`: sum over its patches of batch x blocks run
        for p in fast:
            offset = offset_of(p)
            if current is not None:
                rows = (len(current.patches) + 1) * self.batch
                new_offset = min(offset, current.offset)
                # Taking a patch with a smaller offset makes every row already in the chunk
                # compute the extra positions too; worth it only while that costs less than
                # the fixed cost of one more pass.
                extra = work * (current.offset - new_offset)
                if (rows * (self.seq_len - new_offset) <= self.max_batch_tokens
                        and extra <= self._pass_overhead_tokens * (n_layers - p.layer)):
                    current.offset, current.layer = new_offset, min(p.layer, current.layer)
                    current.patches.append(p)
                    work += self.batch * (n_layers - p.layer)
                    continue
            current = Chunk(p.layer, offset, [p])
            work = self.batch * (n_layers - p.layer)
            chunks.append(current)
        for group in plain.values():
            per_pass = max(1, self.max_batch_tokens // (self.batch * self.seq_len))
            chunks += [Chunk(None, 0, group[i:i + per_pass]) for i in range(0, len(group), per_pass)]
        for chunk in chunks:  # rows in order of joining the pass
            if chunk.layer is not None:
                chunk.patches.sort(key=lambda p: p.layer)
        return chunks

    def work(self, chunks: Sequence[Chunk] | None = None) -> int:
        """Block-tokens (one block run over one token of one row) of running ``chunks``, or,
        without chunks, of one unpatched run plus the self-check. What the progress bar
        (:class:`patchwidgets.watch.SweepWatch`) counts."""
        n_layers = len(getattr(self.model, "blocks", ()) or ()) or 1
        if chunks is None:  # the run, pass (A) of the check unless known good, the short pass (B)
            check_b = self.batch * (self.seq_len - int(self.answer_pos.min())) * (2 * n_layers - n_layers // 2 + 1)
            runs = 1 if self.model in _TAPS_VERIFIED else 2
            return runs * self.batch * self.seq_len * n_layers + check_b
        total = 0
        for chunk in chunks:
            k = len(chunk.patches)
            if chunk.layer is None:
                total += k * self.batch * self.seq_len * n_layers
                continue
            positions = self.seq_len - chunk.offset
            total += sum(self.batch * (n_layers - p.layer) * positions for p in chunk.patches)
        return total

    @property
    def _pass_overhead_tokens(self) -> float:
        """The fixed cost of running a block once, in tokens of that block's arithmetic.

        A block pass reads all its weights (48 d_model^2 bytes in float32) whatever the rows,
        which at a CPU's ratio of about 5 FLOPs per byte of memory bandwidth costs as much as
        about 10 tokens of arithmetic (24 d_model^2 FLOPs each); on top, Python and module
        calls take about 1 ms (50 MFLOP on a laptop core; GPT-2 small: ~4 tokens, toy-ioi:
        ~130). Only the planner's trade-off between fewer passes and fewer wasted positions
        reads it, never a result.
        """
        d_model = getattr(getattr(self.model, "cfg", None), "d_model", None) or 768
        return 10.0 + 50e6 / (24 * d_model ** 2)

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
