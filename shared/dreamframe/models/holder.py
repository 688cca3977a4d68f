"""Models a GPU service keeps loaded, by key (a preset), with idle release.

    holder = ModelHolder(load, name="keyframe-renderer", idle_release_s=300, capacity=2)
    with holder.use("sdxl") as engine:    # loads on first use (or after a release), then keeps it
        ...

With ``idle_release_s`` > 0 a model that nobody uses for that long is dropped (and the CUDA cache
emptied), so the services sharing one GPU give back what they hold between their stages; the next
``use`` loads it again. A model in use (inside ``use``) is never dropped. 0 keeps models for the
process's life (one service per GPU, the Kubernetes default). Past ``capacity`` the least recently used
idle model makes room. Out-of-memory inside ``use`` becomes RESOURCE_EXHAUSTED naming the budget
setting (``device.over_budget_errors``).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Generic, TypeVar

import torch

from .device import over_budget_errors

log = logging.getLogger(__name__)

T = TypeVar("T")


class ModelHolder(Generic[T]):
    def __init__(
        self,
        loader: Callable[[str], T],
        *,
        name: str = "models",
        idle_release_s: float = 0.0,
        capacity: int | None = None,
        models: MutableMapping[str, T] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``models``: where loaded models live (a dict shared between holders in one process)."""
        self._loader = loader
        self.name = name
        self.idle_release_s = idle_release_s
        self.capacity = capacity
        self._models: MutableMapping[str, T] = models if models is not None else OrderedDict()
        self._users: dict[str, int] = {}
        self._last_used: dict[str, float] = {}
        self._clock = clock
        self._lock = threading.RLock()  # held while loading: one load at a time, users wait for it
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None
        self.loads = 0
        self.releases = 0

    # --- using -----------------------------------------------------------------------------------
    def get(self, key: str) -> T:
        """The model for ``key``, loaded if absent (not marked in use: prefer ``use``)."""
        with self._lock:
            model = self._models.get(key)
            if model is None:
                self._make_room()
                started = self._clock()
                with over_budget_errors(self.name):
                    model = self._loader(key)
                self.loads += 1
                self._models[key] = model
                log.info("%s: loaded %s in %.1f s", self.name, key, self._clock() - started)
                self._start_reaper()
            if isinstance(self._models, OrderedDict):
                self._models.move_to_end(key)
            self._last_used[key] = self._clock()
            return model

    @contextmanager
    def use(self, key: str) -> Iterator[T]:
        """The model for ``key``, kept loaded until the block ends; idle time counts from then."""
        with self._lock:
            model = self.get(key)
            self._users[key] = self._users.get(key, 0) + 1
        try:
            with over_budget_errors(self.name):
                yield model
        finally:
            with self._lock:
                self._users[key] -= 1
                self._last_used[key] = self._clock()

    def put(self, key: str, model: T) -> None:
        """Register a model built elsewhere (a benchmark's full-size random model)."""
        with self._lock:
            self._models[key] = model
            self._last_used[key] = self._clock()
            self._start_reaper()

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._models)

    def in_use(self, key: str) -> bool:
        return self._users.get(key, 0) > 0

    # --- releasing -------------------------------------------------------------------------------
    def release_idle(self, now: float | None = None) -> list[str]:
        """Drop every model unused for ``idle_release_s`` (none when it is 0); the keys dropped."""
        if self.idle_release_s <= 0:
            return []
        now = self._clock() if now is None else now
        with self._lock:
            idle = [
                k
                for k in list(self._models)
                if not self.in_use(k) and now - self._last_used.get(k, now) >= self.idle_release_s
            ]
            for key in idle:
                self._drop(key)
            if idle:  # under the lock: once a model is gone from ``loaded()`` its memory is too
                self._free_memory()
        if idle:
            log.info("%s: released %s after %.0f s idle", self.name, ", ".join(idle), self.idle_release_s)
        return idle

    def clear(self) -> None:
        """Drop every model not in use now."""
        with self._lock:
            for key in [k for k in list(self._models) if not self.in_use(k)]:
                self._drop(key)
            self._free_memory()

    def close(self) -> None:
        self._stop.set()

    def _make_room(self) -> None:
        if self.capacity is None:
            return
        while len(self._models) >= self.capacity:
            victims = [k for k in self._models if not self.in_use(k)]
            if not victims:
                break  # all in use: over capacity for now rather than pulling weights from a render
            self._drop(victims[0])  # the least recently used (insertion order is use order)
            self._free_memory()

    def _drop(self, key: str) -> None:
        model = self._models.pop(key)
        lock = getattr(model, "lock", None)
        if lock is not None:
            with lock:  # a user that took the model outside ``use`` finishes its batch first
                pass
        del model
        self._last_used.pop(key, None)
        self._users.pop(key, None)
        self.releases += 1

    @staticmethod
    def _free_memory() -> None:
        gc.collect()  # pipelines hold reference cycles: free their tensors now, not at the next GC
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _start_reaper(self) -> None:
        if self.idle_release_s <= 0 or self._reaper is not None:
            return
        interval = min(max(self.idle_release_s / 4, 0.05), 10.0)

        def reap() -> None:
            while not self._stop.wait(interval):
                try:
                    self.release_idle()
                except Exception:  # noqa: BLE001 - a failed release must not end the reaper
                    log.exception("%s: idle release failed", self.name)

        self._reaper = threading.Thread(target=reap, name=f"idle-release-{self.name}", daemon=True)
        self._reaper.start()


def using(models: Any, key: str) -> AbstractContextManager[Any]:
    """``models.use(key)`` for a holder; ``models.get(key)`` held for the block for any other cache."""
    use = getattr(models, "use", None)
    return use(key) if use is not None else nullcontext(models.get(key))
