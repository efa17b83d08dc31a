"""Patch sites: *where* in the model an activation is swapped.

A :class:`Site` names one kind of activation (say the residual stream before each block) and
knows three things about it:

* the hook that carries it, e.g. ``blocks.{layer}.hook_resid_pre``;
* the axes a sweep runs over, e.g. ``("layer", "pos")``, so that one *index* such as
  ``(3, 10)`` means "layer 3, position 10";
* which slice of the activation tensor an index selects. A patch copies exactly that slice
  from the source run into the run being patched and leaves everything else alone.

Activation shapes follow TransformerLens' legacy hook names (batch first)::

    resid_pre / resid_mid / resid_post / attn_out / mlp_out   [batch, pos, d_model]
    head_out (hook_z) / head_q / head_k / head_v              [batch, pos, head, d_head]
    head_pattern                                              [batch, head, query_pos, key_pos]
    neuron (mlp.hook_post)                                    [batch, pos, d_mlp]

Group sites run several sites in one sweep: ``"block"`` (resid_pre, attn_out, mlp_out, as in
``get_act_patch_block_every``) and ``"heads_every"`` (output, q, k, v and pattern of every
head, as in ``get_act_patch_attn_head_all_pos_every``).

Any hook name of the model is a site too (``"blocks.1.attn.hook_z"``); then ``index=`` lists the
tuples to patch, each indexing the activation after its batch axis.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import UnknownSiteError

# How an index tuple selects a slice of the activation (batch axis excluded):
#   "pos"          (layer, pos)         -> act[:, pos]
#   "head"         (layer, head)        -> act[:, :, head]        every position
#   "head_pos"     (layer, pos, head)   -> act[:, pos, head]
#   "pattern"      (layer, head)        -> act[:, head]           every query position
#   "pattern_pos"  (layer, head, pos)   -> act[:, head, pos]      one query (destination) position
#   "neuron"       (layer, neuron)      -> act[:, :, neuron]      every position
#   "neuron_pos"   (layer, pos, neuron) -> act[:, pos, neuron]
#   "raw"          (*index)             -> act[(slice(None), *index)]


@dataclass(frozen=True)
class Dims:
    """The sizes a sweep's axes range over: the model's, and the prompt's length."""

    n_layers: int
    n_heads: int
    n_kv_heads: int          # key/value heads (fewer than n_heads in grouped-query models)
    d_mlp: int | None
    seq_len: int

    @classmethod
    def of(cls, cfg, seq_len: int) -> "Dims":
        """From a TransformerLens config (``n_layers``, ``n_heads``, ...)."""
        return cls(cfg.n_layers, cfg.n_heads, getattr(cfg, "n_key_value_heads", None) or cfg.n_heads,
                   getattr(cfg, "d_mlp", None), seq_len)

    def size(self, axis: str) -> int:
        """How many values a sweep axis has (``"head"``: query heads)."""
        return {"layer": self.n_layers, "pos": self.seq_len, "head": self.n_heads, "neuron": self.d_mlp or 0}[axis]


