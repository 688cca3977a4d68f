"""A dataset's record index (written by the qa-generator: services/qa_generator/index.py) as the trainer
reads it: ``checked_index`` validates the manifest's ``index.train`` section, ``read_entries`` streams the
shards that hold records ``[lo, hi)`` (each shard's sha256 checked against the manifest) and turns each
line into a ``Sample`` with an estimated token length plus the record's raw line for the loader workers.

Nothing here touches a record's media or tokenizes it: existence and size come from the index, the exact
token count and every structural check come when the sample is collated (bad ones are counted then).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Iterator

from dreamframe.errors import FailedPrecondition, InvalidArgument
from dreamframe.storage.base import ObjectStore

from .records import FRAMES, IMAGE, VIDEO

INDEX_FORMAT = "dreamframe-index"
INDEX_VERSION = 1
# Bounds on what a manifest may ask a rank to hold (hostile input: a bounded cost).
MAX_SHARD_BYTES = 1 << 30
MAX_LINE_BYTES = 4 << 20
MAX_SHARDS = 1 << 20


def checked_index(manifest: dict, manifest_key: str, bucket: str, where: str) -> dict | None:
    """The manifest's train index as ``{"bucket", "records", "shards": [{key, sha256, size, first,
    records}]}``; None when the manifest has none (or one of a version this trainer does not read: the
    dataset is then read whole, as before indexes existed)."""
    section = manifest.get("index")
    entry = section.get("train") if isinstance(section, dict) else None
    if not isinstance(entry, dict) or entry.get("format") != INDEX_FORMAT:
        return None
    if entry.get("version") != INDEX_VERSION:
        return None
    field = f"{where}.key"
    folder = posixpath.dirname(manifest_key)
    listed_files = [f for f in manifest.get("files", []) if isinstance(f, dict)]
    files = {f["path"]: f for f in listed_files if isinstance(f.get("path"), str)}
    shards_in = entry.get("shards")
    records = entry.get("records")
    if not isinstance(shards_in, list) or len(shards_in) > MAX_SHARDS or not _count(records):
        raise InvalidArgument("the manifest's index.train is malformed (shards, records)", field=field)
    shards, first = [], 0
    for n, shard in enumerate(shards_in):
        path = shard.get("path") if isinstance(shard, dict) else None
        listed = files.get(path) if isinstance(path, str) else None
        if (
            listed is None
            or shard.get("first") != first
            or not _count(shard.get("records"))
            or not _count(listed.get("size"))
            or listed["size"] > MAX_SHARD_BYTES
            or not isinstance(listed.get("sha256"), str)
        ):
            raise InvalidArgument(
                f"the manifest's index shard {n} is malformed or not among its files", field=field
            )
        key = listed.get("key") or posixpath.join(folder, path)
        shards.append(
            {
                "key": key,
                "sha256": listed["sha256"],
                "size": listed["size"],
                "first": first,
                "records": shard["records"],
            }
        )
        first += shard["records"]
    if first != records:
        raise InvalidArgument(
            f"the manifest's index shards hold {first} records, its index says {records}", field=field
        )
    # The shards are read from the manifest's own bucket: a manifest cannot point a run elsewhere.
    return {"bucket": bucket, "records": records, "shards": shards}


def _count(value: object) -> bool:
    return type(value) is int and 0 <= value < 1 << 40


def read_entries(
    store: ObjectStore, index: dict, lo: int, hi: int, bucket: str | None
) -> Iterator[tuple[int, bytes]]:
    """(record number, index line) for records ``lo <= n < hi``, streaming only the shards that hold
    them; FailedPrecondition if a shard is not what the manifest lists (the dataset changed)."""
    for shard in index["shards"]:
        first, count = shard["first"], shard["records"]
        if first + count <= lo or first >= hi or count == 0:
            continue
        n = first
        digest = hashlib.sha256()
        size = 0
        tail = b""
        with store.open_stream(shard["key"], bucket=bucket) as chunks:
            for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                if size > shard["size"]:
                    break
                lines = (tail + chunk).split(b"\n")
                tail = lines.pop()
                if len(tail) > MAX_LINE_BYTES:
                    raise FailedPrecondition(f"index shard {shard['key']!r} has an over-long line")
                for line in lines:
                    if lo <= n < hi:
                        yield n, line
                    n += 1
        if tail:
            if lo <= n < hi:
                yield n, tail
            n += 1
        if size != shard["size"] or digest.hexdigest() != shard["sha256"] or n != first + count:
            raise FailedPrecondition(
                f"index shard {shard['key']!r} is not the one the manifest lists (the dataset changed?)",
                field="datasets",
            )


def entry_fields(line: bytes) -> tuple[str, str, tuple[str, ...], tuple[int, ...], int]:
    """(id, kind, media keys, media sizes, text characters) of an index line; ValueError if malformed."""
    entry = json.loads(line)
    if not isinstance(entry, dict):
        raise ValueError("index line is not a JSON object")
    rid, kind, media, chars = entry.get("id"), entry.get("kind"), entry.get("media"), entry.get("chars")
    if not isinstance(rid, str) or kind not in (VIDEO, FRAMES, IMAGE) or not isinstance(media, list):
        raise ValueError("index line lacks id, kind or media")
    if not media:
        raise ValueError("index line lacks id, kind or media")
    keys, sizes = [], []
    for item in media:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and _count(item[1])):
            raise ValueError("index line's media are not [key, size] pairs")
        keys.append(item[0])
        sizes.append(item[1])
    if kind != FRAMES and len(keys) != 1:
        raise ValueError(f"a {kind} sample has exactly one media object")
    return rid, kind, tuple(keys), tuple(sizes), chars if _count(chars) else 0


def record_of(line: bytes) -> dict:
    """The LLaVA record an index line carries; ValueError if there is none."""
    entry = json.loads(line)
    record = entry.get("record") if isinstance(entry, dict) else None
    if not isinstance(record, dict):
        raise ValueError("index line carries no record")
    return record
