"""The renderer benchmark script runs end to end on the CPU with the tiny preset (it is not a test of
speed: the GPU figures come from running it on a GPU)."""

from __future__ import annotations

import json

import pytest

from services.keyframe_renderer import bench


@pytest.mark.slow
def test_bench_reports_speed_flops_and_floor(tmp_path, monkeypatch, one_thread, capsys):
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
    assert saved["attention"] == "FusedAttnProcessor2_0" and report["preset"] == "tiny"
    # One variant on a CPU by default: the service's settings, eager; its stages have device times.
    [variant] = saved["variants"]
    assert variant["name"] == "default" and saved["service_variant"] == "default"
    assert variant["options"]["compile_mode"] == "" and variant["options"]["fuse_qkv"] is True
    assert set(saved["service"]["stage_seconds_per_image"]) == {"encode", "base", "refiner", "decode"}
    assert saved["attention_kernels"] and saved["vae_layouts"]["contiguous"] > 0
    table = (tmp_path / "out" / "render-bench.md").read_text()
    assert "| reference (one at a time, eager) | 1 |" in table and "| service: default | 2 |" in table
    assert "FLOPs per image" in capsys.readouterr().out


def bench_variants(tmp_path, monkeypatch, *variants: str) -> dict:
    """A short tiny-preset bench run over ``variants`` on one model, no reference."""
    monkeypatch.setenv("DREAMFRAME_MODELS__CACHE_DIR", str(tmp_path / "models"))
    bench.get_settings.cache_clear()
    try:
        return bench.main(
            ["--preset", "tiny", "--device", "cpu", "--frames", "2", "--batch-size", "2", "--steps", "4"]
            + ["--reference-frames", "0", "--skip-kernels", "--out", str(tmp_path / "out")]
            + [arg for variant in variants for arg in ("--variant", variant)]
        )
    finally:
        bench.get_settings.cache_clear()


@pytest.mark.slow
def test_bench_compares_variants_on_one_model(tmp_path, monkeypatch, one_thread):
    report = bench_variants(tmp_path, monkeypatch, "before", "default", "m=sdpa_backend:math,fuse_qkv:off")
    names = [v["name"] for v in report["variants"]]
    assert names == ["before", "default", "m"] and report["service_variant"] == "before"
    before, default, math = report["variants"]
    assert before["options"]["fuse_qkv"] is False and before["result"]["attention"] == "AttnProcessor2_0"
    assert default["result"]["attention"] == "FusedAttnProcessor2_0"
    assert math["options"]["sdpa_backend"] == "math" and math["options"]["fuse_qkv"] is False
    # Same seeds, same frames: the variants draw the same pictures (within rounding).
    assert default["diff_against"] == "before" and default["diff"]["max"] <= 2 and math["diff"]["max"] <= 2
    assert report["reference"] is None and "speedup" not in report


@pytest.mark.slow
def test_bench_switches_fp8_on_and_off_on_one_model(tmp_path, monkeypatch, one_thread):
    from dreamframe.models import fp8

    monkeypatch.setattr(fp8, "unavailable_reason", lambda device: None)  # the CPU runs FP8 matmuls too
    report = bench_variants(tmp_path, monkeypatch, "fp8", "default")
    quantized, default = report["variants"]
    assert quantized["options_text"].endswith("FP8 linears") and "FP8" not in default["options_text"]
    assert default["diff_against"] == "fp8" and 0 < default["diff"]["mean"] < 3
    assert report["fp8_precision"] == {"skipped": "not on a CPU"}


def test_bad_variants_are_refused_before_any_work():
    from services.keyframe_renderer.engine import EngineOptions

    base = EngineOptions(compile_mode="default")
    assert bench.parse_variant("before", base)[1] == EngineOptions(
        compile_mode="default", compile_vae=False, fuse_qkv=False
    )
    name, opts = bench.parse_variant("x=compile_mode:off,sdpa-backend:flash,compile_vae:false", base)
    assert name == "x" and (opts.compile_mode, opts.sdpa_backend, opts.compile_vae) == ("", "flash", False)
    with pytest.raises(ValueError, match="unknown"):
        bench.parse_variant("fastest", base)
    with pytest.raises(ValueError, match="not key:value"):
        bench.parse_variant("x=warp:9", base)
    with pytest.raises(ValueError, match="fuse_qkv must be true or false"):
        bench.parse_variant("x=fuse_qkv:maybe", base)
    with pytest.raises(ValueError, match="^sdpa_backend: "):
        bench.parse_variant("x=sdpa_backend:fast", base)


