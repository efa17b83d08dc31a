"""Where a graph's senders and receivers are in a TransformerBridge (:mod:`patchwidgets.edges`).

Edge attribution (:mod:`patchwidgets.edge_attribution`) and exact edge patching
(:mod:`patchwidgets.edge_patching`) both need two things from the model, given here:

**Senders' outputs**, read from activations a forward pass records
(:data:`sender_hook_names`): the input node's is the residual entering block 0
(``blocks.0.hook_resid_pre``: token and position embeddings, scaled as the model scales them);
head ``H`` of layer ``L`` writes ``z_H @ W_O[H]`` (``blocks.L.attn.hook_z`` times the bridge's
``W_O``), and the MLP of layer ``L`` its ``blocks.L.hook_mlp_out``. :meth:`Senders.check`
makes sure that these really add up to the residual stream (the input, every head and MLP
output and each layer's ``b_O``), and refuses a model where they do not (post-attention
norms, for instance): there, "a sender's output" would not be what the receivers read.

**Each receiver's own input**, as a tensor of its own. A head's query, key and value inputs
are normally one residual stream, layer-normed once and projected for every head together,
so neither a gradient nor a patch can reach one head's query alone. TransformerLens 4 can
*fork* the stream per head before ``ln1`` (``use_split_qkv_input``: ``hook_q_input``,
``hook_k_input``, ``hook_v_input``, ``[batch, pos, heads, d_model]``, the key and value forks
per key-value head) and give the MLP branch its own entry before ``ln2``
(``use_hook_mlp_in``: ``hook_mlp_in``). :func:`split_inputs` turns both on for one pass and
restores the model's settings after it; the numbers are those of the model without forks (to
float rounding: ``tests/test_edges.py``). The logits' input is the final residual stream,
``blocks.{n-1}.hook_resid_post``, which only ``ln_final`` reads. :func:`receiver_hooks` lists
the hooks with the graph's receiver slots each one carries.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .devices import input_device, materialized
from .edges import Graph
from .errors import PatchingInputError
from .sharing import exclusive

__all__ = ["check_model", "split_inputs", "verify", "sender_hook_names", "Senders", "ReceiverHook",
           "receiver_hooks"]

_FLAGS = ("use_attn_in", "use_split_qkv_input", "use_hook_mlp_in")

# Models on which :func:`verify` passed (a fact about the architecture: checked once).
_VERIFIED: "weakref.WeakSet[Any]" = weakref.WeakSet()


def check_model(model: Any, what: str) -> None:
    """Refuse, with the reason, a model the edge tools cannot run (``what`` names the tool)."""
    from .nnsight_backend import is_nnsight_model

    if is_nnsight_model(model):
        raise PatchingInputError(
            f"{what} does not support nnsight models: it needs each head's query, key and value input as a "
            "tensor of its own, which TransformerLens 4 provides (use_split_qkv_input) and an nnsight trace of "
            "a Hugging Face model does not (its attention projects every head from one input). Load the model "
            "as a TransformerBridge instead: patchwidgets.load_model(name)", "model")
    blocks = getattr(model, "blocks", None)
    hooks = getattr(model, "hook_dict", None) or {}
    if not blocks or "blocks.0.attn.hook_z" not in hooks or not hasattr(model, "set_use_split_qkv_input"):
        raise PatchingInputError(
            f"{what} needs a TransformerLens 4 TransformerBridge (patchwidgets.load_model), with per-head hooks "
            f"and split q/k/v inputs; got {type(model).__name__}", "model")
    if "blocks.0.attn.hook_q_input" not in hooks or "blocks.0.hook_mlp_in" not in hooks:
        raise PatchingInputError(
            f"{what}: this model's attention ({type(blocks[0].attn).__name__}) has no per-head input forks "
            "(hook_q_input/hook_k_input/hook_v_input), so one head's input cannot be told from another's", "model")
    try:
        with split_inputs(model):
            pass
    except NotImplementedError as err:   # TransformerLens: an attention class without the fork
        raise PatchingInputError(f"{what}: this model cannot fork each head's input: {err}", "model") from None


def verify(model: Any, graph: Graph, tokens: torch.Tensor) -> None:
    """Check, once per model, that the graph describes it: on one prompt (``tokens``
    ``[1, pos]``), with the forks on, every fork carries its receiver's input (a head's q/k/v
    fork is the residual stream before ``ln1``, the MLP's the stream before ``ln2``), the
    residual stream is the sum of the senders' outputs (:meth:`Senders.check`), and the logits
    are those of the model without forks. Raises :class:`PatchingInputError` saying which
    part does not hold.
    """
    if model in _VERIFIED:
        return
    n = graph.n_layers
    streams = [f"blocks.{l}.hook_resid_{r}" for l in range(n) for r in ("pre", "mid")]
    names = [*sender_hook_names(graph), *streams, f"blocks.{n - 1}.hook_resid_post"]
    forks = [(h.name, h.layer) for h in receiver_hooks(graph)]
    acts: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(act: torch.Tensor, hook) -> None:
            acts[name] = act.detach()
        return hook
    tokens = tokens[:1].to(input_device(model))
    with torch.no_grad():
        with exclusive(model):
            plain = model(tokens)
        with split_inputs(model):
            forked = model.run_with_hooks(tokens, fwd_hooks=[(name, keep(name)) for name in
                                                             {*names, *(f for f, _ in forks)}])
    for name, layer in forks:
        fork = acts[name]
        if name.endswith("_input"):
            stream = acts[f"blocks.{layer}.hook_resid_pre"][:, :, None].expand_as(fork)
        elif name.endswith("mlp_in"):
            stream = acts[f"blocks.{layer}.hook_resid_{'pre' if graph.parallel_attn_mlp else 'mid'}"]
        else:
            continue   # (the final residual stream is the logits' input by definition)
        if fork.shape != stream.shape or not _close(fork, stream):
            raise PatchingInputError(
                f"{name} does not carry the residual stream its receivers read (before their LayerNorm) on this "
                f"model ({type(model.blocks[layer]).__name__}): a post-norm block, or an attention whose fork is "
                "taken after ln1? Its edges cannot be patched or scored", "model")
    Senders(model, graph).check(acts, acts[f"blocks.{n - 1}.hook_resid_post"])
    if not _close(forked, plain):
        raise PatchingInputError(
            "with each head's input forked (use_split_qkv_input) this model computes different logits "
            f"(largest difference {float((forked - plain).abs().max()):.3g}), so its edges cannot be scored", "model")
    with contextlib.suppress(TypeError):   # (a model that cannot be weakly referenced: checked every time)
        _VERIFIED.add(model)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    b = b.to(a.device)
    tol = max(1e-4, 64 * torch.finfo(a.dtype).eps) if a.dtype.is_floating_point else 0.0
    return float((a.float() - b.float()).abs().max()) <= tol * (1.0 + float(b.float().abs().max()))


@contextlib.contextmanager
def split_inputs(model: Any) -> Iterator[None]:
    """For one pass: every head's q/k/v input and every MLP's input forked as its own tensor.

    Holds the model's lock (:func:`patchwidgets.sharing.exclusive`) for the whole time the
    flags are on, so no other caller's pass runs with them, and restores them after.
    """
    with exclusive(model), contextlib.ExitStack() as stack:
        cfg = model.cfg
        before = {f: bool(getattr(cfg, f, False)) for f in _FLAGS}
        try:
            if before["use_attn_in"]:
                model.set_use_attn_in(False)
            model.set_use_split_qkv_input(True)
            model.set_use_hook_mlp_in(True)
            if any(p.device.type == "meta" for p in model.parameters()):
                _load_offloaded_projections(model, stack)
            yield
        finally:
            model.set_use_split_qkv_input(before["use_split_qkv_input"])
            model.set_use_hook_mlp_in(before["use_hook_mlp_in"])
            if before["use_attn_in"]:
                model.set_use_attn_in(True)


def _load_offloaded_projections(model: Any, stack: contextlib.ExitStack) -> None:
    """Hooks (removed when ``stack`` closes) that load each attention's offloaded weights for
    the length of its forward call.

    The forked path projects each head with the q/k/v weights read directly, not through the
    projections' forward calls, so accelerate never loads an offloaded (``meta``) weight there;
    :func:`patchwidgets.devices.materialized` does it for the attention's call, as accelerate
    would for the projections' own calls. One block's attention weights at a time.
    """
    loaded: list[contextlib.ExitStack] = []

    def unload_all() -> None:   # (a pass that raised inside an attention)
        while loaded:
            loaded.pop().close()
    stack.callback(unload_all)
    for block in model.blocks:
        def enter(module, args, attn=block.attn) -> None:
            inner = contextlib.ExitStack()
            inner.enter_context(materialized(attn))
            loaded.append(inner)

        def leave(module, args, output) -> None:
            if loaded:
                loaded.pop().close()
        for handle in (block.attn.register_forward_pre_hook(enter), block.attn.register_forward_hook(leave)):
            stack.callback(handle.remove)


def sender_hook_names(graph: Graph) -> list[str]:
    """The hooks whose activations give every sender's output."""
    names = ["blocks.0.hook_resid_pre"]
    for layer in range(graph.n_layers):
        names.append(f"blocks.{layer}.attn.hook_z")
        if not graph.attn_only:
            names.append(f"blocks.{layer}.hook_mlp_out")
    return names


