"""Read a llama-architecture GGUF file (the embedded SmolLM2 parent) into Hugging Face tensors.

Quantised tensors are dequantised to fp32 with the ``gguf`` package: the dequantised weights *are* the
parent as far as this project is concerned. llama.cpp stores q/k projections with rows permuted for its
rotary layout; ``_unpermute_rotary`` undoes that so the tensors match the Hugging Face layout. The metadata keys
and tensor names are the family bridge's (``nemo_plugins.bridges``, by the file's ``general.architecture``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from nemo_plugins.bridges import gguf_bridge
from nemo_plugins.errors import ConfigError, DataError
from nemo_plugins.model.config import MistralConfig


def metadata_value(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """A metadata field's value, or ``default`` when the file has no such field."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


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
    bridge = gguf_bridge(metadata_value(reader, "general.architecture"), path.name)
    config = bridge.gguf_config(lambda key, default=None: metadata_value(reader, key, default),
                                {t.name for t in reader.tensors})
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        name = bridge.gguf_tensor_name(tensor.name)
        heads = bridge.gguf_rotary_heads(name, config)
        if heads is not None:
            values = _unpermute_rotary(values, heads)
        state[name] = torch.tensor(values)
    return config, state
