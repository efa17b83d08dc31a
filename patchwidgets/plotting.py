"""Plotly heatmaps of patching results, tokens on the axis, in the widget's colours.

The colour rules are :mod:`patchwidgets.widget_colour`'s (the same as the widget's page and
its exported copy): a raw metric (``logit_diff``, ``logit``, ``logprob``) is centred on the
unpatched target run's value, ``normalized`` on 0, and a one-sign metric (``kl``, ``prob``,
``rank``, ``accuracy``) runs in one hue from its natural bound. The colour scale is built from
those colours (white = no effect), so the figure and the widget agree cell for cell.
"""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from . import widget_colour as colours


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


def colorscale(scale: colours.Scale) -> list[list]:
    """A plotly colorscale from ``scale``'s own colours over white: the ends and, on a diverging
    scale, the neutral middle at its place in ``lo..hi`` (the colours are linear in between)."""
    mid = scale.mid
    stops = [scale.lo, mid, scale.hi] if mid is not None and scale.lo < mid < scale.hi else [scale.lo, scale.hi]
    span = scale.hi - scale.lo
    return [[(v - scale.lo) / span, colours.over(scale.colour(v))] for v in stops]


def heatmap_figure(result, metric: str, title: str | None = None) -> go.Figure:
    """One panel per site, all on one colour scale (:func:`patchwidgets.widget_colour.scale`),
    whose colour bar marks the target run's value for a raw metric."""
    grid = result.grid(metric)
    grids = [grid] if len(result.sites) == 1 else list(grid)
    rows, cols, ytitle, xtitle = _axes_labels(result)
    zs = [_as_2d(g, result.axes).float().numpy() for g in grids]
    centre = colours.centre(metric, result.direction, result.baselines)
    scale = colours.scale(metric, [float(v) for z in zs for v in z.flatten()], centre)
    labels = scale.labels()
    marked = scale.centre_tick()
    if marked is not None and centre is not None:
        labels[marked] += f" ({centre.run} run)"
    bar_title = metric if centre is None else f"{metric}<br>white: unpatched<br>{centre.run} run"
    hover = f"{ytitle} %{{y}}<br>{xtitle} %{{x}}<br>{metric} %{{z:.4f}}"
    if centre is not None:
        hover += f"<br>change from the {centre.run} run %{{customdata:+.4f}}"
    fig = make_subplots(rows=1, cols=len(zs), subplot_titles=result.sites if len(zs) > 1 else None,
                        shared_yaxes=True, horizontal_spacing=0.04)
    for i, z in enumerate(zs):
        fig.add_trace(
            go.Heatmap(
                z=z, x=cols, y=rows, zmin=scale.lo, zmax=scale.hi, zmid=scale.mid, colorscale=colorscale(scale),
                customdata=None if centre is None else z - centre.value,
                showscale=i == 0, colorbar=dict(title=bar_title, tickvals=scale.ticks(), ticktext=labels),
                hovertemplate=hover + "<extra></extra>",
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
