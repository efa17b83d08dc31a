"""Attention patterns drawn by circuitsvis, offline, without a megabyte of script per cell.

circuitsvis (the attention views learners know from ARENA) ships its whole front end as one
bundled script, ``circuitsvis/dist/cdn/iife.js`` (about 1.3 MB). Its own ``_repr_html_`` first
probes the internet (a request to google.com with a one-second timeout) and then inlines that
script into *every* output, or imports it from a CDN when online. This module does neither:

* :func:`load` displays the bundled script once per notebook (a classic ``<script>``, which
  defines ``window.CircuitsVis``). When the first view is shown, the loader's stored output is
  replaced by a one-line note (``update_display``): the script has already run in the live
  page, and the saved notebook stays small.
* :func:`attention_heads` returns an :class:`AttentionView` whose HTML is a few kilobytes: an
  empty ``div`` (with a line of text saying how to see the view), the props as JSON and a call
  to ``CircuitsVis.render``. If the script is not loaded yet, the call waits in a queue that
  the loader empties.
* :meth:`AttentionView.to_html` with ``standalone=True`` (or :meth:`AttentionView.save`) writes
  one self-contained HTML file that renders with no network at all.

Nothing here refers to an ``http(s)`` URL; the bundled script itself fetches nothing.

Usage in a notebook::

    from patchwidgets import attention_view
    attention_view.load()                    # once, near the top
    ...
    attention_view.attention_heads(cache["blocks.0.attn.hook_pattern"][0, :4], tokens,
                                   head_names=["L0H0", "L0H1", "L0H2", "L0H3"])
"""
from __future__ import annotations

import html
import json
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

__all__ = ["load", "attention_heads", "AttentionView", "script_html", "bundled_script_path"]

#: Name of the queue that views waiting for the script push their draw functions onto.
_QUEUE = "__patchwidgetsCircuitsVis"
#: Display id of the loader output, while it still holds the whole script (None otherwise).
_pending_loader: str | None = None


def bundled_script_path() -> Path:
    """Path of circuitsvis's bundled front end (``dist/cdn/iife.js``)."""
    import circuitsvis

    path = Path(circuitsvis.__file__).resolve().parent / "dist" / "cdn" / "iife.js"
    if not path.is_file():
        raise FileNotFoundError(f"circuitsvis is installed without its bundled script ({path})")
    return path


@lru_cache(maxsize=1)
def _bundled_script() -> str:
    # A "</script" inside the code would end the inline element early.
    return bundled_script_path().read_text(encoding="utf-8").replace("</script", "<\\/script")


def script_html() -> str:
    """One classic ``<script>`` element: the bundled circuitsvis, then the queue of waiting views.

    A classic script (not ``type="module"``) makes the bundle's top-level ``var CircuitsVis``
    a global, so views rendered in later cells can use it.
    """
    flush = (f"window.CircuitsVis = CircuitsVis;"
             f"var waiting = window.{_QUEUE} || [];"
             f"window.{_QUEUE} = {{push: function (draw) {{ draw(); }}}};"
             f"waiting.forEach(function (draw) {{ draw(); }});")
    return f"<script>\n{_bundled_script()}\n;(function () {{ {flush} }})();\n</script>"


_LOADED_NOTE = ("<div style='font-size: small; color: #666'>circuitsvis loaded for this page "
                "(its script is not stored in the notebook; run this cell again after reopening)</div>")


def load() -> None:
    """Display the bundled circuitsvis script once, for every attention view in this notebook.

    Call it in a cell of its own before the first view. The first view shown afterwards
    replaces this cell's output by a one-line note, so the saved notebook does not keep the
    script (in the live page it has already run).
    """
    global _pending_loader
    from IPython.display import HTML, display

    display_id = f"patchwidgets-circuitsvis-{secrets.token_hex(4)}"
    display(HTML(script_html()), display_id=display_id)
    _pending_loader = display_id


def _shrink_loader() -> None:
    global _pending_loader
    if _pending_loader is None:
        return
    from IPython.display import HTML, update_display

    update_display(HTML(_LOADED_NOTE), display_id=_pending_loader)
    _pending_loader = None


