"""Local process planning for `dreamframe up`: ports, coordinator addresses, one GPU per renderer; the
records of running services (what `up`, `restart` and `down` go by). Real processes stand in for services
here; tests/test_cli_up.py starts the real ones."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dreamframe.cli import local
from dreamframe.cli.local import (
    Process,
    SetupMismatch,
    ensure_services,
    is_running,
    read_stack,
    restart_service,
    service_plan,
    state_file,
    stop_processes,
    write_state,
)
from dreamframe.processes import pid_running


def test_plan_gives_every_service_a_port_and_the_coordinator_every_address():
    plan, addresses = service_plan(renderers=3, base_port=30000, gpus=2)
    by_name = {p.name: p for p in plan}
    assert set(by_name) == {
        "plot-llm",
        "style-trainer",
        "keyframe-renderer",
        "keyframe-renderer-1",
        "keyframe-renderer-2",
        "qa-generator",
        "trainer",
        "evaluator",
        "coordinator",
    }
    assert len({p.port for p in plan}) == len(plan), "no two processes share a port"
    assert by_name["coordinator"].port == 30000
    renderer_ports = [
        by_name[n].port for n in ("keyframe-renderer", "keyframe-renderer-1", "keyframe-renderer-2")
    ]
    assert addresses["DREAMFRAME_COORDINATOR__RENDERER_ADDRESSES"] == ",".join(
        f"127.0.0.1:{p}" for p in renderer_ports
    )
    assert addresses["DREAMFRAME_COORDINATOR__PLOT_ADDRESS"] == f"127.0.0.1:{by_name['plot-llm'].port}"
    # replica r sees GPU r mod 2; nothing else is pinned
    assert [by_name[n].env for n in ("keyframe-renderer", "keyframe-renderer-1", "keyframe-renderer-2")] == [
        {"CUDA_VISIBLE_DEVICES": "0"},
        {"CUDA_VISIBLE_DEVICES": "1"},
        {"CUDA_VISIBLE_DEVICES": "0"},
    ]
    assert by_name["trainer"].env == {}


def test_default_plan_matches_the_configured_defaults():
    from services.coordinator.settings import CoordinatorSettings

    plan, addresses = service_plan()
    defaults = CoordinatorSettings()
    assert addresses["DREAMFRAME_COORDINATOR__PLOT_ADDRESS"] == defaults.plot_address
    assert addresses["DREAMFRAME_COORDINATOR__RENDERER_ADDRESSES"] == defaults.renderer_addresses
    assert all(p.env == {} for p in plan)


# --- the records of running services (local.json) ---------------------------------------------------


@pytest.fixture
def stand_in():
    """A live process whose command line holds ``services.coordinator``, like a real service's does."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "services.coordinator"],
        stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while b"services.coordinator" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes():  # until exec'd
        assert time.monotonic() < deadline
        time.sleep(0.02)
    yield proc
    proc.kill()
    proc.wait()


def test_a_record_counts_as_running_only_while_its_pid_runs_that_service(stand_in):
    assert is_running(Process("coordinator", stand_in.pid, 1, "log", "services.coordinator"))
    # the pid was reused by something else: not our service
    assert not is_running(Process("plot-llm", stand_in.pid, 1, "log", "services.plot_llm"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert not is_running(Process("plot-llm", dead.pid, 1, "log", "services.plot_llm"))


def test_stop_never_signals_a_pid_that_now_runs_something_else(stand_in):
    assert stop_processes([Process("plot-llm", stand_in.pid, 1, "log", "services.plot_llm")], grace=1) == []
    assert stand_in.poll() is None, "a process that is not the recorded service was stopped"


def test_stop_returns_only_once_a_service_that_ignores_sigterm_is_gone():
    # A GPU service killed after the grace period frees its memory only when it has exited: `down`
    # followed by `up` must not start the new stack beside a dying one.
    stubborn = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)",
            "services.renderer_stand_in",
        ],
        stdout=subprocess.PIPE,
    )
    assert stubborn.stdout.readline().strip() == b"ready"
    record = Process("keyframe-renderer", stubborn.pid, 1, "log", "services.renderer_stand_in")
    assert is_running(record)
    assert stop_processes([record], grace=0.3) == ["keyframe-renderer"]
    assert not pid_running(stubborn.pid) and not is_running(record)
    stubborn.wait(timeout=5)


def test_up_refuses_another_setup_while_services_run_and_touches_nothing(tmp_path, stand_in, monkeypatch):
    def no_spawn(*args, **kwargs):
        raise AssertionError("nothing may be started")

    monkeypatch.setattr(local, "spawn", no_spawn)
    running = Process("coordinator", stand_in.pid, 50060, str(tmp_path / "c.log"), "services.coordinator")
    setup = {"preset": "tiny", "renderers": 1, "gpus": 0, "base_port": None}
    write_state(tmp_path, [running], setup)
    before = state_file(tmp_path).read_text()
    with pytest.raises(SetupMismatch, match="renderers: 1 running, 2 asked"):
        ensure_services(tmp_path, env={}, renderers=2, setup={**setup, "renderers": 2})
    assert state_file(tmp_path).read_text() == before
    assert stand_in.poll() is None
    assert oct(state_file(tmp_path).stat().st_mode & 0o777) == "0o600"  # envs may hold storage keys


def test_records_of_the_older_format_still_read(tmp_path):
    state_file(tmp_path).write_text(
        json.dumps([{"name": "trainer", "pid": 1, "port": 50065, "log": "t.log"}])
    )
    stack = read_stack(tmp_path)
    assert stack.processes == [Process("trainer", 1, 50065, "t.log")] and stack.setup == {}


def test_restart_of_an_unrecorded_service_is_a_clear_error(tmp_path):
    with pytest.raises(LookupError, match="dreamframe up"):
        restart_service(tmp_path, "trainer")
    write_state(tmp_path, [Process("trainer", 1, 50065, "t.log", "services.trainer")], {})
    with pytest.raises(LookupError, match="no local service named 'renderer'; the recorded ones: trainer"):
        restart_service(tmp_path, "renderer")
