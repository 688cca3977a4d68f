"""torch.distributed.checkpoint (DCP) without pickle on what storage holds.

Stock DCP pickles its index (``.metadata``, read back with ``pickle.load``) and the non-tensor values
of a state dict (the optimizer's param groups, read back with ``torch.load(weights_only=False)``):
whoever can write a checkpoint's objects could run code in the trainer. Here the index is JSON
(``.metadata.json``, every field checked on reading: shard files must be this checkpoint's own
``__<rank>_<n>.distcp`` names, no stream transforms), and every value is read with
``torch.load(weights_only=True)`` (tensors, as DCP already does, and plain numbers, strings, lists).
A stock ``.metadata`` pickle is never opened.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import ReadItem

METADATA_FILE = ".metadata.json"
FORMAT = "dreamframe-dcp-json/1"
# What FileSystemWriter names its shard files (one or more per rank).
SHARD_FILE = re.compile(r"^__\d{1,6}_\d{1,9}\.distcp$")
_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}


class MetadataError(ValueError):
    """The checkpoint's index is not one this module wrote."""


# --- writing ------------------------------------------------------------------------------------------


class JsonMetadataWriter(FileSystemWriter):
    """FileSystemWriter whose index is ``.metadata.json`` instead of a pickle."""

    def finish(self, metadata: Metadata, results: list) -> None:
        storage = {}
        for written in results:
            storage.update({w.index: w.storage_data for w in written})
        path = Path(self.path) / METADATA_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(encode_metadata(metadata, storage)))
        os.replace(tmp, path)


def encode_metadata(metadata: Metadata, storage: dict[MetadataIndex, _StorageInfo]) -> dict:
    entries = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, BytesStorageMetadata):
            entries[fqn] = {"kind": "bytes"}
        else:
            entries[fqn] = {
                "kind": "tensor",
                "dtype": str(md.properties.dtype).removeprefix("torch."),
                "size": list(md.size),
                "chunks": [{"offsets": list(c.offsets), "sizes": list(c.sizes)} for c in md.chunks],
            }
    files = []
    for index, info in storage.items():
        if info.transform_descriptors:
            raise MetadataError(f"stream transforms are not supported: {info.transform_descriptors}")
        files.append(
            {
                "fqn": index.fqn,
                "offset": None if index.offset is None else list(index.offset),
                "index": index.index,
                "file": info.relative_path,
                "start": info.offset,
                "length": info.length,
            }
        )
    planner = metadata.planner_data or {}
    return {
        "format": FORMAT,
        "state_dict": entries,
        "storage": files,
        "planner": {fqn: list(path) for fqn, path in planner.items()},
    }


# --- reading ------------------------------------------------------------------------------------------


class JsonMetadataReader(FileSystemReader):
    """FileSystemReader that reads (and checks) ``.metadata.json``; never the pickled ``.metadata``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / METADATA_FILE
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise MetadataError(f"no {METADATA_FILE} (a checkpoint of another format?)") from None
        except ValueError:
            raise MetadataError(f"{METADATA_FILE} is not JSON") from None
        metadata = decode_metadata(data)
        metadata.storage_meta = StorageMeta(load_id=self.load_id)
        return metadata


def _ints(value: object, what: str) -> list[int]:
    if not isinstance(value, list) or not all(type(v) is int and v >= 0 for v in value):
        raise MetadataError(f"{what} must be a list of non-negative integers")
    return value


def _dict(value: object, what: str) -> dict:
    if not isinstance(value, dict):
        raise MetadataError(f"{what} must be an object")
    return value


def decode_metadata(data: object) -> Metadata:
    data = _dict(data, "the index")
    if data.get("format") != FORMAT:
        raise MetadataError(f"index format {str(data.get('format'))[:40]!r}, expected {FORMAT!r}")
    entries: dict[str, Any] = {}
    for fqn, md in _dict(data.get("state_dict"), "state_dict").items():
        md = _dict(md, f"state_dict[{fqn[:80]!r}]")
        if md.get("kind") == "bytes":
            entries[fqn] = BytesStorageMetadata()
            continue
        if md.get("kind") != "tensor" or md.get("dtype") not in _DTYPES:
            raise MetadataError(f"state_dict[{fqn[:80]!r}]: not a tensor or bytes entry of a known dtype")
        chunks = []
        for chunk in md.get("chunks") or []:
            chunk = _dict(chunk, "a chunk")
            chunks.append(
                ChunkStorageMetadata(
                    offsets=torch.Size(_ints(chunk.get("offsets"), "chunk offsets")),
                    sizes=torch.Size(_ints(chunk.get("sizes"), "chunk sizes")),
                )
            )
        entries[fqn] = TensorStorageMetadata(
            properties=TensorProperties(dtype=_DTYPES[md["dtype"]]),
            size=torch.Size(_ints(md.get("size"), "tensor size")),
            chunks=chunks,
        )
    storage = {}
    files = data.get("storage")
    if not isinstance(files, list):
        raise MetadataError("storage must be a list")
    for item in files:
        item = _dict(item, "a storage entry")
        name, fqn, index = item.get("file"), item.get("fqn"), item.get("index")
        if not isinstance(name, str) or not SHARD_FILE.match(name):
            raise MetadataError(f"shard file name {str(name)[:40]!r} is not __<rank>_<n>.distcp")
        if not isinstance(fqn, str) or fqn not in entries:
            raise MetadataError("a storage entry names no state_dict entry")
        if index is not None and type(index) is not int:
            raise MetadataError("a storage entry's index must be an integer")
        start, length = _ints([item.get("start"), item.get("length")], "a storage entry's start and length")
        offset = item.get("offset")
        key = MetadataIndex(fqn, None if offset is None else torch.Size(_ints(offset, "offset")), index)
        storage[key] = _StorageInfo(relative_path=name, offset=start, length=length)
    planner = {}
    for fqn, obj_path in _dict(data.get("planner") or {}, "planner").items():
        if not isinstance(obj_path, list) or not all(type(p) in (str, int) for p in obj_path):
            raise MetadataError("planner paths must be lists of names and indices")
        planner[fqn] = tuple(obj_path)
    return Metadata(
        state_dict_metadata=entries, planner_data=planner, storage_data=storage, version=CURRENT_DCP_VERSION
    )


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor values are read with ``weights_only=True`` (stock: False)."""

    def load_bytes(self, read_item: ReadItem, value) -> None:  # noqa: ANN001 - io.BytesIO
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded
