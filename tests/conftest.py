"""Shared pytest setup. Tests never reach a model hub."""

from __future__ import annotations

import asyncio
import gc
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


class _CollectingEventLoop(asyncio.SelectorEventLoop):
    """Collects garbage before the loop closes. grpc.aio objects (servers, channels, calls) that are
    freed after their event loop closed can crash the interpreter; tests run many short loops
    (asyncio.run per test), so whatever a test leaves behind is finalised while its loop still exists."""

    def close(self) -> None:
        if not self.is_closed():
            gc.collect()
        super().close()


class _CollectingPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return _CollectingEventLoop()


asyncio.set_event_loop_policy(_CollectingPolicy())


# --- S3 server (storage tests) ------------------------------------------------------------------
# One real S3 server per test session (SeaweedFS, else moto): see tests/s3server.py.
from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402
from s3server import S3Server, running_s3_server  # noqa: E402


@pytest.fixture(scope="session")
def s3_server(request: pytest.FixtureRequest) -> Iterator[S3Server]:
    """A running S3 server: ``.endpoint`` (host:port, plain HTTP), ``.access_key``, ``.secret_key``,
    ``.kind`` ("seaweedfs" or "moto"). Started on first use, stopped at the end of the session."""
    with running_s3_server() as server:
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"[s3_server] {server.kind} at {server.endpoint}")
        yield server


# --- torch threads --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for the rest of the module: tiny models on a 2-core CPU, where thread hand-offs
    cost more than the math. A module uses it with ``pytestmark = pytest.mark.usefixtures("one_thread")``
    or a test by asking for it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
