"""The widget's heatmap state: a sweep flattened into the ``heatmap`` traitlet and back.

The widget keeps all of its state in synced traitlets (plain JSON plus raw bytes), so a saved
notebook can draw the last heatmap without a kernel:

* :func:`heatmap_payload` flattens a :class:`~patchwidgets.results.PatchResult` into a 2-D
  table (rows x columns) with labels, values and counts from one snapshot;
* :func:`payload_values` / :func:`payload_estimate` decode it again;
* :func:`static_html` renders it as self-contained HTML (no scripts), what exported notebooks
  show; :func:`pattern_payload` is the ``pattern`` traitlet (one head's attention).

Everything here is deterministic (no ids, no timestamps in text), so ``nbval`` can compare
the widget's outputs between runs.
"""

from __future__ import annotations

import html
import math
from typing import Any

import torch

from . import widget_colour as colours
from .path_patching import PathPatchResult


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _token_label(token: str) -> str:
    return token if len(token) <= 14 else token[:12] + "\u2026"


def table_2d(result, metric: str, mask: torch.Tensor | None = None, stat: str = "mean", pair: int = 0
             ) -> tuple[torch.Tensor, list[dict], list[dict], str, str]:
    """The sweep's grid as a 2-D table: ``values [rows, cols]``, row and column descriptors,
    and the two axis titles.

    ``(layer, pos)`` and ``(layer, head)`` grids are already 2-D; the ``by_pos`` head sites,
    ``(layer, pos, head)`` and ``(layer, head, pos)``, become one row per (layer, head)
    with the positions as columns. Each descriptor carries the indices of its cells
    (``layer``, ``head``, ``pos``), a short ``label`` and, for positions, the clean and
    corrupted ``token`` there. ``mask`` (``result.done`` as it was when the caller looked) blanks
    the cells computed after that moment, so values and counts come from one instant even
    while the sweep fills the result in place on another thread.

    Over a dataset of prompt pairs, ``stat`` picks what the table holds: ``"mean"`` (the
    default), ``"se"`` (the standard error of that mean) or ``"pair"`` (pair ``pair`` alone,
    labelled with its own tokens).
    """
    if stat == "mean":
        grid = result.grid(metric).float()
    else:
        per = result.grid(metric, per_pair=True).float()
        n = per.shape[-1]
        grid = per[..., pair] if stat == "pair" else (
            per.std(-1, unbiased=True) / n ** 0.5 if n > 1 else torch.zeros_like(per[..., 0]))
    if mask is not None:
        grid = grid.masked_fill(~mask.reshape(grid.shape), float("nan"))
    axes, shape = tuple(result.axes), tuple(result.shape)
    k = pair if stat == "pair" else 0
    clean = result.clean_str_tokens[k] if result.clean_str_tokens else None
    corrupted = result.corrupted_str_tokens[k] if result.corrupted_str_tokens else None

    def pos_cols(n: int) -> list[dict]:
        cols = []
        for p in range(n):
            tok = clean[p] if clean and p < len(clean) else str(p)
            col = {"pos": p, "label": _token_label(tok), "token": tok}
            if corrupted and p < len(corrupted):
                col["corrupted_token"] = corrupted[p]
                col["diff"] = corrupted[p] != tok
            cols.append(col)
        return cols

    if axes == ("layer", "pos"):
        rows = [{"layer": l, "label": str(l)} for l in range(shape[0])]
        return grid, rows, pos_cols(shape[1]), "layer", "position"
    if axes == ("layer", "head"):
        rows = [{"layer": l, "label": str(l)} for l in range(shape[0])]
        cols = [{"head": h, "label": str(h)} for h in range(shape[1])]
        return grid, rows, cols, "layer", "head"
    if axes in (("layer", "pos", "head"), ("layer", "head", "pos")):
        if axes == ("layer", "pos", "head"):
            grid = grid.permute(0, 2, 1)
        n_layers, n_heads, n_pos = grid.shape
        rows = [{"layer": l, "head": h, "label": f"L{l} H{h}"}
                for l in range(n_layers) for h in range(n_heads)]
        return grid.reshape(n_layers * n_heads, n_pos), rows, pos_cols(n_pos), "layer.head", "position"
    raise ValueError(f"the widget cannot draw a sweep with axes {axes}")


def _f32(values: torch.Tensor) -> bytes:
    return values.contiguous().numpy().astype("<f4").tobytes()


