"""Activation patching side by side: transformer_lens.patching, nnsight 0.8 and patchwidgets.

For the project's issue "Core v2, section 2". In one process, every tool runs the same sweeps
on the same random weights and the same prompts; the script prints each tool's time, its
speed-up over transformer_lens, its distance from a FLOP lower bound, and the largest
difference between its grid and transformer_lens' grid. A second table gives patchwidgets'
peak memory (RSS) in fresh processes.

What it measures
----------------
Model: random weights with GPT-2 small's shape (12 layers, 12 heads, d_model 768, vocab
50257), or with ``--tiny`` 2 layers, 4 heads, d_model 64, vocab 512. ``--model toy-ioi-deep``
(or ``toy-ioi``) runs the same sweeps on a bundled trained model instead: the bridge is
``pw.load_model(name)`` (float32), nnsight loads the model's folder itself
(``nnsight.TransformersModel(path, dtype=torch.float32)``, as a user would), and the prompts are
real IOI sentences (below). On ``toy-ioi-deep`` (6 layers x 8 heads, d_model 256, vocab 416,
128 positions) the sweeps are 6 x 15, 6 x 8 and 6 x 15 x 8 patches.

Cases (``--cases``): ``1x15`` is one prompt pair of 15 tokens, ``8x15`` is 8 pairs; clean and
corrupted prompts differ at position 10 only (the IOI shape: the S2 name). On the random
models the tokens are random; on a bundled model they are the first held-out IOI prompts
(``datasets.ioi_prompts(split="test")``) that are 15 tokens long with the S2 name at position
10, their S2-flip corruption, and the IO and S names as the answers.

Sweeps (``--sweeps``), with the grid layout of transformer_lens.patching:
    resid_pre         [layer, pos]         12 x 15      =  180 patches
    head_out          [layer, head]        12 x 12      =  144 patches (a head at every position)
    head_out_by_pos   [layer, pos, head]   12 x 15 x 12 = 2160 patches

Metric: the logit difference, logit(correct) - logit(incorrect) at the last position, averaged
over pairs. Denoising: the clean activation is written into the corrupted run.

Tools:
    transformer_lens  ``transformer_lens.patching.get_act_patch_resid_pre``,
                      ``get_act_patch_attn_head_out_all_pos``, ``get_act_patch_attn_head_out_by_pos``
                      on the TransformerBridge: one forward pass per patch. The reference.
    nnsight           nnsight 0.8, the batched recipe of nnsight's activation patching
                      tutorial: one ``model.trace()`` with an invoke for the clean run (reading
                      every layer's activation), one for the corrupted run, and one per patch
                      that writes the clean slice into the corrupted run and computes the logit
                      difference from ``lm_head.output``, all positions' logits as in the
                      tutorial. ``resid_pre`` is the input of ``transformer.h[l]``; a head's
                      output is its slice of the input of ``transformer.h[l].attn.c_proj`` (the
                      heads' outputs side by side, ``[batch, pos, head * d_head]``).
    nnsight-last      the same, keeping only the last logits: ``trace(logits_to_keep=1)``, so
                      the model unembeds only the last position and ``lm_head.output`` is
                      ``[batch, 1, vocab]``.
    patchwidgets      ``pw.patch(model, clean, corrupted, answers=..., site=...,
                      metrics="logit_diff").grid("logit_diff")`` on the TransformerBridge.

Every time includes the tool's own clean run (transformer_lens: ``run_with_cache``).

nnsight is chunked: in the tutorial's form one trace holds batch x positions x vocab logits per
patch (head_out_by_pos, 8x15: 2160 x 8 x 15 x 50257 float32, 52 GB), so the patches are split
into several traces of at most 4096 tokens (rows x positions, patchwidgets' default
``max_batch_tokens``). Each trace repeats the clean invoke, whose activations the patches
need; the first also holds the corrupted invoke. The "note" column gives the trace count.

nnsight wraps a deep copy of the Hugging Face ``GPT2LMHeadModel``, taken before booting the
bridge: ``TransformerBridge.boot_transformers`` replaces the HF model's submodules in place with
bridge components (and switches it to eager attention), so the object the bridge was booted
on is no longer a plain GPT-2. The copy has the same weights and keeps Hugging Face's default
(SDPA) attention, which agrees with the bridge's eager attention to about 1e-7. The model is
wrapped as ``nnsight.TransformersModel(hf_model, tokenizer=..., task="text-generation")``:
nnsight 0.8 deprecates ``LanguageModel``, now an alias of exactly that.

FLOP lower bound ("x bound" column)
-----------------------------------
An ideal exact sweep runs the clean and corrupted prompts once, then for each patch recomputes
only what the patch can change, attending to the corrupted run's cached keys and values: a
patch at (layer l, position p) changes nothing before layer l or before position p, and a
patch at a position before the first differing token changes nothing at all (the two runs
agree there), so it costs nothing. A head's all-positions patch changes positions from the
first differing token on; in its own layer a head patch changes only that head's share of the
output projection and the MLP. The count is the per-token block matmul FLOPs (query, key and
value projections, attention scores and weighted values over the visible keys, output
projection, MLP) plus the unembedding of the answer position only. The bound's time is those
FLOPs divided by this machine's float32 matmul peak, measured here with a few 2048 x 2048
``torch.mm`` calls at the thread count in use; "x bound" is a tool's time over that time.

Peak memory
-----------
Each line runs patchwidgets' resid_pre sweep in a fresh subprocess (this script with a hidden
``--child`` flag; the three run at the same time, as only their memory is read) on 64 pairs x
20 tokens, or 8 pairs for comparison, differing at position 15. The child builds the model,
lowers its RSS high-water mark to the current RSS (``/proc/self/clear_refs``, so that what
booting the model allocated and freed does not hide the sweep), runs the sweep and reads the
high-water mark again. On Linux that is ``VmHWM`` from ``/proc/self/status`` rather than
``getrusage(RUSAGE_SELF).ru_maxrss``: a child's ``ru_maxrss`` never drops below the RSS its
parent had when it forked, here this script with its two models (``getrusage`` elsewhere). If the engine's memory follows
``max_batch_tokens``, the growth changes with it and not with the number of pairs.

Run
---
    pip install -e ".[bench]"                               # nnsight
    python benchmarks/bench_peers.py                        # full size: many minutes, idle machine
    python benchmarks/bench_peers.py --tiny --repeats 1     # 2-layer model, under a minute
    python benchmarks/bench_peers.py --model toy-ioi-deep   # the bundled 6-layer IOI model
    options: --repeats N (median of N runs, default 3), --peer-repeats N (runs of transformer_lens
             and nnsight, default --repeats), --threads N (torch threads; 1 with --tiny),
             --cases 1x15 8x15, --sweeps resid_pre head_out head_out_by_pos, --no-memory,
             --model gpt2-shaped|toy-ioi|toy-ioi-deep
    The README's table: --cases 1x15 --repeats 3 --peer-repeats 1, then
    --cases 8x15 --sweeps resid_pre head_out --repeats 3 --peer-repeats 1 --no-memory.

Columns
-------
Timing table, one line per tool under a line per (case, sweep) that gives the number of
patches and the FLOP bound:
    tool        the tool (see above)
    time        median wall-clock seconds over --repeats (peers: --peer-repeats) runs
    speed-up    transformer_lens' time / this tool's time
    x bound     this tool's time / the FLOP bound's time (1.0 is the bound itself)
    max |diff|  largest absolute difference between this tool's grid and transformer_lens'
    note        forward passes (transformer_lens), traces (nnsight), patchwidgets' stats
Memory table:
    pairs x tokens, max_batch_tokens   the dataset and the engine's budget of one forward pass
    RSS before    high-water mark after building the model and the prompts, MiB
    RSS peak      high-water mark after the sweep, MiB
    growth        peak - before: what the sweep itself needed

Exit status 1 when any tool's grid differs from transformer_lens' by more than 1e-4.
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # transformer_lens' per-patch progress bar

import torch
from transformer_lens import patching as tlp
from transformer_lens.model_bridge import TransformerBridge
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

import patchwidgets as pw
from patchwidgets.loading import model_path

TOLERANCE = 1e-4
SEQ_LEN, DIFF_POS = 15, 10
CASES = {"1x15": 1, "8x15": 8}  # name -> prompt pairs
MODELS = ("gpt2-shaped", "toy-ioi", "toy-ioi-deep")  # gpt2-shaped: random weights (--tiny: smaller)
SWEEPS = ("resid_pre", "head_out", "head_out_by_pos")
TL_SWEEPS = {
    "resid_pre": tlp.get_act_patch_resid_pre,
    "head_out": tlp.get_act_patch_attn_head_out_all_pos,
    "head_out_by_pos": tlp.get_act_patch_attn_head_out_by_pos,
}
NNSIGHT_TRACE_TOKENS = 4096  # rows x positions per nnsight trace: patchwidgets' default budget
GPT2_VOCAB = 50257
MEMORY_RUNS = [(8, 20, 1024), (64, 20, 1024), (64, 20, 16384)]  # pairs, tokens, max_batch_tokens


# --- Model and prompts -----------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    n_layers: int
    n_heads: int
    d_model: int
    d_mlp: int
    d_vocab: int

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


def gpt2_config(tiny: bool) -> GPT2Config:
    if tiny:
        # Special token ids inside the small vocabulary, or transformers warns on every load.
        return GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=512, n_positions=64,
                          bos_token_id=511, eos_token_id=511)
    return GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=GPT2_VOCAB, n_positions=1024)


def tokenizer(vocab_size: int | None = None):
    # Every tool is fed token ids, so the tokenizer only has to fit the model: GPT-2's own for a
    # model of GPT-2's vocabulary, the toy-ioi one otherwise. A fresh one per tool, because
    # nnsight sets its tokenizer's padding side and pad token.
    if vocab_size == GPT2_VOCAB:
        from patchwidgets.gpt2_tokenizer import gpt2_tokenizer

        # Saved and loaded back: the bridge reloads its tokenizer from where it was loaded.
        return gpt2_tokenizer(directory=tempfile.mkdtemp(prefix="gpt2-tokenizer-"))
    return AutoTokenizer.from_pretrained(model_path("toy-ioi"))


def build_models(tiny: bool, with_hf_copy: bool = True) -> tuple[TransformerBridge, GPT2LMHeadModel | None]:
    """The bridge and, for nnsight, a plain HF model with the same weights."""
    torch.manual_seed(0)
    hf_model = GPT2LMHeadModel(gpt2_config(tiny)).eval()
    # Copied before the boot: the bridge rebuilds hf_model's submodules in place.
    hf_copy = copy.deepcopy(hf_model) if with_hf_copy else None
    bridge = TransformerBridge.boot_transformers("gpt2", hf_model=hf_model,
                                                 tokenizer=tokenizer(hf_model.config.vocab_size))
    bridge.eval()
    return bridge, hf_copy


def build_bundled(name: str, with_nnsight: bool = True):
    """A bundled model as the bridge (``pw.load_model``) and as nnsight loads it from its folder.

    nnsight is given the folder, not the bridge's HF model: booting a bridge rebuilds the HF
    model it wraps in place. ``dtype=torch.float32`` because the checkpoint is stored in
    float16 and transformers would otherwise keep that dtype; ``dispatch=True`` loads the
    weights now rather than inside the first timed trace.
    """
    bridge = pw.load_model(name, device="cpu", dtype=torch.float32)
    bridge.eval()
    if not with_nnsight:
        return bridge, None
    from nnsight import TransformersModel

    path = str(model_path(name))
    lm = TransformersModel(path, tokenizer=AutoTokenizer.from_pretrained(path), task="text-generation",
                           dtype=torch.float32, dispatch=True)
    return bridge, lm


def shape_of(bridge: TransformerBridge) -> Shape:
    cfg = bridge.cfg
    return Shape(cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_mlp, cfg.d_vocab)


def wrap_nnsight(hf_model: GPT2LMHeadModel):
    """nnsight's model over an in-memory HF model.

    nnsight 0.8 accepts a ready ``torch.nn.Module`` as the first argument (``Loadable._wrap``)
    and builds a text-generation pipeline around it; ``LanguageModel`` is now a deprecated
    alias of ``TransformersModel`` pinned to that task.
    """
    from nnsight import TransformersModel

    return TransformersModel(hf_model, tokenizer=tokenizer(hf_model.config.vocab_size), task="text-generation")


@dataclass
class Case:
    name: str
    clean: torch.Tensor      # [pairs, pos] token ids
    corrupted: torch.Tensor  # [pairs, pos], differs from clean at diff_pos only
    correct: torch.Tensor    # [pairs] answer token ids
    incorrect: torch.Tensor  # [pairs]
    diff_pos: int

    @property
    def answers(self) -> list[tuple[int, int]]:
        return list(zip(self.correct.tolist(), self.incorrect.tolist()))


def make_case(name: str, n_pairs: int, seq_len: int, diff_pos: int, d_vocab: int) -> Case:
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, d_vocab, (n_pairs, seq_len), generator=g)
    corrupted = clean.clone()
    # A different token at diff_pos for every pair (a random draw could repeat the clean one).
    corrupted[:, diff_pos] = (clean[:, diff_pos] + torch.randint(1, d_vocab, (n_pairs,), generator=g)) % d_vocab
    correct = torch.randint(0, d_vocab, (n_pairs,), generator=g)
    incorrect = (correct + torch.randint(1, d_vocab, (n_pairs,), generator=g)) % d_vocab
    return Case(name, clean, corrupted, correct, incorrect, diff_pos)


def make_ioi_case(name: str, n_pairs: int, seq_len: int, diff_pos: int, bridge: TransformerBridge) -> Case:
    """``n_pairs`` held-out IOI prompts of ``seq_len`` tokens whose S2 name is at ``diff_pos``.

    ``ioi_prompts`` mixes templates, places and objects of different token lengths; the sweeps
    read the logits at the last position of a ``[pairs, pos]`` batch, so only prompts of the
    exact shape are kept (no padding), in the dataset's own order.
    """
    from patchwidgets.datasets import ioi_prompts

    clean, corrupted, correct, incorrect = [], [], [], []
    for item in ioi_prompts(32 * n_pairs + 64, split="test"):
        c, d = bridge.to_tokens(item["clean"])[0], bridge.to_tokens(item["corrupted"])[0]
        if len(c) != seq_len or len(d) != seq_len or (c != d).nonzero().flatten().tolist() != [diff_pos]:
            continue
        clean.append(c)
        corrupted.append(d)
        correct.append(int(bridge.to_tokens(item["correct"], prepend_bos=False)[0, 0]))
        incorrect.append(int(bridge.to_tokens(item["incorrect"], prepend_bos=False)[0, 0]))
        if len(clean) == n_pairs:
            return Case(name, torch.stack(clean).cpu(), torch.stack(corrupted).cpu(), torch.tensor(correct),
                        torch.tensor(incorrect), diff_pos)
    raise RuntimeError(f"only {len(clean)} IOI prompts of {seq_len} tokens with S2 at position {diff_pos}; "
                       f"{n_pairs} needed")


def logit_diff(final: torch.Tensor, case: Case) -> torch.Tensor:
    """Mean logit difference of final-position logits ``[pairs, vocab]`` -> scalar."""
    rows = torch.arange(final.shape[0])
    return (final[rows, case.correct] - final[rows, case.incorrect]).mean()


# --- Sweeps ----------------------------------------------------------------------------------

def sweep_cells(sweep: str, shape: Shape, n_pos: int) -> list[tuple[int, ...]]:
    """Every patch of ``sweep``, in the row-major order of its grid."""
    layers, heads, positions = range(shape.n_layers), range(shape.n_heads), range(n_pos)
    axes = {"resid_pre": (layers, positions), "head_out": (layers, heads),
            "head_out_by_pos": (layers, positions, heads)}[sweep]
    return list(itertools.product(*axes))


def grid_shape(sweep: str, shape: Shape, n_pos: int) -> tuple[int, ...]:
    return {"resid_pre": (shape.n_layers, n_pos), "head_out": (shape.n_layers, shape.n_heads),
            "head_out_by_pos": (shape.n_layers, n_pos, shape.n_heads)}[sweep]


def patch_slice(sweep: str, cell: tuple[int, ...]) -> tuple:
    """Where a patch writes: an index into ``[batch, pos, d_model]`` (resid) or
    ``[batch, pos, head, d_head]`` (heads)."""
    if sweep == "resid_pre":
        return (slice(None), cell[1])               # one position
    if sweep == "head_out":
        return (slice(None), slice(None), cell[1])  # one head, every position
    return (slice(None), cell[1], cell[2])          # one head at one position


# --- The tools -------------------------------------------------------------------------------
# Each takes (case, sweep) and returns (grid, note).

def run_transformer_lens(bridge: TransformerBridge, case: Case, sweep: str):
    def metric(logits):  # [pairs, pos, vocab] -> scalar
        return logit_diff(logits[:, -1], case)

    _, clean_cache = bridge.run_with_cache(case.clean)
    grid = TL_SWEEPS[sweep](bridge, case.corrupted, clean_cache, metric)
    return grid, f"{grid.numel()} forward passes"


def run_patchwidgets(bridge: TransformerBridge, case: Case, sweep: str, max_batch_tokens: int = 4096):
    result = pw.patch(bridge, case.clean, case.corrupted, answers=case.answers, site=sweep,
                      metrics="logit_diff", max_batch_tokens=max_batch_tokens, progress=False)
    stats = result.stats
    return result.grid("logit_diff"), (f"{stats.get('forward_passes')} passes, "
                                       f"{stats.get('skipped_noop')} no-op")


def run_nnsight(lm, shape: Shape, case: Case, sweep: str, last_only: bool):
    """The tutorial's batched recipe, chunked into traces of NNSIGHT_TRACE_TOKENS tokens."""
    n_pairs, n_pos = case.clean.shape
    cells = sweep_cells(sweep, shape, n_pos)
    # Room for the clean and the corrupted invoke next to the patches.
    per_trace = max(1, NNSIGHT_TRACE_TOKENS // (n_pairs * n_pos) - 2)
    values = []
    for start in range(0, len(cells), per_trace):
        values.append(nnsight_trace(lm, shape, case, sweep, cells[start:start + per_trace],
                                    last_only, with_corrupted=start == 0))
    grid = torch.cat(values).reshape(grid_shape(sweep, shape, n_pos))
    # The first trace is the largest: clean, corrupted and up to per_trace patches.
    return grid, f"{len(values)} trace(s), {2 + len(values[0])} invokes in the first"


def nnsight_trace(lm, shape: Shape, case: Case, sweep: str, cells, last_only: bool,
                  with_corrupted: bool) -> torch.Tensor:
    """One trace: a clean invoke, maybe a corrupted one, one invoke per cell -> [len(cells)]."""
    n_pairs, n_pos = case.clean.shape
    heads = sweep != "resid_pre"
    # [pairs, pos, d_model] -> [pairs, pos, head, d_head] for head sites, unchanged otherwise.
    split = (n_pairs, n_pos, shape.n_heads, shape.d_head) if heads else (n_pairs, n_pos, shape.d_model)
    wheres = [patch_slice(sweep, cell) for cell in cells]
    out = [None] * len(cells)  # filled by the patch invokes, one slot each
    # logits_to_keep is a forward argument of GPT2LMHeadModel: unembed the last position only.
    trace_kwargs = {"logits_to_keep": 1} if last_only else {}
    with torch.no_grad():
        with lm.trace(**trace_kwargs) as tracer:
            with tracer.invoke(case.clean):
                # Every layer's activation, in the order the model reaches them (nnsight serves
                # an invoke's reads in execution order only). The patch invokes see clean_acts
                # through the scope nnsight shares between the invokes of one trace.
                clean_acts = []  # per layer: [pairs, pos, d_model]
                for layer in range(shape.n_layers):
                    block = lm.transformer.h[layer]
                    clean_acts.append(block.attn.c_proj.input if heads else block.input)
            if with_corrupted:
                with tracer.invoke(case.corrupted):
                    # The tutorial's baseline (it normalises by it). The logit difference
                    # itself does not need it, but the recipe pays for this run.
                    corrupted_ld = logit_diff(lm.lm_head.output[:, -1], case).save()  # noqa: F841
            for slot, (cell, where) in enumerate(zip(cells, wheres)):
                with tracer.invoke(case.corrupted):
                    block = lm.transformer.h[cell[0]]
                    # Read the target before clean_acts: Python evaluates the right-hand side of
                    # `a[i] = b` first, and clean_acts[layer] only exists once the model has
                    # reached that layer (the clean invoke is served first there).
                    target = (block.attn.c_proj.input if heads else block.input).view(split)
                    target[where] = clean_acts[cell[0]].view(split)[where]  # in place: a view of the batch
                    final = lm.lm_head.output[:, -1]  # [pairs, vocab]
                    out[slot] = logit_diff(final, case).save()
    return torch.stack(out)


# --- FLOP lower bound ------------------------------------------------------------------------

def token_flops(shape: Shape, pos: int) -> int:
    """Matmul FLOPs of one block for the token at ``pos``, which attends to ``pos + 1`` keys."""
    d = shape.d_model
    qkv, scores_and_values, out_proj = 2 * d * 3 * d, 2 * 2 * d * (pos + 1), 2 * d * d
    mlp = 2 * 2 * d * shape.d_mlp
    return qkv + scores_and_values + out_proj + mlp


def head_tail_flops(shape: Shape) -> int:
    """FLOPs of one changed head output at one position in its own layer: that head's slice
    of the output projection, then the MLP."""
    return 2 * shape.d_head * shape.d_model + 2 * 2 * shape.d_model * shape.d_mlp


def ideal_flops(sweep: str, shape: Shape, n_pairs: int, n_pos: int, diff_pos: int) -> int:
    """FLOPs of an ideal exact sweep (see the module docstring)."""
    unembed = 2 * shape.d_model * shape.d_vocab  # the answer position only

    def blocks(first_layer: int, first_pos: int) -> int:  # full blocks from there on
        per_layer = sum(token_flops(shape, t) for t in range(first_pos, n_pos))
        return max(0, shape.n_layers - first_layer) * per_layer

    per_pair = 2 * (blocks(0, 0) + unembed)  # the clean and the corrupted run
    for cell in sweep_cells(sweep, shape, n_pos):
        layer = cell[0]
        if sweep == "head_out":  # every position, changing from diff_pos on
            per_pair += (n_pos - diff_pos) * head_tail_flops(shape) + blocks(layer + 1, diff_pos) + unembed
            continue
        pos = cell[1]
        if pos < diff_pos:  # both runs agree here: a no-op
            continue
        if sweep == "resid_pre":
            per_pair += blocks(layer, pos) + unembed
        else:  # head_out_by_pos: one position of this layer, then everything after
            per_pair += head_tail_flops(shape) + blocks(layer + 1, pos) + unembed
    return n_pairs * per_pair


def matmul_peak(n: int = 2048, calls: int = 3) -> float:
    """Best float32 FLOP/s of an n x n matmul at the current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up: thread pool and allocator
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


# --- Timing ----------------------------------------------------------------------------------

def median_time(fn: Callable[[], tuple], repeats: int):
    """(fn's last return value, median seconds over ``repeats`` calls)."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            out = fn()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def warm_up(bridge, lm, case: Case) -> None:
    # First calls pay for lazy imports, thread pools and nnsight's source parsing; keep that
    # out of the first tool's first timing.
    with torch.no_grad():
        bridge(case.clean)
        pw.patch(bridge, case.clean, case.corrupted, answers=case.answers, site="resid_pre",
                 metrics="logit_diff", layers=[0], progress=False)
    run_nnsight(lm, shape_of(bridge), case, "resid_pre", last_only=True)


def max_diff(grid: torch.Tensor, reference: torch.Tensor) -> float:
    return float((grid.detach().float() - reference.detach().float()).abs().max())


# --- Peak memory (child processes) -----------------------------------------------------------

def rss_peak_mib() -> float:
    """This process's RSS high-water mark, MiB.

    On Linux it is ``VmHWM`` from ``/proc/self/status``. ``getrusage(RUSAGE_SELF).ru_maxrss``
    would be the maximum of that and the RSS of the parent at the fork (the kernel keeps the
    forked copy's high-water mark across exec), so in a child of this script it would never
    drop below the parent's two models, and ``clear_refs`` does not lower it.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2 ** 10  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10  # bytes vs KiB


def reset_rss_peak() -> bool:
    """Lower the high-water mark to the current RSS (Linux >= 4.0), so that what loading and
    booting the model touched and freed again does not hide a smaller peak of the sweep."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child_main(spec: str, tiny: bool, model: str = "gpt2-shaped") -> int:
    """Run one patchwidgets sweep and print the RSS high-water marks as JSON.

    On a bundled model the tokens are random too (the IOI prompts are not 20 tokens long).
    """
    n_pairs, seq_len, max_batch_tokens = map(int, spec.split(":"))
    if model == "gpt2-shaped":
        bridge, _ = build_models(tiny, with_hf_copy=False)  # no copy: it would count as sweep memory
    else:
        bridge, _ = build_bundled(model, with_nnsight=False)
    case = make_case("memory", n_pairs, seq_len, seq_len * 3 // 4, shape_of(bridge).d_vocab)
    gc.collect()
    reset = reset_rss_peak()
    before = rss_peak_mib()
    with torch.no_grad():
        run_patchwidgets(bridge, case, "resid_pre", max_batch_tokens)
    print(json.dumps({"before": before, "peak": rss_peak_mib(), "reset": reset}))
    return 0


def measure_memory(args) -> list[dict]:
    """One child per MEMORY_RUNS entry, all at once: each reads only its own RSS, and most
    of a child's time is importing torch and transformer_lens."""
    children = []
    for n_pairs, seq_len, max_batch_tokens in MEMORY_RUNS:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{n_pairs}:{seq_len}:{max_batch_tokens}",
               "--threads", str(args.threads), "--model", args.model] + (["--tiny"] if args.tiny else [])
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        children.append(((n_pairs, seq_len, max_batch_tokens), proc))
    rows = []
    for (n_pairs, seq_len, max_batch_tokens), proc in children:
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"memory child {n_pairs}:{seq_len}:{max_batch_tokens} failed:\n{stderr[-2000:]}")
        row = json.loads(stdout.strip().splitlines()[-1])
        rows.append({"pairs": n_pairs, "tokens": seq_len, "max_batch_tokens": max_batch_tokens, **row})
    return rows


# --- Report ----------------------------------------------------------------------------------

TIMING_HEADER = f"  {'tool':<18}{'time':>10}{'speed-up':>10}{'x bound':>10}{'max |diff|':>12}   note"


def print_row(tool: str, seconds: float, tl_seconds: float, bound_s: float, diff: float, note: str) -> None:
    flag = "" if diff <= TOLERANCE else "  FAIL"
    print(f"  {tool:<18}{seconds:>8.3f} s{tl_seconds / seconds:>9.1f}x{seconds / bound_s:>10.1f}"
          f"{diff:>12.1e}   {note}{flag}")


def print_memory(rows: list[dict]) -> None:
    print("\npatchwidgets peak RSS, resid_pre sweep, one fresh process per line:")
    print(f"  {'pairs x tokens':<16}{'max_batch_tokens':>17}{'RSS before':>13}{'RSS peak':>11}{'growth':>10}")
    for r in rows:
        note = "" if r["reset"] else "   (high-water mark not reset: growth is a lower bound)"
        print(f"  {r['pairs']:>5} x {r['tokens']:<8}{r['max_batch_tokens']:>17}{r['before']:>9.0f} MiB"
              f"{r['peak']:>7.0f} MiB{r['peak'] - r['before']:>6.0f} MiB{note}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="median of this many runs (default 3)")
    parser.add_argument("--peer-repeats", type=int,
                        help="runs of transformer_lens and nnsight (default: --repeats; they take minutes)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS table")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, or 1 with --tiny)")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--sweeps", nargs="+", choices=SWEEPS, default=list(SWEEPS))
    parser.add_argument("--tiny", action="store_true", help="2 layers, d_model 64, vocab 512: tests the script")
    parser.add_argument("--model", choices=MODELS, default="gpt2-shaped",
                        help="gpt2-shaped: random weights (the default); toy-ioi, toy-ioi-deep: a bundled "
                             "trained model on IOI prompts")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # PAIRS:TOKENS:MAX_BATCH_TOKENS
    args = parser.parse_args(argv)
    if args.tiny and args.model != "gpt2-shaped":
        parser.error(f"--tiny shrinks the random model; it cannot be used with --model {args.model}")
    if args.peer_repeats is None:
        args.peer_repeats = args.repeats
    if args.threads is None:
        # A tiny model's matmuls are too small to split; on a busy machine the threads' spin
        # waits cost several times the work.
        args.threads = 1 if args.tiny else torch.get_num_threads()
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if args.child:
        return child_main(args.child, args.tiny, args.model)

    try:
        import nnsight
    except ImportError:
        print('nnsight is missing: pip install -e ".[bench]"', file=sys.stderr)
        return 2

    if args.model == "gpt2-shaped":
        bridge, hf_copy = build_models(args.tiny)
        lm = wrap_nnsight(hf_copy)
    else:
        bridge, lm = build_bundled(args.model)
    shape = shape_of(bridge)
    peak = matmul_peak()
    tools = {
        "transformer_lens": lambda case, sweep: run_transformer_lens(bridge, case, sweep),
        "nnsight": lambda case, sweep: run_nnsight(lm, shape, case, sweep, last_only=False),
        "nnsight-last": lambda case, sweep: run_nnsight(lm, shape, case, sweep, last_only=True),
        "patchwidgets": lambda case, sweep: run_patchwidgets(bridge, case, sweep),
    }
    dims = f"{shape.n_layers} layers, {shape.n_heads} heads, d_model {shape.d_model}, vocab {shape.d_vocab}"
    if args.model == "gpt2-shaped":
        print(f"model: {'tiny' if args.tiny else 'GPT-2-small'} shape, random weights: {dims}")
    else:
        print(f"model: {args.model} (bundled, trained), {dims}; held-out IOI prompts, S2 flip")
    print(f"threads {args.threads}, repeats {args.repeats} (peers {args.peer_repeats}), float32 matmul peak {peak / 1e9:.1f} GFLOP/s, "
          f"nnsight {nnsight.__version__}, torch {torch.__version__}")

    failed = False
    if args.model == "gpt2-shaped":
        cases = {name: make_case(name, CASES[name], SEQ_LEN, DIFF_POS, shape.d_vocab) for name in args.cases}
    else:
        cases = {name: make_ioi_case(name, CASES[name], SEQ_LEN, DIFF_POS, bridge) for name in args.cases}
    warm_up(bridge, lm, next(iter(cases.values())))
    print("\n" + TIMING_HEADER)
    for case in cases.values():
        n_pairs, n_pos = case.clean.shape
        for sweep in args.sweeps:
            flops = ideal_flops(sweep, shape, n_pairs, n_pos, case.diff_pos)
            bound_s = flops / peak
            print(f"{case.name} {sweep}: {len(sweep_cells(sweep, shape, n_pos))} patches, "
                  f"bound {flops / 1e9:.3g} GFLOP = {bound_s * 1e3:.3g} ms")
            (reference, tl_note), tl_s = median_time(lambda: tools["transformer_lens"](case, sweep),
                                                     args.peer_repeats)
            print_row("transformer_lens", tl_s, tl_s, bound_s, 0.0, tl_note + " (reference)")
            for tool in ("nnsight", "nnsight-last", "patchwidgets"):
                repeats = args.repeats if tool == "patchwidgets" else args.peer_repeats
                (grid, note), seconds = median_time(lambda: tools[tool](case, sweep), repeats)
                diff = max_diff(grid, reference)
                failed |= not diff <= TOLERANCE  # NaN fails too
                print_row(tool, seconds, tl_s, bound_s, diff, note)

    if not args.no_memory:
        print_memory(measure_memory(args))
    if failed:
        print(f"\nFAIL: a grid differs from transformer_lens.patching by more than {TOLERANCE:g}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
