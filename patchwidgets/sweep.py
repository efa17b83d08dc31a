"""Preparing a sweep: the steps every entry point shares, in the order they run.

:func:`patchwidgets.patch`, :func:`~patchwidgets.path_patch`,
:func:`~patchwidgets.attribution_patch` and ``patch`` on an nnsight model begin the same way:

1. :func:`prepare_request`: check every argument (:mod:`.validation`), tokenise the prompts
   and answers (:mod:`.inputs`), and decide which run is the *target* (the run being patched)
   and which the *source* (where pasted values come from) -> a :class:`Request`;
2. :func:`sweep_cells`: the sites and the index tuple of every cell -> :class:`Cells`;
3. :func:`run_unpatched`: the target and source runs, once each, through the
   :class:`~patchwidgets.engine.Engine` (attribution patching runs them with gradients, the
   nnsight backend as traces, and both join again at step 4);
4. :meth:`Request.measure`: the metrics' context from the two runs' answer logits, the
   unpatched values and the baselines -> a :class:`Measure`;
5. :func:`new_result`: the result every cell starts from (the target's values, the no-ops
   already done) and :func:`sweep_stats`.

Then each entry point runs its own patched passes, usually through
:func:`patchwidgets.streaming.run_streaming`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence, TypeVar

import torch

from . import metrics as metrics_mod
from .engine import Engine
from .errors import PatchingInputError
from .inputs import PreparedInputs, Prompts, prepare
from .planning import Patch
from .results import PatchResult
from .sites import Dims, Site, resolve_sites
from .sources import activation_sums, ablation_values, differing_positions, noise_hooks
from .validation import (check_direction, check_index, check_index_ranges, check_noise, check_request,
                         check_restrictions)
from .watch import SweepWatch


class RunSpec(NamedTuple):
    """An unpatched run: its tokens ``[batch, pos]`` and the hooks that define it (noise)."""

    tokens: torch.Tensor
    hooks: list


# ---------------------------------------------------------------------------- 1. the request
@dataclass
class Request:
    """A checked request: which prompts, which direction, which metrics (no site yet)."""

    inputs: PreparedInputs
    direction: str                     # "denoising": target = corrupted; "noising": target = clean
    ablation: str | None
    metric_fns: dict[str, Any]
    noise: float
    noise_positions: list[int] | None
    noise_seed: int
    changed: torch.Tensor              # [pos] bool: where the source's input differs from the target's
    # Set on a group of a grouped sweep (patchwidgets.driver): (its rows, the dataset's pairs).
    group: tuple[slice, int] | None = None

    def rows(self, rows: slice) -> "Request":
        """The request for pairs ``rows`` only (a group): same direction, metrics and
        ``changed`` (the whole dataset's, so every group skips the same no-ops), the noise rows
        of the whole dataset's draw."""
        inputs = self.inputs

        def part(t: Any) -> Any:
            return None if t is None else t[rows]
        group_inputs = dataclasses.replace(
            inputs, clean_tokens=inputs.clean_tokens[rows], corrupted_tokens=part(inputs.corrupted_tokens),
            answer_pos=inputs.answer_pos[rows], correct=inputs.correct[rows], incorrect=part(inputs.incorrect),
            clean_str_tokens=part(inputs.clean_str_tokens), corrupted_str_tokens=part(inputs.corrupted_str_tokens))
        return dataclasses.replace(self, inputs=group_inputs, group=(rows, inputs.batch))

    def runs(self, model: Any) -> tuple[RunSpec, RunSpec | None]:
        """The target and source runs; the source is ``None`` for a zero or mean ablation,
        whose values are built from the target's activations (:func:`.sources.ablation_values`)."""
        inputs = self.inputs
        clean = RunSpec(inputs.clean_tokens, [])
        if self.ablation == "noise":
            corrupted = RunSpec(inputs.clean_tokens, noise_hooks(
                model, inputs, self.noise, self.noise_positions, self.noise_seed, self.group))
        elif self.ablation:  # zero or mean: the clean run provides the activations to ablate
            corrupted = RunSpec(inputs.clean_tokens, [])
        else:
            assert inputs.corrupted_tokens is not None
            corrupted = RunSpec(inputs.corrupted_tokens, [])
        target, source = (corrupted, clean) if self.direction == "denoising" else (clean, corrupted)
        return target, (None if self.ablation in ("zero", "mean") else source)

    def answer_columns(self) -> tuple[torch.Tensor | None, "Request"]:
        """Vocabulary columns the metrics read (``None``: all), and the request with its
        answers renumbered to them. Metrics that read only the answers' logits need only those
        columns of the unembedding."""
        if not all(isinstance(m, str) and metrics_mod.METRICS[m].answer_only for m in self.metric_fns.values()):
            return None, self
        inputs = self.inputs
        ids = [inputs.correct] + ([inputs.incorrect] if inputs.incorrect is not None else [])
        columns, inverse = torch.unique(torch.cat(ids), return_inverse=True)
        b = inputs.batch
        renumbered = dataclasses.replace(
            inputs, correct=inverse[:b], incorrect=None if inputs.incorrect is None else inverse[b:])
        return columns, dataclasses.replace(self, inputs=renumbered)

    def measure(self, target_logits: torch.Tensor, source_logits: torch.Tensor | None) -> "Measure":
        """Step 4: the metrics of this request, from the unpatched answer logits ``[batch, vocab]``
        of the target and the source (``None`` for a zero or mean ablation)."""
        return Measure.of(self, target_logits, source_logits)


def prepare_request(model: Any, clean: Prompts, corrupted: Prompts | None, answers: Any,
                    direction: Any, metrics: Any, *, ablation: Any = None, noise: Any = 3.0,
                    noise_positions: Any = None, noise_seed: Any = 0, gradient: bool = False) -> Request:
    """Step 1: check the arguments every sweep takes, in the order a user reads them.

    ``model`` needs ``cfg`` and, for text prompts, ``tokenizer``/``to_tokens``/``to_str_tokens``
    (a ``TransformerBridge``, or the nnsight backend's stand-in). ``gradient``: the metrics
    will be differentiated (attribution patching refuses discrete ones).
    """
    direction = check_direction(direction, corrupted, ablation)
    metric_fns = metrics_mod.resolve_metrics(metrics)
    inputs = prepare(model, clean, None if ablation else corrupted, answers)
    positions = check_noise(ablation, noise, noise_positions, noise_seed, inputs.seq_len)
    check_request(metric_fns, inputs, ablation, gradient=gradient)
    return Request(inputs, direction, ablation, metric_fns, float(noise), positions, int(noise_seed),
                   differing_positions(inputs, ablation, positions))


# ---------------------------------------------------------------------------- 2. the cells
@dataclass
class Cells:
    """The cells of a sweep: the sites, and the index tuples each site sweeps (same for all)."""

    sites: list[Site]
    indices: list[tuple]       # row-major over the grid
    shape: tuple[int, ...]     # the grid of one site

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sites]

    @property
    def axes(self) -> tuple[str, ...]:
        return self.sites[0].axes

    def hook_names(self) -> list[str]:
        """Every hook the sweep patches."""
        return sorted({s.hook_of(ix) for s in self.sites for ix in self.indices})

    def patches(self, changed: torch.Tensor) -> list[Patch]:
        """One :class:`Patch` per cell, site by site, with its first changed position
        (``None``: a no-op). ``changed`` is ``[pos]`` bool (:attr:`Request.changed`)."""
        n = len(self.indices)
        return [Patch(s, ix, k * n + cell, s.first_changed_position(ix, changed))
                for k, s in enumerate(self.sites) for cell, ix in enumerate(self.indices)]

    def check_activations(self, acts: dict[str, torch.Tensor]) -> None:
        """Hook-name sites: every index inside its activation (known once the target ran)."""
        for s in self.sites:
            if s.kind == "raw":
                check_index_ranges(s, self.indices, acts[s.hook_template].shape[1:])


