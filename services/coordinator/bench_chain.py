"""Whole-chain benchmark: every service started locally on this machine (`dreamframe up`), one or more
jobs through every stage, and what each stage and each service cost.

    python -m services.coordinator.bench_chain --preset sdxl-random \\
        --spec deploy/gpu/chain-tiny.json --warm-spec deploy/gpu/chain-substory.json --out DIR
    python -m services.coordinator.bench_chain --preset tiny --spec deploy/local/tiny-job.json   # CPU

It starts the stack the way `make run` does (same command, same preset environment) in a work folder of
its own (state, store; the model cache is shared with --models-dir so snapshots are written once), then
runs each --spec in turn and reports:

- start-up: seconds from `dreamframe up` until every service answered SERVING (models loaded);
- per job: wall seconds from SubmitJob to the job's end, and each stage's own seconds (its StageStatus
  started_at/finished_at, as `dreamframe status` shows them);
- per service: the peak GPU memory its process held (nvidia-smi, sampled every --sample-seconds; CUDA
  context and the caching allocator's reserve included, which is what neighbours on one GPU feel), over
  start-up and over each job, and the peak of all of them together; also the whole card's peak
  (memory.used), which holds where nvidia-smi's pids are not ours (a container's pid namespace);
- disk: after start-up and after each job, the free space on the work folder's disk and what the store
  and the model cache hold (a real-size job writes tens of GB; the first warm run filled a 64 GiB disk);
- cold and warm: the --spec jobs run on a stack started with whatever compile cache there is (empty on
  a new machine); with --warm-spec the stack is then stopped and started again, its compile caches now
  filled, and the warm start-up and those jobs are measured the same way.

The stack is stopped at the end (`--keep-running` leaves it up). Writes ``chain-bench.json`` and
``chain-bench.md`` under --out after every job, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated

import typer
from google.protobuf import json_format

from dreamframe.cli import local
from dreamframe.config import ClientSettings, StorageSettings, secret_variable
from dreamframe.disk_space import GIB, free_bytes, used_bytes
from dreamframe.errors import described
from dreamframe.processes import parent_pid
from dreamframe.serving import make_sync_channel
from dreamframe.stages import stage_name
from dreamframe.storage import open_store
from dreamframe.storage.base import ObjectStore
from dreamframe.v1 import coordinator_pb2 as pb
from dreamframe.v1 import coordinator_pb2_grpc

TERMINAL = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)


class GpuSampler:
    """Peak GPU memory (MiB) per process id, from ``nvidia-smi --query-compute-apps`` polled in a thread.
    ``mark()`` starts a new window: ``window()`` then reports the peaks since that mark."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.available = shutil.which("nvidia-smi") is not None
        self._lock = threading.Lock()
        self._peaks: dict[int, int] = {}
        self._peak_total = 0
        # The whole card's used memory (nvidia-smi memory.used): the figure that still holds where the
        # process list cannot be matched to our pids (a container's own pid namespace).
        self._card_peak = 0
        # pid → its parents' pids, so a service's worker processes (the trainer's) count as that service.
        self.ancestors: dict[int, tuple[int, ...]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)

    def start(self) -> GpuSampler:
        if self.available:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def mark(self) -> None:
        with self._lock:
            self._peaks, self._peak_total, self._card_peak = {}, 0, 0

    def card_peak(self) -> int:
        with self._lock:
            return self._card_peak

    def window(self) -> tuple[dict[int, int], int]:
        with self._lock:
            return dict(self._peaks), self._peak_total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            sample = read_gpu_processes()
            card = read_card_used()
            with self._lock:
                self._card_peak = max(self._card_peak, card)
                for pid, mib in sample.items():
                    self._peaks[pid] = max(self._peaks.get(pid, 0), mib)
                    if pid not in self.ancestors:  # while it runs: a worker is gone by the report
                        self.ancestors[pid] = parent_pids(pid)
                self._peak_total = max(self._peak_total, sum(sample.values()))


