"""Where a model's tensors live: models split over devices or offloaded to disk.

A model loaded with a ``device_map`` (:func:`patchwidgets.load_model`) has its blocks on
several devices, or keeps some weights on disk (or in CPU memory) and lets accelerate's hooks
bring them in for each module's forward call. Running the model needs nothing special: each
module's forward call moves activations and loads weights as it goes. Two things do:

* **Input tokens** go where the token embedding runs (:func:`input_device`). The first
  parameter's device says nothing about that: a disk-offloaded embedding's weights sit on
  the ``meta`` device between calls, and its accelerate hook knows where it will execute.
* **Weights read directly**, outside a forward call (the unembedding columns of the engine's
  column shortcut, the embedding's standard deviation for noise), are ``meta`` tensors unless
  read inside :func:`materialized`, which loads offloaded weights the way accelerate does
  for a forward call.

Accelerate attaches its hooks as ``module._hf_hook``; a module with several has a
``SequentialHook`` whose ``hooks`` list holds them (:func:`_accelerate_hooks` unrolls it).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

__all__ = ["input_device", "materialized"]


def _accelerate_hooks(module: Any) -> list:
    """The accelerate hooks attached to ``module`` itself, ``SequentialHook`` chains unrolled
    (accelerate's own ``align_module_device`` does not look into those)."""
    found: list = []
    pending: list[Any] = [getattr(module, "_hf_hook", None)]
    while pending:
        hook = pending.pop()
        if isinstance(getattr(hook, "hooks", None), (list, tuple)):  # a SequentialHook
            pending.extend(hook.hooks)
        elif hook is not None:
            found.append(hook)
    return found


def _offload_hook(module: Any) -> Any:
    """The accelerate hook that keeps ``module``'s own weights offloaded (CPU or disk), if any."""
    return next((h for h in _accelerate_hooks(module)
                 if getattr(h, "offload", False) and callable(getattr(h, "pre_forward", None))), None)


@contextlib.contextmanager
def materialized(module: Any) -> Iterator[Any]:
    """Inside this context, every offloaded weight under ``module`` holds real values.

    Accelerate keeps offloaded weights (``device_map`` entries ``"cpu"`` or ``"disk"`` next to
    other targets) on the ``meta`` device and loads them only around each module's forward
    call. Code that reads a weight directly (``model.W_U``, ``model.W_E``) gets a ``meta``
    tensor outside that window; inside this context it gets the values, on the module's
    execution device, as the forward call would. Values read here stay valid after the
    context if copied (the module's parameter goes back to ``meta``). A no-op for modules
    without offloaded weights.
    """
    entered: list[tuple[Any, Any]] = []
    try:
        if isinstance(module, torch.nn.Module):
            for sub in module.modules():
                hook = _offload_hook(sub)
                if hook is not None:
                    hook.pre_forward(sub)
                    entered.append((hook, sub))
        yield module
    finally:
        for hook, sub in reversed(entered):
            hook.post_forward(sub, None)


def input_device(model: Any) -> torch.device:
    """The device a model's input tokens go to: where its token embedding runs.

    For a model dispatched by accelerate (``hf_device_map``) that is the embedding's execution
    device, which is not the device of its weight when the weight is offloaded (``meta``);
    otherwise the device of the first parameter that is not on ``meta``, or the CPU."""
    hf: Any = getattr(model, "original_model", None)
    if getattr(hf, "hf_device_map", None):
        try:
            embed = hf.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            embed = None
        if isinstance(embed, torch.nn.Module):
            for hook in _accelerate_hooks(embed):
                if getattr(hook, "execution_device", None) is not None:
                    return torch.device(hook.execution_device)
            for p in embed.parameters():
                if p.device.type != "meta":
                    return p.device
    params = model.parameters() if hasattr(model, "parameters") else ()
    for p in params:
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")
