"""NeMo 2 checkpoints (``nemo2:<dir>``), read without importing NeMo: its LLM collection is deprecated (in favour of
Megatron-Bridge) and installs only with pins, yet users hold checkpoints it wrote.

A NeMo 2 checkpoint directory (what ``nemo.lightning`` writes, e.g. after ``llm.import_ckpt`` or training) holds
* ``context/model.yaml``: the model as a fiddle config; its ``config:`` node is the GPTConfig subclass (LlamaConfig,
  MistralConfig7B, ...) with megatron-core ``TransformerConfig`` field names (``num_query_groups``, ``kv_channels``,
  ``rotary_base``, ...). Read with ``yaml.safe_load``: plain data, nothing instantiated.
* ``context/nemo_tokenizer/``: the Hugging Face tokenizer files; ``context/artifacts/generation_config.json``.
* ``weights/``: a megatron-core ``torch_dist`` checkpoint of the model's sharded state dict. Keys carry the prefix
  of NeMo's wrapper (``module.``) and Transformer Engine names (``linear_qkv.layer_norm_weight``); megatron-core's
  local spec maps its own norms onto those same names, so only the prefix differs from our own checkpoints.
  The prefix is taken from the checkpoint's metadata (the key ending in ``decoder.final_layernorm.weight``), so a
  Megatron-Bridge ``iter_N`` directory, whose keys have no prefix, loads through the same function.
Weights load with megatron-core's dist_checkpointing into a model of any TP/PP and dtype (the sharded keys renamed
by ``replace_prefix_for_sharding``; TP=2 and bf16 -> fp32 tested); the pickled files are read as data first
(``checkpoint_pickles``).
The vocabulary size comes from the embedding's shape in the checkpoint metadata: NeMo's Mistral importer leaves
``vocab_size`` null and pads the tokenizer's size, so the weights are the only reliable record of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from nemo_plugins.convert import checkpoint_pickles
from nemo_plugins.errors import CheckpointError, ConfigError
from nemo_plugins.manifest import read_json
from nemo_plugins.model.config import MistralConfig

MODEL_YAML = Path("context") / "model.yaml"
TOKENIZER_DIR = Path("context") / "nemo_tokenizer"
GENERATION_CONFIG = Path("context") / "artifacts" / "generation_config.json"
WEIGHTS_DIR = "weights"
FINAL_NORM = "decoder.final_layernorm.weight"
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT_LAYER = "output_layer.weight"

# NeMo model classes (the ``_target_`` module of model.yaml's ``config:``) -> the HF architecture with that layout.
ARCHITECTURES = {
    "nemo.collections.llm.gpt.model.llama": "LlamaForCausalLM",
    "nemo.collections.llm.gpt.model.mistral": "MistralForCausalLM",
}
# (TransformerConfig field, value a Mistral-family decoder has, megatron's default when model.yaml omits the field).
REQUIRED = (
    ("normalization", "RMSNorm", "LayerNorm"),
    ("gated_linear_unit", True, False),
    ("add_bias_linear", False, True),
    ("add_qkv_bias", False, False),
    ("position_embedding_type", "rope", "learned_absolute"),
    ("rotary_percent", 1.0, 1.0),
    ("rotary_interleaved", False, False),
    ("seq_len_interpolation_factor", None, None),
    ("window_size", None, None),
    ("num_moe_experts", None, None),
    ("qk_layernorm", False, False),
    ("multi_latent_attention", False, False),
    ("layernorm_zero_centered_gamma", False, False),
    ("apply_residual_connection_post_layernorm", False, False),
)
SILU = "torch.nn.functional.silu"


def read_model_yaml(ckpt_dir: str | Path) -> dict[str, Any]:
    """``context/model.yaml`` as plain data."""
    import yaml

    path = Path(ckpt_dir) / MODEL_YAML
    if not path.is_file():
        raise ConfigError(f"{ckpt_dir} is not a NeMo 2 checkpoint ({MODEL_YAML} missing)")
    try:
        model = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise CheckpointError(f"{path} is not readable YAML ({str(err).splitlines()[0]}); the checkpoint is "
                              "damaged") from None
    if not isinstance(model, dict) or not isinstance(model.get("config"), dict):
        raise ConfigError(f"{path} has no 'config:' mapping; is it a NeMo 2 LLM checkpoint?")
    return model


def architecture(nemo_config: Mapping[str, Any], where: str) -> str:
    """The HF architecture of a NeMo config node, or a ConfigError naming what makes it unsupported."""
    target = str(nemo_config.get("_target_", ""))
    module, _, name = target.rpartition(".")
    if module not in ARCHITECTURES:
        raise ConfigError(f"{where}: model class {target or '(none)'} is not a Llama/Mistral-family decoder; "
                          f"supported: configs from {sorted(ARCHITECTURES)}")
    if "scale_factor" in nemo_config or "low_freq_factor" in nemo_config:
        raise ConfigError(f"{where}: {name} uses Llama 3.1 rope scaling (scale_factor), which is not supported here "
                          "(plain RoPE only)")
    activation = nemo_config.get("activation_func")
    activation = activation.get("_target_") if isinstance(activation, Mapping) else activation
    if activation != SILU:
        raise ConfigError(f"{where}: config.activation_func is {activation!r}; Mistral-family models use {SILU}")
    for field, expected, default in REQUIRED:
        found = nemo_config.get(field, default)
        if found != expected:
            raise ConfigError(f"{where}: config.{field}={found!r} but a Mistral-family decoder here needs {expected!r}")
    return ARCHITECTURES[module]


def to_mistral_config(nemo_config: Mapping[str, Any], vocab_size: int, bos_token_id: int | None,
                      eos_token_id: int | None, where: str) -> MistralConfig:
    """Our MistralConfig from a NeMo / megatron-core config node (TransformerConfig field names)."""
    arch = architecture(nemo_config, where)
    try:
        heads = int(nemo_config["num_attention_heads"])
        hidden = int(nemo_config["hidden_size"])
        return MistralConfig(
            num_layers=int(nemo_config["num_layers"]),
            hidden_size=hidden,
            num_attention_heads=heads,
            num_kv_heads=int(nemo_config.get("num_query_groups") or heads),
            head_dim=int(nemo_config.get("kv_channels") or hidden // heads),
            ffn_hidden_size=int(nemo_config["ffn_hidden_size"]),
            vocab_size=vocab_size,
            rms_norm_eps=float(nemo_config.get("layernorm_epsilon", 1e-5)),
            rope_theta=float(nemo_config.get("rotary_base", 10000.0)),
            tie_embeddings=bool(nemo_config.get("share_embeddings_and_output_weights", False)),
            # NeMo's Mistral importer stores HF's sliding_window there: null for full-attention models
            max_position_embeddings=int(nemo_config.get("seq_length") or MistralConfig.max_position_embeddings),
            architecture=arch,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
        )
    except KeyError as err:
        raise ConfigError(f"{where}: config.{err.args[0]} is missing") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None


def key_prefix(metadata: Metadata, where: str) -> str:
    """What the checkpoint's writer put before the model's own keys (NeMo: ``module.``, Megatron-Bridge: none)."""
    found = [key for key in metadata.state_dict_metadata if key.endswith(FINAL_NORM)]
    if len(found) != 1:
        raise CheckpointError(f"{where}: expected one '*{FINAL_NORM}' tensor in the checkpoint, found {found}; "
                              "is it a GPT model's checkpoint?")
    return found[0][: -len(FINAL_NORM)]


def _tensor_shape(metadata: Metadata, key: str, where: str) -> tuple[int, ...]:
    item = metadata.state_dict_metadata.get(key)
    if not isinstance(item, TensorStorageMetadata):
        raise CheckpointError(f"{where}: the checkpoint has no tensor {key!r}")
    return tuple(item.size)


def _special_tokens(ckpt_dir: Path) -> tuple[int | None, int | None]:
    """BOS / EOS ids: NeMo's copy of the HF generation config, else the tokenizer's own."""
    if (ckpt_dir / GENERATION_CONFIG).is_file():
        generation = read_json(ckpt_dir / GENERATION_CONFIG)
        eos = generation.get("eos_token_id")
        return generation.get("bos_token_id"), eos[0] if isinstance(eos, list) else eos
    from nemo_plugins.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir(ckpt_dir))
    return tokenizer.bos_token_id, tokenizer.eos_token_id


def read_config(ckpt_dir: str | Path) -> MistralConfig:
    """The checkpoint's architecture as our MistralConfig; shapes checked against the stored embedding."""
    ckpt_dir = Path(ckpt_dir)
    nemo_config = read_model_yaml(ckpt_dir)["config"]
    weights = ckpt_dir / WEIGHTS_DIR
    metadata = checkpoint_pickles.read_metadata(weights)
    prefix = key_prefix(metadata, str(weights))
    vocab_size, hidden = _tensor_shape(metadata, prefix + EMBEDDING, str(weights))
    bos, eos = _special_tokens(ckpt_dir)
    config = to_mistral_config(nemo_config, vocab_size, bos, eos, str(ckpt_dir / MODEL_YAML))
    if hidden != config.hidden_size:
        raise CheckpointError(f"{weights}: embedding has hidden size {hidden}, {MODEL_YAML} says {config.hidden_size}")
    if not config.tie_embeddings:
        _tensor_shape(metadata, prefix + OUTPUT_LAYER, str(weights))
    return config


