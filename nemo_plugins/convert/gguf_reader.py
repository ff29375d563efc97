"""Read a llama-architecture GGUF file (the embedded SmolLM2 parent) into Hugging Face tensors.

Quantised tensors are dequantised to fp32 with the ``gguf`` package: the dequantised weights *are* the
parent as far as this project is concerned. llama.cpp stores q/k projections with rows permuted for its
rotary layout; ``_unpermute_rotary`` undoes that so the tensors match the Hugging Face layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from nemo_plugins.errors import ConfigError, DataError
from nemo_plugins.model.config import MistralConfig

_NAME_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAME_MAP = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _field(reader: GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _NAME_MAP:
        return _NAME_MAP[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAME_MAP:
        return f"model.layers.{parts[1]}.{_LAYER_NAME_MAP[parts[2]]}.{parts[3]}"
    raise ConfigError(f"unexpected tensor {gguf_name!r} in GGUF file")


def _unpermute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def read_gguf(path: str | Path) -> tuple[MistralConfig, dict[str, torch.Tensor]]:
    """Config and fp32 HF-named tensors of a llama-architecture GGUF file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"GGUF file {path} not found")
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError) as err:  # what gguf raises on a truncated or foreign file
        raise DataError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err}; {path.stat().st_size} bytes): "
                        "the file is damaged or truncated, download it again") from None
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ConfigError(f"{path.name}: GGUF architecture {arch!r} is not supported (llama only)")
    heads = int(_field(reader, "llama.attention.head_count"))
    kv_heads = int(_field(reader, "llama.attention.head_count_kv", heads))
    hidden = int(_field(reader, "llama.embedding_length"))
    names = {t.name for t in reader.tensors}
    config = MistralConfig(
        num_layers=int(_field(reader, "llama.block_count")),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        ffn_hidden_size=int(_field(reader, "llama.feed_forward_length")),
        vocab_size=int(_field(reader, "llama.vocab_size", len(_field(reader, "tokenizer.ggml.tokens", [])))),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        tie_embeddings="output.weight" not in names,
        max_position_embeddings=int(_field(reader, "llama.context_length", 8192)),
        architecture="LlamaForCausalLM",
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
    )
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        name = _hf_name(tensor.name)
        if name.endswith("q_proj.weight"):
            values = _unpermute_rotary(values, heads)
        elif name.endswith("k_proj.weight"):
            values = _unpermute_rotary(values, kv_heads)
        state[name] = torch.tensor(values)
    return config, state
