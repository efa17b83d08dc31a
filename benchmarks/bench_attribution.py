"""Attribution patching vs exact patching: speed on a GPT-2-small shape, accuracy on the trained models.

    python benchmarks/bench_attribution.py [--pairs 8] [--seq 15] [--changed 10] [--repeats 2] [--threads 1]
                                           [--models random toy-ioi toy-ioi-deep] [--prompts 12]

The model is randomly initialised (12 layers, 12 heads, d_model 768, vocab 50257: GPT-2 small's
shape; the real weights cannot be downloaded here) and booted as a TransformerBridge. The batch
is IOI-shaped: ``--pairs`` prompt pairs of ``--seq`` random tokens whose clean and corrupted
versions differ at one position (``--changed``), as an S2 name flip would.

Both sweeps cover every head at every position (``site="head_out_by_pos"``, 12 x 15 x 12 =
2160 cells). The exact sweep is ``patchwidgets.patch`` with its fast engine (batched patches,
resumed passes, skipped no-ops and prefixes); the estimate is ``attribution_patch`` (two forward
passes, one backward pass). The script prints both wall-clock times, their ratio and the
Pearson correlation of the estimates with the exact values (logit difference, mean over pairs).

Random weights say little about accuracy (every head does about the same small thing, so a
linear estimate is nearly exact). The bundled trained models are the real test: ``toy-ioi``
(4 layers, its circuit one layer-0 head, a few layer-1 heads and the MLPs) and ``toy-ioi-deep``
(6 layers x 8 heads: layer-3 heads that attend the IO or copy a name by position, and END->S2
heads in layers 1 and 2 that steer their queries; see its model card). On ``--prompts`` held-out IOI prompts
(``datasets.ioi_prompts(split="test")``, S2-flip corruption, denoising) the script compares
AtP* with exact patching for head outputs (``head_out``, ``head_out_by_pos``) and whole-residual
patches (``resid_pre``, where the linear estimate is known to break), and prints the models side
by side: Pearson r of the ``normalized`` metric and the cell each one missed by the most.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
warnings.filterwarnings("ignore")

import torch  # noqa: E402


def gpt2_small_shaped_bridge(seed: int = 0):
    """A randomly initialised GPT-2 small as a TransformerBridge, without touching the network."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformer_lens.model_bridge import TransformerBridge

    from patchwidgets.gpt2_tokenizer import gpt2_tokenizer

    torch.manual_seed(seed)
    hf_model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257)).eval()
    # We pass token ids; the model's tokenizer is GPT-2's own, as its vocabulary.
    with tempfile.TemporaryDirectory() as tmp:  # (the bridge reloads the tokenizer from disk while booting)
        bridge = TransformerBridge.boot_transformers("gpt2", hf_model=hf_model, tokenizer=gpt2_tokenizer(directory=tmp))
    bridge.eval()
    return bridge


def ioi_shaped_batch(pairs: int, seq: int, changed: int, vocab: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (pairs, seq), generator=g)
    corrupted = clean.clone()
    corrupted[:, changed] = (clean[:, changed] + torch.randint(1, vocab, (pairs,), generator=g)) % vocab
    answers = [tuple(int(t) for t in row) for row in torch.randint(0, vocab, (pairs, 2), generator=g)]
    return clean, corrupted, answers


TRAINED_SITES = ["head_out", "head_out_by_pos", "resid_pre"]
_SHORT = {"layer": "L", "pos": "p", "head": "H"}


def trained_model_correlations(name: str, n_prompts: int) -> dict[str, tuple[float, str]]:
    """AtP* against exact patching on a bundled model and held-out IOI prompts, per site.

    Returns ``{site: (pearson_r, worst miss as text)}`` on the ``normalized`` metric.
    """
    import patchwidgets
    from patchwidgets.attribution import attribution_patch
    from patchwidgets.datasets import ioi_prompts

    model = patchwidgets.load_model(name, device="cpu")
    prompts = ioi_prompts(n_prompts, split="test")
    clean, corrupted = [p["clean"] for p in prompts], [p["corrupted"] for p in prompts]
    answers = [(p["correct"], p["incorrect"]) for p in prompts]
    out = {}
    for site in TRAINED_SITES:
        exact = patchwidgets.patch(model, clean, corrupted, answers, site=site, progress=False)
        report = attribution_patch(model, clean, corrupted, answers, site=site).compare(exact, "normalized", top=1)
        worst = report.misses.iloc[0]
        cell = " ".join(f"{_SHORT.get(a, a)}{worst[a]}" for a in exact.axes)  # e.g. "L0 p14 H1"
        out[site] = (report.correlation, f"{cell} {worst.estimate:+.2f} vs {worst.exact:+.2f}")
    return out


