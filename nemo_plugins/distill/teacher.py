"""The teacher: the parent model, frozen, run in the student's parallel layout, one micro-batch at a time.

It hands out final hidden states (not logits) plus its output weight, so that the loss makes teacher logits
chunk by chunk (``FusedTeacher``) and no [tokens x vocab] tensor of the teacher ever exists either.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from nemo_plugins.distill.kl_loss import FusedTeacher
from nemo_plugins.model.forward import forward_only
from nemo_plugins.parallel_ops import flatten_tokens, full_sequence


class Teacher:
    def __init__(self, model: torch.nn.Module) -> None:
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.sequence_parallel = model.config.sequence_parallel

    @torch.no_grad()
    def run(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[FusedTeacher]:
        """One ``FusedTeacher`` per micro-batch on the last pipeline stage (empty list elsewhere)."""
        outputs = forward_only(
            self.model,
            [(tokens, positions, None) for tokens, positions in micro_batches],
            reduce=lambda hidden: {"hidden": flatten_tokens(full_sequence(hidden, self.sequence_parallel))},
            forward_kwargs={"return_hidden": True},
        )
        if not parallel_state.is_pipeline_last_stage():
            return []
        weight = self.model.output_weight()
        return [FusedTeacher(out["hidden"], weight) for out in outputs]
