"""One readiness rule for every service: storage answers, preloads finished, the service's own check."""

from __future__ import annotations

import asyncio

import pytest

from dreamframe.serving.readiness import StorageReadiness
from dreamframe.storage.local import LocalStore


def test_ready_follows_storage_loads_and_check(tmp_path):
    async def scenario() -> None:
        store = LocalStore(tmp_path / "store", "dreamframe")
        flag = {"ok": False}
        ready = StorageReadiness(store, "jobs/", lambda: flag["ok"])
        assert await ready() is False  # the service's own check says no
        flag["ok"] = True
        assert await ready() is True
        gate = asyncio.Event()
        load = ready.track(asyncio.create_task(gate.wait()))
        assert await ready() is False  # a preload still running
        gate.set()
        await load
        assert await ready() is True

        async def failing_load() -> None:
            raise RuntimeError("weights missing")

        failed = ready.track(asyncio.create_task(failing_load()))
        await asyncio.gather(failed, return_exceptions=True)
        with pytest.raises(RuntimeError, match="weights missing"):
            await ready()  # the server logs it and keeps NOT_SERVING

    asyncio.run(scenario())


def test_an_async_check_and_a_storage_outage_without_listing(tmp_path):
    class NoListing(LocalStore):
        def list(self, prefix="", *, bucket=None):
            raise AssertionError("readiness must not list: a store may hold millions of keys")

    class Down(NoListing):
        def exists(self, key, *, bucket=None):
            raise ConnectionError("storage down")

    async def check() -> bool:
        return True

    async def scenario() -> None:
        assert await StorageReadiness(NoListing(tmp_path / "s", "bkt"), "runs/", check)() is True
        with pytest.raises(ConnectionError):
            await StorageReadiness(Down(tmp_path / "s", "bkt"), "runs/")()

    asyncio.run(scenario())
