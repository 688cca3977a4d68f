"""Copying a job's results out of object storage into ``runs/<job>/`` for people to open."""

from __future__ import annotations

import os
from pathlib import Path

from dreamframe import keys
from dreamframe.storage.base import ObjectStore


def export_prefix(store: ObjectStore, prefix: str, target: Path, *, bucket: str | None = None) -> int:
    """Mirror every object under ``prefix`` into ``target`` (same relative paths); returns the count.
    Files already there with the same size are kept, so re-exporting a big job is cheap."""
    count = 0
    for info in store.list(prefix, bucket=bucket):
        rel = info.key[len(prefix) :]
        path = target / rel
        if path.exists() and path.stat().st_size == info.size:
            count += 1
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        store.get_file(info.key, path, bucket=bucket)
        count += 1
    return count


def export_job(
    store: ObjectStore, job_id: str, runs_dir: Path, *, run_id: str | None = None
) -> dict[str, Path]:
    """runs/<job>/ = the job's folder (stories, frames, storyboard) + dataset/ + model/ + report/."""
    root = runs_dir / job_id
    export_prefix(store, keys.job_prefix(job_id), root)
    where = {"job": root}
    for name, prefix in (
        ("dataset", keys.dataset_prefix(job_id)),
        ("model", keys.run_prefix(run_id or f"{job_id}-train")),
        ("report", keys.report_prefix(job_id)),
    ):
        if export_prefix(store, prefix, root / name):
            where[name] = root / name
    return where


def relative(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)
