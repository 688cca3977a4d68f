"""Runs persisted in object storage: ``runs/<run>/run.json`` holds the spec and the latest status.

The run manager is the only writer of run.json; a restarted trainer lists these records and resumes
the ones that had not finished (queued or running).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum

from dreamframe.errors import NotFound
from dreamframe.keys import run_prefix
from dreamframe.storage.base import ObjectRef, ObjectStore

from .spec import RunSpec

RUNS_ROOT = "runs/"
RECORD_NAME = "run.json"


class RunState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED)


@dataclass(frozen=True)
class RunRecord:
    """A run's spec and status. Immutable: updates make a new record (``evolve``)."""

    spec: RunSpec
    state: RunState = RunState.QUEUED
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    loss: float = 0.0
    learning_rate: float = 0.0
    tokens_per_second: float = 0.0
    eta_seconds: float = -1.0
    samples_seen: int = 0
    bad_samples: int = 0
    tokens_seen: int = 0
    checkpoint: ObjectRef | None = None
    final_model: ObjectRef | None = None
    final_model_prefix: str = ""
    metrics: ObjectRef | None = None
    error: str = ""
    # Worker launches so far (a crash relaunches from the last checkpoint until a limit).
    attempts: int = 0
    # Who started the run (a server.callers name; empty while auth is off) and its team: only that team
    # and admins see, watch and cancel it (server.py).
    submitted_by: str = ""
    team: str = ""

    @property
    def run_id(self) -> str:
        return self.spec.run_id

    def evolve(self, **changes) -> RunRecord:
        return replace(self, updated_at=time.time(), **changes)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["spec"] = self.spec.to_dict()
        data["state"] = str(self.state)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> RunRecord:
        data = dict(data)
        data["spec"] = RunSpec.from_dict(data["spec"])
        data["state"] = RunState(data["state"])
        for name in ("checkpoint", "final_model", "metrics"):
            if data.get(name):
                data[name] = ObjectRef(**data[name])
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def record_key(run_id: str) -> str:
    return f"{run_prefix(run_id)}{RECORD_NAME}"


class RunStore:
    """Load, save and list run records in one ObjectStore."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def save(self, record: RunRecord) -> ObjectRef:
        return self.store.put_json(record_key(record.run_id), record.to_dict())

    def exists(self, run_id: str) -> bool:
        return self.store.exists(record_key(run_id))

    def load(self, run_id: str) -> RunRecord:
        key = record_key(run_id)
        if not self.store.exists(key):
            raise NotFound(f"no run {run_id!r}", field="run_id")
        return RunRecord.from_dict(self.store.get_json(key))

    def list(self, job_id: str = "") -> list[RunRecord]:
        """Every stored run (oldest first), optionally only one job's."""
        records = []
        for info in self.store.list(RUNS_ROOT):
            parts = info.key.split("/")
            if len(parts) == 3 and parts[2] == RECORD_NAME:
                record = RunRecord.from_dict(self.store.get_json(info.key))
                if not job_id or record.spec.job_id == job_id:
                    records.append(record)
        return sorted(records, key=lambda r: (r.created_at, r.run_id))
