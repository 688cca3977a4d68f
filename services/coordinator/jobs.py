"""Job records: the Job proto, persisted as JSON in object storage after every transition.

The store is the coordinator's only state, so a restarted coordinator (or the replica that takes over
the lead) reloads the unfinished jobs from it and resumes them (``JobStore.unfinished``, from an index of
one object per job: nothing lists the keys inside jobs).
"""

from __future__ import annotations

import secrets
import threading
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


# One small object per job, so finding jobs never lists the keys inside jobs (frames: millions).
INDEX_PREFIX = "jobs-index/"
ACTIVE_PREFIX = f"{INDEX_PREFIX}active/"  # jobs not finished yet: what a (new) leader resumes
ALL_PREFIX = f"{INDEX_PREFIX}all/"  # every job, newest first by submit time
# A team's jobs, same entries as all/: a team's listing never reads another team's jobs. Jobs without
# a team (submitted while auth was off, or before jobs had owners) are in all/ only: admins see them.
TEAM_PREFIX = f"{INDEX_PREFIX}team/"
INDEX_BUILT_KEY = f"{INDEX_PREFIX}built"  # the index covers every job (stores from before it existed)
_NEWEST_FIRST = 10**13  # milliseconds; inverted so the lexical order of keys is newest first


def _entry(job: pb.Job) -> str:
    millis = job.created_at.seconds * 1000 + job.created_at.nanos // 1_000_000
    return f"{_NEWEST_FIRST - millis:013d}-{job.job_id}"


def _all_key(job: pb.Job) -> str:
    return ALL_PREFIX + _entry(job)


def _team_prefix(team: str) -> str:
    # Teams come from the server's caller configuration (key-safe names); checked again all the same.
    return f"{TEAM_PREFIX}{keys.validate_id(team, field='team')}/"


def _index(store: ObjectStore, job: pb.Job) -> None:
    """The job's listing entries (team first: a job listed for admins is listed for its team too)."""
    if job.team:
        store.put_bytes(_team_prefix(job.team) + _entry(job), b"")
    store.put_bytes(_all_key(job), b"")


class JobStore:
    """Jobs as ``jobs/<id>/job.binpb`` (binary protobuf; ``job.json`` of older stores is still read), plus
    an index of one small object per job.

    Every ``save`` is one compare-and-swap write against the version this store last read or wrote for
    that job (``put_if``): a coordinator that lost its leadership — whose job state another replica has
    since written — gets ``Aborted`` instead of overwriting it (fencing by storage, not by clocks).
    """

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._versions: dict[str, str] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._indexed = False

    def _lock(self, job_id: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(job_id, threading.Lock())

    def save(self, job: pb.Job) -> None:
        """Write the job (creating it when this store has not seen it); ``Aborted`` if another writer
        changed it since. Keeps the index in step: active until terminal, listed from creation."""
        job.updated_at.CopyFrom(now())
        data = job.SerializeToString(deterministic=True)
        key = keys.job_state_key(job.job_id)
        with self._lock(job.job_id):
            created = job.job_id not in self._versions
            version = self.store.put_if(
                key, data, version=self._versions.get(job.job_id), content_type="application/x-protobuf"
            )
            self._versions[job.job_id] = version
        if created:
            _index(self.store, job)
        if is_terminal(job.state):
            self.store.delete(ACTIVE_PREFIX + job.job_id)
        elif created:
            self.store.put_bytes(ACTIVE_PREFIX + job.job_id, b"")

    def load(self, job_id: str, *, track: bool = False) -> pb.Job:
        """The stored job; ``track``: later saves from this store build on the version read now (a job
        this coordinator takes over)."""
        job = pb.Job()
        try:
            data, version = self.store.get_versioned(keys.job_state_key(job_id))
            job.ParseFromString(data)
        except NotFound:
            # A store from before job.binpb: the first save writes job.binpb (a create: `version` None).
            try:
                data, _ = self.store.get_versioned(keys.legacy_job_state_key(job_id))
            except NotFound:
                raise NotFound(f"no job {job_id!r}", field="job_id") from None
            json_format.Parse(data, job, ignore_unknown_fields=True)
            version = None
        if track:
            with self._lock(job_id):
                self._versions[job_id] = version
        return job

    def forget(self, job_id: str) -> None:
        """Drop what this store remembers of a job it no longer works on (memory bounded by active jobs)."""
        with self._guard:
            self._versions.pop(job_id, None)
            self._locks.pop(job_id, None)

    def exists(self, job_id: str) -> bool:
        return self.store.exists(keys.job_state_key(job_id)) or self.store.exists(
            keys.legacy_job_state_key(job_id)
        )

    def ensure_index(self) -> None:
        """Index the jobs of a store written before the index existed (once: one listing of jobs/)."""
        if self._indexed or self.store.exists(INDEX_BUILT_KEY):
            self._indexed = True
            return
        for info in self.store.list("jobs/"):
            parts = info.key.split("/")
            if len(parts) == 3 and parts[2] in ("job.binpb", "job.json"):
                job = self.load(parts[1])
                _index(self.store, job)
                if not is_terminal(job.state):
                    self.store.put_bytes(ACTIVE_PREFIX + job.job_id, b"")
        self.store.put_bytes(INDEX_BUILT_KEY, b"")
        self._indexed = True

    def entries(self, team: str | None = None) -> Iterator[tuple[str, str]]:
        """(index entry, job id) for every job (``team``: that team's only), newest submitted first; an
        entry is a stable page token."""
        self.ensure_index()
        prefix = ALL_PREFIX if team is None else _team_prefix(team)
        for info in self.store.list(prefix):
            entry = info.key[len(prefix) :]
            yield entry, entry.split("-", 1)[1]

    def ids(self) -> Iterator[str]:
        """Every job id, newest submitted first (one index object per job)."""
        for _, job_id in self.entries():
            yield job_id

    def all(self) -> Iterator[pb.Job]:
        for job_id in self.ids():
            try:
                yield self.load(job_id)
            except NotFound:
                continue  # indexed, then deleted

    def active_ids(self) -> list[str]:
        self.ensure_index()
        return [info.key[len(ACTIVE_PREFIX) :] for info in self.store.list(ACTIVE_PREFIX)]

    def unfinished(self, *, track: bool = True) -> list[pb.Job]:
        """Jobs not finished yet (from the active index), tracked for saving by default."""
        jobs = []
        for job_id in self.active_ids():
            try:
                job = self.load(job_id, track=track)
            except NotFound:
                self.store.delete(ACTIVE_PREFIX + job_id)
                continue
            if is_terminal(job.state):
                self.store.delete(ACTIVE_PREFIX + job_id)  # finished, index not yet updated
                continue
            jobs.append(job)
        return jobs
