"""Progress of long work, one way for every service: what ``common.Progress`` carries, and the clock that
measures it.

A stage counts units (frames, LLM calls, items, steps). Some units are done without work — a frame that
already exists is skipped — so the ETA comes from the pace of the units actually worked on since that
work began, not from the whole elapsed time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    """One progress report; ``eta_seconds`` is negative while unknown."""

    unit: str
    done: int
    total: int
    current_item: str = ""
    elapsed_seconds: float = 0.0
    eta_seconds: float = -1.0
    message: str = ""


class ProgressClock:
    """Counts ``total`` units of ``unit`` and makes ``Progress`` reports with elapsed time and ETA.

    ``skip`` counts units done without work (they do not set the pace); ``advance`` counts worked ones;
    ``begin_work`` marks when the measured work starts (default: when the clock was made).
    """

    def __init__(self, total: int, unit: str = "", *, now: Callable[[], float] = time.monotonic) -> None:
        self._now = now
        self.started = now()
        self.total = total
        self.unit = unit
        self.done = 0
        self.worked = 0
        self._work_started: float | None = None

    def begin_work(self) -> None:
        self._work_started = self._now()

    def skip(self, n: int = 1) -> None:
        self.done += n

    def advance(self, n: int = 1) -> None:
        self.done += n
        self.worked += n

    def reach(self, done: int, total: int | None = None) -> None:
        """For callers told the count so far rather than each unit: all of it counts as worked."""
        if total is not None:
            self.total = total
        self.worked += done - self.done
        self.done = done

    @property
    def elapsed(self) -> float:
        return self._now() - self.started

    @property
    def eta(self) -> float:
        left = self.total - self.done
        if left <= 0:
            return 0.0
        if not self.worked:
            return -1.0
        since = self._work_started if self._work_started is not None else self.started
        return left * (self._now() - since) / self.worked

    def progress(self, current_item: str = "", message: str = "") -> Progress:
        return Progress(self.unit, self.done, self.total, current_item, self.elapsed, self.eta, message)
