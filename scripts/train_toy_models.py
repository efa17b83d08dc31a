"""Train the bundled ``toy-ioi`` model from scratch.

Usage (from the repository root)::

    python scripts/train_toy_models.py                      # rebuild patchwidgets/models/toy-ioi
    python scripts/train_toy_models.py --steps 3 --out /tmp/toy   # smoke test

What it does:

1. builds the word-level tokenizer from
   :func:`patchwidgets.datasets.coverage_sentences` (every word in every
   form it can take);
2. generates the training corpus with
   :func:`patchwidgets.datasets.training_corpus` (fixed seed);
3. trains a 4-layer, 8-head, 128-wide GPT-2 (``GPT2LMHeadModel``, tied
   embeddings, no dropout) on ``BOS + sentence + EOS`` sequences, padded per
   batch, with the loss masked on padding; AdamW, lr 1e-3 with a short
   linear warm-up and cosine decay, batch 128;
4. evaluates on the held-out splits and the reference prompts, and saves
   ``config.json``, ``model.safetensors`` (float32), the tokenizer files and
   ``eval_results.json`` into ``--out``. ``MODEL_CARD.md`` is written by
   hand and left alone.

Everything is seeded, and uses 2 CPU threads: the default run takes a few
minutes on a laptop-class CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script without installing the package
    sys.path.insert(0, str(REPO_ROOT))

from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from patchwidgets import datasets  # noqa: E402
from patchwidgets.tokenizer import build_tokenizer, save_tokenizer  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "patchwidgets" / "models" / "toy-ioi"



def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-prompts", type=int, default=2000,
                        help="held-out IOI prompts to evaluate on at the end")
    parser.add_argument("--log-every", type=int, default=100)
    return parser.parse_args(argv)


def make_model(vocab_size: int, n_positions: int = 64, n_embd: int = 128, n_layer: int = 4, n_head: int = 8,
               resid_pdrop: float = 0.0) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2, toy-ioi's shape by default (uses the torch RNG)."""
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=resid_pdrop, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=True)
    return GPT2LMHeadModel(config)


