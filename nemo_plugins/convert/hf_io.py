"""Read and write Hugging Face model directories (config.json + safetensors, sharded with an index); written ones
carry the project's record (``output_dir``), so an export never replaces a folder it did not write.

Reading is lazy: ``HFReader`` maps tensor names to shard files and reads a tensor, or only a row / column range
of it, with ``safe_open(...).get_slice``, so a TP rank reads its slice of a 24B checkpoint, not the whole model.
It reads a text model's tensors under their CausalLM names whatever the layout: a multimodal checkpoint
(``Mistral3ForConditionalGeneration``: Mistral Small 3.1, the Ministral 3 releases) stores them under prefixes its
bridge (``nemo_plugins.bridges``) strips; its vision tower and projector tensors are the ``multimodal`` part, kept
aside for the vision work.

Writing streams: tensors arrive one at a time in name order and are written shard by shard (at most one shard in
memory), into exactly the files ``save_file`` gives for the whole state. An export of a vision-language source is
the text model as its CausalLM plus the multimodal part copied verbatim into ``multimodal.safetensors`` (config in
``multimodal_config.json``, a line in README.md): transformers loads the directory as the text model, and the
vision tensors travel with every later export read from it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nemo_plugins.bridges import MISTRAL3, config_from_hf, config_to_hf, multimodal_bridge
from nemo_plugins.convert import output_dir
from nemo_plugins.errors import CheckpointError, ConfigError
from nemo_plugins.manifest import read_json
from nemo_plugins.model.config import MistralConfig

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MULTIMODAL_NAME = "multimodal.safetensors"
MULTIMODAL_CONFIG = "multimodal_config.json"
README = "README.md"


def _config_json(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found: a Hugging Face model directory needs config.json")
    return read_json(path)


def read_config(model_dir: str | Path) -> MistralConfig:
    """The text model's config (a Mistral3 directory's ``text_config``)."""
    return config_from_hf(_config_json(Path(model_dir)))


def shard_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a model dir; a sharded index must list only files that exist."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_NAME
    if index.is_file():
        weight_map = read_json(index)["weight_map"]
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{model_dir}: shard(s) {missing} listed in {INDEX_NAME} are missing; "
                                  "re-copy the checkpoint")
        return files
    single = model_dir / SINGLE_NAME
    if single.is_file():
        return [single]
    raise CheckpointError(f"{model_dir}: neither {INDEX_NAME} nor {SINGLE_NAME} found; the checkpoint is incomplete")


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{file}: cannot read safetensors shard ({err}); the file is corrupt or truncated, "
                              "copy it again") from err


@dataclass(frozen=True)
class Multimodal:
    """The vision tower and projector of a Mistral3 checkpoint: their config and where each tensor is stored."""

    config: dict
    tensors: dict[str, Path]

    def read(self) -> dict[str, torch.Tensor]:
        """Every tensor, whole, under its released name (``vision_tower.*``, ``multi_modal_projector.*``, whichever
        layout transformers stored it in)."""
        handles = {file: _open(file) for file in set(self.tensors.values())}
        return {MISTRAL3.vision_tensor_name(name): handles[file].get_tensor(name)
                for name, file in sorted(self.tensors.items())}


class HFReader:
    """A model directory's text tensors by CausalLM name, read whole or by row / column range, never more.

    Shard headers are read once; tensor bytes only when asked for. The multimodal part (if any) is listed, not read.
    """

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        raw = _config_json(self.model_dir)
        self._handles = {file: _open(file) for file in shard_files(self.model_dir)}
        self._where: dict[str, tuple[Path, str]] = {}
        multimodal: dict[str, Path] = {}
        bridge = multimodal_bridge(raw)
        for file, handle in self._handles.items():
            for stored in handle.keys():
                name = stored if bridge is None else bridge.text_tensor_name(stored)
                if name is None:
                    multimodal[stored] = file
                else:
                    self._where[name] = (file, stored)
        extra = self.model_dir / MULTIMODAL_NAME
        if extra.is_file():  # an earlier export of a Mistral3 source carries its vision part aside
            multimodal.update({name: extra for name in _open(extra).keys()})
            raw = read_json(self.model_dir / MULTIMODAL_CONFIG) or {}
        self.multimodal = Multimodal(MISTRAL3.vision_part(raw), multimodal) if multimodal else None

    def names(self) -> list[str]:
        return sorted(self._where)

    def shape(self, name: str) -> tuple[int, ...] | None:
        if name not in self._where:
            return None
        file, stored = self._where[name]
        return tuple(self._handles[file].get_slice(stored).get_shape())

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        file, stored = self._where[name]
        part = self._handles[file].get_slice(stored)
        try:
            if cols is not None:
                return part[rows or slice(None), cols]
            return part[rows] if rows is not None else part[:]
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{file}: cannot read {stored!r} ({err}); the file is corrupt or truncated, "
                                  "copy it again") from err


def read_state(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every text tensor of a model dir, whole (pruning's full state); CausalLM names for every layout."""
    reader = HFReader(model_dir)
    return {name: reader.read(name) for name in reader.names()}


