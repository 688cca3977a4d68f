"""The typer app behind ``dreamframe``. Commands are thin: gRPC calls to the coordinator, storage for
uploads and exports, and ``local`` for starting services on this machine."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import grpc
import typer
from google.protobuf import json_format
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn
from rich.table import Column, Table
from rich.text import Text

from dreamframe import job_watch, keys
from dreamframe.cli import local
from dreamframe.cli.export import export_job, relative
from dreamframe.config import Settings, get_settings
from dreamframe.errors import DreamFrameError, InvalidArgument
from dreamframe.limits import load_json_object, truncate
from dreamframe.serving.client import make_sync_channel
from dreamframe.stages import parse_stage, stage_name
from dreamframe.storage import open_store, to_proto
from dreamframe.story import Story, load_story
from dreamframe.v1 import coordinator_pb2 as pb
from dreamframe.v1 import coordinator_pb2_grpc
from dreamframe.v1.common_pb2 import ObjectRef

app = typer.Typer(
    help="DreamFrame: video-understanding training data, made automatically.", no_args_is_help=True
)
console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
REPO_ROOT = Path(__file__).resolve().parents[3]
TINY_JOB = REPO_ROOT / "deploy" / "local" / "tiny-job.json"
PRESETS = {
    "tiny": {
        "DREAMFRAME_PLOT__BACKEND": "local",
        "DREAMFRAME_PLOT__MODEL": "tiny",
        "DREAMFRAME_STYLE__PRESET": "tiny",
        "DREAMFRAME_RENDERER__PRESET": "tiny",
        "DREAMFRAME_TRAINER__PRESET": "tiny",
        "DREAMFRAME_COORDINATOR__TRAIN_BASE_MODEL": "tiny",
    },
    # The plot LLM comes from an OpenAI-compatible endpoint: set DREAMFRAME_PLOT__BASE_URL/API_KEY/MODEL.
    "sdxl": {
        "DREAMFRAME_PLOT__BACKEND": "openai",
        "DREAMFRAME_STYLE__PRESET": "sdxl",
        "DREAMFRAME_RENDERER__PRESET": "sdxl",
        "DREAMFRAME_TRAINER__PRESET": "llava-1.5-7b",
        "DREAMFRAME_COORDINATOR__TRAIN_BASE_MODEL": "llava-1.5-7b",
        "DREAMFRAME_STYLE__COMPILE": "true",
        "DREAMFRAME_RENDERER__COMPILE": "true",
    },
    # Every model at real size with seeded random weights, from hub-layout snapshots written once into the
    # model cache (dreamframe.models.snapshots; `python -m dreamframe.models.snapshots write` writes them
    # ahead): SDXL base + refiner with CLIP's real BPE, LLaVA-1.5-7B with a 32,000-token tokenizer, CLIP
    # ViT-L/14 for style consistency. The plot comes from the scripted OpenAI-protocol server, which
    # plot-llm starts inside itself (backend "scripted"): a random LLM writes no story that passes
    # validation, and the scripted story names a one-token style keyword as the reference's do.
    "sdxl-random": {
        "HF_HUB_OFFLINE": "1",
        "DREAMFRAME_PLOT__BACKEND": "scripted",
        "DREAMFRAME_PLOT__MODEL": "scripted",
        "DREAMFRAME_STYLE__PRESET": "sdxl-random",
        "DREAMFRAME_RENDERER__PRESET": "sdxl-random",
        "DREAMFRAME_TRAINER__PRESET": "llava-1.5-7b-random",
        "DREAMFRAME_COORDINATOR__TRAIN_BASE_MODEL": "llava-1.5-7b-random",
        "DREAMFRAME_EVALUATOR__IMAGE_ENCODER": "clip-vit-large-patch14-random",
        "DREAMFRAME_STYLE__COMPILE": "true",
        "DREAMFRAME_RENDERER__COMPILE": "true",
    },
}


def _settings() -> Settings:
    return get_settings()


def _stub(settings: Settings, address: str | None = None) -> coordinator_pb2_grpc.CoordinatorServiceStub:
    channel = make_sync_channel(address or settings.cli.coordinator_address, settings.client)
    return coordinator_pb2_grpc.CoordinatorServiceStub(channel)


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


def _state(value: int) -> str:
    return pb.JobState.Name(value).removeprefix("JOB_STATE_").lower()


def _when(ts) -> str:
    """A timestamp in this machine's local time."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(_seconds(ts))) if ts.seconds else "-"


# --- local services ------------------------------------------------------------------------------


