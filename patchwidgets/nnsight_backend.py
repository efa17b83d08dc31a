"""Patching on an nnsight model: :func:`patchwidgets.patch` and :func:`patchwidgets.attribution_patch`
for ``nnsight.TransformersModel``.

``pw.patch(model, ...)`` hands an nnsight model (``nnsight.TransformersModel``, or its
deprecated alias ``nnsight.LanguageModel``) to :func:`patch` here. The sweep is the same as on
a ``TransformerBridge``: the same input checks (:func:`patchwidgets.inputs.prepare` on a small
adapter object, :class:`NNsightModelInfo`), the same sites, directions, ablations and metrics,
the same list of patches with the same no-ops skipped, and the same :class:`PatchResult`,
grid for grid. Only the forward passes differ: they are nnsight traces.

How a sweep runs
----------------
1. **Two recording traces**, one per run (target and source): an invoke with the run's tokens
   (which also adds the embedding noise of a noise ablation), then one input-less invoke per
   activation the sweep needs, each saving that activation, and a last one saving the logits
   at each prompt's answer position. Input-less invokes see the whole batch and nnsight serves
   them in the model's order, so no code here depends on the order modules run in.
2. **Patch traces.** Each patch is one invoke of the target tokens: it reads its activation,
   pastes the source slice into a copy and puts the copy back (the right-hand side must not
   read the module: nnsight evaluates reads in model order, so read first, then write). A
   trace holds as many invokes as ``max_batch_tokens`` allows (rows x positions); a final
   input-less invoke saves the answer-position logits of all of them at once.
3. Logits are computed at the answer positions only (``logits_to_keep=<positions>`` when the
   model's forward accepts it), and :func:`patchwidgets.metrics.compute` turns them into
   metrics exactly as for a bridge.

Sites
-----
Where each site lives is read from TransformerLens 4's architecture adapter for the model's
Hugging Face config (the adapter ``TransformerBridge.boot_transformers`` would pick, through
TransformerLens' own ``ArchitectureAdapterFactory``): its ``component_mapping`` names the HF
modules, e.g. ``blocks -> transformer.h``, ``blocks.attn.o -> attn.c_proj``,
``blocks.mlp.out -> mlp.c_proj`` for GPT-2 and ``model.layers``, ``self_attn.o_proj``,
``mlp.down_proj`` for Llama. No module names are written here.

==================================  ==========================================================
site                                nnsight value
==================================  ==========================================================
``resid_pre``                       input of block ``layer``
``resid_post``                      output of block ``layer``
``attn_out``                        output of the attention's output projection (``attn.o``)
``mlp_out``                         output of the MLP
``head_out``, ``head_out_by_pos``   input of ``attn.o``, viewed as ``[..., head, d_head]``
``neuron``, ``neuron_by_pos``       input of the MLP's down projection (``mlp.out``)
``head_q/k/v`` (+ ``_by_pos``)      output of ``attn.q``/``k``/``v`` as ``[..., head, d_head]``
                                    (before rotary embeddings, like the bridge's ``hook_q``);
                                    for GPT-2's fused ``c_attn`` its first/second/third part
==================================  ==========================================================

The fused ``qkv`` layout is known for GPT-2 only (the adapter's class says which model it is);
q/k/v of other fused-projection models are refused.

Not supported (a :class:`~patchwidgets.errors.UnknownSiteError` lists the supported sites):
``head_pattern`` (and so ``heads_every``), which no module outputs; ``resid_mid``, because on
a bridge patching ``hook_resid_mid`` replaces only the input of the MLP's LayerNorm while the
residual stream carried past the MLP keeps the unpatched value (unlike ``HookedTransformer``),
so there is no single nnsight value that reproduces it and means "the residual stream"; raw
hook names (``index=``). :func:`patchwidgets.path_patch` does not take nnsight models.

Attribution patching
--------------------
:func:`patchwidgets.attribution_patch` on an nnsight model runs :func:`attribution_patch` here:
the two recording traces above, then one trace per distinct gradient that runs the target
forward and backward (nnsight's ``with scalar.backward():`` block) and saves the gradient at
every site. Same sites as patching; queries and keys get plain AtP (no pattern to rebuild).

Loading: ``nnsight.TransformersModel(hf_model, tokenizer=tok, task="text-generation")`` or
``nnsight.TransformersModel(folder, task="text-generation", dispatch=True)``; with nnsight
0.8.1 a lazily loaded local folder (no ``dispatch=True``, no ``tokenizer=``) fails inside
nnsight ("Impossible to guess which tokenizer to use"). A lazily loaded model is dispatched
before the sweep.

Remote execution (NDIF)
-----------------------
``patch(model, ..., remote=True)`` passes ``remote=True`` to every ``model.trace(...)`` and
changes nothing else: the trace bodies are the same code, and they use only torch, the model's
envoys and values computed before the trace (slices, noise, positions). **This was not run**:
it needs NDIF and an API key, and this package is developed offline. On NDIF every trace is
a request, and saved activations travel both ways.
"""

