"""Checkpoints in object storage.

    runs/<run>/checkpoints/step-00000040/state/.metadata.json    torch.distributed.checkpoint index (JSON)
    runs/<run>/checkpoints/step-00000040/state/__<rank>_0.distcp  each rank's shards: trained weights
                                                                  (LoRA + projector, or all) + AdamW state
    runs/<run>/checkpoints/step-00000040/scheduler.json          the LR scheduler's state_dict
    runs/<run>/checkpoints/step-00000040/rng.json                every rank's Python/NumPy RNG states
    runs/<run>/checkpoints/step-00000040/rng.safetensors         every rank's torch/CUDA RNG states
    runs/<run>/checkpoints/latest.json                           the committed one: step, files, trainer state

Nothing in a checkpoint is a pickle, and nothing is read as one: whoever can write the run's objects
must not be able to run code in the trainer. JSON for the index, the scheduler and the RNG states,
safetensors for RNG tensors, DCP shards read with ``torch.load(weights_only=True)`` (dcp_json.py).
Checkpoints of format 2 (pickled ``scheduler.pt``/``rng.pt`` and DCP ``.metadata``) are refused, not
read: such a run starts again under a new run id. On resume only the files named above are fetched,
each from this step's own folder and checked against latest.json's size and sha256.

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

import json
import pickle  # only for its error type: nothing here unpickles
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dreamframe.errors import FailedPrecondition
from dreamframe.keys import run_prefix
from dreamframe.storage.base import ObjectRef, ObjectStore

from .dcp_json import (
    METADATA_FILE,
    SHARD_FILE,
    JsonMetadataReader,
    JsonMetadataWriter,
    MetadataError,
    WeightsOnlyLoadPlanner,
)
from .distributed import DistContext, barrier, gather, on_main
from .rng import (
    RNG_JSON,
    RNG_TENSORS,
    RngStateError,
    load_rng_state,
    rng_state,
    save_rng_states,
    set_rng_state,
)

LATEST = "checkpoints/latest.json"
# 3: no pickle (JSON/safetensors); 2 pickled the scheduler, RNG states and DCP index.
FORMAT_VERSION = 3
# The DCP folder inside a checkpoint.
STATE_DIR = "state"
SCHEDULER_FILE = "scheduler.json"
# Every file a checkpoint may hold; resume fetches nothing else.
_FILE_RE = re.compile(
    rf"^(?:{re.escape(SCHEDULER_FILE)}|{re.escape(RNG_JSON)}|{re.escape(RNG_TENSORS)}"
    rf"|{STATE_DIR}/{re.escape(METADATA_FILE)}|{STATE_DIR}/{SHARD_FILE.pattern[1:-1]})$"
)


def checkpoints_root(run_id: str) -> str:
    """Where all of a run's checkpoints (and ``latest.json``) are."""
    return f"{run_prefix(run_id)}checkpoints/"


def checkpoint_prefix(run_id: str, step: int) -> str:
    return f"{checkpoints_root(run_id)}step-{step:08d}/"


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

    dcp.save(_state_dicts(model, optimizer), storage_writer=JsonMetadataWriter(dest))


def load_sharded(model, optimizer, src: Path) -> None:
    """Restore what ``save_sharded`` wrote, each rank reading its own shards (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = _state_dicts(model, optimizer)
    try:
        JsonMetadataReader(src).read_metadata()  # a bad index fails here, before DCP wraps the error
        dcp.load(state, storage_reader=JsonMetadataReader(src), planner=WeightsOnlyLoadPlanner())
    except MetadataError as exc:
        raise FailedPrecondition(f"checkpoint state refused: {exc}", field="run_id") from None
    except CheckpointException as exc:  # DCP's wrapper of each rank's error
        first = next(iter(exc.failures.values()))[0] if exc.failures else exc
        what = (
            "a shard holds more than tensors and plain values"
            if isinstance(first, pickle.UnpicklingError)
            else f"{type(first).__name__}: {str(first)[:200]}"
        )
        raise FailedPrecondition(f"checkpoint state refused: {what}", field="run_id") from None
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
    """Store ``files`` (name → local path) as step ``step``, commit it in latest.json, prune old ones.
    ``remove_uploaded`` hands each local file over to the store (moved, not copied, into a local store
    on the same disk), so a large checkpoint never needs twice its size of local disk."""
    prefix = checkpoint_prefix(run_id, step)
    entries = {}
    store_file = store.move_file if remove_uploaded else store.put_file
    for name, path in sorted(files.items()):
        ref = store_file(prefix + name, path)
        entries[name] = {"key": ref.key, "size": ref.size, "sha256": ref.sha256}
    ref = store.put_json(
        latest_key(run_id),
        {"format": FORMAT_VERSION, "step": step, "prefix": prefix, "files": entries, "state": state},
    )
    prune(store, run_id, keep=keep, current=prefix)
    return ref


def prune(store: ObjectStore, run_id: str, *, keep: int, current: str) -> None:
    """Delete all but the ``keep`` newest step folders (never the committed one)."""
    root = checkpoints_root(run_id)
    steps = {i.key[len(root) :].split("/", 1)[0] for i in store.list(root)}
    folders = sorted(root + name + "/" for name in steps if name.startswith("step-"))
    for folder in folders[: max(0, len(folders) - max(keep, 1))]:
        if folder != current:
            store.delete_prefix(folder)


def drop_checkpoints(store: ObjectStore, run_id: str) -> None:
    """Delete the run's resume checkpoints: the commit first, so an interrupted delete leaves no
    latest.json naming missing files (a relaunch then starts over instead of failing to resume)."""
    store.delete(latest_key(run_id))
    store.delete_prefix(checkpoints_root(run_id))


def load_latest(store: ObjectStore, run_id: str) -> Checkpoint | None:
    """The committed checkpoint's description, or None if the run has none yet."""
    key = latest_key(run_id)
    if not store.exists(key):
        return None
    try:
        data = store.get_json(key)
    except ValueError:
        raise FailedPrecondition(f"checkpoint {key!r} refused: not JSON", field="run_id") from None
    found = data.get("format") if isinstance(data, dict) else None
    if found != FORMAT_VERSION:
        raise FailedPrecondition(
            f"checkpoint {key!r} has format {str(found)[:20]}, this trainer reads format {FORMAT_VERSION} "
            "only (format 2 held pickles, which are never loaded); start a new run",
            field="run_id",
        )
    return _checked(run_id, data, store.stat(key))