def print_side_by_side(names: list[str], table: dict[str, dict[str, tuple[float, str]]], n_prompts: int) -> None:
    width = 34
    print(f"\nAtP* vs exact patching on trained models ({n_prompts} held-out IOI prompts, S2 flip, "
          f"denoising, metric 'normalized'): Pearson r, and the worst cell (est vs exact)")
    print(f"{'site':16s}" + "".join(f"{name:>{width}s}" for name in names))
    for site in TRAINED_SITES:
        print(f"{site:16s}" + "".join(f"{'r = ' + format(table[n][site][0], '.3f'):>{width}s}" for n in names))
        print(f"{'':16s}" + "".join(f"{table[n][site][1]:>{width}s}" for n in names))


def _fmt(times: list[float]) -> str:
    return "[" + ", ".join(f"{t:.2f}" for t in times) + "]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--seq", type=int, default=15)
    parser.add_argument("--changed", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2, help="time each method this many times (best of)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for both methods (0: torch's default). On a busy shared "
                             "machine several threads spin against each other and small passes suffer most")
    parser.add_argument("--models", nargs="+", default=["random", "toy-ioi", "toy-ioi-deep"],
                        choices=["random", "toy-ioi", "toy-ioi-deep"],
                        help="'random': the timed GPT-2-small-shaped case; the bundled models: "
                             "correlations on IOI prompts, printed side by side")
    parser.add_argument("--prompts", type=int, default=12, help="IOI prompts for the trained models")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if "random" in args.models:
        random_model_timing(args)
    trained = [name for name in args.models if name != "random"]
    if trained:
        table = {name: trained_model_correlations(name, args.prompts) for name in trained}
        print_side_by_side(trained, table, args.prompts)


def random_model_timing(args: argparse.Namespace) -> None:
    import patchwidgets
    from patchwidgets.attribution import attribution_patch

    model = gpt2_small_shaped_bridge()
    clean, corrupted, answers = ioi_shaped_batch(args.pairs, args.seq, args.changed, model.cfg.d_vocab)
    kwargs = dict(site="head_out_by_pos", metrics=["logit_diff"])
    attribution_patch(model, clean[:1], corrupted[:1], answers[:1], **kwargs)  # warm-up (allocations)

    # Interleave the two methods and keep each one's best time: other processes on a shared
    # machine slow down single runs, and a best-of-n is the fairest estimate of the work done.
    times: dict[str, list[float]] = {"atp": [], "exact": []}
    cpu: dict[str, list[float]] = {"atp": [], "exact": []}
    runs = {
        "atp": lambda: attribution_patch(model, clean, corrupted, answers, **kwargs),
        "exact": lambda: patchwidgets.patch(model, clean, corrupted, answers, progress=False, **kwargs),
    }
    results = {}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    atp, exact = results["atp"], results["exact"]
    t_atp, t_exact = min(times["atp"]), min(times["exact"])
    comparison = atp.compare(exact, "logit_diff", top=5)

    print(f"model: random GPT-2-small shape (12 layers x 12 heads, d_model 768, vocab 50257), "
          f"torch threads {torch.get_num_threads()}")
    print(f"batch: {args.pairs} prompt pairs x {args.seq} tokens, differing at position {args.changed}; "
          f"{len(exact.indices)} cells (layer x pos x head)")
    print(f"exact patch(site='head_out_by_pos'): {t_exact:8.3f} s  best of {_fmt(times['exact'])}  {exact.stats}")
    print(f"attribution_patch (AtP*):            {t_atp:8.3f} s  best of {_fmt(times['atp'])}  {atp.stats}")
    print(f"speed-up: {t_exact / t_atp:.1f}x wall clock (best of each); CPU time "
          f"{min(cpu['exact']):.2f} s vs {min(cpu['atp']):.2f} s = {min(cpu['exact']) / min(cpu['atp']):.1f}x")
    print(f"Pearson correlation with exact (logit_diff): {comparison.correlation:.4f}")
    print(f"max |error| {comparison.max_abs_error:.3g}, mean |error| {comparison.mean_abs_error:.3g}")


if __name__ == "__main__":
    main()
