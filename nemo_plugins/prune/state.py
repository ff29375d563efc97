"""Named access to a Mistral model held as Hugging Face-layout tensors (what the pruning steps rewrite).

A state holds either whole tensors or one tensor-parallel slice of each (``TensorSlice``): the slice megatron's
TP rank ``rank`` of ``size`` holds, cut along the same dimension, so that pruning a 24B model keeps 1/TP of it
per rank (``prune/shards.py``). Every step sees the whole model's ``config`` either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nemo_plugins.model.config import MistralConfig

READS_RESIDUAL = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
WRITES_RESIDUAL = ("self_attn.o_proj", "mlp.down_proj")


def layer_key(layer: int, name: str) -> str:
    return f"model.layers.{layer}.{name}.weight"


@dataclass(frozen=True)
class TensorSlice:
    """Tensor-parallel rank ``rank`` of ``size``; ``size == 1`` means whole tensors."""

    rank: int = 0
    size: int = 1

    @property
    def whole(self) -> bool:
        return self.size == 1


@dataclass
class ModelState:
    """A config and its HF tensors; the unit every pruning step consumes and produces."""

    config: MistralConfig
    tensors: dict[str, torch.Tensor]
    slice: TensorSlice = field(default_factory=TensorSlice)

    def output_weight(self) -> torch.Tensor:
        """The output projection, whether tied to the input embedding or not."""
        return self.tensors["model.embed_tokens.weight" if self.config.tie_embeddings else "lm_head.weight"]

    def derive(self, config: MistralConfig, tensors: dict[str, torch.Tensor]) -> "ModelState":
        """The state a step made from this one: same slice, new config and tensors."""
        return ModelState(config, tensors, self.slice)
