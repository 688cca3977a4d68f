"""Checkpoints in object storage.

    runs/<run>/checkpoints/step-00000040/trainable.safetensors   trained weights (LoRA + projector, or all)
    runs/<run>/checkpoints/step-00000040/optimizer.pt            full (unsharded) AdamW state
    runs/<run>/checkpoints/step-00000040/scheduler.pt
    runs/<run>/checkpoints/step-00000040/rng.pt                  every rank's RNG states
    runs/<run>/checkpoints/latest.json                           the committed one: step, files, trainer state

A checkpoint's files are uploaded first and ``latest.json`` is written last, so a crash mid-upload
leaves the previous checkpoint in charge; only then are older checkpoints beyond ``keep`` deleted.
Full state dicts (not sharded ones) keep a checkpoint loadable with any number of processes.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path

from dreamframe.errors import FailedPrecondition
from dreamframe.keys import run_prefix
from dreamframe.storage.base import ObjectRef, ObjectStore

LATEST = "checkpoints/latest.json"
FORMAT_VERSION = 1


def checkpoint_prefix(run_id: str, step: int) -> str:
    return f"{run_prefix(run_id)}checkpoints/step-{step:08d}/"


def latest_key(run_id: str) -> str:
    return f"{run_prefix(run_id)}{LATEST}"


@dataclass
class Checkpoint:
    step: int
    prefix: str
    files: dict[str, dict]
    state: dict
    ref: ObjectRef | None = None


def save_checkpoint(
    store: ObjectStore, run_id: str, step: int, files: dict[str, Path], state: dict, *, keep: int = 2
) -> ObjectRef:
    """Upload ``files`` (name → local path) as step ``step``, commit it in latest.json, prune old ones."""
    prefix = checkpoint_prefix(run_id, step)
    entries = {}
    for name, path in sorted(files.items()):
        ref = store.put_file(prefix + name, path)
        entries[name] = {"key": ref.key, "size": ref.size, "sha256": ref.sha256}
    ref = store.put_json(
        latest_key(run_id),
        {"format": FORMAT_VERSION, "step": step, "prefix": prefix, "files": entries, "state": state},
    )
    prune(store, run_id, keep=keep, current=prefix)
    return ref


def prune(store: ObjectStore, run_id: str, *, keep: int, current: str) -> None:
    """Delete all but the ``keep`` newest step folders (never the committed one)."""
    root = f"{run_prefix(run_id)}checkpoints/"
    folders = sorted({posixpath.dirname(i.key) + "/" for i in store.list(root) if "/step-" in i.key})
    for folder in folders[: max(0, len(folders) - max(keep, 1))]:
        if folder != current:
            store.delete_prefix(folder)


def load_latest(store: ObjectStore, run_id: str) -> Checkpoint | None:
    """The committed checkpoint's description, or None if the run has none yet."""
    key = latest_key(run_id)
    if not store.exists(key):
        return None
    data = store.get_json(key)
    return Checkpoint(data["step"], data["prefix"], data["files"], data["state"], store.stat(key))


def download(store: ObjectStore, checkpoint: Checkpoint, dest: Path) -> dict[str, Path]:
    """Fetch the checkpoint's files, each verified against the size and sha256 recorded at commit."""
    dest.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, entry in checkpoint.files.items():
        ref = store.get_file(entry["key"], dest / name)
        if ref.sha256 != entry["sha256"] or ref.size != entry["size"]:
            raise FailedPrecondition(
                f"checkpoint file {entry['key']!r} does not match its record (sha256 {ref.sha256})",
                field="run_id",
            )
        paths[name] = dest / name
    return paths