def _local_env(settings: Settings, preset: str) -> dict[str, str]:
    """Environment for local services: one local store and model cache under the state dir."""
    state = settings.cli.state_dir.resolve()
    env = {
        "DREAMFRAME_STORAGE__BACKEND": settings.storage.backend,
        "DREAMFRAME_STORAGE__ROOT": str(
            settings.storage.root.resolve() if settings.storage.backend == "local" else settings.storage.root
        ),
        "DREAMFRAME_MODELS__CACHE_DIR": str(settings.models.cache_dir.resolve()),
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1" if preset == "tiny" else "0"),
    }
    # One word picks every service's model: tiny (random, CPU) or the real ones (GPU).
    presets = PRESETS.get(preset)
    if presets is None:
        raise _fail(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}", 2)
    for variable, value in presets.items():
        env[variable] = os.environ.get(variable, value)
    state.mkdir(parents=True, exist_ok=True)
    return env


UP_DEFAULTS: dict[str, object] = {"preset": "tiny", "renderers": 1, "gpus": 0, "base_port": None}


UP_HELP = (
    "Start the local services that are not running (local store, the given model preset).\n\n"
    "Idempotent: services already running are left alone (same processes, same ports); a recorded one that "
    "is not running (it crashed or was killed) starts again on its port with its environment. Options left "
    "out mean what the recorded stack was started with. Asking running services for another setup "
    "(preset, renderers, gpus, base port) is refused and stops nothing: `dreamframe down` first. To restart "
    "one running service: `dreamframe restart SERVICE`."
)
RESTART_HELP = (
    "Restart one local service: stop it as `down` does, start it again on its port.\n\n"
    "SIGTERM, up to --grace seconds to finish its work, then SIGKILL; then the same module on the same port "
    "with the environment `up` gave it, and wait until it is healthy. The other services keep running (the "
    "coordinator reconnects by itself). SERVICE is a name `dreamframe up` lists: plot-llm, style-trainer, "
    "keyframe-renderer, keyframe-renderer-1, ..., qa-generator, trainer, evaluator, coordinator."
)


@app.command(help=UP_HELP)
def up(
    preset: Annotated[
        str | None, typer.Option(help="Model preset for every service: tiny or sdxl.", show_default="tiny")
    ] = None,
    renderers: Annotated[
        int | None, typer.Option(min=1, help="keyframe-renderer replicas.", show_default="1")
    ] = None,
    gpus: Annotated[
        int | None, typer.Option(min=0, help="Pin renderer replica r to GPU r mod N.", show_default="0")
    ] = None,
    base_port: Annotated[
        int | None, typer.Option(help="Coordinator port; the others follow it.", show_default="50060")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for every service to be healthy.")] = 600,
    gpu_budget: Annotated[
        list[str] | None,
        typer.Option(
            help="SERVICE=FRACTION: that service's share of its GPU when GPU services share one "
            "(overrides the computed budget; a service name covers its replicas). Repeatable."
        ),
    ] = None,
    gpu_memory_gib: Annotated[
        float | None,
        typer.Option(help="The GPU's memory, for the budgets.", show_default="read with nvidia-smi, else 80"),
    ] = None,
    idle_release_s: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="Seconds without work before a GPU service that shares its GPU drops its models.",
            show_default="per service: renderer 300, style-trainer 120; 30 when the card is shared in turns",
        ),
    ] = None,
) -> list[str]:
    # Help: UP_HELP.
    settings = _settings()
    state_dir = settings.cli.state_dir
    recorded = local.read_stack(state_dir).setup
    asked = {"preset": preset, "renderers": renderers, "gpus": gpus, "base_port": base_port}
    setup = {k: v if v is not None else recorded.get(k, UP_DEFAULTS[k]) for k, v in asked.items()}
    env = _local_env(settings, str(setup["preset"]))  # a bad preset ends here, before anything starts
    gpu = _gpu_policy(env, gpu_budget or [], gpu_memory_gib, idle_release_s)
    try:
        procs, started = local.ensure_services(
            state_dir,
            env=env,
            renderers=int(setup["renderers"]),
            gpus=int(setup["gpus"]),
            base_port=setup["base_port"],
            setup=setup,
            gpu=gpu,
        )
    except local.SetupMismatch as exc:
        raise _fail(str(exc)) from None
    try:
        with console.status(f"waiting for {len(started)} services to load their models..."):
            local.wait_healthy(procs, timeout=timeout)
    except (RuntimeError, TimeoutError) as exc:
        # Only what this call started is stopped; services that were running stay up.
        local.stop_processes([p for p in procs if p.name in started], grace=5)
        raise _fail(f"{exc}; `dreamframe up` again starts what is not running") from None
    table = Table("service", "address", "pid", "", "log")
    for p in procs:
        note = "started" if p.name in started else "[dim]was running"
        table.add_row(p.name, f"{local.HOST}:{p.port}", str(p.pid), note, relative(Path(p.log)))
    console.print(table)
    _print_gpu_sharing(procs)
    return started


