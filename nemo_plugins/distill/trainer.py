"""The distillation step loop on megatron-core: teacher forward, student forward/backward through megatron's
pipeline schedules with the fused KL loss, optimizer + schedule step, evaluation, atomic resumable checkpoints.

Resuming is exact: the checkpoint holds model, optimizer, schedule, every rank's RNG and the data cursor, and
each step's rows depend only on the cursor, so a killed run continues the uninterrupted run's trajectory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from nemo_plugins.data.mix import Cursor, DataMix
from nemo_plugins.distill.kl_loss import KLOptions, fused_kl_loss
from nemo_plugins.data.batches import local_batch
from nemo_plugins.distill.teacher import Teacher
from nemo_plugins.distributed import device
from nemo_plugins.errors import ConfigError
from nemo_plugins.distill.heldout import evaluate_heldout
from nemo_plugins.parallel_ops import flatten_tokens, full_sequence, sum_from_last_stage, tp_group
from nemo_plugins.model.config import MistralConfig
from nemo_plugins.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from nemo_plugins.train.config import OptimizerSettings, TrainSettings
from nemo_plugins.train.metrics import MetricsLog
from nemo_plugins.train.optimizer import build_optimizer, wrap_for_training

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many steps in a row had a NaN/inf loss or gradient; the last checkpoint is still clean."""


