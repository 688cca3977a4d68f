"""Model answers and judge verdicts cached in object storage, keyed by everything that decides them.

An answer's key covers the model's identity (checkpoint file hashes, or endpoint URL + model name), the
item (benchmark, task, id, fields, video and time window), the number of frames and the exact prompt; a
verdict's key covers the judge's identity and its exact messages. So a re-run, a new report over the same
models, or a new judge over the same answers recomputes nothing it already has, and anything that would
change an answer (a new checkpoint, another prompt) misses the cache instead of reading a stale entry.
"""

from __future__ import annotations

import hashlib
import json
import threading

from dreamframe.errors import NotFound
from dreamframe.storage.base import ObjectStore

CACHE_FORMAT = 1


def material_digest(material: object) -> str:
    canonical = json.dumps(material, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(f"v{CACHE_FORMAT}\0{canonical}".encode()).hexdigest()


class ResultCache:
    """``read=False`` (the request's ignore_cache) recomputes everything but still writes fresh entries."""

    def __init__(self, store: ObjectStore, prefix: str = "cache/evaluator/", *, read: bool = True) -> None:
        self.store = store
        self.prefix = prefix.rstrip("/") + "/"
        self.read = read
        # Graders on worker threads count too.
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def _count(self, hit: bool) -> None:
        with self._lock:
            if hit:
                self.hits += 1
            else:
                self.misses += 1

    def key(self, namespace: str, material: object) -> str:
        digest = material_digest(material)
        return f"{self.prefix}{namespace}/{digest[:2]}/{digest}.json"

    def get(self, namespace: str, material: object) -> dict | None:
        if not self.read:
            self._count(False)
            return None
        try:
            entry = self.store.get_json(self.key(namespace, material))
        except NotFound:
            self._count(False)
            return None
        if not isinstance(entry, dict) or entry.get("material") != json.loads(json.dumps(material)):
            self._count(False)  # a digest collision or a foreign object: never trust it
            return None
        self._count(True)
        return entry["value"]

    def put(self, namespace: str, material: object, value: dict) -> None:
        self.store.put_json(self.key(namespace, material), {"material": material, "value": value})
