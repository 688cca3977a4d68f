"""Least-privilege buckets (issue 19): a request may name only a bucket on the service's allow-list
(``storage.allowed_buckets``; default: just ``storage.bucket``), so a caller can neither read another
team's bucket through a service nor make a service write into it, and no request makes a bucket.

Real gRPC on 127.0.0.1 against the real S3 server of tests/conftest.py and against the local backend.
The "other team" bucket exists and the service's credentials reach it (as with one MinIO root key):
only the allow-list stands in the way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from minio import Minio
from test_qa_generator import JOB, make_story, put_story

from dreamframe.config import ServerSettings
from dreamframe.serving import GrpcServer, Registration, error_detail_from
from dreamframe.storage import LocalStore, ObjectStore, S3Store
from dreamframe.v1 import common_pb2, qa_pb2, qa_pb2_grpc, render_pb2, render_pb2_grpc
from services.keyframe_renderer.engine import EngineCache
from services.keyframe_renderer.renderer import Renderer
from services.keyframe_renderer.server import RenderServicer
from services.keyframe_renderer.settings import RendererSettings
from services.qa_generator.server import QaServicer
from services.qa_generator.settings import QaSettings


@dataclass
class Buckets:
    service: ObjectStore  # what the service under attack opens (its allow-list: its own bucket only)
    victim: ObjectStore  # another team's bucket, reachable with the same credentials
    list_buckets: Callable[[], list[str]]

    def victim_keys(self) -> list[str]:
        return [i.key for i in self.victim.list("")]


@pytest.fixture(params=["local", "s3"])
def buckets(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Buckets]:
    own, other = f"own-{uuid.uuid4().hex[:12]}", f"team-b-{uuid.uuid4().hex[:12]}"
    if request.param == "local":
        root = tmp_path / "store"
        made = Buckets(LocalStore(root, own), LocalStore(root, other), lambda: sorted(os.listdir(root)))
    else:
        s3 = request.getfixturevalue("s3_server")
        raw = Minio(s3.endpoint, s3.access_key, s3.secret_key, secure=False)

        def store(bucket: str) -> S3Store:
            return S3Store(s3.endpoint, s3.access_key, s3.secret_key, bucket)

        made = Buckets(store(own), store(other), lambda: sorted(b.name for b in raw.list_buckets()))
    yield made
    made.service.close()
    made.victim.close()


def field_of(error: grpc.aio.AioRpcError) -> str:
    detail = error_detail_from(error)
    return detail.field if detail else ""


@contextlib.asynccontextmanager
async def serve(registration: Registration):
    settings = ServerSettings(host="127.0.0.1", port=0, metrics_port=-1, grace_seconds=1.0)
    async with GrpcServer([registration], settings, service_name="bucket-test") as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield channel


def no_engine(preset: str):  # noqa: ANN201 - the request must be refused before any model loads
    raise AssertionError("a refused request loaded a model")


def render_refused(buckets: Buckets, request: render_pb2.RenderFramesRequest) -> grpc.aio.AioRpcError:
    """RenderFrames over gRPC with ``request``, which must fail; the error."""
    renderer = Renderer(buckets.service, RendererSettings(device="cpu"), engines=EngineCache(no_engine))

    async def go() -> grpc.aio.AioRpcError:
        registration = Registration.of(
            render_pb2, render_pb2_grpc.add_RenderServiceServicer_to_server, RenderServicer(renderer)
        )
        async with serve(registration) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in render_pb2_grpc.RenderServiceStub(channel).RenderFrames(request, timeout=30):
                    pass
            return err.value

    try:
        return asyncio.run(go())
    finally:
        renderer.close()


@pytest.mark.parametrize("target", ["story", "style_embedding"])
def test_renderer_will_not_write_frames_into_another_teams_bucket(buckets: Buckets, target: str) -> None:
    """The renderer writes frames beside the story, in the story's bucket: naming another team's story
    would make it write there (and read that team's story and embedding)."""
    story = put_story(buckets.victim, 0, make_story("b"))
    ref = common_pb2.ObjectRef(bucket=buckets.victim.default_bucket, key=story.key)
    request = render_pb2.RenderFramesRequest(job_id=JOB, story=ref)
    if target == "style_embedding":
        own = buckets.service.put_bytes("jobs/x/story.json", make_story("a").to_json().encode())
        request = render_pb2.RenderFramesRequest(
            job_id="x",
            story=common_pb2.ObjectRef(bucket=own.bucket, key=own.key),
            style_embedding=common_pb2.ObjectRef(bucket=buckets.victim.default_bucket, key=story.key),
            style_token="Dramatic",
        )
    victim_before, buckets_before = buckets.victim_keys(), buckets.list_buckets()
    error = render_refused(buckets, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert field_of(error) == f"{target}.bucket"
    assert "not allowed" in error.details()
    assert buckets.victim_keys() == victim_before
    assert buckets.list_buckets() == buckets_before


def test_renderer_request_cannot_make_a_bucket(buckets: Buckets) -> None:
    new = f"new-{uuid.uuid4().hex[:12]}"
    before = buckets.list_buckets()
    request = render_pb2.RenderFramesRequest(job_id=JOB, story=common_pb2.ObjectRef(bucket=new, key="s.json"))
    error = render_refused(buckets, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(error) == "story.bucket"
    assert buckets.list_buckets() == before and new not in before


def test_qa_generator_will_not_read_another_teams_bucket(buckets: Buckets) -> None:
    """BuildDataset reads the stories and keyframes a request names, and writes the dataset (with those
    frames in it) into its own bucket: another team's story must not get in."""
    source = put_story(buckets.victim, 0, make_story("b"))
    story = qa_pb2.StorySource(
        story=common_pb2.ObjectRef(bucket=buckets.victim.default_bucket, key=source.key),
        frames_prefix=source.frames_prefix,
    )
    buckets_before = buckets.list_buckets()

    async def go() -> grpc.aio.AioRpcError:
        servicer = QaServicer(buckets.service, QaSettings())
        registration = Registration.of(qa_pb2, qa_pb2_grpc.add_QaServiceServicer_to_server, servicer)
        async with serve(registration) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                request = qa_pb2.BuildDatasetRequest(job_id=JOB, stories=[story])
                async for _ in qa_pb2_grpc.QaServiceStub(channel).BuildDataset(request, timeout=60):
                    pass
            return err.value

    error = asyncio.run(go())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert field_of(error) == "stories.0.story.bucket"
    assert "not allowed" in error.details()
    assert [i.key for i in buckets.service.list("")] == []  # no dataset written
    assert buckets.list_buckets() == buckets_before


def test_trainer_will_not_train_on_another_teams_dataset(buckets: Buckets, tmp_path: Path) -> None:
    """StartRun reads the datasets a request names (and the trainer writes runs/ into its own bucket)."""
    from test_trainer_support import make_dataset, runtime

    from dreamframe.v1 import train_pb2, train_pb2_grpc
    from services.trainer.runs import RunManager
    from services.trainer.server import TrainServicer

    dataset = make_dataset(buckets.victim, n=2)
    buckets_before = buckets.list_buckets()
    request = train_pb2.StartRunRequest(
        run_id="stolen",
        datasets=[
            train_pb2.DatasetMix(
                dataset=common_pb2.ObjectRef(bucket=buckets.victim.default_bucket, key=dataset.key), weight=1
            )
        ],
        base_model="tiny",
    )

    async def go() -> grpc.aio.AioRpcError:
        manager = RunManager(buckets.service, runtime(tmp_path), poll_seconds=0.1, worker_env={})
        await manager.start()
        try:
            registration = Registration.of(
                train_pb2, train_pb2_grpc.add_TrainServiceServicer_to_server, TrainServicer(manager)
            )
            async with serve(registration) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await train_pb2_grpc.TrainServiceStub(channel).StartRun(request, timeout=60)
                return err.value
        finally:
            await manager.shutdown()

    error = asyncio.run(go())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert field_of(error) == "datasets[0].dataset.bucket"
    assert [i.key for i in buckets.service.list("runs/")] == []
    assert buckets.list_buckets() == buckets_before
