"""The teacher: the parent model, frozen, run in the student's parallel layout over all micro-batches of a step.

It hands out final hidden states (not logits) plus its output weight, so that the loss makes teacher logits
chunk by chunk (``FusedTeacher``) and no [tokens x vocab] tensor of the teacher ever exists either.

All micro-batches of a step go through ONE forward-only pipeline schedule: under pipeline parallelism the
stages then work on different micro-batches at once and the pipeline fills and drains once per step, where a
schedule call per micro-batch would drain it after each one (each stage idle (pp - 1) / pp of the time).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from nemo_plugins.distill.kl_loss import FusedTeacher
from nemo_plugins.parallel_ops import flatten_tokens, full_sequence


class Teacher:
    def __init__(self, model: torch.nn.Module) -> None:
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.sequence_parallel = model.config.sequence_parallel

    @torch.no_grad()
    def run(self, micro_batches: list[tuple]) -> list[FusedTeacher]:
        """One ``FusedTeacher`` per ``(tokens, positions)`` micro-batch (this rank's CP part, all of one shape) on
        the last pipeline stage; an empty list elsewhere. A third item is the model's other keyword inputs (a
        vision-language teacher's ``images``)."""
        tokens = micro_batches[0][0]
        sequence_parallel = self.sequence_parallel

        def forward_step(data_iterator, chunk):
            mb_tokens, mb_positions, *inputs = next(data_iterator)
            hidden = chunk(mb_tokens, mb_positions, return_hidden=True, **(inputs[0] if inputs else {}))

            def keep_hidden(output):
                zero = torch.zeros((), device=output.device)
                return zero, {"hidden": flatten_tokens(full_sequence(output, sequence_parallel))}

            return hidden, keep_hidden

        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=[self.model],
            num_microbatches=len(micro_batches),
            # the schedule divides by cp (and by tp under sequence parallelism) for its p2p shapes: the full row
            seq_length=tokens.shape[1] * parallel_state.get_context_parallel_world_size(),
            micro_batch_size=tokens.shape[0],
            forward_only=True,
        )
        if not parallel_state.is_pipeline_last_stage():
            return []
        weight = self.model.output_weight()
        return [FusedTeacher(out["hidden"], weight) for out in outputs]
