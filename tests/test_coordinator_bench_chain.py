"""The whole-chain benchmark's own bookkeeping: nvidia-smi's process list read into per-service peaks."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dreamframe.cli import local
from dreamframe.processes import parent_pid
from dreamframe.v1 import coordinator_pb2 as pb
from services.coordinator import bench_chain
from services.coordinator.bench_chain import (
    by_service,
    caller_settings,
    parent_pids,
    parse_compute_apps,
    summarize,
)


def test_compute_apps_are_summed_per_process_and_odd_lines_skipped():
    text = "1234, 20480\n1234, 1024\n99, 500\n[N/A], [N/A]\nNo running processes found\n"
    assert parse_compute_apps(text) == {1234: 21504, 99: 500}


def test_peaks_are_named_by_the_local_service_that_owns_the_pid(tmp_path):
    procs = [local.Process("keyframe-renderer", 1234, 50062, str(tmp_path / "r.log"))]
    assert by_service({1234: 7, 99: 1}, procs) == {"keyframe-renderer": 7, "pid 99 (not ours)": 1}


def test_a_services_child_process_counts_as_that_service(tmp_path):
    """The trainer trains in a worker process: its GPU memory is the trainer's, not "not ours"."""
    service = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import time; time.sleep(60)'])",
        ],
        start_new_session=True,
    )
    try:
        for _ in range(200):
            children = children_of(service.pid)
            if children:
                break
            time.sleep(0.05)
        (worker,) = children
        ancestors = {worker: parent_pids(worker)}
        assert ancestors[worker][0] == service.pid
        procs = [local.Process("trainer", service.pid, 50065, str(tmp_path / "t.log"))]
        peaks = {service.pid: 600, worker: 50538}
        assert by_service(peaks, procs, ancestors) == {"trainer": 600, f"trainer worker {worker}": 50538}
    finally:
        os.killpg(service.pid, signal.SIGKILL)
        service.wait()


def children_of(pid: int) -> list[int]:
    return [int(d.name) for d in Path("/proc").glob("[0-9]*") if parent_pid(int(d.name)) == pid]


def test_summary_names_the_card_and_every_stage():
    report = {
        "gpu": "NVIDIA H200",
        "preset": "sdxl-random",
        "renderers": 1,
        "settings": {"DREAMFRAME_RENDERER__COMPILE_AOT": "true"},
        "phases": [
            {
                "name": "cold start",
                "startup_seconds": 12.0,
                "startup_gpu_mib": {},
                "startup_card_mib": 30000,
                "startup_disk": {"free_gib": 30.2, "store_gib": 0.0, "model_cache_gib": 26.0},
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
                        "card_mib": 26000,
                        "disk": {"free_gib": 12.5, "store_gib": 17.7, "model_cache_gib": 26.0},
                        "train": {
                            "summary": {"steps": 2, "train_seconds": 9.5, "tokens_per_second": 1000.0},
                            "activation_checkpointing": {
                                "requested": False,
                                "after_out_of_memory_at_step": 1,
                            },
                        },
                    }
                ],
            },
            {"name": "warm start", "startup_seconds": None, "jobs": [], "error": "dreamframe up exited 1"},
        ],
    }
    text = summarize(report)
    assert "NVIDIA H200" in text and "| render | succeeded | 2.5 | 16/16 |" in text and "25,000" in text
    assert "start-up (`dreamframe up` until every service is SERVING): 12.0 s" in text
    assert (
        "peak of the whole card (MiB): 30,000" in text
        and "peak used (nvidia-smi memory.used): 26,000" in text
    )
    assert "warm start failed: dreamframe up exited 1" in text
    assert "after start-up, disk: 30.2 GiB free; the store holds 0.0 GiB, the model cache 26.0 GiB" in text
    assert "disk: 12.5 GiB free; the store holds 17.7 GiB" in text
    assert "train: 2 steps in 9.5 s, 1000.0 tokens/s; out of GPU memory at step 1, retried" in text
    assert "settings set by the caller: DREAMFRAME_RENDERER__COMPILE_AOT=true" in text