@dataclass(frozen=True)
class Site:
    """One kind of activation to patch; see the module docstring."""

    name: str
    hook_template: str
    axes: tuple[str, ...]
    kind: str
    key_value: bool = False  # k and v have n_key_value_heads heads in grouped-query models

    def hook_name(self, layer: int) -> str:
        return self.hook_template.format(layer=layer)

    def hook_of(self, index: tuple) -> str:
        """The hook that carries the activation ``index`` patches."""
        return self.hook_template if self.kind == "raw" else self.hook_name(index[0])

    def axis_size(self, axis: str, dims: Dims) -> int:
        """How many values ``axis`` has on this site."""
        return dims.n_kv_heads if axis == "head" and self.key_value else dims.size(axis)

    def grid(self, dims: Dims, chosen: dict[str, list[int] | None]) -> tuple[list[tuple], tuple[int, ...]]:
        """Every index tuple of a sweep over this site in row-major order, and the grid shape.

        ``chosen`` restricts an axis to some values (``None``: all of them). The order matches
        ``transformer_lens.patching`` (layer outermost), so results reshape to the same
        ``[layer, pos]`` or ``[layer, pos, head]`` grids.
        """
        ranges = [chosen.get(a) or list(range(self.axis_size(a, dims))) for a in self.axes]
        return list(itertools.product(*ranges)), tuple(len(r) for r in ranges)

    @property
    def pos_axis(self) -> int | None:
        """Axis of the activation (batch axis = 0) that holds the query / token position."""
        if self.kind == "raw":
            return None  # unknown layout: never run on a suffix of positions
        return 2 if self.kind.startswith("pattern") else 1

    @property
    def fixed_pos(self) -> bool:
        """True when the index names the single position it patches."""
        return "pos" in self.axes

    @property
    def pos_index(self) -> int:
        """Where the position sits in an index tuple."""
        return self.axes.index("pos")

    def slice(self, index: tuple, offset: int = 0) -> tuple:
        """The slice of ``act`` (batch included) that ``index`` selects.

        ``offset`` is the first position present in the activation: the engine may run only
        positions ``offset..seq_len-1`` (everything earlier is unchanged), so positions in
        the index are shifted by it.
        """
        k, all_ = self.kind, slice(None)
        if k == "pos":
            return (all_, index[1] - offset)
        if k == "head":
            return (all_, all_, index[1])
        if k == "head_pos":
            return (all_, index[1] - offset, index[2])
        if k == "pattern":
            return (all_, index[1])
        if k == "pattern_pos":
            return (all_, index[1], index[2] - offset)
        if k == "neuron":
            return (all_, all_, index[1])
        if k == "neuron_pos":
            return (all_, index[1] - offset, index[2])
        return (all_, *index)

    def reduce(self, attr: torch.Tensor) -> torch.Tensor:
        """Sum an elementwise ``[batch, ...]`` tensor over what each index patches.

        The result is indexed like ``(batch, *index[1:])``: summing an attribution
        ``(a_source - a_target) * grad`` this way prices every patch of one layer at once.
        """
        k = self.kind
        if k == "pos":            # [b, pos, d_model] -> [b, pos]
            return attr.sum(-1)
        if k == "head":           # [b, pos, head, d_head] -> [b, head]
            return attr.sum((1, 3))
        if k == "head_pos":       # -> [b, pos, head]
            return attr.sum(-1)
        if k == "pattern":        # [b, head, q, k] -> [b, head]
            return attr.sum((2, 3))
        if k == "pattern_pos":    # -> [b, head, q]
            return attr.sum(-1)
        if k == "neuron":         # [b, pos, d_mlp] -> [b, d_mlp]
            return attr.sum(1)
        if k == "neuron_pos":     # [b, pos, d_mlp], one value per neuron already
            return attr
        raise ValueError(f"a {k!r} site has no fixed layout to reduce over; sum its slices instead")

    def first_changed_position(self, index: tuple, changed: torch.Tensor) -> int | None:
        """First position the patch changes, or ``None`` when the patch is a no-op.

        ``changed`` is ``[seq_len]`` bool: the positions where the source run's input differs
        from the target's (:func:`patchwidgets.sources.differing_positions`). The model is
        causal, so an activation at position ``p`` can differ between the runs only if their
        inputs differ somewhere in ``0..p``; the residual stream entering layer 0 is the
        embedding of position ``p`` alone. Deciding from the inputs rather than by comparing
        activations makes the set of skipped patches the same on every machine.
        """
        if self.kind == "raw":
            return 0  # an arbitrary hook: its layout is unknown, so always run it, every position
        changed_so_far = changed.cumsum(0) > 0  # [pos]: the runs' inputs differed at or before pos
        if self.fixed_pos:
            pos = int(index[self.pos_index])
            local = self.name == "resid_pre" and int(index[0]) == 0  # the token embedding itself
            return pos if bool((changed if local else changed_so_far)[pos]) else None
        differs = changed_so_far.nonzero()
        return int(differs[0, 0]) if len(differs) else None


