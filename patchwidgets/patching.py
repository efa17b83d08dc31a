"""Activation patching: the one entry point, :func:`patch`.

Activation patching asks which activations carry the information that makes a model give one
answer rather than another. Run the model on a *clean* prompt ("When John and Mary went to
the store, Mary gave a drink to" -> " John") and a *corrupted* one that differs in the detail
that matters ("..., John gave a drink to" -> " Mary"). Then copy one activation from one run
into the other and measure how far the answer moves.

* **Denoising** (``direction="denoising"``): run the *corrupted* prompt and paste in a clean
  activation. If the clean answer comes back, that activation is **sufficient** to carry
  the information (given the rest of the corrupted run).
* **Noising** (``direction="noising"``): run the *clean* prompt and paste in a corrupted
  activation. If the clean answer breaks, that activation is **necessary**.

Instead of a corrupted prompt, an *ablation* can provide the replacement values: ``"zero"``,
``"mean"`` (mean over the prompts of a dataset) or ``"noise"`` (Gaussian noise added to the
token embeddings of the clean prompt: ROME's causal tracing, where denoising restores clean
activations into the noised run).

A sweep reads top to bottom, in the steps of :mod:`.sweep` that every entry point shares:
check the request (:mod:`.validation`, :mod:`.inputs`), list the cells (:mod:`.sites`), run
the target and source runs once, measure them (:mod:`.metrics`), list the patches with the
no-ops marked, and hand the rest to :class:`.engine.Engine`, which runs them in batches and
calls a hook that pastes each patch's slice; :mod:`.streaming` fills the result as passes finish.
"""

from __future__ import annotations

import functools
import inspect
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .driver import DEFAULT_CACHE_BYTES, EngineGroup, SweepControl, check_cache_budget, own_arguments, run_sweep
from .planning import Patch
from .inputs import Prompts
from .results import PatchResult
from .streaming import Job, PatchUpdate
from .sweep import (Cells, Measure, Request, cached_bytes_per_pair, new_result, prepare_request,
                    run_unpatched, sweep_cells, unpatched_logits)
from .watch import SweepWatch

__all__ = ["patch", "PatchUpdate"]


@torch.no_grad()
def patch(
    model: Any,
    clean: Prompts,
    corrupted: Prompts | None = None,
    answers: Any = None,
    site: str = "resid_pre",
    direction: str | None = None,
    metrics: Any = ("logit_diff", "normalized"),
    *,
    ablation: str | None = None,
    noise: float = 3.0,
    noise_positions: Sequence[int] | None = None,
    noise_seed: int = 0,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    neurons: Sequence[int] | None = None,
    index: Sequence[tuple] | None = None,
    max_batch_tokens: int = 4096,
    max_cache_bytes: int = DEFAULT_CACHE_BYTES,
    progress: bool | None = None,
    callback: Callable[[PatchUpdate], Any] | None = None,
    cancel: threading.Event | None = None,
    remote: bool = False,
) -> PatchResult:
    """Patch every index of ``site`` and measure each patch with every metric.

    Args:
        model: a ``TransformerBridge`` (see :func:`patchwidgets.load_model`) or a hand-built
            ``HookedRootModule`` whose forward returns logits.
        clean, corrupted: a prompt, a list of prompts (a dataset: one corrupted per clean),
            or ``[batch, pos]`` token ids. Each clean/corrupted pair must have the same
            number of tokens.
        answers: ``(correct, incorrect)`` answer tokens (strings such as ``" Mary"`` or token
            ids) for every pair, or a list of such pairs, one per prompt pair.
        site: what to patch: ``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``,
            ``mlp_out``, ``head_out``/``head_q``/``head_k``/``head_v``/``head_pattern`` (all
            positions, by layer and head) and their ``_by_pos`` variants, ``neuron`` and
            ``neuron_by_pos``, the groups ``block`` and ``heads_every``, or any hook name of
            the model with ``index=[...]``. ``patchwidgets.site_names()`` lists them.
        direction: ``"denoising"`` (run corrupted, paste clean: sufficient?) or ``"noising"``
            (run clean, paste corrupted: necessary?). Default: denoising, or noising for
            an ablation.
        metrics: names from :data:`patchwidgets.metrics.BUILTIN_METRICS`, callables, or a
            dict of them. ``normalized`` is 0 when the patch did nothing and 1 when it gave
            the source run's behaviour, in both directions (see :mod:`patchwidgets.metrics`).
        ablation: ``"zero"``, ``"mean"`` or ``"noise"`` instead of a corrupted prompt.
        noise, noise_positions, noise_seed: for ``ablation="noise"``: noise standard
            deviation in units of the embedding matrix's standard deviation (ROME uses 3),
            the positions to noise (default every position after the first) and the seed.
        layers, positions, heads, neurons: restrict the sweep to these values of each axis.
        index: for a hook-name site, the list of index tuples to patch.
        max_batch_tokens: memory budget (rows x positions) of one forward pass.
        max_cache_bytes: memory budget (bytes) for the activations a sweep keeps between its
            passes, per group of prompt pairs: a dataset too big for it is swept in groups
            that fit, with results identical to one group (:mod:`patchwidgets.driver`).
            Default 256 MiB.
        progress: show a tqdm bar over the whole sweep, unpatched runs included (default:
            for sweeps that could take more than a few seconds).
        callback: called with a :class:`PatchUpdate` after every chunk; return ``False`` to
            cancel.
        cancel: a ``threading.Event``; setting it stops the sweep within one block of one
            forward pass, the unpatched runs included (:mod:`patchwidgets.watch`).
        remote: for an nnsight model (``nnsight.TransformersModel``, which ``patch`` also
            accepts, see :mod:`patchwidgets.nnsight_backend`): run the traces on NDIF.

    Returns:
        A :class:`PatchResult`, on the CPU, whatever devices the model is split over.
        A half-precision model (``load_model(..., dtype=torch.bfloat16)``) is patched in its
        own dtype and measured in float32; the engine's shortcuts reproduce plain forward
        passes (to about one rounding step), but the model's own rounding shows. On the
        bundled toy-ioi (8 IOI pairs, logit differences up to ~15) bfloat16 cells differ from
        float32 by up to 0.1 in ``logit_diff`` and 0.005 in ``normalized``; float16 by up to
        0.011 and 0.0005 (``tests/test_large_models.py``).

    Raises:
        PatchingInputError (a ``ValueError``): any bad argument (``err.field`` names it; see
            :mod:`patchwidgets.validation` for the rules), or a ``normalized`` metric whose
            clean-corrupted gap measures no effect (:class:`DegenerateNormalizationError`).
        PatchingCancelled: the sweep was cancelled; ``err.partial`` holds the result so far.
    """
    from . import nnsight_backend  # (imports nnsight only for an nnsight model)

    control = SweepControl(max_batch_tokens, check_cache_budget(max_cache_bytes), progress, callback, cancel)
    if remote or nnsight_backend.is_nnsight_model(model):
        return nnsight_backend.patch(model, own_arguments(_PATCH_PARAMETERS, locals()), control)
    request = prepare_request(model, clean, corrupted, answers, direction, metrics, ablation=ablation,
                              noise=noise, noise_positions=noise_positions, noise_seed=noise_seed)
    cells = sweep_cells(model, request.inputs, site, layers=layers, positions=positions, heads=heads,
                        neurons=neurons, index=index)
    columns, request = request.answer_columns()
    inputs = request.inputs
    full_pass = inputs.batch * inputs.seq_len * model.cfg.n_layers
    return run_sweep(EngineBackend(model, cells, columns, max_batch_tokens), request, control,
                     worst_case_work=full_pass * len(cells.sites) * len(cells.indices))


