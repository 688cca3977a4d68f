"""Checkpoints in object storage.

    runs/<run>/checkpoints/step-00000040/state/.metadata         torch.distributed.checkpoint (DCP) index
    runs/<run>/checkpoints/step-00000040/state/__<rank>_0.distcp  each rank's shards: trained weights
                                                                  (LoRA + projector, or all) + AdamW state
    runs/<run>/checkpoints/step-00000040/scheduler.pt
    runs/<run>/checkpoints/step-00000040/rng.pt                  every rank's RNG states
    runs/<run>/checkpoints/latest.json                           the committed one: step, files, trainer state

Weights and optimizer state are saved sharded: every rank writes only its own FSDP shards (no rank
gathers a 7B model's ~80 GB of fp32 weights and AdamW moments), all into the run directory the ranks of
one pod share, and rank 0 uploads the files. A run resumes with the same world size (the schedule check
in ``restore_run`` insists on it anyway, for the data order).

A checkpoint's files are uploaded first and ``latest.json`` is written last, so a crash mid-upload
leaves the previous checkpoint in charge; only then are older checkpoints beyond ``keep`` deleted.

``save_run`` and ``restore_run`` are a training run's side of it (collectives, on every rank): shards,
the scheduler and every rank's RNG state into the run directory, uploaded and committed by rank 0; and
back.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dreamframe.errors import FailedPrecondition
from dreamframe.keys import run_prefix
from dreamframe.storage.base import ObjectRef, ObjectStore

from .distributed import DistContext, barrier, gather, on_main
from .rng import rng_state, set_rng_state

LATEST = "checkpoints/latest.json"
FORMAT_VERSION = 2
# The DCP folder inside a checkpoint.
STATE_DIR = "state"


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


def _state_dicts(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    # Frozen weights (the vision tower, a LoRA base) come from the base model again, not the checkpoint.
    weights, optim = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": weights, "optimizer": optim}


def save_sharded(model, optimizer, dest: Path) -> None:
    """Every rank writes its shards of the trained weights and of the optimizer state into ``dest``
    (collective; ``dest`` is one folder all ranks see)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_state_dicts(model, optimizer), checkpoint_id=str(dest))


