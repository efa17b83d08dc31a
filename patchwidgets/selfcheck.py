"""Trust, but verify: the engine's check of its own shortcuts, on the model at hand.

The engine (:mod:`patchwidgets.engine`) calls a bridge's blocks itself, resumes passes at the
patched layer, skips the unchanged prefix through stand-in KV caches (:mod:`patchwidgets.kv_tap`)
and multiplies only the unembedding columns the metrics read. Each of those relies on how the
architecture's blocks take their arguments and where its attention reads its cache, which no
code here can know for every model TransformerLens adapts. So before a sweep the engine runs a
few passes of its own and compares their answer logits with the target run's plain forward
pass; a shortcut is used only if it reproduces them (to a tolerance of a few rounding steps of
the logits' dtype, relative to their size).

:func:`check_shortcuts` returns what it found as a :class:`ShortcutCheck`, and the engine
applies it in one place (:meth:`patchwidgets.engine.Engine.run_target`): whether passes may
resume at the patched layer, whether they may also skip the prefix, why not, and the
:class:`PassSetup` the passes then use (the recorded keys and values, which attention modules
get their tap directly, the column unembedding).

The passes
----------
Two in the usual case:

(A) every block from the recorded inputs, all positions, each layer's :class:`~patchwidgets.kv_tap.KVTap`
    recording the keys and values. It must reproduce the plain logits, and every layer's
    attention must read its tap exactly once; a layer whose block never passed the tap on
    gets it handed to its attention module directly, and (A) runs again.
(B) one staggered pass over the answer positions only, with copies of the batch joining at the
    first, the middle and the last block: it exercises resuming, tiling per-row arguments,
    the reused prefix and the column unembedding at once.

Only when (B) fails do further passes find out which shortcut to turn off: if the column
unembedding alone was wrong, (B) passes without it; else the prefix is off, and a resumed pass
with the batch tiled twice says whether resuming still holds. A shortcut that does not
reproduce the plain logits is turned off; results never depend on this check, only speed.

A model that passed (A) once may let its next target runs record the keys and values through
the taps themselves (the engine remembers, per model): then only (B) runs, after checking that
every tap was read once over every position, and any doubt asks for the target run again
(:attr:`ShortcutCheck.redo`), plainly, checked the long way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Optional

import torch

from .kv_tap import KVTap

__all__ = ["PassSetup", "ShortcutCheck", "RunBlocks", "check_shortcuts"]


@dataclass(frozen=True)
class PassSetup:
    """What a pass the engine runs itself reads besides the target run's recorded inputs."""

    tap_attention: frozenset[int] = frozenset()  # layers whose attention module gets its tap directly
    # The target run's keys and values, for the skipped prefix: layer -> [batch, kv_heads, pos, d_head].
    kv: tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]] | None = None
    # ``(W_U[:, columns], b_U[columns])``: unembed only the columns the metrics read (None: all).
    column_unembed: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass(frozen=True)
class ShortcutCheck:
    """What :func:`check_shortcuts` found: which shortcuts reproduce the plain forward pass.

    ``resume``: passes may start at the patched layer; ``skip_prefix``: they may also skip the
    positions before the first changed one; ``reason``: why the first shortcut that is off is
    off (``None`` when both are on), and ``warn`` whether that deserves a warning (a prompt
    whose answer is read at position 0 has no prefix to skip: nothing to warn about).
    ``setup``: what the passes use. ``taps_verified``: pass (A) reproduced the plain pass
    with every tap read once, so later target runs of this model may record through taps.
    ``learnt_tap_attention``: the layers whose attention must be handed its tap, as learnt
    now (``None``: nothing new; empty: forget what was known). ``redo``: the target run that
    recorded through taps cannot be trusted; run it again plainly.
    """

    resume: bool
    skip_prefix: bool
    reason: str | None
    warn: bool = True
    setup: PassSetup = field(default_factory=PassSetup)
    taps_verified: bool = False
    learnt_tap_attention: frozenset[int] | None = None
    redo: bool = False


#: A pass the engine runs itself, without hooks: ``run(joins, offset, setup, taps)`` gives the
#: answer logits ``[k * batch, n_columns]`` of ``joins[l]`` copies of the target batch joining at
#: block ``l``, positions ``offset..`` only; layer ``l`` reads ``taps[l]`` as its cache when
#: ``taps`` is given, else a tap serving ``setup.kv`` for positions ``0..offset-1``.
RunBlocks = Callable[[dict[int, int], int, PassSetup, Optional[dict[int, KVTap]]], torch.Tensor]


