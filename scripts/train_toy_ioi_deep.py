"""Train the bundled ``toy-ioi-deep`` model from scratch.

Usage (from the repository root)::

    python scripts/train_toy_ioi_deep.py                         # rebuild patchwidgets/models/toy-ioi-deep
    python scripts/train_toy_ioi_deep.py --steps 5 --out /tmp/deep   # smoke test

What it does:

1. builds the word-level tokenizer from
   :func:`patchwidgets.deep_world.coverage_sentences`;
2. generates documents with :func:`patchwidgets.deep_world.training_documents`
   (fixed seed) and packs them into rows of ``--context`` tokens, each
   document preceded by ``<|endoftext|>`` (so documents start at every
   position, as in GPT-2's training);
3. trains a GPT-2 (6 layers, 8 heads, d_model 256 by default) with
   *head dropout*: during training each attention head's output is zeroed
   for a whole row with probability ``--head-dropout`` (and the rest scaled
   up), so that no single head can be relied on, which is what makes backup
   heads worth having; plus a little residual dropout;
4. evaluates as ``scripts/train_toy_models.py`` does and saves the model in
   half precision (the weights are small enough that float16 storage changes
   no prediction; the loader casts back to float32).

Everything is seeded; it uses 1 CPU thread (about 59 minutes), as the shipped run did.
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
for path in (REPO_ROOT, REPO_ROOT / "scripts"):
    if str(path) not in sys.path:  # run as a script without installing the package
        sys.path.insert(0, str(path))

from transformers import GPT2LMHeadModel  # noqa: E402

from patchwidgets import deep_world  # noqa: E402
from patchwidgets.tokenizer import build_tokenizer  # noqa: E402
from train_toy_models import evaluate, make_model, save, train  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "patchwidgets" / "models" / "toy-ioi-deep"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2400, help="optimizer steps")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--rows", type=int, default=24, help="rows per batch")
    parser.add_argument("--context", type=int, default=128, help="tokens per row")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--head-dropout", type=float, default=0.1)
    parser.add_argument("--resid-dropout", type=float, default=0.05)
    parser.add_argument("--aside", type=float, default=0.4,
                        help="share of IOI documents with a third name after S2 (deep_world.ASIDES; "
                             "0.4 for the shipped model, 0 in the card's attempt 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (the shipped weights were trained on 1; another count may "
                             "sum in another order and end on slightly different weights)")
    parser.add_argument("--eval-prompts", type=int, default=2000)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--float32", action="store_true", help="save float32 weights")
    return parser.parse_args(argv)


def add_head_dropout(model: GPT2LMHeadModel, p: float) -> None:
    """Zero whole heads at random while training (the attention's merged z)."""
    n_heads = model.config.n_head

    def drop(module, args):
        if not module.training or p == 0:
            return None
        (z,) = args  # [batch, pos, n_heads * d_head]
        batch, pos, width = z.shape
        keep = (torch.rand(batch, 1, n_heads, 1) >= p).to(z.dtype) / (1 - p)
        return (z.view(batch, pos, n_heads, width // n_heads) * keep).view(batch, pos, width),

    for block in model.transformer.h:
        block.attn.c_proj.register_forward_pre_hook(drop)


def pack(tokenizer, documents: list[str], context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack ``BOS + document`` runs greedily into rows of ``context`` tokens.

    Returns ``input_ids`` and ``labels`` (``-100`` on the padding at the end
    of a row, which the loss ignores).
    """
    bos = tokenizer.bos_token_id
    rows, row = [], []
    for ids in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        piece = [bos] + ids
        if len(row) + len(piece) > context:
            rows.append(row)
            row = []
        row += piece[:context]
    rows.append(row)
    input_ids = torch.full((len(rows), context), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), context), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(r)] = torch.tensor(r)
    return input_ids, labels


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()

    tokenizer = build_tokenizer(deep_world.coverage_sentences(asides=args.aside > 0),
                                model_max_length=args.context)
    # About 6 documents fit a 128-token row; generate with a margin and pack once.
    documents = deep_world.training_documents(
        int(args.steps * args.rows * args.context / 18), seed=args.seed, aside=args.aside)
    all_ids, all_labels = pack(tokenizer, documents, args.context)
    if len(all_ids) < args.steps * args.rows:
        raise SystemExit(f"corpus too small: {len(all_ids)} rows for {args.steps * args.rows}")
    model = make_model(len(tokenizer), n_positions=args.context, n_embd=args.d_model, n_layer=args.layers,
                       n_head=args.heads, resid_pdrop=args.resid_dropout)
    add_head_dropout(model, args.head_dropout)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tokenizer)}, {n_params:,} parameters, {len(documents):,} documents "
          f"in {len(all_ids):,} rows, {args.steps} steps of {args.rows}x{args.context}", flush=True)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01,
                                  betas=(0.9, 0.98))

    def batch_at(step: int) -> dict:
        rows = slice(step * args.rows, (step + 1) * args.rows)
        return {"input_ids": all_ids[rows], "labels": all_labels[rows]}

    final_loss = train(model, optimizer, batch_at, args.steps, args.lr, args.log_every, start)
    train_seconds = time.time() - start

    model.eval()
    if not args.float32:
        model.half().float()  # evaluate what is saved
    results = evaluate(model, tokenizer, args.eval_prompts)
    results["training"] = {
        "steps": args.steps, "rows": args.rows, "context": args.context, "lr": args.lr,
        "layers": args.layers, "heads": args.heads, "d_model": args.d_model,
        "head_dropout": args.head_dropout, "resid_dropout": args.resid_dropout, "aside": args.aside,
        "seed": args.seed, "threads": args.threads, "parameters": n_params,
        "vocab_size": len(tokenizer), "seconds": round(train_seconds, 1),
        "final_loss": final_loss,
    }
    print(json.dumps({k: v for k, v in results.items() if k != "reference_prompts"}, indent=1),
          flush=True)

    if not args.float32:
        model.half()
    save(model, tokenizer, results, args.out)
    print(f"saved to {args.out} ({time.time() - start:.1f}s total)", flush=True)
    return results


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
