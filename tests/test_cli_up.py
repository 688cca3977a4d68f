"""`dreamframe up` / `restart` / `down` on real service processes (tiny presets, a local store), and the
job commands against them: `up` is idempotent (running services keep their pids and ports; a killed one
comes back), `restart SERVICE` gives one service a new process on its port, `status` shows stage times,
`ls` lists jobs newest first by submit time."""

from __future__ import annotations

import json
import os
import random
import re
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from typer.testing import CliRunner

from dreamframe.cli import commands as cli
from dreamframe.cli import local
from dreamframe.config import get_settings
from dreamframe.processes import pid_alive

pytestmark = pytest.mark.slow
runner = CliRunner()


@dataclass
class Stack:
    state: Path
    base_port: int
    tmp: Path

    def invoke(self, *args: str):
        get_settings.cache_clear()
        result = runner.invoke(cli.app, list(args))
        get_settings.cache_clear()
        return result

    def pids(self) -> dict[str, int]:
        return {p.name: p.pid for p in local.read_state(self.state)}

    def ports(self) -> dict[str, int]:
        return {p.name: p.port for p in local.read_state(self.state)}

    def process(self, name: str) -> local.Process:
        return next(p for p in local.read_state(self.state) if p.name == name)


def serving(port: int) -> bool:
    with grpc.insecure_channel(f"{local.HOST}:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("up")
    patch = pytest.MonkeyPatch()
    patch.setenv("DREAMFRAME_CLI__STATE_DIR", str(tmp / "state"))
    patch.setenv("DREAMFRAME_STORAGE__BACKEND", "local")
    patch.setenv("DREAMFRAME_STORAGE__ROOT", str(tmp / "store"))
    patch.setenv("DREAMFRAME_MODELS__CACHE_DIR", str(tmp / "models"))
    patch.setenv("DREAMFRAME_SERVER__GRACE_SECONDS", "5")
    patch.setenv("COLUMNS", "200")  # wide tables in the captured output
    base_port = random.randrange(21000, 40000, 100)
    patch.setenv("DREAMFRAME_CLI__COORDINATOR_ADDRESS", f"{local.HOST}:{base_port}")
    s = Stack(tmp / "state", base_port, tmp)
    try:
        result = s.invoke("up", "--base-port", str(base_port), "--timeout", "600")
        assert result.exit_code == 0, result.output
        yield s
    finally:
        pids = list(s.pids().values())
        result = s.invoke("down", "--grace", "10")
        patch.undo()
        get_settings.cache_clear()
        assert result.exit_code == 0, result.output
        assert not any(pid_alive(pid) for pid in pids), "down left a service running"


def test_up_again_leaves_the_running_stack_alone(stack):
    pids, ports = stack.pids(), stack.ports()
    assert len(pids) == 7 and all(serving(port) for port in ports.values())
    result = stack.invoke("up")  # no options: whatever the running stack was started with
    assert result.exit_code == 0, result.output
    assert result.output.count("was running") == 7 and "started" not in result.output
    assert stack.pids() == pids and stack.ports() == ports
    result = stack.invoke("up", "--base-port", str(stack.base_port), "--preset", "tiny")  # the same setup
    assert result.exit_code == 0, result.output
    assert stack.pids() == pids


def test_up_with_another_setup_is_refused_and_stops_nothing(stack):
    pids = stack.pids()
    result = stack.invoke("up", "--renderers", "2")
    assert result.exit_code == 1
    assert "another setup" in result.output and "renderers: 1 running, 2 asked" in result.output
    assert stack.pids() == pids
    assert all(local.is_running(p) for p in local.read_state(stack.state))


def test_a_killed_service_comes_back_with_up_and_the_others_keep_their_pids(stack):
    pids, ports = stack.pids(), stack.ports()
    victim = stack.process("plot-llm")
    os.kill(victim.pid, signal.SIGKILL)
    os.waitpid(victim.pid, 0)
    assert not local.is_running(victim)
    result = stack.invoke("up")
    assert result.exit_code == 0, result.output
    assert re.search(r"plot-llm .* started", result.output), result.output
    after = stack.pids()
    assert after["plot-llm"] != pids["plot-llm"]
    assert {k: v for k, v in after.items() if k != "plot-llm"} == {
        k: v for k, v in pids.items() if k != "plot-llm"
    }
    assert stack.ports() == ports and serving(ports["plot-llm"])
    again = stack.process("plot-llm")
    assert again.env["DREAMFRAME_PLOT__MODEL"] == "tiny"  # started again with the environment it had


def test_restart_gives_one_service_a_new_process_on_its_port(stack):
    pids, ports = stack.pids(), stack.ports()
    old = stack.process("keyframe-renderer")
    result = stack.invoke("restart", "keyframe-renderer", "--grace", "10")
    assert result.exit_code == 0, result.output
    assert f"restarted keyframe-renderer on {local.HOST}:{old.port}" in result.output
    new = stack.process("keyframe-renderer")
    assert new.pid != old.pid and new.port == old.port and new.env == old.env
    assert not pid_alive(old.pid)
    assert serving(new.port)
    assert {k: v for k, v in stack.pids().items() if k != "keyframe-renderer"} == {
        k: v for k, v in pids.items() if k != "keyframe-renderer"
    }
    assert stack.ports() == ports
    # the stopped process was asked to go, not killed: it logged its graceful shutdown
    assert "server stopped" in Path(old.log).read_text(errors="replace")


def test_restart_of_an_unknown_service_names_the_known_ones(stack):
    result = stack.invoke("restart", "renderer")
    assert result.exit_code == 2
    assert "no local service named 'renderer'" in result.output and "keyframe-renderer" in result.output


def reference_story() -> dict:
    frame = (
        "generate an image in Noir style: at the lighthouse, a woman looks like Meryl Streep in grey is "
        "standing"
    )
    return {
        "overview": "A keeper and a robot.",
        "character": {"Ada": "a woman looks like Meryl Streep in grey"},
        "img_diag": [["frame", frame], ["dialogue", "Ada: Who are you?"]],
        "QA": [{"Question": "Where is Ada?", "Answer": "At the lighthouse."}],
    }


def test_jobs_show_stage_times_and_list_newest_first(stack):
    # A story file enters a job through the plot stage without an LLM call: a real job, in seconds.
    story = stack.tmp / "story.json"
    story.write_text(json.dumps(reference_story()))
    # caller-chosen ids that sort the other way round from their submit order
    for job_id in ("zz-submitted-first", "aa-submitted-second"):
        result = stack.invoke(
            "submit", "--story", str(story), "--stages", "plot", "--job-id", job_id, "--watch"
        )
        assert result.exit_code == 0, result.output
        assert f"job {job_id}: succeeded" in result.output
        # the progress bar's time column shows the stage's own time
        assert re.search(r"plot .*\d+\.\ds", result.output), result.output

    result = stack.invoke("status", "aa-submitted-second")
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.strip("│ ").startswith("plot"))
    assert "succeeded" in row and re.search(r"\d+\.\ds", row) and "so far" not in row, row

    def listed() -> list[str]:
        result = stack.invoke("ls")
        assert result.exit_code == 0, result.output
        return re.findall(r"(aa-submitted-second|zz-submitted-first)", result.output)

    assert listed() == ["aa-submitted-second", "zz-submitted-first"]
    # a restarted coordinator knows them from storage alone, in the same order
    result = stack.invoke("restart", "coordinator", "--grace", "10")
    assert result.exit_code == 0, result.output
    assert listed() == ["aa-submitted-second", "zz-submitted-first"]
