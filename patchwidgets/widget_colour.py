"""Colours, legends and numbers of every heatmap: one definition, two implementations.

The page (``static/widget.js``), the exported picture (:func:`patchwidgets.widget_payload.static_html`)
and the plotly figure (:func:`patchwidgets.plotting.heatmap_figure`) draw the same heatmaps, so
all three follow the rules below (:func:`scale` here, its twin in ``widget.js``), and
``tests/shared/widget_cases.json`` holds cases that the Python tests and the JavaScript unit
tests both check.

* **"No effect" is never coloured.** What a patch that changed nothing gives depends on the
  metric, and that value is drawn as the background:

  - a **raw** metric (:data:`RAW`: ``logit_diff``, ``logit``, ``logprob``) is coloured by its
    *change from the unpatched target run* (the corrupted run when denoising, the clean run
    when noising): the target run's own value is the neutral middle, blue above it, red below,
    and the range reaches at least the source run's value, so a patch that moves the answer
    all the way gets full colour and a patch that moves it by rounding stays pale. (Centred
    on 0 instead, a corrupted run at logit difference -0.62 painted every untouched cell deep
    red.) The legend marks the middle tick as that run's value.
  - ``normalized`` is already 0 at no effect: blue above 0, red below, spanning at least -1..1.
  - a **sequential** metric (one sign: ``prob``, ``rank``, ``kl``, ``accuracy``) is drawn in
    one hue from its natural bound (:data:`ANCHORS`: ``prob``, ``kl``, ``accuracy`` from
    exactly 0, ``rank`` from 1), light there and dark at the other end. Values past the bound
    are float noise (a KL of -5e-8), so the range starts at the bound exactly: never a
    negative tick on a metric that cannot be negative.
  - a custom metric is drawn like ``normalized`` (around 0, without the -1..1 floor).

* A colour is ``(r, g, b, alpha)``: the hue at full strength and how much of it to lay over
  the background, so "no effect" is the theme's own background (light or dark), never a
  glaring white. :func:`over` mixes it with a background for places without transparency.
* The legend has five labelled ticks (for a centred scale: both ends, the middle and the
  halfway points), with as many digits as it takes to tell them apart, and the registry's
  ``high_means`` says what the high end means (for ``rank``, "worse").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Iterable, Mapping

from .metrics import METRICS

RED, BLUE, PURPLE = (178, 24, 43), (33, 102, 172), (84, 39, 143)
#: The natural bounds of the metrics: a sequential range starts at them exactly, and a
#: centred range never reaches past them (``logprob`` is at most 0).
ANCHORS: dict[str, tuple[float | None, float | None]] = {
    "prob": (0.0, 1.0), "accuracy": (0.0, 1.0), "kl": (0.0, None), "rank": (1.0, None), "logprob": (None, 0.0),
}
#: Metrics whose "no effect" is the unpatched target run's own value, not 0.
RAW = ("logit_diff", "logit", "logprob")


def scale_kind(metric: str) -> str:
    """``"diverging"`` or ``"sequential"``, from the metric registry (custom metrics: diverging).
    A raw metric coloured around its target run (a :class:`Centre`) is always diverging."""
    info = METRICS.get(metric)
    return info.scale if info is not None else "diverging"


@dataclass(frozen=True)
class Centre:
    """The middle of a raw metric's colours: the unpatched target run's value."""

    value: float                 # drawn as the background: what a patch that changed nothing gives
    run: str                     # whose value it is: "corrupted" (denoising) or "clean" (noising)
    source: float | None = None  # the source run's value: the range reaches at least this far
    source_run: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The ``centre`` field of the widget's heatmap payload (what ``widget.js`` reads)."""
        return {"value": self.value, "run": self.run, "source": self.source, "source_run": self.source_run}


def target_and_source(direction: str) -> tuple[str, str]:
    """The names of the run being patched and the run the activations come from."""
    return ("clean", "corrupted") if direction == "noising" else ("corrupted", "clean")


def centre(metric: str, direction: str, baselines: Mapping[str, Mapping[str, Any]],
           pair: int | None = None) -> Centre | None:
    """Where ``metric``'s colours are centred, from a result's ``baselines`` (``{run: {metric:
    [batch] tensor}}``): the target run's value (its mean over prompt pairs, or pair ``pair``'s
    own), or ``None`` for a metric centred on 0 or drawn from its bound."""
    if metric not in RAW:
        return None
    target, source = target_and_source(direction)

    def value(run: str) -> float | None:
        b = baselines.get(run, {}).get(metric)
        if b is None:
            return None
        x = float(b.float().mean() if pair is None else b.float()[pair])
        return x if math.isfinite(x) else None

    mid = value(target)
    if mid is None:
        return None
    far = value(source)
    return Centre(mid, target, far, source if far is not None else None)


