"""Colours, legends and numbers of the widget's heatmap: one definition, two implementations.

The page (``static/widget.js``) and the exported picture (:func:`patchwidgets.widget_state.static_html`)
draw the same heatmap, so both follow the rules below, and ``tests/shared/widget_cases.json``
holds cases that the Python tests and the JavaScript unit tests both check.

* A **diverging** metric (signed, 0 = no effect: ``logit_diff``, ``normalized``, ``logit``) is
  drawn blue above 0 and red below, symmetric around 0; ``normalized`` spans at least -1..1.
* A **sequential** metric (one sign: ``prob``, ``rank``, ``kl``, ``accuracy``, ``logprob``) is
  drawn in one hue, light at the low end of its range and dark at the high end; the range
  covers the data and the metric's natural bounds (``prob`` 0..1, ``rank`` from 1, ...).
* A colour is ``(r, g, b, alpha)``: the hue at full strength and how much of it to lay over
  the background, so "no effect" is the theme's own background (light or dark), never a
  glaring white. :func:`over` mixes it with a background for places without transparency.
* The legend has five labelled ticks, and the metric registry's ``high_means`` says what
  its high end means (for ``rank``, "worse").
"""

from __future__ import annotations

import math
from decimal import ROUND_HALF_UP, Decimal
from typing import Iterable

from .metrics import METRICS

RED, BLUE, PURPLE = (178, 24, 43), (33, 102, 172), (84, 39, 143)
#: The natural bounds of the sequential metrics: a range always includes them.
ANCHORS: dict[str, tuple[float | None, float | None]] = {
    "prob": (0.0, 1.0), "accuracy": (0.0, 1.0), "kl": (0.0, None), "rank": (1.0, None), "logprob": (None, 0.0),
}


def scale_kind(metric: str) -> str:
    """``"diverging"`` or ``"sequential"``, from the metric registry (custom metrics: diverging)."""
    info = METRICS.get(metric)
    return info.scale if info is not None else "diverging"


def domain(metric: str, values: Iterable[float]) -> tuple[float, float]:
    """The ``(lo, hi)`` range the colours span for ``values`` (NaN ignored)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if scale_kind(metric) == "diverging":
        top = max((abs(v) for v in finite), default=0.0)
        if metric == "normalized":
            top = max(top, 1.0)
        top = top or 1.0
        return -top, top
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    low, high = ANCHORS.get(metric, (None, None))
    lo = lo if low is None else min(lo, low)
    hi = hi if high is None else max(hi, high)
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def colour(value: float | None, lo: float, hi: float, kind: str) -> tuple[int, int, int, float] | None:
    """The colour of ``value`` on a scale ``lo..hi`` of ``kind``; ``None`` for a missing value."""
    if value is None or not math.isfinite(value):
        return None
    if kind == "diverging":
        top = max(abs(lo), abs(hi)) or 1.0
        t = max(-1.0, min(1.0, value / top))
        return (*(BLUE if t > 0 else RED), round(abs(t), 3))
    t = max(0.0, min(1.0, (value - lo) / (hi - lo))) if hi > lo else 0.0
    return (*PURPLE, round(t, 3))


def _round(x: float) -> int:
    """Round half up, as JavaScript's Math.round does (Python's round() goes to even)."""
    return math.floor(x + 0.5)


def over(rgba: tuple[int, int, int, float] | None, background: tuple[int, int, int] = (255, 255, 255),
         missing: str = "#e0e0e0") -> str:
    """``rgba`` laid over ``background``, as ``#rrggbb`` (``missing`` for ``None``)."""
    if rgba is None:
        return missing
    *rgb, a = rgba
    r, g, b = (_round(bg + (c - bg) * a) for c, bg in zip(rgb, background))
    return f"#{r:02x}{g:02x}{b:02x}"


def _significant(x: float, digits: int) -> Decimal:
    """``x`` to ``digits`` significant digits, ties away from zero (JavaScript's toPrecision)."""
    d = Decimal(x)
    return d.quantize(Decimal(1).scaleb(d.adjusted() - digits + 1), rounding=ROUND_HALF_UP)


def fmt(x: float | None, digits: int = 3) -> str:
    """A number for people, written exactly as the page writes it (``String(Number(
    x.toPrecision(digits)))``, or ``x.toExponential(2)`` below 1e-3): ``n/a`` when missing."""
    if x is None or not math.isfinite(x):
        return "n/a"
    if x == 0:
        return "0"
    if abs(x) < 1e-3:
        d = _significant(x, 3)
        mantissa = d.scaleb(-d.adjusted())
        return f"{mantissa:.2f}e{d.adjusted():+d}"
    y = float(_significant(x, digits))
    text = repr(y)
    if "e" in text:
        text = f"{y:f}"
    return text[:-2] if text.endswith(".0") else text


def ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """``n`` evenly spaced legend ticks from ``lo`` to ``hi`` (both ends included)."""
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def legend_words(metric: str) -> str:
    """What the high end of the scale means, from the registry."""
    info = METRICS.get(metric)
    return f"high: {info.high_means}" if info is not None else ""