def nvidia_smi(query: str) -> str:
    """``nvidia-smi --query-<query> --format=csv,noheader,nounits``'s output; "" when it fails."""
    try:
        return subprocess.run(
            ["nvidia-smi", f"--query-{query}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def read_gpu_processes() -> dict[int, int]:
    """{pid: MiB} of every process on the machine's GPUs (summed over GPUs); {} when nvidia-smi fails."""
    return parse_compute_apps(nvidia_smi("compute-apps=pid,used_memory"))


def read_card_used() -> int:
    """MiB in use on all of the machine's GPUs together (0 when nvidia-smi fails)."""
    return sum(int(v) for v in nvidia_smi("gpu=memory.used").split() if v.isdigit())


def parse_compute_apps(text: str) -> dict[int, int]:
    used: dict[int, int] = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            used[int(parts[0])] = used.get(int(parts[0]), 0) + int(parts[1])
    return used


def parent_pids(pid: int, limit: int = 16) -> tuple[int, ...]:
    """The parent, grandparent, … of ``pid`` from /proc (empty where /proc cannot tell)."""
    chain: list[int] = []
    while len(chain) < limit:
        parent = parent_pid(pid)
        if parent is None or parent <= 1:
            break
        chain.append(pid := parent)
    return tuple(chain)


def by_service(
    peaks: dict[int, int], processes: list[local.Process], ancestors: dict[int, tuple[int, ...]] | None = None
) -> dict[str, int]:
    """Peak MiB by service name; a service's child process (the trainer's worker) under
    "<service> worker <pid>"."""
    names = {p.pid: p.name for p in processes}
    out = {}
    for pid, mib in sorted(peaks.items()):
        owner = next((names[a] for a in (ancestors or {}).get(pid, ()) if a in names), None)
        name = names.get(pid) or (f"{owner} worker {pid}" if owner else f"pid {pid} (not ours)")
        out[name] = mib
    return out


def cli(args: list[str], env: dict[str, str]) -> None:
    """One `dreamframe` command, run as a user would (its own process, this environment)."""
    command = [sys.executable, "-c", "from dreamframe.cli import app; app()", *args]
    subprocess.run(command, env=env, check=True)


def seconds(ts) -> float:
    return ts.seconds + ts.nanos / 1e9


def run_job(stub, spec: pb.JobSpec, timeout: float) -> tuple[pb.Job, float]:
    started = time.monotonic()
    job_id = stub.SubmitJob(pb.SubmitJobRequest(spec=spec), timeout=60).job.job_id
    deadline = started + timeout
    while time.monotonic() < deadline:
        job = stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=60).job
        if job.state in TERMINAL:
            return job, time.monotonic() - started
        time.sleep(1.0)
    raise TimeoutError(f"job {job_id} not done after {timeout:.0f}s")


def stage_rows(job: pb.Job) -> list[dict]:
    rows = []
    for status in job.stages:
        took = None
        if status.started_at.seconds and status.finished_at.seconds:
            took = round(seconds(status.finished_at) - seconds(status.started_at), 1)
        rows.append(
            {
                "stage": stage_name(status.stage),
                "state": pb.JobState.Name(status.state).removeprefix("JOB_STATE_").lower(),
                "seconds": took,
                "done": status.progress.done,
                "total": status.progress.total,
            }
        )
    return rows


def gpu_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (CPU)"
    except Exception:  # noqa: BLE001 - a name for the report only
        return "unknown"


def caller_settings(environ: dict[str, str]) -> dict[str, str]:
    """The DREAMFRAME_* settings the caller set (they win over the preset's), so a report says what
    ran; a secret's value (config.secret_variable) is replaced by "(set)"."""
    return {
        name: "(set)" if secret_variable(name) else value
        for name, value in sorted(environ.items())
        if name.startswith("DREAMFRAME_")
    }


def summarize(report: dict) -> str:
    lines = [
        f"Whole-chain benchmark — {report['gpu']}, preset {report['preset']}, "
        f"{report['renderers']} renderer replica(s)",
    ]
    if report.get("settings"):
        lines.append(
            "settings set by the caller: " + ", ".join(f"{k}={v}" for k, v in report["settings"].items())
        )
    for phase in report["phases"]:
        lines += [
            "",
            f"## {phase['name']} — start-up (`dreamframe up` until every service is SERVING): "
            + (f"{phase['startup_seconds']:.1f} s" if phase.get("startup_seconds") is not None else "-"),
        ]
        if phase.get("startup_gpu_mib"):
            lines.append(f"GPU memory at start-up, peak per process (MiB): {phase['startup_gpu_mib']}")
        if phase.get("startup_card_mib"):
            lines.append(
                f"GPU memory at start-up, peak of the whole card (MiB): {phase['startup_card_mib']:,}"
            )
        if phase.get("startup_disk"):
            lines.append(f"after start-up, {disk_line(phase['startup_disk'])}")
        for job in phase["jobs"]:
            lines += [
                "",
                f"### {job['spec']} — job {job['job_id']} {job['state']} in {job['wall_seconds']:.1f} s",
                "",
                "| stage | state | seconds | progress |",
                "|---|---|---|---|",
            ]
            lines += [
                f"| {s['stage']} | {s['state']} | {s['seconds'] if s['seconds'] is not None else '-'} "
                f"| {s['done']}/{s['total']} |"
                for s in job["stages"]
            ]
            if job["gpu_mib"]:
                lines += ["", "| service | peak GPU memory (MiB) |", "|---|---|"]
                lines += [f"| {name} | {mib:,} |" for name, mib in job["gpu_mib"].items()]
                lines.append(f"| all together (peak of the sum) | {job['gpu_total_mib']:,} |")
            if job.get("card_mib"):
                lines.append(f"\nwhole card, peak used (nvidia-smi memory.used): {job['card_mib']:,} MiB")
            train = job.get("train") or {}
            if "summary" in train:
                t, oom = train["summary"], train["activation_checkpointing"]["after_out_of_memory_at_step"]
                lines.append(
                    f"\ntrain: {t['steps']} steps in {t['train_seconds']} s, "
                    f"{t['tokens_per_second']} tokens/s; "
                    + (
                        f"out of GPU memory at step {oom}, retried with activation checkpointing"
                        if oom
                        else "no step ran out of GPU memory"
                    )
                )
            if job.get("disk"):
                lines.append("\n" + disk_line(job["disk"]))
            if job["error"]:
                lines.append(f"\nerror: {job['error']}")
        if phase.get("error"):
            lines.append(f"\n{phase['name']} failed: {phase['error']}")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path | None) -> str:
    """The report so far, as JSON and Markdown under ``out`` (rewritten after every job, so a run cut
    short still leaves what it measured)."""
    summary = summarize(report)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "chain-bench.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "chain-bench.md").write_text(summary)
    return summary