from __future__ import annotations

import copy
import functools
import inspect
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .atp import QK_SITES, AttributionResult, attribution_result, differentiated_metric, gradient_groups, site_estimates
from .errors import PatchingInputError, UnknownSiteError
from .inputs import Prompts
from .results import PatchResult
from .sharing import exclusive
from .sites import Site, resolve_sites
from .sources import ablation_values, activation_sums, noised_positions
from .driver import SweepControl, run_sweep
from .sweep import new_result, prepare_request, sweep_cells

#: The sites the nnsight backend can patch (groups made only of these work too: ``block``).
SUPPORTED_SITES = (
    "resid_pre", "resid_post", "attn_out", "mlp_out", "head_out", "head_out_by_pos",
    "head_q", "head_k", "head_v", "head_q_by_pos", "head_k_by_pos", "head_v_by_pos",
    "neuron", "neuron_by_pos",
)
_WHY_NOT = {
    "head_pattern": "no module outputs the attention pattern (it is computed inside the "
                    "attention function)",
    "head_pattern_by_pos": "no module outputs the attention pattern",
    "resid_mid": "on a TransformerBridge this site only replaces the input of the MLP's "
                 "LayerNorm, not the residual stream, and the nnsight backend does not copy that",
}


def is_nnsight_model(model: Any) -> bool:
    """Whether ``model`` is an nnsight model. Never imports nnsight: if it is not imported yet,
    nothing can be an nnsight model."""
    nnsight = sys.modules.get("nnsight")
    envoy = getattr(nnsight, "Envoy", None) if nnsight is not None else None
    return envoy is not None and isinstance(model, envoy)


# ---------------------------------------------------------------------------------- model info
def _architecture_adapter(hf_config: Any):
    """TransformerLens' architecture adapter for a Hugging Face config, chosen the way
    ``TransformerBridge.boot_transformers`` chooses it (sources/transformers/source.py)."""
    from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_config_from_hf
    from transformer_lens.model_bridge.sources._hf_format import determine_architecture_from_hf_config

    hf_config = copy.deepcopy(hf_config)
    architecture = determine_architecture_from_hf_config(hf_config)
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    bridge_config = build_bridge_config_from_hf(
        hf_config, architecture, getattr(hf_config, "_name_or_path", "") or "nnsight-model",
        dtype if isinstance(dtype, torch.dtype) else torch.float32)
    return ArchitectureAdapterFactory.select_architecture_adapter(bridge_config)


@dataclass(frozen=True)
class Point:
    """One place in the HF module tree: the ``port`` (``"input"``/``"output"``) of ``path``.

    ``heads``/``d_head``/``offset``: the value is viewed as ``[..., heads, d_head]`` after
    narrowing its last axis to ``offset .. offset + heads * d_head`` (``heads=None``: as is).
    """

    path: str
    port: str
    heads: int | None = None
    d_head: int | None = None
    offset: int = 0

    def view(self, value: torch.Tensor) -> torch.Tensor:
        """The value in the site's layout (a view, so writes land in ``value``)."""
        if self.heads is None or self.d_head is None:
            return value
        return value.narrow(-1, self.offset, self.heads * self.d_head).unflatten(-1, (self.heads, self.d_head))


