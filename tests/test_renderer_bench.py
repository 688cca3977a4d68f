"""The renderer benchmark script runs end to end on the CPU with the tiny preset (it is not a test of
speed: the GPU figures come from running it on a GPU)."""

from __future__ import annotations

import json

import pytest
import torch

from services.keyframe_renderer import bench


@pytest.fixture
def one_cpu_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_bench_reports_speed_flops_and_floor(tmp_path, monkeypatch, one_cpu_thread, capsys):
    monkeypatch.setenv("DREAMFRAME_MODELS__CACHE_DIR", str(tmp_path / "models"))
    bench.get_settings.cache_clear()
    try:
        report = bench.main(
            ["--preset", "tiny", "--device", "cpu", "--frames", "4", "--batch-size", "2", "--steps", "8"]
            + ["--reference-frames", "1", "--out", str(tmp_path / "out")]
        )
    finally:
        bench.get_settings.cache_clear()
    saved = json.loads((tmp_path / "out" / "render-bench.json").read_text())
    assert saved["service"]["images"] == 4 and saved["service"]["batch_size"] == 2
    assert saved["reference"]["images"] == 1 and saved["speedup"] > 0
    modules = saved["flops"]["modules"]
    # 8 steps: 6 base + 2 refiner UNet calls per batch (guidance doubles the batch, not the calls).
    assert saved["step_split"] == [6, 2]
    assert (
        modules["base_unet"]["calls"],
        modules["refiner_unet"]["calls"],
        modules["vae_decode"]["calls"],
    ) == (
        6,
        2,
        1,
    )
    assert modules["base_unet"]["flops_per_call"] > modules["vae_decode"]["flops"] / 10 > 0
    assert saved["flops"]["per_image"] == pytest.approx(saved["flops"]["total"] / 2)
    assert saved["floor_seconds_per_image"]["measured_gemm"] > 0 and 0 < saved["mfu"]
    assert saved["attention"] == "AttnProcessor2_0" and report["preset"] == "tiny"
    table = (tmp_path / "out" / "render-bench.md").read_text()
    assert "| reference (one at a time) | 1 |" in table and "| service (batched) | 2 |" in table
    assert "FLOPs per image" in capsys.readouterr().out