@dataclass
class DistillRun:
    """Everything one distillation stage needs; ``run`` returns what the stage's manifest records."""

    student: torch.nn.Module
    student_config: MistralConfig
    teacher: Teacher
    mix: DataMix
    train: TrainSettings
    optimizer: OptimizerSettings
    kl: KLOptions
    out_dir: Path
    tokenizer_dir: Path | None = None
    name: str = "distill"

    def run(self, cursor_start: Cursor) -> dict:
        dp_size = parallel_state.get_data_parallel_world_size()
        microbatches = self.train.microbatches(dp_size)
        total_steps = self.train.steps
        ddp, distributed = wrap_for_training(self.student)
        optimizer, scheduler = build_optimizer(ddp, self.optimizer, total_steps, distributed)
        checkpoints = Path(self.out_dir) / "checkpoints"

        step, cursor, nonfinite_in_a_row = 0, cursor_start, 0
        resume_from = latest_checkpoint(checkpoints)
        if resume_from is not None:
            state = load_checkpoint(resume_from, self.student, optimizer)
            if state["cursor_start"] != cursor_start.to_dict():
                raise ConfigError(f"{resume_from} was written by a run that started at data cursor "
                                  f"{state['cursor_start']}, not {cursor_start.to_dict()}: a different run's output dir")
            scheduler.load_state_dict(state["scheduler"])
            step, cursor, nonfinite_in_a_row = state["step"], Cursor.from_dict(state["cursor"]), state["nonfinite_in_a_row"]
            logger.info("%s: resumed from %s (step %d/%d, %d tokens read)", self.name, resume_from, step, total_steps, cursor.tokens())

        eval_tokens, eval_positions = self.mix.heldout_rows(self.train.seq_len, self.train.eval_rows_per_source)
        log = MetricsLog(self.out_dir, step, total_steps, self.train.tokens_per_step, self.name)

        def evaluate(at_step: int) -> dict:
            result = evaluate_heldout(self.student, self.teacher, eval_tokens, eval_positions,
                                      self.train.micro_batch_size, self.kl.chunk_tokens)
            log.record(at_step, "eval", result)
            logger.info("%s eval @ step %d: KL %.4f | student ppl %.2f | teacher ppl %.2f", self.name, at_step,
                        result["kl"], result["student_ppl"], result["teacher_ppl"])
            return result

        def save(at_step: int) -> None:
            _check_finite_parameters(self.student)
            save_checkpoint(checkpoints, at_step, self.student, optimizer, self.student_config,
                            {"cursor": cursor.to_dict(), "cursor_start": cursor_start.to_dict(),
                             "scheduler": scheduler.state_dict(), "nonfinite_in_a_row": nonfinite_in_a_row},
                            self.tokenizer_dir, self.train.keep_last)

        last_eval = evaluate(0) if step == 0 else log.last("eval", step)
        while step < total_steps:
            tokens, positions, next_cursor = self.mix.next_rows(cursor, self.train.global_batch_size, self.train.seq_len)
            loss, finite = self._step(ddp, optimizer, tokens, positions, microbatches)
            if finite:
                _, grad_norm, _ = optimizer.step()
                scheduler.step(increment=1)
                nonfinite_in_a_row = 0
            else:
                nonfinite_in_a_row += 1
                grad_norm = float("nan")
                logger.warning("%s step %d: non-finite loss or gradient, step skipped (%d in a row, limit %d)",
                               self.name, step + 1, nonfinite_in_a_row, self.train.max_nonfinite_steps)
                if nonfinite_in_a_row >= self.train.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{self.name}: {nonfinite_in_a_row} steps in a row with a NaN/inf loss or gradient at step "
                        f"{step + 1}; nothing was saved from them. Lower optimizer.lr or check the data; the last "
                        f"good checkpoint is {latest_checkpoint(checkpoints)}")
            cursor, step = next_cursor, step + 1
            values = {"loss": loss, "lr": optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm or 0.0),
                      "tokens_read": cursor.tokens() - cursor_start.tokens()}
            log.record(step, "train", values)
            if step % self.train.log_interval == 0 or step == total_steps:
                log.progress(step, {k: values[k] for k in ("loss", "lr", "grad_norm")})
            if step == total_steps or (self.train.eval_interval and step % self.train.eval_interval == 0):
                last_eval = evaluate(step)
            if step == total_steps or (finite and self.train.save_interval and step % self.train.save_interval == 0):
                save(step)
        log.close()
        if last_eval is None:  # resumed after a checkpoint that had no evaluation logged with it
            last_eval = evaluate(step)
        return {"steps": total_steps, "cursor_start": cursor_start.to_dict(), "cursor_end": cursor.to_dict(),
                "tokens": cursor.tokens() - cursor_start.tokens(), "eval": last_eval,
                "checkpoint": str(latest_checkpoint(checkpoints))}

    def _step(self, ddp, optimizer, tokens: torch.Tensor, positions: torch.Tensor, microbatches: int) -> tuple[float, bool]:
        """Forward + backward of one global batch; returns (mean loss, loss and gradients finite everywhere)."""
        rows_per_rank = self.train.micro_batch_size * microbatches
        dp_rank = parallel_state.get_data_parallel_rank()
        mine = slice(dp_rank * rows_per_rank, (dp_rank + 1) * rows_per_rank)
        micro = [local_batch(t, p) for t, p in zip(tokens[mine].split(self.train.micro_batch_size),
                                                   positions[mine].split(self.train.micro_batch_size))]
        teacher_out = self.teacher.run([(b["tokens"], b["positions"]) for b in micro])
        student, kl, sequence_parallel, group = self.student, self.kl, self.student.config.sequence_parallel, tp_group()

        def forward_step(data_iterator, chunk):
            index, batch = next(data_iterator)
            hidden = chunk(batch["tokens"], batch["positions"], return_hidden=True)

            def loss_func(output):
                labels = batch["labels"].reshape(-1) if kl.ce_weight > 0 else None
                loss = fused_kl_loss(flatten_tokens(full_sequence(output, sequence_parallel)), student.output_weight(),
                                     teacher_out[index], batch["mask"].reshape(-1), labels, kl, group)
                return loss, {"loss": loss.detach().clone()}

            return hidden, loss_func

        ddp.train()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(enumerate(micro)),
            model=[ddp],
            num_microbatches=microbatches,
            seq_length=self.train.seq_len,
            micro_batch_size=self.train.micro_batch_size,
            forward_only=False,
        )
        local = torch.zeros(2, dtype=torch.float64)
        for out in outputs:
            local[0] += out["loss"].double().cpu()
            local[1] += 1
        loss_sum, count = sum_from_last_stage(local).tolist()
        grads_finite = all(bool(torch.isfinite(p.main_grad).all()) for p in self.student.parameters() if p.requires_grad)
        bad = torch.tensor([0.0 if grads_finite else 1.0], device=device())
        dist.all_reduce(bad)
        loss = loss_sum / max(count, 1.0)
        return loss, bool(bad.item() == 0) and bool(torch.isfinite(torch.tensor(loss)))


def _check_finite_parameters(model: torch.nn.Module) -> None:
    """Raise on every rank (never a hang at the next barrier) if any rank holds a NaN/inf weight."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    flag = torch.tensor([float(len(bad))], device=device())
    dist.all_reduce(flag)
    if flag.item():
        raise NonFiniteLossError(f"refusing to save a checkpoint with non-finite weights ({', '.join(bad[:5]) or 'on another rank'})")
