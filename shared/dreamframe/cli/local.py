"""Running every service as a local process (``dreamframe up`` / ``down``), the embedded default.

Each service is ``python -m services.<name>`` with its port in the environment; all share the
local-directory store and the model cache. Pids, ports and log files are recorded in
``<state_dir>/local.json`` so ``down`` (or a later ``up``) finds them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dreamframe.processes import pid_alive

# name → (module, default port). The coordinator's defaults in config.py point at these ports.
SERVICES: dict[str, tuple[str, int]] = {
    "plot-llm": ("services.plot_llm", 50061),
    "style-trainer": ("services.style_trainer", 50062),
    "keyframe-renderer": ("services.keyframe_renderer", 50063),
    "qa-generator": ("services.qa_generator", 50064),
    "trainer": ("services.trainer", 50065),
    "evaluator": ("services.evaluator", 50066),
    "coordinator": ("services.coordinator", 50060),
}
HOST = "127.0.0.1"


@dataclass
class Process:
    name: str
    pid: int
    port: int
    log: str


def state_file(state_dir: Path) -> Path:
    return state_dir / "local.json"


def write_state(state_dir: Path, processes: list[Process]) -> None:
    state_file(state_dir).write_text(json.dumps([asdict(p) for p in processes], indent=2))


def read_state(state_dir: Path) -> list[Process]:
    path = state_file(state_dir)
    if not path.exists():
        return []
    return [Process(**p) for p in json.loads(path.read_text())]


@dataclass(frozen=True)
class Planned:
    name: str
    module: str
    port: int
    env: dict[str, str]


def service_plan(
    *, renderers: int = 1, base_port: int | None = None, gpus: int = 0
) -> tuple[list[Planned], dict[str, str]]:
    """Which processes to start on which ports, and the addresses the coordinator is given."""
    offset = (base_port - 50060) if base_port else 0
    plan: list[Planned] = []
    renderer_ports = []
    for name, (module, port) in SERVICES.items():
        port += offset
        if name == "keyframe-renderer":
            for r in range(renderers):
                p = port if r == 0 else 50070 + offset + r
                renderer_ports.append(p)
                pinned = {"CUDA_VISIBLE_DEVICES": str(r % gpus)} if gpus > 0 else {}
                plan.append(Planned(name if r == 0 else f"{name}-{r}", module, p, pinned))
        else:
            plan.append(Planned(name, module, port, {}))
    addresses = {
        "DREAMFRAME_COORDINATOR__PLOT_ADDRESS": f"{HOST}:{50061 + offset}",
        "DREAMFRAME_COORDINATOR__STYLE_ADDRESS": f"{HOST}:{50062 + offset}",
        "DREAMFRAME_COORDINATOR__RENDERER_ADDRESSES": ",".join(f"{HOST}:{p}" for p in renderer_ports),
        "DREAMFRAME_COORDINATOR__QA_ADDRESS": f"{HOST}:{50064 + offset}",
        "DREAMFRAME_COORDINATOR__TRAINER_ADDRESS": f"{HOST}:{50065 + offset}",
        "DREAMFRAME_COORDINATOR__EVALUATOR_ADDRESS": f"{HOST}:{50066 + offset}",
    }
    return plan, addresses


def spawn(planned: Planned, env: dict[str, str], log_path: Path) -> Process:
    """Start one service process (``python -m <module>`` on its port), appending to ``log_path``."""
    child_env = {
        **os.environ,
        **env,
        **planned.env,
        "DREAMFRAME_SERVER__HOST": HOST,
        "DREAMFRAME_SERVER__PORT": str(planned.port),
        "DREAMFRAME_SERVER__METRICS_PORT": "0",
    }
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(  # noqa: S603 - our own modules, our own interpreter
            [sys.executable, "-m", planned.module],
            env=child_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # ^C in the terminal reaches the CLI, not every service
        )
    return Process(planned.name, proc.pid, planned.port, str(log_path))


def start_services(
    state_dir: Path,
    *,
    env: dict[str, str],
    renderers: int = 1,
    base_port: int | None = None,
    gpus: int = 0,
) -> list[Process]:
    """Start all services (``renderers`` keyframe-renderer replicas) and return their records.

    With ``gpus`` > 0 each renderer replica sees one GPU (replica r gets GPU r mod gpus), so N replicas
    on an N-GPU machine render in parallel instead of sharing the first card."""
    running = [p for p in read_state(state_dir) if pid_alive(p.pid)]
    if running:
        names = ", ".join(p.name for p in running)
        raise RuntimeError(f"services already running ({names}); run `dreamframe down` first")
    logs = state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    plan, addresses = service_plan(renderers=renderers, base_port=base_port, gpus=gpus)
    processes = [spawn(planned, {**env, **addresses}, logs / f"{planned.name}.log") for planned in plan]
    write_state(state_dir, processes)
    return processes


def wait_healthy(processes: list[Process], timeout: float = 300.0) -> None:
    """Block until every service's health check says SERVING (models loaded, storage reachable)."""
    deadline = time.monotonic() + timeout
    for proc in processes:
        with grpc.insecure_channel(f"{HOST}:{proc.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if not pid_alive(proc.pid) or _exited(proc.pid):
                    raise RuntimeError(f"{proc.name} exited during start-up; see {proc.log}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{proc.name} not healthy after {timeout:.0f}s; see {proc.log}")
                time.sleep(0.3)


def _exited(pid: int) -> bool:
    """True for our own child that has exited (reaps it); False for anything else."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return done == pid


def stop_services(state_dir: Path, *, grace: float = 30.0) -> list[str]:
    """SIGTERM every recorded service, wait up to ``grace`` seconds, then SIGKILL what is left."""
    stopped = stop_processes(read_state(state_dir), grace=grace)
    state_file(state_dir).unlink(missing_ok=True)
    return stopped


def stop_processes(processes: list[Process], *, grace: float = 30.0) -> list[str]:
    """SIGTERM ``processes``, wait up to ``grace`` seconds, then SIGKILL what is left; their names."""
    for proc in processes:
        if pid_alive(proc.pid):
            os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    stopped = []
    for proc in processes:
        while pid_alive(proc.pid) and not _exited(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(proc.pid) and not _exited(proc.pid):
            os.kill(proc.pid, signal.SIGKILL)
        stopped.append(proc.name)
    return stopped