def _gpu_policy(
    env: dict[str, str], budgets: list[str], card_gib: float | None, idle_release_s: float | None
) -> local.GpuPolicy:
    """How the local runner shares GPUs (local.plan_gpu_sharing), from `up`'s options."""
    known = {*local.SERVICES, *(p.name for p in local.service_plan(renderers=64)[0])}
    parsed: dict[str, float] = {}
    for item in budgets:
        name, sep, value = item.partition("=")
        try:
            fraction = float(value)
        except ValueError:
            fraction = -1.0
        if not sep or name.strip() not in known or not 0.0 <= fraction <= 1.0:
            raise _fail(
                f"--gpu-budget {item!r}: expected SERVICE=FRACTION with a service `up` starts "
                f"({', '.join(local.SERVICES)}) and a fraction in [0, 1]",
                2,
            )
        parsed[name.strip()] = fraction
    if card_gib is not None and card_gib <= 0:
        raise _fail(f"--gpu-memory-gib must be positive, got {card_gib}", 2)
    services = local.gpu_services_for({**os.environ, **env})
    return local.GpuPolicy(
        services,
        card_gib=card_gib if card_gib is not None else (local.card_gib() if services else None),
        budgets=parsed,
        idle_release_s=idle_release_s,
    )


def _print_gpu_sharing(procs: list[local.Process]) -> None:
    """The GPU budgets and idle release the processes run with (what their environment says)."""
    rows = [
        (p.name, p.env.get(local.FRACTION_ENV, ""), p.env.get(local.IDLE_ENV, ""))
        for p in procs
        if p.env.get(local.FRACTION_ENV) or p.env.get(local.IDLE_ENV)
    ]
    if not rows:
        return
    table = Table("GPU service", "memory fraction (models.gpu_memory_fraction)", "idle release (s)")
    for row in rows:
        table.add_row(*row)
    console.print(table)


@app.command(help=RESTART_HELP)
def restart(
    service: Annotated[
        str, typer.Argument(help="A service `dreamframe up` started, e.g. keyframe-renderer-1.")
    ],
    grace: Annotated[float, typer.Option(help="Seconds the service gets to finish.")] = 30,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for it to be healthy again.")] = 600,
) -> None:
    # Help: RESTART_HELP.
    state_dir = _settings().cli.state_dir
    try:
        proc = local.restart_service(state_dir, service, grace=grace)
    except LookupError as exc:
        raise _fail(str(exc.args[0]), 2) from None
    try:
        with console.status(f"waiting for {service} to load its models..."):
            local.wait_healthy([proc], timeout=timeout)
    except (RuntimeError, TimeoutError) as exc:
        raise _fail(str(exc)) from None
    console.print(f"restarted {service} on {local.HOST}:{proc.port} (pid {proc.pid})")


@app.command()
def down(grace: Annotated[float, typer.Option(help="Seconds each service gets to finish.")] = 30) -> None:
    """Stop the local services started by `up` (SIGTERM, then SIGKILL after --grace)."""
    stopped = local.stop_services(_settings().cli.state_dir, grace=grace)
    console.print(f"stopped {len(stopped)} services" if stopped else "nothing was running")


# --- jobs ----------------------------------------------------------------------------------------


def _build_spec(
    settings: Settings,
    themes: list[str],
    stories: list[Path],
    stages: str | None,
    spec_file: Path | None,
    name: str | None,
    style: dict[str, list[str]] | None = None,
) -> pb.JobSpec:
    spec = pb.JobSpec()
    if spec_file is not None:
        data = _read_bounded(settings, spec_file, "--spec")
        try:
            # Size and nesting checked before parsing (a deeply nested file is an error, not a crash).
            obj = load_json_object(data, field="--spec", limits=settings.limits, what="a job spec")
            json_format.ParseDict(obj, spec)
        except json_format.ParseError as exc:
            message = f"cannot read job spec: {truncate(str(exc), 200)}"
            raise InvalidArgument(message, field="--spec") from None
    for theme in themes:
        spec.stories.add(theme=theme)
    for path in stories:
        spec.stories.add(story=_upload_story(settings, path)[0])
    if stages:
        del spec.stages[:]
        spec.stages.extend(parse_stage(s) for s in stages.split(",") if s.strip())
    if name:
        spec.name = name
    if style is not None:
        _apply_style_flags(settings, spec, style)
    return spec


# --- a story's style (submit's --style-* flags, import-style) --------------------------------------

STYLE_FLAG_HELP = "[N:]VALUE: N is the story's position in the job (themes, then --story files, from 0)."
STYLE_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # what the seed's load_imgs reads from its folder
MAX_STYLE_IMAGE_BYTES = 64 * 1024 * 1024


def _story_of(value: str, count: int, option: str) -> tuple[int, str]:
    """``N:VALUE`` → (N, VALUE); without the prefix the value is the job's only story's."""
    head, sep, rest = value.partition(":")
    if sep and head.isdigit():
        index = int(head)
        if index >= count:
            raise InvalidArgument(f"no story {index}: the job has {count} (counted from 0)", field=option)
        return index, rest
    if count != 1:
        raise InvalidArgument(f"the job has {count} stories: say whose, as N:VALUE (N from 0)", field=option)
    return 0, value


