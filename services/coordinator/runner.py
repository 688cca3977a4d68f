"""The coordinator's core: accepts jobs, runs each through its stages, persists every transition,
resumes unfinished jobs after a restart, and lets callers watch and cancel.

With several replicas (``leadership``: leader.py) only the leader runs jobs. Any replica accepts
submissions (stored QUEUED; the leader picks them up within ``pickup_interval_seconds``), answers reads
from stored state, and takes cancel requests (a marker the leader acts on). Job state is written with
compare-and-swap (jobs.py): a replica whose write is refused — another one changed the job since, as a new
leader does — stops working on that job at once.

Transport-free: server.py adapts it to gRPC; tests drive it directly too.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator

from dreamframe import keys
from dreamframe.errors import Aborted, InvalidArgument, NotFound
from dreamframe.stages import stage_name
from dreamframe.storage.base import ObjectStore
from dreamframe.story import Story, load_story
from dreamframe.v1 import coordinator_pb2 as pb
from services.coordinator.settings import CoordinatorSettings

from . import stages as st
from .clients import Clients
from .jobs import JobStore, is_terminal, new_job_id, now
from .leader import Leadership
from .metrics import CoordinatorMetrics
from .scaler import RendererScaler
from .spec import PER_STORY_STAGES, check_style_source, selected_stages, validate_submission

log = logging.getLogger(__name__)


class Coordinator:
    def __init__(
        self,
        store: ObjectStore,
        clients: Clients,
        settings: CoordinatorSettings,
        *,
        scaler: RendererScaler | None = None,
        scale_interval_seconds: float = 10.0,
        leadership: Leadership | None = None,
    ) -> None:
        self.store = store
        self.jobs_store = JobStore(store)
        self.clients = clients
        self.settings = settings
        self.scaler = scaler
        self.scale_interval_seconds = scale_interval_seconds
        self._jobs: dict[str, pb.Job] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._cancel_requested: set[str] = set()
        self._last_persist: dict[str, float] = {}
        # Frames pending and in flight, moved by the render fan-out (O(1) per frame); exported on the
        # server's /metrics (server.py) for KEDA or an HPA, and what the built-in scaler scales on.
        self.metrics = CoordinatorMetrics()
        self._slots = asyncio.Semaphore(settings.max_concurrent_jobs)
        self._scale_task: asyncio.Task[None] | None = None
        # None: this coordinator is the only one and always leads.
        self.leadership = leadership
        self._pickup_task: asyncio.Task[None] | None = None

    @property
    def leads(self) -> bool:
        return self.leadership is None or self.leadership.is_leader

    # --- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> int:
        """Pick up every unfinished job from storage (when leading); returns how many were resumed."""
        if self.scaler is not None:
            self._scale_task = asyncio.create_task(self._scale_loop())
        if self.leadership is None:
            return await self._resume()
        self.leadership.on_elected = self._elected
        self.leadership.on_deposed = self._deposed
        await self.leadership.step()  # the first round now: a sole replica leads at once
        self.leadership.start()
        return len(self._tasks)

    async def _resume(self) -> int:
        """Schedule the stored unfinished jobs not running here yet (the active index, no job listing)."""
        resumed = 0
        for job_id in await asyncio.to_thread(self.jobs_store.active_ids):
            if job_id in self._tasks:
                continue
            try:
                job = await asyncio.to_thread(lambda j=job_id: self.jobs_store.load(j, track=True))
            except Exception as exc:  # noqa: BLE001 - one bad record must not stop the others
                log.warning("cannot resume job %s: %s", job_id, exc)
                continue
            if is_terminal(job.state):
                continue
            log.info("resuming job %s", job_id)
            self._jobs[job_id] = job
            self._schedule(job_id)
            resumed += 1
        return resumed

    async def _elected(self, generation: int) -> None:
        log.info("leading (generation %d): resuming unfinished jobs", generation)
        await self._resume()
        self._pickup_task = asyncio.create_task(self._pickup_loop(), name="job-pickup")

    async def _deposed(self) -> None:
        """Another replica leads now: stop every job here (they stay RUNNING in storage for it)."""
        if self._pickup_task is not None:
            self._pickup_task.cancel()
        await self._stop_tasks()
        for job_id in list(self._jobs):
            self._drop(job_id)

    async def _pickup_loop(self) -> None:
        """The leader's rounds: jobs submitted through other replicas, and cancel requests they took."""
        while True:
            await asyncio.sleep(self.settings.pickup_interval_seconds)
            if not self.leads:
                continue  # the term lapsed (the campaign will say whether it comes back)
            try:
                await self._resume()
                for job_id in list(self._tasks):
                    if await asyncio.to_thread(self.store.exists, _cancel_key(job_id)):
                        self._cancel_requested.add(job_id)
                        self._tasks[job_id].cancel()
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                log.warning("job pickup failed: %s", exc)

    async def _stop_tasks(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _drop(self, job_id: str) -> None:
        """Forget a job here (finished, or taken over elsewhere): memory holds only jobs in flight."""
        self._jobs.pop(job_id, None)
        self._last_persist.pop(job_id, None)
        self.jobs_store.forget(job_id)
        event = self._changed.pop(job_id, None)
        if event is not None:
            event.set()  # watchers read the stored state from now on

    async def stop(self) -> None:
        """Shutdown: stop working but leave jobs RUNNING in storage, so the next start resumes them."""
        if self._scale_task:
            self._scale_task.cancel()
        if self._pickup_task is not None:
            self._pickup_task.cancel()
        await self._stop_tasks()
        for job in list(self._jobs.values()):
            try:
                await asyncio.to_thread(self.jobs_store.save, job)
            except Aborted:
                log.warning("job %s was changed by another coordinator; not saved here", job.job_id)
        if self.leadership is not None:
            await self.leadership.stop()  # hand the lease over at once

    # --- API -----------------------------------------------------------------------------------
    async def submit(self, request: pb.SubmitJobRequest, *, submitted_by: str = "", team: str = "") -> pb.Job:
        """``submitted_by``/``team``: the caller, recorded in the job (who may see it: access.py)."""
        validate_submission(request)
        job_id = request.job_id or new_job_id()
        if job_id in self._jobs or await asyncio.to_thread(self.jobs_store.exists, job_id):
            return await self.get(job_id)  # idempotent resubmission
        stages = selected_stages(request.spec)
        for i, story in enumerate(request.spec.stories):
            if story.WhichOneof("source") == "story":
                loaded = await asyncio.to_thread(
                    self._check_uploaded_story, story.story, f"spec.stories.{i}.story"
                )
                check_style_source(story, loaded, stages, f"spec.stories.{i}")
        job = pb.Job(job_id=job_id, state=pb.JOB_STATE_QUEUED, prefix=keys.job_prefix(job_id))
        job.spec.CopyFrom(request.spec)
        job.created_at.CopyFrom(now())
        job.story_count = len(request.spec.stories)
        job.submitted_by, job.team = submitted_by, team
        for stage in selected_stages(request.spec):
            job.stages.add(stage=stage, state=pb.JOB_STATE_QUEUED)
        job.renderer_replicas = self._replicas()
        if not self.leads:  # stored; the leader picks it up
            await asyncio.to_thread(self.jobs_store.save, job)
            self.jobs_store.forget(job_id)
            return _copy(job)
        self._jobs[job_id] = job
        await asyncio.to_thread(self.jobs_store.save, job)
        self._schedule(job_id)
        return _copy(job)

    def _check_uploaded_story(self, ref, field: str) -> Story:
        """A story file must exist and parse (either format) before the job is accepted."""
        bucket = ref.bucket or None
        if not self.store.exists(ref.key, bucket=bucket):
            raise InvalidArgument(f"no object {ref.key!r} in storage", field=field)
        return load_story(self.store.get_bytes(ref.key, bucket=bucket), field=field)

    async def get(self, job_id: str) -> pb.Job:
        if job_id in self._jobs:
            return _copy(self._jobs[job_id])
        keys.validate_id(job_id, field="job_id")
        return await asyncio.to_thread(self.jobs_store.load, job_id)

    async def list(
        self, states: list[int], page_size: int, page_token: str, *, team: str | None = None
    ) -> tuple[list[pb.Job], str]:
        """Job summaries (``summary``), newest submitted first, from the job index: a page reads only its
        own jobs (and those its state filter skips), never every job; ``team``: that team's index only."""
        if page_token and not _PAGE_TOKEN.fullmatch(page_token):
            raise InvalidArgument(f"{page_token[:40]!r} is not a page token of ListJobs", field="page_token")
        size = page_size if page_size > 0 else 100
        live = {job_id: _copy(job) for job_id, job in self._jobs.items()}  # fresher than storage

        def one_page() -> tuple[list[pb.Job], str]:
            page: list[pb.Job] = []
            last = ""
            for entry, job_id in self.jobs_store.entries(team):
                if page_token and entry <= page_token:
                    continue
                try:
                    job = live.get(job_id) or self.jobs_store.load(job_id)
                except NotFound:
                    continue  # indexed, then deleted
                if states and job.state not in states:
                    continue
                if len(page) == size:
                    return page, last  # more follow
                page.append(summary(job))
                last = entry
            return page, ""

        return await asyncio.to_thread(one_page)

    async def watch(self, job_id: str) -> AsyncIterator[pb.Job]:
        while True:
            # Take the event before reading, so a change between the two is never missed.
            event = self._changed.setdefault(job_id, asyncio.Event())
            job = await self.get(job_id)  # NotFound for unknown ids
            yield job
            if is_terminal(job.state):
                return
            if job_id in self._jobs:
                await event.wait()
                # Coalesced: a watcher gets at most one update per watch_interval_seconds, the latest state
                # then, however many frames changed it in between (a whole Job per frame would not scale).
                await asyncio.sleep(self.settings.watch_interval_seconds)
            else:  # run by another replica (or not resumed yet): follow the stored state
                self._changed.pop(job_id, None)
                await asyncio.sleep(self.settings.pickup_interval_seconds)

    async def cancel(self, job_id: str) -> pb.Job:
        job = await self.get(job_id)
        if is_terminal(job.state):
            return job
        task = self._tasks.get(job_id)
        if task is not None:
            self._cancel_requested.add(job_id)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        elif self.leads:  # known only from storage (not resumed yet): cancel it there
            self._cancel_requested.add(job_id)
            self._jobs[job_id] = await asyncio.to_thread(lambda: self.jobs_store.load(job_id, track=True))
            try:
                await self._finish(job_id, pb.JOB_STATE_CANCELLED, "cancelled by the caller")
            except Aborted:
                pass  # changed meanwhile; the marker below still reaches whoever runs it
            finally:
                self._drop(job_id)
            await asyncio.to_thread(self.store.put_bytes, _cancel_key(job_id), b"")
        else:  # another replica runs it: it acts on the request within pickup_interval_seconds
            await asyncio.to_thread(self.store.put_bytes, _cancel_key(job_id), b"")
        return await self.get(job_id)

    # --- running -------------------------------------------------------------------------------
    def _schedule(self, job_id: str) -> None:
        self._tasks[job_id] = asyncio.create_task(self._run(job_id), name=f"job-{job_id}")

    async def _run(self, job_id: str) -> None:
        job = self._jobs[job_id]
        try:
            async with self._slots:
                job.state = pb.JOB_STATE_RUNNING
                await self._notify(job_id, persist=True)
                ctx = st.JobContext(
                    job,
                    self.store,
                    self.clients,
                    self.settings,
                    lambda persist: self._notify(job_id, persist=persist),
                    meter=self.metrics,
                )
                await self._run_stages(ctx)
                await self._finish(job_id, pb.JOB_STATE_SUCCEEDED, "")
        except asyncio.CancelledError:
            if job_id in self._cancel_requested:
                await self._cancel_train_run(job)
                await self._finish(job_id, pb.JOB_STATE_CANCELLED, "cancelled by the caller")
            # else: coordinator shutdown — the job stays RUNNING in storage and resumes on restart
        except Aborted:
            self._taken_over(job_id)
        except Exception as exc:  # noqa: BLE001 - every failure is recorded on the job
            log.exception("job %s failed", job_id)
            try:
                await self._finish(job_id, pb.JOB_STATE_FAILED, _describe(exc))
            except Aborted:
                self._taken_over(job_id)
        finally:
            self._tasks.pop(job_id, None)
            if is_terminal(job.state):
                self._drop(job_id)

    def _taken_over(self, job_id: str) -> None:
        who = self.leadership.identity if self.leadership else "this coordinator"
        log.warning("job %s was changed by another coordinator (a new leader?): %s stopped it", job_id, who)
        self._cancel_requested.discard(job_id)
        self._drop(job_id)

    async def _run_stages(self, ctx: st.JobContext) -> None:
        chosen = [s.stage for s in ctx.job.stages]
        per_story = [s for s in chosen if s in PER_STORY_STAGES]
        tally = st.FrameTally()
        stories_done = dict.fromkeys(per_story, 0)

        async def one_story(index: int, gate: asyncio.Semaphore) -> None:
            async with gate:
                for stage in per_story:
                    # A per-story stage's time: from the first story entering it to the last one leaving it.
                    _stamp_started(ctx.stage(stage))
                    if stage == pb.STAGE_PLOT:
                        await st.plot(ctx, index)
                    elif stage == pb.STAGE_STYLE:
                        await st.style(ctx, index)
                    elif stage == pb.STAGE_RENDER:
                        await st.render(ctx, index, tally)
                    stories_done[stage] += 1
                    if stories_done[stage] == ctx.stories:
                        # Done for every story: succeeded now, not when the other per-story stages end
                        # (a render failing later must not mark a finished plot failed).
                        await self._stage_state(ctx, stage, pb.JOB_STATE_SUCCEEDED)
            if pb.STAGE_RENDER in per_story and self.settings.storyboard:
                # The story's storyboard as soon as its frames are rendered, outside the gate (the next
                # story starts meanwhile); the job page linking them all comes after the last story.
                await st.story_storyboard(ctx, index)

        if per_story:
            for stage in per_story:
                await self._stage_state(ctx, stage, pb.JOB_STATE_RUNNING)
            gate = asyncio.Semaphore(self.settings.story_parallelism)
            await _run_all(ctx, [one_story(i, gate) for i in range(ctx.stories)], per_story, self)
            for stage in per_story:
                await self._stage_state(ctx, stage, pb.JOB_STATE_SUCCEEDED)
        if pb.STAGE_RENDER in chosen and self.settings.storyboard:
            ctx.job.ClearField("outputs")
            ctx.job.outputs.extend(await st.write_storyboard(ctx))
        for stage, fn in (
            (pb.STAGE_DATASET, st.dataset),
            (pb.STAGE_TRAIN, st.train),
            (pb.STAGE_EVAL, st.evaluate),
        ):
            if stage in chosen:
                await self._stage_state(ctx, stage, pb.JOB_STATE_RUNNING)
                try:
                    await fn(ctx)
                except Exception as exc:
                    await self._stage_state(ctx, stage, pb.JOB_STATE_FAILED, _describe(exc))
                    raise
                await self._stage_state(ctx, stage, pb.JOB_STATE_SUCCEEDED)

    async def _stage_state(self, ctx: st.JobContext, stage: int, state: int, error: str = "") -> None:
        status = ctx.stage(stage)
        if status.state == state:
            return
        status.state = state
        if error:
            status.error = error
        if state == pb.JOB_STATE_RUNNING:
            status.ClearField("finished_at")  # running again (a resumed job): it ends anew
            if stage not in PER_STORY_STAGES:  # those start when their first story enters them
                _stamp_started(status)
        elif is_terminal(state):
            _stamp_finished(status)
        log.info("job %s stage %s → %s", ctx.job.job_id, stage_name(stage), pb.JobState.Name(state))
        await self._notify(ctx.job.job_id, persist=True)

    async def _finish(self, job_id: str, state: int, error: str) -> None:
        job = self._jobs[job_id]
        job.state = state
        job.error = error
        for status in job.stages:
            if is_terminal(status.state):
                continue
            if state == pb.JOB_STATE_CANCELLED:
                status.state = pb.JOB_STATE_CANCELLED  # every stage not yet done stops
            elif state == pb.JOB_STATE_FAILED and status.state == pb.JOB_STATE_RUNNING:
                status.state = pb.JOB_STATE_FAILED  # the stages that were running failed with the job
            if is_terminal(status.state):
                _stamp_finished(status)
        self._cancel_requested.discard(job_id)
        await self._notify(job_id, persist=True)

    async def _notify(self, job_id: str, *, persist: bool) -> None:
        job = self._jobs[job_id]
        job.renderer_replicas = self._replicas()
        moment = time.monotonic()
        if persist or moment - self._last_persist.get(job_id, 0.0) >= self.settings.persist_interval_seconds:
            self._last_persist[job_id] = moment
            await asyncio.to_thread(self.jobs_store.save, _copy(job))
        event = self._changed.pop(job_id, None)
        if event is not None:
            event.set()

    async def _cancel_train_run(self, job: pb.Job) -> None:
        from dreamframe.v1 import train_pb2

        if any(s.stage == pb.STAGE_TRAIN and s.state == pb.JOB_STATE_RUNNING for s in job.stages):
            run_id = job.spec.train.run_id or f"{job.job_id}-train"
            try:
                await self.clients.train.CancelRun(train_pb2.CancelRunRequest(run_id=run_id), timeout=10)
            except Exception:  # noqa: BLE001 - best effort; the run may not have started
                log.warning("could not cancel training run %s", run_id)

    # --- renderer scaling ----------------------------------------------------------------------
    def _replicas(self) -> int:
        """The scaled Deployment's replicas, else the configured renderer targets (a dns:/// target
        counts as one: its pods are not known here)."""
        if self.scaler is not None and self.scaler.replicas:
            return self.scaler.replicas
        return len(self.clients.renderers)

    async def _scale_loop(self) -> None:
        assert self.scaler is not None
        while True:
            try:
                if self.leads:  # a follower's fan-out is idle: its count says nothing
                    await self.scaler.scale_for(self.metrics.pending)
            except Exception as exc:  # noqa: BLE001 - scaling trouble must not stop jobs
                log.warning("renderer scaling failed: %s", exc)
            await asyncio.sleep(self.scale_interval_seconds)


async def _run_all(ctx: st.JobContext, coros, stages: list[int], owner: Coordinator) -> None:
    """Run the per-story work; the first failure cancels the rest and marks the running stages failed."""
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    except BaseException as exc:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if not isinstance(exc, asyncio.CancelledError):
            for stage in stages:
                if ctx.stage(stage).state == pb.JOB_STATE_RUNNING:
                    await owner._stage_state(ctx, stage, pb.JOB_STATE_FAILED, _describe(exc))
        raise


def _stamp_started(status: pb.StageStatus) -> None:
    """The first time a stage begins work (a resumed job keeps the original start)."""
    if not status.HasField("started_at"):
        status.started_at.CopyFrom(now())


def _stamp_finished(status: pb.StageStatus) -> None:
    """When a stage that began ends; one that never started (cancelled while queued) gets no time."""
    if status.HasField("started_at") and not status.HasField("finished_at"):
        status.finished_at.CopyFrom(now())


# A ListJobs page token: the job index entry of the page's last job (jobs.py: inverted time, then id).
_PAGE_TOKEN = re.compile(r"[0-9]{13}-[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def summary(job: pb.Job) -> pb.Job:
    """A job without what grows with its size (the stories of its spec, stage and job outputs): what
    ListJobs returns, so a page of large jobs stays small. GetJob has the whole job."""
    small = pb.Job()
    small.CopyFrom(job)
    small.story_count = len(job.spec.stories)
    small.spec.ClearField("stories")
    small.ClearField("outputs")
    for status in small.stages:
        status.ClearField("outputs")
    return small


def _describe(exc: BaseException) -> str:
    import grpc

    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc) or type(exc).__name__


def _copy(job: pb.Job) -> pb.Job:
    out = pb.Job()
    out.CopyFrom(job)
    return out


def _cancel_key(job_id: str) -> str:
    """A cancel request taken by a replica that does not run the job; the leader acts on it."""
    return f"{keys.job_prefix(job_id)}cancel-requested"
