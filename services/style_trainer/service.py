"""TrainStyle, transport-free: request → style images → textual inversion → embedding in storage.

Idempotent and resumable, as every stage:
- the request's inputs are fingerprinted first; when ``result.json`` under the style prefix carries the
  same fingerprint and its objects verify, the stored result is returned without loading a model;
- generated style images are reused by key (only missing ones are made);
- a checkpoint (rows + AdamW moments + step) is saved every N optimizer steps and on a requested stop;
  a rerun resumes from it;
- the embedding files are written only when training finished, ``result.json`` last (the commit mark),
  and the checkpoint is deleted after that.

Layout under ``keys.style_prefix(job, story)``::

    images/<hash>/NNN.png        generated style images
    checkpoint.safetensors       resumable training state (while training)
    embedding.safetensors        {"clip_l": [1, 768], "clip_g": [1, 1280]} (diffusers)
    embedding.pt                 {"emb": [768], "emb2": [1280]} (the reference's format)
    result.json                  token, refs, final loss, fingerprint
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from PIL import Image

from dreamframe import keys
from dreamframe.errors import Cancelled, FailedPrecondition, InvalidArgument, NotFound
from dreamframe.models import sdxl
from dreamframe.models.holder import ModelHolder
from dreamframe.progress import Progress, ProgressClock
from dreamframe.storage.base import ObjectRef, ObjectStore, sha256_bytes
from dreamframe.story import Story

from .checkpoint import TrainingState
from .embedding import (
    MAX_EMBEDDING_BYTES,
    PRESET_DIMS,
    StyleEmbedding,
    encoder_dims,
    import_embedding,
    validate_token,
)
from .images import (
    StyleImage,
    generate_style_images,
    generation_key_prefix,
    generation_prompts,
    load_style_images,
)
from .inversion import TextualInversion
from .options import (
    ImageOptions,
    StyleOptions,
    TrainOptions,
    resolve_resolution,
    validate_images,
    validate_train,
)

log = logging.getLogger(__name__)

# The warm-up's keyword: any word does (each training has its own tokenizer copies and token rows).
WARM_UP_KEYWORD = "warmup"

MAX_KEYWORD_CHARS = 64


class Phase(enum.Enum):
    LOADING = "loading"
    GENERATING_IMAGES = "generating_images"
    TRAINING = "training"
    SAVING = "saving"
    DONE = "done"


@dataclass(frozen=True)
class StyleRequest:
    job_id: str
    keyword: str
    description: str = ""
    locations: tuple[str, ...] = ()
    # User-supplied images; when given, none are generated.
    style_images: tuple[ObjectRef, ...] = ()
    story_index: int = 0
    options: StyleOptions = field(default_factory=StyleOptions)
    # An existing embedding to import instead of training (``import_embedding``).
    embedding: ObjectRef | None = None
    # The token asked for explicitly (the request's style_keyword), which beats the one an imported
    # file records; ``keyword`` is that or the story's.
    token: str = ""

    @classmethod
    def from_story(cls, job_id: str, story: Story, **kwargs) -> StyleRequest:
        return cls(
            job_id=job_id,
            keyword=story.style_keyword,
            description=story.style_description,
            locations=tuple(story.locations),
            **kwargs,
        )


@dataclass(frozen=True)
class StyleResult:
    token: str
    embedding: ObjectRef
    reference_embedding: ObjectRef
    style_images: tuple[ObjectRef, ...]
    final_loss: float
    steps: int
    # Work done by this call: passes computed (0 when reused) and the step it resumed from.
    passes_computed: int = 0
    resumed_from_step: int = 0
    reused: bool = False

    def to_json(self, fingerprint: str) -> dict:
        return {
            "fingerprint": fingerprint,
            "token": self.token,
            "embedding": asdict(self.embedding),
            "reference_embedding": asdict(self.reference_embedding),
            "style_images": [asdict(r) for r in self.style_images],
            "final_loss": None if math.isnan(self.final_loss) else self.final_loss,
            "steps": self.steps,
        }

    @classmethod
    def from_json(cls, data: dict) -> StyleResult:
        loss = data.get("final_loss")
        return cls(
            token=data["token"],
            embedding=ObjectRef(**data["embedding"]),
            reference_embedding=ObjectRef(**data["reference_embedding"]),
            style_images=tuple(ObjectRef(**r) for r in data["style_images"]),
            final_loss=float("nan") if loss is None else float(loss),
            steps=int(data["steps"]),
            reused=True,
        )


@dataclass(frozen=True, kw_only=True)
class StyleProgress(Progress):
    """One report of a training: the common progress (``message`` a line of text, ``current_item`` the
    style image just made), the phase, and while training the step's loss and learning rate; the last
    report (DONE) carries the result. Every field has a default: a report names what it knows."""

    unit: str = ""
    done: int = 0
    total: int = 0
    phase: Phase
    step: int = 0
    loss: float = float("nan")
    lr: float = 0.0
    result: StyleResult | None = None

    @property
    def eta(self) -> float:
        """``eta_seconds``: seconds left, negative when unknown."""
        return self.eta_seconds


@dataclass(frozen=True)
class StyleKeys:
    prefix: str

    @classmethod
    def of(cls, job_id: str, story_index: int) -> StyleKeys:
        return cls(keys.style_prefix(job_id, story_index))

    @property
    def embedding(self) -> str:
        return f"{self.prefix}embedding.safetensors"

    @property
    def reference_embedding(self) -> str:
        return f"{self.prefix}embedding.pt"

    @property
    def result(self) -> str:
        return f"{self.prefix}result.json"

    @property
    def checkpoint(self) -> str:
        return f"{self.prefix}checkpoint.safetensors"


def native_resolution(preset: str) -> int:
    """Image side a preset was trained for, known without loading it (tiny 64, SDXL 1024)."""
    return 64 if preset == sdxl.TINY else 1024


def validate_request(request: StyleRequest) -> StyleRequest:
    keyword = request.keyword.strip()
    if request.embedding is not None:
        # An import: the keyword is only the token's fallback, and nothing is trained or generated.
        if keyword:
            validate_token(keyword, field="style_keyword")
        keys.style_prefix(request.job_id, request.story_index)  # validates job_id and story_index
        return request
    if not keyword:
        raise InvalidArgument(
            "must not be empty (give a story with a style keyword, or the keyword)", field="style_keyword"
        )
    # One word, as the reference's keyword: it becomes the token the renderer binds the embedding to.
    if len(keyword) > MAX_KEYWORD_CHARS or any(c.isspace() or c in "{}" for c in keyword):
        raise InvalidArgument(
            f"must be one word of at most {MAX_KEYWORD_CHARS} characters, without spaces or braces",
            field="style_keyword",
        )
    if not request.style_images and not request.description.strip():
        raise InvalidArgument(
            "no style images given and no style description to generate them from", field="style_images"
        )
    keys.style_prefix(request.job_id, request.story_index)  # validates job_id and story_index
    validate_train(request.options.train)
    validate_images(request.options.images)
    return request


class StyleTrainer:
    """Holds the loaded pipelines (once per process and preset) and runs one training at a time."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        default_preset: str = sdxl.TINY,
        device: str = "auto",
        model_paths: dict[str, str] | None = None,
        cache_dir: Path = Path(".dreamframe/models"),
        pipelines: dict[str, sdxl.SDXLPipelines] | None = None,
        idle_release_s: float = 0.0,
    ) -> None:
        """``pipelines``: a preset → loaded pipelines cache to share between trainers in one process.
        ``idle_release_s`` > 0 (``models.idle_release_s``, GPU sharing): loaded pipelines are dropped
        after that long without a training and loaded again by the next one."""
        self.store = store
        self.default_preset = default_preset
        self.device = device
        self.model_paths = dict(model_paths or {})
        self.cache_dir = Path(cache_dir)
        self.models: ModelHolder[sdxl.SDXLPipelines] = ModelHolder(
            self._load, name="style-trainer", idle_release_s=idle_release_s, models=pipelines
        )
        self._run_lock = threading.Lock()

    def _load(self, preset: str) -> sdxl.SDXLPipelines:
        return sdxl.load_sdxl(
            preset,
            model_paths=self.model_paths,
            cache_dir=self.cache_dir,
            device=self.device,
            with_refiner=False,
        )

    def pipelines(self, preset: str) -> sdxl.SDXLPipelines:
        """The preset's pipelines, loaded on first use (preload; ``train`` holds them while it runs)."""
        return self.models.get(preset)

    def warm_up(self, preset: str, options: TrainOptions) -> None:
        """Preload ``preset``; when ``options.compile``, also train one step on a grey placeholder image,
        so the compile (or its load from the compile cache) happens before the service says SERVING,
        not inside the first TrainStyle. ``options`` are a default request's (the shapes it trains
        with); the step's embedding is thrown away and nothing is stored."""
        with self._run_lock, self.models.use(preset) as pipes:
            if not options.compile:
                return
            began = time.monotonic()
            trainer = TextualInversion(
                pipes, WARM_UP_KEYWORD, replace(options, max_train_steps=1, checkpoint_every=0)
            )
            side = trainer.resolution
            trainer.encode_images([Image.new("RGB", (side, side), (127, 127, 127))])
            for _ in trainer.train():
                pass
            log.info("warm-up training step (compile) took %.1f s", time.monotonic() - began)

    @property
    def loaded_presets(self) -> list[str]:
        return self.models.loaded()

    def close(self) -> None:
        self.models.close()

    # --- the RPC ---------------------------------------------------------------------------------
    def train(
        self, request: StyleRequest, *, should_stop: Callable[[], bool] | None = None
    ) -> Iterator[StyleProgress]:
        """Stream progress; the last item is DONE with the result. ``should_stop`` (checked between
        steps) saves a checkpoint and raises Cancelled."""
        request = validate_request(request)
        watch = ProgressClock(0)  # the training's stopwatch: every report's elapsed_seconds
        preset = request.options.preset or self.default_preset
        out = StyleKeys.of(request.job_id, request.story_index)
        if request.embedding is not None:
            yield self._import(request, preset, out, watch)
            return
        train_options = request.options.train
        image_options = request.options.images
        resolution = resolve_resolution(train_options, native_resolution(preset))
        min_size = image_options.min_size or resolution // 2
        keyword = request.keyword.strip()

        # Inputs first: user images are validated before any model is loaded.
        supplied = (
            load_style_images(self.store, request.style_images, min_size=min_size)
            if request.style_images
            else []
        )
        image_size = image_options.size or native_resolution(preset)
        prompts = generation_prompts(request.description, request.locations, image_options.num_images)
        images_prefix = generation_key_prefix(out.prefix, prompts, image_options, f"{preset}@{image_size}")
        fingerprint = _fingerprint(
            keyword=keyword,
            preset=preset,
            train=train_options.fingerprint_fields(),
            images=[r.ref.sha256 for r in supplied] if supplied else {"generated": images_prefix},
        )

        done = self._stored_result(out, fingerprint)
        if done is not None:
            yield StyleProgress(phase=Phase.DONE, message="already trained; outputs verified", result=done)
            return

        with self._run_lock, ExitStack() as held:
            # A duplicate request that waited for the lock finds what the first one stored.
            done = self._stored_result(out, fingerprint)
            if done is not None:
                yield StyleProgress(
                    phase=Phase.DONE, message="already trained; outputs verified", result=done
                )
                return
            yield StyleProgress(
                phase=Phase.LOADING, message=f"loading preset {preset!r}", elapsed_seconds=watch.elapsed
            )
            # In use until the training ends: an idle release never takes them from under it.
            pipes = held.enter_context(self.models.use(preset))

            if supplied:
                images = supplied
            else:
                images = yield from self._generate(
                    pipes, prompts, image_options, image_size, images_prefix, watch, should_stop
                )

            trainer = TextualInversion(pipes, keyword, train_options)
            yield StyleProgress(
                phase=Phase.TRAINING,
                unit="steps",
                total=train_options.max_train_steps,
                elapsed_seconds=watch.elapsed,
                message=f"encoding {len(images)} images (× {2 if train_options.mirror else 1}) to latents",
            )
            trainer.encode_images([item.image for item in images])
            resumed = self._resume(trainer, out, fingerprint)
            if resumed:
                yield StyleProgress(
                    phase=Phase.TRAINING,
                    unit="steps",
                    done=resumed,
                    total=train_options.max_train_steps,
                    step=resumed,
                    elapsed_seconds=watch.elapsed,
                    message=f"resumed from the checkpoint at step {resumed}",
                )
            passes = 0
            saved_step = resumed
            for report in trainer.train(should_stop=should_stop):
                passes = report.passes_computed
                yield StyleProgress(
                    phase=Phase.TRAINING,
                    unit="steps",
                    done=report.step,
                    total=report.total_steps,
                    elapsed_seconds=watch.elapsed,
                    eta_seconds=report.eta,
                    step=report.step,
                    loss=report.loss,
                    lr=report.lr,
                )
                every = train_options.checkpoint_every
                if (
                    every
                    and trainer.step % every == 0
                    and trainer.step not in (saved_step, report.total_steps)
                ):
                    self._save_checkpoint(trainer, out, fingerprint)
                    saved_step = trainer.step
            if trainer.step < train_options.max_train_steps:
                if trainer.step != saved_step:
                    self._save_checkpoint(trainer, out, fingerprint)
                raise Cancelled(f"stopped at step {trainer.step}; checkpoint saved, a rerun resumes from it")

            yield StyleProgress(
                phase=Phase.SAVING, message="writing the embedding", elapsed_seconds=watch.elapsed
            )
            result = self._save_result(trainer, images, out, fingerprint, passes, resumed)
            yield StyleProgress(
                phase=Phase.DONE,
                unit="steps",
                done=result.steps,
                total=result.steps,
                step=result.steps,
                loss=result.final_loss,
                elapsed_seconds=watch.elapsed,
                eta_seconds=0.0,
                result=result,
            )

    # --- an existing embedding ---------------------------------------------------------------------
    def _import(
        self, request: StyleRequest, preset: str, out: StyleKeys, watch: ProgressClock
    ) -> StyleProgress:
        """Import ``request.embedding`` (no training): read at most MAX_EMBEDDING_BYTES, convert and check
        it (``import_embedding``: weights_only, both rows, the preset's text-encoder widths, the token),
        store it in both formats. Idempotent: the same file, token and preset reuse the stored result."""
        data = self._read_embedding(request.embedding)
        dims = PRESET_DIMS.get(preset)
        if dims is None:  # a model path: its text encoders say (loaded once, as for training)
            with self.models.use(preset) as pipes:
                dims = encoder_dims(pipes.base)
        embedding = import_embedding(
            data,
            token=request.token,
            dims=dims,
            model=f"preset {preset!r}",
            field="embedding",
            token_field="style_keyword",
        )
        token = embedding.token or request.keyword.strip()
        if not token:
            raise InvalidArgument(
                "the embedding records no token and there is no style keyword: give one",
                field="style_keyword",
            )
        embedding = StyleEmbedding(token, embedding.clip_l, embedding.clip_g)
        fingerprint = _fingerprint(imported=sha256_bytes(data), token=token, preset=preset)
        done = self._stored_result(out, fingerprint)
        if done is None:
            done = StyleResult(
                token=token,
                embedding=self.store.put_bytes(out.embedding, embedding.to_safetensors()),
                reference_embedding=self.store.put_bytes(
                    out.reference_embedding, embedding.to_reference_pt()
                ),
                style_images=(),
                final_loss=float("nan"),
                steps=0,
            )
            self.store.put_json(out.result, done.to_json(fingerprint))  # the commit mark: written last
        return StyleProgress(
            phase=Phase.DONE,
            message=f"imported {request.embedding.key} (no training)",
            elapsed_seconds=watch.elapsed,
            result=done,
        )

    def _read_embedding(self, ref: ObjectRef) -> bytes:
        """The embedding file's bytes, refused past MAX_EMBEDDING_BYTES without reading the rest."""
        chunks: list[bytes] = []
        size = 0
        try:
            with self.store.open_stream(ref.key, bucket=ref.bucket or None) as stream:
                for chunk in stream:
                    size += len(chunk)
                    if size > MAX_EMBEDDING_BYTES:
                        raise InvalidArgument(
                            f"is larger than {MAX_EMBEDDING_BYTES} bytes; an embedding file is two rows",
                            field="embedding",
                        )
                    chunks.append(chunk)
        except NotFound:
            raise NotFound(f"no object {ref.key!r}", field="embedding") from None
        data = b"".join(chunks)
        if ref.sha256 and sha256_bytes(data) != ref.sha256:
            raise FailedPrecondition(
                f"object {ref.key!r} does not match the given sha256", field="embedding.sha256"
            )
        return data

    # --- pieces ----------------------------------------------------------------------------------
    def _generate(
        self,
        pipes: sdxl.SDXLPipelines,
        prompts: Sequence[str],
        options: ImageOptions,
        size: int,
        key_prefix: str,
        watch: ProgressClock,
        should_stop: Callable[[], bool] | None,
    ) -> Iterator[StyleProgress]:
        total = len(prompts)
        phase = Phase.GENERATING_IMAGES
        yield StyleProgress(phase=phase, unit="images", total=total, elapsed_seconds=watch.elapsed)
        found: dict[int, StyleImage] = {}
        clock = ProgressClock(total, "images")  # the ETA: from the pace of this phase alone
        for index, image in generate_style_images(
            pipes.base, self.store, prompts=prompts, options=options, size=size, key_prefix=key_prefix
        ):
            found[index] = image
            clock.advance()
            yield StyleProgress(
                phase=phase,
                unit="images",
                done=clock.done,
                total=total,
                current_item=image.ref.key,
                elapsed_seconds=watch.elapsed,
                eta_seconds=clock.eta,
            )
            if should_stop is not None and should_stop() and len(found) < total:
                raise Cancelled(f"stopped after {len(found)} of {total} style images; a rerun makes the rest")
        return [found[i] for i in range(total)]

    def _stored_result(self, out: StyleKeys, fingerprint: str) -> StyleResult | None:
        if not self.store.exists(out.result):
            return None
        try:
            data = self.store.get_json(out.result)
            if data.get("fingerprint") != fingerprint:
                return None
            result = StyleResult.from_json(data)
        except (ValueError, KeyError, TypeError):
            return None
        refs = (result.embedding, result.reference_embedding, *result.style_images)
        return result if all(self.store.verify(ref) for ref in refs) else None

    def _resume(self, trainer: TextualInversion, out: StyleKeys, fingerprint: str) -> int:
        if not self.store.exists(out.checkpoint):
            return 0
        state = TrainingState.from_bytes(self.store.get_bytes(out.checkpoint), fingerprint=fingerprint)
        if state is None or state.step >= trainer.options.max_train_steps:
            log.info("ignoring a checkpoint of another request at %s", out.checkpoint)
            return 0
        trainer.load_state(state)
        return state.step

    def _save_checkpoint(self, trainer: TextualInversion, out: StyleKeys, fingerprint: str) -> None:
        data = trainer.state(trainer.last_loss).to_bytes(fingerprint)
        self.store.put_bytes(out.checkpoint, data)

    def _save_result(
        self,
        trainer: TextualInversion,
        images: Sequence[StyleImage],
        out: StyleKeys,
        fingerprint: str,
        passes: int,
        resumed: int,
    ) -> StyleResult:
        embedding = trainer.embedding()
        result = StyleResult(
            token=embedding.token,
            embedding=self.store.put_bytes(out.embedding, embedding.to_safetensors()),
            reference_embedding=self.store.put_bytes(out.reference_embedding, embedding.to_reference_pt()),
            style_images=tuple(item.ref for item in images),
            final_loss=trainer.last_loss,
            steps=trainer.step,
            passes_computed=passes,
            resumed_from_step=resumed,
        )
        self.store.put_json(out.result, result.to_json(fingerprint))  # the commit mark: written last
        self.store.delete(out.checkpoint)
        return result


def _fingerprint(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=list).encode()).hexdigest()
