"""Before any work: what each model of a request is (its name, identity — the answer cache's key — and
how to open it; nothing is loaded yet) and each benchmark's items, read from its files. A checkpoint
that is not there or a benchmark without files is refused here, naming the field."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dreamframe.errors import FailedPrecondition, InvalidArgument, NotFound
from dreamframe.storage.base import ObjectStore
from services.evaluator.settings import EvaluatorSettings

from .benchmarks import BENCHMARKS, STYLE_CONSISTENCY
from .benchmarks.base import Benchmark, Location
from .endpoints import endpoint_label, resolve_model_endpoint
from .items import LoadedBenchmark
from .models import (
    PredictionsModel,
    VideoQAModel,
    checkpoint_identity,
    load_checkpoint_model,
    load_downloaded_checkpoint,
    make_endpoint_model,
)
from .report import BenchmarkRun, ModelRun
from .request import BenchmarkSpec, ModelSpec
from .sources import open_location


@dataclass
class PlannedModel:
    spec: ModelSpec
    run: ModelRun
    open: Callable[[], VideoQAModel]


@dataclass
class LoadedBench:
    """A benchmark ready to run: its items (question answering) or its stories (style consistency,
    ``benchmark`` None)."""

    spec: BenchmarkSpec
    benchmark: Benchmark | None
    loaded: LoadedBenchmark
    run: BenchmarkRun
    stories: list[tuple[str, Location]] = field(default_factory=list)


def plan_model(
    i: int, spec: ModelSpec, store: ObjectStore, settings: EvaluatorSettings, *, model_cache_dir: Path
) -> PlannedModel:
    """``models[i]``: its report entry and the factory that loads it when its turn comes."""
    name = spec.name or spec.checkpoint_prefix or spec.preset or endpoint_label(spec.endpoint)
    frames = spec.num_frames or settings.num_frames
    device = settings.device
    if spec.checkpoint_prefix:
        try:
            identity, files = checkpoint_identity(store, spec.checkpoint_prefix)
        except NotFound as exc:
            raise NotFound(exc.message, field=f"models[{i}].checkpoint_prefix") from exc
        source: dict = {"checkpoint_prefix": spec.checkpoint_prefix}

        def open_model() -> VideoQAModel:
            return load_downloaded_checkpoint(
                store,
                spec.checkpoint_prefix,
                files,
                settings.work_dir,
                identity,
                device=device,
                keep=settings.keep_downloaded_checkpoints,
                size_limit=settings.work_dir_size_limit,
            )

    elif spec.preset:
        from dreamframe.models import video_llm

        where = settings.model_paths.get(spec.preset) or video_llm.HUB_IDS.get(spec.preset, spec.preset)
        identity = (
            f"preset:{video_llm.TINY}:v{video_llm.TINY_VERSION}"
            if spec.preset == video_llm.TINY and spec.preset not in settings.model_paths
            else f"preset:{spec.preset}:{where}"
        )
        source = {"preset": spec.preset}

        def open_model() -> VideoQAModel:
            path = video_llm.resolve_model_path(spec.preset, settings.model_paths, model_cache_dir)
            return load_checkpoint_model(path, identity, device=device)

    elif spec.endpoint is not None:
        endpoint = resolve_model_endpoint(spec.endpoint, settings, field=f"models[{i}].endpoint")
        identity = endpoint.identity
        source = {"endpoint": endpoint.describe()}

        def open_model() -> VideoQAModel:
            return make_endpoint_model(
                endpoint, timeout=settings.endpoint_timeout_seconds, max_retries=settings.openai_max_retries
            )

    else:
        identity = f"predictions:{name}"
        source = {"predictions": True}

        def open_model() -> VideoQAModel:
            return PredictionsModel(name)

    return PlannedModel(spec, ModelRun(name, identity, source, frames), open_model)


def load_benchmark(
    i: int, spec: BenchmarkSpec, store: ObjectStore, settings: EvaluatorSettings
) -> LoadedBench:
    """``benchmarks[i]``: its items (bad ones become per-item errors) or, for style consistency, its
    stories' frame folders; no files at all is an INVALID_ARGUMENT."""
    where = f"benchmarks[{i}]"
    roots = settings.local_data_roots
    name = spec.name or spec.kind
    run = BenchmarkRun(name, spec.kind, spec.data_prefix, spec.video_prefix)
    if spec.kind == STYLE_CONSISTENCY:
        stories = []
        for j, prefix in enumerate(spec.frame_prefixes):
            source, base = open_location(
                prefix, store, local_roots=roots, field=f"{where}.frame_prefixes[{j}]"
            )
            stories.append((prefix, Location(source, base)))
        return LoadedBench(spec, None, LoadedBenchmark(), run, stories)
    benchmark = BENCHMARKS[spec.kind].for_settings(settings)
    source, base = open_location(spec.data_prefix, store, local_roots=roots, field=f"{where}.data_prefix")
    videos = None
    if spec.video_prefix:
        vsource, vbase = open_location(
            spec.video_prefix, store, local_roots=roots, field=f"{where}.video_prefix"
        )
        videos = Location(vsource, vbase)
    loaded = benchmark.load(Location(source, base), videos, max_items=spec.max_items)
    if not loaded.files:
        raise InvalidArgument(
            f"no {spec.kind} files found under {spec.data_prefix!r}"
            + (f" ({loaded.errors[0].reason})" if loaded.errors else ""),
            field=f"{where}.data_prefix",
        )
    if not loaded.items:
        # Nothing could be scored (a Video-Bench file without answers, every video missing, ...): an
        # empty report is no result.
        reasons = "; ".join(dict.fromkeys(f"{e.item_id}: {e.reason}" for e in loaded.errors[:3]))
        raise FailedPrecondition(
            f"no {spec.kind} item under {spec.data_prefix!r} can be scored"
            + (f" ({reasons})" if reasons else ""),
            field=f"{where}.data_prefix",
        )
    run.files, run.items, run.load_errors = loaded.files, len(loaded.items), loaded.errors
    return LoadedBench(spec, benchmark, loaded, run)
