"""patchwidgets vs transformer_lens.patching on a GPT-2-small-shaped model.

Runs, in one process and on the same inputs, our sweep and TransformerLens' for ``resid_pre``
and for head outputs over all positions, on a randomly initialised model with GPT-2 small's
shape (12 layers, 12 heads, d_model 768, vocab 50257) and an IOI-shaped batch (8 prompt pairs
of 15 tokens that differ at position 10, like the S2 name). Prints both times, their ratio and
the largest difference, and exits non-zero if the results differ by more than 1e-4.

    python benchmarks/bench_patching.py [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # TransformerLens' per-patch progress bar

import torch
from transformer_lens import patching as tlp
from transformer_lens.model_bridge import TransformerBridge
from transformers import GPT2Config, GPT2LMHeadModel

import patchwidgets as pw
from patchwidgets.gpt2_tokenizer import gpt2_tokenizer


def build_model() -> TransformerBridge:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024)
    hf_model = GPT2LMHeadModel(config).eval()
    # The benchmark feeds token ids; the model's tokenizer is GPT-2's own, as its vocabulary.
    with tempfile.TemporaryDirectory() as tmp:  # (the bridge reloads the tokenizer from disk while booting)
        model = TransformerBridge.boot_transformers("gpt2", hf_model=hf_model, tokenizer=gpt2_tokenizer(directory=tmp))
    model.eval()
    return model


def ioi_shaped_batch(n_pairs=8, seq_len=15, diff_pos=10):
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 50257, (n_pairs, seq_len), generator=g)
    corrupted = clean.clone()
    corrupted[:, diff_pos] = torch.randint(0, 50257, (n_pairs,), generator=g)
    correct = torch.randint(0, 50257, (n_pairs,), generator=g)
    incorrect = torch.randint(0, 50257, (n_pairs,), generator=g)
    return clean, corrupted, correct, incorrect


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model()
    clean, corrupted, correct, incorrect = ioi_shaped_batch()
    rows = torch.arange(clean.shape[0])
    answers = list(zip(correct.tolist(), incorrect.tolist()))

    def tl_metric(logits):
        final = logits[:, -1]
        return (final[rows, correct] - final[rows, incorrect]).mean()

    failed = False
    print(f"model: GPT-2-small shape (random weights), batch {tuple(clean.shape)}, threads {args.threads}")
    print(f"{'sweep':<24}{'transformer_lens':>18}{'patchwidgets':>15}{'speed-up':>10}{'max |diff|':>13}")
    for site, tl_fn in [("resid_pre", tlp.get_act_patch_resid_pre),
                        ("head_out", tlp.get_act_patch_attn_head_out_all_pos)]:
        with torch.no_grad():
            ours, t_ours = timed(lambda: pw.patch(model, clean, corrupted, answers=answers, site=site,
                                                  metrics="logit_diff", progress=False))
            _, clean_cache = model.run_with_cache(clean)
            ref, t_tl = timed(lambda: tl_fn(model, corrupted, clean_cache, tl_metric))
        diff = float((ours.grid("logit_diff") - ref).abs().max())
        failed |= diff > 1e-4
        print(f"{site:<24}{t_tl:>16.2f} s{t_ours:>13.2f} s{t_tl / t_ours:>9.1f}x{diff:>13.2e}   {ours.stats}")
    if failed:
        print("FAIL: results differ from transformer_lens.patching by more than 1e-4")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
