"""The render fan-out benchmark on the CPU: two tiny renderer processes behind the coordinator."""

from __future__ import annotations

import json

import pytest

from services.coordinator import bench

pytestmark = pytest.mark.slow


def test_fanout_bench_renders_every_frame_once_on_one_and_two_replicas(tmp_path):
    args = bench.parse_args(
        ["--replicas", "2", "--preset", "tiny", "--frames", "8", "--steps", "2", "--batch-size", "2"]
        + ["--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    )
    report = bench.run(args)
    one, two = report["phases"]
    assert (one["replicas"], two["replicas"]) == (1, 2)
    for phase in (one, two):
        assert phase["every_frame_once"] and phase["duplicate_reports"] == 0 and phase["resent_shards"] == 0
        assert phase["images_per_second"] == pytest.approx(8 / phase["seconds"])
    assert list(one["by_replica"].values()) == [8]
    assert len(two["by_replica"]) == 2 and sum(two["by_replica"].values()) == 8, "both replicas rendered"
    assert report["scaling"] == pytest.approx(two["images_per_second"] / one["images_per_second"])
    assert "scaling 1 → 2 replicas" in bench.summarize(report)
    bench.main(
        ["--replicas", "1", "--frames", "2", "--steps", "2", "--batch-size", "2"]
        + ["--work-dir", str(tmp_path / "w2"), "--out", str(tmp_path / "o2")]
    )
    assert json.loads((tmp_path / "o2" / "fanout-bench.json").read_text())["phases"][0]["replicas"] == 1
