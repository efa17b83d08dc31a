"""Where the pasted values come from: the *source* run of a sweep, and how it differs.

Every sweep compares two runs. The *target* is the run being patched; the *source* provides
the values pasted into it. The direction says which prompt plays which part, and an ablation
replaces the corrupted prompt altogether:

=============  ===========================  ============================================
ablation       source values                positions where source and target differ
=============  ===========================  ============================================
(none)         the other prompt's run       where any pair's clean and corrupted tokens differ
``"zero"``     zeros                        every position
``"mean"``     the mean over the dataset    where the prompts of the dataset disagree
``"noise"``    embeddings + Gaussian noise  the noised positions
=============  ===========================  ============================================

The last column is what lets a sweep skip work *deterministically*. The model is causal, so
an activation at position ``p`` depends only on positions ``0..p``: where the two runs agree
on all of those, the activation is the same in both, and a patch there changes nothing. The
decision comes from the tokens, never from comparing floats, so every CPU (and every kernel
set, thread count and library version) skips exactly the same patches.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, TypeVar

import torch

from .inputs import PreparedInputs

def noised_positions(inputs: PreparedInputs, noise_positions: Sequence[int] | None) -> list[int]:
    """The positions whose embeddings a noise ablation perturbs (default: all but the first,
    which in most prompts is a BOS-like token carrying no information)."""
    if noise_positions is None:
        return list(range(1, inputs.seq_len))
    return list(noise_positions)


def noise_hooks(model: Any, inputs: PreparedInputs, scale: float, noise_positions: Sequence[int] | None,
                seed: int, rows: tuple[slice, int] | None = None) -> list:
    """Hooks that add ROME-style Gaussian noise to the token embeddings of the noised positions.

    The noise has ``scale`` times the standard deviation of the embedding matrix and is drawn
    once per sweep from ``seed``, so every forward pass of the sweep sees the same noise.
    ``rows=(slice, n_pairs)``: ``inputs`` are those pairs of a dataset of ``n_pairs`` (a group of
    a grouped sweep), which get the rows of the whole dataset's draw.
    """
    positions = noised_positions(inputs, noise_positions)
    d_model = model.cfg.d_model
    gen = torch.Generator().manual_seed(seed)
    std = embedding_std(model) * scale
    n_pairs = inputs.batch if rows is None else rows[1]
    noise = torch.randn(n_pairs, len(positions), d_model, generator=gen) * std  # [pairs, n_noised, d_model]
    if rows is not None:
        noise = noise[rows[0]]                                                  # [batch, n_noised, d_model]

    def add_noise(embed: torch.Tensor, hook) -> torch.Tensor:
        embed = embed.clone()
        # Patches are stacked along the batch axis: each copy of the batch gets the same noise.
        embed[:, positions] += noise.to(embed.device, embed.dtype).repeat(embed.shape[0] // inputs.batch, 1, 1)
        return embed

    return [("hook_embed", add_noise)]


def embedding_std(model: Any) -> float:
    """Standard deviation of the token embedding matrix ``W_E`` (the unit of noise).

    Read inside :func:`patchwidgets.devices.materialized`: an embedding offloaded by accelerate
    (``device_map=...`` with ``"disk"``) holds ``meta`` placeholders between forward calls.
    A float32 matrix gives ``W_E.std()`` exactly; a half-precision one is summed in float64
    block by block (two passes), instead of being copied whole to float32.
    """
    from .devices import materialized
    from .sharing import exclusive

    with exclusive(model), materialized(getattr(model, "embed", None)):  # (loads offloaded weights: one caller)
        weight = model.W_E.detach()
        if weight.device.type == "meta":
            raise RuntimeError(
                "cannot read the token embedding W_E: it is on the meta device (offloaded, and "
                "accelerate did not load it). Load the model with the embedding on a real device "
                "to use ablation='noise'.")
        if weight.dtype == torch.float32:
            return float(weight.std())
        blocks = weight.reshape(-1, weight.shape[-1]).split(4096)
        n = weight.numel()
        mean = sum(float(b.double().sum()) for b in blocks) / n
        squares = sum(float(((b.double() - mean) ** 2).sum()) for b in blocks)
    return (squares / max(n - 1, 1)) ** 0.5


K = TypeVar("K")


def ablation_values(acts: Mapping[K, torch.Tensor], ablation: str,
                    means: Mapping[K, torch.Tensor] | None = None) -> dict[K, torch.Tensor]:
    """Source activations of a zero or mean ablation, built from the target run's ``acts``.

    The mean is taken in float64 and cast back. A float64 sum of a dataset's worth of equal
    float32 numbers is exact, so where every prompt has the same activation (a shared
    prefix) the mean is bit-identical to it on any CPU, whatever order the kernel adds in; a
    float32 sum of equal values rounds, differently from one kernel set to another.
    ``means``: the whole dataset's float64 means (``[1, ...]``) when ``acts`` are one group of
    it (:mod:`patchwidgets.driver`).
    """
    if ablation == "zero":
        return {n: torch.zeros_like(a) for n, a in acts.items()}
    if ablation != "mean":
        raise ValueError(f"ablation_values builds zero or mean ablations, not {ablation!r}")
    if means is not None:
        return {n: means[n].to(a.device, a.dtype).expand_as(a) for n, a in acts.items()}
    return {n: a.double().mean(0, keepdim=True).to(a.dtype).expand_as(a) for n, a in acts.items()}


def activation_sums(acts: Mapping[K, torch.Tensor]) -> dict[K, torch.Tensor]:
    """Float64 sums over the pairs (``[1, ...]``) of ``acts``: one group's share of a mean."""
    return {n: a.double().sum(0, keepdim=True) for n, a in acts.items()}


def differing_positions(inputs: PreparedInputs, ablation: str | None,
                        noise_positions: Sequence[int] | None = None) -> torch.Tensor:
    """``[seq_len]`` bool: the positions where the source run's input differs from the target's.

    See the table in the module docstring. Padding never differs: each clean/corrupted pair
    has the same length, so both prompts of a pair are padded at the same positions.
    """
    clean = inputs.clean_tokens  # [batch, pos]
    if ablation == "zero":
        return torch.ones(inputs.seq_len, dtype=torch.bool)
    if ablation == "mean":
        return (clean != clean[:1]).any(0)
    if ablation == "noise":
        changed = torch.zeros(inputs.seq_len, dtype=torch.bool)
        changed[noised_positions(inputs, noise_positions)] = True
        return changed
    assert inputs.corrupted_tokens is not None
    return (clean != inputs.corrupted_tokens).any(0)