def _apply_style_flags(settings: Settings, spec: pb.JobSpec, style: dict[str, list[str]]) -> None:
    """Put each --style-* value on its story: a description as it is, image files (or the images of a
    folder) and an embedding file uploaded to storage. The server checks the combination."""
    count = len(spec.stories)
    for value in style.get("token", []):
        index, token = _story_of(value, count, "--style-token")
        spec.stories[index].style_token = token
    for value in style.get("description", []):
        index, text = _story_of(value, count, "--style-description")
        spec.stories[index].style_description = text
    for value in style.get("image", []):
        index, path = _story_of(value, count, "--style-image")
        for image in _style_image_files(Path(path)):
            data = _read_capped(image, MAX_STYLE_IMAGE_BYTES, "--style-image")
            key = f"uploads/style-images/{hashlib.sha256(data).hexdigest()}{image.suffix.lower()}"
            spec.stories[index].style_images.append(
                to_proto(open_store(settings.storage).put_bytes(key, data))
            )
    for value in style.get("embedding", []):
        index, path = _story_of(value, count, "--style-embedding")
        story = spec.stories[index]
        preset = spec.render.preset  # checked against the renderer's encoders when the job names its preset
        ref, _ = _import_style_file(settings, Path(path), story.style_token, preset, "--style-embedding")
        story.style_embedding.CopyFrom(ref)


def _style_image_files(path: Path) -> list[Path]:
    """A file, or a folder's PNG/JPEG files in name order (as the seed's load_imgs walks its folder:
    DreamFrame-code StyleImmobilization/style_embedding.py)."""
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in STYLE_IMAGE_SUFFIXES)
        if not found:
            raise InvalidArgument(
                f"{path} holds no {'/'.join(STYLE_IMAGE_SUFFIXES)} files", field="--style-image"
            )
        return found
    return [path]


