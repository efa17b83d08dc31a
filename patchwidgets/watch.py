"""Cancel and progress for a whole sweep, block by block.

A sweep spends its time in forward passes: the two unpatched runs, the engine's self-check,
then the patched chunks. On GPT-2 small with 64 prompt pairs each unpatched run takes
seconds, so checking for a cancel only between chunks leaves the user waiting, and a
progress bar that counts patches only sits at 0% through the runs before the first chunk.

:class:`SweepWatch` looks in at every block of every forward pass instead: a forward
pre-hook on each of the model's blocks raises :class:`~patchwidgets.errors.PatchingCancelled`
as soon as the cancel event is set (one block of one pass is the longest wait: well under a
second on a laptop for GPT-2 small), and moves a progress bar whose unit is one block run
over one token, so the bar covers the unpatched runs as well as the patches and its
estimate of the time left means something. The hooks are attached to this thread's passes
only (:func:`patchwidgets.sharing.watched`): a sweep's cancel never stops another caller's.
The patched passes are counted from the plan
(:func:`patchwidgets.planning.work`), the rest from the model's shape.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator

import torch

from .errors import PatchingCancelled
from .sharing import watched


def _hidden_tokens(args: tuple, kwargs: dict) -> int:
    """Rows x positions of the hidden states a block is called with."""
    hidden = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
    return int(hidden.shape[0] * hidden.shape[1]) if isinstance(hidden, torch.Tensor) and hidden.ndim >= 2 else 0


def show_by_default(progress: bool | None, worst_case_work: int) -> bool:
    """Whether to draw a bar: as asked, or when the sweep could take a while (more than a
    million block-tokens if every patch ran in full: a few seconds of GPT-2 small on a CPU)."""
    return progress if progress is not None else worst_case_work > 1_000_000


class SweepWatch:
    """Watches one sweep's forward passes: cancel within a block, progress per block-token.

    Args:
        cancel: the sweep's ``threading.Event`` (``None``: cannot be cancelled).
        show: draw a tqdm bar.
        total: the expected work in block-tokens (a block run over one token of one row);
            :meth:`expect` adds to it once the plan is known.
        desc: the bar's label.
    """

    def __init__(self, cancel: threading.Event | None = None, show: bool = False, total: int = 0,
                 desc: str = "patching"):
        self.cancel = cancel
        self.work_done = 0
        self.total = total
        self.bar = None
        if show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=max(total, 1), desc=desc, unit="block-token", unit_scale=True,
                            bar_format="{l_bar}{bar}| {percentage:3.0f}% [{elapsed}<{remaining}{postfix}]")

    def check(self) -> None:
        """Raise :class:`PatchingCancelled` (without a partial result) if cancelled."""
        if self.cancel is not None and self.cancel.is_set():
            raise PatchingCancelled(None)

    def expect(self, work: int) -> None:
        """Add ``work`` block-tokens to the expected total (e.g. once the chunks are planned)."""
        self.total += work
        if self.bar is not None:
            self.bar.total = max(self.total, self.work_done, 1)
            self.bar.refresh()

    def stage(self, text: str) -> None:
        """Say what the sweep is doing now (shown after the bar)."""
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=True)

    def advance(self, work: int) -> None:
        """Count ``work`` block-tokens done by a pass nobody hooks (the nnsight backend's traces)."""
        self._tick(work)

    def _tick(self, work: int) -> None:
        self.work_done += work
        if self.bar is not None:
            self.bar.update(work)

    @contextlib.contextmanager
    def watching(self, model: Any) -> Iterator[SweepWatch]:
        """Inside this context every block call of ``model`` made by this thread checks for a
        cancel and counts its work. The hooks are attached at each pass (inside
        :func:`patchwidgets.sharing.exclusive`) and removed at its end, so other callers of the
        same model never run them. Models without ``blocks`` are checked before and after."""
        self.check()
        with watched(model, self):
            yield self

    def attach(self, model: Any) -> list:
        """Attach this watch's block hooks to ``model`` for one pass; returns their handles."""
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, torch.nn.ModuleList):
            return []

        def pre_hook(module, args, kwargs):
            self.check()
            self._tick(_hidden_tokens(args, kwargs))
        return [b.register_forward_pre_hook(pre_hook, with_kwargs=True) for b in blocks]

    def reporting(self, callback: Callable[[Any], Any] | None) -> Callable[[Any], Any]:
        """``callback`` for :func:`~patchwidgets.streaming.run_streaming`, also showing the
        patches done after the bar."""
        def report(update: Any) -> Any:
            self.stage(f"{update.done}/{update.total} patches")
            return None if callback is None else callback(update)
        return report

    def close(self) -> None:
        if self.bar is not None:
            if self.cancel is None or not self.cancel.is_set():
                self.bar.n = self.bar.total  # estimates aside, a finished sweep shows 100%
            self.bar.close()
