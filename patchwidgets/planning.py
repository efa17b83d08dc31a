"""Planning a sweep: which patches share a forward pass, and what the passes cost.

Pure functions of a few numbers (batch size, prompt length, layers, the token budget) and a
list of :class:`Patch` es: no model, no tensors. :class:`patchwidgets.engine.Engine` calls
them with its target run's numbers and runs the chunks they return.

The units
---------
A pass holds ``k`` patches, each on its own copy of the target batch (``batch`` rows). On the
fast path (the engine resumes at the patched layer) a copy *joins* the pass at its own layer,
since blocks below it cannot see the patch, and the pass computes positions ``offset..``
only, since positions before the first one a patch changes are the target run's. Costs are
counted in **block-tokens**: one block run over one position of one row. A patch joining at
layer ``l`` of ``n_layers``, in a pass from position ``offset`` of ``seq_len``, costs
``batch * (n_layers - l) * (seq_len - offset)``.

How patches are grouped (:func:`plan`)
--------------------------------------
* A patch's ``offset`` is its first changed position, capped at the first answer position
  (the pass must compute the answer rows), or 0 when the prefix cannot be skipped or the
  site has no position axis (:func:`patch_offset`).
* Patches are taken latest offset first (then lowest layer): those that skip the same prefix
  share a pass. A chunk's offset is the smallest of its patches', its ``layer`` the lowest.
* A patch joins the current chunk while the chunk stays within the **token budget** (rows
  present at the last block x positions computed ``<= max_batch_tokens``) and taking it is
  worth it: a patch with a smaller offset makes every row already in the chunk compute the
  extra positions, which must cost less than a pass's fixed cost (``overhead`` tokens per
  block, :func:`pass_overhead_tokens`) over the blocks the new patch runs.
* A patch outside the blocks (``hook_embed``), or any patch when the engine cannot resume,
  runs in a plain pass from the embeddings: such chunks hold patches of one hook, as many
  as the budget allows for full passes, and at least one.

Example: batch 2, 10 positions, 4 layers, the answer at position 9. Four ``resid_pre``
patches of layer 3 at positions 6..9 have offsets 6, 7, 8, 9 and are taken 9, 8, 7, 6. All
four in one pass from position 6 hold ``8 rows x 4 positions = 32`` tokens: a budget of 32
gives one chunk; a budget of 31 gives a chunk of three from position 7 (``6 x 3 = 18``) and
one of the last patch alone. (Taking offset 6 into the chunk from 7 costs its six rows' worth
of blocks one extra position: ``extra = 6``, well under a pass's overhead.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence, cast

from .sites import Site

__all__ = ["Patch", "Chunk", "patch_offset", "plan", "work", "target_work", "pass_overhead_tokens"]


def _layer_of_hook(hook_name: str) -> int | None:
    m = re.match(r"blocks\.(\d+)\.", hook_name)
    return int(m.group(1)) if m else None


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
            layer = cast(int, p.layer)  # (a resumed chunk: every patch is inside a block)
            counts[layer] = counts.get(layer, 0) + 1
        return counts


def patch_offset(patch: Patch, answer_min: int, skip_prefix: bool) -> int:
    """The first position a pass running ``patch`` computes: its first changed position,
    capped at the first answer position ``answer_min``; 0 when the unchanged prefix is not
    skipped (``skip_prefix`` off) or the site has no known position axis (a raw hook)."""
    if skip_prefix and patch.first_pos is not None and patch.site.pos_axis is not None:
        return min(patch.first_pos, answer_min)
    return 0


def plan(patches: Sequence[Patch], *, batch: int, seq_len: int, n_layers: int, answer_min: int,
         max_batch_tokens: int, resume: bool, skip_prefix: bool, overhead: float) -> list[Chunk]:
    """Group the patches that need running (no-ops, ``first_pos`` ``None``, are left out) into
    chunks that each fit the token budget; see the module docstring.

    Args:
        batch, seq_len: the target run's rows and positions.
        n_layers: the model's blocks.
        answer_min: the first answer position (a pass computes at least from there).
        max_batch_tokens: rows x positions one pass may hold.
        resume: passes may start at the patched layer (else every chunk is a plain pass).
        skip_prefix: passes may skip the positions before a patch's first changed one.
        overhead: a pass's fixed cost per block, in block-tokens (:func:`pass_overhead_tokens`).

    Returns:
        Resumed chunks first (patches in each in order of their layer: rows join the pass in
        that order), then plain ones, hook by hook.
    """
    todo = [p for p in patches if p.first_pos is not None]
    fast: list[tuple[int, int, Patch]] = []  # (offset, layer, patch)
    plain: dict[str, list[Patch]] = {}
    for p in todo:
        layer = p.layer
        if resume and layer is not None:
            fast.append((patch_offset(p, answer_min, skip_prefix), layer, p))
        else:
            plain.setdefault(p.hook_name, []).append(p)

    chunks: list[Chunk] = []
    fast.sort(key=lambda f: (-f[0], f[1]))
    current: Chunk | None = None
    cost = 0  # block-tokens per position of `current`: sum over its patches of batch x blocks run
    for offset, layer, p in fast:
        if current is not None and current.layer is not None:
            rows = (len(current.patches) + 1) * batch
            new_offset = min(offset, current.offset)
            # Taking a patch with a smaller offset makes every row already in the chunk
            # compute the extra positions too; worth it only while that costs less than
            # the fixed cost of one more pass.
            extra = cost * (current.offset - new_offset)
            if (rows * (seq_len - new_offset) <= max_batch_tokens
                    and extra <= overhead * (n_layers - layer)):
                current.offset, current.layer = new_offset, min(layer, current.layer)
                current.patches.append(p)
                cost += batch * (n_layers - layer)
                continue
        current = Chunk(layer, offset, [p])
        cost = batch * (n_layers - layer)
        chunks.append(current)
    for group in plain.values():
        per_pass = max(1, max_batch_tokens // (batch * seq_len))
        chunks += [Chunk(None, 0, group[i:i + per_pass]) for i in range(0, len(group), per_pass)]
    for chunk in chunks:  # rows in order of joining the pass
        if chunk.layer is not None:
            chunk.patches.sort(key=lambda p: cast(int, p.layer))
    return chunks


def work(chunks: Sequence[Chunk], *, batch: int, seq_len: int, n_layers: int) -> int:
    """Block-tokens of running ``chunks``: a plain chunk runs every block over every position
    for each of its patches; a resumed one runs each patch from its own layer up, over
    positions ``offset..``."""
    total = 0
    for chunk in chunks:
        k = len(chunk.patches)
        if chunk.layer is None:
            total += k * batch * seq_len * n_layers
            continue
        positions = seq_len - chunk.offset
        total += sum(batch * (n_layers - cast(int, p.layer)) * positions for p in chunk.patches)
    return total


def target_work(*, batch: int, seq_len: int, n_layers: int, answer_min: int, taps_verified: bool) -> int:
    """Block-tokens of the engine's unpatched target run plus its self-check
    (:mod:`patchwidgets.selfcheck`): the run itself, pass (A) over every block and position
    unless the model's taps are known good (``taps_verified``: the run records through them),
    and the short pass (B) over positions ``answer_min..``, with copies of the batch joining
    at the first, the middle and the last block (``n_layers // 2`` blocks with one copy, the
    rest but the last with two, the last with three: ``2 n_layers - n_layers // 2 + 1`` rows
    of blocks per row of the batch)."""
    check_b = batch * (seq_len - answer_min) * (2 * n_layers - n_layers // 2 + 1)
    runs = 1 if taps_verified else 2
    return runs * batch * seq_len * n_layers + check_b


def pass_overhead_tokens(d_model: int | None) -> float:
    """The fixed cost of running a block once, in tokens of that block's arithmetic.

    A block pass reads all its weights (48 d_model^2 bytes in float32) whatever the rows,
    which at a CPU's ratio of about 5 FLOPs per byte of memory bandwidth costs as much as
    about 10 tokens of arithmetic (24 d_model^2 FLOPs each); on top, Python and module
    calls take about 1 ms (50 MFLOP on a laptop core; GPT-2 small: ~4 tokens, toy-ioi:
    ~130). Only the planner's trade-off between fewer passes and fewer wasted positions
    reads it, never a result. ``d_model`` ``None`` (a model without a config): GPT-2's 768.
    """
    d_model = d_model or 768
    return 10.0 + 50e6 / (24 * d_model ** 2)
