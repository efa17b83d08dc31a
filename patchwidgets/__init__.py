"""patchwidgets: learn and perform activation patching.

The public API, in the order a learner meets it::

    model = patchwidgets.load_model()          # the bundled toy-ioi model, offline
    result = patchwidgets.patch(model, clean, corrupted, answers=(" John", " Mary"))
    result.frame; result.grid("normalized"); result.figure("normalized")
    patchwidgets.path_patch(model, clean, corrupted, answers, receivers=[(2, 3)])   # how heads connect
    patchwidgets.attribution_patch(model, clean, corrupted, answers, site="head_out")  # fast estimate
    scores = patchwidgets.edge_attribution(model, clean, corrupted, answers, method="eap-ig")  # every edge
    patchwidgets.faithfulness_curve(model, clean, corrupted, answers, scores=scores, ks=[10, 100, 1000])
    patchwidgets.draw_circuit(scores, k=30)    # the strongest edges, drawn by layer
    patchwidgets.PatchingWidget(model)         # the interactive widget (site="circuit": the circuit view)
"""

from __future__ import annotations

from .display import rounded

# (Imported now, not lazily: the function has its module's name, and importing the module
# (edge_patching does) would otherwise leave `patchwidgets.edge_attribution` the module.)
from .edge_attribution import EdgeScores, edge_attribution
from .errors import (
    AnswerTokenError,
    DegenerateNormalizationError,
    EmptyPromptError,
    IdenticalPromptsError,
    PatchingCancelled,
    PatchingInputError,
    PromptTooLongError,
    TokenLengthMismatchError,
    UnknownMetricError,
    UnknownSiteError,
)
from .metrics import BUILTIN_METRICS
from .patching import PatchUpdate, patch
from .results import PatchResult
from .sharing import exclusive
from .sites import site_names

__version__ = "0.1.0"

_LAZY = {
    "load_model": ".loading",
    "list_models": ".loading",
    "ModelNotAvailableError": ".loading",
    "UnknownWordError": ".tokenizer",
    "PatchingWidget": ".widget",
    "draw_circuit": ".circuit_view",
    "ShortcutWarning": ".engine",
    "path_patch": ".path_patching",
    "PathPatchResult": ".path_patching",
    "attribution_patch": ".attribution",
    "AttributionResult": ".attribution",
    "edge_patch": ".edge_patching",
    "edge_patches": ".edge_patching",
    "faithfulness": ".edge_patching",
    "faithfulness_curve": ".edge_patching",
    "Graph": ".edges",
    "Edge": ".edges",
    "Node": ".edges",
}


def __getattr__(name: str):
    # Heavy or optional pieces load on first use, so `import patchwidgets` stays fast.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'patchwidgets' has no attribute {name!r}")


__all__ = [
    "patch", "PatchResult", "PatchUpdate", "site_names", "exclusive", "BUILTIN_METRICS", "rounded", *_LAZY,
    "edge_attribution", "EdgeScores",
    "PatchingInputError", "EmptyPromptError", "TokenLengthMismatchError", "PromptTooLongError",
    "IdenticalPromptsError", "AnswerTokenError", "UnknownSiteError", "UnknownMetricError",
    "DegenerateNormalizationError", "PatchingCancelled",
]