def test_the_compute_floor_uses_the_datasheet_peak_of_the_card_it_ran_on(monkeypatch):
    """An H200 run once printed its floor as "H100 SXM" (same figure, wrong name); an A100's would have
    been three times too high."""
    import torch

    from services.keyframe_renderer.bench.summary import bf16_peak

    gpu, gemm = torch.device("cuda", 0), {"flops_per_second": 7e14}
    for name, peak, source in [
        ("NVIDIA H200", 989e12, "H200 bf16 dense, datasheet"),
        ("NVIDIA H100 80GB HBM3", 989e12, "H100 bf16 dense, datasheet"),
        ("NVIDIA H100 PCIe", 756e12, "H100 PCIe bf16 dense, datasheet"),
        ("NVIDIA A100-SXM4-80GB", 312e12, "A100 bf16 dense, datasheet"),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda _device, name=name: name)
        assert bf16_peak(None, gpu, gemm) == (peak, source)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _device: "NVIDIA L4")
    assert "no datasheet figure here for NVIDIA L4" in bf16_peak(None, gpu, gemm)[1]
    assert bf16_peak(5e14, gpu, gemm) == (5e14, "--peak-flops")
    assert bf16_peak(None, torch.device("cpu"), gemm) == (7e14, "measured GEMM (CPU)")


# A small UNet of SDXL's kind (text-time conditioning, transformer blocks in cross-attention stages).
TINY_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=(2, 4),
    transformer_layers_per_block=(1, 2),
    norm_num_groups=8,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=8 * 6 + 32,
    use_linear_projection=True,
)


@pytest.mark.parametrize("scope", ["whole", "regional"])
def test_tracing_bench_scopes_match_eager(scope, one_thread):
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention import BasicTransformerBlock

    from services.keyframe_renderer.bench import tracing

    row = tracing.measure("base", scope, latent=8, config=TINY_UNET)
    assert row["same_as_eager"] and row["tracing_s"] >= 0
    blocks = sum(isinstance(m, BasicTransformerBlock) for m in UNet2DConditionModel(**TINY_UNET).modules())
    assert blocks > 1 and row["modules_compiled"] == (1 if scope == "whole" else blocks)


def test_tracing_bench_aot_artifact_loads_and_runs_on_the_weights_it_is_given(tmp_path, one_thread):
    """The ahead-of-time compiled forward, saved and loaded back, computes what the eager UNet does, and
    with the module it is called with (the artifact holds the graph, not a copy of the weights)."""
    import torch
    from diffusers import UNet2DConditionModel

    from services.keyframe_renderer.bench import tracing

    artifact = tmp_path / "base.aot"
    saved = tracing.measure("base", "aot", latent=8, config=TINY_UNET, artifact=artifact, save=True)
    assert saved["bytes"] == artifact.stat().st_size > 0 and saved["aot_compile_s"] > 0
    loaded = tracing.measure("base", "aot", latent=8, config=TINY_UNET, artifact=artifact)
    assert loaded["same_as_eager"] and loaded["load_s"] >= 0

    torch.manual_seed(1)  # other weights than the artifact was compiled with
    unet = UNet2DConditionModel(**TINY_UNET).to(torch.bfloat16).eval()
    args, kwargs = tracing.unet_inputs(TINY_UNET, False, 8, torch.bfloat16)
    with artifact.open("rb") as f:
        function = torch.compiler.load_compiled_function(f)
    with torch.no_grad():
        assert torch.equal(function(unet, *args, **kwargs)[0], unet(*args, **kwargs)[0])