def disk_figures(store_root: Path, models_dir: Path) -> dict[str, float]:
    """GiB free on the store's disk, and GiB the store and the model cache hold (allocated, as du)."""
    return {
        "free_gib": round(free_bytes(store_root) / GIB, 2),
        "store_gib": round(used_bytes(store_root) / GIB, 2),
        "model_cache_gib": round(used_bytes(models_dir) / GIB, 2),
    }


def disk_line(disk: dict[str, float]) -> str:
    return (
        f"disk: {disk['free_gib']} GiB free; the store holds {disk['store_gib']} GiB, "
        f"the model cache {disk['model_cache_gib']} GiB"
    )


def job_row(
    path: Path, job: pb.Job, wall: float, sampler: GpuSampler, processes: list[local.Process]
) -> dict:
    peaks, total = sampler.window()
    return {
        "spec": str(path),
        "job_id": job.job_id,
        "state": pb.JobState.Name(job.state).removeprefix("JOB_STATE_").lower(),
        "error": job.error,
        "wall_seconds": round(wall, 1),
        "stages": stage_rows(job),
        "gpu_mib": by_service(peaks, processes, sampler.ancestors),
        "gpu_total_mib": total,
        "card_mib": sampler.card_peak(),
    }


def stage_output(job: pb.Job, stage: int, name: str) -> str:
    """The key of the output ``name`` the job recorded for ``stage`` ("" when none)."""
    for status in job.stages:
        if status.stage == stage:
            for named in status.outputs:
                if named.name == name and named.ref.key:
                    return named.ref.key
    return ""


