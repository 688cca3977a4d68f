"""Render fan-out benchmark: one story's frames through the coordinator onto 1 and then N renderer replicas.

    python -m services.coordinator.bench --replicas 2 --gpus 2 --preset sdxl-random --frames 64 --out DIR
    python -m services.coordinator.bench --replicas 2 --preset tiny --frames 8 --steps 4 --out DIR   # CPU

Starts N keyframe-renderer processes (replica r pinned to GPU r mod --gpus, as ``dreamframe up --gpus``
does) on one local store, then for n = 1 and n = N a coordinator that knows the first n replicas. Each
phase submits a warm-up job (one shard per replica: first-batch costs such as cuDNN autotuning are not
timed) and then a render-only job for a story of --frames frames, and reports:

- images/s: frames ÷ seconds from SubmitJob until the coordinator has every frame reported;
- how many frames each replica delivered, duplicate reports and re-sent shards (from frames.json);
- that the store holds exactly one PNG for every frame index;
- scaling: N replicas' images/s ÷ one replica's (the target is at least 0.9·N).

Shards are --shard-size frames (default: the batch size), so the frames split evenly over replicas when
--frames is a multiple of N × shard size. Writes ``fanout-bench.json`` under --out.
"""

from __future__ import annotations

import json
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import typer

from dreamframe import commandline, keys
from dreamframe.cli import local
from dreamframe.config import StorageSettings
from dreamframe.storage import open_store
from dreamframe.storage.base import ObjectRef
from dreamframe.v1 import common_pb2, coordinator_pb2_grpc, render_pb2
from dreamframe.v1 import coordinator_pb2 as pb

RENDERER = "services.keyframe_renderer"
COORDINATOR = "services.coordinator"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((local.HOST, 0))
        return s.getsockname()[1]


def bench_story_json(frames: int) -> str:
    from services.keyframe_renderer.bench.common import bench_story

    return bench_story(frames).to_json()


def put_story(store, name: str, frames: int) -> common_pb2.ObjectRef:
    ref: ObjectRef = store.put_bytes(f"inputs/{name}.json", bench_story_json(frames).encode())
    return common_pb2.ObjectRef(bucket=ref.bucket, key=ref.key, size=ref.size, sha256=ref.sha256)


def render_job(story: common_pb2.ObjectRef, args: BenchArgs, name: str) -> pb.JobSpec:
    return pb.JobSpec(
        name=name,
        stories=[pb.StoryInput(story=story)],
        stages=[pb.STAGE_RENDER],
        render=render_pb2.RenderOptions(steps=args.steps, batch_size=args.batch_size),
    )


def run_job(stub, spec: pb.JobSpec, job_id: str, timeout: float) -> tuple[pb.Job, float]:
    """Submit; return the finished job and the seconds until its last frame was reported."""
    started = time.perf_counter()
    stub.SubmitJob(pb.SubmitJobRequest(spec=spec, job_id=job_id), timeout=30)
    frames_done_at = None
    deadline = started + timeout
    while time.perf_counter() < deadline:
        job = stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=30).job
        render = next(s for s in job.stages if s.stage == pb.STAGE_RENDER)
        if frames_done_at is None and render.progress.total and render.progress.done == render.progress.total:
            frames_done_at = time.perf_counter()
        if job.state in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED):
            if job.state != pb.JOB_STATE_SUCCEEDED:
                raise RuntimeError(f"job {job_id} ended {pb.JobState.Name(job.state)}: {job.error}")
            return job, (frames_done_at or time.perf_counter()) - started
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} not done after {timeout:.0f}s")


def frames_listing(store, job: pb.Job) -> dict:
    render = next(s for s in job.stages if s.stage == pb.STAGE_RENDER)
    (ref,) = [o.ref for o in render.outputs if o.name.startswith("frames/")]
    return store.get_json(ref.key)


def stored_frame_indices(store, job_id: str, story_index: int = 0) -> list[int]:
    listed = store.list(keys.frames_prefix(job_id, story_index))
    return sorted(int(Path(i.key).stem) for i in listed if i.key.endswith(".png"))


