"""The whole-chain benchmark's own bookkeeping: nvidia-smi's process list read into per-service peaks."""

from dreamframe.cli import local
from services.coordinator.bench_chain import by_service, parse_compute_apps, summarize


def test_compute_apps_are_summed_per_process_and_odd_lines_skipped():
    text = "1234, 20480\n1234, 1024\n99, 500\n[N/A], [N/A]\nNo running processes found\n"
    assert parse_compute_apps(text) == {1234: 21504, 99: 500}


def test_peaks_are_named_by_the_local_service_that_owns_the_pid(tmp_path):
    procs = [local.Process("keyframe-renderer", 1234, 50062, str(tmp_path / "r.log"))]
    assert by_service({1234: 7, 99: 1}, procs) == {"keyframe-renderer": 7, "pid 99 (not ours)": 1}


def test_summary_names_the_card_and_every_stage():
    report = {
        "gpu": "NVIDIA H200",
        "preset": "sdxl-random",
        "renderers": 1,
        "startup_seconds": 12.0,
        "startup_gpu_mib": {},
        "jobs": [
            {
                "spec": "tiny.json",
                "job_id": "j",
                "state": "succeeded",
                "error": "",
                "wall_seconds": 3.0,
                "stages": [
                    {"stage": "render", "state": "succeeded", "seconds": 2.5, "done": 16, "total": 16}
                ],
                "gpu_mib": {"keyframe-renderer": 25000},
                "gpu_total_mib": 25000,
            }
        ],
    }
    text = summarize(report)
    assert "NVIDIA H200" in text and "| render | succeeded | 2.5 | 16/16 |" in text and "25,000" in text
