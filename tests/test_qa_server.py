"""QaService over real gRPC on 127.0.0.1:0, with a real LocalStore: a tiny story with tiny keyframes in,
a dataset out; bad requests come back as INVALID_ARGUMENT / NOT_FOUND naming the field."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
from pathlib import Path

import av
import grpc
import jsonschema
import pytest
from test_qa_generator import JOB, make_story, put_story

from dreamframe import keys
from dreamframe.config import ServerSettings
from dreamframe.serving import GrpcServer, Registration, error_detail_from
from dreamframe.storage import LocalStore
from dreamframe.v1 import common_pb2, qa_pb2, qa_pb2_grpc
from services.qa_generator import formats
from services.qa_generator.server import QaServicer
from services.qa_generator.settings import QaSettings

F = qa_pb2


def run(coro):
    return asyncio.run(coro)


@contextlib.asynccontextmanager
async def serving(store: LocalStore, settings: QaSettings | None = None):
    servicer = QaServicer(store, settings or QaSettings())
    registration = Registration.of(qa_pb2, qa_pb2_grpc.add_QaServiceServicer_to_server, servicer)
    server = GrpcServer(
        [registration], ServerSettings(host="127.0.0.1", port=0, metrics_port=-1), service_name="qa-test"
    )
    async with server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield qa_pb2_grpc.QaServiceStub(channel), servicer


def story_source(store: LocalStore, index: int, **story_kwargs) -> qa_pb2.StorySource:
    source = put_story(store, index, make_story(f"g{index}", **story_kwargs))
    ref = store.stat(source.key)
    return qa_pb2.StorySource(
        story=common_pb2.ObjectRef(bucket=ref.bucket, key=ref.key, size=ref.size, sha256=ref.sha256),
        frames_prefix=source.frames_prefix,
    )


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store", "dreamframe")


async def collect(stub, request) -> list[qa_pb2.BuildDatasetResponse]:
    return [response async for response in stub.BuildDataset(request, timeout=120)]


async def failure(stub, request) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub, request)
    return err.value


def test_build_dataset_over_grpc(store: LocalStore) -> None:
    request = qa_pb2.BuildDatasetRequest(
        job_id=JOB,
        stories=[story_source(store, 0), story_source(store, 1)],
        options=qa_pb2.DatasetOptions(
            formats=[F.DATASET_FORMAT_LLAVA_JSON, F.DATASET_FORMAT_VIDEO_MP4, F.DATASET_FORMAT_MVBENCH_MC],
            test_fraction=0.5,
            seed=5,
            num_choices=3,
            video_size=32,
            fps=3,
        ),
    )

    async def body():
        async with serving(store) as (stub, _):
            return await collect(stub, request)

    responses = run(body())
    progress = [r.progress for r in responses if r.HasField("progress")]
    assert progress and progress[-1].current_item == "manifest.json"
    assert [p.unit for p in progress].count("videos") >= 14
    result = responses[-1].result
    assert responses[-1].HasField("result") and result.prefix == keys.dataset_prefix(JOB)
    assert store.stat(result.manifest.key).sha256 == result.manifest.sha256
    names = {named.name: named.ref for named in result.files}
    assert {"conversations/train.json", "conversations/test.json", "mc/test.json", "README.md"} <= set(names)
    for ref in names.values():
        assert store.stat(ref.key).sha256 == ref.sha256
    assert result.counts["train/stories"] == result.counts["test/stories"] == 1
    assert result.counts["videos"] == 14

    manifest = json.loads(store.get_bytes(result.manifest.key))
    split_of = {s["story_id"]: s["split"] for s in manifest["stories"]}
    for split in ("train", "test"):
        records = json.loads(store.get_bytes(names[f"conversations/{split}.json"].key))
        jsonschema.validate(records, formats.CONVERSATION_SCHEMA)
        assert {split_of[r["id"].split("_")[0]] for r in records} == {split}
        for record in records:
            data = store.get_bytes(result.prefix + record["video"])
            with av.open(io.BytesIO(data)) as container:
                n = len(list(container.decode(video=0)))
            start, end = record["video"].rsplit("/", 1)[1].split("_")[0].split("-")
            assert n == int(end) - int(start)
    for item in json.loads(store.get_bytes(names["mc/test.json"].key)):
        assert item["answer"] in item["candidates"] and len(set(item["candidates"])) == 3


def test_bad_requests_name_the_field_and_write_nothing(store: LocalStore) -> None:
    good = story_source(store, 0)
    gappy = story_source(store, 1)
    store.delete(keys.frame_key(JOB, 1, 5))
    missing = qa_pb2.StorySource(story=common_pb2.ObjectRef(key="jobs/none/stories/000/story.json"))

    cases = [
        (
            qa_pb2.BuildDatasetRequest(job_id=JOB, stories=[good, gappy]),
            "INVALID_ARGUMENT",
            "stories.1.frames_prefix",
        ),
        (qa_pb2.BuildDatasetRequest(job_id=JOB, stories=[good, missing]), "NOT_FOUND", "stories.1.story"),
        (
            qa_pb2.BuildDatasetRequest(
                job_id=JOB,
                stories=[good],
                options=qa_pb2.DatasetOptions(formats=[F.DATASET_FORMAT_LLAVA_JSON, 42]),
            ),
            "INVALID_ARGUMENT",
            "options.formats.1",
        ),
        (
            qa_pb2.BuildDatasetRequest(
                job_id=JOB,
                stories=[good],
                options=qa_pb2.DatasetOptions(formats=[F.DATASET_FORMAT_UNSPECIFIED]),
            ),
            "INVALID_ARGUMENT",
            "options.formats.0",
        ),
        (
            qa_pb2.BuildDatasetRequest(job_id=JOB, stories=[good], options=qa_pb2.DatasetOptions(profile=7)),
            "INVALID_ARGUMENT",
            "options.profile",
        ),
        (
            # Conversations over frame lists: neither target loader reads them.
            qa_pb2.BuildDatasetRequest(
                job_id=JOB,
                stories=[good],
                options=qa_pb2.DatasetOptions(
                    formats=[F.DATASET_FORMAT_LLAVA_JSON],
                    profile=F.DATASET_PROFILE_LLAVA_NEXT_VIDEO,
                ),
            ),
            "INVALID_ARGUMENT",
            "options.formats",
        ),
        (
            qa_pb2.BuildDatasetRequest(
                job_id=JOB, stories=[good], options=qa_pb2.DatasetOptions(max_video_seconds=-1)
            ),
            "INVALID_ARGUMENT",
            "options.max_video_seconds",
        ),
        (qa_pb2.BuildDatasetRequest(stories=[good]), "INVALID_ARGUMENT", "dataset_name"),
        (qa_pb2.BuildDatasetRequest(job_id=JOB), "INVALID_ARGUMENT", "stories"),
    ]

    async def body():
        async with serving(store) as (stub, _):
            return [await failure(stub, request) for request, _, _ in cases]

    errors = run(body())
    for err, (_, code, field) in zip(errors, cases, strict=True):
        assert err.code().name == code, err.details()
        assert error_detail_from(err).field == field
        assert field in err.details()
    assert "000005.png" in errors[0].details()
    assert list(store.list("datasets/")) == []


def test_cancelled_call_stops_the_build_without_publishing(store: LocalStore) -> None:
    request = qa_pb2.BuildDatasetRequest(
        job_id=JOB,
        stories=[story_source(store, 0, substories=4, tinies=4, frames=6)],
        options=qa_pb2.DatasetOptions(video_size=64),
    )

    async def body():
        async with serving(store) as (stub, servicer):
            call = stub.BuildDataset(request, timeout=120)
            async for response in call:
                if response.progress.unit == "videos" and response.progress.done >= 1:
                    call.cancel()
                    break
            deadline = time.monotonic() + 30
            while servicer._running and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return servicer._running

    assert not run(body())
    prefix = keys.dataset_prefix(JOB)
    assert not store.exists(prefix + "manifest.json")
    assert any(info.key.endswith(".mp4") for info in store.list(prefix))  # finished videos stay for reuse
