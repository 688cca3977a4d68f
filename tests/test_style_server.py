"""StyleService over real gRPC on 127.0.0.1: streams progress and the result, maps errors by field."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load

from dreamframe import keys
from dreamframe.config import ServerSettings
from dreamframe.serving import GrpcServer, Registration, error_detail_from
from dreamframe.storage import LocalStore, from_proto, to_proto
from dreamframe.story import Story, StoryItem, Substory, TinyStory
from dreamframe.v1 import common_pb2, style_pb2, style_pb2_grpc
from services.style_trainer.checkpoint import TrainingState
from services.style_trainer.server import StyleServicer, options_from_proto
from services.style_trainer.service import StyleKeys, StyleTrainer
from services.style_trainer.settings import StyleSettings

FAST = style_pb2.StyleOptions(
    preset="tiny", num_style_images=2, max_train_steps=4, image_steps=2, checkpoint_every=2, seed=3
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def loaded():
    return {}


@pytest.fixture
def store(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "store", "dreamframe")


@pytest.fixture
def servicer(store, loaded, tmp_path_factory) -> StyleServicer:
    cache = tmp_path_factory.getbasetemp() / "style-models"
    trainer = StyleTrainer(store, default_preset="tiny", device="cpu", cache_dir=cache, pipelines=loaded)
    return StyleServicer(trainer, StyleSettings(device="cpu"))


@contextlib.asynccontextmanager
async def serving(servicer: StyleServicer) -> AsyncIterator[style_pb2_grpc.StyleServiceStub]:
    settings = ServerSettings(host="127.0.0.1", port=0, metrics_port=-1, grace_seconds=5.0)
    registration = Registration.of(style_pb2, style_pb2_grpc.add_StyleServiceServicer_to_server, servicer)
    async with GrpcServer([registration], settings, service_name="style-trainer") as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield style_pb2_grpc.StyleServiceStub(channel)


def run(coro, timeout: float = 120.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def story_ref(store: LocalStore, job: str) -> common_pb2.ObjectRef:
    story = Story(
        overview="o",
        style_keyword="Noir",
        style_description="film noir, harsh light",
        locations=["a bar"],
        # A story file needs at least one frame (dreamframe.limits); style training reads only the style.
        substories=[Substory(tiny_stories=[TinyStory(items=[StoryItem(kind="frame", text="at a bar")])])],
    )
    return to_proto(store.put_bytes(keys.story_key(job), story.to_json().encode()))


def test_trains_from_a_story_and_streams_progress(store, servicer):
    ref = story_ref(store, "grpc")

    async def go():
        async with serving(servicer) as stub:
            request = style_pb2.TrainStyleRequest(job_id="grpc", story=ref, options=FAST)
            first = [m async for m in stub.TrainStyle(request)]
            again = [m async for m in stub.TrainStyle(request)]
            return first, again

    first, again = run(go())
    phases = [m.phase for m in first]
    assert phases[0] == style_pb2.STYLE_PHASE_LOADING and phases[-1] == style_pb2.STYLE_PHASE_DONE
    assert style_pb2.STYLE_PHASE_GENERATING_IMAGES in phases
    training = [m for m in first if m.phase == style_pb2.STYLE_PHASE_TRAINING and m.step]
    assert [m.step for m in training] == [1, 2, 3, 4]
    assert all(m.progress.unit == "steps" and m.progress.total == 4 and m.learning_rate > 0 for m in training)
    assert all(np.isfinite(m.loss) and m.loss > 0 for m in training)
    result = first[-1].result
    assert result.token == "Noir" and len(result.style_images) == 2
    tensors = load(store.get_bytes(result.embedding.key))
    assert tensors["clip_l"].shape == (1, 32) and tensors["clip_g"].shape == (
        1,
        48,
    )  # the tiny preset's widths
    assert store.verify(from_proto(result.reference_embedding)) and store.verify(from_proto(result.embedding))
    # the rerun finds the verified outputs and answers at once
    assert len(again) == 1 and again[0].result == result


def test_direct_keyword_and_uploaded_images(store, servicer):
    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(buffer, "PNG")
    image = to_proto(store.put_bytes("uploads/a.png", buffer.getvalue()))

    async def go():
        async with serving(servicer) as stub:
            request = style_pb2.TrainStyleRequest(
                job_id="direct", style_keyword="Dramatic", style_images=[image, image], options=FAST
            )
            return [m async for m in stub.TrainStyle(request)]

    messages = run(go())
    assert style_pb2.STYLE_PHASE_GENERATING_IMAGES not in [m.phase for m in messages]
    assert messages[-1].result.token == "Dramatic" and list(messages[-1].result.style_images) == [
        image,
        image,
    ]


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"style_keyword": "", "style_description": "x"}, "style_keyword"),
        ({"style_keyword": "Noir"}, "style_images"),
        (
            {
                "style_keyword": "Noir",
                "style_description": "x",
                "options": style_pb2.StyleOptions(max_train_steps=-1),
            },
            "options.max_train_steps",
        ),
        (
            {
                "style_keyword": "Noir",
                "style_images": [common_pb2.ObjectRef(bucket="dreamframe", key="missing.png")],
            },
            "style_images.0",
        ),
        ({"story": common_pb2.ObjectRef(bucket="dreamframe", key="../story.json")}, "story.key"),
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(store, servicer, request_fields, field):
    async def go():
        async with serving(servicer) as stub:
            request = style_pb2.TrainStyleRequest(job_id="bad", **request_fields)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                _ = [m async for m in stub.TrainStyle(request)]
            return info.value

    error = run(go())
    assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    assert error_detail_from(error).field == field
    assert list(store.list("jobs/")) == []


def test_zero_options_mean_the_reference_defaults():
    options = options_from_proto(style_pb2.StyleOptions(), StyleSettings(preset="tiny", checkpoint_every=25))
    assert options.preset == "tiny"
    assert options.train.max_train_steps == 400 and options.train.gradient_accumulation_steps == 2
    assert options.train.resolution is None and options.train.checkpoint_every == 25
    assert options.images.num_images == 20 and options.images.steps == 40


def test_speed_settings_reach_the_training_options():
    settings = StyleSettings(
        compile=True,
        compile_text_encoders=False,
        channels_last=True,
        loss_read_every=5,
        attention_backend="cudnn",
    )
    train = options_from_proto(style_pb2.StyleOptions(), settings).train
    assert train.compile and train.compile_text_encoders is False and train.channels_last
    assert train.loss_read_every == 5 and train.attention_backend == "cudnn"
    defaults = options_from_proto(style_pb2.StyleOptions(), StyleSettings()).train
    assert (defaults.compile_text_encoders, defaults.loss_read_every) == (None, None)
    assert defaults.channels_last is False and defaults.attention_backend == "auto"


def test_a_caller_that_leaves_stops_the_training_at_a_checkpoint(store, servicer):
    ref = story_ref(store, "leave")
    long = style_pb2.StyleOptions(preset="tiny", num_style_images=1, max_train_steps=500, image_steps=1)

    async def go():
        async with serving(servicer) as stub:
            call = stub.TrainStyle(style_pb2.TrainStyleRequest(job_id="leave", story=ref, options=long))
            async for message in call:
                if message.step == 3:
                    call.cancel()
                    break
            await servicer.shutdown()  # waits for the training thread to checkpoint and end

    run(go())
    out = StyleKeys.of("leave", 0)
    assert store.exists(out.checkpoint) and not store.exists(out.embedding) and not store.exists(out.result)
    state = TrainingState.from_bytes(
        store.get_bytes(out.checkpoint), fingerprint=checkpoint_fingerprint(store, out)
    )
    assert state is not None and 3 <= state.step < 500


def checkpoint_fingerprint(store: LocalStore, out: StyleKeys) -> str:
    from services.style_trainer.embedding import safetensors_metadata

    return safetensors_metadata(store.get_bytes(out.checkpoint))["fingerprint"]
