"""The run manager with real worker processes: a killed worker relaunched from its checkpoint, a
restarted manager resuming unfinished runs, cancel, failures."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from test_trainer_support import local_store, make_dataset, runtime, tiny_spec

from dreamframe.errors import AlreadyExists, NotFound
from services.trainer.checkpoint import load_latest
from services.trainer.run_store import RunState
from services.trainer.runs import RunManager
from services.trainer.spec import DatasetSource, build_spec

pytestmark = pytest.mark.slow


def manager(tmp_path, store, **kwargs) -> RunManager:
    env = {
        "DREAMFRAME_STORAGE__BACKEND": "local",
        "DREAMFRAME_STORAGE__ROOT": str(store.root),
        "DREAMFRAME_STORAGE__BUCKET": store.default_bucket,
        "DREAMFRAME_LOG__LEVEL": "WARNING",
        "OMP_NUM_THREADS": "1",
    }
    rt = kwargs.pop("runtime", None) or runtime(tmp_path)
    options = dict(poll_seconds=0.1, stop_grace_seconds=60.0, worker_env=env) | kwargs
    return RunManager(store, rt, **options)


async def until(m: RunManager, run_id: str, condition, timeout: float = 240.0):
    async def watch():
        async for record in m.watch(run_id):
            if condition(record):
                return record
        return record

    return await asyncio.wait_for(watch(), timeout)


def steps_of(store, run_id: str) -> list[int]:
    return [s["step"] for s in store.get_json(f"runs/{run_id}/metrics.json")["steps"]]


def test_killed_worker_and_restarted_manager_both_resume_from_checkpoints(tmp_path):
    store = local_store(tmp_path)
    ref = make_dataset(store, n=4)
    spec = tiny_spec("again", ref, "lora", max_steps=40, save_every_steps=5)

    async def first_life():
        m = manager(tmp_path, store)
        await m.start()
        await m.start_run(spec)
        await until(m, "again", lambda r: r.step >= 8)
        os.killpg(m._procs["again"].pid, signal.SIGKILL)  # the worker dies: relaunched from its checkpoint
        died_at = (await until(m, "again", lambda r: r.attempts == 2)).step
        await until(m, "again", lambda r: r.step >= died_at + 3)  # the new worker is past where the old died
        await m.shutdown()  # SIGTERM-time behaviour: checkpoint now, leave the run to the next manager
        return died_at

    async def second_life():
        m = manager(tmp_path, store)
        await m.start()
        assert m.get("again").state in (RunState.QUEUED, RunState.RUNNING)
        record = await until(m, "again", lambda r: r.state.terminal)
        await m.shutdown()
        return record

    died_at = asyncio.run(first_life())
    stored = store.get_json("runs/again/run.json")
    assert stored["state"] == "running" and stored["attempts"] == 2
    assert load_latest(store, "again").step == stored["step"] >= died_at + 3  # checkpointed on shutdown
    record = asyncio.run(second_life())
    assert record.state is RunState.SUCCEEDED, record.error
    assert record.attempts == 3 and record.step == 40
    # Finished: its resume checkpoints are gone from storage, and the record no longer names one.
    assert record.checkpoint is None and not list(store.list("runs/again/checkpoints/"))
    assert store.exists("runs/again/final/manifest.json")
    # The same number of optimizer steps as an uninterrupted run, none twice, none skipped.
    assert steps_of(store, "again") == list(range(1, 41))


def test_cancel_queued_and_running_runs_and_idempotent_start(tmp_path):
    store = local_store(tmp_path)
    ref = make_dataset(store, n=4)
    long = tiny_spec("long", ref, "lora", max_steps=100000)
    waiting = tiny_spec("waiting", ref, "lora")

    async def body():
        m = manager(tmp_path, store, max_concurrent_runs=1)
        await m.start()
        await m.start_run(long)
        assert (await m.start_run(long)).run_id == "long"  # same id, same request: the same run
        with pytest.raises(AlreadyExists):
            await m.start_run(tiny_spec("long", ref, "full"))
        await m.start_run(waiting)
        assert m.get("waiting").state is RunState.QUEUED
        assert (await m.cancel("waiting")).state is RunState.CANCELLED
        await until(m, "long", lambda r: r.step >= 2)
        cancelled = await m.cancel("long")
        assert [r.run_id for r in m.list()] == ["long", "waiting"]
        await m.shutdown()
        return cancelled

    record = asyncio.run(body())
    assert record.state is RunState.CANCELLED and record.step >= 2
    assert store.get_json("runs/long/run.json")["state"] == "cancelled"
    assert store.get_json("runs/waiting/run.json")["state"] == "cancelled"


def test_unusable_data_fails_the_run_with_a_clear_error(tmp_path):
    store = local_store(tmp_path)
    ref = make_dataset(store, n=3, missing=(0, 1, 2))
    spec = tiny_spec("nodata", ref)

    async def body():
        m = manager(tmp_path, store)
        await m.start()
        with pytest.raises(NotFound) as err:
            await m.start_run(
                build_spec(
                    run_id="x", datasets=[DatasetSource(key="nope.json")], base_model="tiny", method="full"
                )
            )
        assert err.value.field == "datasets[0].dataset.key"
        await m.start_run(spec)
        record = await until(m, "nodata", lambda r: r.state.terminal)
        await m.shutdown()
        return record

    record = asyncio.run(body())
    assert record.state is RunState.FAILED and record.attempts == 1
    assert "none of the 3 samples is usable" in record.error and "missing media" in record.error
