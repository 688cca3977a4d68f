"""The throughput benchmark runs the trainer's step on the CPU with the tiny preset and reports
consistent figures (the GPU figures in services/trainer/README.md come from the same script)."""

from __future__ import annotations

from test_trainer_support import tiny_cache

from dreamframe.models import video_llm
from services.trainer import bench


def test_bench_reports_tokens_per_second_and_mfu(one_thread):
    args = bench.parse_args(
        [
            "--preset",
            "tiny",
            "--model-cache-dir",
            str(tiny_cache()),
            "--steps",
            "2",
            "--warmup",
            "1",
            "--batch-size",
            "2",
            "--num-frames",
            "2",
            "--text-tokens",
            "20",
            "--answer-tokens",
            "8",
            "--lora-rank",
            "8",
        ]
    )
    figures = bench.run(args)
    assert figures["sequence_tokens"] == 1 + 2 * 16 + 20 + 8
    assert figures["tokens_per_step"] == 2 * figures["sequence_tokens"]
    assert figures["tokens_per_second"] == figures["tokens_per_step"] / figures["step_seconds_median"]
    # Counted FLOPs: at least the forward (2 per parameter per token), at most ~forward + full backward.
    n, t = figures["parameters"], figures["tokens_per_step"]
    assert 2 * n * t <= figures["model_flops_per_step_per_process"] <= 8 * n * t
    assert 0 < figures["mfu"] <= 1.5  # a CPU GEMM can beat the 1024³ reference a little
    report = bench.report(figures)
    assert "MFU" in report and "tokens/s" in report


def test_bench_checkpoint_round_trip_restores_weights_and_optimizer(tmp_path):
    """Full fine-tune of a 1-layer random model: save the sharded checkpoint, step, restore, step again —
    the second step matches the first exactly."""
    args = bench.parse_args(
        [
            "--preset",
            str(video_llm.tiny_video_llm_dir(tiny_cache())),
            "--random-weights",
            "--layers",
            "1",
            "--method",
            "full",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--batch-size",
            "1",
            "--num-frames",
            "1",
            "--text-tokens",
            "8",
            "--answer-tokens",
            "4",
            "--checkpoint-dir",
            str(tmp_path / "ckpt"),
        ]
    )
    figures = bench.run(args)
    assert figures["layers"] == 1 and figures["method"] == "full"
    c = figures["checkpoint"]
    assert c["identical"] and c["restored_state_identical"] and c["next_loss_identical"], c
    assert c["next_step_relative_difference"] == 0.0  # one CPU thread: the step itself is reproducible
    assert c["files"] == 2 and c["bytes"] > 4 * 3 * figures["trainable_parameters"]  # weights + 2 moments
    assert not (tmp_path / "ckpt").exists()
    assert "checkpoint (sharded)" in bench.report(figures)