def sweep_cells(model: Any, inputs: PreparedInputs, site: Any, *, layers: Any = None, positions: Any = None,
                heads: Any = None, neurons: Any = None, index: Any = None) -> Cells:
    """Step 2: resolve ``site`` (a name, group or hook name) and list the cells it sweeps."""
    sites = resolve_sites(site, tuple(getattr(model, "hook_dict", None) or ()))
    dims = Dims.of(model.cfg, inputs.seq_len)
    if sites[0].kind == "raw":
        check_restrictions(sites, dims, layers=layers, positions=positions, heads=heads, neurons=neurons)
        rows = check_index(index, sites[0])
        return Cells(sites, rows, (len(rows),))
    check_index(index, sites[0])
    chosen = check_restrictions(sites, dims, layers=layers, positions=positions, heads=heads, neurons=neurons)
    grids = [s.grid(dims, chosen) for s in sites]
    if any(g != grids[0] for g in grids[1:]):
        raise PatchingInputError(
            f"the sites of {site!r} have different grids on this model ({dims.n_heads} query heads, "
            f"{dims.n_kv_heads} key/value heads); sweep {', '.join(s.name for s in sites)} one at a time",
            "site")
    indices, shape = grids[0]
    return Cells(sites, indices, shape)


# ---------------------------------------------------------------------------- 3. the two runs
@dataclass
class Unpatched:
    """The target and source runs of a sweep, run once each."""

    target: Engine                            # runs the patched passes
    target_logits: torch.Tensor               # [batch, vocab or columns] at the answer position
    target_acts: dict[str, torch.Tensor]
    source_logits: torch.Tensor | None        # None: a zero or mean ablation
    source_acts: dict[str, torch.Tensor]      # the values patches paste
    source_resumed: bool = False              # the source resumed from the target's prefix


