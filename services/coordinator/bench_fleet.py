"""Fleet events during a job (part of ``make bench-control-plane``): a replica added, one removed mid-shard,
the leader killed.

Two real coordinator processes elect a leader with a coordination.k8s.io Lease and find renderer
replicas by watching EndpointSlices, both through the official kubernetes client, against kmock's
Kubernetes API emulator running in this process (there is no API server here: the emulator is what
stands in for one, as in the tests). The replicas are ``sim`` renderer processes, each with its own
EndpointSlice (every process listens on its own port). While one render-only job runs:

1. a new replica's EndpointSlice appears (a scale-up): seconds until it receives its first shard, read
   from its own ``dreamframe_render_active_requests`` metric;
2. a replica turns terminating and gets SIGTERM, as a pod does on scale-down, in the middle of a shard:
   it finishes its batch, reports it and ends; its unreported frames are re-sent (counted from the
   leader's dreamframe_render_shards_resent metric);
3. the leader coordinator is killed with SIGKILL: seconds until the other one holds the Lease, and
   until the job's frame count moves again;

and at the end every frame is stored exactly once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import urllib.request
from pathlib import Path

from dreamframe.cli import local
from dreamframe.serving.client import make_sync_channel
from dreamframe.v1 import coordinator_pb2 as pb
from dreamframe.v1 import coordinator_pb2_grpc

from .bench import COORDINATOR, RENDERER, count_frames, free_port, put_story

NAMESPACE = "bench"
SERVICE = "renderer"
LEASE = "dreamframe-coordinator"
TERMINAL = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)
# Simulated GPU seconds per frame of the fleet's renderers: a 64-frame shard is 4 batches of 16.
FRAME_SECONDS = 0.01


class KubernetesApi(threading.Thread):
    """kmock's Kubernetes emulator served over HTTP from a background event loop."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.url = ""
        self.started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    def run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        try:
            import kmock  # a developers' tool (the dev extra), not in the coordinator's image
        except ImportError as exc:
            raise RuntimeError("the fleet-events bench needs kmock: make install (the dev extra)") from exc

        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        async with kmock.KubernetesEmulator() as k8s, kmock.Server(k8s) as server:
            self.url = str(server.url).rstrip("/")
            self.started.set()
            await self._stopping.wait()

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self.join(timeout=10)


def endpoint_slice(name: str, port: int, *, ready: bool = True) -> dict:
    """The EndpointSlice of one renderer replica (a pod of the renderer Service)."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"kubernetes.io/service-name": SERVICE}},
        "addressType": "IPv4",
        "ports": [{"name": "grpc", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": [local.HOST], "conditions": {"ready": ready, "terminating": not ready}}],
    }


def metric(port: int, name: str) -> float:
    """One unlabelled sample from a process's /metrics (0 when absent or unreachable)."""
    try:
        with urllib.request.urlopen(f"http://{local.HOST}:{port}/metrics", timeout=2) as response:  # noqa: S310
            for line in response.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


