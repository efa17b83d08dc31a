"""Peak memory and time of a sweep on a model in memory vs. a model offloaded to disk.

For the project's issue 11 ("big models"), section 1. A random Llama-shaped checkpoint
(default: 8 layers, d_model 1024, 16 query heads / 4 key-value heads, MLP 2816, an 8000-word
vocabulary: about 105M parameters, ~420 MB of float32 weights) is written to a temporary
folder. Then two fresh child processes, one after the other, each load it through
``patchwidgets.load_model`` and run the same sweeps:

    memory     load_model(folder, "cpu")
    offload    load_model(folder, device_map={embedding, rotary table, layer 0: "cpu";
               layers 1..: "disk"; final norm, head: "disk"}, offload_folder=...)

Sweeps: ``patch`` over ``resid_pre`` and ``head_out`` (denoising, default metrics) on
``--pairs`` prompt pairs of ``--tokens`` tokens that differ at one position 3/4 of the way in.

Each child prints its resident-set size after the imports, after loading and at the end, and
its peak RSS, ``resource.getrusage(RUSAGE_SELF).ru_maxrss``. The peak counts file-backed pages
too: the checkpoint's safetensors file is memory-mapped (by transformers for the in-memory
model, by accelerate for each offloaded module it loads), and mapped pages that were read stay
resident until the kernel needs the memory. So the child also samples ``RssAnon`` (memory
that would need swap) and ``RssFile`` every 2 ms and prints their maxima. (On Linux a child's
``ru_maxrss`` starts from the RSS its parent had when it forked, so the parent imports
nothing heavy before the children have run; the baseline after the imports is printed for
that reason too.) The parent then prints both peaks, both times and the largest difference
between the two children's results.

What it showed (2 shared cores, OMP_NUM_THREADS=1, torch 2.13, transformers 5.24,
accelerate 1.16, TransformerLens 4.3; default size, float32):

    model    peak RSS   anon peak  file peak  sweeps   max |offload - memory|
    memory   1089 MiB    541 MiB    548 MiB   10.6 s
    offload   855 MiB    626 MiB    250 MiB   13.0 s   0 (bit-identical)

Offloading lowers the peak RSS by the file pages of the offloaded weights, not the
anonymous memory: transformers 5 maps a float32 safetensors checkpoint into memory instead of
copying it, so the in-memory model's weights are already reclaimable file pages (the kernel
can drop and re-read them under pressure), while accelerate copies each offloaded module's
weights into fresh tensors for its forward call. (The anonymous peaks vary by ~±50 MiB from
run to run: they are sampled.) Where the weights must be converted (``--dtype bfloat16`` on
this float32 checkpoint: in memory 640 MiB anonymous, offloaded 572 MiB) or must leave a
GPU, offloading saves real memory. Both sweeps keep the engine's shortcuts on.

Run:
    python benchmarks/bench_offload.py                    # default size, ~1-2 minutes
    python benchmarks/bench_offload.py --layers 4 --d-model 256 --vocab 2000   # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

SITES = ("resid_pre", "head_out")


def _rss_mib() -> float:
    """Current resident set size (Linux ``/proc/self/statm``), MiB; NaN elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError):
        return float("nan")


def _status_mib(*fields: str) -> dict[str, float]:
    """Fields of ``/proc/self/status`` (``RssAnon``, ``RssFile``, ...), MiB; empty elsewhere."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in fields:
                    out[name] = int(value.split()[0]) / 2 ** 10  # kB
    except OSError:
        pass
    return out


class _Sampler:
    """Samples ``RssAnon`` and ``RssFile`` every few milliseconds in a thread and keeps the
    maxima: the kernel keeps a high-water mark of the total only (``ru_maxrss``)."""

    def __init__(self, every: float = 0.002):
        import threading

        self.peaks = {"RssAnon": 0.0, "RssFile": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            for name, value in _status_mib("RssAnon", "RssFile").items():
                self.peaks[name] = max(self.peaks[name], value)
            self._stop.wait(every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _peak_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10  # bytes vs KiB


def _word_tokenizer(folder: str, vocab: int):
    """A word-level tokenizer of ``vocab`` words (ids are what the sweeps use)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="[UNK]")
    fast.save_pretrained(folder)


