"""The grader's agent inside the learner's kernel: it calls the learner's functions on request.

The grader (:mod:`.grader`) never runs the learner's code in its own process, and never runs
its checks in the learner's. After the notebook has run, the grader executes one line per
request in the kernel::

    __import__("patchwidgets.grading._worker", fromlist=["serve"]).serve(globals(), REQUEST, ANSWER)

:func:`serve` reads the request (a pickle the grader wrote: its own data, so unpickling it here
is safe), looks the exercise up by name in the notebook's namespace, calls it, and writes the
answer with :mod:`._wire`, which the grader reads without unpickling. Nothing in this module
is trusted: the learner's code may have replaced any of it, and all that can change is the
answer the grader then judges.

Models cannot travel by pickle (they hold hooks and closures) and need not: a request names
them (``("bundled_model",)``, ``("gate_model", "and", 0.0)``, ``("nnsight_model",)``,
``("deep_model",)``), and the kernel builds its own.
"""

from __future__ import annotations

import pickle
import traceback
from typing import Any

from ._learner_code import notebook_globals, where_raised
from ._wire import Encoder

_MODELS: dict[tuple, Any] = {}


def resolve_model(ref: tuple) -> Any:
    """The kernel's own copy of a model the grader named."""
    ref = tuple(ref)
    if ref not in _MODELS:
        from . import _common, check_gates

        if ref[0] == "bundled_model":
            _MODELS[ref] = _common.bundled_model()
        elif ref[0] == "gate_model":
            _MODELS[ref] = check_gates.gate_model(*ref[1:])
        elif ref[0] == "nnsight_model":
            from . import check_nnsight

            _MODELS[ref] = check_nnsight.nnsight_model()
        elif ref[0] == "deep_model":
            from . import check_circuit

            _MODELS[ref] = check_circuit.deep_model()
        else:
            raise pickle.UnpicklingError(f"unknown model reference {ref!r}")
    return _MODELS[ref]


class _RequestUnpickler(pickle.Unpickler):
    def persistent_load(self, pid: Any) -> Any:
        return resolve_model(pid)


def serve(namespace: dict, request_path: str, answer_prefix: str) -> None:
    """Answer one request from the grader (see the module docstring)."""
    encoder = Encoder()
    try:
        with open(request_path, "rb") as f:
            request = _RequestUnpickler(f).load()
        if request["op"] == "describe":
            message = _describe(namespace, request["name"], encoder)
        else:
            message = _call(namespace, request, encoder)
    except Exception as err:  # a broken request or a broken kernel: still answer
        message = {"status": "grader_error", "type": type(err).__name__, "message": str(err)}
    encoder.save(answer_prefix, message)


def _describe(namespace: dict, name: str, encoder: Encoder) -> dict:
    if name not in namespace:
        return {"status": "ok", "kind": "missing"}
    value = namespace[name]
    if callable(value):
        return {"status": "ok", "kind": "callable", "globals": notebook_globals(value)}
    return {"status": "ok", "kind": "value", "value": encoder.encode(value)}


def _versions(args: list, kwargs: dict) -> dict:
    """``(where, key) -> (id, version)`` of every tensor passed in, directly or in a dict or
    cache: how the answer tells the grader which arguments the function changed in place."""
    import torch

    seen = {}
    for where, value in [*enumerate(args), *kwargs.items()]:
        mapping = getattr(value, "cache_dict", value)
        if isinstance(value, torch.Tensor):
            seen[(where, None)] = (id(value), value._version)
        elif isinstance(mapping, dict):
            for key, item in mapping.items():
                if isinstance(item, torch.Tensor):
                    seen[(where, key)] = (id(item), item._version)
    return seen


def _reset_hooks() -> None:
    """Remove hooks a learner's function left on the kernel's TransformerLens models (an nnsight
    model keeps no hooks between traces)."""
    for model in _MODELS.values():
        if hasattr(model, "reset_hooks"):
            model.reset_hooks()


def _call(namespace: dict, request: dict, encoder: Encoder) -> dict:
    import torch

    fn = namespace.get(request["name"])
    args, kwargs = list(request["args"]), dict(request["kwargs"])
    _reset_hooks()
    before = _versions(args, kwargs)
    try:
        with torch.set_grad_enabled(bool(request["grad"])):
            value = fn(*args, **kwargs)
    except Exception as err:
        return {"status": "error", "type": type(err).__name__, "message": str(err),
                "where": where_raised(err, fn),
                "traceback": "".join(traceback.format_exception(type(err), err, err.__traceback__)[-6:])}
    finally:
        _reset_hooks()
    after = _versions(args, kwargs)
    changed = []
    for (where, key), stamp in after.items():
        if before.get((where, key)) != stamp:
            holder = args[where] if isinstance(where, int) else kwargs[where]
            if key is None:
                changed.append([encoder.encode(where), None, encoder.encode(holder)])
            else:
                mapping = getattr(holder, "cache_dict", holder)
                changed.append([encoder.encode(where), encoder.encode(key), encoder.encode(mapping[key])])
    return {"status": "ok", "value": encoder.encode(value), "changed": changed}
