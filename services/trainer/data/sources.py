"""Reading a dataset from storage: a conversation list, or a qa-generator manifest that names one."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from dreamframe.errors import FailedPrecondition, InvalidArgument, NotFound
from dreamframe.storage.base import ObjectStore

from ..spec import DatasetSource


@dataclass
class LoadedDataset:
    records: list
    # Folder the record's relative media paths are resolved against (and its parents).
    base_folder: str
    bucket: str | None
    conversation_key: str
    sha256: str


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
