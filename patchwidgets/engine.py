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
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

from .sites import Site

Hook = tuple[str, Callable]

# Names under which Hugging Face blocks have taken a layer's KV cache. A recorded argument is
# recognised as the cache by its type first (a ``transformers`` ``Cache``); the names only
# catch a cache argument that happened to be ``None`` in the target run.
_CACHE_NAMES = frozenset({"cache", "past_key_values", "past_key_value", "layer_past"})


class ShortcutWarning(UserWarning):
    """A TransformerBridge model could not use one of the engine's shortcuts (results stay exact)."""


@dataclass
class Patch:
    """One patch of a sweep: ``site`` at ``index``, first changing position ``first_pos``."""

    site: Site
    index: tuple
    slot: int                  # where its values go in the result (row-major grid order)
    first_pos: int | None      # None: a no-op, never run


@dataclass
class Chunk:
    """Patches sharing one hook, run together in one forward pass."""

    hook_name: str
    layer: int | None
    offset: int
    patches: list[Patch] = field(default_factory=list)


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
        # Tokens go where the weights are, so a model on a GPU is patched on the GPU.
        param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        if param is not None:
            target_tokens = target_tokens.to(param.device)
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
        if record:
            names |= {f"blocks.{l}.hook_resid_pre" for l in range(len(blocks))}
            for layer, block in enumerate(blocks):
                handles.append(block.register_forward_pre_hook(self._recorder(layer), with_kwargs=True))
        acts: dict[str, torch.Tensor] = {}

        def saver(name: str):
            def save(activation: torch.Tensor, hook) -> None:
                acts[name] = activation.detach()
            return save

        try:
            with torch.no_grad():
                logits = self.model.run_with_hooks(
                    self.target_tokens,
                    fwd_hooks=[*self.target_hooks, *[(n, saver(n)) for n in sorted(names)]],
                )
        finally:
            for h in handles:
                h.remove()
        final = self._answer_logits(logits)
        if record:
            self.resid_pre = {l: acts[f"blocks.{l}.hook_resid_pre"] for l in range(len(blocks))}
            with torch.no_grad():
                self._self_check(final)
        elif is_bridge:
            self.fallback_reason = "the target run was not recorded (record=False)"
        else:
            self.fallback_reason = ("not a TransformerBridge (no blocks to resume at): "
                                    "plain run_with_hooks by design")
        return final, acts

    def _recorder(self, layer: int):
        def record(module, args, kwargs):
            # As given, not bound to the signature: some adapters wrap a block's forward in
            # `(*args, **kwargs)` (Falcon), and the call must be replayed the same way.
            self.block_args[layer], self.block_kwargs[layer] = tuple(args), dict(kwargs)
        return record

    def _self_check(self, target_final: torch.Tensor) -> None:
        """Turn on the shortcuts that reproduce the plain forward pass; say why any is off."""
        n_layers = len(self.model.blocks)
        if not all(hasattr(self.model, name) for name in ("ln_final", "unembed")):
            return self._off("the bridge has no ln_final and unembed to finish a resumed pass with")
        missing = [l for l in range(n_layers) if l not in self.block_kwargs]
        if missing:
            return self._off(f"blocks {missing} were not called in the target run")
        eps = torch.finfo(target_final.dtype).eps if target_final.is_floating_point() else 0.0
        tol = max(1e-5, 30 * eps) * (1.0 + float(target_final.abs().max()))

        def gap(logits: torch.Tensor, k: int) -> float:
            return float((logits - target_final.repeat(k, 1)).abs().max())

        # 1. Resume: one pass over every layer and position (its taps record the keys and
        # values), and one from the middle with the batch tiled twice (checks the tiling).
        taps = {l: _KVTap(record=True) for l in range(n_layers)}
        try:
            diff = gap(self._run_blocks(0, 0, 1, [], taps), 1)
            if diff <= tol:
                diff = gap(self._resumed(n_layers // 2, 0, 2, []), 2)
        except Exception as e:  # an architecture whose blocks cannot be called like this
            return self._off(f"calling the blocks directly raised {_error(e)}")
        if diff > tol:
            return self._off(f"the resumed pass differs from the plain forward pass by {diff:.1e}")
        self.can_resume = True
        self._enable_column_unembed(target_final, tol)

        # 2. Prefix: every layer's attention must have read its tap exactly once.
        offset = int(self.answer_pos.min())
        if offset == 0:
            return self._off("no unchanged prefix to reuse: an answer is read at position 0", warn=False)
        unread = [l for l in range(n_layers) if taps[l].calls == 0]
        if unread:
            no_attn = [l for l in unread
                       if not isinstance(getattr(self.model.blocks[l], "attn", None), torch.nn.Module)]
            if no_attn:
                return self._off(f"block {no_attn[0]} never read the KV cache and has no `attn` to hand it to")
            self._tap_attention = set(unread)
            taps = {l: _KVTap(record=True) for l in range(n_layers)}
            try:
                diff = gap(self._run_blocks(0, 0, 1, [], taps), 1)
            except Exception as e:
                diff, reason = float("inf"), f"handing attention its KV cache raised {_error(e)}"
            else:
                reason = f"handing attention its KV cache changes the logits by {diff:.1e}"
            if diff > tol:
                self._tap_attention = set()
                return self._off(reason)
        for l in range(n_layers):
            if taps[l].calls != 1:
                return self._off(f"layer {l}'s attention read the KV cache {taps[l].calls} times, not once")
            if taps[l].recorded[0].shape[-2] != self.seq_len:
                return self._off(f"layer {l}'s cached keys cover {taps[l].recorded[0].shape[-2]} positions, "
                                 f"not {self.seq_len}")
        self.kv = ({l: t.recorded[0] for l, t in taps.items()}, {l: t.recorded[1] for l, t in taps.items()})
        try:
            diff = max(gap(self._resumed(l, offset, 2, []), 2) for l in (0, n_layers - 1))
        except Exception as e:
            self.kv = None
            return self._off(f"running positions {offset}.. only raised {_error(e)}")
        if diff > tol:
            self.kv = None
            return self._off(f"reusing the cached keys/values differs from the plain forward pass by {diff:.1e}")
        self.can_skip_prefix = True
        self.fallback_reason = None

    # ------------------------------------------------------------------ forward passes
    def _answer_logits(self, logits: torch.Tensor, offset: int = 0) -> torch.Tensor:
        rows = torch.arange(logits.shape[0], device=logits.device)
        pos = self.answer_pos.to(logits.device).repeat(logits.shape[0] // self.batch) - offset
        final = logits[rows, pos]
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
            return self._output_transform((normed @ weight + bias)[:, 0])  # elementwise: fine on a subset
        logits = self._output_transform(self.model.unembed(normed)[:, 0])
        return logits if self.columns is None else logits[:, self.columns.to(logits.device)]

    def _enable_column_unembed(self, target_final: torch.Tensor, tol: float) -> None:
        """Multiply only the needed unembedding columns, if that reproduces the model's logits."""
        if self.columns is None:
            return
        try:
            cols = self.columns.to(target_final.device)
            self.column_unembed = (self.model.W_U[:, cols].detach(), self.model.b_U[cols].detach())
            if float((self._resumed(len(self.model.blocks) - 1, 0, 1, []) - target_final).abs().max()) > tol:
                self.column_unembed = None
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

    def _run_blocks(self, layer: int, offset: int, k: int, hooks: Sequence[Hook],
                    taps: dict[int, _KVTap]) -> torch.Tensor:
        """Answer logits ``[k * batch, vocab]`` of blocks ``layer..`` run on positions
        ``offset..`` of ``k`` copies of the target run, ``taps[l]`` serving layer ``l``'s cache."""
        model = self.model
        n_layers = len(model.blocks)
        hidden = self.resid_pre[layer][:, offset:].repeat(k, 1, 1)  # [k * batch, pos - offset, d_model]
        handles = [model.blocks[l].attn.register_forward_pre_hook(_hand_tap_to_attention(taps[l]), with_kwargs=True)
                   for l in sorted(self._tap_attention) if l >= layer]
        try:
            with model.hooks(fwd_hooks=list(hooks)):
                for l in range(layer, n_layers):
                    args, kwargs = self._block_inputs(l, hidden, offset, k, taps[l])
                    out = model.blocks[l](*args, **kwargs)
                    hidden = out[0] if isinstance(out, tuple) else out
                rows = torch.arange(hidden.shape[0], device=hidden.device)
                pos = self.answer_pos.to(hidden.device).repeat(k) - offset
                return self._unembed(hidden[rows, pos][:, None, :])
        finally:
            for h in handles:
                h.remove()

    def _resumed(self, layer: int, offset: int, k: int, hooks: Sequence[Hook]) -> torch.Tensor:
        """Answer logits ``[k * batch, vocab]`` of a pass that starts at block ``layer`` and
        computes positions ``offset..`` only, attending to the target run's keys and values
        for positions ``0..offset-1``."""
        n_layers = len(self.model.blocks)
        if offset:
            keys, values = self.kv
            tile = lambda t: t[..., :offset, :].repeat(k, *([1] * (t.ndim - 1)))  # noqa: E731
            taps = {l: _KVTap(prefix=(tile(keys[l]), tile(values[l]))) for l in range(layer, n_layers)}
        else:
            taps = {l: _KVTap() for l in range(layer, n_layers)}
        return self._run_blocks(layer, offset, k, hooks, taps)

    def _plain(self, k: int, hooks: Sequence[Hook]) -> torch.Tensor:
        tokens = self.target_tokens.repeat(k, 1)
        logits = self.model.run_with_hooks(tokens, fwd_hooks=[*self.target_hooks, *hooks])
        return self._answer_logits(logits)

    # ------------------------------------------------------------------ patches
    def plan(self, patches: Sequence[Patch]) -> list[Chunk]:
        """Group the patches that need running into chunks that each fit the token budget."""
        groups: dict[str, list[Patch]] = {}
        for p in patches:
            if p.first_pos is not None:
                groups.setdefault(p.site.hook_name(p.index[0]) if p.site.kind != "raw"
                                  else p.site.hook_template, []).append(p)
        chunks = []
        for hook_name, group in groups.items():
            layer = _layer_of_hook(hook_name)
            resumable = self.can_resume and layer is not None
            group.sort(key=lambda p: -p.first_pos)  # similar offsets share a chunk
            current: Chunk | None = None
            for p in group:
                offset = 0
                if resumable and self.can_skip_prefix and p.site.pos_axis is not None:
                    offset = min(p.first_pos, int(self.answer_pos.min()))
                if current is not None:
                    rows = (len(current.patches) + 1) * self.batch
                    if rows * (self.seq_len - min(offset, current.offset)) <= self.max_batch_tokens:
                        current.offset = min(offset, current.offset)
                        current.patches.append(p)
                        continue
                current = Chunk(hook_name, layer if resumable else None, offset, [p])
                chunks.append(current)
        return chunks

    def run_chunk(self, chunk: Chunk, sources: dict[str, torch.Tensor]) -> torch.Tensor:
        """Answer logits ``[n_patches, batch, vocab]`` for one chunk of patches."""
        site = chunk.patches[0].site
        source = sources[chunk.hook_name]
        if chunk.offset and site.pos_axis is not None:
            source = source.narrow(site.pos_axis, chunk.offset, self.seq_len - chunk.offset)
        slices = [site.slice(p.index, chunk.offset) for p in chunk.patches]
        batch = self.batch

        def patch_hook(activation: torch.Tensor, hook) -> torch.Tensor:
            # Write into a copy: a hook's tensor can share storage with the residual stream
            # (the bridge's hook_resid_mid is the MLP's LayerNorm input), and an in-place edit
            # would leak the patch into activations the hook does not own.
            activation = activation.clone()
            for i, sl in enumerate(slices):
                activation[i * batch:(i + 1) * batch][sl] = source[sl]
            return activation

        hooks = [(chunk.hook_name, patch_hook)]
        k = len(chunk.patches)
        with torch.no_grad():
            if chunk.layer is not None:
                logits = self._resumed(chunk.layer, chunk.offset, k, hooks)
            else:
                logits = self._plain(k, hooks)
        return logits.reshape(k, batch, -1)
