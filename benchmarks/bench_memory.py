"""Peak memory of a sweep against the number of prompt pairs: groups keep it flat.

For the project's issue 19 ("memory that follows the budget instead of the dataset"). One
fresh child process per case loads a random GPT-2-small-shaped bridge (12 layers, d_model
768, vocabulary 50257), measures its resident set (``VmRSS``) after a warm-up sweep, then runs
``patch(site="resid_pre", metrics=("logit_diff",))`` on ``--pairs`` random pairs
of ``--tokens`` tokens that differ at one position 3/4 of the way in, and reports the growth of
its peak resident set (``VmHWM``, which the warm-up already raised to the model's own needs)
and the time per pair. The sweep splits the pairs into groups whose cached activations fit
``max_cache_bytes`` (default 256 MiB: 71 pairs of 20 tokens on this shape), so the peak
should stop growing once a dataset fills one group.

``--positions`` restricts the sweep to a few positions (fewer patches, same cached
activations, same groups) so that 2,048 pairs finish in minutes on two cores.

Run on an idle machine (check ``/proc/loadavg`` before and after):

    python benchmarks/bench_memory.py                          # 8, 64, 512 and 2048 pairs
    python benchmarks/bench_memory.py --pairs 8 64 --positions 15
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _status(key: str) -> float:
    """``VmRSS`` or ``VmHWM`` of this process, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak() -> None:
    """Start ``VmHWM`` again from the current resident set (Linux: write 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(pairs: int, tokens: int, positions: list[int] | None, budget: int | None) -> dict:
    sys.path.insert(0, os.path.join(HERE, ".."))
    sys.path.insert(0, HERE)
    import torch

    import patchwidgets as pw
    from bench_attribution import gpt2_small_shaped_bridge, ioi_shaped_batch

    torch.set_grad_enabled(False)
    model = gpt2_small_shaped_bridge()
    vocab = model.cfg.d_vocab
    kwargs = dict(site="resid_pre", metrics=("logit_diff",), positions=positions)  # (random weights: no gap)
    if budget is not None:
        kwargs["max_cache_bytes"] = budget
    warm = ioi_shaped_batch(2, tokens, tokens * 3 // 4, vocab, seed=7)
    pw.patch(model, *warm, **kwargs)                      # warm-up: the model's own working memory
    clean, corrupted, answers = ioi_shaped_batch(pairs, tokens, tokens * 3 // 4, vocab)
    _reset_peak()
    before = _status("VmRSS")
    start = time.perf_counter()
    result = pw.patch(model, clean, corrupted, answers, **kwargs)
    seconds = time.perf_counter() - start
    return {"pairs": pairs, "groups": result.stats["groups"], "patches": result.stats["patches"],
            "peak_growth_mib": _status("VmHWM") - before, "seconds": seconds, "per_pair_ms": 1000 * seconds / pairs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, nargs="+", default=[8, 64, 512, 2048])
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--positions", type=int, nargs="*", default=None,
                        help="sweep only these positions (default: every position)")
    parser.add_argument("--max-cache-bytes", type=int, default=None, help="default: patchwidgets' own")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.tokens, args.positions, args.max_cache_bytes)))
        return
    with open("/proc/loadavg") as f:
        print(f"load average before: {f.read().split()[:3]}")
    print(f"GPT-2-small-shaped random bridge, {args.tokens} tokens, resid_pre, positions "
          f"{args.positions or 'all'}, one fresh process per row")
    print(f"{'pairs':>6} {'groups':>6} {'patches':>8} {'peak RSS growth':>16} {'time':>9} {'per pair':>9}")
    for pairs in args.pairs:
        cmd = [sys.executable, __file__, "--child", str(pairs), "--tokens", str(args.tokens)]
        if args.positions:
            cmd += ["--positions", *map(str, args.positions)]
        if args.max_cache_bytes is not None:
            cmd += ["--max-cache-bytes", str(args.max_cache_bytes)]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-3000:])
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{row['pairs']:>6} {row['groups']:>6} {row['patches']:>8} {row['peak_growth_mib']:>12.0f} MiB "
              f"{row['seconds']:>8.1f}s {row['per_pair_ms']:>7.0f}ms", flush=True)
    with open("/proc/loadavg") as f:
        print(f"load average after: {f.read().split()[:3]}")


if __name__ == "__main__":
    main()
