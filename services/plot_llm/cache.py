"""Every finished LLM call, kept in object storage under the story's prefix and keyed by a hash of what
determines its answer (backend, model, conversation, schema, sampling, seed). A rerun asks again only
what has no entry, and a story can be rebuilt from its entries alone.

Entries hold the validated answer; a corrupt or no longer valid entry reads as missing."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import asdict
from typing import Any

from dreamframe.errors import NotFound
from dreamframe.keys import story_prefix
from dreamframe.storage.base import ObjectStore

from .llm import ChatRequest

CACHE_FORMAT = 1


def call_digest(backend: str, model: str, request: ChatRequest) -> str:
    """SHA-256 over the canonical JSON of everything that decides the answer."""
    payload = {
        "format": CACHE_FORMAT,
        "backend": backend,
        "model": model,
        "messages": list(request.messages),
        "schema": request.schema,
        "sampling": asdict(request.sampling),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def cache_prefix(job_id: str, story_index: int) -> str:
    return f"{story_prefix(job_id, story_index)}llm_calls/"


class CallCache:
    def __init__(
        self, store: ObjectStore, prefix: str, *, bucket: str | None = None, enabled: bool = True
    ) -> None:
        self._store = store
        self._prefix = prefix
        self._bucket = bucket
        self.enabled = enabled
        self._listed: set[str] | None = None

    def key(self, digest: str) -> str:
        return f"{self._prefix}{digest}.json"

    async def load_listing(self) -> None:
        """List the entries once, so a miss costs no request (a fresh story asks storage nothing per call)."""
        if self.enabled:
            self._listed = await asyncio.to_thread(
                lambda: {info.key for info in self._store.list(self._prefix, bucket=self._bucket)}
            )

    async def get(self, digest: str) -> dict[str, Any] | None:
        """The cached answer object, or None."""
        if not self.enabled or (self._listed is not None and self.key(digest) not in self._listed):
            return None
        try:
            entry = await asyncio.to_thread(self._store.get_json, self.key(digest), bucket=self._bucket)
        except NotFound:
            return None
        except (ValueError, UnicodeDecodeError):
            return None  # a corrupt entry is asked again and overwritten
        if (
            not isinstance(entry, dict)
            or entry.get("format") != CACHE_FORMAT
            or not isinstance(entry.get("answer"), dict)
        ):
            return None
        return entry["answer"]

    async def put(self, digest: str, *, call: str, answer: dict[str, Any], attempts: int) -> None:
        if not self.enabled:
            return
        entry = {
            "format": CACHE_FORMAT,
            "call": call,
            "attempts": attempts,
            "created": time.time(),
            "answer": answer,
        }
        await asyncio.to_thread(self._store.put_json, self.key(digest), entry, bucket=self._bucket)