def sweep_progress(result, estimate=None) -> tuple[int, int, torch.Tensor | None]:
    """``(done, total, mask)`` of a sweep, read once from the result itself: ``mask`` is a
    copy of ``result.done`` (``None`` once complete). Before the first exact chunk (only the
    ``estimate``), nothing is done."""
    layout = result if result is not None else estimate
    total = len(layout.indices) * len(layout.sites)
    if result is None:
        return 0, total, None
    done = result.done
    if done is None:
        return total, total, None
    mask = done.clone()
    return int(mask.sum()), total, mask


def heatmap_payload(result, metric: str, inputs: dict, run_id: int, estimate=None,
                    state: str = "running", pair: int = -1) -> dict:
    """The ``heatmap`` traitlet: everything the front end needs to draw one metric.

    Its keys are :data:`~patchwidgets.widget_contract.HEATMAP_KEYS`, plus some of
    :data:`~patchwidgets.widget_contract.HEATMAP_OPTIONAL_KEYS` (the page's ``Heatmap`` typedef
    names the same ones); ``inputs`` is what the sweep read
    (:data:`~patchwidgets.widget_contract.SWEEP_FIELDS`).

    ``values`` is the row-major ``[rows, cols]`` table as little-endian float32 bytes
    (ipywidgets ships bytes as binary buffers; NaN marks cells not computed yet). ``done``
    and ``total`` count the cells with an exact value and all cells, read from the same
    snapshot as ``values`` (:func:`sweep_progress`); ``state`` is the sweep's own state when
    this picture was taken (``running``, ``done`` or ``cancelled``), so the page never has to
    pair a picture with a status that arrived in another message.

    ``estimate`` (an :class:`~patchwidgets.attribution.AttributionResult` of the same site,
    or ``None``) adds the fast preview: ``estimate`` holds its table in the same layout, and
    the page paints a cell from it, marked *approximate*, until ``values`` has the exact
    number. ``result`` may be ``None`` before the first exact chunk: the layout then comes
    from the estimate and every exact value is NaN. A path-patching sweep adds ``path``
    (its receivers, for words and captions) and names its axes after the senders.

    ``centre`` (``None`` except for a raw metric: ``logit_diff``, ``logit``, ``logprob``) is
    the unpatched target run's value that the colours are centred on, and the source run's
    value the range reaches (:func:`patchwidgets.widget_colour.centre`); the page reads it
    rather than working it out, since for one pair of a dataset it is that pair's own.
    """
    done, total, mask = sweep_progress(result, estimate)
    has_estimate = estimate is not None and metric in estimate.metrics
    layout = result if result is not None else estimate
    n_pairs = layout.n_pairs if hasattr(layout, "n_pairs") else 1
    one = 0 <= pair < n_pairs and n_pairs > 1 and result is not None
    values, rows, cols, row_title, col_title = table_2d(layout, metric, mask, "pair" if one else "mean", pair)
    if result is None:
        values = torch.full_like(values, float("nan"))
    baselines = {name: _finite(float(b[metric].float().mean())) if metric in b else None
                 for name, b in layout.baselines.items()}
    # A raw metric's colours are centred on the target run's value (that pair's, for one pair).
    centre = colours.centre(metric, layout.direction, layout.baselines, pair if one else None)
    payload = {
        "run_id": run_id,
        "site": layout.sites[0],
        "metric": metric,
        "direction": layout.direction,
        "rows": rows,
        "cols": cols,
        "row_title": row_title,
        "col_title": col_title,
        "values": _f32(values),
        "done": int(done),
        "total": int(total),
        "complete": bool(total > 0 and done >= total),
        "state": "done" if state == "running" and total > 0 and done >= total else state,
        "baselines": baselines,
        "centre": None if centre is None else centre.as_json(),
        "inputs": dict(inputs),
    }
    if isinstance(layout, PathPatchResult):
        recv = layout.receivers
        payload.update(site="path", row_title="sender layer", col_title="sender head", path={
            "label": layout.sites[0], "receiver_input": "".join(layout.receiver_input),
            "receivers": None if recv is None else [[int(l), int(h)] for l, h in recv]})
    if n_pairs > 1:  # a dataset: the mean over pairs, its standard error, or one pair alone
        payload["n_pairs"] = n_pairs
        payload["pair"] = pair if one else -1
        if result is not None and not one:
            payload["se"] = _f32(table_2d(result, metric, mask, "se")[0])
    if has_estimate and not one:
        payload["estimate"] = _f32(table_2d(estimate, metric)[0])
        payload["estimate_method"] = getattr(estimate, "method", "atp")
    return payload