def count_frames(store, job_id: str, stories: int, frames: int) -> tuple[int, int]:
    """(frames missing, extra files) over every story: one PNG per frame index, nothing else."""
    missing = extra = 0
    for s in range(stories):
        indices = stored_frame_indices(store, job_id, s)
        missing += len(set(range(frames)) - set(indices))
        extra += len(indices) - len(set(indices)) + len(set(indices) - set(range(frames)))
    return missing, extra


def local_work(work_dir: Path | None, prefix: str) -> tuple[Path, Path, dict[str, str]]:
    """A bench's folder (a temp dir by default), its logs folder, and the environment that puts every
    process it starts on one local store there."""
    work = Path(work_dir or tempfile.mkdtemp(prefix=prefix))
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {
        "DREAMFRAME_STORAGE__BACKEND": "local",
        "DREAMFRAME_STORAGE__ROOT": str(work / "store"),
        "DREAMFRAME_MODELS__CACHE_DIR": str(work / "models"),
    }
    return work, logs, env


def start_coordinator(addresses: list[str], env: dict[str, str], logs: Path, name: str) -> local.Process:
    planned = local.Planned(name, COORDINATOR, free_port(), {})
    coordinator_env = {
        **env,
        "DREAMFRAME_COORDINATOR__RENDERER_ADDRESSES": ",".join(addresses),
        "DREAMFRAME_COORDINATOR__KUBERNETES__ENABLED": "false",
    }
    return local.spawn(planned, coordinator_env, logs / f"{name}.log")


def phase(n: int, renderers: list[local.Process], env, store, logs: Path, args) -> dict:
    """One coordinator over the first ``n`` replicas: a warm-up job, then the timed one."""
    from dreamframe.serving.client import make_sync_channel

    addresses = [f"{local.HOST}:{p.port}" for p in renderers[:n]]
    coordinator = start_coordinator(addresses, env, logs, f"coordinator-{n}")
    try:
        local.wait_healthy([coordinator], timeout=120)
        with make_sync_channel(f"{local.HOST}:{coordinator.port}") as channel:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
            warm = put_story(store, f"warmup-{n}", n * args.shard_size)
            _, warm_seconds = run_job(stub, render_job(warm, args, "warm-up"), f"warmup-{n}", args.timeout)
            story = put_story(store, f"story-{n}", args.frames)
            job, seconds = run_job(stub, render_job(story, args, f"{n} replicas"), f"timed-{n}", args.timeout)
        listing = frames_listing(store, job)
        stored = stored_frame_indices(store, job.job_id)
    finally:
        local.stop_processes([coordinator])
    return {
        "replicas": n,
        "frames": args.frames,
        "seconds": seconds,
        "images_per_second": args.frames / seconds,
        "warmup_seconds": warm_seconds,
        "by_replica": listing["by_replica"],
        "rendered": listing["rendered"],
        "skipped": listing["skipped"],
        "duplicate_reports": listing["duplicate_reports"],
        "resent_shards": listing["resent_shards"],
        "every_frame_once": stored == list(range(args.frames))
        and sum(listing["by_replica"].values()) == args.frames
        and listing["rendered"] == args.frames,
    }


def run(args: BenchArgs) -> dict:
    work, logs, env = local_work(args.work_dir, "fanout-bench-")
    env |= {
        "DREAMFRAME_RENDERER__PRESET": args.preset,
        "DREAMFRAME_RENDERER__BATCH_SIZE": str(args.batch_size),
        "DREAMFRAME_RENDERER__COMPILE": "true" if args.compile else "false",
        "DREAMFRAME_COORDINATOR__RENDER_SHARD_SIZE": str(args.shard_size),
        "HF_HUB_OFFLINE": "1",
    }
    store = open_store(StorageSettings(backend="local", root=work / "store"))
    renderers = []
    for r in range(args.replicas):
        pinned = {"CUDA_VISIBLE_DEVICES": str(r % args.gpus)} if args.gpus else {}
        planned = local.Planned(f"renderer-{r}", RENDERER, free_port(), pinned)
        renderers.append(local.spawn(planned, env, logs / f"{planned.name}.log"))
    try:
        started = time.perf_counter()
        local.wait_healthy(renderers, timeout=args.timeout)
        load_seconds = time.perf_counter() - started
        phases = [phase(n, renderers, env, store, logs, args) for n in sorted({1, args.replicas})]
    finally:
        local.stop_processes(renderers)
    one, many = phases[0], phases[-1]
    scaling = many["images_per_second"] / one["images_per_second"]
    return {
        "preset": args.preset,
        "replicas": args.replicas,
        "gpus": args.gpus,
        "frames": args.frames,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "shard_size": args.shard_size,
        "compile": args.compile,
        "gpu": _gpu_name(),
        "replica_load_seconds": load_seconds,
        "phases": phases,
        "scaling": scaling,
        "scaling_efficiency": scaling / args.replicas,
        "renderers": [asdict(r) for r in renderers],
    }


