"""Checks and toy gate models for 05_noising_denoising."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any, Callable

import torch

from ._common import (ATOL, GradingError, call_learner, compare, name_model, normalized_ld_metric, report_pass,
                      sweep_setup, to_tensor)


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
    only steps in, with strength ``backup``, when ``A`` is off; ``"negative"``: ``1.5 A - 0.5 B``,
    a negative component ``B`` that pushes against the answer). The logits are
    ``[batch, 2, 2]`` with the last position's logit difference ``yes - no`` = ``4 C - 2``:
    +2 on the clean input ``[1, 1]`` and -2 on the corrupted input ``[0, 0]``, for every gate
    (so the clean run always prefers "yes").

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
            elif gate == "negative":
                c = 1.5 * a - 0.5 * b
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


# ---------------------------------------------------------------------------------------------
# 05: negative components (signed effect and KL) and ablations
# ---------------------------------------------------------------------------------------------

def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """``KL(p || q)`` between the last position's output distributions of two one-prompt runs.

    The course's KL is ``KL(clean || patched)`` in both directions (notebook 02, and
    ``patchwidgets.metrics``): the clean run is the reference, whichever run is patched."""
    p, q = p_logits[0, -1].double().log_softmax(-1), q_logits[0, -1].double().log_softmax(-1)
    return float((p.exp() * (p - q)).sum())


def _gate_patch(model: Any, components: list[str], direction: str) -> dict[str, Any]:
    """The check's own answer for ``patch_with_kl``, and the wrong answers it can recognise."""
    target, source = (GATE_CORRUPTED, GATE_CLEAN) if direction == "denoising" else (GATE_CLEAN, GATE_CORRUPTED)
    with torch.no_grad():
        source_logits, cache = model.run_with_cache(source)
        target_logits = model(target)
        clean_logits, corrupted_logits = model(GATE_CLEAN), model(GATE_CORRUPTED)

        def run(names: list[str]) -> torch.Tensor:
            hooks = [(f"hook_{c.lower()}", lambda act, hook: cache[hook.name]) for c in names]
            return model.run_with_hooks(target, fwd_hooks=hooks)

        patched, first_only = run(components), run(components[:1])

    def ld(logits: torch.Tensor) -> float:
        return float(logits[0, -1, 1] - logits[0, -1, 0])

    def normalized(logits: torch.Tensor) -> float:
        return (ld(logits) - ld(target_logits)) / (ld(source_logits) - ld(target_logits))

    raw = float((clean_logits[0, -1].softmax(-1) * (clean_logits[0, -1] - patched[0, -1])).sum())
    return {
        "normalized": normalized(patched), "kl": _kl(clean_logits, patched),
        "wrong kl": [
            (_kl(patched, clean_logits), "that is KL(patched || clean): the average must be taken over the "
             "clean run's distribution, sum p_clean * (log p_clean - log p_patched)"),
            (_kl(corrupted_logits, patched), "that is the KL from the corrupted run; the clean run is the "
             "reference in both directions (notebook 02), also when noising, where the values come from the "
             "corrupted run"),
            (raw, "that uses raw logits where log-probabilities belong: take log_softmax of both runs first"),
        ],
        "first only": (normalized(first_only), _kl(clean_logits, first_only)),
    }


def _two_numbers(name: str, got: Any) -> tuple[float, float]:
    if isinstance(got, dict):
        keys = {str(k).strip().lower(): v for k, v in got.items()}
        if {"normalized", "kl"} <= set(keys):
            got = (keys["normalized"], keys["kl"])
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise GradingError(f"{name}: return a dict {{'normalized': float, 'kl': float}}, got {got!r}")
    values = []
    for value in got:
        t = to_tensor(name, value)
        if t.numel() != 1:
            raise GradingError(f"{name}: 'normalized' and 'kl' are one number each, got shape {tuple(t.shape)}")
        values.append(float(t))
    return values[0], values[1]


def check_patch_with_kl(patch_with_kl: Callable) -> None:
    """``patch_with_kl(model, components, direction="denoising") -> {"normalized": float, "kl": float}``.

    ``model`` is a :func:`gate_model`; the components in the list (``["A", "B"]``) are patched
    together. ``normalized`` is the signed normalised logit difference (0 = the run being
    patched, 1 = the run the values come from) and ``kl`` is ``KL(clean || patched)`` of the
    last position's output distributions: notebook 02's definition, the clean run the reference in
    both directions.
    """
    name = "patch_with_kl"
    cases = [("negative", ["A"], "denoising"), ("negative", ["B"], "denoising"), ("negative", ["A", "B"], "denoising"),
             ("negative", ["B"], "noising"), ("and", ["A", "B"], "denoising"), ("and", ["A"], "noising")]
    for gate, components, direction in cases:
        model = gate_model(gate)
        got_norm, got_kl = _two_numbers(name, call_learner(name, patch_with_kl, model, list(components), direction))
        ref = _gate_patch(model, components, direction)
        where = f"{gate.upper()} gate ({'C = 1.5 A - 0.5 B' if gate == 'negative' else 'C = A * B'}), {direction}, " \
                f"patching {' and '.join(components)} together"
        if len(components) > 1 and math.isclose(got_norm, ref["first only"][0], abs_tol=ATOL) and \
                not math.isclose(got_norm, ref["normalized"], abs_tol=ATOL):
            raise GradingError(f"{name}: {where}: you seem to patch only {components[0]}. Put one hook on "
                               "each component in the list, all in the same run.")
        if not math.isclose(got_norm, ref["normalized"], abs_tol=ATOL):
            hint = ""
            if math.isclose(got_norm, abs(ref["normalized"]), abs_tol=ATOL):
                hint = (" That is its absolute value. Keep the sign: a negative effect is what says that a "
                        "component works against the answer; the KL is the number that ignores the sign.")
            elif math.isclose(got_norm, 1 - ref["normalized"], abs_tol=ATOL):
                hint = (" That is 1 minus the expected value: 0 is the run being patched, 1 the run the values "
                        "come from.")
            raise GradingError(f"{name}: {where}: expected normalized = {ref['normalized']:.4f}, "
                               f"got {got_norm:.4f}.{hint}")
        if not math.isclose(got_kl, ref["kl"], abs_tol=ATOL):
            hint = next((f" Your value matches {why}." for wrong, why in ref["wrong kl"]
                         if math.isclose(got_kl, wrong, abs_tol=ATOL)), "")
            raise GradingError(f"{name}: {where}: expected kl = KL(clean || patched) = {ref['kl']:.4f}, "
                               f"got {got_kl:.4f}.{hint}")
    report_pass(name, "signed effect and KL on the negative-component and AND circuits")


