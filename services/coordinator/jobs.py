"""Job records: the Job proto, persisted as JSON in object storage after every transition.

The store is the coordinator's only state, so a restarted coordinator reloads every job from it and
resumes the unfinished ones (``JobStore.unfinished``).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from dreamframe import keys
from dreamframe.errors import NotFound
from dreamframe.storage.base import ObjectStore
from dreamframe.v1 import coordinator_pb2 as pb

TERMINAL = frozenset({pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED})


def new_job_id() -> str:
    """Sortable by creation time, unique without coordination: ``20261126-002533-3f9a1c``."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def now() -> Timestamp:
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


def is_terminal(state: int) -> bool:
    return state in TERMINAL


class JobStore:
    """Jobs as ``jobs/<id>/job.json``. Every ``save`` is one atomic object write."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def save(self, job: pb.Job) -> None:
        job.updated_at.CopyFrom(now())
        data = json_format.MessageToJson(job, preserving_proto_field_name=True).encode()
        self.store.put_bytes(keys.job_state_key(job.job_id), data, content_type="application/json")

    def load(self, job_id: str) -> pb.Job:
        key = keys.job_state_key(job_id)
        if not self.store.exists(key):
            raise NotFound(f"no job {job_id!r}", field="job_id")
        job = pb.Job()
        json_format.Parse(self.store.get_bytes(key), job, ignore_unknown_fields=True)
        return job

    def exists(self, job_id: str) -> bool:
        return self.store.exists(keys.job_state_key(job_id))

    def all(self) -> Iterator[pb.Job]:
        for info in self.store.list("jobs/"):
            parts = info.key.split("/")
            if len(parts) == 3 and parts[2] == "job.json":
                yield self.load(parts[1])

    def unfinished(self) -> list[pb.Job]:
        return [job for job in self.all() if not is_terminal(job.state)]
