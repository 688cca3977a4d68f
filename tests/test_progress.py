"""One progress clock for every service: elapsed time, and an ETA from the pace of the worked units."""

from __future__ import annotations

from dreamframe.progress import Progress, ProgressClock
from dreamframe.serving.streaming import progress_to_proto


class FakeTime:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_eta_from_the_pace_of_worked_units_only():
    now = FakeTime()
    clock = ProgressClock(10, "frames", now=now)
    assert clock.progress("start").eta_seconds == -1.0  # nothing worked yet: unknown
    clock.skip(4)  # existing frames: done, but no pace
    now.t += 30.0  # e.g. loading weights
    clock.begin_work()
    assert clock.eta == -1.0
    now.t += 6.0
    clock.advance(2)  # 3 s a frame
    report = clock.progress("frame 6", "rendering")
    assert report == Progress("frames", 6, 10, "frame 6", 36.0, 12.0, "rendering")
    clock.advance(4)
    assert clock.eta == 0.0 and clock.progress().done == 10


def test_without_begin_work_the_pace_counts_from_the_start():
    now = FakeTime()
    clock = ProgressClock(4, "items", now=now)
    now.t += 10.0
    clock.advance()
    assert clock.eta == 30.0


def test_reports_map_onto_the_common_proto():
    proto = progress_to_proto(Progress("steps", 3, 9, "step 3", 1.5, 3.0, "ok"))
    assert (proto.unit, proto.done, proto.total, proto.current_item) == ("steps", 3, 9, "step 3")
    assert (proto.elapsed_seconds, proto.eta_seconds, proto.message) == (1.5, 3.0, "ok")


def test_reach_takes_the_count_so_far():
    now = FakeTime()
    clock = ProgressClock(0, "stories", now=now)
    now.t += 8.0
    clock.reach(2, 10)  # told "2 of 10" rather than each unit
    assert (clock.done, clock.total, clock.eta) == (2, 10, 32.0)
    clock.reach(10)
    assert clock.eta == 0.0
