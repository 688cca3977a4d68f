"""TrainService over gRPC: a thin adapter over ``runs.RunManager``.

Request → validated RunSpec (``spec.build_spec`` names any bad field) → manager → RunStatus.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from dreamframe.config import Settings
from dreamframe.errors import AlreadyExists, InvalidArgument, NotFound
from dreamframe.serving import Registration, current_caller, run_service, serve
from dreamframe.serving.auth import may_see, owner
from dreamframe.serving.readiness import StorageReadiness
from dreamframe.storage import open_store, to_proto
from dreamframe.v1 import train_pb2 as pb
from dreamframe.v1 import train_pb2_grpc

from .contract import Runtime
from .run_store import RunRecord, RunState
from .runs import RunManager
from .spec import DatasetSource, Method, RunSpec, build_spec, new_run_id

SERVICE = "trainer"

_METHODS = {pb.TRAIN_METHOD_FULL: Method.FULL, pb.TRAIN_METHOD_LORA: Method.LORA}
_METHOD_TO_PROTO = {v: k for k, v in _METHODS.items()}
_STATES = {
    RunState.QUEUED: pb.RUN_STATE_QUEUED,
    RunState.RUNNING: pb.RUN_STATE_RUNNING,
    RunState.SUCCEEDED: pb.RUN_STATE_SUCCEEDED,
    RunState.FAILED: pb.RUN_STATE_FAILED,
    RunState.CANCELLED: pb.RUN_STATE_CANCELLED,
}


# --- proto ↔ domain --------------------------------------------------------------------------------


def _float32(value: float) -> float:
    """proto floats are 32-bit: 2e-5 arrives as 1.9999999e-05; keep the digits the caller wrote."""
    return float(f"{value:.7g}")


def hyperparameters_from_proto(msg: pb.TrainHyperparameters) -> dict:
    values = {}
    for fd in msg.DESCRIPTOR.fields:
        value = getattr(msg, fd.name)
        values[fd.name] = _float32(value) if fd.type == fd.TYPE_FLOAT else value
    return values


def spec_from_request(request: pb.StartRunRequest, default_base_model: str) -> RunSpec:
    datasets = [
        DatasetSource(
            key=mix.dataset.key,
            bucket=mix.dataset.bucket,
            size=mix.dataset.size,
            sha256=mix.dataset.sha256,
            weight=_float32(mix.weight),
        )
        for mix in request.datasets
    ]
    if request.method == pb.TRAIN_METHOD_UNSPECIFIED:
        method = None
    elif request.method in _METHODS:
        method = _METHODS[request.method]
    else:
        raise InvalidArgument(f"unknown method {request.method}", field="method")
    return build_spec(
        run_id=request.run_id or new_run_id(),
        job_id=request.job_id,
        datasets=datasets,
        base_model=request.base_model or default_base_model,
        method=method,
        hyperparameters=hyperparameters_from_proto(request.hyperparameters),
    )


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def status_to_proto(record: RunRecord) -> pb.RunStatus:
    msg = pb.RunStatus(
        run_id=record.run_id,
        job_id=record.spec.job_id,
        state=_STATES[record.state],
        step=record.step,
        total_steps=record.total_steps,
        epoch=record.epoch,
        loss=record.loss,
        learning_rate=record.learning_rate,
        tokens_per_second=record.tokens_per_second,
        eta_seconds=record.eta_seconds,
        samples_seen=record.samples_seen,
        bad_samples=record.bad_samples,
        tokens_seen=record.tokens_seen,
        error=record.error,
        created_at=_timestamp(record.created_at),
        updated_at=_timestamp(record.updated_at),
        final_model_prefix=record.final_model_prefix,
        base_model=record.spec.base_model,
        method=_METHOD_TO_PROTO[record.spec.method],
    )
    for name in ("checkpoint", "final_model", "metrics"):
        ref = getattr(record, name)
        if ref is not None:
            getattr(msg, name).CopyFrom(to_proto(ref))
    return msg


# --- servicer --------------------------------------------------------------------------------------


def _visible(record: RunRecord) -> RunRecord:
    """The run if the caller's team owns it (or the caller is an admin); otherwise exactly what an
    unknown run id gets (run_store.RunStore.load), so another team cannot learn that it exists."""
    if not may_see(current_caller(), record.team):
        raise NotFound(f"no run {record.run_id!r}", field="run_id")
    return record


class TrainServicer(train_pb2_grpc.TrainServiceServicer):
    """Runs belong to the team of the caller that started them (the coordinator's own identity for the
    runs of its jobs); the role each RPC needs is checked before (dreamframe.serving.auth)."""

    def __init__(self, manager: RunManager, default_base_model: str = "tiny") -> None:
        self.manager = manager
        self.default_base_model = default_base_model

    async def StartRun(self, request, context):
        spec = spec_from_request(request, self.default_base_model)
        caller = current_caller()
        record = await self.manager.start_run(spec, **owner(caller))
        if not may_see(caller, record.team):  # another team's run id: taken, nothing more
            raise AlreadyExists("is taken; choose another run id (or none)", field="run_id")
        return pb.StartRunResponse(run_id=record.run_id)

    async def GetRun(self, request, context):
        record = _visible(await asyncio.to_thread(self.manager.get, request.run_id))
        return pb.GetRunResponse(run=status_to_proto(record))

    async def ListRuns(self, request, context):
        caller = current_caller()
        records = [r for r in self.manager.list(request.job_id) if may_see(caller, r.team)]
        return pb.ListRunsResponse(runs=[status_to_proto(r) for r in records])

    async def WatchRun(self, request, context):
        async for record in self.manager.watch(request.run_id):
            yield pb.WatchRunResponse(run=status_to_proto(_visible(record)))

    async def CancelRun(self, request, context):
        _visible(await asyncio.to_thread(self.manager.get, request.run_id))  # before cancelling anything
        record = await self.manager.cancel(request.run_id)
        return pb.CancelRunResponse(run=status_to_proto(record))


def build_manager(settings: Settings, *, worker_env: dict[str, str] | None = None) -> RunManager:
    trainer = settings.trainer
    runtime = Runtime(
        work_dir=Path(trainer.work_dir).absolute(),
        model_cache_dir=Path(settings.models.cache_dir).absolute(),
        model_paths=dict(trainer.model_paths),
        device=trainer.device,
        precision=trainer.precision,
        keep_checkpoints=trainer.keep_checkpoints,
        keep_checkpoints_after_success=trainer.keep_checkpoints_after_success,
        compile=trainer.compile,
        checkpointing_on_oom=trainer.checkpointing_on_oom,
        check_free_disk=trainer.check_free_disk,
        work_dir_size_limit=trainer.work_dir_size_limit,
    )
    return RunManager(
        open_store(settings.storage),
        runtime,
        max_concurrent_runs=trainer.max_concurrent_runs,
        max_attempts=trainer.max_attempts,
        stop_grace_seconds=trainer.stop_grace_seconds,
        worker_env=worker_env,
    )


def registration(manager: RunManager, settings: Settings) -> Registration:
    return Registration.of(
        pb, train_pb2_grpc.add_TrainServiceServicer_to_server, TrainServicer(manager, settings.trainer.preset)
    )


async def amain(settings: Settings) -> None:
    manager = build_manager(settings)

    # Runs live in storage: it must answer, and stored runs must have been picked up.
    ready = StorageReadiness(manager.store, "runs/", lambda: manager.ready)
    await manager.start()
    try:
        await serve(
            [registration(manager, settings)],
            settings.server,
            service_name=SERVICE,
            readiness=ready,
            shutdown_hooks=[manager.shutdown],
        )
    finally:
        await manager.shutdown(grace_seconds=10.0)
        manager.store.close()


def main() -> None:
    run_service(amain)


if __name__ == "__main__":
    main()
