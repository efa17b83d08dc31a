"""The sweep driver: one function runs every exact sweep, whatever runs its passes.

:func:`patchwidgets.patch` (on a TransformerBridge or an nnsight model) and
:func:`patchwidgets.path_patch` check and prepare their request (:mod:`.sweep`), choose a
:class:`Backend` (how this kind of model runs a pass) and call :func:`run_sweep`, which owns
everything else, in the order it happens:

1. **the watch**: cancel within one block of one pass, one progress bar over the whole sweep
   (:mod:`.watch`);
2. **groups of pairs**: the pairs are split into groups whose cached activations (the target
   run's residual stream, keys and values, and both runs' swept activations) fit
   ``max_cache_bytes``; most sweeps are one group. A sweep over 2,048 pairs holds one group's
   activations at a time, so its peak memory does not grow with the dataset;
3. **the dataset's baselines**: with several groups, a first pass over every group keeps only
   the unpatched answer logits (and, for a mean ablation, the activations' float64 sums), so
   the metrics' baselines, the normalisation (its mean gap) and the ablation mean are the
   whole dataset's, as in one group. Noise is drawn once for the whole dataset and each group
   takes its rows;
4. **per group**: the unpatched runs (recording what resumed passes need), the patches that
   are not no-ops (decided from the whole dataset's tokens, so every group runs the same
   cells), the plan, the chunks, each streamed into the one result;
5. **one** ``stats`` **layout** for every backend (:func:`.sweep.sweep_stats`).

A backend is small: it says which activations a sweep records, which cells are no-ops, what
the result looks like, and how one group's unpatched runs and chunks are run
(:class:`GroupRuns`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch

from .errors import PatchingCancelled, PatchingInputError
from .results import PatchResult
from .streaming import Job, PatchUpdate, run_streaming
from .sweep import Measure, Request, Unpatched, sweep_stats
from .watch import SweepWatch, show_by_default

#: Default memory budget for one group's cached activations (see ``max_cache_bytes``).
DEFAULT_CACHE_BYTES = 256 * 2**20


@dataclass
class SweepControl:
    """How a sweep runs, as opposed to what it computes: the same for every backend."""

    max_batch_tokens: int = 4096              # rows x positions of one forward pass
    max_cache_bytes: int = DEFAULT_CACHE_BYTES  # cached activations of one group of pairs
    progress: bool | None = None
    callback: Callable[[PatchUpdate], Any] | None = None
    cancel: Any = None                        # threading.Event


class GroupRuns(Protocol):
    """One group's unpatched runs, and the patched passes that resume from them."""

    @property
    def target_logits(self) -> torch.Tensor: ...           # [group, vocab or columns]

    @property
    def source_logits(self) -> torch.Tensor | None: ...    # None: a zero or mean ablation

    def jobs(self, todo: list[int]) -> list[Job]: ...   # the passes for cells ``todo``
    def work(self, jobs: list[Job]) -> int: ...          # their block-tokens (progress)
    def report(self) -> dict: ...                        # shortcut report for ``stats``


class Backend(Protocol):
    """How one kind of model runs a sweep (see the module docstring)."""

    @property
    def model(self) -> Any: ...          # what the watch hooks (a bridge; anything else: no hooks)

    @property
    def passes_per_job(self) -> int: ...   # forward passes one job makes (``stats["forward_passes"]``)

    def first_positions(self, request: Request) -> list[int | None]: ...  # per cell; None: a no-op
    def new_result(self, request: Request, measure: Measure, first_pos: list[int | None]) -> PatchResult: ...
    def bytes_per_pair(self, request: Request) -> int: ...               # cached activations of one pair
    def baselines(self, request: Request, watch: SweepWatch, mean: bool) -> tuple:
        """Pass 1 for one group: ``(target_logits, source_logits, sums)``: answer logits only,
        and with ``mean`` the float64 sums over the group of every activation a mean
        ablation replaces."""
        ...
    def group(self, request: Request, watch: SweepWatch, means: dict | None) -> GroupRuns: ...


@dataclass
class EngineGroup:
    """The part of :class:`GroupRuns` every engine-backed backend shares: its unpatched runs
    (:class:`~patchwidgets.sweep.Unpatched`), whose logits the driver measures."""

    runs: Unpatched

    @property
    def target_logits(self) -> torch.Tensor:
        return self.runs.target_logits

    @property
    def source_logits(self) -> torch.Tensor | None:
        return self.runs.source_logits