def tokenizer_dir(ckpt_dir: str | Path) -> Path:
    path = Path(ckpt_dir) / TOKENIZER_DIR
    if not path.is_dir():
        raise ConfigError(f"{ckpt_dir} has no {TOKENIZER_DIR}/ (a NeMo 2 checkpoint saved without its HF tokenizer); "
                          "copy the model's Hugging Face tokenizer files there")
    return path


def load_weights(model: torch.nn.Module, ckpt_dir: str | Path) -> None:
    """Fill this rank's model chunk (any TP/PP) from ``weights/``; a tensor the model needs and the checkpoint
    lacks is named, and pickled files holding anything but data are refused before megatron-core reads them."""
    load_sharded(model, Path(ckpt_dir) / WEIGHTS_DIR)


def _check_shapes(sharded: dict, metadata: Metadata, weights: Path) -> None:
    """Every tensor the model asks for is stored, at the same global shape (else torch's reader says only
    'CheckpointException ranks:...')."""
    requested = {v.key: tuple(v.global_shape) for v in nested_values(sharded) if isinstance(v, ShardedTensor)}
    missing = sorted(set(requested) - set(metadata.state_dict_metadata))
    if missing:
        raise CheckpointError(f"{weights}: the checkpoint lacks {len(missing)} tensor(s) the model needs, "
                              f"e.g. {missing[:3]}; was it written for another architecture?")
    for key, shape in sorted(requested.items()):
        stored = _tensor_shape(metadata, key, str(weights))
        if stored != shape:
            raise CheckpointError(f"{weights}: tensor {key!r} is stored with shape {stored}, the model expects {shape}")


def load_sharded(model: torch.nn.Module, weights: Path) -> None:
    """Load a megatron-core torch_dist directory whose keys are the model's own under any prefix."""
    if not (weights / "metadata.json").is_file():
        raise CheckpointError(f"{weights}: no dist_checkpointing metadata.json; not a torch_dist checkpoint")
    checkpoint_pickles.check_data_only(weights)
    metadata = checkpoint_pickles.read_metadata(weights)
    sharded = model.sharded_state_dict()
    replace_prefix_for_sharding(sharded, "", key_prefix(metadata, str(weights)))
    _check_shapes(sharded, metadata, weights)
    try:
        state = dist_checkpointing.load(sharded, str(weights))
    except (Exception, CheckpointException) as err:  # several types (CheckpointException is a BaseException)
        first_line = next(iter(str(err).splitlines()), "")
        raise CheckpointError(f"{weights}: cannot load checkpoint shards ({type(err).__name__}: {first_line})") from err
    # the result also holds the writer's common state (NeMo: Lightning's trainer state), beside the model's keys
    model.load_state_dict({name: state[name] for name in sharded}, strict=True)
