"""Job records in storage: an index instead of listing job folders, and writes fenced by compare-and-swap
so a coordinator that lost the lead cannot overwrite the new leader's state."""

from __future__ import annotations

import pytest

from dreamframe import keys
from dreamframe.errors import Aborted
from dreamframe.storage import LocalStore
from dreamframe.v1 import coordinator_pb2 as pb
from services.coordinator.jobs import ACTIVE_PREFIX, ALL_PREFIX, INDEX_BUILT_KEY, TEAM_PREFIX, JobStore, now


def job(job_id: str, state=pb.JOB_STATE_RUNNING, seconds: int = 0, team: str = "") -> pb.Job:
    j = pb.Job(job_id=job_id, state=state, team=team, submitted_by=f"{team}-bot" if team else "")
    j.created_at.CopyFrom(now())
    if seconds:
        j.created_at.seconds = seconds
    return j


@pytest.fixture
def store(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "store", "dreamframe")


def test_index_lists_jobs_newest_first_and_the_unfinished_ones(store):
    jobs = JobStore(store)
    jobs.save(job("old", seconds=1_700_000_000))
    jobs.save(job("new", seconds=1_800_000_000))
    jobs.save(job("done", pb.JOB_STATE_SUCCEEDED, seconds=1_750_000_000))
    store.put_bytes(keys.frames_prefix("new", 0) + "000000.png", b"x")  # job contents are never listed
    assert list(jobs.ids()) == ["new", "done", "old"]
    assert sorted(j.job_id for j in JobStore(store).unfinished()) == ["new", "old"]
    finished = jobs.load("old", track=True)
    finished.state = pb.JOB_STATE_FAILED
    jobs.save(finished)
    assert [j.job_id for j in JobStore(store).unfinished()] == ["new"]
    assert [i.key for i in store.list(ACTIVE_PREFIX)] == [ACTIVE_PREFIX + "new"]


def test_a_store_from_before_the_index_is_indexed_once(store):
    JobStore(store).save(job("a", seconds=1_700_000_000))
    JobStore(store).save(job("b", pb.JOB_STATE_CANCELLED, seconds=1_800_000_000))
    store.delete_prefix("jobs-index/")  # as written by a coordinator that had no index
    jobs = JobStore(store)
    assert [j.job_id for j in jobs.unfinished()] == ["a"]
    assert list(jobs.ids()) == ["b", "a"] and store.exists(INDEX_BUILT_KEY)


def test_a_deposed_leaders_late_write_is_refused(store):
    old_leader = JobStore(store)
    j = job("j")
    old_leader.save(j)
    new_leader = JobStore(store)
    (taken,) = new_leader.unfinished()  # the new leader resumes the job: reads it with its version
    taken.error = "resumed by the new leader"
    new_leader.save(taken)
    j.error = "a late progress write"
    with pytest.raises(Aborted):
        old_leader.save(j)
    assert JobStore(store).load("j").error == "resumed by the new leader"
    new_leader.save(taken)  # the leader goes on writing
    with pytest.raises(Aborted):
        JobStore(store).save(job("j"))  # creating an existing job is refused too


def test_forget_bounds_memory(store):
    jobs = JobStore(store)
    for i in range(5):
        jobs.save(job(f"j{i}", pb.JOB_STATE_SUCCEEDED))
        jobs.forget(f"j{i}")
    assert jobs._versions == {} and jobs._locks == {}


def test_a_teams_listing_reads_only_that_teams_index(store, monkeypatch):
    jobs = JobStore(store)
    jobs.save(job("red-old", seconds=1_700_000_000, team="red"))
    jobs.save(job("blue", seconds=1_750_000_000, team="blue"))
    jobs.save(job("red-new", pb.JOB_STATE_SUCCEEDED, seconds=1_800_000_000, team="red"))
    jobs.save(job("no-team", seconds=1_760_000_000))  # auth off: admins' listing only
    assert [i for _, i in jobs.entries("red")] == ["red-new", "red-old"]
    assert [i for _, i in jobs.entries("blue")] == ["blue"]
    assert list(jobs.ids()) == ["red-new", "no-team", "blue", "red-old"]
    # Page tokens are the same entries in both indexes.
    assert [e for e, _ in jobs.entries("red")] == [e for e, i in jobs.entries() if i.startswith("red")]
    assert JobStore(store).load("red-old").submitted_by == "red-bot"

    listed: list[str] = []
    real_list = store.list
    monkeypatch.setattr(store, "list", lambda prefix, **kw: listed.append(prefix) or real_list(prefix, **kw))
    list(jobs.entries("blue"))
    assert listed == [TEAM_PREFIX + "blue/"]  # never the all/ index, never jobs/


def test_an_old_store_gets_its_team_index_too(store):
    JobStore(store).save(job("a", seconds=1_700_000_000, team="red"))
    JobStore(store).save(job("b", seconds=1_800_000_000))
    store.delete_prefix("jobs-index/")
    jobs = JobStore(store)
    assert [i for _, i in jobs.entries("red")] == ["a"]
    assert [i.key.removeprefix(ALL_PREFIX) for i in store.list(ALL_PREFIX)] == [e for e, _ in jobs.entries()]


def test_job_state_is_binary_and_a_stores_old_json_jobs_are_read_and_carried_on(store):
    from google.protobuf import json_format

    jobs = JobStore(store)
    jobs.save(job("new-style"))
    assert store.exists(keys.job_state_key("new-style")) and keys.job_state_key("new-style").endswith(
        ".binpb"
    )
    assert not store.exists(keys.legacy_job_state_key("new-style"))
    # A job written as JSON by an older coordinator (and indexed by it).
    old = job("old-style", seconds=1_700_000_000, team="red")
    store.put_bytes(keys.legacy_job_state_key("old-style"), json_format.MessageToJson(old).encode())
    store.delete_prefix("jobs-index/")
    fresh = JobStore(store)
    assert sorted(fresh.ids()) == ["new-style", "old-style"] and fresh.exists("old-style")
    taken = fresh.load("old-style", track=True)
    assert taken == old
    taken.error = "carried on by the new coordinator"
    fresh.save(taken)  # written as job.binpb, created with compare-and-swap
    assert JobStore(store).load("old-style").error == "carried on by the new coordinator"
    late = JobStore(store)
    stale = late.load("old-style", track=True)
    fresh.save(taken)
    with pytest.raises(Aborted):
        late.save(stale)  # fencing holds across the change of format


@pytest.mark.parametrize(
    ("manifest", "frames"),
    [
        ({"num_frames": 4, "files": []}, 4),
        ({"files": []}, 0),  # a manifest from before the trainer recorded it: the evaluator's default
        ({"num_frames": 0}, 0),
        ({"num_frames": 100000}, 0),
        ({"num_frames": "8"}, 0),
        ({"num_frames": True}, 0),
        ([4], 0),
    ],
)
def test_the_evaluation_shows_the_frames_training_used(tmp_path, manifest, frames):
    from dreamframe.storage import to_proto
    from services.coordinator.stages import trained_frames

    store = LocalStore(tmp_path, "dreamframe")
    ref = store.put_json("runs/r/final/manifest.json", manifest)
    assert trained_frames(store, to_proto(ref)) == frames
