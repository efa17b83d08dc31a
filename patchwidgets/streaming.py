"""Running a sweep's forward passes one by one, filling its result as each finishes.

Every exact sweep (:func:`patchwidgets.patch` on a bridge or an nnsight model,
:func:`patchwidgets.path_patch`) ends here, so progress bars, streaming to a callback and
cancelling behave the same in all of them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import torch

from .errors import PatchingCancelled
from .results import PatchResult

#: One forward pass: the result cells it fills (flat, row-major over sites and cells) and a
#: function that runs it and returns their answer logits ``[len(slots), batch, vocab]``.
Job = tuple[Sequence[int], Callable[[], torch.Tensor]]
R = TypeVar("R", bound=PatchResult)


@dataclass
class PatchUpdate:
    """What a ``callback`` receives after each chunk of patches finishes."""

    result: PatchResult   # the sweep so far (cells not yet computed are NaN in grids)
    done: int             # patches finished, no-ops included
    total: int


def run_streaming(result: R, jobs: Sequence[Job],
                  measure: Callable[[torch.Tensor], dict[str, torch.Tensor]], *,
                  progress: bool | None, callback: Callable[[PatchUpdate], Any] | None,
                  cancel: threading.Event | None) -> R:
    """Run ``jobs`` in order, writing each one's metrics into ``result`` (in place).

    ``result`` arrives holding the unpatched target's values in every cell and ``result.done``
    marking the no-ops; ``measure`` turns answer logits into ``{metric: [n, batch]}``.
    """
    assert result.done is not None, "run_streaming fills a result whose cells are not all done"
    batch = result.n_pairs
    values = {k: v.view(-1, batch) for k, v in result.values.items()}  # [n_cells, batch] views
    done = result.done.view(-1)
    n_total = len(done)
    show = progress if progress is not None else len(jobs) > 20
    bar = _progress_bar(n_total, int(done.sum()), show)
    try:
        for slots, run in jobs:
            if cancel is not None and cancel.is_set():
                raise PatchingCancelled(result)
            rows = torch.tensor(slots)
            try:
                logits = run()
            except PatchingCancelled as stop:  # cancelled inside the pass (patchwidgets.watch)
                if stop.partial is not None:
                    raise
                raise PatchingCancelled(result) from None
            for name, v in measure(logits).items():
                values[name][rows] = v.to("cpu", values[name].dtype)  # results live on the CPU
            done[rows] = True
            if bar is not None:
                bar.update(len(rows))
            if callback is not None and callback(PatchUpdate(result, int(done.sum()), n_total)) is False:
                raise PatchingCancelled(result)
    finally:
        if bar is not None:
            bar.close()
    if callback is not None and not jobs:
        callback(PatchUpdate(result, n_total, n_total))
    result.done = None
    return result


def _progress_bar(total: int, initial: int, show: bool):
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="patching", unit="patch")
