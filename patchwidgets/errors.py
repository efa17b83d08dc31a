"""Errors raised on bad input.

Every check in patchwidgets raises one of these, never a silently wrong heatmap. They are all
``ValueError`` subclasses, so ``except ValueError`` catches them; the widget catches
:class:`PatchingInputError` and shows ``str(err)`` next to the field named by ``err.field``.
"""

from __future__ import annotations


class PatchingInputError(ValueError):
    """Base class for input problems; ``field`` names the input at fault.

    ``field`` is one of ``"clean"``, ``"corrupted"``, ``"answers"``, ``"site"``, ``"metrics"``,
    ``"direction"`` or ``None`` (no single field).
    """

    field: str | None = None

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        if field is not None:
            self.field = field


class EmptyPromptError(PatchingInputError):
    """A prompt is empty or only whitespace."""


class TokenLengthMismatchError(PatchingInputError):
    """Clean and corrupted prompts tokenise to different lengths, so positions do not line up."""

    field = "corrupted"


class PromptTooLongError(PatchingInputError):
    """A prompt has more tokens than the model's context window."""


class IdenticalPromptsError(PatchingInputError):
    """Clean and corrupted prompts are the same: every patch would be a no-op."""

    field = "corrupted"


class AnswerTokenError(PatchingInputError):
    """An answer is not exactly one token (or not a valid token id)."""

    field = "answers"


class UnknownSiteError(PatchingInputError):
    """The site name is not one patchwidgets knows, nor a hook of the model."""

    field = "site"


class UnknownMetricError(PatchingInputError):
    """A metric name is not one patchwidgets knows."""

    field = "metrics"


class DegenerateNormalizationError(PatchingInputError):
    """The normalised metric would divide by (almost) zero.

    Raised when the clean and corrupted runs give (nearly) the same logit difference: the
    gap that patching is supposed to close does not exist, so "fraction restored" is
    meaningless.
    """

    field = "corrupted"


class PatchingCancelled(RuntimeError):
    """Raised inside a sweep when its cancel event is set; ``partial`` holds the result so far."""

    def __init__(self, partial=None):
        super().__init__("patching sweep cancelled")
        self.partial = partial