class Fleet:
    def __init__(self, env: dict[str, str], logs: Path, api_url: str) -> None:
        from kubernetes import client

        self.env, self.logs = env, logs
        api = client.ApiClient(client.Configuration(host=api_url))
        self.slices = client.DiscoveryV1Api(api)
        self.leases = client.CoordinationV1Api(api)
        self.renderers: dict[str, tuple[local.Process, int]] = {}
        self.coordinators: dict[str, local.Process] = {}

    def start_renderer(self, name: str) -> local.Process:
        metrics_port = free_port()
        env = {
            "DREAMFRAME_SERVER__METRICS_PORT": str(metrics_port),
            # Slow enough that a shard spans several batches, so a SIGTERM lands mid-shard.
            "DREAMFRAME_RENDERER__SIM_FRAME_SECONDS": str(FRAME_SECONDS),
        }
        planned = local.Planned(name, RENDERER, free_port(), env)
        proc = local.spawn(planned, self.env, self.logs / f"{name}.log")
        self.renderers[name] = (proc, metrics_port)
        return proc

    def publish(self, name: str, *, ready: bool = True) -> None:
        proc, _ = self.renderers[name]
        body = endpoint_slice(name, proc.port, ready=ready)
        if ready:
            self.slices.create_namespaced_endpoint_slice(NAMESPACE, body)
        else:
            self.slices.patch_namespaced_endpoint_slice(name, NAMESPACE, body)

    def start_coordinator(self, name: str, api_url: str, lease_seconds: float) -> local.Process:
        env = {
            "DREAMFRAME_SERVER__METRICS_PORT": str(free_port()),
            "DREAMFRAME_COORDINATOR__RENDERER_DISCOVERY": "kubernetes",
            "DREAMFRAME_COORDINATOR__RENDERER_SERVICE": SERVICE,
            "DREAMFRAME_COORDINATOR__RENDERER_DRAIN_SECONDS": "10",
            "DREAMFRAME_COORDINATOR__LEADER_ELECTION": "kubernetes",
            "DREAMFRAME_COORDINATOR__LEADER_LEASE_SECONDS": str(lease_seconds),
            "DREAMFRAME_COORDINATOR__IDENTITY": name,
            "DREAMFRAME_COORDINATOR__KUBERNETES__ENABLED": "false",  # no built-in scaler here
            "DREAMFRAME_COORDINATOR__KUBERNETES__API_HOST": api_url,
            "DREAMFRAME_COORDINATOR__KUBERNETES__NAMESPACE": NAMESPACE,
        }
        proc = local.spawn(
            local.Planned(name, COORDINATOR, free_port(), env), self.env, self.logs / f"{name}.log"
        )
        self.coordinators[name] = proc
        return proc

    def leader(self) -> str:
        try:
            lease = self.leases.read_namespaced_lease(LEASE, NAMESPACE)
        except Exception:  # noqa: BLE001 - not created yet
            return ""
        return lease.spec.holder_identity or ""

    def stop(self) -> None:
        local.stop_processes(
            list(self.coordinators.values()) + [p for p, _ in self.renderers.values()], grace=20
        )