class NNsightModelInfo:
    """What :func:`patchwidgets.inputs.prepare` and the sweep need to know about an nnsight model.

    A small stand-in for a ``TransformerBridge``: ``tokenizer``, ``to_tokens``,
    ``to_str_tokens`` and ``cfg`` (TransformerLens' config for the model: ``d_vocab``,
    ``n_ctx``, ``n_layers``, ``n_heads``, ``d_head``, ...), plus :meth:`point`, where each site
    lives. The nnsight model itself is not modified; a word-level tokenizer is made strict
    (unknown words raise) on a copy, as :func:`patchwidgets.load_model` does for bundled models.
    """

    def __init__(self, model: Any):
        hf = getattr(model, "_module", None)
        config = getattr(hf, "config", None)
        if config is None:
            raise PatchingInputError(
                "the nnsight backend needs an nnsight model of a Hugging Face causal language "
                "model, e.g. nnsight.TransformersModel(path_or_hf_model, task='text-generation')")
        self.model = model
        self.hf_model = hf
        try:
            self.adapter = _architecture_adapter(config)
        except ValueError as err:
            raise PatchingInputError(
                f"TransformerLens has no architecture adapter for this model ({err}), so the "
                "nnsight backend does not know where its blocks, attention and MLP are") from err
        self.cfg = self.adapter.cfg
        self.tokenizer = self._own_tokenizer(getattr(model, "tokenizer", None), config)
        forward = getattr(hf, "forward", None)
        try:
            self.keeps_logits = forward is not None and "logits_to_keep" in inspect.signature(forward).parameters
        except (TypeError, ValueError):
            self.keeps_logits = False

    @staticmethod
    def _own_tokenizer(tokenizer: Any, config: Any) -> Any:
        if tokenizer is None:
            return None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or type(backend.model).__name__ != "WordLevel" or tokenizer.unk_token_id is None:
            return tokenizer
        from .loading import list_models
        from .tokenizer import make_strict

        name = Path(str(getattr(config, "_name_or_path", "") or "")).name
        return make_strict(copy.deepcopy(tokenizer), vocabulary_name=name if name in list_models() else None)

    # --- what prepare() calls
    def to_tokens(self, text: str, prepend_bos: bool | None = None, truncate: bool = True) -> torch.Tensor:
        """``[1, pos]`` token ids of ``text``, with BOS first when the model's TransformerLens
        config prepends one (``default_prepend_bos``), as ``TransformerBridge.to_tokens`` does."""
        if prepend_bos is None:
            prepend_bos = getattr(self.cfg, "default_prepend_bos", True)
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        bos = self.tokenizer.bos_token_id
        if prepend_bos and bos is not None:
            ids = [bos, *ids]
        return torch.tensor([ids], dtype=torch.long)

    def to_str_tokens(self, tokens: torch.Tensor) -> list[str]:
        rows = [[int(t)] for t in torch.as_tensor(tokens).reshape(-1).tolist()]
        return list(self.tokenizer.batch_decode(rows, clean_up_tokenization_spaces=False))

    # --- where the sites are
    def module_name(self, tl_path: str) -> str:
        """The HF module path of a TransformerLens component path (``"blocks.3.attn.o"``)."""
        try:
            return self.adapter.translate_transformer_lens_path(tl_path)
        except ValueError as err:
            raise PatchingInputError(
                f"the {type(self.adapter).__name__} has no {tl_path!r} component, so the nnsight "
                f"backend cannot find it in this model ({err})", "site") from err

    def point(self, site: Site, layer: int) -> Point:
        """Where ``site`` of ``layer`` lives in the HF model."""
        cfg, name = self.cfg, site.name.removesuffix("_by_pos")
        block = f"blocks.{layer}"
        if name == "resid_pre":
            return Point(self.module_name(block), "input")
        if name == "resid_post":
            return Point(self.module_name(block), "output")
        if name == "attn_out":
            return Point(self.module_name(f"{block}.attn.o"), "output")
        if name == "mlp_out":
            return Point(self.module_name(f"{block}.mlp"), "output")
        if name == "neuron":
            return Point(self.module_name(f"{block}.mlp.out"), "input")
        if name == "head_out":
            return Point(self.module_name(f"{block}.attn.o"), "input", cfg.n_heads, cfg.d_head)
        if name in ("head_q", "head_k", "head_v"):
            return self._qkv_point(block, name[-1])
        raise unsupported_site(site.name)

    def _qkv_point(self, block: str, which: str) -> Point:
        cfg = self.cfg
        n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
        heads = cfg.n_heads if which == "q" else n_kv
        from transformer_lens.model_bridge.supported_architectures.gpt2 import GPT2ArchitectureAdapter

        attn = self.adapter.component_mapping["blocks"].submodules["attn"]
        if "qkv" not in attn.submodules and which in attn.submodules:
            # Separate query/key/value projections: their outputs (before rotary embeddings).
            return Point(self.module_name(f"{block}.attn.{which}"), "output", heads, cfg.d_head)
        if "qkv" in attn.submodules and isinstance(self.adapter, GPT2ArchitectureAdapter):
            # A fused projection (the adapter's q/k/v are then synthetic, split by the bridge).
            # GPT-2's c_attn outputs [q | k | v] (HF: `c_attn(x).split(split_size, dim=2)`).
            offset = "qkv".index(which) * cfg.n_heads * cfg.d_head
            return Point(self.module_name(f"{block}.attn.qkv"), "output", heads, cfg.d_head, offset)
        raise PatchingInputError(
            f"the nnsight backend cannot patch head_{which} of a {type(self.adapter).__name__} "
            "model: its attention has no separate query/key/value projections and its fused "
            f"projection's layout is not known here. Supported sites: {', '.join(SUPPORTED_SITES)}",
            "site")


