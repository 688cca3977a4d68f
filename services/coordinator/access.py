"""Who may see which job: a job belongs to the team of the caller that submitted it.

A caller sees, watches and cancels its own team's jobs; admins see every team's. Another team's job
answers exactly like a job that does not exist (NOT_FOUND, the same message), so a caller cannot even
learn that it exists. ``caller`` None means auth is off (a local run): everything is visible.
"""

from __future__ import annotations

from dreamframe.errors import AlreadyExists, NotFound, PermissionDenied
from dreamframe.keys import validate_id
from dreamframe.serving import Caller
from dreamframe.serving.auth import may_see
from dreamframe.v1 import coordinator_pb2 as pb


def visible(caller: Caller | None, job: pb.Job) -> pb.Job:
    """``job`` if the caller may see it; otherwise NotFound as for an unknown id (jobs.JobStore.load)."""
    if not may_see(caller, job.team):
        raise NotFound(f"no job {job.job_id!r}", field="job_id")
    return job


def submitted(caller: Caller | None, job: pb.Job) -> pb.Job:
    """What SubmitJob answers. A new job is the caller's own; a job_id that exists gives that job back
    to its team (idempotent resubmission), while to anyone else the id is taken and nothing of the job
    is shown (caller-chosen ids are global, so that much is unavoidable)."""
    if not may_see(caller, job.team):
        raise AlreadyExists("is taken; choose another job id (or none)", field="job_id")
    return job


def listing_team(caller: Caller | None, requested: str) -> str | None:
    """The team whose index ListJobs reads (None: every job). Only admins may name another team."""
    if requested:  # validate_id refuses over 128 characters, echoing a short prefix only
        validate_id(requested, field="team")
    if caller is None or caller.is_admin:
        return requested or None
    if requested and requested != caller.team:
        raise PermissionDenied("listing another team's jobs needs the role 'admin'", field="team")
    return caller.team