def payload_values(payload: dict) -> torch.Tensor:
    """Decode ``payload["values"]`` back into a ``[rows, cols]`` float tensor."""
    raw = payload["values"]
    flat = torch.frombuffer(bytearray(bytes(raw)), dtype=torch.float32) if len(raw) else torch.zeros(0)
    return flat.reshape(len(payload["rows"]), len(payload["cols"]))


def payload_estimate(payload: dict) -> torch.Tensor | None:
    """Decode the fast preview's estimates (``payload["estimate"]``), or ``None``."""
    if not payload.get("estimate"):
        return None
    return payload_values({**payload, "values": payload["estimate"]})


def static_html(payload: dict | None, title: str) -> str:
    """A self-contained HTML table of the heatmap (no scripts), for exported notebooks: the
    same colours as the page (:mod:`patchwidgets.widget_colour`) over white, and a legend
    with five ticks (a raw metric's middle one marked as the target run's value) and what
    the colours and the high end mean."""
    esc = html.escape
    if not payload or not payload.get("rows"):
        return (f"<div><b>{esc(title)}</b><br><i>No heatmap yet: press Run in the widget, or "
                f"call <code>w.run(wait=True)</code>.</i></div>")
    values = payload_values(payload)
    metric = payload["metric"]
    centre = payload.get("centre")
    scale = colours.scale(metric, values.flatten().tolist(), None if not centre else colours.Centre(**centre))
    paint = lambda v: colours.over(scale.colour(v))  # noqa: E731
    cell = "padding:0;width:28px;height:18px;font-size:9px;text-align:center;color:#222"
    head = "".join(
        f'<th style="font-size:10px;font-weight:{"bold" if c.get("diff") else "normal"};'
        f'writing-mode:vertical-rl;transform:rotate(180deg)">{esc(c["label"])}</th>'
        for c in payload["cols"])
    body = []
    for r, row in enumerate(payload["rows"]):
        cells = "".join(
            f'<td style="{cell};background:{paint(float(v))}" title="{esc(colours.fmt(float(v), 4))}">'
            f'{"" if not math.isfinite(float(v)) else f"{float(v):.2f}".replace("-0.00", "0.00")}</td>'
            for v in values[r].tolist())
        body.append(f'<tr><th style="font-size:10px;text-align:right">{esc(row["label"])}</th>{cells}</tr>')
    status = "" if payload.get("complete") else f" (partial: {payload['done']}/{payload['total']} patches)"
    where = (payload.get("path") or {}).get("label") or payload["site"]
    marked = scale.centre_tick()
    legend = "".join(
        f'<span style="display:inline-block;padding:0 6px;background:{paint(v)}"'
        f'{" data-centre" if k == marked else ""}>{esc(text)}'
        f'{f" ({esc(scale.centre.run)} run)" if k == marked and scale.centre else ""}</span>'
        for k, (v, text) in enumerate(zip(scale.ticks(), scale.labels())))
    caption = (f"{payload['direction']} {esc(where)}, {esc(metric)}{status}")
    return (f'<div class="pw-static"><b>{esc(title)}</b><div style="font-size:11px">{caption}</div>'
            f'<div style="font-size:11px" data-legend="{scale.kind}">{esc(metric)}: {legend} '
            f'({esc(scale.words())})</div>'
            f'<table style="border-collapse:collapse"><tr><th>{esc(payload["row_title"])}</th>{head}</tr>'
            f'{"".join(body)}</table></div>')


def pattern_payload(patterns: dict[str, Any], layer: int, head: int) -> dict:
    """The ``pattern`` traitlet: head ``layer.head``'s attention on both prompts, as float32
    bytes (row = query position, column = key position)."""
    payload: dict[str, Any] = {"layer": layer, "head": head}
    for name in ("clean", "corrupted"):
        grids = patterns.get(name)
        if grids is None:
            continue
        if not (0 <= layer < grids.shape[0] and 0 <= head < grids.shape[1]):
            payload["error"] = f"no head {layer}.{head} in this model"
            continue
        grid = grids[layer, head]
        payload[name] = {"tokens": patterns["tokens"][name], "n": int(grid.shape[0]),
                         "values": grid.contiguous().numpy().astype("<f4").tobytes()}
    return payload
