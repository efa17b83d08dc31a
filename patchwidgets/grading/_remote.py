"""The learner's functions, called from the grader's process while they run in the kernel.

A check is written against a plain function: ``check(fn)`` calls ``fn(...)`` a few times and
judges what comes back. The grader hands it a :class:`RemoteFunction` instead. Each call
pickles the arguments (the grader's own data: safe to unpickle in the kernel), has the kernel's
:mod:`._worker` call the learner's function on them, and reads the answer back with
:mod:`._wire` (never unpickled). Two details keep a remote call equivalent to a local one:

* arguments the function changed in place (a hook that writes into ``activation`` and returns
  nothing) are changed in the grader's copies too, so checks that look at them still work;
* the kernel runs the function with the grader's grad mode, whatever the notebook set.

Errors come back as data: ``NotImplementedError`` (a stub) is raised again as such, anything
else as :class:`LearnerError`, which keeps the kernel's exception type, message, the line of
the learner's code it came from and the end of its traceback.
"""

from __future__ import annotations

import itertools
import os
import pickle
import time
from typing import Any

import torch

from ._common import model_ref
from ._kernel import CellTimeout, KernelSession
from ._wire import Decoder, WireError

_WORKER = '__import__("patchwidgets.grading._worker", fromlist=["serve"]).serve(globals(), {request!r}, {answer!r})'


class ExerciseTimeout(BaseException):
    """The exercise's time is up. A BaseException, so that no ``except Exception`` in a check
    (or in the learner's code it wraps) can swallow it."""


class LearnerError(Exception):
    """The learner's function raised an exception in the kernel."""

    def __init__(self, type_name: str, message: str, where: str = "", traceback: str = ""):
        super().__init__(message)
        self.type_name, self.where, self.traceback = type_name, where, traceback


class _RequestPickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        try:  # a model the grader named (an nnsight model is no torch Module, but is named too)
            ref = model_ref(obj)
        except TypeError:  # not weak-referenceable: plain data
            ref = None
        if ref is not None:
            return ref
        if isinstance(obj, torch.nn.Module):
            raise pickle.PicklingError(f"the grader cannot name this {type(obj).__name__} for the kernel")
        return None


class Channel:
    """Requests to the kernel's worker, each within the current exercise's deadline."""

    def __init__(self, kernel: KernelSession, directory: str):
        self.kernel, self.directory = kernel, directory
        self.deadline = float("inf")
        self._count = itertools.count()

    def request(self, request: dict) -> tuple[dict, Decoder]:
        n = next(self._count)
        request_path = os.path.join(self.directory, f"request-{n}.pkl")
        answer = os.path.join(self.directory, f"answer-{n}")
        try:
            with open(request_path, "wb") as f:
                _RequestPickler(f).dump(request)
        except (pickle.PicklingError, TypeError, AttributeError) as err:
            raise WireError(f"the grader could not send its arguments to the kernel: {err}") from None
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise ExerciseTimeout()
        try:
            reply = self.kernel.run(_WORKER.format(request=request_path, answer=answer), remaining)
        except CellTimeout:
            raise ExerciseTimeout() from None
        if reply.status != "ok":
            raise WireError(f"the grader's request failed in the kernel: {reply.ename}: {reply.evalue}")
        decoder = Decoder(answer)
        message = decoder.message
        if message.get("status") == "grader_error":
            raise WireError(f"the kernel could not serve the request: {message.get('type')}: {message.get('message')}")
        return message, decoder

    def describe(self, name: str) -> tuple[str, Any, list[str]]:
        """``("missing" | "callable" | "value", the value if not callable, notebook globals it reads)``."""
        message, decoder = self.request({"op": "describe", "name": name})
        kind = str(message.get("kind"))
        value = decoder.decode(message.get("value")) if kind == "value" else None
        return kind, value, [str(g) for g in message.get("globals", [])]


class RemoteFunction:
    """Calls ``name`` in the kernel; see the module docstring."""

    def __init__(self, channel: Channel, name: str, globals_read: list[str]):
        self.channel, self.__name__ = channel, name
        self.notebook_globals = globals_read  # read by _common.call_learner for its messages

    def __repr__(self) -> str:
        return f"<the notebook's function {self.__name__}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        message, decoder = self.channel.request({
            "op": "call", "name": self.__name__, "args": list(args), "kwargs": kwargs,
            "grad": torch.is_grad_enabled()})
        if message.get("status") == "error":
            type_name, text = str(message.get("type")), str(message.get("message"))
            if type_name == "NotImplementedError":
                raise NotImplementedError(text)
            raise LearnerError(type_name, text, str(message.get("where", "")), str(message.get("traceback", "")))
        for where, key, value in message.get("changed", []):
            _mirror(args, kwargs, decoder.decode(where), decoder.decode(key), decoder.decode(value))
        return decoder.decode(message.get("value"))


def _mirror(args: tuple, kwargs: dict, where: Any, key: Any, value: Any) -> None:
    """Apply to the grader's argument what the learner's function did to the kernel's copy."""
    try:
        holder = args[where] if isinstance(where, int) else kwargs[where]
    except (IndexError, KeyError, TypeError):
        return  # the kernel named an argument that was never passed: ignore it
    if key is None:
        target, mapping = holder, None
    else:
        mapping = getattr(holder, "cache_dict", holder)
        if not isinstance(mapping, dict):
            return
        target = mapping.get(key)
    if not isinstance(value, torch.Tensor):
        return
    with torch.no_grad():
        if isinstance(target, torch.Tensor) and target.shape == value.shape:
            target.copy_(value)
        elif mapping is not None:
            mapping[key] = value
        elif isinstance(target, torch.Tensor):
            target.data = value.to(target.dtype)
