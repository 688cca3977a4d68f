"""The real SDXL architecture built from configs in code, and the style-training benchmark on CPU."""

from __future__ import annotations

import json

import pytest
import torch

from dreamframe.models.sdxl_configs import (
    build_random_sdxl,
    real_sdxl_base_configs,
    real_sdxl_refiner_unet_config,
)
from services.style_trainer import bench


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_real_sdxl_architecture_has_the_published_sizes():
    # On the meta device: shapes only, no memory, well under a second per model.
    pipes = build_random_sdxl("meta", torch.bfloat16, with_refiner=True)
    base = pipes.base
    assert count(base.unet) == 2_567_463_684
    assert count(base.text_encoder) == 123_060_480  # CLIP ViT-L/14 text
    assert count(base.text_encoder_2) == 694_659_840  # OpenCLIP ViT-bigG/14 text + projection
    assert count(base.vae) == 83_653_863
    assert count(pipes.refiner.unet) == 2_259_526_660
    assert pipes.refiner.text_encoder_2 is base.text_encoder_2 and pipes.refiner.vae is base.vae
    assert base.unet.dtype == torch.bfloat16 and pipes.resolution == 1024
    assert base.vae_scale_factor == 8
    assert torch.get_default_dtype() == torch.float32, "the default dtype is restored"


def test_configs_are_fresh_copies_with_the_sdxl_values():
    configs = real_sdxl_base_configs()
    unet = configs["unet"]
    assert unet["block_out_channels"] == [320, 640, 1280] and unet["transformer_layers_per_block"] == [
        1,
        2,
        10,
    ]
    assert unet["cross_attention_dim"] == 2048 == configs["text_encoder"]["hidden_size"] + 1280
    assert (
        unet["projection_class_embeddings_input_dim"] == 6 * 256 + configs["text_encoder_2"]["projection_dim"]
    )
    assert configs["vae"]["scaling_factor"] == 0.13025
    refiner = real_sdxl_refiner_unet_config()
    assert (
        refiner["projection_class_embeddings_input_dim"] == 5 * 256 + 1280
        and refiner["cross_attention_dim"] == 1280
    )
    configs["unet"]["block_out_channels"].append(1)
    assert real_sdxl_base_configs()["unet"]["block_out_channels"] == [320, 640, 1280]


@pytest.mark.slow
def test_bench_runs_on_cpu_with_the_tiny_preset(tmp_path, tmp_path_factory, capsys):
    out = tmp_path / "bench.json"
    args = [
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--cache-dir",
        str(tmp_path_factory.getbasetemp() / "style-models"),
    ]
    result = bench.main(
        [*args, "--steps", "2", "--warmup", "1", "--images", "2", "--json", str(out)]
        + ["--variants", "default,previous,read-every-step"]
    )
    printed = capsys.readouterr().out
    assert "per optimizer step" in printed and "compute floor" in printed and "MFU" in printed
    saved = json.loads(out.read_text())
    # one model and one set of latents for all variants; the same training in each
    assert [v["name"] for v in saved["variants"]] == ["default", "previous", "read-every-step"]
    assert len({v["final_loss"] for v in saved["variants"]}) == 1
    assert saved["variant"] == "default"
    assert saved["seconds_per_pass"] == saved["variants"][0]["seconds_per_pass"]
    assert all(v["estimate_over_floor"] > 0 and v["warmup_seconds"] >= 0 for v in saved["variants"])
    assert saved["reference_passes"] == 800 and saved["cached_latents"] == 4 and saved["resolution"] == 64
    assert saved["seconds_per_step"] > 0 and saved["flops_per_pass"] > 0 and 0 < saved["mfu"] < 1
    assert result["reference_estimate_seconds"] >= 800 * result["seconds_per_pass"]


def test_attention_shapes_of_sdxl_at_768_px():
    config = build_random_sdxl("meta", torch.bfloat16).base.unet.config
    # (tokens, heads, head dim, transformer layers): 48² at 640 channels, 24² at 1280 (mid block included)
    assert bench.attention_shapes(config, 96) == [(2304, 10, 64, 10), (576, 20, 64, 60)]


def test_unknown_variants_are_refused():
    with pytest.raises(SystemExit):
        bench.parse_args(["--variants", "default,fastest"])
