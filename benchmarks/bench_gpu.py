"""patchwidgets on a GPU: parity with the CPU, and time side by side with its peers.

For the project's issue "Models that outgrow one device", section 3. Run it whenever a CUDA
device is available::

    python benchmarks/bench_gpu.py                 # toy-ioi, GPT-2 small shape, Llama 1B shape
    python benchmarks/bench_gpu.py --device cpu --tiny   # checks the script itself, no GPU

For each model (random weights except the bundled toy-ioi) and sweep, in one process:

* ``patchwidgets`` on the TransformerBridge on the device, and on the CPU: the largest
  difference between the two grids ("vs cpu": what moving to the GPU changes);
* ``transformer_lens``: ``transformer_lens.patching`` on the same bridge, the reference
  ("diff" is every tool's largest difference from it);
* ``pw-nnsight``: ``pw.patch`` on an ``nnsight.TransformersModel`` wrapping a copy of the same
  Hugging Face model (patchwidgets' nnsight backend, the code path that ``remote=True`` sends
  to NDIF);
* ``nnsight`` (GPT-2 shapes only): the batched-invokes recipe of nnsight's tutorial, from
  ``bench_peers.py``.

Times are medians of ``--repeats`` runs after a warm-up, with ``torch.cuda.synchronize()``
around each. One pair of 15 tokens differing at position 10 (``bench_peers``' ``1x15``), the
logit difference metric, denoising.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # transformer_lens.patching's bars would drown the table

import torch
from transformer_lens.model_bridge import TransformerBridge
from transformers import GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
import bench_peers as peers  # noqa: E402  (the shared cases, sweeps and nnsight recipe)

import patchwidgets as pw  # noqa: E402
from patchwidgets.loading import model_path  # noqa: E402


def llama_config(tiny: bool) -> LlamaConfig:
    """Llama 3.2 1B's shape (grouped-query attention, 4 query heads per key/value head)."""
    if tiny:
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=512, max_position_embeddings=64,
                           bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=2048,
                       rope_theta=500000.0, tie_word_embeddings=True)


def build(name: str, tiny: bool, device: str):
    """``(bridge on device, bridge on cpu, HF copy for nnsight on device, is_gpt2)``."""
    torch.manual_seed(0)
    if name == "toy-ioi":
        from transformers import AutoModelForCausalLM
        hf = AutoModelForCausalLM.from_pretrained(model_path("toy-ioi")).eval()
        arch, is_gpt2 = str(model_path("toy-ioi")), False
    elif name == "gpt2-small":
        hf, arch, is_gpt2 = GPT2LMHeadModel(peers.gpt2_config(tiny)).eval(), "gpt2", True
    else:
        hf, arch, is_gpt2 = LlamaForCausalLM(llama_config(tiny)).eval(), "meta-llama/Llama-3.2-1B", False
    copies = [copy.deepcopy(hf) for _ in range(2)]  # the boot rebuilds a model's modules in place
    bridges = []
    for target, model in ((device, hf), ("cpu", copies[0])):
        bridge = TransformerBridge.boot_transformers(arch, hf_model=model.to(target),
                                                     tokenizer=peers.tokenizer(model.config.vocab_size))
        bridges.append(bridge.eval())
    return bridges[0], bridges[1], copies[1].to(device), is_gpt2


def timed(fn, repeats: int, device: str):
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    fn()  # warm-up (kernels, allocator)
    times, out = [], None
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def pw_grid(model, case, sweep) -> torch.Tensor:
    result = pw.patch(model, case.clean, case.corrupted, answers=case.answers, site=sweep,
                      metrics="logit_diff", progress=False)
    return result.grid("logit_diff").float().cpu()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", nargs="+", default=["toy-ioi", "gpt2-small", "llama-1b"])
    parser.add_argument("--sweeps", nargs="+", default=list(peers.SWEEPS), choices=peers.SWEEPS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="2-layer models: checks the script")
    parser.add_argument("--skip-tl", action="store_true", help="skip transformer_lens (slow on big models)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here: run with --device cpu to check the script")
        return 2
    where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    print(f"device: {where}; torch {torch.__version__}; patchwidgets {pw.__version__}")
    print(f"{'model':11s} {'sweep':16s} {'tool':17s} {'time':>9s} {'vs TL':>7s} {'diff':>9s} {'vs cpu':>9s}")
    worst = 0.0
    for name in args.models:
        bridge, cpu_bridge, hf, is_gpt2 = build(name, args.tiny, args.device)
        shape = peers.shape_of(bridge)
        case = peers.make_case("1x15", 1, peers.SEQ_LEN, peers.DIFF_POS, shape.d_vocab)
        lm = peers.wrap_nnsight(hf)
        for sweep in args.sweeps:
            cpu_grid = pw_grid(cpu_bridge, case, sweep)
            tools = {"patchwidgets": lambda: pw_grid(bridge, case, sweep),
                     "pw-nnsight": lambda: pw_grid(lm, case, sweep)}
            if is_gpt2:
                tools["nnsight (recipe)"] = lambda: peers.run_nnsight(lm, shape, case, sweep, True)[0].cpu()
            if not args.skip_tl:
                tools = {"transformer_lens": lambda: peers.run_transformer_lens(bridge, case, sweep)[0].cpu(),
                         **tools}
            results = {tool: timed(fn, args.repeats, args.device) for tool, fn in tools.items()}
            reference = results["transformer_lens"][1] if "transformer_lens" in results else cpu_grid
            tl_time = results["transformer_lens"][0] if "transformer_lens" in results else float("nan")
            for tool, (seconds, grid) in results.items():
                diff = float((grid.float() - reference.float()).abs().max())
                vs_cpu = float((grid.float() - cpu_grid).abs().max())
                worst = max(worst, vs_cpu if tool == "patchwidgets" else 0.0)
                print(f"{name:11s} {sweep:16s} {tool:17s} {seconds:8.3f}s {tl_time / seconds:6.1f}x "
                      f"{diff:9.1e} {vs_cpu:9.1e}")
        del bridge, cpu_bridge, hf, lm
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    print(f"largest patchwidgets difference between {where} and CPU: {worst:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
