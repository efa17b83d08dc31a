"""Checks and toy gate models for 05_noising_denoising."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any, Callable

import torch

from ._common import GradingError, to_tensor, call_learner, compare, report_pass, name_model


# ---------------------------------------------------------------------------------------------
# 05_noising_denoising
# ---------------------------------------------------------------------------------------------

def check_or_gate(or_gate: Callable) -> None:
    """``or_gate(a, b) -> c`` on tensors of values in [0, 1]: 1 when either input is on."""
    name = "or_gate"
    a = torch.tensor([0.0, 0.0, 1.0, 1.0])
    b = torch.tensor([0.0, 1.0, 0.0, 1.0])
    got = to_tensor(name, call_learner(name, or_gate, a.clone(), b.clone()))
    expected = torch.tensor([0.0, 1.0, 1.0, 1.0])
    if got.shape == expected.shape and torch.allclose(got, torch.tensor([0.0, 1.0, 1.0, 2.0])):
        raise GradingError(f"{name}: a + b gives 2 when both inputs are on; an OR gate's output "
                           "should stay at 1 (try torch.maximum(a, b))")
    if got.shape == expected.shape and torch.allclose(got, a * b):
        raise GradingError(f"{name}: that is an AND gate (a * b); OR is on when either input is on")
    compare(name, got, expected, ("case (a, b) = (0,0), (0,1), (1,0), (1,1)",), atol=1e-5, rtol=0)
    report_pass(name, "truth table 0, 1, 1, 1")


def check_patch_gate_components(patch_gate_components: Callable) -> None:
    """``patch_gate_components(model, direction) -> {"A": effect, "B": effect, "C": effect}``.

    ``model`` is a :func:`gate_model`; the effect is the normalised metric of patching that
    one component (0 = no change, 1 = the source run's behaviour).
    """
    name = "patch_gate_components"
    for gate in ("and", "or"):
        model = gate_model(gate)
        for direction in ("denoising", "noising"):
            got = call_learner(name, patch_gate_components, model, direction)
            expected = _gate_effects(model, direction)
            if isinstance(got, dict):  # "a" or "A": case does not matter
                got = {str(k).strip().upper(): v for k, v in got.items()}
            if not isinstance(got, dict) or set(got) != set(expected):
                raise GradingError(f"{name}: return a dict with keys {sorted(expected)}, got {got!r}")
            for comp in expected:
                value = float(to_tensor(name, got[comp]).reshape(-1)[0])
                if not math.isclose(value, expected[comp], abs_tol=1e-3):
                    raise GradingError(
                        f"{name}: {gate.upper()} gate, {direction}, component {comp}: expected "
                        f"{expected[comp]:.3f}, got {value:.3f}. (Denoising runs the corrupted input and "
                        "pastes clean values; noising runs the clean input and pastes corrupted values.)")
    report_pass(name, "AND and OR gates, both directions")


#: The ground truth for :func:`check_gate_predictions`: which components show a large effect.
_GATE_TRUTH = {
    "and": {"denoising": {"C"}, "noising": {"A", "B", "C"}},
    "or": {"denoising": {"A", "B", "C"}, "noising": {"C"}},
}


def check_gate_predictions(predictions: Any) -> None:
    """``predictions[gate][direction]`` is the set of components whose single patch matters.

    Case does not matter anywhere: gates ``"and"``/``"AND"``, directions ``"denoising"``/
    ``"Denoising"`` and components ``"A"``/``"a"`` are all accepted. ``predictions`` may be the
    dict itself or a function that returns it.
    """
    name = "gate_predictions"
    if callable(predictions):
        predictions = call_learner(name, predictions)
    if not isinstance(predictions, dict):
        raise GradingError(f"{name}: expected a dict like {{'and': {{'denoising': {{...}}, ...}}, ...}}, "
                           f"got {type(predictions).__name__}")

    def by_lower_key(mapping: Any) -> dict:
        return {str(k).strip().lower(): v for k, v in mapping.items()} if isinstance(mapping, dict) else {}

    gates = by_lower_key(predictions)
    for gate, by_direction in _GATE_TRUTH.items():
        for direction, truth in by_direction.items():
            try:
                guess = {str(c).strip().upper() for c in by_lower_key(gates[gate])[direction]}
            except (KeyError, TypeError):
                raise GradingError(f"{name}: missing predictions[{gate!r}][{direction!r}] (keys are "
                                   "case-insensitive: 'and' or 'AND', 'denoising' or 'Denoising')") from None
            if guess != truth:
                why = {
                    ("and", "denoising"): "restoring A alone leaves B corrupted, and A AND (corrupted B) is still off",
                    ("and", "noising"): "breaking any one input of an AND turns its output off",
                    ("or", "denoising"): "restoring either input alone turns an OR back on",
                    ("or", "noising"): "breaking A alone leaves B clean, and (corrupted A) OR B is still on",
                }[(gate, direction)]
                raise GradingError(f"{name}: {gate.upper()} gate, {direction}: you predicted {sorted(guess)}, "
                                   f"but it is {sorted(truth)}: {why}.")
    report_pass(name, "denoising finds a cross-section of an AND and all of an OR; noising the reverse")


_TABLE = {
    (True, True): "necessary and sufficient",
    (True, False): "sufficient but not necessary",
    (False, True): "necessary but not sufficient",
    (False, False): "neither",
}


def check_classify_component(classify_component: Callable) -> None:
    """``classify_component(denoising_effect, noising_effect, threshold=0.5) -> str`` (2x2 table)."""
    name = "classify_component"
    cases = [(0.9, 0.95), (0.8, 0.1), (0.05, 0.7), (0.1, 0.2), (0.5, 0.49), (1.2, -0.1)]
    for d, n in cases:
        got = call_learner(name, classify_component, d, n)
        expected = _TABLE[(d >= 0.5, n >= 0.5)]
        if not isinstance(got, str) or got.strip().lower() != expected:
            raise GradingError(
                f"{name}: denoising effect {d}, noising effect {n}: expected {expected!r}, got {got!r}. "
                "Denoising (restoring it alone brings the behaviour back) tests sufficiency; "
                "noising (corrupting it alone breaks the behaviour) tests necessity; an effect "
                "counts from the threshold up (>= 0.5).")
    report_pass(name, "the necessary / sufficient 2x2 table")


class _Cfg(SimpleNamespace):
    pass


def gate_model(gate: str = "and", backup: float = 0.0):
    """A hand-built three-component circuit ``C = gate(A, B)`` with known ground truth.

    Input: ``[batch, 2]`` tokens, each 0 (feature off) or 1 (feature on). ``A`` reads token 0,
    ``B`` reads token 1 and ``C`` combines them with ``gate`` (``"and"``: ``A * B``;
    ``"or"``: ``max(A, B)``; ``"backup"``: a main component ``A`` plus a backup ``B`` that
    only steps in, with strength ``backup``, when ``A`` is off). The logits are
    ``[batch, 2, 2]`` with the last position's logit difference ``yes - no`` = ``4 C - 2``:
    +2 on the clean input ``[1, 1]`` and -2 on the corrupted input ``[0, 0]``.

    Hooks: ``hook_a``, ``hook_b``, ``hook_c`` (each ``[batch, 1]``), so
    ``patchwidgets.patch(model, clean, corrupted, site="hook_a", index=[(0,)])`` patches A.
    """
    from transformer_lens import HookedRootModule
    from transformer_lens.hook_points import HookPoint

    class GateModel(HookedRootModule):
        def __init__(self):
            super().__init__()
            self.gate = gate
            self.cfg = _Cfg(n_layers=1, n_heads=1, d_model=1, d_vocab=2, n_ctx=2, d_mlp=None)
            self.hook_a = HookPoint()
            self.hook_b = HookPoint()
            self.hook_c = HookPoint()
            self.setup()

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            x = tokens.float()
            a = self.hook_a(x[:, :1])
            b = self.hook_b(x[:, 1:2])
            if gate == "and":
                c = a * b
            elif gate == "or":
                c = torch.maximum(a, b)
            elif gate == "backup":
                c = torch.clamp(a + backup * (1 - a) * b, max=1.0)
            else:
                raise ValueError(f"unknown gate {gate!r}")
            c = self.hook_c(c)
            ld = 4 * c - 2
            logits = torch.zeros(tokens.shape[0], tokens.shape[1], 2)
            logits[:, -1, 1] = ld[:, 0]  # token 1 = "yes", token 0 = "no"
            return logits

    return name_model(GateModel(), "gate_model", gate, backup)


GATE_CLEAN = torch.tensor([[1, 1]])
GATE_CORRUPTED = torch.tensor([[0, 0]])


def _gate_effects(model: Any, direction: str) -> dict[str, float]:
    from ..patching import patch

    out = {}
    for comp in ("A", "B", "C"):
        r = patch(model, GATE_CLEAN, GATE_CORRUPTED, answers=(1, 0), site=f"hook_{comp.lower()}",
                  index=[(0,)], direction=direction, metrics="normalized", progress=False)
        out[comp] = float(r.grid("normalized")[0])
    return out
