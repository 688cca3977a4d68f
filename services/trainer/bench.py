"""Training throughput benchmark: tokens/s and model FLOP utilisation of the trainer's own step.

    python -m services.trainer.bench --preset tiny                                   # CPU, seconds
    python -m services.trainer.bench --preset llava-1.5-7b --random-weights \\
        --method lora --batch-size 4 --num-frames 4                                  # one H100

It runs exactly the training path (``modeling.prepare_model``: LoRA or full, activation checkpointing,
FSDP2 over a world of one — or of N under torchrun —, bf16 on GPUs; ``step.forward_backward``,
gradient clipping, AdamW) on synthetic batches shaped like a real sample: BOS, the frames' visual tokens,
a question, an answer (the only labelled tokens).

Figures:
- tokens/s: tokens (visual + text) per optimizer step over the median step time, all processes.
- model FLOPs per step: counted with ``torch.utils.flop_counter.FlopCounterMode`` on one sample with
  activation checkpointing off (so recomputation is not counted), times the batch size.
- MFU: model FLOPs per step ÷ step time ÷ the peak measured in the same process with a large GEMM in
  the compute dtype (bf16 on GPUs, fp32 on CPUs).

``--layers N`` keeps the preset's architecture but only N decoder layers (random weights): a 7B full
fine-tune (16 bytes per trained parameter: fp32 weights, gradients, two AdamW moments) does not fit one
80 GB GPU, a 12-layer one does, so 1 → N GPU scaling is measured on that. ``--checkpoint-dir DIR`` then
saves the sharded checkpoint exactly as the service does (``checkpoint.save_sharded``), takes one more
step, restores the checkpoint (``checkpoint.load_sharded``) and takes the same step again: the same loss
and the same weights afterwards show that weights and AdamW moments came back; save/load times and size
are reported. DIR must be one folder every process sees (as a pod's run directory is).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Literal

import torch
import typer

from dreamframe import commandline
from dreamframe.benchmarking import default_gemm_size, matmul_flops_per_second, synchronize
from dreamframe.models import video_llm

from . import checkpoint as ckpt
from . import modeling
from .data import Batch
from .distributed import DistContext, all_sum, barrier, init_distributed, teardown
from .rng import seed_everything
from .spec import Method, fill_hyperparameters
from .step import clip_gradients, forward_backward

app = typer.Typer(add_completion=False)


# The command line is parsed into one namespace (``parse_args``), which ``run`` measures.
@app.command(help=__doc__.splitlines()[0])
def options(
    preset: Annotated[str, typer.Option(help="tiny, llava-1.5-7b, or a local path / hub id")] = "tiny",
    random_weights: Annotated[
        bool, typer.Option("--random-weights", help="build the preset's architecture, no download")
    ] = False,
    model_cache_dir: Path = Path(".dreamframe/models"),
    method: Annotated[Literal["lora", "full"], typer.Option()] = "lora",
    batch_size: Annotated[int, typer.Option(help="samples per process per step")] = 2,
    num_frames: int = 4,
    text_tokens: Annotated[int, typer.Option(help="question tokens per sample")] = 128,
    answer_tokens: Annotated[int, typer.Option(help="labelled answer tokens per sample")] = 64,
    lora_rank: int = 128,
    lora_dropout: float = 0.05,
    layers: Annotated[int, typer.Option(help="decoder layers (random weights; 0: the preset's)")] = 0,
    checkpoint_dir: Annotated[
        Path | None, typer.Option(help="also time a sharded checkpoint save + restore here")
    ] = None,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing")] = False,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile each decoder layer")] = False,
    steps: Annotated[int, typer.Option(help="timed optimizer steps")] = 5,
    warmup: int = 2,
    device: str = "auto",
    precision: Annotated[Literal["auto", "bf16", "fp32"], typer.Option()] = "auto",
    gemm_size: Annotated[int, typer.Option(help="peak-GEMM side (0: 8192 on GPU, 1024 on CPU)")] = 0,
    json: Annotated[Path | None, typer.Option(help="also write the figures here")] = None,
) -> SimpleNamespace:
    return SimpleNamespace(**locals())


def parse_args(argv: list[str] | None) -> SimpleNamespace:
    """The benchmark's options; ``--help`` exits 0, a usage error exits 2 (SystemExit)."""
    return commandline.run(app, argv)


