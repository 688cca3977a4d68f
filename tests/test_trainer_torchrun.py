"""A run of two CPU processes under torchrun (gloo + FSDP2), launched by the run manager: it trains,
checkpoints and exports like a one-process run."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from test_trainer_runs import manager, until
from test_trainer_support import local_store, make_dataset, runtime, tiny_spec

from services.trainer.checkpoint import load_latest
from services.trainer.run_store import RunState

pytestmark = pytest.mark.slow


def test_torchrun_two_cpu_processes_train_and_checkpoint(tmp_path):
    store = local_store(tmp_path)
    ref = make_dataset(store, n=6)
    spec = tiny_spec(
        "ddp", ref, "lora", max_steps=4, save_every_steps=2, per_device_batch_size=1, num_processes=2
    )

    async def body():
        # Checkpoints kept after success (trainer.keep_checkpoints_after_success): this test reads them.
        m = manager(tmp_path, store, runtime=replace(runtime(tmp_path), keep_checkpoints_after_success=True))
        await m.start()
        await m.start_run(spec)
        record = await until(m, "ddp", lambda r: r.state.terminal)
        await m.shutdown()
        return record

    record = asyncio.run(body())
    log = (tmp_path / "work" / "ddp" / "worker.log").read_text()
    assert record.state is RunState.SUCCEEDED, record.error + log[-3000:]
    metrics = store.get_json(record.metrics.key)
    assert metrics["schedule"]["world_size"] == 2
    assert [s["samples"] for s in metrics["steps"]] == [2, 2, 2, 2]  # one sample per process per step
    assert record.step == 4 and record.checkpoint is not None and load_latest(store, "ddp").step == 4
    step2 = "runs/ddp/checkpoints/step-00000002/"
    assert store.exists(step2 + "state/.metadata.json") and not store.exists(step2 + "state/.metadata")
    assert len(store.get_json(step2 + "rng.json")["ranks"]) == 2  # every rank's RNG state, as JSON
    assert store.exists("runs/ddp/checkpoints/step-00000002/state/__1_0.distcp")  # rank 1 wrote its shards
    assert (
        store.exists("runs/ddp/final/model.safetensors")
        and record.final_model.key == "runs/ddp/final/manifest.json"
    )
    stored = store.get_json("runs/ddp/run.json")
    assert stored["state"] == "succeeded" and stored["attempts"] == 1
