"""Forward throughput (tokens/s) of the embedded 135M parent on megatron-core, and the ratio to transformers.

Both run the same fp32 weights on the same tokens in this process, repetitions alternated, medians reported; the
ratio is what to compare across machines (and on a loaded one). On a GPU (bf16 on request) the megatron side uses
the Transformer Engine spec when installed.
    python bench/forward_throughput.py [--seq-len 512] [--batch 4] [--repeats 5] [--dtype float32] [--clock wall]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from nemo_plugins import cpu_compat
from nemo_plugins.convert.sources import ModelSource, hf_dir, load_model
from nemo_plugins.distributed import ParallelConfig, device, initialize, shutdown
from nemo_plugins.logs import setup_logging

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds one call takes (GPU work finished) on ``clock``."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = clock()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return clock() - start


def alternate(sides: dict[str, Callable[[], object]], repeats: int,
              clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per call of each side, after one warm-up call each, the sides' repetitions interleaved so that
    a machine shared with other work slows both alike. ``clock=time.process_time`` (``--clock cpu``) counts this
    process's CPU seconds: with one thread (``OMP_NUM_THREADS=1``) that is the work each side does, which other
    jobs on a shared machine barely change, where wall time follows their load."""
    for fn in sides.values():
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            seconds[name].append(timed(fn, clock))
    return {name: statistics.median(values) for name, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS))
    args = parser.parse_args()
    setup_logging()
    dtype = getattr(torch, args.dtype)
    cpu_compat.install()
    initialize(ParallelConfig())
    source = ModelSource.parse("embedded:smollm2")
    config, model = load_model(source, ParallelConfig(), dtype)
    model.eval()
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), device=device())
    positions = torch.arange(args.seq_len, device=device()).expand_as(tokens)

    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(str(hf_dir(source)), dtype=dtype).to(device()).eval()
    with torch.no_grad():
        seconds = alternate({"ours": lambda: model(tokens, positions), "theirs": lambda: reference(tokens).logits},
                            args.repeats, CLOCKS[args.clock])
    ours, theirs = tokens.numel() / seconds["ours"], tokens.numel() / seconds["theirs"]
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {where}, dtype {args.dtype}, batch {args.batch} x {args.seq_len} tokens, medians of "
          f"{args.repeats} alternated repetitions, {args.clock} clock")
    print(f"megatron-core forward: {ours:,.0f} tokens/s")
    print(f"transformers forward:  {theirs:,.0f} tokens/s")
    print(f"ratio megatron / transformers: {ours / theirs:.2f}")
    shutdown()


if __name__ == "__main__":
    main()
