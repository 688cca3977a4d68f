"""What "ready" means for a DreamFrame service, in one place: storage answers, the models a service
preloads are loaded, and any check of the service's own passes. ``GrpcServer`` polls the result and
health answers NOT_SERVING until it is true (an exception counts as not ready and is logged there).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable

from dreamframe.storage import ObjectStore

Check = Callable[[], Awaitable[bool] | bool]


# The key whose existence the probe asks about: one HEAD (or stat), O(1) whatever the store holds.
PROBE_KEY = "readiness-probe"


class StorageReadiness:
    """Ready when ``store`` answers (one existence check under ``probe_prefix``: never a listing, which
    would walk every frame of a local store), every tracked load task has finished without error, and
    ``check`` (if any) returns true.

    ``track`` hands it a task started after the readiness was built (a model preload): until the task
    is done the service is not ready, and a failed load keeps it NOT_SERVING with the error logged.
    """

    def __init__(self, store: ObjectStore, probe_prefix: str, check: Check | None = None) -> None:
        self.store = store
        self.probe_prefix = probe_prefix
        self.check = check
        self._loads: list[asyncio.Future] = []

    def track(self, load: asyncio.Future) -> asyncio.Future:
        self._loads.append(load)
        return load

    async def __call__(self) -> bool:
        # Storage must answer (the answer itself does not matter).
        await asyncio.to_thread(self.store.exists, f"{self.probe_prefix}{PROBE_KEY}")
        for load in self._loads:
            if not load.done():
                return False
            load.result()  # raises the load's error
        if self.check is None:
            return True
        result = self.check()
        return bool(await result if inspect.isawaitable(result) else result)
