"""Tokens/s of one logit-distillation step: ours (megatron-core, the training loop's DistillationStep, fused
chunked KL, megatron DDP + Adam) against a plain transformers + PyTorch KD loop, and both forwards alone.

One process, the same weights and the same batch on both sides: the teacher is the embedded SmolLM2-135M parent,
the student a randomly initialised model of the demo's first child shape (30L/576h/768f, tied), exported to an HF
directory so transformers loads exactly the same weights. The plain loop is what anyone would write: teacher
forward (no grad), student forward, full-vocabulary ``log_softmax`` KL (forward, mean per token), backward,
``torch.optim.AdamW``. Rows are whole documents (plain causal attention on both sides). Repetitions of the two
sides alternate, so a machine shared with other work slows both alike; the medians are reported.
    PYTHONPATH=. python bench/distill_step.py [--seq-len 512] [--batch 2] [--repeats 5] [--clock wall]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import torch.nn.functional as F

from bench.forward_throughput import CLOCKS, alternate
from nemo_plugins import cpu_compat
from nemo_plugins.convert.model_io import export_hf
from nemo_plugins.convert.sources import ModelSource, hf_dir, load_model
from nemo_plugins.distill.kl_loss import KLOptions
from nemo_plugins.distill.step import DistillationStep, use_per_token_loss
from nemo_plugins.distill.teacher import Teacher
from nemo_plugins.distributed import ParallelConfig, device, initialize, shutdown
from nemo_plugins.logs import setup_logging
from nemo_plugins.model.builder import build_model
from nemo_plugins.train.config import OptimizerSettings, TrainSettings
from nemo_plugins.train.optimizer import build_optimizer, wrap_for_training

CHILD = dict(num_layers=30, hidden_size=576, ffn_hidden_size=768)  # conf/cascade/demo.yaml's child_14b_like


def plain_kd_step(teacher, student, optimizer, tokens: torch.Tensor) -> float:
    """The textbook KD step on transformers models: full-vocabulary forward KL, mean over tokens."""
    with torch.no_grad():
        teacher_logp = F.log_softmax(teacher(tokens).logits.float(), dim=-1)
    student_logp = F.log_softmax(student(tokens).logits.float(), dim=-1)
    loss = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="none").sum(-1).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS))
    args = parser.parse_args()
    setup_logging()
    parallel = ParallelConfig()
    cpu_compat.install()
    initialize(parallel)
    source = ModelSource.parse("embedded:smollm2")
    parent_config, teacher = load_model(source, parallel)
    student_config = parent_config.replace(**CHILD)
    torch.manual_seed(0)
    student = build_model(student_config, parallel)

    from transformers import AutoModelForCausalLM

    hf_teacher = AutoModelForCausalLM.from_pretrained(str(hf_dir(source))).to(device()).eval()
    with tempfile.TemporaryDirectory() as out:
        export_hf(student, student_config, out)
        hf_student = AutoModelForCausalLM.from_pretrained(out).to(device()).train()
    hf_teacher.requires_grad_(False)
    plain_optimizer = torch.optim.AdamW(hf_student.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1)

    tokens = torch.randint(0, parent_config.vocab_size, (args.batch, args.seq_len), device=device())
    positions = torch.arange(args.seq_len, device=device()).expand_as(tokens)
    train = TrainSettings(seq_len=args.seq_len, micro_batch_size=args.batch, global_batch_size=args.batch,
                          train_tokens=args.batch * args.seq_len * 1000)
    step = DistillationStep(Teacher(teacher), KLOptions(), train)
    use_per_token_loss(student)
    ddp, distributed = wrap_for_training(student)
    optimizer, scheduler = build_optimizer(ddp, OptimizerSettings(lr=1e-5, min_lr=1e-6), train.steps, distributed)

    def our_step() -> float:
        ddp.train()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        loss = step(ddp, (tokens, positions))
        optimizer.step()
        scheduler.step(increment=1)
        return loss

    steps = alternate({"ours": our_step,
                       "plain": lambda: plain_kd_step(hf_teacher, hf_student, plain_optimizer, tokens)}, args.repeats,
                      CLOCKS[args.clock])
    ddp.eval()
    with torch.no_grad():
        forwards = alternate({"ours": lambda: teacher(tokens, positions), "plain": lambda: hf_teacher(tokens).logits},
                             args.repeats, CLOCKS[args.clock])
    n = tokens.numel()
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{torch.get_num_threads()} threads"
    print(f"device: {where}, fp32, batch {args.batch} x {args.seq_len} tokens, medians of {args.repeats} alternated "
          f"repetitions ({args.clock} clock); student {student_config.num_layers}L/{student_config.hidden_size}h/"
          f"{student_config.ffn_hidden_size}f tied, teacher SmolLM2-135M")
    print("| measurement | ours (megatron-core) tokens/s | transformers + PyTorch tokens/s | ratio ours / theirs |")
    print("|---|---:|---:|---:|")
    for name, seconds in (("distillation step (teacher fwd, student fwd+bwd, KL, Adam)", steps),
                          ("parent forward (logits)", forwards)):
        print(f"| {name} | {n / seconds['ours']:,.0f} | {n / seconds['plain']:,.0f} | "
              f"{seconds['plain'] / seconds['ours']:.2f} |")
    shutdown()


if __name__ == "__main__":
    main()
