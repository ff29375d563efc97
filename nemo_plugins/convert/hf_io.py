"""Read and write Hugging Face model directories (config.json + safetensors, sharded with an index); written ones
carry the project's record (``output_dir``), so an export never replaces a folder it did not write."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nemo_plugins.convert import output_dir
from nemo_plugins.errors import ConfigError
from nemo_plugins.manifest import read_json
from nemo_plugins.model.config import MistralConfig

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def read_config(model_dir: str | Path) -> MistralConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found: a Hugging Face model directory needs config.json")
    return MistralConfig.from_hf(read_json(path))


def shard_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a model dir; a sharded index must list only files that exist."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_NAME
    if index.is_file():
        weight_map = read_json(index)["weight_map"]
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ConfigError(f"{model_dir}: shard(s) {missing} listed in {INDEX_NAME} are missing; re-copy the checkpoint")
        return files
    single = model_dir / SINGLE_NAME
    if single.is_file():
        return [single]
    raise ConfigError(f"{model_dir}: neither {INDEX_NAME} nor {SINGLE_NAME} found")


def read_state(model_dir: str | Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in shard_files(model_dir):
        try:
            state.update(load_file(file))
        except (SafetensorError, OSError) as err:
            raise ConfigError(f"{file}: cannot read safetensors shard ({err}); the file is corrupt or truncated") from err
    return state


def write_model_dir(
    state: dict[str, torch.Tensor],
    config: MistralConfig,
    out_dir: str | Path,
    max_shard_bytes: int = 4 * 2**30,
    extra_files: dict[str, Path] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write config.json + safetensors (sharded past ``max_shard_bytes``) atomically: temp dir, then rename.

    An existing ``out_dir`` is replaced only if it is an earlier export of this project and ``overwrite`` is set
    (``output_dir.claim``); a failure before the rename leaves it as it was.
    """
    out_dir = Path(out_dir)
    output_dir.claim(out_dir, "hf", overwrite)
    tmp = output_dir.temp_sibling(out_dir)
    try:
        hf_config = config.to_hf()
        dtypes = {t.dtype for t in state.values()}
        hf_config["torch_dtype"] = str(next(iter(dtypes))).removeprefix("torch.") if len(dtypes) == 1 else "float32"
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name in sorted(state):
            nbytes = state[name].numel() * state[name].element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = state[name].contiguous()
            size += nbytes
        if len(shards) == 1:
            save_file(shards[0], tmp / SINGLE_NAME, metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / fname, metadata={"format": "pt"})
                weight_map.update({name: fname for name in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        for name, src in (extra_files or {}).items():
            shutil.copy(src, tmp / name)
        output_dir.write_record(tmp, "hf", output_dir.digests(tmp, output_dir.listed_files(tmp)))
        output_dir.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