def run_unpatched(model: Any, request: Request, names: Sequence[str], max_batch_tokens: int,
                  columns: torch.Tensor | None = None, watch: SweepWatch | None = None,
                  means: dict[str, torch.Tensor] | None = None) -> Unpatched:
    """Step 3: run the target (recording what resumed passes need) and the source, keeping the
    activations ``names``. ``watch`` (watching the model) is told the work ahead; ``means``:
    the whole dataset's means of a mean ablation, for a group of a grouped sweep."""
    target_run, source_run = request.runs(model)
    answer_pos = request.inputs.answer_pos
    source_resumed = False
    target = Engine(model, target_run.tokens, answer_pos, target_run.hooks, max_batch_tokens, columns)
    watch = watch or SweepWatch()
    with torch.no_grad():
        one_run = request.inputs.batch * request.inputs.seq_len * getattr(model.cfg, "n_layers", 0)
        watch.expect(target.work())
        watch.stage("unpatched runs")
        target_logits, target_acts = target.run_target(names)
        if source_run is None:
            source_logits = None
            source_acts = ablation_values({n: target_acts[n] for n in names}, request.ablation or "", means)
        else:
            # Resumed from the target where their inputs first differ, else a plain run.
            resumed = target.run_source(source_run.tokens, source_run.hooks, names, request.changed, target_acts)
            source_resumed = resumed is not None
            watch.expect(target.source_work(request.changed) if source_resumed else one_run)
            if resumed is None:
                source = Engine(model, source_run.tokens, answer_pos, source_run.hooks, max_batch_tokens, columns)
                resumed = source.run_target(names, record=False)
            source_logits, source_acts = resumed
    return Unpatched(target, target_logits, target_acts, source_logits, source_acts, source_resumed)


def unpatched_logits(model: Any, request: Request, names: Sequence[str], columns: torch.Tensor | None,
                     watch: SweepWatch, mean: bool) -> tuple[torch.Tensor, torch.Tensor | None, dict | None]:
    """The unpatched runs with nothing recorded: the target's and the source's answer logits
    and, with ``mean``, the float64 sums of the target's activations ``names`` (the first pass
    of a grouped sweep, :mod:`patchwidgets.driver`)."""
    target_run, source_run = request.runs(model)
    answer_pos = request.inputs.answer_pos
    one_run = request.inputs.batch * request.inputs.seq_len * getattr(model.cfg, "n_layers", 0)
    watch.expect(one_run * (1 + (source_run is not None)))
    watch.stage("unpatched runs")
    with torch.no_grad():
        target = Engine(model, target_run.tokens, answer_pos, target_run.hooks, 1, columns)
        target_logits, acts = target.run_target(names if mean else (), record=False)
        source_logits = None
        if source_run is not None:
            source = Engine(model, source_run.tokens, answer_pos, source_run.hooks, 1, columns)
            source_logits, _ = source.run_target((), record=False)
    return target_logits, source_logits, (activation_sums(acts) if mean else None)


