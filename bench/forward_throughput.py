"""Forward throughput (tokens/s) of the embedded 135M parent on megatron-core, and the ratio to transformers.

Both run the same fp32 weights on the same tokens in this process; the ratio is what to compare across
machines. On a GPU (bf16 on request) the megatron side uses the Transformer Engine spec when installed.
    python bench/forward_throughput.py [--seq-len 512] [--batch 4] [--repeats 3] [--dtype float32]
"""

from __future__ import annotations

import argparse
import time

import torch

from nemo_plugins.convert.sources import ModelSource, hf_dir, load_model
from nemo_plugins.distributed import ParallelConfig, device, initialize, shutdown
from nemo_plugins.logs import setup_logging


def tokens_per_second(fn, tokens: torch.Tensor, repeats: int) -> float:
    fn(tokens)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(tokens)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return tokens.numel() / best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    setup_logging()
    dtype = getattr(torch, args.dtype)
    initialize(ParallelConfig())
    source = ModelSource.parse("embedded:smollm2")
    config, model = load_model(source, ParallelConfig(), dtype)
    model.eval()
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), device=device())
    positions = torch.arange(args.seq_len, device=device()).expand_as(tokens)

    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(str(hf_dir(source)), dtype=dtype).to(device()).eval()
    with torch.no_grad():
        ours = tokens_per_second(lambda t: model(t, positions), tokens, args.repeats)
        theirs = tokens_per_second(lambda t: reference(t).logits, tokens, args.repeats)
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {where}, dtype {args.dtype}, batch {args.batch} x {args.seq_len} tokens")
    print(f"megatron-core forward: {ours:,.0f} tokens/s")
    print(f"transformers forward:  {theirs:,.0f} tokens/s")
    print(f"ratio megatron / transformers: {ours / theirs:.2f}")
    shutdown()


if __name__ == "__main__":
    main()