def load_sharded(model, optimizer, src: Path) -> None:
    """Restore what ``save_sharded`` wrote, each rank reading its own shards (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = _state_dicts(model, optimizer)
    dcp.load(state, checkpoint_id=str(src))
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(strict=False),  # frozen weights are not in it
    )


def local_files(folder: Path) -> dict[str, Path]:
    """Every file under ``folder`` by its relative posix path (a checkpoint's upload list)."""
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def save_checkpoint(
    store: ObjectStore,
    run_id: str,
    step: int,
    files: dict[str, Path],
    state: dict,
    *,
    keep: int = 2,
    remove_uploaded: bool = False,
) -> ObjectRef:
    """Upload ``files`` (name → local path) as step ``step``, commit it in latest.json, prune old ones.
    ``remove_uploaded`` deletes each local file once stored, so a large checkpoint never needs twice its
    size of local disk."""
    prefix = checkpoint_prefix(run_id, step)
    entries = {}
    for name, path in sorted(files.items()):
        ref = store.put_file(prefix + name, path)
        entries[name] = {"key": ref.key, "size": ref.size, "sha256": ref.sha256}
        if remove_uploaded:
            Path(path).unlink()
    ref = store.put_json(
        latest_key(run_id),
        {"format": FORMAT_VERSION, "step": step, "prefix": prefix, "files": entries, "state": state},
    )
    prune(store, run_id, keep=keep, current=prefix)
    return ref


def prune(store: ObjectStore, run_id: str, *, keep: int, current: str) -> None:
    """Delete all but the ``keep`` newest step folders (never the committed one)."""
    root = f"{run_prefix(run_id)}checkpoints/"
    steps = {i.key[len(root) :].split("/", 1)[0] for i in store.list(root)}
    folders = sorted(root + name + "/" for name in steps if name.startswith("step-"))
    for folder in folders[: max(0, len(folders) - max(keep, 1))]:
        if folder != current:
            store.delete_prefix(folder)


def load_latest(store: ObjectStore, run_id: str) -> Checkpoint | None:
    """The committed checkpoint's description, or None if the run has none yet."""
    key = latest_key(run_id)
    if not store.exists(key):
        return None
    data = store.get_json(key)
    if data.get("format") != FORMAT_VERSION:
        raise FailedPrecondition(
            f"checkpoint {key!r} has format {data.get('format')}, this trainer reads format "
            f"{FORMAT_VERSION}; start a new run",
            field="run_id",
        )
    return Checkpoint(data["step"], data["prefix"], data["files"], data["state"], store.stat(key))


def download(store: ObjectStore, checkpoint: Checkpoint, dest: Path) -> dict[str, Path]:
    """Fetch the checkpoint's files, each verified against the size and sha256 recorded at commit."""
    dest.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, entry in checkpoint.files.items():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        ref = store.get_file(entry["key"], dest / name)
        if ref.sha256 != entry["sha256"] or ref.size != entry["size"]:
            raise FailedPrecondition(
                f"checkpoint file {entry['key']!r} does not match its record (sha256 {ref.sha256})",
                field="run_id",
            )
        paths[name] = dest / name
    return paths


# --- a training run's checkpoints (collective) -------------------------------------------------------


def save_run(
    store: ObjectStore,
    run_id: str,
    step: int,
    *,
    model,
    optimizer,
    scheduler,
    state: Callable[[], dict],
    work_dir: Path,
    ctx: DistContext,
    keep: int,
) -> ObjectRef:
    """Checkpoint after ``step`` optimizer steps (collective): every rank writes its shards into
    ``work_dir`` (the run directory all ranks share), then rank 0 adds the scheduler, every rank's RNG
    state and the trainer's ``state()``, uploads the files and commits. Returns the commit's ref."""
    import torch

    tmp = work_dir / f"checkpoint-{step}"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(ctx)
    save_sharded(model, optimizer, tmp / STATE_DIR)
    rngs = gather(rng_state(), ctx)
    barrier(ctx)  # every rank's shards are on disk

    def write() -> ObjectRef:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rngs, tmp / "rng.pt")
        ref = save_checkpoint(store, run_id, step, local_files(tmp), state(), keep=keep, remove_uploaded=True)
        shutil.rmtree(tmp, ignore_errors=True)
        return ref

    return on_main(write, ctx)


def restore_run(
    store: ObjectStore,
    run_id: str,
    *,
    model,
    optimizer,
    scheduler,
    schedule: dict,
    work_dir: Path,
    ctx: DistContext,
) -> Checkpoint | None:
    """Restore the last committed checkpoint into model, optimizer, scheduler and this rank's RNGs
    (collective); None if the run has none. A checkpoint made under another schedule (processes, batch
    size, data) is refused: the data order would not be the same."""
    import torch

    resume_dir = work_dir / "resume"

    def fetch():
        found = load_latest(store, run_id)
        if found is None:
            return None
        shutil.rmtree(resume_dir, ignore_errors=True)
        download(store, found, resume_dir)
        return found

    found = on_main(fetch, ctx)
    if found is None:
        return None
    if found.state["schedule"] != schedule:
        raise FailedPrecondition(
            f"checkpoint at step {found.step} was made with {found.state['schedule']}, this run has "
            f"{schedule}: resume with the same processes, batch size and data",
            field="hyperparameters",
        )
    load_sharded(model, optimizer, resume_dir / STATE_DIR)
    scheduler.load_state_dict(torch.load(resume_dir / "scheduler.pt", weights_only=False))
    rngs = torch.load(resume_dir / "rng.pt", weights_only=False)
    set_rng_state(rngs[ctx.rank])
    barrier(ctx)  # every rank has read its files
    if ctx.is_main:
        shutil.rmtree(resume_dir, ignore_errors=True)
    return found