def unsupported_site(name: str) -> PatchingInputError:
    why = _WHY_NOT.get(name, "it is not a site the nnsight backend knows")
    return UnknownSiteError(
        f"site {name!r} is not supported on nnsight models: {why}. Sites the nnsight backend "
        f"supports: {', '.join(SUPPORTED_SITES)} (and the group 'block'). For every site, load "
        "the model with patchwidgets.load_model (a TransformerBridge).")


def _envoy(model: Any, path: str) -> Any:
    env = model
    for part in path.split("."):
        env = env[int(part)] if part.isdigit() else getattr(env, part)
    return env


# ---------------------------------------------------------------------------------- runs
@dataclass
class _Run:
    """One run of a sweep on nnsight: tokens, optional embedding noise, where logits are read."""

    info: NNsightModelInfo
    tokens: torch.Tensor          # [batch, pos]
    answer_pos: torch.Tensor      # [batch]
    noise: tuple | None = None    # (embedding path, noised positions, unit noise, scale)
    remote: bool = False
    noise_scale: float | None = None  # noise standard deviation, read by `record`

    def __post_init__(self):
        self.batch = self.tokens.shape[0]
        # Logits only at the answer positions: `logits_to_keep` takes a tensor of positions.
        keep = torch.unique(self.answer_pos)
        self.keep = keep if self.info.keeps_logits else None
        self.column = torch.searchsorted(keep, self.answer_pos) if self.info.keeps_logits else self.answer_pos
        device = _device(self.info.hf_model)
        self.encoding = {"input_ids": self.tokens.to(device),
                         "attention_mask": torch.ones_like(self.tokens, device=device)}

    def _trace(self):
        kwargs = {"remote": self.remote}
        if self.keep is not None:
            kwargs["logits_to_keep"] = self.keep
        return self.info.model.trace(**kwargs)

    def record(self, points: Sequence[Point]) -> tuple[torch.Tensor, dict[Point, torch.Tensor]]:
        """Run once: answer logits ``[batch, vocab]`` and the value at each of ``points``."""
        import nnsight

        # Only torch, builtins and envoys inside traces: the same code then runs on NDIF, where
        # patchwidgets is not installed.
        model, encoding, noise = self.info.model, self.encoding, self.noise
        envoys = [_envoy(model, p.path) for p in points]
        ports = [p.port for p in points]
        embed: Any = _envoy(model, noise[0]) if noise is not None else None
        rows = torch.arange(self.batch)
        column = self.column
        with torch.no_grad(), exclusive(model):  # (one caller of the model at a time: .sharing)
            with self._trace() as tracer:
                # One saved list (what a trace returns are its saved values, by variable name,
                # also from NDIF), filled by the invokes in the model's order, not the list's.
                saved = nnsight.save([None] * len(points))
                with tracer.invoke(encoding):
                    if noise is not None:
                        weight = embed.weight.detach()
                        std = (weight.std() if weight.dtype == torch.float32 else weight.float().std()).save()
                        noised = embed.output.clone()
                        noised[:, noise[1]] += (noise[2] * (float(std) * noise[3])).to(noised.device, noised.dtype)
                        embed.output = noised
                for j, (env, port) in enumerate(zip(envoys, ports)):
                    with tracer.invoke():
                        if port == "input":
                            value = env.input
                        else:
                            value = env.output
                            value = value[0] if isinstance(value, tuple) else value
                        saved[j] = value.detach().clone()
                with tracer.invoke():
                    out = model.output
                    logits = out.logits if hasattr(out, "logits") else out[0]
                    answer = logits[rows.to(logits.device), column.to(logits.device)].save()
        if noise is not None:
            self.noise_scale = float(std) * noise[3]
        return answer, dict(zip(points, saved))

    def patched(self, writes: Sequence[tuple[Point, tuple, torch.Tensor]]) -> torch.Tensor:
        """Answer logits ``[len(writes), batch, vocab]``: one invoke per patch, each pasting
        ``values`` into slice ``sl`` of its point (in the site's layout)."""
        model, encoding, noise = self.info.model, self.encoding, self.noise
        # Plain values for the trace (see `record`): envoy, port, head layout, slice, values.
        plan = [(_envoy(model, p.path), p.port,
                 None if p.heads is None or p.d_head is None else (p.offset, p.heads, p.d_head),
                 sl, values) for p, sl, values in writes]
        if noise is not None:  # its scale was read when this run was recorded
            embed, scale = _envoy(model, noise[0]), self.noise_scale
        k = len(writes)
        rows = torch.arange(k * self.batch)
        column = self.column.repeat(k)
        with torch.no_grad(), exclusive(model):  # (one caller of the model at a time: .sharing)
            with self._trace() as tracer:
                for env, port, heads, sl, values in plan:
                    with tracer.invoke(encoding):
                        if noise is not None:
                            noised = embed.output.clone()
                            noised[:, noise[1]] += (noise[2] * scale).to(noised.device, noised.dtype)
                            embed.output = noised
                        # Read first, then write: the read is served when the model gets there.
                        if port == "input":
                            value = env.input
                        else:
                            out = env.output
                            value = out[0] if isinstance(out, tuple) else out
                        new = value.clone()
                        view = new if heads is None else \
                            new.narrow(-1, heads[0], heads[1] * heads[2]).unflatten(-1, heads[1:])
                        view[sl] = values.to(new.device, new.dtype)  # a view: lands in `new`
                        if port == "input":
                            env.input = new
                        elif isinstance(out, tuple):
                            env.output = (new, *out[1:])
                        else:
                            env.output = new
                with tracer.invoke():
                    out = model.output
                    logits = out.logits if hasattr(out, "logits") else out[0]
                    answer = logits[rows.to(logits.device), column.to(logits.device)].save()
        return answer.reshape(k, self.batch, -1)


    def gradients(self, values: Sequence[tuple[str, str]],
                  weights: torch.Tensor) -> dict[tuple[str, str], torch.Tensor]:
        """The gradient of ``sum(weights * answer logits)`` at each ``(module path, port)``
        value of this run (``values`` in the model's order; ``weights``: ``[batch, vocab]``).

        One trace: the forward pass with gradients on, then nnsight's backward block, which
        serves ``.grad`` in reverse order. A value the model computes without a graph (frozen
        weights) is replaced by a leaf that requires one, as the bridge's attribution does.
        """
        import nnsight

        model, encoding, noise = self.info.model, self.encoding, self.noise
        envoys = [(_envoy(model, path), port) for path, port in values]
        if noise is not None:
            embed, scale = _envoy(model, noise[0]), self.noise_scale
        rows, column = torch.arange(self.batch), self.column
        weights = weights.detach()
        with torch.enable_grad(), exclusive(model):
            with self._trace() as tracer:
                grads = nnsight.save([None] * len(envoys))
                with tracer.invoke(encoding):
                    if noise is not None:
                        noised = embed.output.clone()
                        noised[:, noise[1]] += (noise[2] * scale).to(noised.device, noised.dtype)
                        embed.output = noised
                    read = []
                    for env, port in envoys:
                        if port == "input":
                            value = env.input
                        else:
                            out = env.output
                            value = out[0] if isinstance(out, tuple) else out
                        if not value.requires_grad:  # frozen weights: start the graph here
                            value = value.detach().requires_grad_(True)
                            if port == "input":
                                env.input = value
                            elif isinstance(out, tuple):
                                env.output = (value, *out[1:])
                            else:
                                env.output = value
                        read.append(value)
                    out = model.output
                    logits = out.logits if hasattr(out, "logits") else out[0]
                    answer = logits[rows.to(logits.device), column.to(logits.device)]   # [batch, vocab]
                    scalar = (answer.float() * weights.to(answer.device)).sum()
                    with scalar.backward():
                        for j in range(len(read) - 1, -1, -1):
                            grads[j] = read[j].grad.detach().clone()
        return dict(zip(values, grads))


