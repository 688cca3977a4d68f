"""No pickle on anything storage holds (issue 19): whoever can write a run's objects must not be able to
run code in the trainer.

A real tiny run is checkpointed, then a malicious pickle (its ``__reduce__`` creates a marker file) is
planted at every file the committed checkpoint lists and at latest.json itself, latest.json's sizes and
hashes are rewritten to match (as an attacker with bucket write access would), and the run is resumed
through ``run_training``: each time the resume is refused with FAILED_PRECONDITION naming run_id, and
the marker never appears. The same for a checkpoint in the old format (pickled scheduler.pt, rng.pt and
DCP .metadata), which this trainer refuses rather than reads.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
from test_trainer_support import make_dataset, runtime, tiny_spec

from dreamframe.errors import FailedPrecondition
from dreamframe.storage import LocalStore
from services.trainer.checkpoint import latest_key, load_latest
from services.trainer.training import Hooks, run_training

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = "victim"
HP = dict(max_steps=4, save_every_steps=2, lora_dropout=0.1)


class Planted:
    """Unpickling this runs ``open(marker, "a")``: the file appearing means code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.marker, "a"))


def payload(marker: Path) -> bytes:
    return pickle.dumps(Planted(marker), protocol=2)


def test_the_payload_really_runs_code_when_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    pickle.loads(payload(marker)).close()
    assert marker.exists()


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding run ``victim`` killed after its step-2 checkpoint (the folder to copy)."""
    base = tmp_path_factory.mktemp("planted")
    store = LocalStore(base / "store", "dreamframe")
    ref = make_dataset(store, n=4)

    def die_at_step_3(progress):  # noqa: ANN001, ANN202
        if progress.step == 3:
            raise Killed

    with pytest.raises(Killed):
        run_training(
            tiny_spec(RUN, ref, "lora", **HP), store, runtime(base), Hooks(on_progress=die_at_step_3)
        )
    assert load_latest(store, RUN).step == 2
    return base


def copy_of(checkpointed: Path, tmp_path: Path) -> tuple[LocalStore, Path]:
    shutil.copytree(checkpointed / "store", tmp_path / "store")
    return LocalStore(tmp_path / "store", "dreamframe"), tmp_path


def resume(store: LocalStore, base: Path) -> FailedPrecondition:
    spec = tiny_spec(RUN, store.stat("datasets/toy/conversations/train.json"), "lora", **HP)
    with pytest.raises(FailedPrecondition) as err:
        run_training(spec, store, runtime(base))
    return err.value


def plant(store: LocalStore, key: str, data: bytes) -> None:
    """Replace ``key`` and make latest.json vouch for it (size and sha256), as an attacker would."""
    if key == latest_key(RUN):
        store.put_bytes(key, data)
        return
    latest = store.get_json(latest_key(RUN))
    store.put_bytes(key, data)
    for entry in latest["files"].values():
        if entry["key"] == key:
            entry.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    store.put_json(latest_key(RUN), latest)


def test_a_pickle_at_any_checkpoint_file_is_refused_and_never_runs(
    checkpointed: Path, tmp_path: Path
) -> None:
    store = LocalStore(checkpointed / "store", "dreamframe")
    latest = store.get_json(latest_key(RUN))
    targets = [entry["key"] for entry in latest["files"].values()] + [latest_key(RUN)]
    assert len(targets) >= 5, targets  # index, shards, scheduler, RNG states, latest.json
    for n, key in enumerate(targets):
        work = tmp_path / f"attempt-{n}"
        store_n, base = copy_of(checkpointed, work)
        marker = tmp_path / f"marker-{n}"
        plant(store_n, key, payload(marker))
        if key.endswith(".distcp"):
            # Point every read of the shards at the pickle's first byte, so each is unpickled from its start.
            index_key = key.rsplit("/", 1)[0] + "/.metadata.json"
            index = store_n.get_json(index_key)
            for item in index["storage"]:
                item.update(file=key.rsplit("/", 1)[1], start=0, length=len(payload(marker)))
            plant(store_n, index_key, json.dumps(index).encode())
        error = resume(store_n, base)
        assert error.field == "run_id", (key, error)
        assert "refused" in error.message, (key, error.message)
        assert not marker.exists(), f"code ran from a pickle planted at {key}"


def test_an_old_checkpoint_with_pickled_files_is_refused_unread(checkpointed: Path, tmp_path: Path) -> None:
    """Format 2 kept scheduler.pt, rng.pt (torch.load(weights_only=False)) and DCP's pickled .metadata."""
    store, base = copy_of(checkpointed, tmp_path / "work")
    marker = tmp_path / "marker"
    latest = store.get_json(latest_key(RUN))
    prefix = latest["prefix"]
    files = {}
    for name in ("scheduler.pt", "rng.pt", "state/.metadata"):
        ref = store.put_bytes(prefix + name, payload(marker))
        files[name] = {"key": ref.key, "size": ref.size, "sha256": ref.sha256}
    latest.update(format=2, files=files | {k: v for k, v in latest["files"].items() if k.endswith(".distcp")})
    store.put_json(latest_key(RUN), latest)

    error = resume(store, base)
    assert error.field == "run_id"
    assert "format 2" in error.message and "start a new run" in error.message
    assert not marker.exists()


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../../../outside.json", "is not a checkpoint file"),
        ("state/.metadata", "is not a checkpoint file"),  # DCP's pickled index: never fetched
        ("scheduler.pt", "is not a checkpoint file"),
    ],
)
def test_latest_json_names_only_checkpoint_files(
    checkpointed: Path, tmp_path: Path, name: str, why: str
) -> None:
    store, base = copy_of(checkpointed, tmp_path / "work")
    latest = store.get_json(latest_key(RUN))
    ref = store.put_bytes(latest["prefix"] + "x", payload(tmp_path / "marker"))
    latest["files"][name] = {"key": ref.key, "size": ref.size, "sha256": ref.sha256}
    store.put_json(latest_key(RUN), latest)
    error = resume(store, base)
    assert why in error.message and error.field == "run_id"
    assert not (tmp_path / "marker").exists()
    assert not (tmp_path / "outside.json").exists() and not (base / "outside.json").exists()