def wait_for(predicate, timeout: float, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError("fleet bench: a condition was not reached in time")


def run_fleet_events(
    store, env: dict[str, str], logs: Path, *, stories: int, frames: int, lease_seconds: float
) -> dict:
    api = KubernetesApi()
    api.start()
    api.started.wait(30)
    fleet = Fleet(env, logs, api.url)
    try:
        for name in ("renderer-a", "renderer-b", "renderer-c"):
            fleet.start_renderer(name)
        local.wait_healthy([p for p, _ in fleet.renderers.values()], timeout=300)
        fleet.publish("renderer-a")
        fleet.publish("renderer-b")  # renderer-c waits: it is the replica added mid-job
        for name in ("coordinator-1", "coordinator-2"):
            fleet.start_coordinator(name, api.url, lease_seconds)
        local.wait_healthy(list(fleet.coordinators.values()), timeout=120)
        first_leader = wait_for(fleet.leader, 60)
        survivor = next(n for n in fleet.coordinators if n != first_leader)
        refs = [put_story(store, f"fleet-{s}", frames) for s in range(stories)]
        spec = pb.JobSpec(
            name="fleet events", stories=[pb.StoryInput(story=r) for r in refs], stages=[pb.STAGE_RENDER]
        )
        total = stories * frames
        job_id = "fleet"
        with make_sync_channel(f"{local.HOST}:{fleet.coordinators[survivor].port}") as channel:
            stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
            # Submitted through the follower: stored, then picked up and run by the leader.
            stub.SubmitJob(pb.SubmitJobRequest(spec=spec, job_id=job_id), timeout=60)

            def done() -> int:
                job = stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=30).job
                render = next((s for s in job.stages if s.stage == pb.STAGE_RENDER), None)
                return render.progress.done if render else 0

            # 1. Scale-up: renderer-c's slice appears; seconds until it has a shard.
            wait_for(lambda: done() >= total * 0.15, 1800, poll=0.5)
            _, c_metrics = fleet.renderers["renderer-c"]
            added_at = time.monotonic()
            fleet.publish("renderer-c")
            wait_for(lambda: metric(c_metrics, "dreamframe_render_active_requests") > 0, 60, poll=0.02)
            first_shard_seconds = time.monotonic() - added_at

            # 2. Scale-down mid-shard: renderer-b turns terminating and gets SIGTERM, as a pod does.
            wait_for(lambda: done() >= total * 0.35, 1800, poll=0.5)
            b_proc, b_metrics = fleet.renderers["renderer-b"]
            busy_when_removed = metric(b_metrics, "dreamframe_render_active_requests")
            leader_metrics = int(fleet.coordinators[first_leader].env["DREAMFRAME_SERVER__METRICS_PORT"])
            resent_before = metric(leader_metrics, "dreamframe_render_shards_resent_total")
            removed_at = time.monotonic()
            fleet.publish("renderer-b", ready=False)
            os.kill(b_proc.pid, signal.SIGTERM)
            wait_for(lambda: not local.is_running(b_proc), 120, poll=0.05)
            drained_seconds = time.monotonic() - removed_at
            time.sleep(1.0)  # the leader re-queues what renderer-b did not report
            resent = metric(leader_metrics, "dreamframe_render_shards_resent_total") - resent_before

            # 3. The leader is killed outright.
            wait_for(lambda: done() >= total * 0.55, 1800, poll=0.5)
            before = done()
            killed_at = time.monotonic()
            os.kill(fleet.coordinators[first_leader].pid, signal.SIGKILL)
            wait_for(lambda: fleet.leader() == survivor, 300, poll=0.1)
            leads_after = time.monotonic() - killed_at
            wait_for(lambda: done() > before, 300, poll=0.1)
            moves_after = time.monotonic() - killed_at

            def finished():
                job = stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=30).job
                return job if job.state in TERMINAL else None

            job = wait_for(finished, 3600, poll=1.0)
        listings = [
            store.get_json(named.ref.key)
            for stage in job.stages
            if stage.stage == pb.STAGE_RENDER
            for named in stage.outputs
            if named.name.startswith("frames/")
        ]
        missing, extra = count_frames(store, job_id, stories, frames)
        return {
            "stories": stories,
            "frames": total,
            "state": pb.JobState.Name(job.state),
            "error": job.error,
            "added_replica_first_shard_seconds": first_shard_seconds,
            "removed_replica_busy": busy_when_removed > 0,
            "removed_replica_drain_seconds": drained_seconds,
            "removed_replica_shards_resent": resent,
            "leader_lease_seconds": lease_seconds,
            "failover_new_leader_seconds": leads_after,
            "failover_progress_seconds": moves_after,
            "frames_missing": missing,
            "frames_extra": extra,
            "duplicate_reports": sum(entry.get("duplicate_reports", 0) for entry in listings),
        }
    finally:
        fleet.stop()
        api.stop()


def summarize_fleet(report: dict) -> str:
    return "\n".join(
        [
            f"fleet events — one job of {report['stories']} stories ({report['frames']} frames), "
            f"{report['state']}: 2 coordinators (Lease), sim renderers found by EndpointSlice watch (kmock)",
            f"- replica added mid-job: first shard after {report['added_replica_first_shard_seconds']:.2f} s",
            f"- replica removed mid-shard (busy: {report['removed_replica_busy']}): it drained and exited in "
            f"{report['removed_replica_drain_seconds']:.1f} s; {report['removed_replica_shards_resent']:.0f} "
            "shard remainders re-sent to the others",
            f"- leader killed (SIGKILL, lease {report['leader_lease_seconds']:.0f} s): the other leads after "
            f"{report['failover_new_leader_seconds']:.1f} s, the job moves again after "
            f"{report['failover_progress_seconds']:.1f} s",
            f"- frames lost {report['frames_missing']}, duplicated files {report['frames_extra']} "
            f"(reports of an already counted frame: {report['duplicate_reports']})",
        ]
    )