def _device(hf_model: Any) -> torch.device:
    param = next(iter(hf_model.parameters()), None)
    if param is None or param.device.type == "meta":  # a remote model's local copy has no weights
        return torch.device("cpu")
    return param.device


def _noise(info: NNsightModelInfo, inputs, scale: float, noise_positions, seed: int,
           group: tuple[slice, int] | None = None) -> tuple:
    """The embedding noise of a noise ablation, drawn exactly as :func:`sources.noise_hooks`
    draws it (same generator, same shape, same scale, a group's rows of the dataset's draw):
    unit noise here, times ``scale`` times the embedding matrix's standard deviation, which the
    recording trace of the noised run reads (so it works on a remote model, whose local copy
    has no weights, too)."""
    positions = noised_positions(inputs, noise_positions)
    gen = torch.Generator().manual_seed(seed)
    unit = torch.randn(inputs.batch if group is None else group[1], len(positions), info.cfg.d_model, generator=gen)
    if group is not None:
        unit = unit[group[0]]
    return (info.module_name("embed"), positions, unit, scale)


# ---------------------------------------------------------------------------------- the sweep
@dataclass
class _Sweep:
    """What :func:`patch` and :func:`attribution_patch` prepare alike: the checked request, its
    cells, where each (site, layer) lives, and the target and source runs."""

    info: NNsightModelInfo
    request: Any                         # sweep.Request
    cells: Any                           # sweep.Cells
    where: dict[tuple[str, int], Point]  # (site name, layer) -> point
    target: _Run
    source: _Run

    @property
    def points(self) -> list[Point]:
        return list(dict.fromkeys(self.where.values()))

    @property
    def ablated(self) -> bool:
        return self.request.ablation in ("zero", "mean")

    def module_values(self) -> list[tuple[str, str]]:
        """The distinct ``(module path, port)`` values behind the points, in the order the
        model computes them (one invoke reads them in that order). Several points can share
        one value: GPT-2's fused ``c_attn`` output holds q, k and v."""
        order = {"resid_pre": 0, "head_q": 1, "head_k": 2, "head_v": 3, "head_out": 4, "attn_out": 5,
                 "neuron": 6, "mlp_out": 7, "resid_post": 8}
        ranked = sorted(self.where.items(), key=lambda item: (item[0][1], order[item[0][0].removesuffix("_by_pos")]))
        return list(dict.fromkeys((p.path, p.port) for _, p in ranked))


