"""Attribution patching's shared parts: the result, and the steps every backend runs.

:func:`patchwidgets.attribution_patch` estimates every patch of a sweep from one backward pass
(the method, its limits and AtP* are explained in :mod:`patchwidgets.attribution`). Two
backends run it: the bridge's (:mod:`patchwidgets.attribution`, hooks on a
``TransformerBridge``) and nnsight's (:mod:`patchwidgets.nnsight_backend`, traces of an
nnsight model). They differ only in how they get activations and gradients; the steps around
those are the same, and live here so that each backend imports them and neither imports the
other (the entry point, :func:`patchwidgets.attribution.attribution_patch`, hands an nnsight
model to the nnsight backend):

1. :func:`gradient_groups`: which backward passes a request needs (``logit_diff`` and
   ``normalized`` share one; every other metric has its own);
2. :func:`differentiated_metric`: the scalar each backward pass differentiates;
3. :func:`site_estimates`: each cell's estimate ``Σ (a_source - a_target) · ∂M/∂a`` over the
   slice it patches, from activations and gradients keyed by the bridge's hook names
   (``[batch, pos, head, d_head]`` for per-head sites), whichever backend produced them;
4. :func:`attribution_result`: the :class:`AttributionResult`, laid out like
   :func:`patchwidgets.patch`'s result for the same site.

:func:`compare` (and :meth:`AttributionResult.compare`) measures an estimate against exact
patching: Pearson correlation per site and overall, and the cells it missed by the most.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import pandas as pd
import torch

from . import metrics as metrics_mod
from .errors import PatchingInputError
from .results import PatchResult
from .sites import Site

__all__ = ["QK_SITES", "AttributionResult", "Comparison", "compare", "gradient_groups", "differentiated_metric",
           "site_estimates", "attribution_result"]

_LD = "\0logit_diff"  # plan key shared by logit_diff and normalized (never a user name)
# The query and key sites, whose AtP* estimate rebuilds the attention pattern.
QK_SITES = {"head_q": "q", "head_q_by_pos": "q", "head_k": "k", "head_k_by_pos": "k"}


@dataclass
class AttributionResult(PatchResult):
    """A :class:`PatchResult` of first-order estimates; compare it with an exact sweep."""

    method: str = "atp*"

    def compare(self, exact: PatchResult, metric: str | None = None, top: int = 10) -> "Comparison":
        """How well these estimates match ``exact`` (:func:`compare`)."""
        return compare(self, exact, metric, top)

    def __repr__(self) -> str:
        return super().__repr__().replace("PatchResult", f"AttributionResult[{self.method}]", 1)


@dataclass
class Comparison:
    """Estimates against exact values, cell by cell (means over prompt pairs)."""

    metric: str
    correlation: float                 # Pearson r over every cell of every site
    per_site: dict[str, float]         # Pearson r within each site
    max_abs_error: float
    mean_abs_error: float
    misses: pd.DataFrame               # the cells with the largest |estimate - exact|

    def __repr__(self) -> str:
        sites = ", ".join(f"{s}: r={r:.3f}" for s, r in self.per_site.items())
        return (f"Comparison({self.metric}: r={self.correlation:.3f} ({sites}); |error| max "
                f"{self.max_abs_error:.4g}, mean {self.mean_abs_error:.4g})\nlargest misses:\n"
                f"{self.misses.to_string(index=False)}")


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    keep = torch.isfinite(x) & torch.isfinite(y)
    x, y = x[keep].double(), y[keep].double()
    if x.numel() < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(torch.corrcoef(torch.stack([x, y]))[0, 1])


def compare(estimate: PatchResult, exact: PatchResult, metric: str | None = None, top: int = 10) -> Comparison:
    """Correlation and largest misses of ``estimate`` (e.g. AtP) against ``exact`` patching.

    Both must sweep the same sites and cells (same ``site``, ``layers``, ``positions``, ...).
    """
    metric = estimate.metric_name(metric)
    exact.metric_name(metric)
    if estimate.sites != exact.sites or list(estimate.indices) != list(exact.indices):
        raise ValueError(f"the results sweep different cells ({estimate.sites} vs {exact.sites}); run "
                         "both with the same site and restrictions")
    est = estimate.values[metric].float().mean(-1)     # [n_sites, n_cells]
    ref = exact.values[metric].float().mean(-1)
    err = est - ref
    frame = estimate.index_frame()
    frame["estimate"], frame["exact"], frame["error"] = est.reshape(-1).numpy(), ref.reshape(-1).numpy(), \
        err.reshape(-1).numpy()
    misses = frame.reindex(frame["error"].abs().sort_values(ascending=False).index).head(top)
    return Comparison(
        metric=metric, correlation=_pearson(est.reshape(-1), ref.reshape(-1)),
        per_site={s: _pearson(est[i], ref[i]) for i, s in enumerate(estimate.sites)},
        max_abs_error=float(err.abs().max()), mean_abs_error=float(err.abs().mean()),
        misses=misses.reset_index(drop=True))


# ---------------------------------------------------------------------------- shared steps
def gradient_groups(metric_fns: dict[str, Any]) -> dict[str, list[str]]:
    """The backward passes a request needs: ``{group key: metric names}``. ``logit_diff`` and
    ``normalized`` share one (``normalized`` is an affine map of the logit difference); every
    other metric has its own."""
    groups: dict[str, list[str]] = {}
    for name, m in metric_fns.items():
        groups.setdefault(_LD if m in ("logit_diff", "normalized") else name, []).append(name)
    return groups


def differentiated_metric(key: str, metric_fns: dict[str, Any], logits: torch.Tensor,
                          ctx: metrics_mod.MetricContext) -> torch.Tensor:
    """``[batch]``: the metric of group ``key`` (:func:`gradient_groups`) from answer logits
    ``[batch, vocab]`` that carry a graph. Raises for a metric without a gradient."""
    if key == _LD:
        assert ctx.incorrect is not None  # (validation: logit_diff and normalized need both answers)
        scalar = metrics_mod.logit_diff(logits.float(), ctx.correct, ctx.incorrect)
    else:
        scalar = metrics_mod.compute({key: metric_fns[key]}, logits[None], ctx)[key][0]
    if not scalar.requires_grad:
        raise PatchingInputError(f"metric {key!r} has no gradient, so it cannot be estimated", "metrics")
    return scalar


def attribution_result(request: Any, cells: Any, measure: Any, groups: dict[str, list[str]],
                       per_group: dict[str, list[torch.Tensor]], method: str) -> "AttributionResult":
    """The :class:`AttributionResult`: each metric's unpatched target value plus its group's
    estimates ``per_group[key]`` (one ``[n_cells, batch]`` tensor per site), ``normalized``
    divided by the clean-corrupted gap."""
    inputs, n_sites, n_cells = request.inputs, len(cells.sites), len(cells.indices)
    values = {}
    for key, members in groups.items():
        change = torch.stack(per_group[key])                                     # [site, cell, batch]
        for name in members:
            scale = 1 / measure.ctx.gap if request.metric_fns[name] == "normalized" else 1.0
            values[name] = (measure.target_values[name].float().cpu()[None, None, :] + change * scale)
    return AttributionResult(
        sites=cells.names, axes=cells.axes, shape=cells.shape, indices=cells.indices,
        values={k: values[k].reshape(n_sites, n_cells, -1) for k in request.metric_fns},
        direction=request.direction, baselines=measure.baselines, clean_str_tokens=inputs.clean_str_tokens,
        corrupted_str_tokens=inputs.corrupted_str_tokens, method=method)


# ---------------------------------------------------------------------------- per-site sums
def site_estimates(site: Site, indices: list[tuple], batch: int, target_acts: Mapping[str, torch.Tensor],
                   source_acts: Mapping[str, torch.Tensor], grad: Mapping[str, torch.Tensor | None],
                   qk: dict | None = None) -> torch.Tensor:
    """``[n_cells, batch]``: each cell's estimated change of the metric.

    ``target_acts``, ``source_acts`` and ``grad`` (the metric's gradient at the target run,
    ``None`` where the metric does not depend on it) are keyed by hook name, in the layout of
    the bridge's hooks (``[batch, pos, head, d_head]`` for per-head sites); ``qk``: AtP*
    estimates for query and key sites (:func:`attribution_patch`), ``None`` for plain AtP.
    The nnsight backend calls it with its own activations, laid out the same way.
    """
    out = torch.zeros(len(indices), batch)
    if site.kind == "raw":
        name = site.hook_template
        attr = _linear(name, target_acts, source_acts, grad)
        for c, ix in enumerate(indices):
            out[c] = attr[site.slice(ix)].reshape(attr.shape[0], -1).sum(-1).cpu()
        return out
    idx = torch.tensor(indices)
    for layer in idx[:, 0].unique().tolist():
        name = site.hook_name(layer)
        if qk is not None and site.name in QK_SITES:
            reduced = qk[(layer, site.name)]
        else:
            reduced = site.reduce(_linear(name, target_acts, source_acts, grad))
        rows = (idx[:, 0] == layer).nonzero()[:, 0]
        rest = idx[rows, 1:].T
        index = (slice(None), *rest)  # every row; this layer's cells
        out[rows] = reduced[index].T.float().cpu()
    return out


def _linear(name: str, target_acts, source_acts, grad) -> torch.Tensor:
    """Elementwise ``(a_S - a_T) * ∂M/∂a``: summed over a slice, the estimate for patching it."""
    g = grad[name]
    a_t = target_acts[name].detach()
    if g is None:  # the metric does not depend on this activation at all
        return torch.zeros_like(a_t, dtype=torch.float32)
    return (source_acts[name].to(a_t.dtype) - a_t).float() * g.float()