def train_summary(store: ObjectStore, job: pb.Job) -> dict | None:
    """The train stage's metrics.json, in brief: steps, time, tokens/s, parameters, and whether a step
    ran out of GPU memory and was retried with activation checkpointing."""
    key = stage_output(job, pb.STAGE_TRAIN, "metrics")
    if not key:
        return None
    try:
        metrics = store.get_json(key)
        return {
            "summary": metrics["summary"],
            "activation_checkpointing": metrics["activation_checkpointing"],
            "parameters": metrics["parameters"],
            "max_length": metrics["max_length"],
        }
    except (KeyError, TypeError, ValueError) as exc:
        return {"error": described(exc)}


def drop_trained_model(store: ObjectStore, job: pb.Job) -> int:
    """Delete the job's merged trained model from the store (bytes freed). The merged 7B checkpoint is
    14 GB per job: a GPU box's disk holds the snapshots plus one or two, not a job per spec."""
    key = stage_output(job, pb.STAGE_TRAIN, "model")
    if not key:
        return 0
    prefix = key.rsplit("/", 1)[0] + "/"
    freed = sum(info.size for info in store.list(prefix))
    store.delete_prefix(prefix)
    return freed


def run_phase(
    name: str,
    specs: list[Path],
    *,
    up: list[str],
    env: dict[str, str],
    state: Path,
    theme: str,
    sampler: GpuSampler,
    report: dict,
    out: Path | None,
    job_timeout: float,
    store: ObjectStore,
    store_root: Path,
    models_dir: Path,
    drop_trained_models: bool = False,
) -> None:
    """Start the stack, run each spec in turn, record everything under ``report['phases']`` (with the
    train stage's metrics from ``store``); with ``drop_trained_models``, each job's merged trained model
    is deleted from the store once the job is recorded."""
    phase: dict = {"name": name, "startup_seconds": None, "jobs": []}
    report["phases"].append(phase)
    sampler.mark()
    began = time.monotonic()
    cli(up, env)
    phase["startup_seconds"] = round(time.monotonic() - began, 1)
    processes = local.read_state(state)
    phase["startup_gpu_mib"] = by_service(sampler.window()[0], processes, sampler.ancestors)
    phase["startup_card_mib"] = sampler.card_peak()
    phase["startup_disk"] = disk_figures(store_root, models_dir)
    print(write_report(report, out), flush=True)
    coordinator = next(p for p in processes if p.name == "coordinator")
    channel = make_sync_channel(f"{local.HOST}:{coordinator.port}", ClientSettings(token=""))
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
    for path in specs:
        job_spec = json_format.Parse(path.read_text(), pb.JobSpec())
        if not job_spec.stories:
            job_spec.stories.add(theme=theme)
        sampler.mark()
        job, wall = run_job(stub, job_spec, job_timeout)
        row = job_row(path, job, wall, sampler, processes)
        row["train"] = train_summary(store, job)
        if drop_trained_models:
            row["trained_model_bytes_dropped"] = drop_trained_model(store, job)
        row["disk"] = disk_figures(store_root, models_dir)
        phase["jobs"].append(row)
        print(write_report(report, out), flush=True)
    channel.close()


