"""megatron-core's DDP wrapper, optimizer and learning-rate / weight-decay schedule for one model."""

from __future__ import annotations

import functools
import logging
import math

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from nemo_plugins.cpu_compat import resolve_distributed_optimizer
from nemo_plugins.train.config import OptimizerSettings

logger = logging.getLogger(__name__)


def communication_overlap(on_gpu: bool, distributed_optimizer: bool) -> dict[str, bool]:
    """DDP settings that hide gradient and parameter communication behind compute, on GPUs (NCCL streams).

    ``overlap_grad_reduce``: each gradient bucket's reduce(-scatter) starts as soon as the last micro-batch's
    backward fills it. ``overlap_param_gather`` (distributed optimizer only): the all-gather of updated parameters
    runs during the next forward; on the CPU both stay off (gloo, and the numerics pinned by the loop reference).
    """
    return {"overlap_grad_reduce": on_gpu, "overlap_param_gather": on_gpu and distributed_optimizer}


def wrap_for_training(model: torch.nn.Module,
                      use_distributed_optimizer: bool = True) -> tuple[DistributedDataParallel, bool]:
    """megatron DDP (contiguous fp32 grad buffers, reduced in ``finalize_model_grads``)."""
    distributed = resolve_distributed_optimizer(use_distributed_optimizer)
    overlap = communication_overlap(torch.cuda.is_available(), distributed)
    ddp = DistributedDataParallel(
        model.config,
        DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distributed, **overlap),
        model,
    )
    # the schedules call these after the last micro-batch: DP all-reduce, tied-embedding and SP-norm grads
    model.config.finalize_model_grads_func = finalize_model_grads
    # grads are reduced once per step, after the last micro-batch (with overlap, its backward starts it)
    model.config.no_sync_func = ddp.no_sync
    if overlap["overlap_param_gather"]:
        # a checkpoint reads parameters without a forward: it must wait for the in-flight all-gather first
        model.parameter_sync = functools.partial(ddp.start_param_sync, force_sync=True)
    logger.info("DDP: %s", ", ".join(f"{name}={value}" for name, value in overlap.items()))
    return ddp, distributed


def build_optimizer(ddp: DistributedDataParallel, settings: OptimizerSettings, total_steps: int,
                    distributed: bool) -> tuple[object, OptimizerParamScheduler]:
    """Adam (AdamW-style decay) with fp32 main weights under bf16, and its step-based schedule."""
    config = ddp.module.config
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=settings.lr,
            min_lr=settings.min_lr,
            weight_decay=settings.weight_decay,
            adam_beta1=settings.adam_beta1,
            adam_beta2=settings.adam_beta2,
            adam_eps=settings.adam_eps,
            clip_grad=settings.clip_grad,
            bf16=config.bf16,
            params_dtype=config.params_dtype,
            use_distributed_optimizer=distributed,
        ),
        [ddp],
    )
    config.grad_scale_func = optimizer.scale_loss
    warmup = math.ceil(settings.warmup_fraction * total_steps)
    wsd = settings.decay_style == "WSD"
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=settings.lr,
        min_lr=settings.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, warmup + 1),
        lr_decay_style=settings.decay_style,
        start_wd=settings.weight_decay,
        end_wd=settings.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
        wsd_decay_steps=max(1, round(settings.wsd_decay_fraction * total_steps)) if wsd else None,
        lr_wsd_decay_style="cosine" if wsd else None,
    )
    return optimizer, scheduler
