"""Worker bodies for multi-process gloo tests (spawned; must be importable top-level functions)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from nemo_plugins import cpu_compat
from nemo_plugins.convert.model_io import gather_hf_state, load_hf_state
from nemo_plugins.distributed import ParallelConfig, initialize, shutdown
from nemo_plugins.model.builder import build_model


def run(rank: int, world_size: int, port: int, body, args) -> None:
    """One spawned rank: torchrun's environment, the CPU compat (the test session's is not inherited), ``body``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    cpu_compat.install()
    try:
        body(*args)
    finally:
        shutdown()


def tp_logits_and_loss(config, state_path: str, out_path: str, tp: int) -> None:
    """Forward with TP=tp: gathered logits and megatron's vocab-parallel cross-entropy."""
    parallel = ParallelConfig(tp=tp)
    initialize(parallel)
    model = build_model(config, parallel).eval()
    load_hf_state(model, torch.load(state_path), config)
    tokens, positions = torch.load(out_path + ".inputs")
    with torch.no_grad():
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(model(tokens, positions))
        loss = model(tokens, positions, labels=tokens.roll(-1, dims=1))
    roundtrip = gather_hf_state(model, config)
    if dist.get_rank() == 0:
        torch.save({"logits": logits, "loss": loss, "roundtrip": roundtrip}, out_path)


def pp_loss(config, state_path: str, out_path: str, pp: int) -> None:
    """Mean token loss and gradient norm through megatron's pipeline schedule (p2p over gloo) and grad finalisation."""
    parallel = ParallelConfig(pp=pp)
    initialize(parallel)
    model = build_model(config, parallel)
    load_hf_state(model, torch.load(state_path), config)
    model.config.finalize_model_grads_func = finalize_model_grads  # incl. the tied-embedding all-reduce
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    tokens, positions = torch.load(out_path + ".inputs")
    micro_batches = [(tokens[i : i + 1], positions[i : i + 1]) for i in range(tokens.shape[0])]

    def forward_step(data_iterator, chunk):
        mb_tokens, mb_positions = next(data_iterator)
        output = chunk(mb_tokens, mb_positions, labels=mb_tokens.roll(-1, dims=1))

        def loss_func(per_token_loss):
            loss = per_token_loss.float().mean()
            return loss, {"loss": loss.detach()}

        return output, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=[ddp],
        num_microbatches=len(micro_batches),
        seq_length=tokens.shape[1],
        micro_batch_size=1,
        forward_only=False,
    )
    duplicate = model.output_layer.weight if config.tie_embeddings and not model.pre_process else None
    grad_sq = sum(p.main_grad.float().pow(2).sum() for p in model.parameters() if p is not duplicate)
    grad_sq = grad_sq.reshape(1)
    dist.all_reduce(grad_sq, group=parallel_state.get_pipeline_model_parallel_group())
    if parallel_state.is_pipeline_last_stage():
        mean = torch.stack([m["loss"] for m in losses]).mean()
        torch.save({"loss": mean, "grad_sq": grad_sq}, out_path)


def prune_tiny(config, state_path: str, out_path: str, tp: int) -> None:
    """Algorithm 2 with calibration under TP=tp; rank 0 saves the child and the report."""
    from nemo_plugins.prune.megatron_calibrator import megatron_calibrator
    from nemo_plugins.prune.pipeline import PruneOptions, PruneTarget, prune
    from nemo_plugins.prune.state import ModelState

    parallel = ParallelConfig(tp=tp)
    initialize(parallel)
    tokens, positions = torch.load(out_path + ".inputs")
    target = PruneTarget(num_layers=3, hidden_size=32, ffn_hidden_size=64, tie_embeddings=False)
    child, report = prune(ModelState(config, torch.load(state_path)), target, PruneOptions(),
                          megatron_calibrator(parallel, tokens, positions, progress=False))
    if dist.get_rank() == 0:
        torch.save({"tensors": child.tensors, "config": child.config, "report": report}, out_path)


def kl_loss_tp(problem_path: str, out_path: str, tp: int) -> None:
    """The fused KL loss with the vocabulary split over TP ranks; rank 0 saves loss and gathered grads."""
    from nemo_plugins.distill.kl_loss import KLOptions, fused_kl_loss

    initialize(ParallelConfig(tp=tp))
    h, w, teacher, mask, labels = torch.load(problem_path)
    rank, group = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_group()
    w_shard = w.chunk(tp)[rank].clone().requires_grad_()
    h = h.clone().requires_grad_()
    results = {}
    for name, options in {"kl": KLOptions(chunk_tokens=8), "ce": KLOptions(ce_weight=0.5, chunk_tokens=8)}.items():
        h.grad, w_shard.grad = None, None
        loss = fused_kl_loss(h, w_shard, teacher.chunk(tp, dim=1)[rank], mask, labels, options, tp_group=group)
        loss.backward()
        shards = [torch.zeros_like(w_shard) for _ in range(tp)]
        dist.all_gather(shards, w_shard.grad, group=group)
        results[name] = (loss.detach(), h.grad.clone(), torch.cat(shards))
    if dist.get_rank() == 0:
        torch.save(results, out_path)


def distill_steps(teacher_config, student_config, states_path: str, data_prefix: str, out_dir: str, tp: int,
                  pp: int) -> None:
    """Three distillation steps (fused KL, megatron optimizer, schedules) under TP/PP; metrics go to out_dir."""
    from nemo_plugins.data.mix import Cursor, DataMix, MixSource
    from nemo_plugins.data.token_store import TokenFile
    from nemo_plugins.distill.kl_loss import KLOptions
    from nemo_plugins.distill.step import train_with_distillation
    from nemo_plugins.distill.teacher import Teacher
    from nemo_plugins.train.config import OptimizerSettings, TrainSettings

    parallel = ParallelConfig(tp=tp, pp=pp)
    initialize(parallel)
    states = torch.load(states_path)
    teacher = build_model(teacher_config, parallel)
    load_hf_state(teacher, states["teacher"], teacher_config)
    student = build_model(student_config, parallel)
    load_hf_state(student, states["student"], student_config)
    mix = DataMix([MixSource("a", TokenFile(data_prefix), 1.0)], heldout_fraction=0.2)
    train_with_distillation(student, student_config, Teacher(teacher), mix,
                            TrainSettings(seq_len=32, micro_batch_size=2, global_batch_size=4, train_tokens=3 * 128,
                                          eval_rows_per_source=2),
                            OptimizerSettings(lr=1e-2, min_lr=1e-3), KLOptions(chunk_tokens=16), out_dir, Cursor())
