"""`python -m services.keyframe_renderer` as a real process: config from the environment, the default
preset loaded before SERVING, a story rendered into storage, and SIGTERM mid-render losing no frame."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dreamframe import keys
from dreamframe.storage import LocalStore, to_proto
from dreamframe.story import Story, StoryItem, Substory, TinyStory
from dreamframe.v1 import render_pb2, render_pb2_grpc

REPO = Path(__file__).resolve().parents[1]


def start(tmp_path: Path) -> tuple[subprocess.Popen, str]:
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",  # tiny model on a shared CPU
        "DREAMFRAME_SERVER__PORT": "0",
        "DREAMFRAME_SERVER__METRICS_PORT": "-1",
        "DREAMFRAME_SERVER__GRACE_SECONDS": "20",
        "DREAMFRAME_STORAGE__ROOT": str(tmp_path / "store"),
        "DREAMFRAME_MODELS__CACHE_DIR": str(tmp_path / "models"),
        "DREAMFRAME_RENDERER__DEVICE": "cpu",
        "DREAMFRAME_LOG__JSON": "true",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.keyframe_renderer"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:
        if line.startswith("{") and json.loads(line).get("event") == "server started":
            return proc, json.loads(line)["address"]
    proc.wait(timeout=5)
    raise AssertionError(f"renderer exited with {proc.returncode} before starting")


@pytest.mark.slow
def test_process_renders_and_stops_cleanly_on_sigterm(tmp_path):
    store = LocalStore(tmp_path / "store", "dreamframe")
    items = [StoryItem(kind="frame", text=f"scene {i}: a fox runs in the snow") for i in range(10)]
    story = Story(
        overview="fox", style_keyword="Ink", substories=[Substory(tiny_stories=[TinyStory(items=items)])]
    )
    ref = to_proto(store.put_bytes(keys.story_key("proc"), story.to_json().encode()))
    proc, address = start(tmp_path)
    try:

        async def body():
            async with grpc.aio.insecure_channel(address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                for _ in range(300):
                    status = (await health.Check(health_pb2.HealthCheckRequest())).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        break
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError("never SERVING")
                stub = render_pb2_grpc.RenderServiceStub(channel)
                small = render_pb2.RenderFramesRequest(
                    job_id="proc",
                    story=ref,
                    frames={"range": {"start": 0, "end": 2}},
                    options=render_pb2.RenderOptions(steps=8),
                )
                done = [m async for m in stub.RenderFrames(small)]
                assert done[-1].summary.rendered == 2
                # A long render, then SIGTERM: the batch in flight finishes and is written.
                call = stub.RenderFrames(
                    render_pb2.RenderFramesRequest(
                        job_id="proc", story=ref, options=render_pb2.RenderOptions(steps=40, batch_size=1)
                    )
                )
                while not (await call.read()).frames:
                    pass
                proc.send_signal(signal.SIGTERM)
                try:
                    while await call.read() is not grpc.aio.EOF:
                        pass
                except grpc.aio.AioRpcError as exc:
                    return exc.code()
                return grpc.StatusCode.OK

        code = asyncio.run(asyncio.wait_for(body(), 120))
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    stored = {info.key for info in store.list(keys.frames_prefix("proc"))}
    pngs = [i for i in range(10) if keys.frame_key("proc", 0, i) in stored]
    assert code == grpc.StatusCode.CANCELLED and 2 < len(pngs) < 10, (code, pngs)
    assert all(keys.frame_sidecar_key("proc", 0, i) in stored for i in pngs), "no half-written frame"