def build_base(args: SimpleNamespace, device: torch.device, dtype: torch.dtype):
    """The base model: random weights of the preset's architecture (built on the device), or loaded."""
    from transformers import AutoConfig, LlavaForConditionalGeneration

    if args.random_weights:
        if args.preset == video_llm.LLAVA_7B:
            config = video_llm.llava_7b_config()
        else:
            config = AutoConfig.from_pretrained(
                video_llm.resolve_model_path(args.preset, {}, args.model_cache_dir)
            )
        if args.layers:
            config.text_config.num_hidden_layers = args.layers
        with torch.device(device):
            model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
        return model
    if args.layers:
        raise SystemExit("--layers needs --random-weights")
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


def run(args: SimpleNamespace) -> dict:
    ctx = init_distributed(args.device)
    try:
        return _bench(args, ctx)
    finally:
        teardown(ctx)


def _bench(args: SimpleNamespace, ctx: DistContext) -> dict:
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

    def train_step() -> dict:
        stats = forward_backward(model, [batch], ctx, precision)
        clip_gradients(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return stats

    times = []
    for i in range(args.warmup + args.steps):
        synchronize(ctx.device)
        start = time.perf_counter()
        stats = train_step()
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
    figures["layers"] = config.text_config.num_hidden_layers
    if args.checkpoint_dir:
        figures["checkpoint"] = checkpoint_round_trip(
            model, optimizer, params, train_step, args.checkpoint_dir, ctx
        )
    return figures


def _local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if hasattr(t, "to_local") else t).detach().double()


def state_digest(params: list[torch.nn.Parameter], optimizer, ctx: DistContext) -> list[float]:
    """(sum, sum of squares) of the trained weights and of each AdamW moment, over all ranks' shards."""
    sums = [0.0] * 6
    for p in params:
        tensors = [_local(p)]
        state = optimizer.state.get(p, {})
        tensors += [_local(state[k]) if k in state else torch.zeros(1) for k in ("exp_avg", "exp_avg_sq")]
        for i, t in enumerate(tensors):
            sums[2 * i] += float(t.sum())
            sums[2 * i + 1] += float((t * t).sum())
    return all_sum(sums, ctx)


def checkpoint_round_trip(model, optimizer, params, train_step, directory: Path, ctx: DistContext) -> dict:
    """Save (as the service does), step, restore, step again.

    The restored weights and AdamW moments must equal the saved ones exactly, and the step after the
    restore must see exactly the loss the step after the save saw (the forward is deterministic). The
    weights after that step are compared too, but only to a relative difference: a GPU backward is not
    bitwise reproducible (atomic adds, e.g. in the embedding gradient)."""
    if ctx.is_main:
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
    barrier(ctx)
    saved = state_digest(params, optimizer, ctx)
    synchronize(ctx.device)
    started = time.perf_counter()
    ckpt.save_sharded(model, optimizer, directory)
    barrier(ctx)
    save_seconds = time.perf_counter() - started
    written = [p.stat().st_size for p in directory.rglob("*") if p.is_file()]
    first = train_step()["loss"]
    after_first = state_digest(params, optimizer, ctx)
    synchronize(ctx.device)
    started = time.perf_counter()
    ckpt.load_sharded(model, optimizer, directory)
    synchronize(ctx.device)
    barrier(ctx)
    load_seconds = time.perf_counter() - started
    restored = state_digest(params, optimizer, ctx)
    again = train_step()["loss"]
    after_again = state_digest(params, optimizer, ctx)
    barrier(ctx)
    if ctx.is_main:
        shutil.rmtree(directory, ignore_errors=True)
    drift = max(abs(a - b) / max(abs(a), 1e-30) for a, b in zip(after_first, after_again, strict=True))
    return {
        "bytes": sum(written),
        "files": len(written),
        "save_seconds": save_seconds,
        "load_seconds": load_seconds,
        "state_digest_saved": saved,
        "state_digest_restored": restored,
        "restored_state_identical": saved == restored,
        "loss_after_save": first,
        "loss_after_restore": again,
        "next_loss_identical": first == again,
        "next_step_relative_difference": drift,
        "identical": saved == restored and first == again,
    }


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
            f"{f['preset']}{weights}, {f['layers']} layers: {_si(f['parameters'], 'params')}, "
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
    if "checkpoint" in f:
        c = f["checkpoint"]
        rows.append(
            (
                "checkpoint (sharded)",
                f"{c['bytes'] / 2**30:.1f} GiB, save {c['save_seconds']:.1f} s, restore "
                f"{c['load_seconds']:.1f} s; restored weights + AdamW moments "
                f"{'identical' if c['restored_state_identical'] else 'DIFFER'}, next step's loss "
                f"{'identical' if c['next_loss_identical'] else 'DIFFERS'} "
                f"({c['loss_after_save']:.6f} vs {c['loss_after_restore']:.6f}), weights after it within "
                f"{c['next_step_relative_difference']:.1e} relative",
            )
        )
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
