"""Training throughput benchmark: tokens/s and model FLOP utilisation of the trainer's own step.

    python -m services.trainer.bench --preset tiny                                   # CPU, seconds
    python -m services.trainer.bench --preset llava-1.5-7b --random-weights \\
        --method lora --batch-size 4 --num-frames 4                                  # one H100

It runs exactly the training path (``modeling.prepare_model``: LoRA or full, activation checkpointing,
FSDP2 over a world of one — or of N under torchrun —, bf16 on GPUs; ``training.forward_backward``,
gradient clipping, AdamW) on synthetic batches shaped like a real sample: BOS, the frames' visual tokens,
a question, an answer (the only labelled tokens).

Figures:
- tokens/s: tokens (visual + text) per optimizer step over the median step time, all processes.
- model FLOPs per step: counted with ``torch.utils.flop_counter.FlopCounterMode`` on one sample with
  activation checkpointing off (so recomputation is not counted), times the batch size.
- MFU: model FLOPs per step ÷ step time ÷ the peak measured in the same process with a large GEMM in
  the compute dtype (bf16 on GPUs, fp32 on CPUs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from dreamframe.benchmarking import default_gemm_size, matmul_flops_per_second, synchronize
from dreamframe.models import video_llm

from . import modeling
from .data import Batch
from .distributed import DistContext, all_sum, init_distributed, teardown
from .spec import Method, fill_hyperparameters
from .training import clip_gradients, forward_backward, seed_everything


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", help="tiny, llava-1.5-7b, or a local path / hub id")
    p.add_argument(
        "--random-weights", action="store_true", help="build the preset's architecture, no download"
    )
    p.add_argument("--model-cache-dir", type=Path, default=Path(".dreamframe/models"))
    p.add_argument("--method", choices=["lora", "full"], default="lora")
    p.add_argument("--batch-size", type=int, default=2, help="samples per process per step")
    p.add_argument("--num-frames", type=int, default=4)
    p.add_argument("--text-tokens", type=int, default=128, help="question tokens per sample")
    p.add_argument("--answer-tokens", type=int, default=64, help="labelled answer tokens per sample")
    p.add_argument("--lora-rank", type=int, default=128)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--gemm-size", type=int, default=0, help="peak-GEMM side (0: 8192 on GPU, 1024 on CPU)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p.parse_args(argv)


def build_base(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """The base model: random weights of the preset's architecture (built on the device), or loaded."""
    from transformers import AutoConfig, LlavaForConditionalGeneration

    if args.random_weights:
        if args.preset == video_llm.LLAVA_7B:
            config = video_llm.llava_7b_config()
        else:
            config = AutoConfig.from_pretrained(
                video_llm.resolve_model_path(args.preset, {}, args.model_cache_dir)
            )
        with torch.device(device):
            model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
        return model
    path = video_llm.resolve_model_path(args.preset, {}, args.model_cache_dir)
    return modeling.load_base_model(path, dtype)


def tokens_per_frame(config) -> int:
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches + (1 if config.vision_feature_select_strategy == "full" else 0)


def synthetic_batch(config, batch_size: int, num_frames: int, text: int, answer: int, seed: int = 0) -> Batch:
    """[BOS][frames' visual tokens][question][answer] per sample; labels on the answer only."""
    gen = torch.Generator().manual_seed(seed)
    visual = num_frames * tokens_per_frame(config)
    length = 1 + visual + text + answer
    vocab = config.text_config.vocab_size
    # Plain text ids: above the special tokens, never the image token.
    high = config.image_token_id if config.image_token_id > 100 else vocab
    ids = torch.randint(16, high, (batch_size, length), generator=gen)
    ids[ids == config.image_token_id] = 16
    ids[:, 0] = config.text_config.bos_token_id or 1
    ids[:, 1 : 1 + visual] = config.image_token_id
    labels = torch.full_like(ids, -100)
    labels[:, -answer:] = ids[:, -answer:]
    size = config.vision_config.image_size
    pixels = torch.randn(batch_size * num_frames, 3, size, size, generator=gen)
    return Batch(
        ids, torch.ones_like(ids), labels, pixels, uids=[f"synthetic-{i}" for i in range(batch_size)]
    )


def count_model_flops(model, batch: Batch, ctx: DistContext, precision, checkpointing: bool) -> int:
    """FLOPs of one forward+backward of ``batch``, counted op by op; activation checkpointing is switched
    off meanwhile so recomputation is not counted. Gradients are dropped afterwards."""
    from torch.utils.flop_counter import FlopCounterMode

    if checkpointing:
        _set_checkpointing(model, False)
    try:
        # Compiled layers run eagerly here: the counter sees every aten op.
        with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
            forward_backward(model, [batch], ctx, precision)
        return int(counter.get_total_flops())
    finally:
        model.zero_grad(set_to_none=True)
        if checkpointing:
            _set_checkpointing(model, True)


def _set_checkpointing(model, enabled: bool) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if enabled:
        modeling.enable_activation_checkpointing(base)
    elif hasattr(base, "activation_checkpointing_disable"):
        base.activation_checkpointing_disable()
    else:
        base.gradient_checkpointing_disable()


