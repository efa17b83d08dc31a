"""Measure a model's IOI circuit (Wang et al.'s classes) and write the figures.

Usage (from the repository root)::

    python scripts/measure_ioi_circuit.py                    # toy-ioi-deep, writes its circuit.json
    python scripts/measure_ioi_circuit.py --model toy-ioi --no-write

Uses :func:`patchwidgets.ioi_circuit.find_circuit` on held-out IOI prompts
(held-out name pairs, held-out and training templates alternating) and prints the
model card's tables; ``circuit.json`` next to the checkpoint keeps the heads of each
class and their figures, which ``tests/test_toy_ioi_deep.py`` checks again.

``--eap`` prints instead the card's edge-attribution figures: EAP-IG (ABC corruption, noising)
ranked and measured by exact edge patching on several sets of 16 prompts, to show how much
the top-k faithfulness depends on the sample.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from patchwidgets import datasets, ioi_circuit  # noqa: E402
from patchwidgets.loading import load_model, model_path  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy-ioi-deep")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (1 beside another busy job)")
    parser.add_argument("--eap", action="store_true", help="print EAP-IG faithfulness curves on several prompt sets")
    return parser.parse_args(argv)


def _row(circuit: ioi_circuit.IOICircuit, head: tuple[int, int]) -> dict:
    m = circuit.measurements
    row = {"head": f"{head[0]}.{head[1]}"}
    for key, value in m.items():
        row[key] = round(float(value[head]), 4)
    return row


#: The prompt sets of the card's edge-attribution paragraph: (label, ioi_prompts keyword arguments).
EAP_SETS = [
    ("held-out, seed 7 (the card's)", {"split": "test", "seed": 7}),
    ("held-out, seed 1", {"split": "test", "seed": 1}),
    ("training, seed 3", {"split": "train", "seed": 3}),
    ("training, seed 0 (notebook 10's)", {"split": "train", "seed": 0}),
    ("held-out templates, seed 1 (notebook 10's section 10)",
     {"split": "test", "seed": 1, "templates": datasets.IOI_HELDOUT_TEMPLATES}),
]


def eap_curves(model, ks=(50, 100, 200), n: int = 16) -> dict:
    """EAP-IG's top-k faithfulness on each of :data:`EAP_SETS` (``n`` prompts each)."""
    import patchwidgets as pw

    curves = {}
    for label, kwargs in EAP_SETS:
        items = datasets.ioi_prompts(n, **kwargs)
        args = ([it["clean"] for it in items], [it["abc"] for it in items],
                [(it["correct"], it["incorrect"]) for it in items])
        with torch.enable_grad():
            scores = pw.edge_attribution(model, *args, method="eap-ig", direction="noising", progress=False)
        curve = pw.faithfulness_curve(model, *args, scores=scores, ks=list(ks))
        curves[label] = {int(k): round(float(f), 4) for k, f in zip(curve.k, curve.faithfulness)}
        print(label, curves[label], flush=True)
    return curves


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    model = load_model(args.model, device="cpu")
    if args.eap:
        return eap_curves(model)
    items = datasets.ioi_prompts(args.prompts, split="test", seed=args.seed)
    names = [" " + name for name in datasets.NAMES]
    circuit = ioi_circuit.find_circuit(model, items, names)
    means = ioi_circuit.abc_means(model, items)
    clean = ioi_circuit.logit_diff(model, items)
    r = ioi_circuit.roles(model, items)
    with torch.no_grad():
        logits = model(r.tokens)[torch.arange(r.n), r.end]
    accuracy = float((logits.argmax(-1) == r.io_id).float().mean())
    classes = {
        "name_movers": circuit.name_movers,
        "negative_name_movers": circuit.negative_name_movers,
        "s_inhibition": circuit.s_inhibition,
        "duplicate_token": circuit.duplicate_token,
        "induction": circuit.induction,
        "backup": circuit.backup,
        "unclassified": circuit.unclassified,
    }
    report = {
        "model": args.model, "prompts": args.prompts, "seed": args.seed,
        "accuracy": round(accuracy, 4),
        "mean_logit_diff": round(float(clean.mean()), 4),
        "classes": {k: [f"{a}.{b}" for a, b in v] for k, v in classes.items()},
        "faithfulness": round(ioi_circuit.faithfulness(model, items, circuit.heads, means), 4),
        "heads": {name: [_row(circuit, h) for h in heads] for name, heads in classes.items()},
        "seconds": round(time.time() - start, 1),
    }
    print(json.dumps(report, indent=1))
    torch.set_printoptions(precision=2, sci_mode=False, linewidth=160)
    for key, value in circuit.measurements.items():
        print(key, value, sep="\n")
    if not args.no_write:
        (model_path(args.model) / "circuit.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