def _to_nested_list(values: Any, decimals: int) -> Any:
    """A tensor / array / nested list of numbers as nested Python lists, rounded."""
    if hasattr(values, "detach"):  # torch tensor, possibly on a GPU
        values = values.detach().float().cpu().numpy()
    if hasattr(values, "tolist"):
        values = values.tolist()
    if isinstance(values, (list, tuple)):
        return [_to_nested_list(v, decimals) for v in values]
    return round(float(values), decimals)


class AttentionView:
    """A circuitsvis ``AttentionHeads`` view: displays itself in Jupyter, or writes an HTML file."""

    def __init__(self, props: dict[str, Any]):
        self.props = props
        self.element_id = f"patchwidgets-attention-{secrets.token_hex(6)}"

    def _props_json(self) -> str:
        # "</" cannot appear inside an inline script; JSON allows the escaped form.
        return json.dumps(self.props, separators=(",", ":")).replace("</", "<\\/")

    def _view_html(self) -> str:
        names = ", ".join(self.props.get("attentionHeadNames") or [])
        hint = (f"Interactive attention view ({html.escape(names)}): it appears when this cell runs "
                f"in a notebook where <code>attention_view.load()</code> ran first.")
        draw = (f"var draw = function () {{ var el = document.getElementById('{self.element_id}');"
                f" if (!el) {{ return; }} el.innerHTML = '';"
                f" CircuitsVis.render('{self.element_id}', CircuitsVis.AttentionHeads, {self._props_json()}); }};"
                f" if (window.CircuitsVis && window.CircuitsVis.render) {{ draw(); }}"
                f" else {{ (window.{_QUEUE} = window.{_QUEUE} || []).push(draw); }}")
        return (f"<div id='{self.element_id}' class='patchwidgets-attention' style='margin: 10px 0'>"
                f"<div style='font-size: small; color: #666'>{hint}</div></div>\n"
                f"<script>(function () {{ {draw} }})();</script>")

    def to_html(self, standalone: bool = False) -> str:
        """The view's HTML. ``standalone=True``: a whole page with the script inlined (offline)."""
        if not standalone:
            return self._view_html()
        return ("<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>attention</title></head>"
                f"<body>\n{script_html()}\n{self._view_html()}\n</body></html>")

    def save(self, path: str | Path) -> Path:
        """Write a self-contained HTML page (open it in any browser, no internet needed)."""
        path = Path(path)
        path.write_text(self.to_html(standalone=True), encoding="utf-8")
        return path

    def _repr_html_(self) -> str:
        _shrink_loader()
        return self._view_html()

    def __repr__(self) -> str:
        names = self.props.get("attentionHeadNames") or []
        return f"AttentionView(heads={names}, tokens={len(self.props['tokens'])})"


def attention_heads(
    attention: Any,
    tokens: Sequence[str],
    head_names: Sequence[str] | None = None,
    *,
    max_value: float | None = None,
    min_value: float | None = None,
    decimals: int = 3,
) -> AttentionView:
    """circuitsvis's ``AttentionHeads`` view: one small heatmap per head, click one to enlarge.

    Args:
        attention: ``[n_heads, query_pos, key_pos]`` (or ``[query_pos, key_pos]`` for one head):
            a tensor (any device), array or nested list.
        tokens: the token strings, one per position.
        head_names: a label per head (default: circuitsvis's "Head 0", "Head 1", ...).
        max_value, min_value: the colour scale's ends (circuitsvis's defaults when None).
        decimals: rounding of the stored values (keeps the HTML small).
    """
    values = _to_nested_list(attention, decimals)
    if values and not isinstance(values[0][0], list):  # one head
        values = [values]
    n_heads, n_tokens = len(values), len(tokens)
    if any(len(head) != n_tokens or any(len(row) != n_tokens for row in head) for head in values):
        raise ValueError(f"attention must be [n_heads, {n_tokens}, {n_tokens}] for {n_tokens} tokens")
    if head_names is not None and len(head_names) != n_heads:
        raise ValueError(f"{len(head_names)} head names for {n_heads} heads")
    props: dict[str, Any] = {"attention": values, "tokens": [str(t) for t in tokens]}
    if head_names is not None:
        props["attentionHeadNames"] = [str(n) for n in head_names]
    if max_value is not None:
        props["maxValue"] = max_value
    if min_value is not None:
        props["minValue"] = min_value
    return AttentionView(props)