def _read_capped(path: Path, limit: int, field: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > limit:
            raise InvalidArgument(f"{path} has {size} bytes; at most {limit} allowed", field=field)
        return path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {path}: {exc.strerror}", field=field) from None


def _import_style_file(
    settings: Settings, path: Path, token: str, preset: str, field: str
) -> tuple[ObjectRef, object]:
    """Check an embedding file (our safetensors or the seed's .pt) and upload it as safetensors under
    uploads/styles/<sha256>.safetensors: (its ref, the StyleEmbedding). ``preset``: check the rows
    against that model's text encoders (empty: the style stage checks them against the job's)."""
    try:  # torch reads the .pt: installed with the style and renderer extras
        from services.style_trainer.embedding import MAX_EMBEDDING_BYTES, PRESET_DIMS, import_embedding
    except ImportError as exc:
        raise InvalidArgument(
            f"reading an embedding needs torch and safetensors (pip install 'dreamframe[style]'): {exc.name}",
            field=field,
        ) from None
    if preset and preset not in PRESET_DIMS:
        raise InvalidArgument(f"unknown preset {preset!r}; known: {', '.join(PRESET_DIMS)}", field="--preset")
    data = _read_capped(path, MAX_EMBEDDING_BYTES, field)
    embedding = import_embedding(
        data,
        token=token,
        dims=PRESET_DIMS.get(preset),
        model=f"preset {preset!r}",
        field=str(path),
        token_field="--token" if field == "import-style" else "--style-token",
    )
    converted = embedding.to_safetensors()
    key = f"uploads/styles/{hashlib.sha256(converted).hexdigest()}.safetensors"
    return to_proto(open_store(settings.storage).put_bytes(key, converted)), embedding


def _read_bounded(settings: Settings, path: Path, field: str) -> bytes:
    """A file's bytes, refused before reading when it is larger than ``limits.story_bytes``."""
    try:
        size = path.stat().st_size
        limit = settings.limits.story_bytes
        if size > limit:
            message = f"{path} has {size} bytes; at most {limit} allowed (limits.story_bytes)"
            raise InvalidArgument(message, field=field)
        return path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {path}: {exc.strerror}", field=field) from None


def _upload_story(settings: Settings, path: Path) -> tuple[ObjectRef, Story]:
    """Validate a story file (either format, within the ``limits`` settings) and put it in storage
    under uploads/<sha256>.json; nothing is uploaded when it is refused."""
    data = _read_bounded(settings, path, "story")
    story = load_story(data, field=str(path), limits=settings.limits)
    store = open_store(settings.storage)
    return to_proto(store.put_bytes(f"uploads/{hashlib.sha256(data).hexdigest()}.json", data)), story


@app.command()
def submit(
    theme: Annotated[list[str], typer.Option("--theme", "-t", help="A theme to expand (repeatable).")] = [],  # noqa: B006
    story: Annotated[list[Path], typer.Option("--story", help="A story file to use (repeatable).")] = [],  # noqa: B006
    stages: Annotated[str | None, typer.Option(help="Comma-separated stages (default: all).")] = None,
    spec: Annotated[Path | None, typer.Option(help="JobSpec JSON with per-stage options.")] = None,
    job_id: Annotated[str | None, typer.Option(help="Choose the job id (idempotent).")] = None,
    name: Annotated[str | None, typer.Option(help="A label for the job.")] = None,
    watch_: Annotated[bool, typer.Option("--watch/--no-watch", help="Follow the job until it ends.")] = False,
    coordinator: Annotated[str | None, typer.Option(help="Coordinator address.")] = None,
    style_description: Annotated[
        list[str], typer.Option(help=f"A style description to make style images from. {STYLE_FLAG_HELP}")
    ] = [],  # noqa: B006
    style_image: Annotated[
        list[str], typer.Option(help=f"A style image, or a folder of them (repeatable). {STYLE_FLAG_HELP}")
    ] = [],  # noqa: B006
    style_embedding: Annotated[
        list[str],
        typer.Option(help=f"An existing embedding, .pt or .safetensors (no training). {STYLE_FLAG_HELP}"),
    ] = [],  # noqa: B006
    style_token: Annotated[
        list[str],
        typer.Option(help=f"The style's token (default: the story's style keyword). {STYLE_FLAG_HELP}"),
    ] = [],  # noqa: B006
) -> None:
    """Submit a job: themes and/or story files through the selected stages.

    A story file in the reference format has no style description: for the style stage give each one a
    --style-description, --style-image or --style-embedding (the seed's .pt as it is)."""
    settings = _settings()
    style = {
        "description": style_description,
        "image": style_image,
        "embedding": style_embedding,
        "token": style_token,
    }
    try:
        request = pb.SubmitJobRequest(
            spec=_build_spec(settings, theme, story, stages, spec, name, style), job_id=job_id or ""
        )
        job = _call(lambda: _stub(settings, coordinator).SubmitJob(request)).job
    except DreamFrameError as exc:
        raise _fail(str(exc), 2) from None
    console.print(f"submitted job [bold]{job.job_id}[/] ({len(job.spec.stories)} stories)")
    if watch_:
        _watch(settings, job.job_id, coordinator)


def _call(fn):
    try:
        return fn()
    except grpc.RpcError as exc:
        raise _fail(
            f"{exc.code().name}: {exc.details()}", 2 if exc.code() == grpc.StatusCode.INVALID_ARGUMENT else 1
        ) from None


def _seconds(ts) -> float:
    return ts.seconds + ts.nanos / 1e9


def _duration(seconds: float) -> str:
    """4.2s, 3m07s, 2h05m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def stage_times(status: pb.StageStatus) -> tuple[float | None, float | None]:
    """The stage's started_at/finished_at (the coordinator's clock) as epoch seconds, None where unset."""
    started = _seconds(status.started_at) if status.HasField("started_at") else None
    finished = _seconds(status.finished_at) if status.HasField("finished_at") else None
    return started, finished


def stage_duration(status: pb.StageStatus, now: float | None = None) -> str:
    """How long the stage ran (so far, while it runs); "-" for one that has not started."""
    started, finished = stage_times(status)
    if started is None:
        return "-"
    end = finished if finished is not None else (time.time() if now is None else now)
    return _duration(max(0.0, end - started)) + ("" if finished is not None else " so far")


class _StageTime(ProgressColumn):
    """A stage's own time from the coordinator's started_at/finished_at; it ticks while the stage runs."""

    def render(self, task: Task) -> Text:
        started, finished = task.fields.get("started"), task.fields.get("finished")
        if started is None:
            return Text("-", style="progress.elapsed")
        end = finished if finished is not None else time.time()
        return Text(_duration(max(0.0, end - started)), style="progress.elapsed")


class _StageEta(ProgressColumn):
    """The service's estimate of the time left (counting down between updates); blank when unknown."""

    def render(self, task: Task) -> Text:
        eta_at = task.fields.get("eta_at")
        if eta_at is None:
            return Text("")
        return Text(f"eta {_duration(max(0.0, eta_at - time.time()))}", style="progress.remaining")


