"""The logit-distillation step (pretraining distillation and SFT with logit distillation alike): teacher forward,
student forward/backward through megatron's pipeline schedules with the fused forward-KL loss.

A batch is ``(tokens, positions)`` or ``(tokens, positions, target_mask)``; the mask (a chat mix's assistant
tokens) narrows the loss to those targets, which is all that separates SFT-KD from pretraining distillation. A mix
with images adds each row's images last, ``(tokens, positions, text_target_mask, row_images)``: student and teacher
get the micro-batch's images, and the mask keeps image tokens out of the KL.

Normalisation: the gradient is the mean over every target token of the global batch, whatever the number of
targets in each micro-batch, DP rank and CP rank (SFT masks make them unequal). Each micro-batch's loss function
returns ``(loss sum, target count, ...)`` and megatron's per-token path (``calculate_per_token_loss``) sums the
counts over micro-batches, then over the DP x CP group in ``finalize_model_grads``, and divides the summed
gradients by that total; DDP then sums instead of averaging. A per-micro-batch mean would weight a micro-batch
with 3 targets like one with 3,000, and under CP megatron's legacy path multiplies each rank's mean by cp while
DDP divides by dp x cp only: gradients cp times too large.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from nemo_plugins.data.batches import local_batch
from nemo_plugins.data.mix import Cursor
from nemo_plugins.distill.heldout import TeacherHeldout, evaluate_heldout, heldout_set
from nemo_plugins.distill.kl_loss import KLOptions, fused_kl_loss
from nemo_plugins.distill.teacher import Teacher
from nemo_plugins.model.config import MistralConfig
from nemo_plugins.parallel_ops import flatten_tokens, full_sequence, summed_logs, tp_group
from nemo_plugins.train.config import OptimizerSettings, TrainSettings
from nemo_plugins.train.facts import RunFacts
from nemo_plugins.train.loop import DataStream, TrainingRun


def mean_loss_schedule(ddp: torch.nn.Module, micro: list, train: TrainSettings, forward_step: Callable,
                       count_key: str) -> float:
    """One forward-backward schedule over this rank's micro-batches whose loss functions log ``loss_sum`` and
    ``count_key``; returns their global ratio (the mean loss per target token / row of the global batch)."""
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro), model=[ddp], num_microbatches=len(micro),
        seq_length=train.seq_len, micro_batch_size=train.micro_batch_size, forward_only=False)
    loss_sum, count = summed_logs(outputs, ("loss_sum", count_key))
    return loss_sum / max(count, 1.0)


def split_micro_batches(batch: tuple, train: TrainSettings) -> list[dict[str, torch.Tensor]]:
    """This data-parallel rank's rows of a global batch, as micro-batches ready for the model."""
    microbatches = train.microbatches(parallel_state.get_data_parallel_world_size())
    rows_per_rank = train.micro_batch_size * microbatches
    dp_rank = parallel_state.get_data_parallel_rank()
    mine = slice(dp_rank * rows_per_rank, (dp_rank + 1) * rows_per_rank)
    tokens, positions, *target_mask = batch
    row_images = target_mask.pop() if target_mask and isinstance(target_mask[-1], list) else None
    parts = [t[mine].split(train.micro_batch_size) for t in (tokens, positions, *target_mask)]
    micro = [local_batch(*rows) for rows in zip(*parts)]
    if row_images is not None:  # a mix with images: each micro-batch's images, row by row
        mine_images = row_images[mine]
        for i, part in enumerate(micro):
            rows = mine_images[i * train.micro_batch_size:(i + 1) * train.micro_batch_size]
            part["images"] = [image for row in rows for image in row]
    return micro


def model_inputs(micro_batch: dict) -> dict:
    """The model's keyword inputs besides tokens and positions: the micro-batch's images, when its mix has them."""
    return {"images": micro_batch["images"]} if "images" in micro_batch else {}


def use_per_token_loss(model: torch.nn.Module) -> None:
    """Let megatron divide the summed gradients by the global target count. Must run before DDP wraps the model:
    DDP reads the flag at construction to drop its 1 / (dp x cp) gradient scaling."""
    model.config.calculate_per_token_loss = True


def require_per_token_loss(model: torch.nn.Module, counted: str) -> None:
    """A step returning (loss sum, count) needs megatron's per-token path, else DDP would also average over DP."""
    if not model.config.calculate_per_token_loss:
        raise RuntimeError(f"the step normalises by the global {counted} count: call use_per_token_loss(model) before "
                           "wrapping the model in DDP")


@dataclass
class DistillationStep:
    """``step(ddp, batch) -> mean loss per target token of the global batch`` for the training loop."""

    teacher: Teacher
    kl: KLOptions
    train: TrainSettings

    def __call__(self, ddp: torch.nn.Module, batch: tuple) -> float:
        student = ddp.module
        require_per_token_loss(student, "target token")
        micro = split_micro_batches(batch, self.train)
        teacher_out = self.teacher.run([(b["tokens"], b["positions"], model_inputs(b)) for b in micro])
        kl, sequence_parallel, group = self.kl, student.config.sequence_parallel, tp_group()

        def forward_step(data_iterator, chunk):
            index, micro_batch = next(data_iterator)
            hidden = chunk(micro_batch["tokens"], micro_batch["positions"], return_hidden=True,
                           **model_inputs(micro_batch))

            def loss_func(output):
                labels = micro_batch["labels"].reshape(-1) if kl.ce_weight > 0 else None
                mask = micro_batch["mask"].reshape(-1)
                loss_sum = fused_kl_loss(flatten_tokens(full_sequence(output, sequence_parallel)),
                                         student.output_weight(), teacher_out[index], mask, labels, kl, group, "sum")
                count = mask.sum().to(torch.int)
                return loss_sum, count, {"loss_sum": loss_sum.detach().clone(), "tokens": count}

            return hidden, loss_func

        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(enumerate(micro)),
            model=[ddp],
            num_microbatches=len(micro),
            seq_length=self.train.seq_len,
            micro_batch_size=self.train.micro_batch_size,
            forward_only=False,
        )
        loss_sum, count = summed_logs(outputs, ("loss_sum", "tokens"))
        return loss_sum / max(count, 1.0)


def train_with_distillation(student: torch.nn.Module, student_config: MistralConfig, teacher: Teacher, data: DataStream,
                            train: TrainSettings, optimizer: OptimizerSettings, kl: KLOptions, out_dir: Path,
                            cursor: Cursor, tokenizer_dir: Path | None = None, name: str = "distill",
                            facts: RunFacts | None = None, teacher_identity: str = "",
                            heldout_cache: Path | None = None) -> dict:
    """The training loop with the distillation step, evaluated on ``data``'s held-out rows (KL and both
    perplexities, pooled and per source; assistant tokens only when the data is a chat mix). ``facts``: the stage's
    fingerprint (see ``train/facts.py``). The teacher's held-out pass runs once per stage, or once per run when
    ``heldout_cache`` (a directory shared by the run's stages) is given; ``teacher_identity`` (its model source)
    is part of that cache's key. Returns the loop's result."""
    heldout = heldout_set(data, train.seq_len, train.eval_rows_per_source)
    teacher_heldout = TeacherHeldout(teacher, teacher_identity, heldout_cache)

    def evaluate() -> dict:
        return evaluate_heldout(student, teacher_heldout, heldout, train.micro_batch_size, kl.chunk_tokens)

    use_per_token_loss(student)
    run = TrainingRun(student, student_config, train, optimizer, Path(out_dir), tokenizer_dir, name,
                      facts or RunFacts())
    return run.run(DistillationStep(teacher, kl, train), data, evaluate, cursor)
