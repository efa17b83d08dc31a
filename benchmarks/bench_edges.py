"""Edge attribution and exact faithfulness curves on a GPT-2-small-shaped model (issue 21, §6).

    python benchmarks/bench_edges.py [--tiny] [--pairs 8] [--repeats 3] [--threads N]

Model: random weights with GPT-2 small's shape (12 layers, 12 heads, d_model 768, vocab 50257;
built as in ``bench_peers.py`` with larger weights, :func:`build_model`), or ``--tiny`` (2
layers, 4 heads, d_model 64). Prompts: 8 pairs of 15 random tokens whose clean and corrupted
versions differ at position 10 (the IOI shape: the S2 name); answers are the model's own top
predictions on the clean and the corrupted prompt (:func:`own_answers`); the metric is the
logit difference. The graph has 32,491 edges (q/k/v inputs separate).

Each line times one task against its reference, median of ``--repeats`` runs after a warm-up,
and prints the ratio and the target of issue 21:

* **EAP** (``pw.edge_attribution(method="eap")``: a source pass, a target pass and its backward
  pass, every edge scored) against one forward plus one backward pass of the batch
  (``logit_diff.backward()`` on the corrupted prompts, the weights' gradients included, as in
  training). Target: at most 3x. The line below gives the same ratio against a backward pass
  to the input embeddings only (no weight gradients, which EAP does not compute either).
* **EAP-IG, 5 steps** against 5 such forward-plus-backward passes. Target: at most 3x.
* **A 10-point exact faithfulness curve** (``pw.faithfulness_curve``, ``k`` from 10 to every
  edge, top edges of the EAP scores) against one plain forward pass of the batch per point.
  No target; the points share passes (stacked on the batch axis), resume where their first
  patched receiver is, skip the positions before the prompts differ and unembed the answer
  positions only.

Do not compare timings taken on a loaded machine: run it idle.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import patchwidgets as pw  # noqa: E402
from bench_peers import DIFF_POS, SEQ_LEN, gpt2_config, logit_diff, make_case, tokenizer  # noqa: E402

KS = 10


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (and the first-call checks: the engine's self-check, the edge graph's)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_model(tiny: bool):
    """``bench_peers.py``'s random GPT-2 (small-shaped, or tiny), with weights 10x larger than
    GPT-2's initialisation (``initializer_range=0.2``): with the default ones the last position
    hardly notices the corrupted token, and faithfulness refuses a gap of almost nothing.
    The weights' values do not change the work, only the numbers."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    config = gpt2_config(tiny)
    config.initializer_range = 0.2
    model = TransformerBridge.boot_transformers("gpt2", hf_model=GPT2LMHeadModel(config).eval(),
                                                tokenizer=tokenizer())
    model.eval()
    return model


def own_answers(model, clean: torch.Tensor, corrupted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pair's answers as the model's own predictions: the clean run's top token (correct)
    and the corrupted run's (incorrect; its second choice where both agree). Random answers on
    random weights give a clean-corrupted gap of almost nothing, which faithfulness refuses to
    divide by; with these the gap is at least the logit differences' size."""
    with torch.no_grad():
        top_clean = model(clean)[:, -1].topk(2).indices
        top_corrupted = model(corrupted)[:, -1].topk(2).indices
    correct = top_clean[:, 0]
    incorrect = torch.where(top_corrupted[:, 0] == correct, top_corrupted[:, 1], top_corrupted[:, 0])
    return correct, incorrect


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model, to check the script runs")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_model(args.tiny)
    case = make_case(f"{args.pairs}x{SEQ_LEN}", args.pairs, SEQ_LEN, DIFF_POS, model.cfg.d_vocab)
    case.correct, case.incorrect = own_answers(model, case.clean, case.corrupted)
    answers = case.answers
    graph = pw.Graph.from_model(model)
    print(f"model: {'tiny' if args.tiny else 'GPT-2-small-shaped'} ({model.cfg.n_layers} layers, "
          f"{model.cfg.n_heads} heads, d_model {model.cfg.d_model}), {graph.n_edges} edges; "
          f"{case.name} tokens, differing at position {DIFF_POS}; torch threads {torch.get_num_threads()}")

    def forward_backward(weights: bool) -> None:
        if weights:
            model.zero_grad(set_to_none=True)
            logits = model(case.corrupted)
            logit_diff(logits[:, -1], case).backward()
            return
        start = {}

        def leaf(act, hook):
            start["x"] = act.detach().requires_grad_(True)
            return start["x"]
        logits = model.run_with_hooks(case.corrupted, fwd_hooks=[("blocks.0.hook_resid_pre", leaf)])
        torch.autograd.grad(logit_diff(logits[:, -1], case), [start["x"]])

    def forward() -> None:
        with torch.no_grad():
            model(case.corrupted)

    def eap(method: str):
        return pw.edge_attribution(model, case.clean, case.corrupted, answers, method=method, steps=5,
                                   progress=False)

    scores = eap("eap")
    ks = sorted({max(1, round(graph.n_edges ** (i / (KS - 1)))) for i in range(KS)} | {graph.n_edges})[-KS:]

    def curve() -> None:
        pw.faithfulness_curve(model, case.clean, case.corrupted, answers, scores=scores, ks=ks)

    fb_weights = median_time(lambda: forward_backward(True), args.repeats)
    fb_inputs = median_time(lambda: forward_backward(False), args.repeats)
    fwd = median_time(forward, args.repeats)
    t_eap = median_time(lambda: eap("eap"), args.repeats)
    t_ig = median_time(lambda: eap("eap-ig"), args.repeats)
    t_curve = median_time(curve, args.repeats)
    model.zero_grad(set_to_none=True)

    rows = [
        ("EAP", t_eap, "1 forward + backward", fb_weights, 3.0),
        ("", t_eap, "  (backward to the inputs only)", fb_inputs, None),
        ("EAP-IG, 5 steps", t_ig, "5 forward + backward", 5 * fb_weights, 3.0),
        ("", t_ig, "  (backward to the inputs only)", 5 * fb_inputs, None),
        (f"faithfulness curve, {len(ks)} points", t_curve, f"{len(ks)} forward passes", len(ks) * fwd, None),
    ]
    print(f"\n{'task':34s} {'time':>9s}   {'reference':34s} {'time':>9s} {'ratio':>7s}  target")
    failed = False
    for task, t, ref, t_ref, target in rows:
        ratio = t / t_ref
        verdict = "" if target is None else (f"<= {target:.0f}x: " + ("met" if ratio <= target else "NOT met"))
        failed |= target is not None and ratio > target
        print(f"{task:34s} {t * 1e3:7.0f} ms   {ref:34s} {t_ref * 1e3:7.0f} ms {ratio:6.2f}x  {verdict}")
    print(f"\ncurve points k = {ks}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
