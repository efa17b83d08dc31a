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

import contextlib
import functools
import threading
from typing import Any, Callable, Sequence

import torch

from .inputs import Prompts
from .results import PatchResult
from .streaming import PatchUpdate, run_streaming
from .sweep import new_result, prepare_request, run_unpatched, sweep_cells, sweep_stats
from .watch import SweepWatch, show_by_default

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

    if remote or nnsight_backend.is_nnsight_model(model):
        return nnsight_backend.patch(
            model, clean, corrupted, answers, site, direction, metrics, ablation=ablation, noise=noise,
            noise_positions=noise_positions, noise_seed=noise_seed, layers=layers, positions=positions,
            heads=heads, neurons=neurons, index=index, max_batch_tokens=max_batch_tokens,
            progress=progress, callback=callback, cancel=cancel, remote=remote)
    request = prepare_request(model, clean, corrupted, answers, direction, metrics, ablation=ablation,
                              noise=noise, noise_positions=noise_positions, noise_seed=noise_seed)
    cells = sweep_cells(model, request.inputs, site, layers=layers, positions=positions, heads=heads,
                        neurons=neurons, index=index)

    # Cancel and progress from here on, block by block (the unpatched runs included).
    inputs = request.inputs
    full_pass = inputs.batch * inputs.seq_len * model.cfg.n_layers
    watch = SweepWatch(cancel, show_by_default(progress, full_pass * len(cells.sites) * len(cells.indices)))
    with contextlib.closing(watch), watch.watching(model):
        # --- The two unpatched runs: the target is the run we patch into, the source the run
        # the pasted values come from.
        columns, request = request.answer_columns()
        runs = run_unpatched(model, request, cells.hook_names(), max_batch_tokens, columns, watch)
        cells.check_activations(runs.target_acts)
        measure = request.measure(runs.target_logits, runs.source_logits)

        # --- List the patches; a patch where both runs are bound to agree is already done.
        patches = cells.patches(request.changed)
        result = new_result(PatchResult, request, measure, sites=cells.names, axes=cells.axes, shape=cells.shape,
                            indices=cells.indices, first_pos=[p.first_pos for p in patches])

        # --- Run the rest in chunks, streaming partial results.
        chunks = runs.target.plan(patches)
        result.stats = sweep_stats(result, len(chunks), **runs.target.shortcut_report(),
                                   source_resumed=int(runs.source_resumed))
        jobs = [([p.slot for p in chunk.patches], functools.partial(runs.target.run_chunk, chunk, runs.source_acts))
                for chunk in chunks]
        watch.expect(runs.target.work(chunks))
        return run_streaming(result, jobs, measure, progress=False, callback=watch.reporting(callback),
                             cancel=cancel)