def run(args: argparse.Namespace) -> dict:
    ctx = init_distributed(args.device)
    try:
        return _bench(args, ctx)
    finally:
        teardown(ctx)


def _bench(args: argparse.Namespace, ctx: DistContext) -> dict:
    method = Method(args.method)
    precision = modeling.pick_precision(ctx.device, args.precision, method)
    hp = fill_hyperparameters(
        {
            "lora_rank": args.lora_rank,
            "lora_alpha": 2 * args.lora_rank,
            "gradient_checkpointing": args.gradient_checkpointing,
        }
    )
    hp = dataclasses.replace(hp, lora_dropout=args.lora_dropout)  # 0 is a real choice here
    seed_everything(0)
    base = build_base(args, ctx.device, precision.frozen_dtype)
    config = base.config
    model = modeling.prepare_model(
        base,
        method,
        hp,
        device=ctx.device,
        world_size=ctx.world_size,
        precision=precision,
        compile_layers=args.compile,
    )
    params = modeling.trainable_parameters(model)
    trainable, total = modeling.count_parameters(model)
    optimizer = modeling.build_optimizer(model, 1e-5, 0.0)
    batch = synthetic_batch(
        config, args.batch_size, args.num_frames, args.text_tokens, args.answer_tokens, ctx.rank
    )
    one = synthetic_batch(config, 1, args.num_frames, args.text_tokens, args.answer_tokens, ctx.rank)

    flops_per_sample = count_model_flops(model, one, ctx, precision, args.gradient_checkpointing)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    times = []
    for i in range(args.warmup + args.steps):
        synchronize(ctx.device)
        start = time.perf_counter()
        stats = forward_backward(model, [batch], ctx, precision)
        clip_gradients(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(ctx.device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    (slowest,) = all_sum([max(times)], ctx)
    gemm_n = args.gemm_size or default_gemm_size(ctx.device)
    peak = matmul_flops_per_second(ctx.device, precision.compute_dtype, gemm_n, repeats=10)
    model_flops = flops_per_sample * args.batch_size
    figures = {
        "device": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu",
        "world_size": ctx.world_size,
        "preset": args.preset,
        "random_weights": args.random_weights,
        "method": str(method),
        "compute_dtype": str(precision.compute_dtype).removeprefix("torch."),
        "frozen_dtype": str(precision.frozen_dtype).removeprefix("torch."),
        "gradient_checkpointing": args.gradient_checkpointing,
        "lora_dropout": hp.lora_dropout,
        "compiled": args.compile,
        "parameters": total,
        "trainable_parameters": trainable,
        "batch_size_per_process": args.batch_size,
        "sequence_tokens": int(batch.input_ids.shape[1]),
        "visual_tokens_per_sample": args.num_frames * tokens_per_frame(config),
        "tokens_per_step": stats["tokens"],
        "step_seconds_median": step,
        "step_seconds_all": times,
        "tokens_per_second": stats["tokens"] / step,
        "model_flops_per_step_per_process": model_flops,
        "achieved_tflops_per_process": model_flops / step / 1e12,
        "peak_gemm_tflops_measured": peak / 1e12,
        "peak_gemm_size": gemm_n,
        "mfu": model_flops / step / peak,
        "final_loss": stats["loss"],
    }
    if ctx.device.type == "cuda":
        figures["max_memory_gib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
    return figures


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.2f} {unit}"


def report(figures: dict) -> str:
    f = figures
    weights = " (random weights)" if f["random_weights"] else ""
    rows = [
        ("device", f"{f['device']} x{f['world_size']}"),
        (
            "model",
            f"{f['preset']}{weights}: {_si(f['parameters'], 'params')}, "
            f"{_si(f['trainable_parameters'], 'trainable')}",
        ),
        ("method", f"{f['method']}, compute {f['compute_dtype']}, frozen weights {f['frozen_dtype']}"),
        (
            "options",
            f"checkpointing {'on' if f['gradient_checkpointing'] else 'off'}, "
            f"compiled layers {'yes' if f['compiled'] else 'no'}, lora dropout {f['lora_dropout']}",
        ),
        (
            "batch",
            f"{f['batch_size_per_process']} x {f['sequence_tokens']} tokens "
            f"({f['visual_tokens_per_sample']} visual)",
        ),
        ("step time (median)", f"{f['step_seconds_median'] * 1000:.1f} ms"),
        ("tokens/s", f"{f['tokens_per_second']:,.0f}"),
        ("model FLOPs/step", _si(f["model_flops_per_step_per_process"], "FLOP") + " per process"),
        ("achieved", _si(f["achieved_tflops_per_process"] * 1e12, "FLOP/s") + " per process"),
        (
            "peak GEMM (measured)",
            _si(f["peak_gemm_tflops_measured"] * 1e12, "FLOP/s")
            + f" ({f['peak_gemm_size']}^3 {f['compute_dtype']})",
        ),
        ("MFU", f"{f['mfu'] * 100:.1f} %"),
    ]
    if "max_memory_gib" in f:
        rows.append(("peak memory", f"{f['max_memory_gib']:.1f} GiB"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    figures = run(args)
    if _is_main():
        print(report(figures), flush=True)
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
    return figures


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


if __name__ == "__main__":
    main(sys.argv[1:])
