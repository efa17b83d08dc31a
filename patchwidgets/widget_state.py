"""What the widget offers, and one import point for its helpers.

The helpers live in modules by idea: :mod:`~patchwidgets.widget_payload` (the heatmap
traitlet and its static HTML), :mod:`~patchwidgets.widget_words` (explanations),
:mod:`~patchwidgets.widget_preview` (checking inputs before a sweep),
:mod:`~patchwidgets.widget_colour` (colours, legends, numbers) and
:mod:`~patchwidgets.widget_jobs` (the job thread and the sweep). They are re-exported here.
"""

from __future__ import annotations

INPUT_FIELDS = ("clean", "corrupted", "correct", "incorrect")

#: The sites the widget offers, grouped as in its component selector: ``(value, label)``.


SITE_GROUPS: list[tuple[str, list[tuple[str, str]]]] = [
    ("Residual stream and blocks (layer x position)", [
        ("resid_pre", "residual stream (before each layer)"),
        ("resid_mid", "residual stream (between attention and MLP)"),
        ("resid_post", "residual stream (after each layer)"),
        ("attn_out", "attention output"),
        ("mlp_out", "MLP output"),
    ]),
    ("Attention heads, all positions (layer x head)", [
        ("head_out", "head outputs (z)"),
        ("head_q", "head queries (q)"),
        ("head_k", "head keys (k)"),
        ("head_v", "head values (v)"),
        ("head_pattern", "head attention patterns"),
    ]),
    ("Attention heads, by position (layer.head x position)", [
        ("head_out_by_pos", "head outputs (z) by position"),
        ("head_q_by_pos", "head queries (q) by position"),
        ("head_k_by_pos", "head keys (k) by position"),
        ("head_v_by_pos", "head values (v) by position"),
        ("head_pattern_by_pos", "head patterns by destination position"),
    ]),
    ("Paths between heads (sender layer x sender head)", [
        ("path", "path patching: senders \u2192 receivers"),
    ]),
]


WIDGET_SITES = [value for _, options in SITE_GROUPS for value, _ in options]

#: What each site patches, as a phrase: ``{layer}``, ``{head}`` are filled in.


from .widget_payload import (  # noqa: E402,F401
    heatmap_payload, pattern_payload, payload_estimate, payload_values, static_html, sweep_progress, table_2d,
)
from .widget_preview import (  # noqa: E402,F401
    Preview, empty_prompt_message, field_of, length_message, preview, quiet_load, same_answers_message,
)
from .widget_words import METRIC_WORDS, describe_cell, describe_path, explain_cell  # noqa: E402,F401
