"""Plotly heatmaps of patching results: diverging colours centred on 0, tokens on the axis."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots


def _axes_labels(result) -> tuple[list[str], list[str], str, str]:
    """Row labels, column labels and axis titles for one site's 2-D view."""
    axes, shape = result.axes, result.shape
    if axes == ("layer", "pos"):
        return [str(l) for l in range(shape[0])], result.position_labels(), "layer", "position"
    if axes == ("layer", "head"):
        return [str(l) for l in range(shape[0])], [str(h) for h in range(shape[1])], "layer", "head"
    if axes == ("layer", "neuron"):
        return [str(l) for l in range(shape[0])], [str(n) for n in range(shape[1])], "layer", "neuron"
    if len(axes) == 3 and axes[:2] == ("layer", "pos"):
        rows = [f"L{l} {axes[2][0].upper()}{h}" for l in range(shape[0]) for h in range(shape[2])]
        return rows, result.position_labels(), f"layer, {axes[2]}", "position"
    if axes == ("layer", "head", "pos"):
        rows = [f"L{l} H{h}" for l in range(shape[0]) for h in range(shape[1])]
        return rows, result.position_labels(), "layer, head", "destination position"
    return ["value"], [str(i) for i in result.indices], "", axes[0]


def _as_2d(grid, axes):
    """One row per (layer, head or neuron), one column per position."""
    if len(axes) == 3 and axes[:2] == ("layer", "pos"):
        return grid.permute(0, 2, 1).reshape(grid.shape[0] * grid.shape[2], grid.shape[1])
    if axes == ("layer", "head", "pos"):
        return grid.reshape(grid.shape[0] * grid.shape[1], grid.shape[2])
    if grid.ndim == 1:
        return grid[None]
    return grid


def heatmap_figure(result, metric: str, title: str | None = None) -> go.Figure:
    grid = result.grid(metric)
    grids = [grid] if len(result.sites) == 1 else list(grid)
    rows, cols, ytitle, xtitle = _axes_labels(result)
    zs = [_as_2d(g, result.axes).float().numpy() for g in grids]
    finite = [abs(v) for z in zs for v in z.flatten() if v == v]
    zmax = max(finite) if finite else 1.0
    fig = make_subplots(rows=1, cols=len(zs), subplot_titles=result.sites if len(zs) > 1 else None,
                        shared_yaxes=True, horizontal_spacing=0.04)
    for i, z in enumerate(zs):
        fig.add_trace(
            go.Heatmap(
                z=z, x=cols, y=rows, zmid=0, zmin=-zmax, zmax=zmax, colorscale="RdBu",
                showscale=i == 0, colorbar=dict(title=metric),
                hovertemplate=f"{ytitle} %{{y}}<br>{xtitle} %{{x}}<br>{metric} %{{z:.4f}}<extra></extra>",
            ),
            row=1, col=i + 1,
        )
    fig.update_yaxes(autorange="reversed", title_text=ytitle, col=1)
    fig.update_xaxes(title_text=xtitle)
    fig.update_layout(
        title=title or f"{result.direction} {'+'.join(result.sites)}: {metric}",
        height=max(300, 22 * len(rows) + 150), width=max(500, 300 * len(zs) + 20 * len(cols)),
    )
    return fig