def _error(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def check_shortcuts(
    model: Any,
    target_final: torch.Tensor,
    run: RunBlocks,
    column_unembed: Callable[[], tuple[torch.Tensor, torch.Tensor] | None],
    *,
    batch: int,
    seq_len: int,
    answer_min: int,
    called: Collection[int],
    known_tap_attention: frozenset[int] = frozenset(),
    recorded: dict[int, KVTap] | None = None,
) -> ShortcutCheck:
    """Check the engine's shortcuts against the target run's plain answer logits; see the
    module docstring.

    Args:
        model: the bridge (its ``blocks``, ``ln_final`` and ``unembed``).
        target_final: ``[batch, n_columns]`` answer logits of the target run's plain forward pass.
        run: runs a pass the way the engine does (:data:`RunBlocks`).
        column_unembed: the unembedding columns the metrics read, read from the model now
            (``None``: no column shortcut for this model or these metrics).
        batch, seq_len: the target run's rows and positions.
        answer_min: the first answer position.
        called: the blocks whose arguments the target run recorded.
        known_tap_attention: the layers whose attention this model is known to need its tap
            handed to directly.
        recorded: the taps the target run recorded through, on a model that passed (A) before.
    """
    return _Check(model, target_final, run, column_unembed, batch, seq_len, answer_min).run(
        called, known_tap_attention, recorded)


class _Check:
    """One self-check: the passes it has tried so far, and what they settled."""

    def __init__(self, model: Any, target_final: torch.Tensor, run: RunBlocks,
                 column_unembed: Callable[[], tuple[torch.Tensor, torch.Tensor] | None],
                 batch: int, seq_len: int, answer_min: int):
        self.model, self.target_final, self._run, self._column_unembed = model, target_final, run, column_unembed
        self.batch, self.seq_len, self.answer_min = batch, seq_len, answer_min
        self.n_layers = len(model.blocks)
        eps = torch.finfo(target_final.dtype).eps if target_final.is_floating_point() else 0.0
        self.tol = max(1e-5, 30 * eps) * (1.0 + float(target_final.abs().max()))
        # What the next pass uses (PassSetup's fields), and what was learnt about the model.
        self.tap_attention: frozenset[int] = frozenset()
        self.kv: tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]] | None = None
        self.column: tuple[torch.Tensor, torch.Tensor] | None = None
        self.learnt: frozenset[int] | None = None

    def gap(self, logits: torch.Tensor) -> float:
        """Largest difference from the plain logits, over every copy of the batch."""
        return float((logits - self.target_final.repeat(logits.shape[0] // self.batch, 1)).abs().max())

    def try_pass(self, joins: dict[int, int], offset: int, taps: dict[int, KVTap] | None = None) -> float:
        """:meth:`gap` of one pass with the setup tried now."""
        return self.gap(self._run(joins, offset, PassSetup(self.tap_attention, self.kv, self.column), taps))

    def result(self, resume: bool, skip_prefix: bool, reason: str | None, warn: bool = True,
               taps_verified: bool = False) -> ShortcutCheck:
        return ShortcutCheck(resume, skip_prefix, reason, warn,
                             PassSetup(self.tap_attention, self.kv, self.column), taps_verified, self.learnt)

    def run(self, called: Collection[int], known: frozenset[int], recorded: dict[int, KVTap] | None) -> ShortcutCheck:
        n_layers = self.n_layers
        if recorded is not None:
            self.tap_attention = known  # (the target run handed the taps over as known)
        if not all(hasattr(self.model, name) for name in ("ln_final", "unembed")):
            return self.result(False, False, "the bridge has no ln_final and unembed to finish a resumed pass with")
        missing = [l for l in range(n_layers) if l not in called]
        if missing:
            return self.result(False, False, f"blocks {missing} were not called in the target run")

        if recorded is not None:
            # The target run recorded the keys and values itself (a model that passed (A)
            # before): check that it did so completely, then only (B) is left.
            redo = ShortcutCheck(False, False, "the target run through taps is in doubt", redo=True)
            if any(t.calls != 1 or t.recorded is None or t.recorded[0].shape[-2] != self.seq_len
                   for t in recorded.values()):
                return redo
            if self.record_prefix(recorded) is not None:
                return redo
            if self.check_b() is not None:
                return redo  # (the target logits came through the taps: not a reference)
            return self.result(True, True, None)

        # (A) Every block, every position; the taps record keys and values.
        self.tap_attention = known
        taps = {l: KVTap(record=True) for l in range(n_layers)}
        try:
            diff = self.try_pass({0: 1}, 0, taps)
            if diff > self.tol and self.tap_attention:  # what this model needed before fails now
                self.learnt = self.tap_attention = frozenset()
                taps = {l: KVTap(record=True) for l in range(n_layers)}
                diff = self.try_pass({0: 1}, 0, taps)
        except Exception as e:  # an architecture whose blocks cannot be called like this
            return self.result(False, False, f"calling the blocks directly raised {_error(e)}")
        if diff > self.tol:
            return self.result(False, False, f"the resumed pass differs from the plain forward pass by {diff:.1e}")

        prefix_problem = self.record_prefix(taps)
        if prefix_problem is None:
            prefix_problem = self.check_b()
            if prefix_problem is None:
                return self.result(True, True, None, taps_verified=True)

        # Prefix off: is resuming (with the batch tiled) still exact?
        try:
            diff = self.try_pass({n_layers // 2: 2}, 0)
        except Exception as e:
            return self.result(False, False, f"calling the blocks directly raised {_error(e)}")
        if diff > self.tol:
            return self.result(False, False, f"the resumed pass differs from the plain forward pass by {diff:.1e}")
        self.column = self._column_unembed()
        if self.column is not None and self.try_pass({n_layers - 1: 1}, 0) > self.tol:
            self.column = None
        return self.result(True, False, prefix_problem, warn=not prefix_problem.startswith("no unchanged prefix"))

    def check_b(self) -> str | None:
        """(B) Resume + tiling + prefix (+ column unembedding) in one short pass; ``None`` when
        it reproduces the plain logits, else why the prefix is off (and the K/V forgotten)."""
        n_layers = self.n_layers
        joins = {0: 1, n_layers // 2: 1, n_layers - 1: 1}
        offset = self.answer_min
        self.column = self._column_unembed()
        try:
            diff = self.try_pass(joins, offset)
            if diff > self.tol and self.column is not None:
                self.column = None  # perhaps only the column shortcut is off
                diff = self.try_pass(joins, offset)
        except Exception as e:
            diff, problem = float("inf"), f"running positions {offset}.. only raised {_error(e)}"
        else:
            problem = f"reusing the cached keys/values differs from the plain forward pass by {diff:.1e}"
        if diff <= self.tol:
            return None
        self.kv, self.column = None, None
        return problem

    def record_prefix(self, taps: dict[int, KVTap]) -> str | None:
        """Keep the keys and values pass (A) recorded (into ``taps``), if every layer's
        attention read its tap exactly once over every position; else say why the prefix
        cannot be reused. A layer whose attention never read its tap gets it handed to its
        attention module directly, and (A) runs again (into ``taps``, refilled)."""
        n_layers = self.n_layers
        if self.answer_min == 0:
            return "no unchanged prefix to reuse: an answer is read at position 0"
        unread = [l for l in range(n_layers) if taps[l].calls == 0]
        if unread:
            no_attn = [l for l in unread
                       if not isinstance(getattr(self.model.blocks[l], "attn", None), torch.nn.Module)]
            if no_attn:
                return f"block {no_attn[0]} never read the KV cache and has no `attn` to hand it to"
            # The block did not pass its cache on: hand the tap to the attention module itself.
            self.tap_attention = frozenset(unread)
            taps.update({l: KVTap(record=True) for l in range(n_layers)})
            try:
                diff = self.try_pass({0: 1}, 0, taps)
            except Exception as e:
                diff, reason = float("inf"), f"handing attention its KV cache raised {_error(e)}"
            else:
                reason = f"handing attention its KV cache changes the logits by {diff:.1e}"
            if diff > self.tol:
                self.tap_attention = frozenset()
                return reason
            self.learnt = self.tap_attention
        for l in range(n_layers):
            if taps[l].calls != 1:
                return f"layer {l}'s attention read the KV cache {taps[l].calls} times, not once"
            recorded = taps[l].recorded
            assert recorded is not None  # (a recording tap keeps what it returned)
            if recorded[0].shape[-2] != self.seq_len:
                return f"layer {l}'s cached keys cover {recorded[0].shape[-2]} positions, not {self.seq_len}"
        self.kv = ({l: t.recorded[0] for l, t in taps.items() if t.recorded is not None},
                   {l: t.recorded[1] for l, t in taps.items() if t.recorded is not None})
        return None
