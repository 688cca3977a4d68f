"""WatchJob updates as deltas: the whole job once, then only what changed.

A 1,000-story job's ``Job`` carries its spec (every story input) and every stage; sending all of it a few
times a second to each watcher would make watching cost as much as the job. The coordinator sends the
whole job first, then per update the top-level fields that changed (a ``FieldMask``) and, for
``stages``, just the stages whose status changed. ``changes`` builds such an update on the server;
``apply`` / ``follow`` turn a stream of them back into whole jobs on the client.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator

from google.protobuf import field_mask_pb2

from dreamframe.v1 import coordinator_pb2 as pb

STAGES = "stages"
# In the mask when the stages sent carry their outputs; without it they are sent without outputs (a
# 1,000-story render stage lists 1,000 of them, unchanged by each progress tick) and keep the ones held.
STAGE_OUTPUTS = "stages.outputs"
# Compared and sent field by field; job_id is in every message, stages are compared one by one.
_FIELDS = [f for f in pb.Job.DESCRIPTOR.fields if f.name not in ("job_id", STAGES)]


def first(job: pb.Job) -> pb.WatchJobResponse:
    return pb.WatchJobResponse(job=job)


def changes(previous: pb.Job, current: pb.Job) -> pb.WatchJobResponse | None:
    """The update that turns ``previous`` into ``current``; None when nothing changed. A stage's outputs
    are sent only in updates where some stage's outputs changed (``STAGE_OUTPUTS``)."""
    delta = pb.Job(job_id=current.job_id)
    paths: list[str] = []
    for field in _FIELDS:
        now = getattr(current, field.name)
        if getattr(previous, field.name) == now:
            continue
        paths.append(field.name)
        if field.is_repeated:
            getattr(delta, field.name).extend(now)
        elif field.message_type is not None:
            if current.HasField(field.name):  # unset stays unset: apply() clears it
                getattr(delta, field.name).CopyFrom(now)
        else:
            setattr(delta, field.name, now)
    before = {s.stage: s for s in previous.stages}
    changed_stages = [s for s in current.stages if before.get(s.stage) != s]
    if changed_stages:
        paths.append(STAGES)
        with_outputs = any(
            s.stage not in before or before[s.stage].outputs != s.outputs for s in changed_stages
        )
        for status in changed_stages:
            sent = delta.stages.add()
            sent.CopyFrom(status)
            if not with_outputs:
                sent.ClearField("outputs")
        if with_outputs:
            paths.append(STAGE_OUTPUTS)
    if not paths:
        return None
    return pb.WatchJobResponse(job=delta, changed=field_mask_pb2.FieldMask(paths=paths))


def apply(job: pb.Job | None, response: pb.WatchJobResponse) -> pb.Job:
    """The whole job after ``response``: a first message replaces ``job``; an update is merged into it
    (``job`` is changed in place and returned)."""
    if not response.changed.paths:
        whole = pb.Job()
        whole.CopyFrom(response.job)
        return whole
    if job is None:
        raise ValueError("a WatchJob update arrived before the whole job")
    update = response.job
    for path in response.changed.paths:
        if path == STAGE_OUTPUTS:
            continue  # read with STAGES
        if path == STAGES:
            keep_outputs = STAGE_OUTPUTS not in response.changed.paths
            index = {s.stage: i for i, s in enumerate(job.stages)}
            for status in update.stages:
                if status.stage not in index:
                    job.stages.add().CopyFrom(status)
                    continue
                held = job.stages[index[status.stage]]
                merged = pb.StageStatus()
                merged.CopyFrom(status)
                if keep_outputs:
                    merged.outputs.extend(held.outputs)
                held.CopyFrom(merged)
            continue
        field = pb.Job.DESCRIPTOR.fields_by_name.get(path)
        if field is None:
            continue  # a field this client does not know (a newer server): ignore it
        if field.is_repeated:
            del getattr(job, path)[:]
            getattr(job, path).extend(getattr(update, path))
        elif field.message_type is not None:
            if update.HasField(path):
                getattr(job, path).CopyFrom(getattr(update, path))
            else:
                job.ClearField(path)
        else:
            setattr(job, path, getattr(update, path))
    return job


def follow(responses: Iterable[pb.WatchJobResponse]) -> Iterator[pb.Job]:
    """Whole jobs from a (synchronous) WatchJob stream, one per message."""
    job: pb.Job | None = None
    for response in responses:
        job = apply(job, response)
        yield job


async def follow_async(responses: AsyncIterable[pb.WatchJobResponse]) -> AsyncIterator[pb.Job]:
    """Whole jobs from a grpc.aio WatchJob stream, one per message."""
    job: pb.Job | None = None
    async for response in responses:
        job = apply(job, response)
        yield job
