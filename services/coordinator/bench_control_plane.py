"""Control-plane benchmark (CPU only): the real coordinator over a simulated GPU fleet.

    python -m services.coordinator.bench_control_plane --stories 10 --stories 50 --replicas 4 --out DIR
    make bench-control-plane

The fleet is N real keyframe-renderer processes on the ``sim`` preset: the same RenderService, storage
writes, idempotent skipping and streaming as on GPUs, with the model replaced by a fixed latency per frame
and a tiny deterministic PNG (services/keyframe_renderer/sim.py). For each story count S it submits one
render-only job of S stories × --frames frames to a fresh coordinator, watches it with one WatchJob
stream, and reports:

- coordinator CPU-seconds per 1,000 frames (user + system time of the coordinator process, from /proc)
  and frames/s (frames ÷ seconds from SubmitJob to the job's end);
- the coordinator's peak RSS (VmHWM) and the bytes of job state in storage (``job.json``);
- WatchJob bytes/s received by the one watcher;
- 0 frames lost / 0 duplicated: every story holds exactly one PNG per frame index, and the render
  stage's frame listings count each frame once.

Targets (issue 18): CPU per frame flat from 10 to 200 stories (≤ +10 %) and ≤ 0.2 ms; RSS ≤ 500 MiB at
200 stories. This measures whatever the coordinator does today; the README's performance section has
the figures.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from dreamframe import commandline, job_watch, keys
from dreamframe.cli import local
from dreamframe.config import StorageSettings
from dreamframe.serving.client import make_sync_channel
from dreamframe.storage import open_store
from dreamframe.storyboard import story_page_key, storyboard_key
from dreamframe.v1 import coordinator_pb2 as pb
from dreamframe.v1 import coordinator_pb2_grpc

from .bench import (
    RENDERER,
    count_frames,
    free_port,
    local_work,
    publish,
    put_story,
    start_coordinator,
)
from .bench_fleet import run_fleet_events, summarize_fleet

TERMINAL = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (fields 14 and 15 of /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class Watcher(threading.Thread):
    """One WatchJob stream, counting the bytes of every update it receives."""

    def __init__(self, address: str, job_id: str) -> None:
        super().__init__(daemon=True)
        self.address, self.job_id = address, job_id
        self.bytes = 0
        self.updates = 0

    def run(self) -> None:
        with make_sync_channel(self.address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
            try:
                job = None
                for update in stub.WatchJob(pb.WatchJobRequest(job_id=self.job_id), timeout=24 * 3600):
                    self.bytes += update.ByteSize()
                    self.updates += 1
                    job = job_watch.apply(job, update)
                    if job.state in TERMINAL:
                        return
            except Exception:  # noqa: BLE001 - the job's end is read by the poller; a broken watch shows as 0
                return


def duplicate_reports(store, job: pb.Job) -> int:
    render = next(s for s in job.stages if s.stage == pb.STAGE_RENDER)
    total = 0
    for named in render.outputs:
        if named.name.startswith("frames/"):
            total += store.get_json(named.ref.key).get("duplicate_reports", 0)
    return total


def boards_missing(store, job_id: str, stories: int) -> int:
    """Story pages not in the store, plus one when the job's index page is not (the storyboard's work
    counts only when it was done)."""
    pages = [story_page_key(job_id, s) for s in range(stories)] + [storyboard_key(job_id)]
    return sum(not store.exists(key) for key in pages)


def run_scenario(stories: int, args: BenchArgs, renderers: list[local.Process], env, store, logs) -> dict:
    refs = [put_story(store, f"cp-{stories}-{s}", args.frames) for s in range(stories)]
    spec = pb.JobSpec(
        name=f"control plane {stories} stories",
        stories=[pb.StoryInput(story=ref) for ref in refs],
        stages=[pb.STAGE_RENDER],
    )
    addresses = [f"{local.HOST}:{p.port}" for p in renderers]
    coordinator = start_coordinator(addresses, env, logs, f"coordinator-{stories}")
    job_id = f"cp-{stories}"
    try:
        local.wait_healthy([coordinator], timeout=120)
        address = f"{local.HOST}:{coordinator.port}"
        cpu_before = cpu_seconds(coordinator.pid)
        with make_sync_channel(address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
            started = time.perf_counter()
            stub.SubmitJob(pb.SubmitJobRequest(spec=spec, job_id=job_id), timeout=60)
            watcher = Watcher(address, job_id)
            watcher.start()
            deadline = started + args.timeout
            while True:
                job = stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=60).job
                if job.state in TERMINAL or time.perf_counter() > deadline:
                    break
                time.sleep(1.0)
            seconds = time.perf_counter() - started
            watcher.join(timeout=10)
        cpu = cpu_seconds(coordinator.pid) - cpu_before
        rss = peak_rss_bytes(coordinator.pid)
    finally:
        local.stop_processes([coordinator])
    frames = stories * args.frames
    missing, extra = count_frames(store, job_id, stories, args.frames)
    job_state = store.stat(keys.job_state_key(job_id)).size
    return {
        "stories": stories,
        "frames": frames,
        "state": pb.JobState.Name(job.state),
        "error": job.error,
        "seconds": seconds,
        "frames_per_second": frames / seconds,
        "coordinator_cpu_seconds": cpu,
        "cpu_ms_per_frame": 1000 * cpu / frames,
        "cpu_seconds_per_1000_frames": 1000 * cpu / frames,
        "peak_rss_mib": rss / 2**20,
        "job_state_bytes": job_state,
        "watch_updates": watcher.updates,
        "watch_bytes": watcher.bytes,
        "watch_bytes_per_second": watcher.bytes / seconds,
        "frames_missing": missing,
        "frames_extra": extra,
        "storyboard_pages_missing": boards_missing(store, job_id, stories) if args.storyboard else None,
        "duplicate_reports": duplicate_reports(store, job) if job.state == pb.JOB_STATE_SUCCEEDED else -1,
    }


def run(args: BenchArgs) -> dict:
    work, logs, env = local_work(args.work_dir, "control-plane-bench-")
    env |= {
        "DREAMFRAME_RENDERER__PRESET": "sim",
        "DREAMFRAME_RENDERER__SIM_FRAME_SECONDS": str(args.frame_seconds),
        "DREAMFRAME_RENDERER__BATCH_SIZE": str(args.batch_size),
        "DREAMFRAME_COORDINATOR__RENDER_SHARD_SIZE": str(args.shard_size),
        "DREAMFRAME_COORDINATOR__STORY_PARALLELISM": str(args.story_parallelism),
        "DREAMFRAME_LOG__LEVEL": "WARNING",
        "DREAMFRAME_COORDINATOR__STORYBOARD": "true" if args.storyboard else "false",
    }
    store = open_store(StorageSettings(backend="local", root=work / "store"))
    renderers = [
        local.spawn(
            local.Planned(f"renderer-{r}", RENDERER, free_port(), {}), env, logs / f"renderer-{r}.log"
        )
        for r in range(args.replicas)
    ]
    try:
        local.wait_healthy(renderers, timeout=300)
        scenarios = [run_scenario(s, args, renderers, env, store, logs) for s in args.stories]
    finally:
        local.stop_processes(renderers)
    fleet = (
        run_fleet_events(
            store, env, logs, stories=args.fleet_stories, frames=args.frames, lease_seconds=args.lease_seconds
        )
        if args.fleet_stories
        else None
    )
    return {
        "storyboard": args.storyboard,
        "fleet": f"{args.replicas} sim renderer processes (simulated GPUs: {args.frame_seconds} s/frame), "
        f"on this machine's {os.cpu_count()} CPU cores with the coordinator",
        "frames_per_story": args.frames,
        "batch_size": args.batch_size,
        "shard_size": args.shard_size,
        "scenarios": scenarios,
        "fleet_events": fleet,
    }


def summarize(report: dict) -> str:
    lines = [
        f"control plane — {report['fleet']}; {report['frames_per_story']} frames per story, "
        f"batch {report['batch_size']}, shards of {report['shard_size']}, "
        f"storyboard {'on' if report['storyboard'] else 'off'}",
        "| stories | frames | state | seconds | frames/s | coordinator CPU s / 1,000 frames | peak RSS MiB "
        "| job state bytes | WatchJob bytes/s | lost | duplicated |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report["scenarios"]:
        lines.append(
            f"| {s['stories']} | {s['frames']} | {s['state']} | {s['seconds']:.1f} | "
            f"{s['frames_per_second']:.0f} | {s['cpu_seconds_per_1000_frames']:.3f} | "
            f"{s['peak_rss_mib']:.0f} | "
            f"{s['job_state_bytes']} | {s['watch_bytes_per_second']:.0f} | {s['frames_missing']} | "
            f"{s['frames_extra'] + max(s['duplicate_reports'], 0)} |"
        )
    if report.get("fleet_events"):
        lines += ["", summarize_fleet(report["fleet_events"])]
    return "\n".join(lines)


@dataclass(frozen=True)
class BenchArgs:
    stories: list[int]
    frames: int
    replicas: int
    frame_seconds: float
    batch_size: int
    shard_size: int
    story_parallelism: int
    storyboard: bool
    fleet_stories: int
    lease_seconds: float
    timeout: float
    work_dir: Path | None
    out: Path | None


app = typer.Typer(add_completion=False)


@app.command(help=__doc__.splitlines()[0])
def bench(
    stories: Annotated[list[int], typer.Option(help="story counts, one job each")] = [10, 50, 200],  # noqa: B006
    frames: Annotated[int, typer.Option(help="frames per story (the reference's 1,331)")] = 1331,
    replicas: Annotated[int, typer.Option(help="sim renderer processes")] = 4,
    frame_seconds: Annotated[float, typer.Option(help="simulated GPU seconds per frame")] = 0.0,
    batch_size: Annotated[int, typer.Option()] = 16,
    shard_size: Annotated[int, typer.Option()] = 64,
    story_parallelism: Annotated[int, typer.Option(help="stories worked on at once")] = 8,
    storyboard: Annotated[
        bool, typer.Option(help="build the storyboard pages (coordinator.storyboard)")
    ] = True,
    fleet_stories: Annotated[
        int,
        typer.Option(help="stories of the fleet-events job (replica added, removed, leader killed); 0: skip"),
    ] = 4,
    lease_seconds: Annotated[
        float, typer.Option(help="the coordinators' leader lease (the chart's 15 s)")
    ] = 15,
    timeout: Annotated[float, typer.Option(help="seconds per scenario")] = 3600,
    work_dir: Annotated[Path | None, typer.Option(help="store and logs (default: a temp dir)")] = None,
    out: Annotated[Path | None, typer.Option(help="write control-plane-bench.json here")] = None,
) -> BenchArgs:
    return BenchArgs(
        stories,
        frames,
        replicas,
        frame_seconds,
        batch_size,
        shard_size,
        story_parallelism,
        storyboard,
        fleet_stories,
        lease_seconds,
        timeout,
        work_dir,
        out,
    )


def main(argv: list[str] | None = None) -> dict:
    args = commandline.run(app, argv)
    report = run(args)
    return publish(report, summarize(report), args.out, "control-plane-bench.json")


if __name__ == "__main__":
    main()