def _checked(run_id: str, data: dict, ref: ObjectRef) -> Checkpoint:
    """latest.json is storage data like any other: its step folder must be this run's, and it may name
    only checkpoint files (no path of its choosing on this machine, no object elsewhere)."""

    def refuse(what: str) -> FailedPrecondition:
        return FailedPrecondition(f"checkpoint {ref.key!r} refused: {what}", field="run_id")

    step, files, state = data.get("step"), data.get("files"), data.get("state")
    if type(step) is not int or step < 0 or not isinstance(files, dict) or not isinstance(state, dict):
        raise refuse("step, files and state are malformed")
    prefix = checkpoint_prefix(run_id, step)
    if data.get("prefix") != prefix:
        raise refuse(f"its folder is not {prefix!r}")
    for name, entry in files.items():
        if not _FILE_RE.match(name):
            raise refuse(f"{name[:80]!r} is not a checkpoint file")
        if not isinstance(entry, dict) or entry.get("key") != prefix + name:
            raise refuse(f"{name!r} is not stored in the checkpoint's folder")
    return Checkpoint(step, prefix, files, state, ref)


def download(store: ObjectStore, checkpoint: Checkpoint, dest: Path) -> dict[str, Path]:
    """Fetch the checkpoint's files, each verified against the size and sha256 recorded at commit."""
    dest.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, entry in checkpoint.files.items():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        ref = store.get_readonly_file(entry["key"], dest / name)
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

    tmp = work_dir / f"checkpoint-{step}"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(ctx)
    save_sharded(model, optimizer, tmp / STATE_DIR)
    rngs = gather(rng_state(), ctx)
    barrier(ctx)  # every rank's shards are on disk

    def write() -> ObjectRef:
        # allow_nan=False: plain JSON (a scheduler's state never holds NaN or infinities).
        (tmp / SCHEDULER_FILE).write_text(json.dumps(scheduler.state_dict(), allow_nan=False))
        save_rng_states(rngs, tmp)
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
    if found.state.get("schedule") != schedule:
        raise FailedPrecondition(
            f"checkpoint at step {found.step} was made with {str(found.state.get('schedule'))[:300]}, "
            f"this run has {schedule}: resume with the same processes, batch size and data",
            field="hyperparameters",
        )
    load_sharded(model, optimizer, resume_dir / STATE_DIR)
    load_scheduler(scheduler, resume_dir / SCHEDULER_FILE)
    try:
        rng = load_rng_state(resume_dir, ctx.rank)
    except RngStateError as exc:
        raise FailedPrecondition(f"checkpoint at step {found.step} refused: {exc}", field="run_id") from None
    set_rng_state(rng)
    barrier(ctx)  # every rank has read its files
    if ctx.is_main:
        shutil.rmtree(resume_dir, ignore_errors=True)
    return found


def load_scheduler(scheduler, path: Path) -> None:
    """The scheduler's state from JSON, accepted only with exactly the keys and value types of this
    scheduler's own state (a LambdaLR copies ``lr_lambdas`` entries into its functions' ``__dict__``)."""
    current = json.loads(json.dumps(scheduler.state_dict()))
    try:
        saved = json.loads(path.read_bytes())
    except (OSError, ValueError):
        saved = None
    if not _same_shape(saved, current) or saved["lr_lambdas"] != current["lr_lambdas"]:
        raise FailedPrecondition(
            f"checkpoint refused: {SCHEDULER_FILE} is missing or not this learning-rate scheduler's state",
            field="run_id",
        )
    scheduler.load_state_dict(saved)


def _same_shape(value: object, like: object) -> bool:
    """``value`` has ``like``'s JSON structure: the same keys, list lengths and scalar types."""
    if isinstance(like, dict):
        return (
            isinstance(value, dict)
            and value.keys() == like.keys()
            and all(_same_shape(value[k], like[k]) for k in like)
        )
    if isinstance(like, list):
        return isinstance(value, list) and len(value) == len(like) and all(map(_same_shape, value, like))
    if isinstance(like, bool) or like is None:
        return type(value) is type(like)
    if isinstance(like, int | float):
        return type(value) in (int, float)
    return type(value) is type(like)