class Senders:
    """Turns recorded activations into senders' outputs, in :attr:`Graph.senders` order.

    Holds each layer's ``W_O`` (``[heads, d_head, d_model]``) and ``b_O``, read once (loaded
    from disk for an offloaded model: :func:`patchwidgets.devices.materialized`).
    """

    def __init__(self, model: Any, graph: Graph):
        self.graph = graph
        self.w_o: list[torch.Tensor] = []
        self.b_o: list[torch.Tensor | None] = []
        for block in model.blocks:
            with materialized(block.attn):
                self.w_o.append(block.attn.W_O.detach().clone())
                b_o = getattr(block.attn, "b_O", None)
                self.b_o.append(None if b_o is None else b_o.detach().clone())

    def input(self, resid_pre0: torch.Tensor) -> torch.Tensor:
        """``[batch, pos, 1, d_model]``: the input node's output."""
        return resid_pre0.float()[:, :, None]

    def heads(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """``[batch, pos, heads, d_model]``: each head's ``z @ W_O`` from ``hook_z`` ``[batch, pos, heads, d_head]``."""
        w_o = self.w_o[layer]
        return torch.einsum("bphe,hed->bphd", z.float(), w_o.to(z.device, torch.float32))

    def layer(self, layer: int, z: torch.Tensor, mlp_out: torch.Tensor | None) -> torch.Tensor:
        """``[batch, pos, senders of the layer, d_model]``: the layer's heads, then its MLP."""
        heads = self.heads(layer, z)
        if mlp_out is None:
            return heads
        return torch.cat([heads, mlp_out.float().to(heads.device)[:, :, None]], 2)

    def all(self, acts: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[batch, pos, n_senders, d_model]`` (float32): every sender's output, from the
        activations :func:`sender_hook_names` (on the device of the input's)."""
        out = [self.input(acts["blocks.0.hook_resid_pre"])]
        device = out[0].device
        for layer in range(self.graph.n_layers):
            mlp = None if self.graph.attn_only else acts[f"blocks.{layer}.hook_mlp_out"]
            out.append(self.layer(layer, acts[f"blocks.{layer}.attn.hook_z"], mlp).to(device))
        return torch.cat(out, 2)

    def check(self, acts: dict[str, torch.Tensor], final: torch.Tensor) -> None:
        """Refuse a model whose residual stream is not the sum of the senders' outputs.

        ``acts``: :func:`sender_hook_names` and every ``blocks.L.hook_resid_pre`` of one run;
        ``final``: its final residual stream (``hook_resid_post`` of the last block). Each
        layer must add exactly its heads' ``z @ W_O``, its ``b_O`` and its MLP's output.
        """
        n = self.graph.n_layers
        for layer in range(n):
            before = acts[f"blocks.{layer}.hook_resid_pre"].float()
            after = (acts[f"blocks.{layer + 1}.hook_resid_pre"] if layer + 1 < n else final).float()
            added = self.heads(layer, acts[f"blocks.{layer}.attn.hook_z"]).sum(2)
            b_o = self.b_o[layer]
            if b_o is not None:
                added = added + b_o.float().to(added.device)
            if not self.graph.attn_only:
                added = added + acts[f"blocks.{layer}.hook_mlp_out"].float().to(added.device)
            want = (after - before).to(added.device)
            scale = 1.0 + float(after.abs().max())
            eps = torch.finfo(acts[f"blocks.{layer}.hook_resid_pre"].dtype).eps
            if float((added - want).abs().max()) > max(1e-4, 64 * eps) * scale:
                raise PatchingInputError(
                    f"layer {layer} of this model does not add its heads' outputs (z @ W_O), its b_O and its "
                    f"MLP's output to the residual stream (largest difference {float((added - want).abs().max()):.3g}"
                    f" at a residual of size {scale - 1:.3g}): a normalisation after attention or the MLP? Edges "
                    "are only defined when the residual stream is the sum of the components' outputs", "model")


@dataclass(frozen=True)
class ReceiverHook:
    """A hook carrying receiver inputs: slots ``first_slot .. first_slot + n_slots - 1`` of the
    graph, all reading the first ``upstream`` senders. ``per_head``: the hook's tensor has a
    head axis (``[batch, pos, n_slots, d_model]``); otherwise it is ``[batch, pos, d_model]``
    and ``n_slots`` is 1."""

    name: str
    layer: int
    first_slot: int
    n_slots: int
    upstream: int
    per_head: bool


def receiver_hooks(graph: Graph) -> list[ReceiverHook]:
    """Every hook that carries receiver inputs, in the order the model runs them.

    With ``qkv=False`` a head's one input feeds its query, key and value forks, so all three
    hooks carry the same slots (a patch goes into all three; gradients add up).
    """
    hooks = []
    slot = 0
    n, n_kv = graph.n_heads, graph.n_kv_heads
    for layer in range(graph.n_layers):
        up = graph.first_sender(layer)
        name = f"blocks.{layer}.attn.hook_{{}}_input".format
        if graph.qkv:
            hooks += [ReceiverHook(name("q"), layer, slot, n, up, True),
                      ReceiverHook(name("k"), layer, slot + n, n_kv, up, True),
                      ReceiverHook(name("v"), layer, slot + n + n_kv, n_kv, up, True)]
            slot += n + 2 * n_kv
        else:
            hooks += [ReceiverHook(name(c), layer, slot, n, up, True) for c in "qkv"]
            slot += n
        if not graph.attn_only:
            hooks.append(ReceiverHook(f"blocks.{layer}.hook_mlp_in", layer, slot, 1, graph.slots[slot].upstream,
                                      False))
            slot += 1
    hooks.append(ReceiverHook(f"blocks.{graph.n_layers - 1}.hook_resid_post", graph.n_layers, slot, 1,
                              graph.slots[slot].upstream, False))
    assert slot == len(graph.slots) - 1
    return hooks