def library_ablation(setup: Any, ablation: str) -> torch.Tensor:
    """``[layer, head]``: zero- or mean-ablating each head's output in the clean run, normalised
    like noising (0 = the clean run, 1 = the corrupted run)."""
    from ..patching import patch

    b = setup.batch
    result = patch(setup.model, b.clean_tokens, answers=torch.stack([b.correct_ids, b.incorrect_ids], 1),
                   site="head_out", direction="noising", ablation=ablation, metrics="logit_diff", progress=False)
    m = setup.metric
    return (result.grid("logit_diff") - m.clean_ld) / (m.corrupted_ld - m.clean_ld)


def _ablated_by_hand(setup: Any, head: tuple[int, int], values: Callable, whole_layer: bool = False) -> float:
    """The noising metric after replacing the output of ``head`` (or its whole layer) by ``values(z)``."""
    layer, h = head
    heads = slice(None) if whole_layer else h

    def replace(z: torch.Tensor, hook: Any) -> torch.Tensor:
        z = z.clone()
        z[:, :, heads] = values(z[:, :, heads])
        return z

    with torch.no_grad():
        logits = setup.model.run_with_hooks(setup.batch.clean_tokens,
                                            fwd_hooks=[(f"blocks.{layer}.attn.hook_z", replace)])
    return float(_noising_metric(setup)(logits))


def _noising_metric(setup: Any) -> Any:
    b = setup.batch
    return normalized_ld_metric(setup.clean_logits, setup.corrupted_logits, b.correct_ids, b.incorrect_ids,
                                direction="noising")


#: Heads the ablation check asks about on toy-ioi: its main head, a layer-1 name mover and a head
#: that attends to both names at the start.
ABLATION_HEADS = [(0, 0), (1, 5), (0, 2)]


def check_ablate_head(ablate_head: Callable, model: Any = None) -> None:
    """``ablate_head(model, clean_tokens, head, ablation, metric) -> float``.

    Runs the clean prompts with the output (``hook_z``, every position) of ``head = (layer, h)``
    replaced by zeros (``ablation="zero"``) or by its mean over the prompts of the batch, position
    by position (``"mean"``), and returns ``metric(logits)``: the noising metric, 0 = the clean
    run, 1 = the corrupted run. Compared with :func:`patchwidgets.patch` with ``ablation=``.
    """
    name = "ablate_head"
    setup = sweep_setup(model)
    zero = torch.zeros_like

    def mean(z: torch.Tensor) -> torch.Tensor:
        return z.mean(0, keepdim=True).expand_as(z)

    known = {
        "mean": [(lambda z: z.mean((0, 1), keepdim=True).expand_as(z),
                  "the mean over the prompts *and the positions*: take the mean over the prompts only "
                  "(dim 0), so that each position keeps its own mean"),
                 (zero, "zero ablation: for 'mean', replace by the mean over the prompts")],
        "zero": [(mean, "mean ablation: for 'zero', replace by zeros")],
    }
    for ablation, exact in (("zero", zero), ("mean", mean)):
        grid = library_ablation(setup, ablation)
        for head in ABLATION_HEADS:
            with torch.no_grad(), setup.guard(name):
                got = call_learner(name, ablate_head, setup.model, setup.batch.clean_tokens.clone(), head, ablation,
                                   _noising_metric(setup))
            t = to_tensor(name, got)
            if t.numel() != 1:
                raise GradingError(f"{name}: return one number (the metric of the ablated run), "
                                   f"got shape {tuple(t.shape)}")
            value, expected = float(t), float(grid[head])
            if math.isclose(value, expected, abs_tol=ATOL):
                continue
            hint = next((f" Your value matches {why}." for values, why in known[ablation]
                         if math.isclose(value, _ablated_by_hand(setup, head, values), abs_tol=ATOL)), "")
            if not hint and math.isclose(value, _ablated_by_hand(setup, head, exact, whole_layer=True), abs_tol=ATOL):
                hint = (f" Your value matches ablating every head of layer {head[0]}: change only "
                        f"z[:, :, {head[1]}], the one head's slice.")
            raise GradingError(f"{name}: {ablation} ablation of L{head[0]}H{head[1]}: expected {expected:.4f} "
                               f"(0 = clean, 1 = as corrupted), got {value:.4f}.{hint}")
    report_pass(name, "zero and mean ablation match patchwidgets.patch(ablation=...)")
