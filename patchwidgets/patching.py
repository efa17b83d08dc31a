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

A sweep reads top to bottom: :func:`patch` checks the inputs (:mod:`.inputs`), picks the sites
(:mod:`.sites`), runs the target and source runs once, lists the patches with the no-ops
marked, and hands the rest to :class:`.engine.Engine`, which runs them in batches and calls a
hook that pastes each patch's slice; :mod:`.metrics` turns the answer logits into numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from . import metrics as metrics_mod
from .engine import Engine, Patch
from .errors import PatchingCancelled, PatchingInputError
from .inputs import Prompts, prepare
from .results import PatchResult
from .sites import enumerate_indices, resolve_sites
from .sources import ablation_values, check_direction, differing_positions, noise_hooks

ANSWER_ONLY_METRICS = ("logit_diff", "normalized", "logit")


@dataclass
class PatchUpdate:
    """What a ``callback`` receives after each chunk of patches finishes."""

    result: PatchResult   # the sweep so far (cells not yet computed are NaN in grids)
    done: int             # patches finished, no-ops included
    total: int


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
        progress: show a tqdm bar (default: for sweeps of more than 20 forward passes).
        callback: called with a :class:`PatchUpdate` after every chunk; return ``False`` to
            cancel.
        cancel: a ``threading.Event``; setting it stops the sweep after the current chunk.
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
        PatchingInputError (a ``ValueError``): bad prompts, answers, site or metric names.
        PatchingCancelled: the sweep was cancelled; ``err.partial`` holds the result so far.
    """
    from . import nnsight_backend  # (imports nnsight only for an nnsight model)

    if remote or nnsight_backend.is_nnsight_model(model):
        return nnsight_backend.patch(
            model, clean, corrupted, answers, site, direction, metrics, ablation=ablation, noise=noise,
            noise_positions=noise_positions, noise_seed=noise_seed, layers=layers, positions=positions,
            heads=heads, neurons=neurons, index=index, max_batch_tokens=max_batch_tokens,
            progress=progress, callback=callback, cancel=cancel, remote=remote)
    direction = check_direction(direction, corrupted, ablation)
    metric_fns = metrics_mod.resolve_metrics(metrics)
    inputs = prepare(model, clean, None if ablation else corrupted, answers)
    check_request(metric_fns, inputs, ablation)

    sites = resolve_sites(site, tuple(getattr(model, "hook_dict", {}) or ()))
    cfg = model.cfg
    sweep = [
        enumerate_indices(
            s, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
            n_kv_heads=getattr(cfg, "n_key_value_heads", None), d_mlp=getattr(cfg, "d_mlp", None),
            seq_len=inputs.seq_len, layers=layers, positions=positions, heads=heads, neurons=neurons,
        ) if s.kind != "raw" else _raw_indices(s, index)
        for s in sites
    ]
    indices, shape = sweep[0]
    _check_ranges(sites[0], indices, inputs.seq_len)
    hook_names = sorted({s.hook_name(i[0]) if s.kind != "raw" else s.hook_template
                         for s, (idx, _) in zip(sites, sweep) for i in idx})

    # --- The two unpatched runs. The target is the run we patch into; the source is where
    # the pasted values come from.
    target_noise = noise_hooks(model, inputs, noise, noise_positions, noise_seed) if ablation == "noise" else []
    corrupted_tokens = inputs.clean_tokens if ablation else inputs.corrupted_tokens
    # Metrics that read only the answers' logits need only those columns of the unembedding.
    columns = None
    if all(m in ANSWER_ONLY_METRICS for m in metric_fns.values()):
        columns, inputs = _answer_columns(inputs)
    clean_engine = Engine(model, inputs.clean_tokens, inputs.answer_pos, max_batch_tokens=max_batch_tokens,
                          columns=columns)
    corrupted_engine = Engine(model, corrupted_tokens, inputs.answer_pos, target_noise, max_batch_tokens, columns)
    target, source = (corrupted_engine, clean_engine) if direction == "denoising" else (clean_engine, corrupted_engine)
    target_logits, target_acts = target.run_target(hook_names)
    if ablation in ("zero", "mean"):
        clean_logits = target_logits
        source_acts = ablation_values({n: a for n, a in target_acts.items() if n in hook_names}, ablation)
        source_logits = None
    else:
        source_logits, source_acts = source.run_target(hook_names, record=False)
        clean_logits = source_logits if direction == "denoising" else target_logits

    ctx, target_values, baselines = metric_context(
        metric_fns, inputs, direction, target_logits, source_logits, clean_logits)

    def measure(logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return metrics_mod.compute(metric_fns, logits, ctx)

    # --- List the patches; a patch where both runs are bound to agree is already done.
    changed = differing_positions(inputs, ablation, noise_positions)  # [pos] bool
    n_cells = len(indices)
    patches = [Patch(s, ix, site_idx * n_cells + cell, s.first_changed_position(ix, changed))
               for site_idx, (s, (idx, _)) in enumerate(zip(sites, sweep)) for cell, ix in enumerate(idx)]
    n_total = len(patches)
    values = {k: v.expand(n_total, -1).clone() for k, v in target_values.items()}
    done = torch.tensor([p.first_pos is None for p in patches])
    result = PatchResult(
        sites=[s.name for s in sites], axes=sites[0].axes, shape=shape, indices=indices,
        values={k: v.view(len(sites), n_cells, -1) for k, v in values.items()},
        direction=direction, baselines=baselines,
        clean_str_tokens=inputs.clean_str_tokens, corrupted_str_tokens=inputs.corrupted_str_tokens,
        done=done.view(len(sites), n_cells),
    )

    # --- Run the rest in chunks, streaming partial results.
    chunks = target.plan(patches)
    result.stats = {"patches": n_total, "skipped_noop": int(done.sum()), "forward_passes": len(chunks),
                    **target.shortcut_report()}
    jobs = [([p.slot for p in chunk.patches], functools.partial(target.run_chunk, chunk, source_acts))
            for chunk in chunks]
    return run_streaming(result, values, done, jobs, measure, progress=progress, callback=callback, cancel=cancel)


def run_streaming(result: PatchResult, values: dict[str, torch.Tensor], done: torch.Tensor,
                  jobs: Sequence[tuple[Sequence[int], Callable[[], torch.Tensor]]],
                  measure: Callable[[torch.Tensor], dict[str, torch.Tensor]], *,
                  progress: bool | None, callback: Callable[[PatchUpdate], Any] | None,
                  cancel: threading.Event | None) -> PatchResult:
    """Run a sweep's forward passes one by one, filling ``result`` as each finishes.

    Each job is ``(slots, run)``: ``run()`` returns answer logits ``[len(slots), batch, vocab]``
    for the cells ``slots`` of ``values`` (flat ``[n_cells, batch]`` views of ``result.values``).
    Shared by every sweep kind, so progress bars, streaming and cancelling behave the same.
    """
    n_total = len(done)
    show = progress if progress is not None else len(jobs) > 20
    bar = _progress_bar(n_total, int(done.sum()), show)
    try:
        for slots, run in jobs:
            if cancel is not None and cancel.is_set():
                raise PatchingCancelled(result)
            slots = torch.tensor(slots)
            for name, v in measure(run()).items():
                values[name][slots] = v.to("cpu", values[name].dtype)  # results live on the CPU
            done[slots] = True
            if bar is not None:
                bar.update(len(slots))
            if callback is not None and callback(PatchUpdate(result, int(done.sum()), n_total)) is False:
                raise PatchingCancelled(result)
    finally:
        if bar is not None:
            bar.close()
    if callback is not None and not jobs:
        callback(PatchUpdate(result, n_total, n_total))
    result.done = None
    return result


def _answer_columns(inputs):
    """The answer token ids as vocabulary columns, and the inputs with answers renumbered to them."""
    ids = [inputs.correct] + ([inputs.incorrect] if inputs.incorrect is not None else [])
    columns, inverse = torch.unique(torch.cat(ids), return_inverse=True)
    b = inputs.batch
    renumbered = dataclasses.replace(
        inputs, correct=inverse[:b], incorrect=None if inputs.incorrect is None else inverse[b:])
    return columns, renumbered


def check_request(metric_fns: dict, inputs, ablation: str | None) -> None:
    """Checks that need both the metrics and the prepared inputs (shared by every sweep kind)."""
    needs_incorrect = [m for m in metric_fns.values() if m in metrics_mod.NEEDS_INCORRECT]
    if needs_incorrect and inputs.incorrect is None:
        raise PatchingInputError(
            f"metric {needs_incorrect[0]!r} needs an incorrect answer: answers=(correct, incorrect)",
            "answers")
    if ablation == "mean" and inputs.batch < 2:
        raise PatchingInputError("mean ablation averages over a dataset: give several clean prompts", "clean")
    if ablation in ("zero", "mean") and "normalized" in metric_fns.values():
        raise PatchingInputError(
            "'normalized' needs a corrupted run to normalise against; a zero or mean ablation has "
            "none. Use 'logit_diff' (or ablation='noise').", "metrics")


def metric_context(metric_fns: dict, inputs, direction: str, target_logits: torch.Tensor,
                   source_logits: torch.Tensor | None, clean_logits: torch.Tensor):
    """The :class:`MetricContext` of a sweep, the unpatched target's values and the baselines.

    ``target_logits``/``source_logits``/``clean_logits`` are answer-position logits
    ``[batch, vocab]`` of the run being patched, the run the values come from (``None`` for a
    zero or mean ablation) and the clean run.
    """
    device = target_logits.device  # metrics run where the logits are
    ctx = metrics_mod.MetricContext(
        correct=inputs.correct.to(device),
        incorrect=None if inputs.incorrect is None else inputs.incorrect.to(device),
        clean_logprobs=clean_logits.float().log_softmax(-1))
    if inputs.incorrect is not None:
        ctx.target_logit_diff = metrics_mod.logit_diff(target_logits.float(), ctx.correct, ctx.incorrect)
        if source_logits is not None:
            ctx.source_logit_diff = metrics_mod.logit_diff(source_logits.float(), ctx.correct, ctx.incorrect)
    if "normalized" in metric_fns.values():
        metrics_mod.check_normalization(ctx)
    target_values = {k: v[0].cpu() for k, v in metrics_mod.compute(metric_fns, target_logits[None], ctx).items()}
    baselines = {("corrupted" if direction == "denoising" else "clean"): target_values}
    if source_logits is not None:
        baselines["clean" if direction == "denoising" else "corrupted"] = {
            k: v[0].cpu() for k, v in metrics_mod.compute(metric_fns, source_logits[None], ctx).items()}
    return ctx, target_values, baselines


def _raw_indices(site, index) -> tuple[list[tuple], tuple[int, ...]]:
    if not index:
        raise PatchingInputError(
            f"site {site.name!r} is a hook name: say which slices to patch with index=[(...), ...]", "site")
    rows = [tuple(i) if isinstance(i, (tuple, list)) else (i,) for i in index]
    return rows, (len(rows),)


def _check_ranges(site, indices, seq_len: int) -> None:
    if "pos" in site.axes:
        bad = [i[site.pos_index] for i in indices if not 0 <= i[site.pos_index] < seq_len]
        if bad:
            raise PatchingInputError(f"position {bad[0]} is outside the prompt (0..{seq_len - 1})", "site")


def _progress_bar(total: int, initial: int, show: bool):
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="patching", unit="patch")