def _watch(settings: Settings, job_id: str, coordinator: str | None = None) -> pb.Job:
    stub = _stub(settings, coordinator)
    job = None
    columns = (
        TextColumn("[bold]{task.description:<7}", table_column=Column(no_wrap=True, min_width=7)),
        BarColumn(bar_width=24),
        MofNCompleteColumn(table_column=Column(no_wrap=True, min_width=9)),
        TextColumn("{task.fields[unit]:<7}", table_column=Column(no_wrap=True, min_width=7)),
        _StageTime(table_column=Column(no_wrap=True, min_width=6, justify="right")),
        _StageEta(table_column=Column(no_wrap=True, min_width=10)),
        TextColumn("[dim]{task.fields[item]}", table_column=Column(no_wrap=True, overflow="ellipsis")),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        tasks: dict[int, int] = {}
        try:
            for job in job_watch.follow(
                stub.WatchJob(
                    pb.WatchJobRequest(job_id=job_id), timeout=settings.client.stream_deadline_seconds
                )
            ):
                for status in job.stages:
                    if status.stage not in tasks:
                        tasks[status.stage] = progress.add_task(
                            stage_name(status.stage), total=None, unit="", item="", started=None
                        )
                    p = status.progress
                    total = p.total if p.total > 0 else None
                    done = p.done
                    if status.state == pb.JOB_STATE_SUCCEEDED:
                        total = total or 1
                        done = total
                    item = p.current_item if status.state == pb.JOB_STATE_RUNNING else _state(status.state)
                    if status.error:
                        item = f"[red]{status.error}"
                    started, finished = stage_times(status)
                    running = status.state == pb.JOB_STATE_RUNNING and finished is None
                    eta_at = time.time() + p.eta_seconds if running and p.eta_seconds > 0 else None
                    progress.update(
                        tasks[status.stage],
                        completed=done,
                        total=total,
                        unit=p.unit,
                        item=item[:80],
                        started=started,
                        finished=finished,
                        eta_at=eta_at,
                    )
        except grpc.RpcError as exc:
            raise _fail(f"{exc.code().name}: {exc.details()}") from None
    if job is not None:
        colour = {"succeeded": "green", "failed": "red", "cancelled": "yellow"}.get(
            _state(job.state), "white"
        )
        console.print(f"job {job.job_id}: [bold {colour}]{_state(job.state)}[/] {job.error}")
    return job


@app.command()
def watch(job_id: str, coordinator: Annotated[str | None, typer.Option()] = None) -> None:
    """Follow a job with a progress bar per stage until it ends."""
    job = _watch(_settings(), job_id, coordinator)
    if job is not None and job.state != pb.JOB_STATE_SUCCEEDED:
        raise typer.Exit(1)


@app.command()
def status(job_id: str, coordinator: Annotated[str | None, typer.Option()] = None) -> None:
    """A job's stages, progress and outputs."""
    job = _call(lambda: _stub(_settings(), coordinator).GetJob(pb.GetJobRequest(job_id=job_id))).job
    console.print(
        f"job [bold]{job.job_id}[/] {_state(job.state)} · submitted {_when(job.created_at)}"
        f" · renderer replicas {job.renderer_replicas}"
    )
    if job.error:
        console.print(f"[red]{job.error}")
    table = Table("stage", "state", "progress", "started", "time", "outputs", "error")
    for s in job.stages:
        table.add_row(
            stage_name(s.stage),
            _state(s.state),
            f"{s.progress.done}/{s.progress.total} {s.progress.unit}",
            _when(s.started_at) if s.HasField("started_at") else "-",
            stage_duration(s),
            str(len(s.outputs)),
            s.error,
        )
    console.print(table)
    for named in job.outputs:
        console.print(f"{named.name}: {named.ref.bucket}/{named.ref.key}")


@app.command("ls")
def list_jobs(coordinator: Annotated[str | None, typer.Option()] = None) -> None:
    """Jobs, newest first (by submit time)."""
    reply = _call(lambda: _stub(_settings(), coordinator).ListJobs(pb.ListJobsRequest(page_size=50)))
    console.print(jobs_table(reply.jobs))


def jobs_table(jobs) -> Table:
    """One row a job. The id and the state are never cut (the id is what every other command takes),
    whatever the terminal's width."""
    id_width = max((len(job.job_id) for job in jobs), default=3)
    state_width = max((len(_state(job.state)) for job in jobs), default=5)
    table = Table(
        Column("job", no_wrap=True, min_width=id_width),
        Column("state", no_wrap=True, min_width=state_width),
        Column("submitted", min_width=10),  # the date on one line, the time below it when narrow
        "stories",
        Column("stages", overflow="fold"),
        "name",
    )
    for job in jobs:
        table.add_row(
            job.job_id,
            _state(job.state),
            _when(job.created_at),
            str(job.story_count or len(job.spec.stories)),
            ",".join(stage_name(s.stage) for s in job.stages),
            job.spec.name,
        )
    return table


@app.command()
def cancel(job_id: str, coordinator: Annotated[str | None, typer.Option()] = None) -> None:
    """Cancel a job: every running stage stops."""
    job = _call(lambda: _stub(_settings(), coordinator).CancelJob(pb.CancelJobRequest(job_id=job_id))).job
    console.print(f"job {job.job_id}: {_state(job.state)}")


# --- story files ---------------------------------------------------------------------------------


@app.command("import-story")
def import_story(path: Path) -> None:
    """Check a story file (reference or native format) and upload it; prints its storage key."""
    settings = _settings()
    try:
        ref, story = _upload_story(settings, path)
    except DreamFrameError as exc:
        raise _fail(str(exc), 2) from None
    console.print(f"{path}: {story.frame_count} frames, {len(story.all_qa())} QA → {ref.bucket}/{ref.key}")
    console.print(f"use it with: dreamframe submit --story {path}")


@app.command("import-style")
def import_style(
    path: Path,
    token: Annotated[
        str, typer.Option(help="The token to bind it to (default: the file's, else the story's keyword).")
    ] = "",
    preset: Annotated[str, typer.Option(help="Check the rows against this preset's text encoders.")] = "sdxl",
) -> None:
    """Check a style embedding (DreamFrame's .safetensors or the seed project's .pt) and upload it as
    safetensors; prints the ObjectRef for a job spec's stories[N].styleEmbedding."""
    settings = _settings()
    try:
        ref, embedding = _import_style_file(settings, path, token, preset, "import-style")
    except DreamFrameError as exc:
        raise _fail(str(exc), 2) from None
    dims = embedding.dims()
    bound = (
        f"token {embedding.token!r}" if embedding.token else "no token (the story's style keyword is used)"
    )
    console.print(f"{path}: clip_l {dims[0]} + clip_g {dims[1]}, {bound} → {ref.bucket}/{ref.key}")
    console.print(json.dumps(json_format.MessageToDict(ref)), markup=False, highlight=False)
    console.print(
        f"use it with: dreamframe submit --story STORY.json --stages style,render --style-embedding {path}"
    )


@app.command("export-story")
def export_story(
    job_id: str,
    story_index: Annotated[int, typer.Option("--story", help="Which story of the job.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Output file (default: stdout).")] = None,
) -> None:
    """Write a job's story in the reference story-file format."""
    store = open_store(_settings().storage)
    key = keys.story_key(job_id, story_index)
    if not store.exists(key):
        raise _fail(f"no story {story_index} in job {job_id} ({key})", 2)
    text = json.dumps(load_story(store.get_bytes(key)).to_reference(), indent=2, ensure_ascii=False)
    if out is None:
        sys.stdout.write(text + "\n")
    else:
        out.write_text(text + "\n", encoding="utf-8")
        console.print(f"wrote {out}")


# --- datasets ------------------------------------------------------------------------------------

dataset_app = typer.Typer(help="Datasets the qa-generator writes.", no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")


@dataset_app.command("check")
def dataset_check(
    dataset: Annotated[str, typer.Argument(help="A local folder or file, else a storage prefix or key.")],
    profile: Annotated[str, typer.Option(help="llama-vid (default) or llava-next-video.")] = "",
    max_video_seconds: Annotated[float, typer.Option(help="Longest video; 0: no limit.")] = 300.0,
    show: Annotated[int, typer.Option(help="Problems printed at most.")] = 100,
) -> None:
    """Check a dataset against a trainer's data-loader rules; exit 1 if any record breaks one."""
    # The rules live beside the code that writes the records.
    from services.qa_generator import check

    try:
        check.get_profile(profile, field="profile")  # before reading anything
        if Path(dataset).exists():
            loaded = check.open_local(Path(dataset))
        else:
            loaded = check.open_stored(open_store(_settings().storage), dataset)
        report = check.check_dataset(loaded, profile, max_video_seconds=max_video_seconds)
    except DreamFrameError as exc:
        raise _fail(str(exc), 2) from None
    for problem in report.problems[:show]:
        console.print(problem.line(), markup=False, highlight=False)
    console.print(
        f"{report.profile}: {report.records} records in {len(report.files)} files, "
        f"{report.bad_records} bad ({len(report.problems)} problems)"
        + (f"; text-query tokens counted {report.token_count}" if report.token_count else "")
    )
    if not report.ok:
        raise typer.Exit(1)


# --- cluster -------------------------------------------------------------------------------------


@app.command()
def health(
    addresses: list[str],
    timeout: Annotated[float, typer.Option(help="Seconds per check.")] = 5,
) -> None:
    """Ask each service's gRPC health check; exits 1 unless every one is SERVING (`helm test` runs this)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    settings = _settings()
    failed = 0
    for address in addresses:
        try:
            with make_sync_channel(address, settings.client) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=timeout
                )
            state = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as exc:
            state = f"{exc.code().name}: {exc.details()}"
        ok = state == "SERVING"
        failed += not ok
        console.print(f"{'[green]ok' if ok else '[red]FAIL'}[/] {address} {state}")
    if failed:
        raise typer.Exit(1)


@app.command("deploy")
def deploy_command(
    release: Annotated[str, typer.Option(help="Helm release name.")] = "dreamframe",
    namespace: Annotated[str, typer.Option("--namespace", "-n")] = "dreamframe",
    values: Annotated[list[Path], typer.Option("--values", "-f", help="Values files (repeatable).")] = [],  # noqa: B006
    set_: Annotated[list[str], typer.Option("--set", help="key=value overrides (repeatable).")] = [],  # noqa: B006
    dry_run: Annotated[str | None, typer.Option(help="client or server: render/validate only.")] = None,
    kube_context: Annotated[str | None, typer.Option(help="kubectl context (default: current).")] = None,
    wait: Annotated[bool, typer.Option(help="Wait until every pod is ready.")] = False,
) -> None:
    """helm upgrade --install of charts/dreamframe (Helm's Go SDK; no helm binary needed)."""
    from dreamframe.cli.deploy import collect_values, deploy

    try:
        manifest = deploy(
            release,
            namespace,
            collect_values(values, set_),
            dry_run=dry_run,
            kube_context=kube_context,
            wait=wait,
        )
    except DreamFrameError as exc:
        raise _fail(str(exc), 2) from None
    kinds = [line.split(":", 1)[1].strip() for line in manifest.splitlines() if line.startswith("kind:")]
    verb = "rendered (dry run)" if dry_run else "deployed"
    console.print(f"release {release} in namespace {namespace}: {verb}, {len(kinds)} objects")


# --- the whole thing -----------------------------------------------------------------------------


@app.command()
def run(
    theme: Annotated[str, typer.Option("--theme", "-t")] = "a lighthouse keeper befriends a lost robot",
    preset: Annotated[str, typer.Option(help="tiny (CPU, seconds) or sdxl (GPU, real models).")] = "tiny",
    spec: Annotated[
        Path | None, typer.Option(help="JobSpec JSON (default: deploy/local/tiny-job.json).")
    ] = None,
    renderers: Annotated[
        int | None,
        typer.Option(min=1, help="keyframe-renderer replicas.", show_default="1, or the running stack's"),
    ] = None,
    keep_running: Annotated[bool, typer.Option(help="Leave the services up afterwards.")] = False,
) -> None:
    """Start the services, run one job through every stage, export the results, stop the services.

    Services that were already running (an earlier `dreamframe up`) are used and left running."""
    settings = _settings()
    spec = spec or (TINY_JOB if preset == "tiny" else None)
    started = time.monotonic()
    was_running = bool(local.running_services(settings.cli.state_dir))
    keep_running = keep_running or was_running
    up(preset=preset, renderers=renderers, gpus=None, base_port=None, timeout=900)
    coordinator = next(p for p in local.read_state(settings.cli.state_dir) if p.name == "coordinator")
    address = f"{local.HOST}:{coordinator.port}"
    try:
        request = pb.SubmitJobRequest(spec=_build_spec(settings, [theme], [], None, spec, "make run"))
        job = _call(lambda: _stub(settings, address).SubmitJob(request)).job
        console.print(f"job [bold]{job.job_id}[/]: {theme!r}")
        job = _watch(settings, job.job_id, address)
        if job is None or job.state != pb.JOB_STATE_SUCCEEDED:
            raise _fail(
                f"job ended {_state(job.state) if job else 'unknown'}; logs in {settings.cli.state_dir}/logs"
            )
        where = export_job(open_store(settings.storage), job.job_id, settings.cli.runs_dir)
        _print_results(job, where, time.monotonic() - started)
    finally:
        if not keep_running:
            down(grace=30)


def _print_results(job: pb.Job, where: dict[str, Path], seconds: float) -> None:
    root = where["job"]
    # contact_sheet_<story>_<page>.jpg, paged (dreamframe.storyboard, not imported here: it needs Pillow).
    sheets = sorted((root / "storyboard").glob("contact_sheet_*.jpg"))
    rows = [
        ("story", root / "stories/000/story.json", "the story (native format)"),
        ("reference story", root / "stories/000/reference_story.json", "the reference story-file format"),
        ("keyframes", root / "stories/000/frames", "one PNG per frame + JSON sidecar"),
        ("storyboard", root / "storyboard/index.html", "open in a browser"),
        (
            "contact sheets",
            sheets[0] if sheets else root / "storyboard/contact_sheet_000_00.jpg",
            f"every frame's thumbnail on a grid ({len(sheets)} sheet{'' if len(sheets) == 1 else 's'})",
        ),
        ("dataset", where.get("dataset", root / "dataset"), "LLaVA JSON, videos, MC items, card"),
        ("checkpoint", where.get("model", root / "model"), "the fine-tuned model (Hugging Face format)"),
        ("report", where.get("report", root / "report"), "evaluation report (JSON + Markdown)"),
    ]
    console.print(f"\n[bold]job {job.job_id} finished in {seconds:.0f}s[/]; results under {relative(root)}/")
    for name, path, what in rows:
        shown = relative(path) if path.exists() else f"[dim]{relative(path)} (not made)[/]"
        console.print(f"  [bold]{name:<16}[/]{shown}", soft_wrap=True)
        console.print(f"  {'':<16}[dim]{what}[/]")


if __name__ == "__main__":
    app()
