"""The run manager: starts, watches, cancels and resumes training runs (transport-free; the gRPC
servicer is a thin adapter over it).

Each run trains in its own worker process group (``services.trainer.worker``; torchrun when it asks for
several processes), so a crash or out-of-memory in training never takes the service down, cancelling
can always end it, and GPU memory is returned when it ends. The manager is the only writer of the run
records in storage. Unfinished runs (queued or running) are picked up again when a manager starts, and
resume from their last checkpoint; a worker that dies without a result is relaunched the same way, up to
``max_attempts`` launches.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path

from dreamframe.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from dreamframe.logging import get_logger
from dreamframe.processes import pid_alive
from dreamframe.storage.base import ObjectRef, ObjectStore, validate_bucket

from .contract import Runtime
from .run_store import RunRecord, RunState, RunStore
from .spec import RunSpec
from .worker import CONTROL, LAUNCH, PROGRESS, RESULT, read_json, write_json_atomic

log = get_logger(__name__)
PID_FILE = "worker.pid"
LOG_FILE = "worker.log"


def _ref(value: dict | None) -> ObjectRef | None:
    return ObjectRef(**value) if value else None


class RunManager:
    def __init__(
        self,
        store: ObjectStore,
        runtime: Runtime,
        *,
        max_concurrent_runs: int = 1,
        max_attempts: int = 3,
        stop_grace_seconds: float = 60.0,
        poll_seconds: float = 0.5,
        persist_seconds: float = 5.0,
        worker_env: dict[str, str] | None = None,
        python: str = sys.executable,
    ) -> None:
        self.store = store
        self.runs = RunStore(store)
        self.runtime = runtime
        self.max_concurrent_runs = max_concurrent_runs
        self.max_attempts = max_attempts
        self.stop_grace_seconds = stop_grace_seconds
        self.poll_seconds = poll_seconds
        self.persist_seconds = persist_seconds
        self.worker_env = dict(worker_env or {})
        self.python = python
        self._records: dict[str, RunRecord] = {}
        self._queue: list[str] = []
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._stopping: dict[str, str] = {}  # run id → "cancel" | "shutdown"
        self._versions: dict[str, int] = {}
        self._changed = asyncio.Condition()
        self._lock = asyncio.Lock()
        self._started = False
        self._closing = False

    # --- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load stored runs and queue the unfinished ones again (they resume from their checkpoints)."""
        records = await asyncio.to_thread(self.runs.list)
        async with self._lock:
            for record in records:
                self._records[record.run_id] = record
                if not record.state.terminal:
                    await self._wait_stale_worker(record.run_id)
                    self._records[record.run_id] = record.evolve(state=RunState.QUEUED)
                    self._queue.append(record.run_id)
                    log.info("resuming unfinished run", run_id=record.run_id, step=record.step)
            self._started = True
            await self._pump()

    @property
    def ready(self) -> bool:
        return self._started and not self._closing

    async def shutdown(self, grace_seconds: float | None = None) -> None:
        """Stop taking work; ask running workers to checkpoint and exit (their runs stay unfinished, so
        the next manager resumes them); kill the ones that outlast the grace period."""
        self._closing = True
        grace = self.stop_grace_seconds if grace_seconds is None else grace_seconds
        running = list(self._procs)
        for run_id in running:
            self._request_stop(run_id, "shutdown")
        await self._wait_for_exit(running, grace)
        tasks = list(self._tasks.values())
        if tasks:
            # The monitors record how their workers ended; give them a moment, then stop waiting.
            await asyncio.wait(tasks, timeout=30.0)
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for record in list(self._records.values()):
            if not record.state.terminal:
                await asyncio.to_thread(self.runs.save, record)
        async with self._changed:
            self._changed.notify_all()  # watchers of unfinished runs learn the service is going away

    # --- API ---------------------------------------------------------------------------------------

    async def start_run(self, spec: RunSpec, *, submitted_by: str = "", team: str = "") -> RunRecord:
        """Persist and queue a new run; the same run id again returns the existing run (if its spec is
        the same: AlreadyExists otherwise). ``submitted_by``/``team``: the caller, kept in the record."""
        if not self.ready:
            raise Unavailable("the trainer is not accepting runs (starting or shutting down)")
        async with self._lock:
            existing = self._records.get(spec.run_id)
            if existing is None and await asyncio.to_thread(self.runs.exists, spec.run_id):
                existing = await asyncio.to_thread(self.runs.load, spec.run_id)
                self._records[spec.run_id] = existing
            if existing is not None:
                if existing.spec != spec:
                    raise AlreadyExists(
                        f"run {spec.run_id!r} exists with a different request", field="run_id"
                    )
                return existing
            await asyncio.to_thread(self._check_request, spec)
            record = RunRecord(spec=spec, submitted_by=submitted_by, team=team)
            await asyncio.to_thread(self.runs.save, record)
            self._records[spec.run_id] = record
            self._queue.append(spec.run_id)
            await self._notify(spec.run_id)
            await self._pump()
            return self._records[spec.run_id]

    def _check_request(self, spec: RunSpec) -> None:
        """What can be checked before queueing: the datasets exist (and match their sha256), and the
        processes asked for have GPUs (on CPUs any number runs, over gloo)."""
        import torch

        wanted = spec.hyperparameters.num_processes
        gpus = torch.cuda.device_count() if self.runtime.device in ("auto", "cuda") else 0
        if gpus and wanted > gpus:
            raise InvalidArgument(
                f"{wanted} processes asked for, this trainer has {gpus} GPUs",
                field="hyperparameters.num_processes",
            )
        for i, source in enumerate(spec.datasets):
            bucket = source.bucket or None
            if bucket:
                validate_bucket(
                    bucket, field=f"datasets[{i}].dataset.bucket", allowed=self.store.allowed_buckets
                )
            if not self.store.exists(source.key, bucket=bucket):
                raise NotFound(f"no dataset object {source.key!r}", field=f"datasets[{i}].dataset.key")
            if source.sha256 and self.store.sha256(source.key, bucket=bucket) != source.sha256:
                raise FailedPrecondition(
                    f"{source.key!r} does not have the sha256 the request gives",
                    field=f"datasets[{i}].dataset.sha256",
                )

    def get(self, run_id: str) -> RunRecord:
        record = self._records.get(run_id)
        if record is None:
            record = self.runs.load(run_id)  # NotFound naming run_id
        return record

    def list(self, job_id: str = "") -> list[RunRecord]:
        records = [r for r in self._records.values() if not job_id or r.spec.job_id == job_id]
        return sorted(records, key=lambda r: (r.created_at, r.run_id))

    async def watch(self, run_id: str) -> AsyncIterator[RunRecord]:
        """The run's record now and after every change, until it ends (the last one is terminal)."""
        record = self.get(run_id)
        seen = self._versions.get(run_id, 0)
        yield record
        while not record.state.terminal:
            async with self._changed:
                await self._changed.wait_for(functools.partial(self._moved_on, run_id, seen))
            if self._closing and self._versions.get(run_id, 0) == seen:
                raise Unavailable(
                    "the trainer is shutting down; the run resumes when it is back", field="run_id"
                )
            seen = self._versions.get(run_id, 0)
            record = self._records[run_id]
            yield record

    def _moved_on(self, run_id: str, seen: int) -> bool:
        return self._versions.get(run_id, 0) != seen or self._closing

    async def cancel(self, run_id: str) -> RunRecord:
        """Cancel a queued or running run (a finished one is returned as it is)."""
        record = self.get(run_id)
        if record.state.terminal:
            return record
        async with self._lock:
            if run_id in self._queue:
                self._queue.remove(run_id)
                return await self._set(run_id, persist=True, state=RunState.CANCELLED, eta_seconds=-1.0)
        self._request_stop(run_id, "cancel")
        await self._wait_for_exit([run_id], self.stop_grace_seconds)
        task = self._tasks.get(run_id)
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return self._records[run_id]

    # --- internals ---------------------------------------------------------------------------------

    def run_dir(self, run_id: str) -> Path:
        return Path(self.runtime.work_dir) / run_id

    async def _notify(self, run_id: str) -> None:
        async with self._changed:
            self._versions[run_id] = self._versions.get(run_id, 0) + 1
            self._changed.notify_all()

    async def _set(self, run_id: str, *, persist: bool = False, **changes) -> RunRecord:
        """Update the run's record (stored first when ``persist``), then wake its watchers."""
        record = self._records[run_id] = self._records[run_id].evolve(**changes)
        if persist:
            await asyncio.to_thread(self.runs.save, record)
        await self._notify(run_id)
        return record

    async def _pump(self) -> None:
        """Launch queued runs while there is room (call with the lock held)."""
        while self._queue and len(self._procs) < self.max_concurrent_runs and not self._closing:
            run_id = self._queue.pop(0)
            try:
                await self._launch(run_id)
            except Exception as exc:  # noqa: BLE001 - a run that cannot start fails, the service goes on
                log.exception("cannot launch run", run_id=run_id)
                await self._set(
                    run_id, persist=True, state=RunState.FAILED, error=f"cannot start the worker: {exc}"
                )

    def _command(self, record: RunRecord, run_dir: Path) -> list[str]:
        n = record.spec.hyperparameters.num_processes
        worker = ["-m", "services.trainer.worker", "--run-dir", str(run_dir)]
        if n > 1:
            return [
                self.python,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={n}",
                *worker,
            ]
        return [self.python, *worker]

    async def _launch(self, run_id: str) -> None:
        record = self._records[run_id]
        run_dir = self.run_dir(run_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        for name in (CONTROL, RESULT, PROGRESS):
            (run_dir / name).unlink(missing_ok=True)
        runtime = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.runtime).items()}
        write_json_atomic(
            run_dir / LAUNCH, {"spec": record.spec.to_dict(), "runtime": runtime, "manager_pid": os.getpid()}
        )
        env = {**os.environ, **self.worker_env, "PYTHONUNBUFFERED": "1"}
        with open(run_dir / LOG_FILE, "ab") as logfile:
            proc = await asyncio.create_subprocess_exec(
                *self._command(record, run_dir),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logfile,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: stop signals reach every rank
            )
        (run_dir / PID_FILE).write_text(str(proc.pid))
        self._procs[run_id] = proc
        await self._set(run_id, persist=True, state=RunState.RUNNING, attempts=record.attempts + 1, error="")
        self._tasks[run_id] = asyncio.create_task(self._monitor(run_id, proc), name=f"run-{run_id}")
        log.info("run started", run_id=run_id, pid=proc.pid, attempt=record.attempts + 1)

    async def _monitor(self, run_id: str, proc: asyncio.subprocess.Process) -> None:
        run_dir = self.run_dir(run_id)
        last_persist = asyncio.get_running_loop().time()
        last_checkpoint = self._records[run_id].checkpoint
        try:
            while True:
                try:
                    await asyncio.wait_for(proc.wait(), self.poll_seconds)
                except TimeoutError:
                    pass
                progress = read_json(run_dir / PROGRESS)
                if progress:
                    record = await self._apply_progress(run_id, progress)
                    now = asyncio.get_running_loop().time()
                    if record.checkpoint != last_checkpoint or now - last_persist >= self.persist_seconds:
                        await asyncio.to_thread(self.runs.save, record)
                        last_persist, last_checkpoint = now, record.checkpoint
                if proc.returncode is not None:
                    break
            await self._finish(run_id, proc.returncode)
        finally:
            self._procs.pop(run_id, None)
            self._tasks.pop(run_id, None)
            (run_dir / PID_FILE).unlink(missing_ok=True)
            if not self._closing:
                async with self._lock:
                    await self._pump()

    async def _apply_progress(self, run_id: str, p: dict) -> RunRecord:
        current = self._records[run_id]
        changes = {
            "step": p["step"],
            "total_steps": p["total_steps"],
            "epoch": p["epoch"],
            "loss": p["loss"],
            "learning_rate": p["learning_rate"],
            "tokens_per_second": p["tokens_per_second"],
            "eta_seconds": p["eta_seconds"],
            "samples_seen": p["samples_seen"],
            "bad_samples": p["bad_samples"],
            "tokens_seen": p["tokens_seen"],
            "checkpoint": _ref(p.get("checkpoint")) or current.checkpoint,
        }
        if all(getattr(current, k) == v for k, v in changes.items()):
            return current
        return await self._set(run_id, **changes)

    async def _finish(self, run_id: str, returncode: int) -> None:
        """Record how the worker ended: its result, or a relaunch/failure if it died without one."""
        result = read_json(self.run_dir(run_id) / RESULT) or {}
        record = self._records[run_id]
        stop = self._stopping.pop(run_id, None)
        status = result.get("status")
        if status == "succeeded":
            await self._set(
                run_id,
                persist=True,
                state=RunState.SUCCEEDED,
                final_model=_ref(result.get("final_model")),
                final_model_prefix=result.get("final_model_prefix", ""),
                metrics=_ref(result.get("metrics")),
                eta_seconds=0.0,
                checkpoint=None if result.get("checkpoints_dropped") else record.checkpoint,
            )
        elif status == "cancelled" or stop == "cancel":
            await self._set(run_id, persist=True, state=RunState.CANCELLED, eta_seconds=-1.0)
        elif status == "failed":
            await self._set(run_id, persist=True, state=RunState.FAILED, error=result.get("error", "failed"))
        elif self._closing:
            # Left unfinished on purpose (still "running" in storage): the next manager resumes it.
            log.info("run interrupted for shutdown", run_id=run_id, step=record.step)
            await asyncio.to_thread(self.runs.save, record)
        elif status == "interrupted" or record.attempts < self.max_attempts:
            # Stopped from outside (it checkpointed) or died: carry on from the last checkpoint.
            log.warning("worker ended early; relaunching from its checkpoint", run_id=run_id, code=returncode)
            reason = "" if status == "interrupted" else f"worker exited with code {returncode}; resuming"
            await self._set(run_id, persist=True, state=RunState.QUEUED, error=reason)
            self._queue.insert(0, run_id)
        else:
            await self._set(
                run_id,
                persist=True,
                state=RunState.FAILED,
                error=f"worker exited with code {returncode} {record.attempts} times; last log lines:\n"
                + self._log_tail(run_id),
            )
        log.info("run ended", run_id=run_id, state=str(self._records[run_id].state))

    def _log_tail(self, run_id: str, lines: int = 15) -> str:
        try:
            text = (self.run_dir(run_id) / LOG_FILE).read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _request_stop(self, run_id: str, how: str) -> None:
        if run_id not in self._procs:
            return
        self._stopping[run_id] = how
        write_json_atomic(self.run_dir(run_id) / CONTROL, {"stop": how})

    async def _wait_for_exit(self, run_ids: list[str], grace: float) -> None:
        """Wait for the workers to exit by themselves; then SIGTERM their groups, then SIGKILL."""
        procs = [self._procs[r] for r in run_ids if r in self._procs]
        if not procs:
            return
        await asyncio.wait([asyncio.create_task(p.wait()) for p in procs], timeout=grace)
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            alive = [p for p in procs if p.returncode is None]
            if not alive:
                return
            for p in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, sig)
            await asyncio.wait([asyncio.create_task(p.wait()) for p in alive], timeout=wait)

    async def _wait_stale_worker(self, run_id: str) -> None:
        """A worker from a previous manager may still be checkpointing; let it finish (or end it)."""
        pid_file = self.run_dir(run_id) / PID_FILE
        try:
            pid = int(pid_file.read_text())
        except (FileNotFoundError, ValueError):
            return
        deadline = asyncio.get_running_loop().time() + self.stop_grace_seconds
        while pid_alive(pid) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(self.poll_seconds)
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        pid_file.unlink(missing_ok=True)