def _prepare(model: Any, clean: Prompts, corrupted: Prompts | None, answers: Any, site: str, direction: Any,
             metrics: Any, *, ablation: Any, noise: Any, noise_positions: Any, noise_seed: Any, layers: Any,
             positions: Any, heads: Any, neurons: Any, index: Any, remote: bool, gradient: bool = False) -> _Sweep:
    if not is_nnsight_model(model):
        raise PatchingInputError("the nnsight backend (and remote=True, which runs on NDIF) needs an "
                                 "nnsight model (nnsight.TransformersModel); this model is not one")
    if not remote and not getattr(model, "dispatched", True):
        model.dispatch()  # load the weights of a lazily loaded model (nnsight would on the first trace)
    info = NNsightModelInfo(model)
    request = prepare_request(info, clean, corrupted, answers, direction, metrics, ablation=ablation,
                              noise=noise, noise_positions=noise_positions, noise_seed=noise_seed, gradient=gradient)
    inputs = request.inputs
    try:
        sites = resolve_sites(site)
    except UnknownSiteError:
        raise unsupported_site(site) from None
    for s in sites:
        if s.name not in SUPPORTED_SITES:
            raise unsupported_site(s.name)
    if index is not None:
        raise PatchingInputError("index= is for hook-name sites, which the nnsight backend does not "
                                 "support; restrict a sweep with layers=, positions=, heads=, neurons=", "site")
    cells = sweep_cells(info, inputs, site, layers=layers, positions=positions, heads=heads, neurons=neurons)
    where = {(s.name, layer): info.point(s, layer) for s in cells.sites
             for layer in sorted({i[0] for i in cells.indices})}
    return _Sweep(info, request, cells, where, *_runs(info, request, remote))


def _prepare_from(model: Any, arguments: dict[str, Any], gradient: bool = False) -> _Sweep:
    """:func:`_prepare` from an entry point's own arguments, by name (its ``locals()``)."""
    names = ("clean", "corrupted", "answers", "site", "direction", "metrics")
    options = ("ablation", "noise", "noise_positions", "noise_seed", "layers", "positions", "heads", "neurons",
               "index", "remote")
    return _prepare(model, *(arguments[n] for n in names), gradient=gradient, **{n: arguments[n] for n in options})