def encode_batch(tokenizer, sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``BOS + sentence + EOS`` ids, right-padded, and labels masked on padding.

    The pad id is the same as BOS/EOS (0, as in GPT-2), so padding is found
    from the sequence lengths, never by comparing ids with the pad id.
    Labels are the inputs themselves: GPT2LMHeadModel shifts them by one
    internally; -100 marks positions the loss ignores.
    """
    rows = [ids + [tokenizer.eos_token_id] for ids in tokenizer(sentences)["input_ids"]]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor(row)
    return input_ids, labels


def learning_rate(step: int, total: int, peak: float) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to 10%."""
    warmup = max(1, int(0.05 * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def next_token_logits(model, tokenizer, prompts: list[str], batch: int = 256) -> torch.Tensor:
    """Logits for the token after each prompt (``[n_prompts, vocab]``)."""
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        enc = tokenizer(chunk, padding=True, return_tensors="pt")
        logits = model(input_ids=enc["input_ids"],
                       attention_mask=enc["attention_mask"]).logits
        last = enc["attention_mask"].sum(1) - 1
        out.append(logits[torch.arange(len(chunk)), last])
    return torch.cat(out)


def token_id(tokenizer, piece: str) -> int:
    """Id of a single vocabulary piece such as ``" Mary"``."""
    ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (piece, ids)
    return ids[0]


def evaluate(model, tokenizer, n_ioi: int) -> dict:
    """Accuracy and logit difference on the held-out and training splits."""
    model.eval()
    results: dict = {}
    for split in ("test", "train"):
        items = datasets.ioi_prompts(n_ioi, split=split, seed=0)
        logits = next_token_logits(model, tokenizer, [it["clean"] for it in items])
        io = torch.tensor([token_id(tokenizer, it["correct"]) for it in items])
        s = torch.tensor([token_id(tokenizer, it["incorrect"]) for it in items])
        rows = torch.arange(len(items))
        diff = logits[rows, io] - logits[rows, s]
        results[f"ioi_{split}"] = {
            "n": len(items),
            "top1_accuracy": (logits.argmax(-1) == io).float().mean().item(),
            "io_beats_s": (diff > 0).float().mean().item(),
            "mean_logit_diff": diff.mean().item(),
            "min_logit_diff": diff.min().item(),
        }
        corrupted = next_token_logits(model, tokenizer, [it["corrupted"] for it in items])
        results[f"ioi_{split}"]["corrupted_mean_logit_diff"] = (
            corrupted[rows, io] - corrupted[rows, s]).mean().item()
    for split in ("test", "train"):
        items = datasets.fact_prompts(split)
        logits = next_token_logits(model, tokenizer, [it["prompt"] for it in items])
        answers = torch.tensor([token_id(tokenizer, it["answer"]) for it in items])
        hits = logits.argmax(-1) == answers
        results[f"facts_{split}"] = {
            "n": len(items), "top1_accuracy": hits.float().mean().item(),
            "misses": [it["prompt"] for it, hit in zip(items, hits) if not hit],
        }
    logits = next_token_logits(model, tokenizer, [p for p, _ in datasets.REFERENCE_PROMPTS])
    results["reference_prompts"] = {
        prompt: {"expected": answer,
                 "predicted": tokenizer.convert_ids_to_tokens(int(logits[i].argmax()))}
        for i, (prompt, answer) in enumerate(datasets.REFERENCE_PROMPTS)}
    return results


def save(model, tokenizer, results: dict, out: Path) -> None:
    """The checkpoint, tokenizer and ``eval_results.json`` (the model card is left alone)."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    save_tokenizer(tokenizer, out)
    (out / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")
    for path in out.iterdir():  # save_pretrained may write owner-only files
        if path.is_file() and path.suffix != ".md":
            path.chmod(0o644)


def train(model, optimizer, batch_at: Callable[[int], dict], steps: int, peak_lr: float, log_every: int,
          start: float) -> float:
    """The training loop both bundled models use; returns the last step's loss.

    ``batch_at(step)`` gives the model's keyword arguments for that step (``input_ids``,
    ``labels`` and what else the model needs). Learning rate from :func:`learning_rate`,
    gradients clipped to norm 1, the mean loss printed every ``log_every`` steps with the time
    since ``start``.
    """
    model.train()
    running = 0.0
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, peak_lr)
        loss = model(**batch_at(step)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running += loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            count = (step % log_every) + 1
            print(f"step {step + 1:5d}  loss {running / count:.4f}  "
                  f"lr {optimizer.param_groups[0]['lr']:.2e}  "
                  f"{time.time() - start:6.1f}s", flush=True)
            running = 0.0
    return loss.item()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()

    tokenizer = build_tokenizer(datasets.coverage_sentences())
    corpus = datasets.training_corpus(args.steps * args.batch_size, seed=args.seed)
    model = make_model(len(tokenizer))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tokenizer)}, {n_params:,} parameters, "
          f"{len(corpus):,} training sentences, {args.steps} steps", flush=True)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)

    def batch_at(step: int) -> dict:
        input_ids, labels = encode_batch(tokenizer, corpus[step * args.batch_size : (step + 1) * args.batch_size])
        return {"input_ids": input_ids, "attention_mask": (labels != -100).long(), "labels": labels}

    final_loss = train(model, optimizer, batch_at, args.steps, args.lr, args.log_every, start)
    train_seconds = time.time() - start

    results = evaluate(model, tokenizer, args.eval_prompts)
    results["training"] = {
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "seed": args.seed, "threads": args.threads, "parameters": n_params,
        "vocab_size": len(tokenizer), "seconds": round(train_seconds, 1),
        "final_loss": final_loss,
    }
    print(json.dumps(results, indent=2), flush=True)

    save(model, tokenizer, results, args.out)
    print(f"saved to {args.out} ({time.time() - start:.1f}s total)", flush=True)
    return results


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