_PATCH_PARAMETERS = tuple(inspect.signature(patch).parameters)


@dataclass
class EngineBackend:
    """:func:`patch` on a TransformerBridge (or a hand-built ``HookedRootModule``): the
    :class:`~patchwidgets.engine.Engine` runs the passes, for :func:`~patchwidgets.driver.run_sweep`."""

    model: Any
    cells: Cells
    columns: torch.Tensor | None      # vocabulary columns the metrics read (None: all)
    max_batch_tokens: int
    passes_per_job: int = 1

    def first_positions(self, request: Request) -> list[int | None]:
        return [p.first_pos for p in self.cells.patches(request.changed)]

    def new_result(self, request: Request, measure: Measure, first_pos: list[int | None]) -> PatchResult:
        cells = self.cells
        return new_result(PatchResult, request, measure, sites=cells.names, axes=cells.axes, shape=cells.shape,
                          indices=cells.indices, first_pos=first_pos)

    def bytes_per_pair(self, request: Request) -> int:
        return cached_bytes_per_pair(self.model, request.inputs.seq_len, self.cells.hook_names())

    def baselines(self, request: Request, watch: SweepWatch, mean: bool) -> tuple:
        return unpatched_logits(self.model, request, self.cells.hook_names(), self.columns, watch, mean)

    def group(self, request: Request, watch: SweepWatch, means: dict | None) -> "_EngineRuns":
        runs = run_unpatched(self.model, request, self.cells.hook_names(), self.max_batch_tokens, self.columns,
                             watch, means)
        self.cells.check_activations(runs.target_acts)
        return _EngineRuns(runs, self.cells.patches(request.changed))


@dataclass
class _EngineRuns(EngineGroup):
    """One group's unpatched runs; its chunks resume from them."""

    patches: list[Patch]

    def jobs(self, todo: list[int]) -> list[Job]:
        engine, sources = self.runs.target, self.runs.source_acts
        self.chunks = engine.plan([self.patches[slot] for slot in todo])
        return [([p.slot for p in chunk.patches], functools.partial(engine.run_chunk, chunk, sources))
                for chunk in self.chunks]

    def work(self, jobs: list[Job]) -> int:
        return self.runs.target.work(self.chunks)

    def report(self) -> dict:
        return {**self.runs.target.shortcut_report(), "source_resumed": int(self.runs.source_resumed)}