def _gpu_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001 - only a label
        return "unknown"


def summarize(report: dict) -> str:
    lines = [
        f"render fan-out — {report['gpu']}, preset {report['preset']}, {report['frames']} frames, "
        f"{report['steps'] or 'default'} steps, batch {report['batch_size']}, "
        f"shards of {report['shard_size']}",
        f"replicas ready (model built) in {report['replica_load_seconds']:.1f} s",
        "| replicas | seconds | images/s | frames per replica | duplicates | re-sent shards "
        "| each frame once |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in report["phases"]:
        split = ", ".join(f"{k}: {v}" for k, v in sorted(p["by_replica"].items()))
        lines.append(
            f"| {p['replicas']} | {p['seconds']:.1f} | {p['images_per_second']:.3f} | {split} | "
            f"{p['duplicate_reports']} | {p['resent_shards']} | {'yes' if p['every_frame_once'] else 'NO'} |"
        )
    n = report["replicas"]
    lines.append(
        f"scaling 1 → {n} replicas: {report['scaling']:.2f}× ({report['scaling_efficiency'] * 100:.0f}% of "
        f"linear; target ≥ {0.9 * n:.1f}×)"
    )
    return "\n".join(lines)


@dataclass(frozen=True)
class BenchArgs:
    """The command line's choices (see ``bench`` for each one's meaning)."""

    replicas: int
    gpus: int
    preset: str
    frames: int
    steps: int
    batch_size: int
    shard_size: int
    compile: bool
    timeout: float
    work_dir: Path | None
    out: Path | None


app = typer.Typer(add_completion=False)


@app.command(help=__doc__.splitlines()[0])
def bench(
    replicas: Annotated[int, typer.Option()] = 2,
    gpus: Annotated[int, typer.Option(help="pin replica r to GPU r mod N (0: no pinning)")] = 0,
    preset: Annotated[str, typer.Option(help="renderer preset: tiny, sdxl-random, sdxl")] = "tiny",
    frames: Annotated[int, typer.Option()] = 16,
    steps: Annotated[int, typer.Option(help="denoising steps (0: the reference 40)")] = 0,
    batch_size: Annotated[int, typer.Option()] = 8,
    shard_size: Annotated[int, typer.Option(help="frames per shard (0: the batch size)")] = 0,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile in the renderers")] = False,
    timeout: Annotated[float, typer.Option()] = 900,
    work_dir: Annotated[
        Path | None, typer.Option(help="store, models and logs (default: a temp dir)")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="write fanout-bench.json here")] = None,
) -> BenchArgs:
    return BenchArgs(
        replicas=replicas,
        gpus=gpus,
        preset=preset,
        frames=frames,
        steps=steps,
        batch_size=batch_size,
        shard_size=shard_size or batch_size,
        compile=compile,
        timeout=timeout,
        work_dir=work_dir,
        out=out,
    )


def parse_args(argv: list[str] | None = None) -> BenchArgs:
    """The command line (default: the process's); ``--help`` and usage errors exit."""
    return commandline.run(app, argv)


def publish(report: dict, summary: str, out: Path | None, filename: str) -> dict:
    """Print a bench's summary and, with ``out``, write its report there as JSON."""
    print(summary, flush=True)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / filename).write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = run(args)
    return publish(report, summarize(report), args.out, "fanout-bench.json")


if __name__ == "__main__":
    main()