# ---------------------------------------------------------------------------------------- writing
TensorSpec = tuple[tuple[int, ...], torch.dtype]


def _nbytes(spec: TensorSpec) -> int:
    shape, dtype = spec
    return torch.Size(shape).numel() * dtype.itemsize


def plan_shards(specs: dict[str, TensorSpec], max_shard_bytes: int) -> list[list[str]]:
    """Names in order, cut into shards of at most ``max_shard_bytes`` (one tensor larger than that is its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(specs):
        nbytes = _nbytes(specs[name])
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_multimodal(multimodal: Multimodal, config: MistralConfig, tmp: Path) -> None:
    """The vision part copied verbatim beside the text model, with its config and a README line saying so."""
    handles = {file: _open(file) for file in set(multimodal.tensors.values())}
    tensors = {name: handles[file].get_tensor(name) for name, file in sorted(multimodal.tensors.items())}
    save_file(tensors, tmp / MULTIMODAL_NAME, metadata={"format": "pt"})
    (tmp / MULTIMODAL_CONFIG).write_text(json.dumps(multimodal.config, indent=2) + "\n")
    (tmp / README).write_text(
        f"The text model of a {MISTRAL3.architectures[0]} checkpoint, as {config.architecture}. The vision "
        f"tower and projector ({len(tensors)} tensors) are in {MULTIMODAL_NAME}, unchanged, with their config in "
        f"{MULTIMODAL_CONFIG}.\n")


def write_streamed(
    tensors: Iterable[tuple[str, torch.Tensor]],
    specs: dict[str, TensorSpec],
    config: MistralConfig,
    out_dir: str | Path,
    max_shard_bytes: int = 4 * 2**30,
    extra_files: dict[str, Path] | None = None,
    overwrite: bool = False,
    multimodal: Multimodal | None = None,
    hf_config: dict | None = None,
) -> Path:
    """Write config.json + safetensors from ``tensors`` arriving in sorted name order (``specs`` announces them),
    holding one shard at a time; atomically: temp dir, then rename. ``hf_config`` replaces
    ``bridges.config_to_hf(config)`` as config.json (a Mistral3 export's, from ``vision.checkpoint``).

    An existing ``out_dir`` is replaced only if it is an earlier export of this project and ``overwrite`` is set
    (``output_dir.claim``); a failure before the rename leaves it as it was.
    """
    out_dir = Path(out_dir)
    output_dir.claim(out_dir, "hf", overwrite)
    tmp = output_dir.temp_sibling(out_dir)
    try:
        hf_config = dict(hf_config or config_to_hf(config))
        dtypes = {dtype for _, dtype in specs.values()}
        hf_config["torch_dtype"] = str(next(iter(dtypes))).removeprefix("torch.") if len(dtypes) == 1 else "float32"
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        plan = plan_shards(specs, max_shard_bytes)
        files = [SINGLE_NAME] if len(plan) == 1 else [f"model-{i:05d}-of-{len(plan):05d}.safetensors"
                                                      for i in range(1, len(plan) + 1)]
        stream: Iterator[tuple[str, torch.Tensor]] = iter(tensors)
        for names, fname in zip(plan, files):
            shard = {}
            for expected in names:
                name, tensor = next(stream)
                if name != expected or (tuple(tensor.shape), tensor.dtype) != specs[name]:
                    raise RuntimeError(f"export stream gave {name} {tuple(tensor.shape)} where {expected} "
                                       f"{specs[expected]} was announced")
                shard[name] = tensor.contiguous()
            save_file(shard, tmp / fname, metadata={"format": "pt"})
        if len(plan) > 1:
            weight_map = {name: fname for names, fname in zip(plan, files) for name in names}
            total = sum(_nbytes(spec) for spec in specs.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
        if multimodal is not None:
            _write_multimodal(multimodal, config, tmp)
        for name, src in (extra_files or {}).items():
            shutil.copy(src, tmp / name)
        output_dir.write_record(tmp, "hf", output_dir.digests(tmp, output_dir.listed_files(tmp)))
        output_dir.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def write_model_dir(
    state: dict[str, torch.Tensor],
    config: MistralConfig,
    out_dir: str | Path,
    max_shard_bytes: int = 4 * 2**30,
    extra_files: dict[str, Path] | None = None,
    overwrite: bool = False,
) -> Path:
    """``write_streamed`` for a state already in memory."""
    specs = {name: (tuple(t.shape), t.dtype) for name, t in state.items()}
    return write_streamed(((name, state[name]) for name in sorted(state)), specs, config, out_dir, max_shard_bytes,
                          extra_files, overwrite)
