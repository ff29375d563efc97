"""Calibration cost: time of a streaming-statistics pass / time of a plain forward pass on the same tokens.

Goal <= 1.2 for the pass that gathers every statistic (layers, hidden moments, FFN scores); the recipe's
default re-calibration runs one cheaper pass per statistic, printed too.
    PYTHONPATH=. python bench/calibration.py [--tokens 4096] [--seq-len 512]
"""

from __future__ import annotations

import argparse

import torch

from bench.forward_throughput import timed
from nemo_plugins import cpu_compat
from nemo_plugins.convert.sources import ModelSource, load_model, tokenizer_dir
from nemo_plugins.data.packing import pack_text
from nemo_plugins.data.tokenizer import load_tokenizer
from nemo_plugins.distributed import ParallelConfig, initialize, shutdown
from nemo_plugins.logs import setup_logging
from nemo_plugins.model.forward import forward_only
from nemo_plugins.prune.calibration import calibrate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    args = parser.parse_args()
    setup_logging()
    cpu_compat.install()
    initialize(ParallelConfig())
    source = ModelSource.parse("embedded:smollm2")
    config, model = load_model(source, ParallelConfig())
    tokenizer = load_tokenizer(tokenizer_dir(source))
    tokens, positions = pack_text(
        tokenizer, ["stdlib:asyncio", "stdlib:email"], args.seq_len, args.tokens // args.seq_len
    )
    mb = args.micro_batch_size
    batches = [(tokens[i : i + mb], positions[i : i + mb], None) for i in range(0, len(tokens), mb)]
    forward_only(model, batches[:1])  # warm-up

    plain = min(timed(lambda: forward_only(model, batches)) for _ in range(2))
    print(f"device: {'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}; "
          f"{tokens.numel()} tokens of real text; plain forward {plain:.2f} s ({tokens.numel() / plain:,.0f} tokens/s)")
    for want in (("layers", "hidden", "ffn"), ("layers",), ("hidden",), ("ffn",)):
        seconds = min(
            timed(lambda: calibrate(model, config, tokens, positions, want, mb, progress=False)) for _ in range(2)
        )
        print(f"calibration {'+'.join(want):<18} {seconds:.2f} s   ratio to forward {seconds / plain:.2f}")
    shutdown()


if __name__ == "__main__":
    main()
