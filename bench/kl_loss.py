"""Fused forward-KL loss vs the naive one at Ministral vocabulary (131,072).

Prints, each measured in this run (every variant in its own subprocess so peaks do not mix):
* peak-memory ratio fused / naive (goal <= 1/8), memory counted above the shared inputs;
* time ratio fused loss (forward + backward) / the student's output-layer matmul alone (forward + backward,
  i.e. the three matmuls any loss on these logits needs) (goal <= 1.2).
    python bench/kl_loss.py [--tokens 8192] [--hidden 512] [--vocab 131072] [--chunk 256]
On a GPU it runs there (bf16 weights, CUDA peak-memory counters); on CPU in fp32 with peak RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

VARIANT = r"""
import json, resource, sys, time, torch
from nemo_plugins.distill.kl_loss import KLOptions, fused_kl_loss, naive_kl_loss
variant, tokens, hidden, vocab, chunk = sys.argv[1], *map(int, sys.argv[2:6])
cuda = torch.cuda.is_available()
dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
torch.manual_seed(0)
h = (torch.randn(tokens, hidden, device=dev) * 0.5).to(dtype).requires_grad_()
w = (torch.randn(vocab, hidden, device=dev) * 0.05).to(dtype).requires_grad_()
# no fp32 transient: it would hide CPU peaks
teacher = torch.randn(tokens, vocab, device=dev, dtype=torch.bfloat16).mul_(2)
mask = torch.ones(tokens, device=dev)
def run():
    h.grad = w.grad = None
    if variant == "naive":
        loss = naive_kl_loss(h @ w.T, teacher, mask)
    elif variant == "fused":
        loss = fused_kl_loss(h, w, teacher, mask, options=KLOptions(chunk_tokens=chunk))
    else:  # the output-layer matmul alone: forward + backward of h @ w.T
        loss = (h @ w.T).sum()
    loss.backward()
    if cuda: torch.cuda.synchronize()
if cuda:
    run(); torch.cuda.synchronize(); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
else:  # peak RSS only grows: take the base before any run, with the inputs already allocated
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    run()
times = []
for _ in range(2):
    start = time.perf_counter(); run(); times.append(time.perf_counter() - start)
if cuda:
    peak = torch.cuda.max_memory_allocated() - base
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
device = torch.cuda.get_device_name() if cuda else "CPU"
print(json.dumps({"seconds": min(times), "extra_bytes": peak, "device": device}))
"""


def measure(variant: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-c", VARIANT, variant, str(args.tokens), str(args.hidden), str(args.vocab), str(args.chunk)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=131_072)
    parser.add_argument("--chunk", type=int, default=256)
    args = parser.parse_args()
    matmul, fused, naive = (measure(v, args) for v in ("matmul", "fused", "naive"))
    gib = 2**30
    print(f"device: {fused['device']}; {args.tokens} tokens x vocab {args.vocab}, "
          f"hidden {args.hidden}, chunk {args.chunk}")
    print(f"peak extra memory: fused {fused['extra_bytes'] / gib:.2f} GiB, naive {naive['extra_bytes'] / gib:.2f} GiB, "
          f"ratio {fused['extra_bytes'] / naive['extra_bytes']:.3f} (goal <= 0.125)")
    print(f"time fwd+bwd: fused {fused['seconds']:.2f} s, naive {naive['seconds']:.2f} s, output-layer matmul alone "
          f"{matmul['seconds']:.2f} s; fused / matmul {fused['seconds'] / matmul['seconds']:.2f} (goal <= 1.2)")


if __name__ == "__main__":
    main()
