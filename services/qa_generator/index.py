"""The dataset's record index: what a trainer needs to plan a run without listing, HEAD-ing or tokenizing
anything. Each split's conversation records are written a second time as JSON-lines shards
``index/<split>-00000.jsonl`` … of ``SHARD_RECORDS`` records each, in the order of
``conversations/<split>.json``; one line per record::

    {"id": str, "kind": "video", "media": [[key, size], ...], "chars": int, "record": {...}}

``media`` are the full object keys (in the manifest's bucket) with their sizes, so existence is known from
the manifest; ``chars`` is the length of the record's text (a token-length estimate for length grouping);
``record`` is the LLaVA record itself. A trainer rank reads only the shards holding its share of the
records. The manifest's ``index`` section names the shards and their record counts; the shards' keys,
sizes and sha256 are in its ``files`` list like every other file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from dreamframe.storage.base import ObjectRef

INDEX_FORMAT = "dreamframe-index"
INDEX_VERSION = 1
SHARD_RECORDS = 4096


def record_chars(record: dict) -> int:
    """Characters of a record's text (every turn): the trainer's token-length estimate starts here."""
    return sum(len(t.get("value", "")) for t in record.get("conversations", []) if isinstance(t, dict))


def index_line(record: dict, prefix: str, video_refs: Mapping[str, ObjectRef]) -> bytes:
    rel = record["video"]
    ref = video_refs[rel]
    entry = {
        "id": record["id"],
        "kind": "video",
        "media": [[prefix + rel, ref.size]],
        "chars": record_chars(record),
        "record": record,
    }
    return json.dumps(entry, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def index_files(
    split: str,
    records: Sequence[dict],
    prefix: str,
    video_refs: Mapping[str, ObjectRef],
    shard_records: int = SHARD_RECORDS,
) -> tuple[dict[str, bytes], dict]:
    """({path: shard bytes}, the manifest's index entry for the split)."""
    files: dict[str, bytes] = {}
    shards = []
    for n, start in enumerate(range(0, len(records), shard_records)):
        chunk = records[start : start + shard_records]
        path = f"index/{split}-{n:05d}.jsonl"
        files[path] = b"".join(index_line(r, prefix, video_refs) for r in chunk)
        shards.append({"path": path, "first": start, "records": len(chunk)})
    entry = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "records": len(records),
        "conversations": f"conversations/{split}.json",
        "shards": shards,
    }
    return files, entry
