"""Greedy decode throughput of the KV-cached engine on SmolLM2-135M vs full recomputation and vs transformers.

All three run the same fp32 weights on the same real prompts (windows of the stdlib's json package source) in
this process, greedy, no stop token, so every row generates exactly ``--new-tokens`` tokens; tokens/s = batch x
new tokens / time (CPU time of this process on the CPU, see ``timed``), prefill included:
- the engine (``TorchEngine``, megatron-core's static KV cache): prefill + one-token decode steps;
- full recomputation (what ``greedy_generate`` did): new token t costs one forward over prompt + t tokens.
  Those forwards are timed on the engine's own sequences at every ``--full-stride``-th t only, and the total
  is stride x their sum (a Riemann sum over the measured per-step costs), so a 256-token run costs 8
  forwards instead of 256;
- transformers' ``generate`` (greedy, its default attention and cache, no EOS: ``min_new_tokens`` would ban the EOS
  token instead, and rows would then differ) on the HF export of the same model.
One intra-op thread by default (``--threads``): on a shared 2-core machine two threads make every small op
wait for a second busy core (decode steps measured 10x slower that way); all three methods use the setting,
and their CPU time is what is compared (use ``--threads 1`` for that to be meaningful).
    python bench/generation.py [--batches 1 16] [--prompt-tokens 32] [--new-tokens 256] [--full-stride 32]
"""

from __future__ import annotations

import argparse
import time

import torch

from nemo_plugins import cpu_compat
from nemo_plugins.convert.sources import ModelSource, hf_dir, load_model
from nemo_plugins.data.text_files import iter_documents
from nemo_plugins.data.tokenizer import load_tokenizer
from nemo_plugins.distributed import ParallelConfig, device, initialize, shutdown
from nemo_plugins.eval.perplexity import token_windows
from nemo_plugins.generation.engine import Request, SamplingParams
from nemo_plugins.generation.loops import LoopConfig
from nemo_plugins.generation.torch_engine import TorchEngine
from nemo_plugins.logs import setup_logging


def timed(fn):
    """(result, seconds): wall time on a GPU; on the CPU this process's CPU time, which other jobs sharing the
    cores do not inflate (one intra-op thread: CPU time is the work done)."""
    if not torch.cuda.is_available():
        start = time.process_time()
        result = fn()
        return result, time.process_time() - start
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return result, time.perf_counter() - start


@torch.no_grad()
def full_recompute_seconds(model, sequences: torch.Tensor, prompt_tokens: int, new_tokens: int, stride: int) -> float:
    """Estimated wall time of greedy decoding by full recomputation: the forward that produces new token t
    (over the first prompt + t tokens of ``sequences``) timed for every ``stride``-th t, times ``stride``."""
    total = 0.0
    for t in range(0, new_tokens, stride):
        tokens = sequences[:, : prompt_tokens + t].to(device())
        positions = torch.arange(tokens.shape[1], device=device()).expand_as(tokens)
        _, seconds = timed(lambda: model(tokens, positions)[:, -1].argmax(-1))
        total += seconds * min(stride, new_tokens - t)
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--full-stride", type=int, default=32, help="time full recomputation at every n-th step")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    setup_logging()
    torch.set_num_threads(args.threads)
    cpu_compat.install()
    initialize(ParallelConfig())
    source = ModelSource.parse("embedded:smollm2")
    _, model = load_model(source, ParallelConfig())
    model.eval()
    tokenizer = load_tokenizer(hf_dir(source))
    windows = token_windows(tokenizer, iter_documents(["stdlib:json"]), args.prompt_tokens - 1, max(args.batches))

    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(str(hf_dir(source)), dtype=torch.float32).to(device()).eval()
    reference.generation_config.eos_token_id = None  # like the engine without stop tokens: EOS is a token like any
    engine = TorchEngine(model, max_batch_size=max(args.batches))
    params = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens, loop=LoopConfig(stop_on_loop=False))
    where = (torch.cuda.get_device_name() + ", wall time" if torch.cuda.is_available()
             else f"CPU x{torch.get_num_threads()} threads, process CPU time")
    print(f"device: {where}, fp32, prompts of {args.prompt_tokens} tokens, {args.new_tokens} new tokens (greedy)")
    speedups = []
    for batch in args.batches:
        prompts = windows[:batch]
        engine.generate([Request(tuple(prompts[0, :4].tolist()), SamplingParams(temperature=0.0, max_new_tokens=4))])
        responses, engine_s = timed(lambda: engine.generate([Request(tuple(p.tolist()), params) for p in prompts]))
        ids = torch.tensor([r.token_ids for r in responses])
        full_s = full_recompute_seconds(model, torch.cat([prompts, ids], 1), prompts.shape[1], args.new_tokens,
                                        args.full_stride)
        with torch.no_grad():
            reference.generate(prompts[:1, :4].to(device()), do_sample=False, max_new_tokens=4,
                               pad_token_id=tokenizer.eos_token_id)
            generated, hf_s = timed(lambda: reference.generate(
                prompts.to(device()), attention_mask=torch.ones_like(prompts, device=device()), do_sample=False,
                max_new_tokens=args.new_tokens, pad_token_id=tokenizer.eos_token_id))
        ours = batch * args.new_tokens / engine_s
        full = batch * args.new_tokens / full_s
        theirs = batch * args.new_tokens / hf_s
        same_hf = int((ids == generated[:, prompts.shape[1]:].cpu()).all(-1).sum())
        speedups.append(ours / full)
        print(f"batch {batch:>3}: KV-cache engine {ours:8.1f} tok/s | full recompute {full:8.1f} tok/s "
              f"| transformers generate {theirs:8.1f} tok/s")
        print(f"batch {batch:>3}: speed-up vs full recompute {ours / full:.2f}x, vs transformers generate "
              f"{ours / theirs:.2f}x; rows token-identical to transformers: "
              f"{same_hf}/{batch}")
    print(f"the smaller of the speed-ups at batch sizes {args.batches}:")
    print(f"KV-cache decode speed-up vs full recompute: {min(speedups):.1f}x")
    shutdown()


if __name__ == "__main__":
    main()