def _runs(info: NNsightModelInfo, request: Any, remote: bool) -> tuple[_Run, _Run]:
    """The target run (patched into) and the source run (the values; the target itself when
    ablated) of ``request``, or of one group of it."""
    inputs = request.inputs
    noise_spec = _noise(info, inputs, request.noise, request.noise_positions, request.noise_seed, request.group) \
        if request.ablation == "noise" else None
    corrupted_tokens = inputs.clean_tokens if request.ablation else inputs.corrupted_tokens
    assert corrupted_tokens is not None  # (validation: a corrupted prompt unless ablating)
    clean_run = _Run(info, inputs.clean_tokens, inputs.answer_pos, remote=remote)
    corrupted_run = _Run(info, corrupted_tokens, inputs.answer_pos, noise_spec, remote)
    return (corrupted_run, clean_run) if request.direction == "denoising" else (clean_run, corrupted_run)


def _unpatched(sweep: _Sweep) -> tuple[Any, torch.Tensor, dict[Point, torch.Tensor], dict[Point, torch.Tensor]]:
    """The two recording traces: the metrics, the target's answer logits ``[batch, vocab]``,
    and the target's and source's values at every point."""
    target_logits, target_acts = sweep.target.record(sweep.points)
    if sweep.ablated:
        source_logits, source_acts = None, ablation_values(target_acts, sweep.request.ablation or "")
    else:
        source_logits, source_acts = sweep.source.record(sweep.points)
    return sweep.request.measure(target_logits, source_logits), target_logits, target_acts, source_acts


@torch.no_grad()
def patch(model: Any, arguments: dict[str, Any], control: SweepControl) -> PatchResult:
    """:func:`patchwidgets.patch` for an nnsight model: ``arguments`` are that call's own (by
    name), ``control`` how it runs; same result, through :func:`patchwidgets.driver.run_sweep`.

    ``remote=True`` runs every trace on NDIF (``model.trace(remote=True)``; needs nnsight's
    NDIF API key). Not tested offline: see the module docstring.
    """
    sweep = _prepare_from(model, arguments)
    inputs = sweep.request.inputs
    worst = inputs.batch * inputs.seq_len * sweep.info.cfg.n_layers * len(sweep.cells.indices) * len(sweep.cells.sites)
    return run_sweep(NNsightBackend(sweep, control.max_batch_tokens, bool(arguments["remote"])), sweep.request,
                     control, worst_case_work=worst)


@dataclass
class NNsightBackend:
    """The driver's backend for nnsight models: recording traces, then one trace per chunk of
    patches (each patch an invoke). Nothing to hook, so the watch checks between traces."""

    sweep: _Sweep
    max_batch_tokens: int
    remote: bool
    passes_per_job: int = 1

    @property
    def model(self) -> Any:
        return self.sweep.info.model   # (the watch finds no blocks on it: it checks between traces)

    def first_positions(self, request: Any) -> list[int | None]:
        return [p.first_pos for p in self.sweep.cells.patches(request.changed)]

    def new_result(self, request: Any, measure: Any, first_pos: list[int | None]) -> PatchResult:
        cells = self.sweep.cells
        return new_result(PatchResult, request, measure, sites=cells.names, axes=cells.axes, shape=cells.shape,
                          indices=cells.indices, first_pos=first_pos)

    def bytes_per_pair(self, request: Any) -> int:
        # Both runs' values at every point, [pos, d_model]-sized or smaller (no resumed passes).
        return 2 * len(self.sweep.points) * request.inputs.seq_len * self.sweep.info.cfg.d_model * 4

    def baselines(self, request: Any, watch: Any, mean: bool) -> tuple:
        target, source = _runs(self.sweep.info, request, self.remote)
        watch.check()
        target_logits, target_acts = target.record(self.sweep.points)
        source_logits = None if self.sweep.ablated else source.record(self.sweep.points)[0]
        return target_logits, source_logits, (activation_sums(target_acts) if mean else None)

    def group(self, request: Any, watch: Any, means: dict | None) -> "_NNsightRuns":
        target, source = _runs(self.sweep.info, request, self.remote)
        watch.check()
        target_logits, target_acts = target.record(self.sweep.points)
        if self.sweep.ablated:
            source_logits, source_acts = None, ablation_values(target_acts, request.ablation or "", means)
        else:
            source_logits, source_acts = source.record(self.sweep.points)
        return _NNsightRuns(self, target, request, target_logits, source_logits, source_acts, watch)


