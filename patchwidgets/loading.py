"""Load models as TransformerLens ``TransformerBridge`` objects.

Two kinds of name are understood:

* **Bundled** models ship inside the package, in standard Hugging Face
  format, under ``patchwidgets/models/<name>/`` (see :func:`list_models`).
  They load offline, in well under a second. Today there is one,
  ``"toy-ioi"``: a 4-layer GPT-2 trained on a synthetic world of
  indirect-object sentences and landmark facts (its ``MODEL_CARD.md`` has
  the details).
* **Anything else** (``"gpt2"``, ``"EleutherAI/pythia-70m"``, a local
  directory, ...) goes to ``TransformerBridge.boot_transformers``, which
  downloads from the Hugging Face Hub unless the files are cached.

How a bundled model is booted
-----------------------------
``boot_transformers`` can wrap a model we have already loaded
(``hf_model=``) instead of fetching one, which is what keeps this offline::

    tok = AutoTokenizer.from_pretrained(path)
    hf = GPT2LMHeadModel.from_pretrained(path)
    bridge = TransformerBridge.boot_transformers(str(path), hf_model=hf, tokenizer=tok)

Two details matter. The bridge does not move a pre-loaded model, so we move
it to ``device`` first. And during boot TransformerLens *re-loads* the
tokenizer from its ``name_or_path`` (to be sure it prepends BOS), so the
strict tokenizer (:func:`patchwidgets.tokenizer.make_strict`) has to be
applied to ``bridge.tokenizer`` after booting, not to ``tok``.
"""
from __future__ import annotations

import contextlib
import os
import socket
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing transformer_lens takes seconds; only do it when loading
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["ModelNotAvailableError", "list_models", "model_path", "load_model"]

#: Where bundled checkpoints live: one directory per model name.
MODELS_DIR = Path(__file__).resolve().parent / "models"


class ModelNotAvailableError(RuntimeError):
    """A model name that is neither bundled nor loadable from the Hub.

    Attributes:
        name: the requested model name.
        bundled: the names that would have loaded offline.
        offline: whether the failure looked like having no Hub access.
    """

    def __init__(self, message: str, *, name: str, bundled: list[str], offline: bool):
        super().__init__(message)
        self.name = name
        self.bundled = bundled
        self.offline = offline


def list_models() -> list[str]:
    """Names of the models bundled with the package (load without internet)."""
    if not MODELS_DIR.is_dir():
        return []
    return sorted(p.name for p in MODELS_DIR.iterdir() if (p / "config.json").is_file())


def model_path(name: str) -> Path:
    """Directory of the bundled model ``name`` (raises KeyError if not bundled)."""
    if name not in list_models():
        raise KeyError(f"{name!r} is not a bundled model; bundled: {list_models()}")
    return MODELS_DIR / name


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _looks_offline(exc: BaseException) -> bool:
    """Whether ``exc`` (or anything it was raised from) means "no Hub access"."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
        offline_types: tuple[type, ...] = (LocalEntryNotFoundError, OfflineModeIsEnabled,
                                           ConnectionError, TimeoutError)
    except ImportError:  # very old huggingface_hub
        offline_types = (ConnectionError, TimeoutError)
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc).lower()
        if (isinstance(exc, offline_types) or "couldn't connect" in text
                or "offline" in text or "connection" in text):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                    "ALL_PROXY", "all_proxy")


def _hub_unreachable(timeout: float = 3.0) -> bool:
    """True if a TCP connection to the Hub clearly fails (no DNS, no route).

    Without this, huggingface_hub retries for ~25 s before giving up. Behind
    a proxy a direct connection proves nothing, so then we never claim
    "unreachable" and leave it to huggingface_hub.
    """
    if any(os.environ.get(var) for var in _PROXY_VARIABLES):
        return False
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError:
        return True
    return False


@contextlib.contextmanager
def _hub_offline_mode():
    """Temporarily put huggingface_hub in offline mode: cache only, no retries.

    Same effect as ``HF_HUB_OFFLINE=1``, which huggingface_hub only reads
    when it is imported; ``is_offline_mode()`` reads this module constant.
    """
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _not_available(name: str, exc: BaseException,
                   hub_unreachable: bool = False) -> ModelNotAvailableError:
    bundled = list_models()
    offline = hub_unreachable or _looks_offline(exc)
    if offline:
        reason = ("the Hugging Face Hub cannot be reached (this machine seems "
                  "to be offline, or HF_HUB_OFFLINE is set) and it is not in "
                  "the local cache")
    else:
        reason = "it is not a bundled model, a local checkpoint, or a Hub model id"
    message = (f"Cannot load model {name!r}: {reason}. Bundled models, which "
               f"load offline: {', '.join(repr(b) for b in bundled) or 'none'} "
               f"(see patchwidgets.list_models()). Original error: "
               f"{type(exc).__name__}: {exc}")
    return ModelNotAvailableError(message, name=name, bundled=bundled, offline=offline)


@contextlib.contextmanager
def _quiet_progress_bars():
    """Temporarily switch off transformers' tqdm bars, restoring the setting after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _load_bundled(name: str, device: str) -> "TransformerBridge":
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformer_lens.model_bridge import TransformerBridge

    from .tokenizer import make_strict

    path = model_path(name)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    with _quiet_progress_bars():  # no "Loading weights" bar for a 3 MB file
        hf_model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    hf_model = hf_model.to(device).eval()
    bridge = TransformerBridge.boot_transformers(
        str(path), hf_model=hf_model, tokenizer=tokenizer, device=device)
    bridge.eval()
    make_strict(bridge.tokenizer, vocabulary_name=name)
    return bridge


def load_model(name: str = "toy-ioi", device: str | None = None) -> "TransformerBridge":
    """Load ``name`` as a ``TransformerBridge`` in eval mode.

    Args:
        name: a bundled model (see :func:`list_models`; default
            ``"toy-ioi"``), or anything ``TransformerBridge.boot_transformers``
            accepts, such as ``"gpt2"`` (needs the Hub or its cache).
        device: ``"cpu"``, ``"cuda"``, ...; ``None`` picks ``"cuda"`` when
            available, else ``"cpu"``.

    Returns:
        A fresh bridge on every call (nothing is cached: patching experiments
        sometimes edit weights, and a bundled model boots in well under a
        second). Bundled word-level models get a strict tokenizer, which
        raises :class:`patchwidgets.tokenizer.UnknownWordError` for unknown
        words instead of silently using ``[UNK]``.

    Raises:
        ModelNotAvailableError: the model is neither bundled nor loadable
            (typically: no internet). Its message lists the bundled names.
    """
    device = device or _default_device()
    if name in list_models():
        return _load_bundled(name, device)

    from transformer_lens.model_bridge import TransformerBridge

    # Offline, cached models still load; uncached ones fail at once.
    offline = not Path(name).exists() and _hub_unreachable()
    try:
        with _hub_offline_mode() if offline else contextlib.nullcontext():
            bridge = TransformerBridge.boot_transformers(name, device=device)
    except OSError as exc:  # transformers reports missing files / no network as OSError
        raise _not_available(name, exc, offline) from exc
    except Exception as exc:  # huggingface_hub / requests errors that are not OSErrors
        if offline or _looks_offline(exc):
            raise _not_available(name, exc, offline) from exc
        raise
    bridge.eval()
    return bridge
