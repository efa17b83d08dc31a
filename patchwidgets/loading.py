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
Like any local checkpoint: its folder goes to ``boot_transformers`` as the name, with every
option of :func:`load_model` (``device``, ``dtype``, ``device_map``, ...), so bundled and
downloaded models accept the same options. A folder path never touches the Hub; the Hub is
put in offline mode for the call anyway. The tokenizer is read from the folder first and
handed over, and the strict tokenizer (:func:`patchwidgets.tokenizer.make_strict`) is
applied to ``bridge.tokenizer`` after booting: during boot TransformerLens configures (and
may re-load) the tokenizer, so the object we passed in is not necessarily the one it keeps.

Big models: splitting and offloading
------------------------------------
``device_map``, ``n_devices``, ``max_memory`` and ``offload_folder`` are Hugging Face's
(accelerate's) placement options, passed through ``boot_transformers``::

    load_model("meta-llama/Llama-3.1-8B", dtype=torch.bfloat16, n_devices=2)   # two GPUs
    load_model(path, device_map={"model.embed_tokens": "cpu", "model.layers.0": "cpu",
                                 ..., "model.layers.31": "disk", "model.norm": "disk",
                                 "lm_head": "disk"}, offload_folder="/scratch/offload")

Modules mapped to ``"disk"`` keep their weights in ``offload_folder`` and on the ``meta``
device in memory; accelerate loads them for the duration of each module's forward call
(:func:`patchwidgets.devices.materialized` does the same for code that reads a weight). The
peak memory is then about one block's weights plus the activations; every forward pass reads
the offloaded blocks from disk again. ``cfg.device`` is set to the embedding's execution
device (TransformerLens would record ``meta`` for an offloaded embedding).

The nnsight backend
-------------------
``load_model(name, backend="nnsight")`` builds an ``nnsight.TransformersModel`` (of which
``nnsight.LanguageModel`` is now a deprecated alias) for :func:`patchwidgets.patch` and
:func:`patchwidgets.attribution_patch`, locally or on NDIF with ``remote=True``. It is
built **lazily**: the module tree on PyTorch's ``meta`` device from the checkpoint's
``config.json``, no weights. A local sweep loads the weights before its first trace (nnsight
calls this dispatching); a ``remote=True`` sweep never does, so an NDIF model's weights are
never downloaded. Only the config and the tokenizer files come from the Hub.

Why not simply ``LanguageModel(name)``? With nnsight 0.8.1 and transformers 5.25 that lazy
build fails for every checkpoint, local folder or Hub name, with ``Impossible to guess which
tokenizer to use``: nnsight decides which preprocessors to load by reading flags such as
``_load_tokenizer`` off the task's pipeline class, but transformers 5.25 registers pipeline
classes by their dotted name (a string, imported on use), so nnsight finds no flag, loads
no tokenizer, and hands ``transformers.pipeline`` a pre-built meta model with nothing it
could guess a tokenizer from. ``LanguageModel(name, dispatch=True)`` works because the
pipeline then gets the name, but it loads every weight at once, which a remote model must
not. So the tokenizer is loaded here (``AutoTokenizer.from_pretrained``, or the bundled
word-level tokenizer, made strict as for the bridge) and handed to nnsight, which then
needs no guess.
"""
from __future__ import annotations

import contextlib
import os
import socket
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

if TYPE_CHECKING:  # importing transformer_lens takes seconds; only do it when loading
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["ModelNotAvailableError", "list_models", "model_path", "load_model", "BACKENDS"]

#: Where bundled checkpoints live: one directory per model name.
MODELS_DIR = Path(__file__).resolve().parent / "models"

#: What :func:`load_model` can build: a TransformerLens ``TransformerBridge`` (the default) or
#: an ``nnsight.TransformersModel``.
BACKENDS = ("bridge", "nnsight")


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


def _looks_offline(exc: BaseException | None) -> bool:
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


_DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float": "float32",
                "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float16": "float16", "fp16": "float16", "half": "float16"}


def _resolve_dtype(dtype: Any) -> Any:
    """``torch.bfloat16``, ``"bfloat16"``, ``"bf16"``, ... -> a floating ``torch.dtype``."""
    import torch

    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key not in _DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r}; use torch.float32, torch.bfloat16 or "
                             f"torch.float16 (or their names: {', '.join(sorted(set(_DTYPE_NAMES.values())))})")
        dtype = getattr(torch, _DTYPE_NAMES[key])
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype such as torch.bfloat16, got {dtype!r}")
    return dtype


def _check_placement(device: Any, device_map: Any, n_devices: Any, max_memory: Any,
                     offload_folder: Any) -> None:
    """Refuse option combinations that contradict each other, before anything is loaded."""
    if device is not None and device_map is not None:
        raise ValueError(
            f"give either device= (the whole model on one device) or device_map= (modules on "
            f"several devices, CPU or disk), not both: got device={device!r} and a device_map")
    if n_devices is not None:
        if isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1:
            raise ValueError(f"n_devices must be a positive integer, got {n_devices!r}")
        if device_map is not None and n_devices > 1:
            raise ValueError("give either n_devices= (split evenly over that many GPUs) or device_map=, not both")
        if device is not None and n_devices > 1:
            raise ValueError(f"n_devices={n_devices} splits the model over cuda:0..cuda:{n_devices - 1}; "
                             f"it cannot be combined with device={device!r}")
        if n_devices > 1:
            import torch

            available = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if available < n_devices:
                raise ValueError(f"n_devices={n_devices} needs {n_devices} CUDA GPUs; this machine has "
                                 f"{available}. For CPU/disk offload use device_map= instead.")
    split = device_map is not None or (n_devices or 1) > 1
    if max_memory is not None and not split:
        raise ValueError("max_memory= budgets the devices of a split model: it needs device_map= "
                         "(e.g. 'auto') or n_devices=")
    if offload_folder is not None and device_map is None:
        raise ValueError("offload_folder= is where a device_map's 'disk' modules are stored: it needs "
                         "device_map= (e.g. {'model.layers.20': 'disk', ...} or 'auto' with max_memory=)")
    if isinstance(device_map, dict):
        bad = {k: v for k, v in device_map.items() if str(v).lower() == "meta"}
        if bad:
            raise ValueError(f"device_map puts {sorted(bad)} on 'meta', which has no weights; use "
                             "'disk' (with offload_folder=) to keep them off the CPU")
    elif device_map is not None and not isinstance(device_map, str):
        raise ValueError(f"device_map must be a dict {{module name: device}} or a string such as "
                         f"'auto', got {type(device_map).__name__}")


def _fix_input_device(bridge: "TransformerBridge") -> None:
    """Point ``cfg.device`` at the device the embedding runs on.

    TransformerLens reads ``cfg.device`` from the embedding's weight, which is ``meta`` when
    the embedding is offloaded to disk; ``to_tokens`` would then put tokens on ``meta``."""
    device = getattr(bridge.cfg, "device", None)
    if device is not None and str(device) != "meta":
        return
    from .devices import input_device

    bridge.cfg.device = str(input_device(bridge))


def _boot(name: str, boot_kwargs: dict, offline: bool, quiet: bool) -> "TransformerBridge":
    from transformer_lens.model_bridge import TransformerBridge

    with (_hub_offline_mode() if offline else contextlib.nullcontext(),
          _quiet_progress_bars() if quiet else contextlib.nullcontext()):
        bridge = TransformerBridge.boot_transformers(name, **boot_kwargs)
    bridge.eval()
    _fix_input_device(bridge)
    return bridge


def _load_bundled(name: str, boot_kwargs: dict) -> "TransformerBridge":
    from transformers import AutoTokenizer

    from .tokenizer import make_strict

    path = model_path(name)
    if "tokenizer" not in boot_kwargs:
        boot_kwargs = {**boot_kwargs,
                       "tokenizer": AutoTokenizer.from_pretrained(str(path), local_files_only=True)}
    # No "Loading weights" bar for a 3 MB file.
    bridge = _boot(str(path), boot_kwargs, offline=True, quiet=True)
    make_strict(bridge.tokenizer, vocabulary_name=name)
    return bridge


#: Options of the Hub download that the tokenizer needs as much as the model does.
_HUB_OPTIONS = ("revision", "token", "trust_remote_code", "cache_dir", "local_files_only")


def _import_nnsight() -> Any:
    try:
        import nnsight
    except ImportError as exc:
        raise ImportError("load_model(..., backend='nnsight') needs nnsight, which patchwidgets "
                          "does not install by default: pip install 'patchwidgets[nnsight]'") from exc
    return nnsight


def _load_nnsight(name: str, options: dict, kwargs: dict) -> Any:
    """An ``nnsight.TransformersModel`` of ``name``, built lazily, its tokenizer given
    explicitly (the module docstring says why)."""
    nnsight = _import_nnsight()
    import torch
    from transformers import AutoTokenizer

    bundled = name in list_models()
    path = str(model_path(name)) if bundled else name
    local = bundled or Path(name).exists()
    offline = bundled or (not local and _hub_unreachable())
    hub = {k: kwargs[k] for k in _HUB_OPTIONS if k in kwargs}
    tokenizer = kwargs.pop("tokenizer", None)
    if bundled and "dtype" not in options:
        # A bundled checkpoint may be stored in half precision only to keep the package small
        # (toy-ioi-deep is float16 on disk); it is meant to run in float32, as its bridge does.
        # transformers' "auto" would keep float16, so nnsight's grids would differ from the
        # bridge's by ~1e-3 on a CPU, and toy-ioi (float32 on disk) would behave otherwise.
        options = {**options, "dtype": torch.float32}
    try:
        with _hub_offline_mode() if offline else contextlib.nullcontext():
            if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
                source = path if tokenizer is None else str(tokenizer)
                tokenizer = AutoTokenizer.from_pretrained(source, **hub)
                if bundled:  # (a tokenizer the caller built is left as it is)
                    from .tokenizer import make_strict

                    make_strict(tokenizer, vocabulary_name=name)
            # No dispatch=True (unless the caller asks): the module tree is built on `meta`
            # from the config; the weights load before the first local trace, never for NDIF.
            return nnsight.TransformersModel(path, task="text-generation", tokenizer=tokenizer,
                                             **options, **kwargs)
    except OSError as exc:  # missing files / no network, as for the bridge
        if bundled:
            raise
        raise _not_available(name, exc, offline) from exc
    except Exception as exc:
        if not bundled and (offline or (not local and _looks_offline(exc))):
            raise _not_available(name, exc, offline) from exc
        raise


@overload
def load_model(name: str = ..., device: str | None = ..., *, backend: Literal["bridge"] = ...,
               **options: Any) -> "TransformerBridge": ...
@overload
def load_model(name: str = ..., device: str | None = ..., *, backend: Literal["nnsight"],
               **options: Any) -> Any: ...  # nnsight.TransformersModel (nnsight has no type stubs)


def load_model(
    name: str = "toy-ioi",
    device: str | None = None,
    *,
    backend: str = "bridge",
    dtype: Any = None,
    device_map: str | dict | None = None,
    n_devices: int | None = None,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
    **boot_kwargs: Any,
) -> Any:
    """Load ``name`` as a ``TransformerBridge`` in eval mode, or as an nnsight model.

    Args:
        name: a bundled model (see :func:`list_models`; default
            ``"toy-ioi"``), a local checkpoint directory, or anything
            ``TransformerBridge.boot_transformers`` accepts, such as ``"gpt2"``
            (needs the Hub or its cache).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...: the whole model on one device.
            ``None`` picks ``"cuda"`` when available, else ``"cpu"`` (unless the model is split
            with ``device_map``/``n_devices``). May be given positionally.
        backend: ``"bridge"`` (default): a TransformerLens 4 ``TransformerBridge``, which every
            part of patchwidgets takes. ``"nnsight"``: an ``nnsight.TransformersModel``
            (``pip install 'patchwidgets[nnsight]'``) for :func:`patchwidgets.patch` and
            :func:`patchwidgets.attribution_patch`, locally or on NDIF (``remote=True``). It
            is built lazily, without weights: a local sweep loads them before its first
            trace, a remote one never does. Its tokenizer is loaded here and given to nnsight,
            because nnsight 0.8.1's own lazy build cannot find one under transformers 5.25
            (``LanguageModel(name)`` fails with "Impossible to guess which tokenizer to use";
            the module docstring has the details). ``tokenizer=`` (an object or a name)
            replaces it; ``dispatch=True`` loads the weights at once. Bundled models get
            their strict word-level tokenizer here too. ``device``, ``dtype``, ``device_map``,
            ``max_memory`` and ``offload_folder`` are passed to nnsight (Hugging Face's
            ``from_pretrained`` applies them when the weights load); ``dtype=None`` keeps the
            checkpoint's own dtype (transformers' ``"auto"``) rather than float32, except
            for bundled models, which run in float32 whatever their dtype on disk (as
            their bridge does).
            ``n_devices`` is TransformerLens' and is refused (use ``device_map="auto"``).
        dtype: ``torch.float32`` (default), ``torch.bfloat16`` or ``torch.float16`` (or their
            names, ``"bfloat16"``...): the dtype of the weights and of every activation. Sweeps
            run in this dtype; metrics are always computed in float32 (see
            :func:`patchwidgets.patch` for how closely half-precision results follow float32).
        device_map: split a model too big for one device, as Hugging Face's ``from_pretrained``
            does: ``"auto"``/``"balanced"``/``"sequential"``, or a dict of module name ->
            ``"cuda:0"``/``0``/``"cpu"``/``"disk"``. ``"disk"`` modules are kept in
            ``offload_folder`` and loaded one at a time during each forward pass.
            TransformerLens 4.3 accepts all-GPU maps and CPU+disk maps, not maps that mix
            CPU/disk offload with GPUs.
        n_devices: split the model evenly over this many GPUs (``cuda:0``...).
        max_memory: per-device budget for ``device_map="auto"``/``n_devices``, e.g.
            ``{0: "20GiB", 1: "20GiB", "cpu": "60GiB"}``.
        offload_folder: where ``"disk"`` modules of a ``device_map`` are stored.
        **boot_kwargs: passed on to ``TransformerBridge.boot_transformers`` (``n_ctx``,
            ``revision``, ``trust_remote_code``, ...), or, with ``backend="nnsight"``, to
            ``nnsight.TransformersModel`` (``revision``, ``token`` and ``trust_remote_code``
            reach the tokenizer too).

    Every sweep (:func:`patchwidgets.patch`, :func:`patchwidgets.path_patch`,
    :func:`patchwidgets.attribution_patch`) works on a split or offloaded model and gives the
    same numbers as on one device: activations and cached keys/values stay on their block's
    device, metrics are computed where the logits are, results come back on the CPU.

    Returns:
        A fresh model on every call (nothing is cached: patching experiments
        sometimes edit weights, and a bundled model boots in well under a
        second). Bundled word-level models get a strict tokenizer, which
        raises :class:`patchwidgets.tokenizer.UnknownWordError` for unknown
        words instead of silently using ``[UNK]``.

    Raises:
        ValueError: an unknown ``backend``; contradictory or malformed options (``device``
            with ``device_map``, ``offload_folder`` without ``device_map``, ``n_devices``
            beyond the GPUs present, an unknown ``dtype``, ...).
        ImportError: ``backend="nnsight"`` without nnsight installed.
        ModelNotAvailableError: the model is neither bundled nor loadable
            (typically: no internet). Its message lists the bundled names.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: load_model builds a TransformerLens "
                         f"TransformerBridge (backend='bridge', the default) or an nnsight model "
                         f"(backend='nnsight')")
    if backend == "nnsight" and n_devices is not None:
        raise ValueError("n_devices= is TransformerLens' way to split a model; with backend='nnsight' "
                         "use device_map='auto' (and max_memory=) instead")
    _check_placement(device, device_map, n_devices, max_memory, offload_folder)
    if device is None and device_map is None and (n_devices or 1) <= 1:
        device = _default_device()
    options = {"device": device, "device_map": device_map, "n_devices": n_devices,
               "max_memory": max_memory,
               "offload_folder": None if offload_folder is None else str(offload_folder)}
    if dtype is not None:
        options["dtype"] = _resolve_dtype(dtype)
    options = {k: v for k, v in options.items() if v is not None}

    if backend == "nnsight":
        return _load_nnsight(name, options, boot_kwargs)

    boot_kwargs = {**boot_kwargs, **options}
    if name in list_models():
        return _load_bundled(name, boot_kwargs)

    # Offline, cached models still load; uncached ones fail at once.
    local = Path(name).exists()
    offline = not local and _hub_unreachable()
    try:
        return _boot(name, boot_kwargs, offline, quiet=local)
    except OSError as exc:  # transformers reports missing files / no network as OSError
        raise _not_available(name, exc, offline) from exc
    except Exception as exc:  # huggingface_hub / requests errors that are not OSErrors
        if offline or (not local and _looks_offline(exc)):
            raise _not_available(name, exc, offline) from exc
        raise
