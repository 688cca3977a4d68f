"""Reading a dataset from storage: a conversation list, or a qa-generator manifest that names one.

A manifest with a record index (``index.train``: services/qa_generator/index.py) is not read record by
record here: the run plans from the index's counts and each rank reads its own shards (``data.index``).
Older manifests and plain conversation files are read whole and planned record by record."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from dreamframe.errors import FailedPrecondition, InvalidArgument, NotFound
from dreamframe.storage.base import ObjectStore

from ..spec import DatasetSource
from .index import checked_index


@dataclass
class LoadedDataset:
    # The records (None for an indexed dataset: its ranks read them from the index shards).
    records: list | None
    # Folder the record's relative media paths are resolved against (and its parents).
    base_folder: str
    bucket: str | None
    conversation_key: str
    sha256: str
    # The manifest's record index, checked (``index.checked_index``), or None.
    index: dict | None = None


def load_dataset(store: ObjectStore, source: DatasetSource, index: int) -> LoadedDataset:
    """The records of one dataset. ``source.key`` is a conversation list or a manifest (a JSON object)
    naming one with a ``.../conversations/train.json`` file entry."""
    where = f"datasets[{index}].dataset"
    bucket = source.bucket or None
    if not store.exists(source.key, bucket=bucket):
        raise NotFound(f"no dataset object {source.key!r}", field=f"{where}.key")
    ref = store.stat(source.key, bucket=bucket)
    if source.sha256 and ref.sha256 != source.sha256:
        raise FailedPrecondition(
            f"{source.key!r} changed: its sha256 is {ref.sha256}, the request says {source.sha256}",
            field=f"{where}.sha256",
        )
    data = _json(store, source.key, bucket, where)
    key, sha = source.key, ref.sha256
    if isinstance(data, dict):
        key, listed_sha = _conversation_key_from_manifest(data, source.key, where)
        index = checked_index(data, source.key, bucket or store.default_bucket, where)
        if index is not None:
            # Planned from the index: the conversation file itself is never read (the shards hold it).
            return LoadedDataset(None, posixpath.dirname(source.key), bucket, key, listed_sha, index)
        if not store.exists(key, bucket=bucket):
            raise NotFound(f"the manifest names {key!r}, which does not exist", field=f"{where}.key")
        sha = store.stat(key, bucket=bucket).sha256
        if listed_sha and listed_sha != sha:
            raise FailedPrecondition(f"{key!r} does not match its manifest entry", field=f"{where}.key")
        data = _json(store, key, bucket, where)
        base = posixpath.dirname(source.key)
    else:
        base = posixpath.dirname(key)
    if not isinstance(data, list):
        raise InvalidArgument("a conversation dataset must be a JSON list of records", field=f"{where}.key")
    return LoadedDataset(data, base, bucket, key, sha)


def _json(store: ObjectStore, key: str, bucket: str | None, where: str):
    import json

    try:
        return json.loads(store.get_bytes(key, bucket=bucket))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"{key!r} is not valid JSON: {exc}", field=f"{where}.key") from exc


def _conversation_key_from_manifest(manifest: dict, manifest_key: str, where: str) -> tuple[str, str]:
    """(key, listed sha256) of the training conversations a qa-generator manifest lists: the ``files``
    entry (``{"path", "key", "sha256", ...}``) for ``conversations/train.json``; a path without a key is
    relative to the manifest's folder."""
    folder = posixpath.dirname(manifest_key)
    for entry in manifest.get("files", []):
        if not isinstance(entry, dict):
            continue
        path = entry.get("path") or entry.get("key") or ""
        if path == "conversations/train.json" or path.endswith("/conversations/train.json"):
            key = entry.get("key") or posixpath.join(folder, path)
            return key, str(entry.get("sha256") or "")
    raise InvalidArgument(
        "the manifest lists no conversations/train.json (the dataset was built without LLaVA JSON?)",
        field=f"{where}.key",
    )
