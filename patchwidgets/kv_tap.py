"""How the target run's keys and values get into a pass the engine runs itself.

The engine skips the positions a patch cannot change (:mod:`patchwidgets.engine`): a pass
computes positions ``offset..`` only, and attention must still see the keys and values of
positions ``0..offset-1``. Those are the target run's, recorded once.

Every attention implementation the bridge runs, Hugging Face's own or TransformerLens'
re-implementation, hands the keys and values of the positions it computes to a KV cache,
``cache.update(k, v, layer_idx)``, and attends over whatever comes back. So the engine passes
each block a :class:`KVTap`, a one-layer stand-in for that cache, in place of the cache
argument it recorded (:func:`is_cache_argument` recognises that argument by its type, so it
does not matter whether the block calls it ``cache``, ``past_key_values`` or
``layer_past``). The tap records keys and values on the first (all positions) pass and
prepends the prefix ones on later passes.

Where the block's attention never reads the argument (TransformerLens 4.3 re-implements
attention and reads only ``past_key_values``/``layer_past``, while transformers 5 blocks pass
``cache=``), the tap is handed to that attention module directly by a forward pre-hook
(:func:`hand_tap_to_attention`). Which layers need that is a fact about the architecture that
the engine's self-check learns (:mod:`patchwidgets.selfcheck`): a tap's ``calls`` count says
whether its layer's attention read it, exactly once.

Example, one layer, a prefix of 3 positions and 2 new ones::

    tap = KVTap(prefix=(keys[..., :3, :], values[..., :3, :]))   # [rows, kv_heads, 3, d_head]
    k, v = tap.update(new_keys, new_values, 0)                   # [rows, kv_heads, 5, d_head]
"""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["KVTap", "is_cache_argument", "hand_tap_to_block", "hand_tap_to_attention"]

# Names under which Hugging Face blocks have taken a layer's KV cache. A recorded argument is
# recognised as the cache by its type first (a ``transformers`` ``Cache``); the names only
# catch a cache argument that happened to be ``None`` in the target run.
_CACHE_NAMES = frozenset({"cache", "past_key_values", "past_key_value", "layer_past"})


class KVTap:
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

    def update(self, key: torch.Tensor, value: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
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
    return isinstance(value, (Cache, KVTap))


def is_cache_argument(name: str | None, value: Any) -> bool:
    """Whether a block's recorded argument ``name=value`` (``name`` ``None`` for a positional
    one) is where the block takes its KV cache: a cache by type, or ``None`` under a cache's name."""
    return _is_cache(value) or (value is None and name in _CACHE_NAMES)


def hand_tap_to_block(tap: KVTap) -> Callable:
    """Forward pre-hook giving a block ``tap`` in place of the cache it was called with (and
    ``use_cache=False``: the tap is the cache, there is nothing to hand back)."""
    def pre_hook(module, args, kwargs):
        args = tuple(tap if is_cache_argument(None, a) else a for a in args)
        kwargs = {n: tap if is_cache_argument(n, v) else (False if n == "use_cache" else v)
                  for n, v in kwargs.items()}
        return args, kwargs
    return pre_hook


def hand_tap_to_attention(tap: KVTap) -> Callable:
    """Forward pre-hook giving an attention module its tap under the name it reads."""
    def pre_hook(module, args, kwargs):
        # TransformerLens' attention re-implementations read the cache as `past_key_values`
        # (then `layer_past`), whatever name the Hugging Face block passed it on under.
        return args, {**kwargs, "past_key_values": tap}
    return pre_hook