def main(
    spec: Annotated[
        list[Path] | None,
        typer.Option(
            help="JobSpec JSON, one job each (repeatable). None: the cold phase only starts the stack (its "
            "preload fills the compile caches) and stops it, and --warm-spec jobs follow."
        ),
    ] = None,
    preset: Annotated[str, typer.Option(help="`dreamframe up --preset`.")] = "tiny",
    renderers: Annotated[int, typer.Option(min=1)] = 1,
    theme: Annotated[str, typer.Option()] = "a lighthouse keeper befriends a lost robot",
    work: Annotated[Path | None, typer.Option(help="State and store folder (default: a temp dir).")] = None,
    models_dir: Annotated[Path, typer.Option(help="Model cache (snapshots, compiled artifacts).")] = Path(
        ".dreamframe/models"
    ),
    out: Annotated[Path | None, typer.Option(help="Where chain-bench.json/.md go.")] = None,
    sample_seconds: Annotated[float, typer.Option(min=0.1)] = 0.5,
    job_timeout: Annotated[float, typer.Option(help="Seconds one job may take.")] = 3600.0,
    keep_running: Annotated[bool, typer.Option(help="Leave the services up afterwards.")] = False,
    warm_spec: Annotated[
        list[Path] | None,
        typer.Option(
            help="After the --spec jobs, stop the stack, start it again (its compile caches now filled: a "
            "warm start) and run these (repeatable)."
        ),
    ] = None,
    up_arg: Annotated[
        list[str] | None, typer.Option(help="More `dreamframe up` options, e.g. --up-arg=--idle-release-s=0.")
    ] = None,
    drop_trained_models: Annotated[
        bool,
        typer.Option(
            help="Delete each job's merged trained model (runs/<run>/final/, 14 GB at 7B) once the job is "
            "recorded, so that several jobs fit a GPU box's disk."
        ),
    ] = False,
) -> dict:
    if not spec and not warm_spec:
        raise typer.BadParameter("give --spec, --warm-spec or both", param_hint="--spec")
    work = Path(work or tempfile.mkdtemp(prefix="dreamframe-chain-")).resolve()
    state, store_root, models_dir = work / "state", work / "store", models_dir.resolve()
    env = {
        **os.environ,
        "DREAMFRAME_CLI__STATE_DIR": str(state),
        "DREAMFRAME_STORAGE__BACKEND": "local",
        "DREAMFRAME_STORAGE__ROOT": str(store_root),
        "DREAMFRAME_MODELS__CACHE_DIR": str(models_dir),
    }
    up = ["up", "--preset", preset, "--renderers", str(renderers), *(up_arg or [])]
    sampler = GpuSampler(sample_seconds).start()
    report: dict = {"gpu": gpu_name(), "preset": preset, "renderers": renderers, "work": str(work)}
    report["settings"] = caller_settings(dict(os.environ))
    report["phases"] = []
    phases = [("cold start", spec or [])]
    if warm_spec:
        phases.append(("warm start (compile cache filled by the cold start)", warm_spec))
    common = dict(
        up=up,
        env=env,
        state=state,
        theme=theme,
        sampler=sampler,
        report=report,
        out=out,
        job_timeout=job_timeout,
        store=open_store(StorageSettings(root=store_root)),
        store_root=store_root,
        models_dir=models_dir,
        drop_trained_models=drop_trained_models,
    )
    try:
        for index, (name, specs) in enumerate(phases):
            try:
                run_phase(name, specs, **common)
            except (subprocess.CalledProcessError, TimeoutError, StopIteration) as exc:
                report["phases"][-1]["error"] = str(exc) or type(exc).__name__
                break
            finally:
                if index < len(phases) - 1 or not keep_running:
                    cli(["down"], env)
    finally:
        sampler.stop()
    summary = write_report(report, out)
    print(summary)
    return report


if __name__ == "__main__":
    typer.run(main)