_S = Site
SITES: dict[str, Site] = {
    s.name: s
    for s in [
        _S("resid_pre", "blocks.{layer}.hook_resid_pre", ("layer", "pos"), "pos"),     # entering each block
        _S("resid_mid", "blocks.{layer}.hook_resid_mid", ("layer", "pos"), "pos"),     # between attention and MLP
        _S("resid_post", "blocks.{layer}.hook_resid_post", ("layer", "pos"), "pos"),   # leaving each block
        _S("attn_out", "blocks.{layer}.hook_attn_out", ("layer", "pos"), "pos"),
        _S("mlp_out", "blocks.{layer}.hook_mlp_out", ("layer", "pos"), "pos"),
        # Each head at every position: output (z), query, key, value, attention pattern.
        _S("head_out", "blocks.{layer}.attn.hook_z", ("layer", "head"), "head"),
        _S("head_q", "blocks.{layer}.attn.hook_q", ("layer", "head"), "head"),
        _S("head_k", "blocks.{layer}.attn.hook_k", ("layer", "head"), "head", key_value=True),
        _S("head_v", "blocks.{layer}.attn.hook_v", ("layer", "head"), "head", key_value=True),
        _S("head_pattern", "blocks.{layer}.attn.hook_pattern", ("layer", "head"), "pattern"),
        # Each head at one position (the pattern: from one destination position).
        _S("head_out_by_pos", "blocks.{layer}.attn.hook_z", ("layer", "pos", "head"), "head_pos"),
        _S("head_q_by_pos", "blocks.{layer}.attn.hook_q", ("layer", "pos", "head"), "head_pos"),
        _S("head_k_by_pos", "blocks.{layer}.attn.hook_k", ("layer", "pos", "head"), "head_pos", key_value=True),
        _S("head_v_by_pos", "blocks.{layer}.attn.hook_v", ("layer", "pos", "head"), "head_pos", key_value=True),
        _S("head_pattern_by_pos", "blocks.{layer}.attn.hook_pattern", ("layer", "head", "pos"), "pattern_pos"),
        # Each MLP neuron (post-activation), at every position or at one.
        _S("neuron", "blocks.{layer}.mlp.hook_post", ("layer", "neuron"), "neuron"),
        _S("neuron_by_pos", "blocks.{layer}.mlp.hook_post", ("layer", "pos", "neuron"), "neuron_pos"),
    ]
}

GROUPS: dict[str, tuple[str, ...]] = {
    "block": ("resid_pre", "attn_out", "mlp_out"),
    "heads_every": ("head_out", "head_q", "head_k", "head_v", "head_pattern"),
}

# Names learners bring from TransformerLens or the ARENA course.
ALIASES: dict[str, str] = {
    "z": "head_out", "q": "head_q", "k": "head_k", "v": "head_v", "pattern": "head_pattern",
    "attn_head_out_all_pos": "head_out", "attn_head_q_all_pos": "head_q",
    "attn_head_k_all_pos": "head_k", "attn_head_v_all_pos": "head_v",
    "attn_head_pattern_all_pos": "head_pattern",
    "attn_head_out_by_pos": "head_out_by_pos", "attn_head_q_by_pos": "head_q_by_pos",
    "attn_head_k_by_pos": "head_k_by_pos", "attn_head_v_by_pos": "head_v_by_pos",
    "attn_head_pattern_by_pos": "head_pattern_by_pos",
    "block_every": "block", "attn_head_all_pos_every": "heads_every",
    "every": "heads_every",
    "mlp_post": "neuron",
}


def site_names() -> list[str]:
    """Every built-in site and group name (aliases excluded)."""
    return [*SITES, *GROUPS]


def resolve_sites(site: str | Site, hook_names: Sequence[str] = ()) -> list[Site]:
    """Turn a site name (or alias, group, hook name) into the list of sites it sweeps."""
    if isinstance(site, Site):
        return [site]
    if not isinstance(site, str):
        raise UnknownSiteError(f"site must be a string, got {type(site).__name__}")
    name = ALIASES.get(site, site)
    if name in SITES:
        return [SITES[name]]
    if name in GROUPS:
        return [SITES[n] for n in GROUPS[name]]
    if site in hook_names:
        return [Site(site, site, ("index",), "raw")]
    raise UnknownSiteError(
        f"unknown site {site!r}. Valid sites: {', '.join(site_names())}; "
        f"aliases: {', '.join(sorted(ALIASES))}; or any hook name of the model "
        "(e.g. 'blocks.0.attn.hook_z') together with index=[...]."
    )
