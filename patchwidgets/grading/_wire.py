"""Values coming back from the learner's kernel, in formats that cannot run code when read.

The grader never unpickles what the learner's kernel writes: loading a pickle can run any
code, so one crafted return value (an object whose ``__reduce__`` calls ``exec``) would be
enough to rewrite the checks inside the grader. The kernel writes instead

* ``<prefix>.json``: numbers, strings, ``None`` and tagged containers (tuples, sets, dicts
  with any hashable keys), with every tensor replaced by a reference, and
* ``<prefix>.safetensors``: the tensors' bytes, dtypes and shapes,

and both are read by parsers that only build data. What cannot be represented (a figure, a
generator, a class the learner defined) comes back as a :class:`RemoteObject` that keeps the
type's name and a short ``repr``, so a check can still say "expected a tensor, got Figure".
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

TAG = "__patchwidgets__"
_MAX_REPR = 200


class WireError(BaseException):
    """The kernel's answer is not in the expected form. (A BaseException: see _kernel.KernelDied.)"""


class RemoteObject:
    """Stands in for a value that only exists in the learner's kernel."""

    def __init__(self, text: str):
        self._text = text

    def __repr__(self) -> str:
        return self._text


def _remote_type(name: str) -> type:
    # A class named after the kernel's type, so messages read "got Figure: <...>".
    safe = "".join(ch for ch in name if ch.isalnum() or ch == "_")[:60] or "object"
    return type(safe, (RemoteObject,), {})


class Encoder:
    """Turns values into JSON-ready data, collecting the tensors they hold."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def encode(self, value: Any) -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, (int, float)):
            return value
        if isinstance(value, torch.Tensor):
            return self._tensor(value)
        if type(value).__module__ == "numpy":
            if getattr(value, "ndim", 0) == 0 and hasattr(value, "item"):
                return self.encode(value.item())
            try:
                return self._tensor(torch.as_tensor(value))
            except Exception:
                return self._opaque(value)
        if isinstance(value, list):
            return [self.encode(v) for v in value]
        if isinstance(value, tuple):
            return {TAG: "tuple", "items": [self.encode(v) for v in value]}
        if isinstance(value, (set, frozenset)):
            return {TAG: "set", "items": [self.encode(v) for v in value]}
        if isinstance(value, dict):
            return {TAG: "dict", "items": [[self.encode(k), self.encode(v)] for k, v in value.items()]}
        return self._opaque(value)

    def _tensor(self, value: torch.Tensor) -> Any:
        if value.is_sparse or value.is_complex() or value.device.type == "meta":
            return self._opaque(value)
        key = str(len(self.tensors))
        self.tensors[key] = value.detach().cpu().contiguous().clone()
        return {TAG: "tensor", "key": key}

    @staticmethod
    def _opaque(value: Any) -> Any:
        try:
            text = repr(value)
        except Exception:
            text = f"<{type(value).__name__}>"
        if len(text) > _MAX_REPR:
            text = text[: _MAX_REPR - 1] + "…"
        return {TAG: "object", "type": type(value).__name__, "repr": text}

    def save(self, prefix: str, message: dict) -> None:
        """Write ``message`` (already encoded) and the collected tensors under ``prefix``."""
        from safetensors.torch import save_file

        save_file(self.tensors, prefix + ".safetensors")
        with open(prefix + ".json.tmp", "w", encoding="utf-8") as f:
            json.dump(message, f)
        os.replace(prefix + ".json.tmp", prefix + ".json")  # the JSON file appears complete or not at all


class Decoder:
    """Reads what an :class:`Encoder` saved, building only data."""

    def __init__(self, prefix: str):
        from safetensors.torch import load_file

        try:
            with open(prefix + ".json", encoding="utf-8") as f:
                self.message = json.load(f)
            self.tensors = load_file(prefix + ".safetensors")
        except (OSError, ValueError) as err:
            raise WireError(f"no readable answer from the kernel ({type(err).__name__}: {err})") from None
        if not isinstance(self.message, dict):
            raise WireError("the kernel's answer is not a JSON object")

    def decode(self, data: Any) -> Any:
        if data is None or isinstance(data, (bool, int, float, str)):
            return data
        if isinstance(data, list):
            return [self.decode(v) for v in data]
        if not isinstance(data, dict) or TAG not in data:
            raise WireError(f"unexpected value in the kernel's answer: {str(data)[:80]}")
        kind = data[TAG]
        try:
            if kind == "tensor":
                return self.tensors[str(data["key"])]
            if kind == "tuple":
                return tuple(self.decode(v) for v in data["items"])
            if kind == "set":
                return {self.decode(v) for v in data["items"]}
            if kind == "dict":
                return {self.decode(k): self.decode(v) for k, v in data["items"]}
            if kind == "object":
                return _remote_type(str(data["type"]))(str(data["repr"]))
        except (KeyError, TypeError, ValueError) as err:
            raise WireError(f"malformed {kind!r} in the kernel's answer: {err}") from None
        raise WireError(f"unknown kind {kind!r} in the kernel's answer")
