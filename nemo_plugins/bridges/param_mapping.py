"""One row of a bridge's HF <-> megatron parameter table.

A bridge declares its conversion as data: each row names a megatron-core parameter, the Hugging Face tensor(s) it
is made of and their shapes (in the bridge's named dimensions, ``MistralBridge.dims``), how they fuse (``direct``,
``qkv`` for megatron's grouped-query fused layout, ``gated`` for SwiGLU's ``linear_fc1 = [gate; up]``) and how
megatron splits it over tensor-parallel ranks (``replicated``, ``column`` = dim 0, ``row`` = dim 1).
``nemo_plugins.convert.mapping`` does the fusing and slicing for every row alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Fusion = Literal["direct", "qkv", "gated"]
Split = Literal["replicated", "column", "row"]


@dataclass(frozen=True)
class ParamMapping:
    """``{layer}`` in a name stands for the layer index; ``shapes[i]`` is ``hf[i]``'s shape as dimension names;
    ``untied_only`` rows exist only with untied embeddings."""

    megatron: str
    hf: tuple[str, ...]
    shapes: tuple[tuple[str, ...], ...]
    fusion: Fusion = "direct"
    split: Split = "replicated"
    untied_only: bool = False

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.megatron