def pair_groups(n_pairs: int, bytes_per_pair: int, max_cache_bytes: int) -> list[slice]:
    """Consecutive groups of pairs whose cached activations fit ``max_cache_bytes``: at least
    one pair per group, as few groups as fit, all of one size but the last. ``bytes_per_pair``
    0 (a model that does not say what it caches) gives one group."""
    if bytes_per_pair <= 0:
        return [slice(0, n_pairs)]
    per_group = max(1, min(n_pairs, max_cache_bytes // max(1, bytes_per_pair)))
    n_groups = -(-n_pairs // per_group)
    size = -(-n_pairs // n_groups)
    return [slice(i, min(i + size, n_pairs)) for i in range(0, n_pairs, size)]


def run_sweep(backend: Backend, request: Request, control: SweepControl, worst_case_work: int) -> PatchResult:
    """Run the sweep ``request`` with ``backend``: the whole flow of the module docstring.

    ``worst_case_work`` (block-tokens if every patch ran in full) decides whether a progress
    bar is shown by default.
    """
    watch = SweepWatch(control.cancel, show_by_default(control.progress, worst_case_work))
    with contextlib.closing(watch), watch.watching(backend.model):
        inputs = request.inputs
        groups = pair_groups(inputs.batch, backend.bytes_per_pair(request), control.max_cache_bytes)
        means = None
        if len(groups) == 1:
            runs = backend.group(request, watch, None)
            measure = request.measure(runs.target_logits, runs.source_logits)
        else:  # pass 1: the dataset's baselines, group by group
            measure, means = _dataset_baselines(backend, request, groups, watch)
            runs = None
        first_pos = backend.first_positions(request)
        result = backend.new_result(request, measure, first_pos)
        todo = [slot for slot, f in enumerate(first_pos) if f is not None]
        if runs is not None:
            jobs = runs.jobs(todo)
            watch.expect(runs.work(jobs))
            result.stats = sweep_stats(result, len(jobs) * backend.passes_per_job, groups=1, **runs.report())
            return run_streaming(result, jobs, measure, progress=False, callback=watch.reporting(control.callback),
                                 cancel=control.cancel)
        return _grouped(backend, request, groups, measure, means, result, first_pos, watch, control)


def _dataset_baselines(backend: Backend, request: Request, groups: list[slice],
                       watch: SweepWatch) -> tuple[Measure, dict | None]:
    """Pass 1: the whole dataset's :class:`Measure` and, for a mean ablation, its means."""
    mean = request.ablation == "mean"
    targets, sources, sums = [], [], None
    for rows in groups:
        target, source, group_sums = backend.baselines(request.rows(rows), watch, mean)
        targets.append(target)
        sources.append(source)
        if mean:
            sums = group_sums if sums is None else {k: sums[k] + v for k, v in group_sums.items()}
    source_logits = None if sources[0] is None else torch.cat(sources)
    measure = request.measure(torch.cat(targets), source_logits)
    means = None if sums is None else {k: v / request.inputs.batch for k, v in sums.items()}
    return measure, means


def _grouped(backend: Backend, request: Request, groups: list[slice], measure: Measure, means: dict | None,
             result: PatchResult, first_pos: list[int | None], watch: SweepWatch,
             control: SweepControl) -> PatchResult:
    """Pass 2: each group's unpatched runs and chunks, written into ``result``'s columns. The
    no-ops (``first_pos`` None) are the whole dataset's, so every group runs the same cells."""
    assert result.done is not None
    todo = [slot for slot, f in enumerate(first_pos) if f is not None]
    n_total = result.done.numel()
    values = {k: v.view(n_total, -1) for k, v in result.values.items()}   # [cells, pairs] views
    noops = result.done.view(-1).clone()
    passes, report = 0, {}
    try:
        for g, rows in enumerate(groups):
            group_request = request.rows(rows)
            runs = backend.group(group_request, watch, means)
            jobs = runs.jobs(todo)
            watch.expect(runs.work(jobs))
            passes += len(jobs) * backend.passes_per_job
            report = runs.report()
            part = backend.new_result(group_request, measure.rows(rows), first_pos)

            def report_group(update: PatchUpdate, g=g, part=part, rows=rows) -> Any:
                _copy(part, values, rows)
                done = g * n_total + update.done
                return watch.reporting(control.callback)(PatchUpdate(result, done // len(groups), n_total))
            run_streaming(part, jobs, measure.rows(rows), progress=False, callback=report_group,
                          cancel=control.cancel)
            _copy(part, values, rows)
            # Let this group's activations go before the next group records its own: held over
            # the next group's unpatched runs, two groups would be alive at once.
            del runs, jobs, part, report_group
    except PatchingCancelled:
        result.done = noops   # (only the no-ops hold every pair's value: the rest is incomplete)
        raise PatchingCancelled(result) from None
    result.stats = sweep_stats(result, passes, groups=len(groups), **report)
    result.done = None
    return result


def _copy(part: PatchResult, values: dict[str, torch.Tensor], rows: slice) -> None:
    for k, v in part.values.items():
        values[k][:, rows] = v.reshape(values[k].shape[0], -1)


def own_arguments(parameters: Sequence[str], local_vars: dict[str, Any]) -> dict[str, Any]:
    """An entry point's own arguments, by name, from its ``locals()`` (``model`` left out): how
    it hands its whole call to a backend without listing every argument again."""
    return {name: local_vars[name] for name in parameters if name in local_vars and name != "model"}


def check_cache_budget(max_cache_bytes: Any) -> int:
    """``max_cache_bytes`` as a positive int, or a :class:`~patchwidgets.errors.PatchingInputError`."""
    if isinstance(max_cache_bytes, bool) or not isinstance(max_cache_bytes, int) or max_cache_bytes <= 0:
        raise PatchingInputError(f"max_cache_bytes must be a positive number of bytes, got {max_cache_bytes!r}",
                                 "max_cache_bytes")
    return max_cache_bytes

