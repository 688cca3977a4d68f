"""StyleService over gRPC: a thin adapter over ``service.StyleTrainer``.

TrainStyle converts the request (loading the story when one is referenced), runs the blocking training
in a worker thread and streams its progress. When the caller goes away or the server shuts down, the
training is asked to stop: it saves a checkpoint between steps and a rerun resumes from it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
from collections.abc import AsyncIterator, Callable

from dreamframe.config import Settings
from dreamframe.models.device import apply_memory_budget
from dreamframe.serving import Done, Registration, ThreadJobs, run_service, serve, stream_from_thread
from dreamframe.serving import progress_to_proto as common_progress_to_proto
from dreamframe.serving.readiness import StorageReadiness
from dreamframe.storage import from_proto, open_store, to_proto
from dreamframe.storage.base import ObjectStore
from dreamframe.story import load_story
from dreamframe.v1 import style_pb2, style_pb2_grpc
from services.style_trainer.settings import StyleSettings

from .options import ImageOptions, StyleOptions, TrainOptions
from .service import Phase, StyleProgress, StyleRequest, StyleResult, StyleTrainer

SERVICE = "style-trainer"

PHASES = {
    Phase.LOADING: style_pb2.STYLE_PHASE_LOADING,
    Phase.GENERATING_IMAGES: style_pb2.STYLE_PHASE_GENERATING_IMAGES,
    Phase.TRAINING: style_pb2.STYLE_PHASE_TRAINING,
    Phase.SAVING: style_pb2.STYLE_PHASE_SAVING,
    Phase.DONE: style_pb2.STYLE_PHASE_DONE,
}


def options_from_proto(options: style_pb2.StyleOptions, settings: StyleSettings) -> StyleOptions:
    """Zero fields mean the reference defaults (negative ones are passed on, to be refused by name)."""
    train, images = TrainOptions(), ImageOptions()

    def pick(value: int, default):
        return value if value != 0 else default

    return StyleOptions(
        preset=options.preset or settings.preset,
        train=TrainOptions(
            max_train_steps=pick(options.max_train_steps, train.max_train_steps),
            gradient_accumulation_steps=pick(
                options.gradient_accumulation_steps, train.gradient_accumulation_steps
            ),
            resolution=pick(options.resolution, None),
            seed=options.seed,
            checkpoint_every=pick(options.checkpoint_every, settings.checkpoint_every),
            compile=settings.compile,
            compile_mode=settings.compile_mode,
            compile_text_encoders=settings.compile_text_encoders,
            channels_last=settings.channels_last,
            loss_read_every=settings.loss_read_every,
            attention_backend=settings.attention_backend,
        ),
        images=ImageOptions(
            num_images=pick(options.num_style_images, images.num_images),
            steps=pick(options.image_steps, images.steps),
            size=pick(options.image_size, None),
            seed=options.seed,
        ),
    )


def request_from_proto(
    request: style_pb2.TrainStyleRequest, store: ObjectStore, settings: StyleSettings
) -> StyleRequest:
    """The domain request; a referenced story supplies the keyword, description and locations, and the
    request's own keyword and description replace the story's (a reference-format story has none)."""
    common = dict(
        job_id=request.job_id,
        story_index=request.story_index,
        style_images=tuple(
            from_proto(ref, field=f"style_images.{i}") for i, ref in enumerate(request.style_images)
        ),
        options=options_from_proto(request.options, settings),
        embedding=from_proto(request.embedding, field="embedding") if request.HasField("embedding") else None,
        token=request.style_keyword,
    )
    if request.HasField("story"):
        ref = from_proto(request.story, field="story")
        story = load_story(store.get_bytes(ref.key, bucket=ref.bucket or None), field="story")
        request_from_story = StyleRequest.from_story(story=story, **common)
        return dataclasses.replace(
            request_from_story,
            keyword=request.style_keyword or request_from_story.keyword,
            description=request.style_description or request_from_story.description,
        )
    return StyleRequest(keyword=request.style_keyword, description=request.style_description, **common)


def result_to_proto(result: StyleResult) -> style_pb2.TrainStyleResult:
    return style_pb2.TrainStyleResult(
        embedding=to_proto(result.embedding),
        reference_embedding=to_proto(result.reference_embedding),
        token=result.token,
        style_images=[to_proto(ref) for ref in result.style_images],
        final_loss=result.final_loss,
    )


def progress_to_proto(event: StyleProgress) -> style_pb2.TrainStyleResponse:
    progress = common_progress_to_proto(event)
    # This stream's common.Progress has always carried the report's text (or the style image just made)
    # as current_item and the phase's name as message.
    progress.current_item = event.current_item or event.message
    progress.message = event.phase.value
    response = style_pb2.TrainStyleResponse(
        phase=PHASES[event.phase],
        progress=progress,
        step=event.step,
        loss=event.loss if not math.isnan(event.loss) else 0.0,
        learning_rate=event.lr,
    )
    if event.result is not None:
        response.result.CopyFrom(result_to_proto(event.result))
    return response


class StyleServicer(style_pb2_grpc.StyleServiceServicer):
    def __init__(self, trainer: StyleTrainer, settings: StyleSettings) -> None:
        self.trainer = trainer
        self.settings = settings
        # A training outlives an abandoned RPC until it has checkpointed.
        self._running = ThreadJobs()

    async def TrainStyle(
        self, request: style_pb2.TrainStyleRequest, context: object
    ) -> AsyncIterator[style_pb2.TrainStyleResponse]:
        def train(emit: Callable[[StyleProgress], None], stop: threading.Event) -> None:
            domain_request = request_from_proto(request, self.trainer.store, self.settings)
            for event in self.trainer.train(domain_request, should_stop=stop.is_set):
                emit(event)

        # When the caller leaves (or all is done) a running training checkpoints and stops; its error is
        # raised here, mapped to a status by serving.
        async for event in stream_from_thread(
            train, name=f"train-style-{request.job_id}", keep=self._running
        ):
            if not isinstance(event, Done):
                yield progress_to_proto(event)

    async def shutdown(self) -> None:
        """Shutdown hook: ask every training to checkpoint and stop, and wait for them."""
        self._running.stop_all()
        await self._running.wait_idle()


def build(settings: Settings) -> tuple[StyleTrainer, StyleServicer]:
    trainer = StyleTrainer(
        open_store(settings.storage),
        default_preset=settings.style.preset,
        device=settings.style.device,
        model_paths=settings.style.model_paths,
        cache_dir=settings.models.cache_dir,
        idle_release_s=settings.models.idle_release_s,
    )
    return trainer, StyleServicer(trainer, settings.style)


async def amain(settings: Settings) -> None:
    # This process's share of a GPU that other services use too (0: the whole card).
    apply_memory_budget(settings.models.gpu_memory_fraction, settings.style.device)
    trainer, servicer = build(settings)
    # Storage must answer, and the default model be loaded (when preloading) and, when compiling, its
    # first training step compiled for a default request's shapes.
    ready = StorageReadiness(trainer.store, "jobs/")
    if settings.style.preload:
        defaults = options_from_proto(style_pb2.StyleOptions(), settings.style)
        ready.track(
            asyncio.create_task(
                asyncio.to_thread(trainer.warm_up, defaults.preset, defaults.train), name="preload-model"
            )
        )

    try:
        await serve(
            [Registration.of(style_pb2, style_pb2_grpc.add_StyleServiceServicer_to_server, servicer)],
            settings.server,
            service_name=SERVICE,
            readiness=ready,
            shutdown_hooks=[servicer.shutdown],
        )
    finally:
        trainer.close()
        trainer.store.close()


def main() -> None:
    run_service(amain)


if __name__ == "__main__":
    main()