def domain(metric: str, values: Iterable[float], mid: float | None = None,
           source: float | None = None) -> tuple[float, float]:
    """The ``(lo, hi)`` range the colours span for ``values`` (NaN ignored).

    ``mid`` (a raw metric's target-run value) centres a diverging range on it, reaching at
    least ``source``; the metric's :data:`ANCHORS` cut it (``logprob`` never above 0)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    low, high = ANCHORS.get(metric, (None, None))
    if mid is not None or scale_kind(metric) == "diverging":
        c = 0.0 if mid is None else mid
        reach = finite + ([source] if source is not None and math.isfinite(source) else [])
        top = max((abs(v - c) for v in reach), default=0.0)
        if metric == "normalized":
            top = max(top, 1.0)
        top = top or 1.0
        lo, hi = c - top, c + top
        if low is not None:
            lo = min(max(lo, low), c)
        if high is not None:
            hi = max(min(hi, high), c)
        return lo, hi
    lo = low if low is not None else min(finite, default=0.0)
    hi = high if high is not None else max(finite, default=1.0)
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def colour(value: float | None, lo: float, hi: float, kind: str,
           mid: float = 0.0) -> tuple[int, int, int, float] | None:
    """The colour of ``value`` on a scale ``lo..hi`` of ``kind`` (diverging: around ``mid``);
    ``None`` for a missing value."""
    if value is None or not math.isfinite(value):
        return None
    if kind == "diverging":
        top = max(mid - lo, hi - mid) or 1.0
        t = max(-1.0, min(1.0, (value - mid) / top))
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


def ticks(lo: float, hi: float, n: int = 5, mid: float | None = None) -> list[float]:
    """``n`` evenly spaced legend ticks from ``lo`` to ``hi`` (both ends included); with a
    ``mid`` strictly inside (a centred scale), five ticks: the ends, ``mid`` and the points
    halfway to it, so the neutral value is always a tick of its own."""
    if mid is not None and n == 5 and lo < mid < hi:
        return [lo, (lo + mid) / 2, mid, (mid + hi) / 2, hi]
    return [lo + (hi - lo) * i / (n - 1) if i < n - 1 else hi for i in range(n)]


def tick_labels(values: list[float], digits: int = 2) -> list[str]:
    """The legend's tick labels: ``digits`` significant digits, or more until no two read the
    same (a narrow range around -0.621 needs -0.626 and -0.616, not -0.63 twice)."""
    labels = [fmt(v, digits) for v in values]
    while len(set(labels)) < len(labels) and digits < 7:
        digits += 1
        labels = [fmt(v, digits) for v in values]
    return labels


def legend_words(metric: str) -> str:
    """What the high end of the scale means, from the registry."""
    info = METRICS.get(metric)
    return f"high: {info.high_means}" if info is not None else ""


@dataclass(frozen=True)
class Scale:
    """One heatmap's colour scale: ``kind``, the range ``lo..hi`` and, for a raw metric, the
    :class:`Centre` drawn as the background. Build it with :func:`scale`."""

    metric: str
    kind: str
    lo: float
    hi: float
    centre: Centre | None = None

    @property
    def mid(self) -> float | None:
        """The value drawn as the background on a diverging scale (``None`` on a sequential one)."""
        if self.kind != "diverging":
            return None
        return self.centre.value if self.centre is not None else 0.0

    def colour(self, value: float | None) -> tuple[int, int, int, float] | None:
        return colour(value, self.lo, self.hi, self.kind, self.mid or 0.0)

    def ticks(self) -> list[float]:
        return ticks(self.lo, self.hi, mid=self.mid)

    def labels(self) -> list[str]:
        """The five tick labels, numbers only (:func:`tick_labels`; 3 digits around a target
        run's value, so its own tick reads as the baselines line does: -10.4, not -10)."""
        return tick_labels(self.ticks(), 2 if self.centre is None else 3)

    def centre_tick(self) -> int | None:
        """Which tick is the target run's value (``None`` when the scale is not centred on one)."""
        if self.centre is None:
            return None
        values = self.ticks()
        return values.index(self.centre.value) if self.centre.value in values else None

    def words(self) -> str:
        """What the colours mean, for people: the centre (if any), then what high means."""
        parts = []
        if self.centre is not None:
            c = self.centre
            reach = (f"; the scale spans at least the {c.source_run} run's {fmt(c.source)}"
                     if c.source is not None else "")
            parts.append(f"colour = change from the unpatched {c.run} run ({self.metric} {fmt(c.value)}): "
                         f"blue higher, red lower{reach}")
        high = legend_words(self.metric)
        if high:
            parts.append(high)
        return "; ".join(parts)


def scale(metric: str, values: Iterable[float], centre: Centre | None = None) -> Scale:
    """The colour scale of ``metric`` for ``values``, centred on ``centre`` (from
    :func:`centre`) when given: the one rule behind the page, the exported copy and the figure."""
    kind = "diverging" if centre is not None else scale_kind(metric)
    lo, hi = domain(metric, values, None if centre is None else centre.value,
                    None if centre is None else centre.source)
    return Scale(metric, kind, lo, hi, centre)