def cached_bytes_per_pair(model: Any, seq_len: int, names: Sequence[str]) -> int:
    """Bytes a sweep keeps per prompt pair between its passes: the target run's residual
    stream entering every block and its keys and values, and the activations ``names`` of
    both runs (an estimate from the model's shape; what ``max_cache_bytes`` is compared to)."""
    cfg = model.cfg
    n_layers, d_model = getattr(cfg, "n_layers", 0), getattr(cfg, "d_model", None)
    if d_model is None:  # a hand-built model that does not say: one group
        return 0
    n_heads = getattr(cfg, "n_heads", 1)
    d_head = getattr(cfg, "d_head", d_model // max(1, n_heads))
    n_kv = getattr(cfg, "n_key_value_heads", None) or n_heads
    element = torch.finfo(getattr(cfg, "dtype", torch.float32)).bits // 8
    sizes = {"pattern": n_heads * seq_len, "mlp": getattr(cfg, "d_mlp", 4 * d_model),
             "head": n_heads * d_head, "kv": n_kv * d_head}

    def size(name: str) -> int:
        if name.endswith("hook_pattern") or name.endswith("hook_attn_scores"):
            return sizes["pattern"]
        if ".mlp.hook_" in name:
            return sizes["mlp"]
        if name.endswith(("hook_k", "hook_v")):
            return sizes["kv"]
        if name.endswith(("hook_q", "hook_z", "hook_result")):
            return sizes["head"]
        return d_model
    per_position = n_layers * (d_model + 2 * n_kv * d_head) + 2 * sum(size(n) for n in names)
    return int(per_position * seq_len * element)


# ---------------------------------------------------------------------------- 4. the metrics
@dataclass
class Measure:
    """The metrics of a sweep, ready to apply to patched answer logits (call it)."""

    metric_fns: dict[str, Any]
    ctx: metrics_mod.MetricContext
    target_values: dict[str, torch.Tensor]               # metric -> [batch], the unpatched target
    baselines: dict[str, dict[str, torch.Tensor]]        # "clean"/"corrupted" -> metric -> [batch]

    def __call__(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{metric: [n, batch]}`` from answer logits ``[n, batch, vocab]``."""
        return metrics_mod.compute(self.metric_fns, logits, self.ctx)

    def rows(self, rows: slice) -> "Measure":
        """The metrics of pairs ``rows`` of this dataset, normalised by the whole dataset's gap."""
        return Measure(self.metric_fns, self.ctx.rows(rows), {k: v[rows] for k, v in self.target_values.items()},
                       {run: {k: v[rows] for k, v in values.items()} for run, values in self.baselines.items()})

    @classmethod
    def of(cls, request: Request, target_logits: torch.Tensor, source_logits: torch.Tensor | None) -> "Measure":
        inputs, noising = request.inputs, request.direction == "noising"
        clean_logits = target_logits if noising or source_logits is None else source_logits
        device = target_logits.device  # metrics run where the logits are
        ctx = metrics_mod.MetricContext(
            correct=inputs.correct.to(device),
            incorrect=None if inputs.incorrect is None else inputs.incorrect.to(device),
            clean_logprobs=clean_logits.float().log_softmax(-1))
        if ctx.incorrect is not None:
            ctx.target_logit_diff = metrics_mod.logit_diff(target_logits.float(), ctx.correct, ctx.incorrect)
            if source_logits is not None:
                ctx.source_logit_diff = metrics_mod.logit_diff(source_logits.float(), ctx.correct, ctx.incorrect)
        if "normalized" in request.metric_fns.values():
            target_ld, source_ld = ctx.target_logit_diff, ctx.source_logit_diff
            assert target_ld is not None and source_ld is not None  # (validation: answers and a source run)
            metrics_mod.check_normalization(*((target_ld, source_ld) if noising else (source_ld, target_ld)))

        def values(logits: torch.Tensor) -> dict[str, torch.Tensor]:
            return {k: v[0].cpu() for k, v in metrics_mod.compute(request.metric_fns, logits[None], ctx).items()}

        target_values = values(target_logits)
        baselines = {("clean" if noising else "corrupted"): target_values}
        if source_logits is not None:
            baselines["corrupted" if noising else "clean"] = values(source_logits)
        return cls(request.metric_fns, ctx, target_values, baselines)


# ---------------------------------------------------------------------------- 5. the result
R = TypeVar("R", bound=PatchResult)


def new_result(cls: type[R], request: Request, measure: Measure, *, sites: list[str],
               axes: tuple[str, ...], shape: tuple[int, ...], indices: Sequence[tuple],
               first_pos: Sequence[int | None], **extra: Any) -> R:
    """The result every cell starts from: the unpatched target's values, and ``done`` set for
    the no-ops (``first_pos`` ``None``); ``first_pos`` is per cell, site by site."""
    n_sites, n_total = len(sites), len(first_pos)
    values = {k: v.expand(n_total, -1).clone().view(n_sites, n_total // n_sites, -1)
              for k, v in measure.target_values.items()}
    done = torch.tensor([f is None for f in first_pos]).view(n_sites, -1)
    inputs = request.inputs
    return cls(sites=sites, axes=axes, shape=shape, indices=list(indices), values=values,
               direction=request.direction, baselines=measure.baselines,
               clean_str_tokens=inputs.clean_str_tokens, corrupted_str_tokens=inputs.corrupted_str_tokens,
               done=done, **extra)


def sweep_stats(result: PatchResult, forward_passes: int, **extra: Any) -> dict[str, Any]:
    """``result.stats`` of an exact sweep: patches, no-ops skipped, forward passes, and ``extra``
    (the engine's :meth:`~patchwidgets.engine.Engine.shortcut_report`)."""
    assert result.done is not None
    return {"patches": result.done.numel(), "skipped_noop": int(result.done.sum()),
            "forward_passes": forward_passes, **extra}