def test_the_report_records_the_callers_settings_but_no_secret():
    environ = {
        "DREAMFRAME_RENDERER__COMPILE_AOT": "true",
        "DREAMFRAME_COMPILE_CACHE__KEY": "s3cret-signing-key-of-32-characters!",
        "DREAMFRAME_STORAGE__SECRET_KEY": "minio-secret",
        "DREAMFRAME_PLOT__MAX_TOKENS": "4096",
        "DREAMFRAME_SERVER__CALLERS": '[{"name": "ci", "token": "t0ken-of-16-chars"}]',
        "DREAMFRAME_RENDERER__COMPILE_CACHE__KEY_FILE": "/keys/compile-cache.key",
        "HOME": "/root",
    }
    assert caller_settings(environ) == {
        "DREAMFRAME_COMPILE_CACHE__KEY": "(set)",
        "DREAMFRAME_PLOT__MAX_TOKENS": "4096",
        "DREAMFRAME_RENDERER__COMPILE_AOT": "true",
        "DREAMFRAME_RENDERER__COMPILE_CACHE__KEY_FILE": "/keys/compile-cache.key",
        "DREAMFRAME_SERVER__CALLERS": "(set)",
        "DREAMFRAME_STORAGE__SECRET_KEY": "(set)",
    }


def test_disk_figures_count_what_store_and_cache_hold(tmp_path):
    store, models = tmp_path / "store", tmp_path / "models"
    (store / "runs").mkdir(parents=True)
    models.mkdir()
    (store / "runs" / "model.safetensors").write_bytes(b"w" * (60 << 20))
    figures = bench_chain.disk_figures(store, models)
    assert figures["store_gib"] == round(60 / 1024, 2) and figures["model_cache_gib"] == 0.0
    assert figures["free_gib"] > 0


def test_card_used_is_zero_without_nvidia_smi(monkeypatch):
    from services.coordinator import bench_chain

    monkeypatch.setenv("PATH", "")
    assert bench_chain.read_card_used() == 0 and bench_chain.read_gpu_processes() == {}


def test_dropping_a_jobs_trained_model_deletes_only_its_final_folder(tmp_path):
    from dreamframe.storage import LocalStore
    from dreamframe.v1 import common_pb2

    store = LocalStore(tmp_path, "dreamframe")
    for key in ("runs/r1/final/model.safetensors", "runs/r1/final/manifest.json", "runs/r1/adapter/a.bin"):
        store.put_bytes(key, b"x" * 10)
    job = pb.Job(job_id="j")
    job.stages.add(stage=pb.STAGE_DATASET).outputs.add(
        name="model", ref=common_pb2.ObjectRef(key="datasets/x")
    )
    assert bench_chain.drop_trained_model(store, job) == 0  # not the train stage's output: untouched
    job.stages.add(stage=pb.STAGE_TRAIN).outputs.add(
        name="model", ref=common_pb2.ObjectRef(key="runs/r1/final/manifest.json")
    )
    assert bench_chain.drop_trained_model(store, job) == 20
    assert bench_chain.train_summary(store, job) is None  # no metrics recorded
    metrics = store.put_json(
        "runs/r1/metrics.json",
        {
            "summary": {"steps": 2},
            "activation_checkpointing": {"after_out_of_memory_at_step": None},
            "parameters": {"trainable": 1},
            "max_length": 8,
        },
    )
    job.stages[1].outputs.add(name="metrics", ref=common_pb2.ObjectRef(key=metrics.key))
    assert bench_chain.train_summary(store, job)["summary"] == {"steps": 2}
    store.put_json("runs/r1/metrics.json", ["not", "metrics"])
    assert "error" in bench_chain.train_summary(store, job)
    assert [i.key for i in store.list("runs/")] == ["runs/r1/adapter/a.bin", "runs/r1/metrics.json"]
