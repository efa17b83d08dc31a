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
   the engine calls the blocks itself, with the keyword arguments it recorded from the
   target run's own forward pass.)
3. **Skipping unchanged positions.** The model is causal: if a patch first changes position
   ``f``, positions ``0..f-1`` are identical to the target run in every later layer. The pass
   runs only positions ``f..`` and attends to the target run's cached keys and values for the
   earlier ones.
4. **No-op patches and logits.** A patch whose source slice equals the target slice changes
   nothing; its result is the target run's, without running it. And only the answer
   position is unembedded.

Before a sweep, the engine checks its shortcut against a plain forward pass of the same
model; if an architecture does not reproduce the plain logits, it falls back to plain batched
``run_with_hooks`` (still batched and still skipping no-ops).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

from .sites import Site

Hook = tuple[str, Callable]


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


class _PrefixKV:
    """Stands in for a Hugging Face KV cache: prepends the target run's cached keys/values.

    The bridge's attention calls ``past_key_values.update(k, v, layer_idx)`` with the keys
    and values of the positions it is computing and attends over whatever comes back.
    """

    def __init__(self, keys: dict[int, torch.Tensor], values: dict[int, torch.Tensor], offset: int):
        self.keys, self.values, self.offset = keys, values, offset

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        return torch.cat([self.keys[layer_idx], k], dim=-2), torch.cat([self.values[layer_idx], v], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.offset


def _layer_of_hook(hook_name: str) -> int | None:
    m = re.match(r"blocks\.(\d+)\.", hook_name)
    return int(m.group(1)) if m else None


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
        self.block_kwargs: dict[int, dict] = {}
        self.resid_pre: dict[int, torch.Tensor] = {}
        self.kv: tuple[dict, dict] | None = None
        self.can_resume = False
        self.can_skip_prefix = False

    # ------------------------------------------------------------------ target run
    def run_target(
        self, names: Iterable[str], record: bool = True
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run once: the answer logits, the activations ``names`` and, with ``record`` on a
        TransformerBridge, everything the resumed passes need (block inputs and K/V)."""
        names = set(names)
        blocks = getattr(self.model, "blocks", None)
        is_bridge = record and blocks is not None and hasattr(self.model, "ln_final") and hasattr(
            blocks[0], "original_component"
        )
        handles = []
        if is_bridge:
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
        if is_bridge:
            self.resid_pre = {l: acts[f"blocks.{l}.hook_resid_pre"] for l in range(len(blocks))}
            self.kv = self._kv_from_recorded_cache()
            self._self_check(final)
        return final, acts

    def _recorder(self, layer: int):
        def record(module, args, kwargs):
            try:
                bound = inspect.signature(module.original_component.forward).bind(*args, **kwargs)
                self.block_kwargs[layer] = dict(bound.arguments)
            except (TypeError, ValueError):
                self.block_kwargs.pop(layer, None)
        return record

    def _kv_from_recorded_cache(self) -> tuple[dict, dict] | None:
        kw = self.block_kwargs.get(0, {})
        cache = kw.get("past_key_values") or kw.get("layer_past")
        keys, values = {}, {}
        try:
            for l in range(len(self.model.blocks)):
                if hasattr(cache, "layers"):
                    keys[l], values[l] = cache.layers[l].keys, cache.layers[l].values
                else:
                    keys[l], values[l] = cache.key_cache[l], cache.value_cache[l]
                if keys[l].shape[-2] != self.seq_len:
                    return None
        except Exception:
            return None
        return keys, values

    def _self_check(self, target_final: torch.Tensor) -> None:
        """Enable the shortcuts only where they reproduce the plain forward pass."""
        n_layers = len(self.model.blocks)
        if len(self.block_kwargs) != n_layers:
            return
        tol = 1e-4 * (1.0 + float(target_final.abs().max()))
        checks = [(0, 0), (n_layers // 2, 0)]
        try:
            self.can_resume = all(
                float((self._resumed(l, o, 1, []) - target_final).abs().max()) <= tol for l, o in checks
            )
            if self.can_resume and self.kv is not None:
                offset = int(self.answer_pos.min())
                self.can_skip_prefix = offset > 0 and all(
                    float((self._resumed(l, offset, 1, []) - target_final).abs().max()) <= tol
                    for l in (0, n_layers - 1)
                )
        except Exception:  # an architecture whose blocks cannot be called like this
            self.can_resume = self.can_skip_prefix = False
        if self.can_resume:
            self._enable_column_unembed(target_final, tol)

    # ------------------------------------------------------------------ forward passes
    def _answer_logits(self, logits: torch.Tensor, offset: int = 0) -> torch.Tensor:
        rows = torch.arange(logits.shape[0], device=logits.device)
        pos = self.answer_pos.to(logits.device).repeat(logits.shape[0] // self.batch) - offset
        final = logits[rows, pos]
        return final if self.columns is None else final[:, self.columns.to(final.device)]

    def _unembed(self, final: torch.Tensor) -> torch.Tensor:
        """Answer-position residual ``[rows, 1, d_model]`` -> logits ``[rows, n_columns]``."""
        normed = self.model.ln_final(final)
        if self.column_unembed is not None:
            weight, bias = self.column_unembed
            return (normed @ weight + bias)[:, 0]
        logits = self.model.unembed(normed)[:, 0]
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

    def _block_call_kwargs(self, layer: int, hidden: torch.Tensor, offset: int, k: int, prefix) -> dict:
        """The recorded inputs of block ``layer``, cut to positions ``offset..`` and tiled k times."""
        kwargs = {}
        for name, value in self.block_kwargs[layer].items():
            if name in ("past_key_values", "layer_past", "past_key_value"):
                value = prefix
            elif name == "use_cache":
                value = False
            elif name == "hidden_states":
                value = hidden
            elif isinstance(value, torch.Tensor):
                value = self._cut_and_tile(name, value, offset, k)
            elif isinstance(value, tuple) and all(isinstance(v, torch.Tensor) for v in value):
                value = tuple(self._cut_and_tile(name, v, offset, k) for v in value)
            kwargs[name] = value
        if "hidden_states" not in kwargs:
            kwargs["hidden_states"] = hidden
        return kwargs

    def _cut_and_tile(self, name: str, t: torch.Tensor, offset: int, k: int) -> torch.Tensor:
        if offset:
            if name == "attention_mask" and t.ndim == 4:
                t = t[:, :, offset:, :]  # query rows only; keys still span every position
            elif name == "cache_position" and t.ndim == 1:
                t = t[offset:]
            elif t.ndim >= 2 and t.shape[1] == self.seq_len:
                t = t[:, offset:]  # position_ids, rotary (cos, sin), ...
        if k > 1 and self.batch > 1 and t.ndim >= 2 and t.shape[0] == self.batch:
            t = t.repeat(k, *([1] * (t.ndim - 1)))  # per-row inputs (padding masks) follow their rows
        return t

    def _resumed(self, layer: int, offset: int, k: int, hooks: Sequence[Hook]) -> torch.Tensor:
        """Answer logits ``[k * batch, vocab]`` of a pass that starts at block ``layer`` and
        computes positions ``offset..`` only."""
        model = self.model
        hidden = self.resid_pre[layer][:, offset:].repeat(k, 1, 1)
        prefix = None
        if offset:
            keys, values = self.kv
            keys = {l: keys[l][:, :, :offset].repeat(k, 1, 1, 1) for l in range(layer, len(keys))}
            values = {l: values[l][:, :, :offset].repeat(k, 1, 1, 1) for l in range(layer, len(values))}
            prefix = _PrefixKV(keys, values, offset)
        with model.hooks(fwd_hooks=list(hooks)):
            for l in range(layer, len(model.blocks)):
                out = model.blocks[l](**self._block_call_kwargs(l, hidden, offset, k, prefix))
                hidden = out[0] if isinstance(out, tuple) else out
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            pos = self.answer_pos.to(hidden.device).repeat(k) - offset
            return self._unembed(hidden[rows, pos][:, None, :])

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
