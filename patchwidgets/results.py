"""The result of a sweep: one value per patch, per metric, per prompt pair.

``result.frame`` is the table (one row per patch), ``result.grid(metric)`` the array shaped
like the sweep (``[layer, pos]``, ``[layer, head]``, ...), and ``result.figure(metric)`` the
heatmap. Values for every prompt pair are kept: grids and frames show the mean over pairs,
frames add the standard error of that mean, and ``result.frame_per_pair`` has every pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch


@dataclass
class PatchResult:
    """Values of a sweep. Built by :func:`patchwidgets.patch`; read with the methods below."""

    sites: list[str]
    axes: tuple[str, ...]
    shape: tuple[int, ...]
    indices: list[tuple]
    values: dict[str, torch.Tensor]        # metric -> [n_sites, n_cells, batch]
    direction: str
    baselines: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    clean_str_tokens: list[list[str]] | None = None
    corrupted_str_tokens: list[list[str]] | None = None
    done: torch.Tensor | None = None       # [n_sites, n_cells] bool: computed yet?
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def metrics(self) -> list[str]:
        return list(self.values)

    @property
    def n_pairs(self) -> int:
        return next(iter(self.values.values())).shape[-1]

    @property
    def complete(self) -> bool:
        return self.done is None or bool(self.done.all())

    def metric_name(self, metric: str | None) -> str:
        """``metric``, checked to be computed; ``None``: the first metric."""
        if metric is None:
            return self.metrics[0]
        if metric not in self.values:
            raise KeyError(f"metric {metric!r} was not computed; available: {self.metrics}")
        return metric

    def grid(self, metric: str | None = None, per_pair: bool = False) -> torch.Tensor:
        """Values shaped like the sweep, averaged over prompt pairs.

        A single site gives ``shape`` (e.g. ``[n_layers, seq_len]``); a group of sites
        (``"block"``, ``"heads_every"``) adds a leading site axis, as in TransformerLens.
        With ``per_pair=True`` a trailing pair axis is kept instead of averaging.
        Cells not computed yet (a cancelled or streaming sweep) are NaN.
        """
        v = self.values[self.metric_name(metric)]
        if self.done is not None:
            v = v.masked_fill(~self.done[..., None], float("nan"))
        v = v if per_pair else v.mean(-1)
        v = v.reshape(len(self.sites), *self.shape, *(() if not per_pair else (v.shape[-1],)))
        return v[0] if len(self.sites) == 1 else v

    def index_frame(self) -> pd.DataFrame:
        """One row per cell: its site and index (and the token, for a position axis)."""
        rows = [(s, *idx) for s in self.sites for idx in self.indices]
        df = pd.DataFrame(rows, columns=["site", *self.axes])
        if self.clean_str_tokens is not None and "pos" in self.axes:
            toks = self.clean_str_tokens[0]
            df["token"] = [toks[p] if p < len(toks) else "" for p in df["pos"]]
        return df

    @property
    def frame(self) -> pd.DataFrame:
        """One row per patch: site, index columns, each metric's mean (and ``_se``)."""
        df = self.index_frame()
        n = self.n_pairs
        for name, v in self.values.items():
            flat = v.reshape(-1, n)
            if self.done is not None:
                flat = flat.masked_fill(~self.done.reshape(-1, 1), float("nan"))
            df[name] = flat.mean(-1).numpy()
            if n > 1:
                df[f"{name}_se"] = (flat.std(-1, unbiased=True) / n**0.5).numpy()
        return df

    @property
    def frame_per_pair(self) -> pd.DataFrame:
        """Long table: one row per patch and prompt pair (column ``pair``)."""
        base = self.index_frame()
        n = self.n_pairs
        df = base.loc[base.index.repeat(n)].reset_index(drop=True)
        df.insert(1, "pair", list(range(n)) * len(base))
        for name, v in self.values.items():
            df[name] = v.reshape(-1).numpy()
        return df

    def position_labels(self) -> list[str]:
        toks = self.clean_str_tokens[0] if self.clean_str_tokens else None
        n_pos = self.shape[self.axes.index("pos")] if "pos" in self.axes else 0
        return [f"{p}: {toks[p]!r}" if toks and p < len(toks) else str(p) for p in range(n_pos)]

    def figure(self, metric: str | None = None, title: str | None = None):
        """A plotly heatmap of ``grid(metric)`` (one panel per site) in the widget's colours:
        white where a patch changed nothing (for ``logit_diff``, ``logit`` and ``logprob``: the
        unpatched target run's value, marked on the colour bar), one hue from 0 for ``kl``,
        ``prob`` and ``accuracy`` (from 1 for ``rank``)."""
        from .plotting import heatmap_figure

        return heatmap_figure(self, self.metric_name(metric), title=title)

    def __repr__(self) -> str:
        axes = " x ".join(f"{a}={n}" for a, n in zip(self.axes, self.shape))
        return (
            f"PatchResult({'+'.join(self.sites)}, {self.direction}, {axes}, pairs={self.n_pairs}, "
            f"metrics={self.metrics})"
        )
