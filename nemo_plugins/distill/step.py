"""The logit-distillation step (pretraining distillation and SFT with logit distillation alike): teacher forward,
student forward/backward through megatron's pipeline schedules with the fused forward-KL loss.

A batch is ``(tokens, positions)`` or ``(tokens, positions, target_mask)``; the mask (a chat mix's assistant
tokens) narrows the loss to those targets, which is all that separates SFT-KD from pretraining distillation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from nemo_plugins.data.batches import local_batch
from nemo_plugins.data.mix import Cursor
from nemo_plugins.distill.heldout import evaluate_heldout
from nemo_plugins.distill.kl_loss import KLOptions, fused_kl_loss
from nemo_plugins.distill.teacher import Teacher
from nemo_plugins.model.config import MistralConfig
from nemo_plugins.parallel_ops import flatten_tokens, full_sequence, sum_from_last_stage, tp_group
from nemo_plugins.train.config import OptimizerSettings, TrainSettings
from nemo_plugins.train.facts import RunFacts
from nemo_plugins.train.loop import DataStream, TrainingRun


def split_micro_batches(batch: tuple, train: TrainSettings) -> list[dict[str, torch.Tensor]]:
    """This data-parallel rank's rows of a global batch, as micro-batches ready for the model."""
    microbatches = train.microbatches(parallel_state.get_data_parallel_world_size())
    rows_per_rank = train.micro_batch_size * microbatches
    dp_rank = parallel_state.get_data_parallel_rank()
    mine = slice(dp_rank * rows_per_rank, (dp_rank + 1) * rows_per_rank)
    tokens, positions, *target_mask = batch
    parts = [t[mine].split(train.micro_batch_size) for t in (tokens, positions, *target_mask)]
    return [local_batch(*rows) for rows in zip(*parts)]


@dataclass
class DistillationStep:
    """``step(ddp, batch) -> mean loss`` for the training loop."""

    teacher: Teacher
    kl: KLOptions
    train: TrainSettings

    def __call__(self, ddp: torch.nn.Module, batch: tuple) -> float:
        micro = split_micro_batches(batch, self.train)
        teacher_out = self.teacher.run([(b["tokens"], b["positions"]) for b in micro])
        student = ddp.module
        kl, sequence_parallel, group = self.kl, student.config.sequence_parallel, tp_group()

        def forward_step(data_iterator, chunk):
            index, micro_batch = next(data_iterator)
            hidden = chunk(micro_batch["tokens"], micro_batch["positions"], return_hidden=True)

            def loss_func(output):
                labels = micro_batch["labels"].reshape(-1) if kl.ce_weight > 0 else None
                loss = fused_kl_loss(flatten_tokens(full_sequence(output, sequence_parallel)), student.output_weight(),
                                     teacher_out[index], micro_batch["mask"].reshape(-1), labels, kl, group)
                return loss, {"loss": loss.detach().clone()}

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
        local = torch.zeros(2, dtype=torch.float64)
        for out in outputs:
            local[0] += out["loss"].double().cpu()
            local[1] += 1
        loss_sum, count = sum_from_last_stage(local).tolist()
        return loss_sum / max(count, 1.0)


def train_with_distillation(student: torch.nn.Module, student_config: MistralConfig, teacher: Teacher, data: DataStream,
                            train: TrainSettings, optimizer: OptimizerSettings, kl: KLOptions, out_dir: Path,
                            cursor: Cursor, tokenizer_dir: Path | None = None, name: str = "distill",
                            facts: RunFacts | None = None) -> dict:
    """The training loop with the distillation step, evaluated on ``data``'s held-out rows (KL and both
    perplexities; assistant tokens only when the data is a chat mix). ``facts``: the stage's fingerprint (see
    ``train/facts.py``). Returns the loop's result."""
    heldout = data.heldout_rows(train.seq_len, train.eval_rows_per_source)
    tokens, positions, *target_mask = heldout

    def evaluate() -> dict:
        return evaluate_heldout(student, teacher, tokens, positions, train.micro_batch_size, kl.chunk_tokens,
                                target_mask[0] if target_mask else None)

    run = TrainingRun(student, student_config, train, optimizer, Path(out_dir), tokenizer_dir, name, facts or RunFacts())
    return run.run(DistillationStep(teacher, kl, train), data, evaluate, cursor)