def make_checkpoint(folder: str, layers: int, d_model: int, vocab: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    _word_tokenizer(folder, vocab)
    torch.manual_seed(0)
    heads = max(d_model // 64, 2)
    hf = LlamaForCausalLM(LlamaConfig(
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(heads // 4, 1),
        hidden_size=d_model, intermediate_size=int(d_model * 2.75) // 64 * 64, vocab_size=vocab,
        max_position_embeddings=256, initializer_range=0.05, bos_token_id=0, eos_token_id=0, pad_token_id=0))
    hf.save_pretrained(folder)
    print(json.dumps({"parameters": sum(p.numel() for p in hf.parameters())}))


def offload_map(layers: int) -> dict:
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu"}
    device_map.update({f"model.layers.{l}": "disk" for l in range(1, layers)})
    device_map.update({"model.norm": "disk", "lm_head": "disk"})
    return device_map


def child(kind: str, folder: str, layers: int, pairs: int, tokens: int, vocab: int, dtype: str,
          out: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import patchwidgets
    import transformer_lens.model_bridge  # noqa: F401  (imported before the baseline)

    rss_imports, anon_imports = _rss_mib(), _status_mib("RssAnon").get("RssAnon", float("nan"))
    options = {} if dtype == "float32" else {"dtype": getattr(torch, dtype)}
    sampler = _Sampler().__enter__()
    start = time.perf_counter()
    if kind == "memory":
        model = patchwidgets.load_model(folder, "cpu", **options)
    else:
        model = patchwidgets.load_model(folder, device_map=offload_map(layers),
                                        offload_folder=os.path.join(folder, "offload"), **options)
    load_s = time.perf_counter() - start
    rss_loaded = _rss_mib()

    g = torch.Generator().manual_seed(1)
    clean = torch.randint(2, vocab, (pairs, tokens), generator=g)
    clean[:, 0] = 0
    corrupted = clean.clone()
    changed = tokens * 3 // 4
    corrupted[:, changed] = torch.randint(2, vocab, (pairs,), generator=g)
    answers = torch.randint(2, vocab, (pairs, 2), generator=g)
    results, stats = {}, {}
    start = time.perf_counter()
    for site in SITES:
        r = patchwidgets.patch(model, clean, corrupted, answers, site=site, progress=False)
        results[site] = {name: v for name, v in r.values.items()}
        stats[site] = r.stats
    sweep_s = time.perf_counter() - start
    sampler.__exit__()
    torch.save(results, out)
    print(json.dumps({"kind": kind, "load_s": load_s, "sweep_s": sweep_s, "rss_imports": rss_imports,
                      "rss_loaded": rss_loaded, "anon_imports": anon_imports, "rss_end": _rss_mib(),
                      "peak": _peak_mib(),
                      "peak_anon": sampler.peaks["RssAnon"], "peak_file": sampler.peaks["RssFile"],
                      "stats": stats}))


def run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args[:2]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="load_model(dtype=...): the checkpoint is float32, so another dtype "
                             "makes converted (anonymous) copies of the weights")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the children")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--make", metavar="FOLDER", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.make:
        make_checkpoint(args.make, args.layers, args.d_model, args.vocab)
        return 0
    if args.child:
        child(args.child[0], args.child[1], args.layers, args.pairs, args.tokens, args.vocab, args.dtype,
              args.out)
        return 0

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    size = ["--layers", str(args.layers), "--d-model", str(args.d_model), "--vocab", str(args.vocab),
            "--pairs", str(args.pairs), "--tokens", str(args.tokens), "--dtype", args.dtype]
    with tempfile.TemporaryDirectory() as folder:
        made = run_child(["--make", folder, *size])   # in a child: this process stays small
        rows = {}
        for kind in ("memory", "offload"):
            rows[kind] = run_child(["--child", kind, folder, "--out", os.path.join(folder, f"{kind}.pt"), *size])
        import torch  # only now: the children's ru_maxrss would start from this process's RSS

        a = torch.load(os.path.join(folder, "memory.pt"))
        b = torch.load(os.path.join(folder, "offload.pt"))
        diff = max(float((a[s][m] - b[s][m]).abs().max()) for s in a for m in a[s])
        weights_mib = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
                          if f.endswith(".safetensors")) / 2 ** 20

    print(f"Llama-shaped random model: {args.layers} layers, d_model {args.d_model}, vocab {args.vocab}, "
          f"{made['parameters'] / 1e6:.0f}M parameters, {weights_mib:.0f} MiB of float32 weights, "
          f"loaded as {args.dtype}")
    print(f"sweeps: patch() over {', '.join(SITES)}, {args.pairs} pairs x {args.tokens} tokens, "
          f"OMP_NUM_THREADS={args.threads}; one fresh process per line\n")
    print(f"  {'model':<10}{'RSS imports':>13}{'RSS loaded':>12}{'peak RSS':>11}{'anon imports':>14}"
          f"{'anon peak':>12}{'file peak':>12}{'load':>9}{'sweeps':>10}{'shortcuts':>11}")
    for kind, r in rows.items():
        shortcuts = "/".join(str(r["stats"][s]["resumed"]) + str(r["stats"][s]["prefix_skipped"]) for s in SITES)
        print(f"  {kind:<10}{r['rss_imports']:>9.0f} MiB{r['rss_loaded']:>8.0f} MiB{r['peak']:>7.0f} MiB"
              f"{r['anon_imports']:>10.0f} MiB{r['peak_anon']:>8.0f} MiB{r['peak_file']:>8.0f} MiB"
              f"{r['load_s']:>8.2f}s{r['sweep_s']:>9.2f}s{shortcuts:>11}")
    print("\n  peak RSS: getrusage ru_maxrss (anonymous + file-backed pages); anon/file peak: RssAnon and")
    print("  RssFile of /proc/self/status sampled every 2 ms during load and sweeps (file pages are the")
    print("  mapped safetensors checkpoint: reclaimable, they need no swap); shortcuts: resumed and")
    print("  prefix_skipped per site (11 = both on).")
    print(f"\nmax |offload - memory| over every cell and metric: {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