@dataclass
class _NNsightRuns:
    backend: NNsightBackend
    target: _Run
    request: Any
    target_logits: torch.Tensor
    source_logits: torch.Tensor | None
    source_acts: dict
    watch: Any

    def jobs(self, todo: list[int]) -> list:
        sweep, inputs = self.backend.sweep, self.request.inputs
        patches = sweep.cells.patches(self.request.changed)
        per_trace = max(1, self.backend.max_batch_tokens // (inputs.batch * inputs.seq_len))
        chunks = [[patches[slot] for slot in todo[i:i + per_trace]] for i in range(0, len(todo), per_trace)]

        def writes(chunk: list) -> list:
            out = []
            for p in chunk:
                point = sweep.where[(p.site.name, p.index[0])]
                sl = p.site.slice(p.index)
                out.append((point, sl, point.view(self.source_acts[point])[sl]))
            return out

        def run(chunk: list) -> torch.Tensor:
            self.watch.check()
            logits = self.target.patched(writes(chunk))
            self.watch.advance(len(chunk) * self._pass_work())
            return logits
        return [([p.slot for p in chunk], functools.partial(run, chunk)) for chunk in chunks]

    def _pass_work(self) -> int:
        inputs = self.request.inputs
        return inputs.batch * inputs.seq_len * self.backend.sweep.info.cfg.n_layers

    def work(self, jobs: list) -> int:
        return sum(len(slots) for slots, _ in jobs) * self._pass_work()

    def report(self) -> dict:
        return {"resumed": 0, "prefix_skipped": 0,
                "fallback_reason": "nnsight backend: every patch runs the whole model"}


def attribution_patch(model: Any, arguments: dict[str, Any]) -> AttributionResult:
    """:func:`patchwidgets.attribution_patch` for an nnsight model: ``arguments`` are that call's
    own, by name; same result.

    Two recording traces (as :func:`patch`), then one trace per distinct gradient
    (:func:`~patchwidgets.atp.gradient_groups`: one for ``logit_diff`` and
    ``normalized`` together) that runs the target forward and backward and saves the
    gradient at each site. The metric is a function of the answer logits only, so its
    gradient with respect to them, ``w = dM/dlogits``, is computed here first and the trace
    backpropagates ``sum(w * logits)``: nothing but torch runs inside the trace, and
    ``remote=True`` (not run offline) sends the same trace to NDIF.

    Queries and keys get plain AtP (``result.method == "atp"`` where they are swept): the
    AtP* fix rebuilds the attention pattern from them, and the nnsight backend has no pattern.
    Every other site gives the bridge's estimates (``tests/test_nnsight.py``).
    """
    sweep = _prepare_from(model, arguments, gradient=True)
    qk_fix = arguments["qk_fix"]
    request, cells, where = sweep.request, sweep.cells, sweep.where
    with torch.no_grad():
        measure, target_logits, target_acts, source_acts = _unpatched(sweep)
    qk_swept = any(s.name in QK_SITES for s in cells.sites)
    if qk_fix and qk_swept:
        warnings.warn("the nnsight backend has no attention pattern to rebuild: plain AtP for queries and "
                      "keys (AtP* needs a TransformerBridge)", stacklevel=3)

    # Each (site, layer) in the bridge's hook layout, keyed by the bridge's hook name.
    hooks = {s.hook_name(layer): point for (name, layer), point in where.items() for s in cells.sites
             if s.name == name}
    values = sweep.module_values()
    groups = gradient_groups(request.metric_fns)
    per_group: dict[str, list[torch.Tensor]] = {}
    for key in groups:
        logits = target_logits.detach().float().requires_grad_(True)
        with torch.enable_grad():
            scalar = differentiated_metric(key, request.metric_fns, logits, measure.ctx)
            (weights,) = torch.autograd.grad(scalar.sum(), logits)        # [batch, vocab]
        grad_of = sweep.target.gradients(values, weights)
        grads = {p: grad_of[(p.path, p.port)] for p in sweep.points}
        acts = ({h: p.view(target_acts[p]) for h, p in hooks.items()},
                {h: p.view(source_acts[p]) for h, p in hooks.items()},
                {h: p.view(grads[p]) for h, p in hooks.items()})
        per_group[key] = [site_estimates(s, cells.indices, request.inputs.batch, *acts) for s in cells.sites]
    result = attribution_result(request, cells, measure, groups, per_group,
                                method="atp" if qk_swept else ("atp*" if qk_fix else "atp"))
    result.stats = {"patches": len(cells.indices) * len(cells.sites), "forward_passes": 1 + (not sweep.ablated),
                    "backward_passes": len(groups), "qk_fix": 0, "logits_shortcut": 0,
                    "traces": 1 + (not sweep.ablated) + len(groups)}
    return result
