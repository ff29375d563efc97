"""Named access to a Mistral model held as Hugging Face-layout tensors (what the pruning steps rewrite)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nemo_plugins.model.config import MistralConfig

READS_RESIDUAL = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
WRITES_RESIDUAL = ("self_attn.o_proj", "mlp.down_proj")


def layer_key(layer: int, name: str) -> str:
    return f"model.layers.{layer}.{name}.weight"


@dataclass
class ModelState:
    """A config and its HF tensors; the unit every pruning step consumes and produces."""

    config: MistralConfig
    tensors: dict[str, torch.Tensor]

    def output_weight(self) -> torch.Tensor:
        """The output projection, whether tied to the input embedding or not."""
        return self.tensors["model.embed_tokens.weight" if self.config.tie_embeddings else "lm_head.weight"]


def count_parameters(state: ModelState) -> int:
    return sum(t.numel() for t in state.tensors.values())
