"""Reading a checkpoint's DCP metadata without running what is in it.

torch.distributed.checkpoint stores `.metadata` as a pickle and its FileSystemReader loads
it with plain `pickle.load`: a `.metadata` crafted by anyone who can write the run
directory (a shared filesystem) would run code in every rank that resumes from it. The
MANIFEST cannot help: whoever edits the files recomputes its sizes and crc32s.

    .metadata ──► RestrictedUnpickler ──────────► Metadata ──► shape check ──► dcp.load
                  globals only from the allow-list          every entry a tensor,
                  (DCP's metadata classes, torch.Size,       every data file a plain name
                  dtypes, layouts, pathlib paths)            in the checkpoint directory
                  anything else: UnsafeCheckpoint, nothing called

torch's weights-only unpickler would be the natural tool, but in torch 2.13 it rejects the
FRAME opcode of pickle protocol 4 that DCP writes; so this is a `find_class` allow-list,
the form the `pickle` documentation recommends ("Restricting Globals"). Every callable it
admits only builds a value (a dataclass, a tuple, an enum member, a path).

Byte entries are refused too: DCP loads them with `torch.load(weights_only=False)` from the
data files, a second door to code execution. This project's checkpoints hold tensors only.
"""
from __future__ import annotations

import io
import pathlib
import pickle

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata

from model.config import ConfigError

_METADATA_CLASSES = ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                     "TensorProperties", "ChunkStorageMetadata", "MetadataIndex", "StorageMeta",
                     "_MEM_FORMAT_ENCODING")
ALLOWED_GLOBALS = {
    **{("torch.distributed.checkpoint.metadata", n): getattr(dcp_metadata, n)
       for n in _METADATA_CLASSES},
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): dcp_filesystem._StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("pathlib", "PosixPath"): pathlib.PosixPath,
    ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
}


class UnsafeCheckpoint(ConfigError):
    """A checkpoint whose metadata this job would never have written."""


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        found = ALLOWED_GLOBALS.get((module, name))
        if found is None and module == "torch" and isinstance(getattr(torch, name, None),
                                                              torch.dtype):
            found = getattr(torch, name)
        if found is None:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which is not a "
                                         "checkpoint metadata type")
        return found

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it holds a persistent reference, which DCP never writes")


def _check_shape(metadata) -> None:
    """Raise ValueError unless `metadata` looks like what this project's saves write."""
    m = dcp_metadata
    if not isinstance(metadata, m.Metadata):
        raise ValueError(f"it holds a {type(metadata).__name__}, not DCP Metadata")
    if not isinstance(metadata.state_dict_metadata, dict):
        raise ValueError("its state_dict_metadata is not a dict")
    for name, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, m.TensorStorageMetadata):
            raise ValueError(f"entry {name!r} is a {type(entry).__name__}, not a tensor (this "
                             "project's checkpoints hold only tensors; DCP would unpickle it)")
        if not (isinstance(entry.properties, m.TensorProperties)
                and isinstance(entry.properties.dtype, torch.dtype)
                and isinstance(entry.size, torch.Size)
                and all(isinstance(c, m.ChunkStorageMetadata) for c in entry.chunks)):
            raise ValueError(f"entry {name!r} is not a well-formed tensor description")
    for index, info in (metadata.storage_data or {}).items():
        path = getattr(info, "relative_path", None)
        if (not isinstance(info, dcp_filesystem._StorageInfo) or not isinstance(path, str)
                or path != pathlib.PurePosixPath(path).name or path in ("", ".", "..")):
            raise ValueError(f"the data of {getattr(index, 'fqn', index)!r} lives at "
                             f"{path!r}, not in a file of the checkpoint directory")


def read_metadata(path: pathlib.Path):
    """The DCP Metadata of the checkpoint directory `path`, or UnsafeCheckpoint."""
    file = path / ".metadata"
    try:
        metadata = RestrictedUnpickler(io.BytesIO(file.read_bytes())).load()
        _check_shape(metadata)
    except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, EOFError,
            IndexError, KeyError) as e:
        raise UnsafeCheckpoint(
            f"refusing checkpoint {path}: its .metadata is not what this job writes ({e}); "
            "someone or something else changed it. Resume from another checkpoint "
            "(--resume PATH), or start fresh (--resume none)") from None
    return metadata


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader with the metadata read by `read_metadata` above.

    `check()` reads and checks it once, before any collective, so a refusal is a clean error
    on every rank instead of a hang or a wrapped CheckpointException; DCP's own call then
    gets the checked copy."""

    def __init__(self, path: pathlib.Path):
        super().__init__(str(path))
        self._dir = pathlib.Path(path)
        self._metadata = None

    def check(self) -> None:
        if self._metadata is None:
            self._metadata = read_metadata(self._dir)

    def read_metadata(self, *args, **kwargs):
        if kwargs.get("rank") is not None:  # per-rank metadata: never written by our saves
            raise FileNotFoundError(f"{self._dir} has no per-rank metadata")
        self.check()
        metadata = self._metadata
        if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader does
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
