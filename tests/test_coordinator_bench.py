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


def test_control_plane_bench_runs_the_real_coordinator_over_sim_renderers(tmp_path):
    from services.coordinator import bench_control_plane

    report = bench_control_plane.main(
        ["--stories", "1", "--stories", "3", "--frames", "20", "--replicas", "2", "--batch-size", "4"]
        + ["--shard-size", "8", "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
        + ["--fleet-stories", "0"]  # the fleet events need full-size stories and a lease timeout: minutes
    )
    assert [s["stories"] for s in report["scenarios"]] == [1, 3]
    for s in report["scenarios"]:
        assert s["state"] == "JOB_STATE_SUCCEEDED" and s["frames"] == 20 * s["stories"]
        assert s["frames_missing"] == 0 and s["frames_extra"] == 0 and s["duplicate_reports"] == 0
        assert s["storyboard_pages_missing"] == 0  # every story page and the index were built
        assert s["coordinator_cpu_seconds"] > 0 and s["peak_rss_mib"] > 10 and s["job_state_bytes"] > 0
        assert s["watch_updates"] > 0 and s["frames_per_second"] == pytest.approx(s["frames"] / s["seconds"])
    saved = json.loads((tmp_path / "out" / "control-plane-bench.json").read_text())
    assert saved["scenarios"][1]["frames"] == 60
    assert "| 3 | 60 | JOB_STATE_SUCCEEDED" in bench_control_plane.summarize(report)
