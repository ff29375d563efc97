"""The pickled files of a megatron dist checkpoint are read as data, never run as code.

megatron-core loads a checkpoint through torch's distributed-checkpoint reader, which unpickles
``weights/.metadata`` with plain ``pickle`` and every non-tensor item (a ``ShardedObject``: layers' extra state,
anything else stored as an object) with ``torch.load(weights_only=False)``; ``common.pt`` goes through
``torch.load`` (weights-only by default since torch 2.6). A pickle may name any callable, so a planted one would
run as the checkpoint loads. ``check_data_only`` reads all of them before megatron-core does: ``.metadata`` with an
unpickler that resolves only the distributed-checkpoint metadata classes, the others with
``torch.load(weights_only=True)`` (tensors, containers, and the classes megatron-core registers as safe). Anything
else is a CheckpointError naming the file, and nothing in it has run.
"""

from __future__ import annotations

import enum
import io
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

from nemo_plugins.errors import CheckpointError

METADATA = ".metadata"
COMMON = "common.pt"

# What torch (2.6 - 2.13) and megatron-core (0.16 - 0.19) pickle into ``.metadata``: the metadata dataclasses, the
# save plans megatron-core caches there, and torch's sizes / dtypes / layouts.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData",
                                             "BytesIOWriteData"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
}


def _enum_member(cls: type, name: str) -> enum.Enum:
    """``getattr`` as early Python 3.11 pickles enum members (``builtins.getattr(EnumClass, 'NAME')``, e.g. Debian's
    3.11.2 writing ``_MEM_FORMAT_ENCODING``); only a member of an Enum class the metadata allows resolves."""
    is_enum = isinstance(cls, type) and issubclass(cls, enum.Enum)
    allowed = is_enum and cls.__name__ in _METADATA_CLASSES.get(cls.__module__, ())
    if not allowed or name not in cls.__members__:
        raise pickle.UnpicklingError(f"asks for attribute {name!r} of {cls!r}, which checkpoint metadata never holds")
    return cls.__members__[name]


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == ("builtins", "getattr"):
            return _enum_member
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        value = getattr(torch, name, None) if module == "torch" else None
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            return value
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which checkpoint metadata never holds")


def read_metadata(weights_dir: str | Path) -> Metadata:
    """``.metadata`` unpickled with only the distributed-checkpoint classes resolvable."""
    path = Path(weights_dir) / METADATA
    try:
        with path.open("rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path} {err}: refusing to load it (a planted pickle would run)") from None
    except (OSError, EOFError, ValueError, TypeError, AttributeError) as err:
        reason = f"{type(err).__name__}: {err}"
        raise CheckpointError(f"{path} is unreadable ({reason}); the checkpoint is damaged") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not distributed-checkpoint metadata")
    return metadata


def _load_plain(source: Path | io.BytesIO, name: str) -> None:
    """``torch.load(weights_only=True)`` of ``source``; a refusal or damage becomes one line naming ``name``."""
    try:
        torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if isinstance(source, io.BytesIO):
            source.seek(0)
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(source)
        except (ValueError, RuntimeError):  # a raw pickle, not a torch.save archive: its globals go unnamed
            unsafe = []
        raise CheckpointError(f"{name} holds pickled {', '.join(unsafe) or 'objects'} where data belongs: refusing to "
                              "load it (a planted pickle would run)") from None
    except Exception as err:  # torch reports a damaged file with several types
        raise CheckpointError(f"{name} is unreadable ({type(err).__name__}: {str(err).splitlines()[0]}); "
                              "the checkpoint is damaged") from None


def check_data_only(weights_dir: str | Path) -> None:
    """Refuse a checkpoint whose ``.metadata``, ``common.pt`` or object items hold anything but data."""
    weights_dir = Path(weights_dir)
    metadata = read_metadata(weights_dir)
    if (weights_dir / COMMON).is_file():
        _load_plain(weights_dir / COMMON, str(weights_dir / COMMON))
    objects = {key for key, item in metadata.state_dict_metadata.items() if isinstance(item, BytesStorageMetadata)}
    for index, info in (metadata.storage_data or {}).items():
        if index.fqn not in objects:
            continue
        path = weights_dir / info.relative_path
        try:
            with path.open("rb") as f:
                f.seek(info.offset)
                data = f.read(info.length)
        except OSError as err:
            raise CheckpointError(f"{path} is unreadable ({err.strerror}); the checkpoint is damaged") from None
        _load_plain(io.BytesIO(data), f"{path} (item {index.fqn})")
