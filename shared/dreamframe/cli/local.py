"""Running every service as a local process (``dreamframe up`` / ``restart`` / ``down``), the embedded
default.

Each service is ``python -m services.<name>`` with its port in the environment; all share the
local-directory store and the model cache. Pids, ports, modules, environments and log files are recorded
in ``<state_dir>/local.json`` with what ``up`` was asked for, so ``down`` stops them, ``restart`` starts one
again as it was, and a later ``up`` starts only what is not running (a crashed service) and leaves the
running ones alone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dreamframe.processes import pid_alive, pid_running

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
# After SIGKILL, how long `down` waits for a process to be gone (exiting frees its GPU memory).
KILL_WAIT_SECONDS = 15.0


@dataclass
class Process:
    name: str
    pid: int
    port: int
    log: str
    # How it was started, so it can be started again the same way: ``python -m <module>`` with ``env``
    # (what was added to the caller's environment; the server host/port variables come from ``port``).
    module: str = ""
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Stack:
    """What ``local.json`` holds: the services and what ``up`` was asked for (preset, renderers, ...)."""

    processes: list[Process] = field(default_factory=list)
    setup: dict[str, object] = field(default_factory=dict)


def state_file(state_dir: Path) -> Path:
    return state_dir / "local.json"


def write_state(state_dir: Path, processes: list[Process], setup: dict[str, object] | None = None) -> None:
    """Record ``processes`` (and ``setup``; None keeps the recorded one). Owner-only: envs may hold keys."""
    if setup is None:
        setup = read_stack(state_dir).setup
    path = state_file(state_dir)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"setup": setup, "processes": [asdict(p) for p in processes]}, indent=2))
    tmp.chmod(0o600)
    tmp.replace(path)


def read_stack(state_dir: Path) -> Stack:
    path = state_file(state_dir)
    if not path.exists():
        return Stack()
    data = json.loads(path.read_text())
    if isinstance(data, list):  # the older format: the process list alone
        data = {"processes": data}
    return Stack([Process(**p) for p in data.get("processes", [])], dict(data.get("setup") or {}))


def read_state(state_dir: Path) -> list[Process]:
    return read_stack(state_dir).processes


def is_running(proc: Process) -> bool:
    """The recorded process is alive and is still that service (not an exited child, a zombie, or a
    reused pid now running something else)."""
    if not pid_alive(proc.pid) or _exited(proc.pid):
        return False
    try:
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (macOS) or not ours to read: trust the pid
    if not cmdline:
        return False  # a zombie
    return not proc.module or proc.module.encode() in cmdline.split(b"\0")


def running_services(state_dir: Path) -> list[Process]:
    return [p for p in read_state(state_dir) if is_running(p)]


def module_for(name: str) -> str:
    """The module of a service name (``keyframe-renderer-2`` is a renderer replica)."""
    base = "keyframe-renderer" if name.startswith("keyframe-renderer") else name
    if base not in SERVICES:
        raise KeyError(name)
    return SERVICES[base][0]


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


# --- GPU sharing: several GPU services on one card (README "GPU sharing") ----------------------------------
#
# On Kubernetes each GPU service has a GPU of its own and nothing below applies (budgets 0, no idle
# release). The local runner puts every GPU service of a real-size preset on the same GPU (renderer
# replicas on GPU r mod --gpus); per GPU it gives each process a share of the card, which the process
# enforces at start (torch.cuda.set_per_process_memory_fraction: models.gpu_memory_fraction), and turns on
# idle release (models.idle_release_s) so a service gives its memory back between its stages.
#
# GiB each GPU service needs at real size (peak, with some margin): the renderer's SDXL base + refiner in
# bf16 (~11 GiB of weights) and batch 8 at 1024² (25 GiB peak measured); the style trainer's SDXL base and
# textual inversion at 768²; the trainer's 7B LoRA (~14 GiB of bf16 weights plus activations at context
# 2048); the evaluator's 7B model and CLIP; plot-llm's local model at a small real size.
GPU_NEEDS_GIB: dict[str, float] = {
    "plot-llm": 10.0,
    "style-trainer": 22.0,
    "keyframe-renderer": 28.0,
    "trainer": 40.0,
    "evaluator": 20.0,
}
# When each service's work runs in a job: the per-story stages together (plot, style and render overlap
# across stories), then training and evaluation. Where the needs of all do not fit at once, each group
# gets the card in turn ("phased"), which idle release makes true: the story group's models are dropped
# before training needs their memory.
GPU_PHASE: dict[str, str] = {
    "plot-llm": "stories",
    "style-trainer": "stories",
    "keyframe-renderer": "stories",
    "trainer": "training",
    "evaluator": "training",
}
# Seconds without work before a service drops its models when sharing (renderer: its reload costs the
# weights' load plus, with compile on, a compile unless the compile cache has it, so it waits longer).
IDLE_RELEASE_S: dict[str, float] = {"keyframe-renderer": 300.0, "style-trainer": 120.0, "plot-llm": 300.0}
DEFAULT_IDLE_RELEASE_S = 120.0
# Phased: the story group must have let go before training allocates (its worker starts, then reads
# the 7B weights for tens of seconds; the dataset stage runs in between), so it releases sooner.
PHASED_IDLE_RELEASE_S = 30.0
# Kept out of every budget: each CUDA context (~0.5–1 GiB, outside the caching allocator) and some slack.
CONTEXT_GIB = 1.0
SLACK_GIB = 2.0
# Assumed when the card's size cannot be read (no nvidia-smi): the smaller of the cards in use.
DEFAULT_CARD_GIB = 80.0
FRACTION_ENV = "DREAMFRAME_MODELS__GPU_MEMORY_FRACTION"
IDLE_ENV = "DREAMFRAME_MODELS__IDLE_RELEASE_S"


def base_name(name: str) -> str:
    """``keyframe-renderer-2`` → ``keyframe-renderer``."""
    return "keyframe-renderer" if name.startswith("keyframe-renderer") else name


@dataclass(frozen=True)
class GpuPolicy:
    """What ``up`` was asked for: which services use the GPU and the overrides."""

    gpu_services: frozenset[str]
    card_gib: float | None = None  # None: read it (nvidia-smi), else DEFAULT_CARD_GIB
    # Process or service name → fraction (a service name covers its replicas).
    budgets: dict[str, float] = field(default_factory=dict)
    idle_release_s: float | None = None  # None: IDLE_RELEASE_S by service


@dataclass(frozen=True)
class GpuShare:
    name: str
    gpu: int
    fraction: float
    idle_release_s: float
    mode: str  # "alone", "concurrent" (all fit at once), "phased" (groups take turns), "override"
    card_gib: float

    @property
    def gib(self) -> float:
        return self.fraction * self.card_gib


def gpu_services_for(env: dict[str, str]) -> frozenset[str]:
    """The services that run models on the GPU with this environment (none with the tiny preset)."""
    found = set()
    if env.get("DREAMFRAME_RENDERER__PRESET", "tiny") not in ("tiny", "sim"):
        found.add("keyframe-renderer")
    if env.get("DREAMFRAME_STYLE__PRESET", "tiny") != "tiny":
        found.add("style-trainer")
    if env.get("DREAMFRAME_TRAINER__PRESET", "tiny") != "tiny":
        found |= {"trainer", "evaluator"}
    if env.get("DREAMFRAME_PLOT__BACKEND") == "local" and env.get("DREAMFRAME_PLOT__MODEL", "tiny") != "tiny":
        found.add("plot-llm")
    return frozenset(found)


def card_gib() -> float | None:
    """GiB of GPU 0 (nvidia-smi), None when it cannot be read."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(  # noqa: S603 - a fixed query to the driver's own tool
            [smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return float(out.split()[0]) / 1024  # MiB
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _gpu_of(planned: Planned) -> int:
    pinned = planned.env.get("CUDA_VISIBLE_DEVICES")
    return int(pinned) if pinned is not None and pinned.isdigit() else 0


def plan_gpu_sharing(plan: list[Planned], policy: GpuPolicy) -> list[GpuShare]:
    """Each GPU process's share of its card (see the comment above GPU_NEEDS_GIB).

    Per GPU: a process alone gets no budget; several get ``need / sum of needs`` of what is left after
    the CUDA contexts when all fit at once ("concurrent"), else the same within their phase group
    ("phased": each group may fill the card, one group at a time). ``policy.budgets`` overrides a
    process's fraction. Idle release is on for every process that shares its GPU."""
    card = policy.card_gib or DEFAULT_CARD_GIB
    by_gpu: dict[int, list[Planned]] = {}
    for planned in plan:
        if base_name(planned.name) in policy.gpu_services:
            by_gpu.setdefault(_gpu_of(planned), []).append(planned)
    shares: list[GpuShare] = []
    for gpu, procs in sorted(by_gpu.items()):
        needs = {p.name: GPU_NEEDS_GIB[base_name(p.name)] for p in procs}
        usable = max(card - SLACK_GIB - CONTEXT_GIB * len(procs), card * 0.5)
        phased = sum(needs.values()) > usable
        for p in procs:
            service = base_name(p.name)
            if len(procs) == 1:
                fraction, mode = 0.0, "alone"
            else:
                group = [n for n in needs if not phased or GPU_PHASE[base_name(n)] == GPU_PHASE[service]]
                fraction = needs[p.name] / sum(needs[n] for n in group) * usable / card
                mode = "phased" if phased else "concurrent"
            override = policy.budgets.get(p.name, policy.budgets.get(service))
            if override is not None:
                fraction, mode = override, "override"
            idle = policy.idle_release_s
            if idle is None and len(procs) == 1:
                idle = 0.0
            elif idle is None and phased:
                idle = PHASED_IDLE_RELEASE_S
            elif idle is None:
                idle = IDLE_RELEASE_S.get(service, DEFAULT_IDLE_RELEASE_S)
            shares.append(GpuShare(p.name, gpu, round(fraction, 3), idle, mode, card))
    return shares


def with_gpu_shares(plan: list[Planned], shares: list[GpuShare]) -> list[Planned]:
    """The plan with each process's budget and idle release in its environment; a variable set in the
    caller's environment wins (one setting for every service, as the environment always does)."""
    by_name = {s.name: s for s in shares}
    out = []
    for planned in plan:
        share = by_name.get(planned.name)
        env = dict(planned.env)
        if share is not None:
            if share.fraction and FRACTION_ENV not in os.environ:
                env[FRACTION_ENV] = f"{share.fraction:.3f}"
            if share.idle_release_s and IDLE_ENV not in os.environ:
                env[IDLE_ENV] = f"{share.idle_release_s:g}"
        out.append(Planned(planned.name, planned.module, planned.port, env))
    return out


def spawn(planned: Planned, env: dict[str, str], log_path: Path) -> Process:
    """Start one service process (``python -m <module>`` on its port), appending to ``log_path``."""
    child_env = {
        **os.environ,
        "DREAMFRAME_SERVER__METRICS_PORT": "0",  # any free port, unless the plan names one
        **env,
        **planned.env,
        "DREAMFRAME_SERVER__HOST": HOST,
        "DREAMFRAME_SERVER__PORT": str(planned.port),
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
    recorded_env = {**env, **planned.env}
    return Process(planned.name, proc.pid, planned.port, str(log_path), planned.module, recorded_env)


class SetupMismatch(RuntimeError):
    """``up`` asked for a different stack than the one running; nothing was started or stopped."""


def ensure_services(
    state_dir: Path,
    *,
    env: dict[str, str],
    renderers: int = 1,
    base_port: int | None = None,
    gpus: int = 0,
    setup: dict[str, object] | None = None,
    gpu: GpuPolicy | None = None,
) -> tuple[list[Process], list[str]]:
    """Start every service that is not running; leave the running ones alone (same pids, same ports).

    Returns every service's record and the names of those started now. A service recorded but dead (it
    crashed, or was killed) starts again on its recorded port with its recorded environment. With no
    service running, the whole stack starts afresh from the plan (``renderers`` keyframe-renderer
    replicas; with ``gpus`` > 0 replica r sees GPU r mod gpus). ``setup`` is what the caller asked for
    (recorded; a running stack with a different recorded setup raises SetupMismatch, touching nothing).
    ``gpu``: share each GPU between the GPU services planned on it (``plan_gpu_sharing``)."""
    stack = read_stack(state_dir)
    alive = {p.name: p for p in stack.processes if is_running(p)}
    if alive and setup is not None and stack.setup and setup != stack.setup:
        differ = ", ".join(
            f"{k}: {stack.setup.get(k)!r} running, {setup.get(k)!r} asked"
            for k in sorted(set(setup) | set(stack.setup))
            if setup.get(k) != stack.setup.get(k)
        )
        raise SetupMismatch(
            f"services are running with another setup ({differ}); run `dreamframe down` first, or "
            "`dreamframe up` without options to start what is missing of the running stack"
        )
    logs = state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    plan, addresses = service_plan(renderers=renderers, base_port=base_port, gpus=gpus)
    if gpu is not None:
        plan = with_gpu_shares(plan, plan_gpu_sharing(plan, gpu))
    recorded = {p.name: p for p in stack.processes} if alive else {}
    processes: list[Process] = []
    started: list[str] = []
    for planned in plan:
        if planned.name in alive:
            processes.append(alive[planned.name])
            continue
        before = recorded.get(planned.name)
        if before is not None and before.env:  # as it was started: its port, its environment
            again = Planned(before.name, before.module or planned.module, before.port, {})
            proc = spawn(again, before.env, Path(before.log))
        else:
            proc = spawn(planned, {**env, **addresses}, logs / f"{planned.name}.log")
        processes.append(proc)
        started.append(proc.name)
    planned_names = {p.name for p in plan}
    processes += [p for p in alive.values() if p.name not in planned_names]  # left alone, still recorded
    write_state(state_dir, processes, setup if setup is not None else stack.setup)
    return processes, started


def start_services(
    state_dir: Path,
    *,
    env: dict[str, str],
    renderers: int = 1,
    base_port: int | None = None,
    gpus: int = 0,
    setup: dict[str, object] | None = None,
    gpu: GpuPolicy | None = None,
) -> list[Process]:
    """``ensure_services``, returning every service's record (the running ones and those started now)."""
    processes, _ = ensure_services(
        state_dir, env=env, renderers=renderers, base_port=base_port, gpus=gpus, setup=setup, gpu=gpu
    )
    return processes


def restart_service(state_dir: Path, name: str, *, grace: float = 30.0) -> Process:
    """Stop one recorded service the way ``down`` does (SIGTERM, ``grace`` seconds, SIGKILL) and start it
    again on its recorded port with its recorded environment; the others are left alone."""
    processes = read_state(state_dir)
    if not processes:
        raise LookupError("no local services are recorded; start them with `dreamframe up`")
    old = next((p for p in processes if p.name == name), None)
    if old is None:
        known = ", ".join(p.name for p in processes)
        raise LookupError(f"no local service named {name!r}; the recorded ones: {known}")
    if is_running(old):
        stop_processes([old], grace=grace)
    if old.env:
        planned, env = Planned(old.name, old.module or module_for(old.name), old.port, {}), old.env
    else:  # recorded by an older version, without its environment: plan it again on its port
        planned, env = Planned(old.name, module_for(old.name), old.port, {}), {}
    new = spawn(planned, env, Path(old.log))
    write_state(state_dir, [new if p.name == name else p for p in read_state(state_dir)])
    return new


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
    """SIGTERM ``processes``, wait up to ``grace`` seconds, then SIGKILL what is left; the names of those
    that were running. A record whose process is gone (or whose pid runs something else) gets no signal."""
    ours = [p for p in processes if is_running(p)]
    for proc in ours:
        os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in ours:
        while pid_alive(proc.pid) and not _exited(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(proc.pid) and not _exited(proc.pid):
            os.kill(proc.pid, signal.SIGKILL)
    # Return only once they are gone: a killed GPU service frees its memory when it exits, and a stack
    # started right after (`down` then `up`) must not find a dying one still holding its share.
    deadline = time.monotonic() + KILL_WAIT_SECONDS
    for proc in ours:
        while pid_running(proc.pid) and not _exited(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    return [p.name for p in ours]
