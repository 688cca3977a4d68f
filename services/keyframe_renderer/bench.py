"""Keyframe-renderer benchmark: the reference setting vs the service's fast path(s) vs the compute floor.

    python -m services.keyframe_renderer.bench --out bench/            # GPU: full-size SDXL, random weights
    python -m services.keyframe_renderer.bench --preset tiny --out /tmp/b   # CPU smoke run in seconds

Measures, on the current device, in one run (the weights are built once):
- the reference setting as the paper runs it: diffusers' pipelines, text prompts, one image per call,
  fp16 (fp32 on a CPU), eager, PIL PNG saved per frame; ``--reference-compile`` also times the same loop
  with both UNets under ``torch.compile`` (for transparency; the speedups are against the eager one);
- the service, once per *variant* of the engine options (``--variant``; the defaults compare the
  service's defaults, last session's compiled setting and cuDNN attention): ``Renderer.render`` end to
  end (batched bf16 engine, PNG + sidecar writes into a LocalStore) at ``--batch-size`` (0 = chosen from
  free memory, as the service does), after one warm-up batch that pays any compile; device time per
  stage (text encoders, base, refiner, VAE decode) from CUDA events;
- FLOPs per image, counted with ``torch.utils.flop_counter.FlopCounterMode`` over one real batch
  (per module: base UNet × its steps, refiner UNet × its steps, VAE decode, text encoders), and each
  module's eager device time over one batch;
- SDPA kernels (cuDNN, flash, memory-efficient, math) timed alone on the UNets' and the VAE's attention
  shapes, and the eager VAE decode channels-last vs contiguous;
- the compute floor: FLOPs per image ÷ the bf16 peak (``--peak-flops``, default H100 SXM dense 989e12)
  and ÷ the matmul throughput this run measures on a large GEMM; model FLOPs utilisation;
- host synchronisations per batch (CUDA sync debug mode) and peak memory per image.

Prints a table and writes ``render-bench.json`` and ``render-bench.md`` under ``--out`` (rewritten after
every variant, so a run cut short keeps what it measured). ``--time-budget`` skips variants that would
not finish in time. Presets: ``sdxl-random`` (the real SDXL base + refiner + VAE architecture with random
weights, from dreamframe.models.sdxl_configs; no download), ``sdxl`` (real weights per the renderer
config), ``tiny``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import platform
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dreamframe import keys
from dreamframe.benchmarking import (
    SyncCounter,
    default_gemm_size,
    matmul_flops_per_second,
    seconds_per_call,
    synchronize,
)
from dreamframe.config import get_settings
from dreamframe.models import fp8, sdxl
from dreamframe.storage.base import ObjectRef
from dreamframe.story import Story, StoryItem, Substory, TinyStory
from services.keyframe_renderer.settings import RendererSettings

from .engine import (
    COMPILE_MODES,
    SDPA_BACKENDS,
    EngineOptions,
    SDXLEngine,
    fp8_linears,
    model_id,
    quantize_unet,
)
from .options import DEFAULT_NEGATIVE_PROMPT, FrameSelection, RenderOptions, resolve_options
from .renderer import Renderer, RenderRequest

H100_SXM_BF16_DENSE = 989e12
# Engine-option changes against the service's settings (``--variant NAME``; ``NAME=key:value,...`` for
# others). "before" is the service as last measured: both UNets compiled with conv_1x1_as_mm only, the
# VAE eager, separate QKV projections, PyTorch's SDPA choice.
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "before": {"compile_vae": False, "fuse_qkv": False, "sdpa_backend": "auto", "compile_tuning": False},
    "eager": {"compile_mode": ""},
    "cudnn": {"sdpa_backend": "cudnn"},
    "flash": {"sdpa_backend": "flash"},
    "efficient": {"sdpa_backend": "efficient"},
    "tuned": {"compile_tuning": True},
    "untuned": {"compile_tuning": False},
    "unfused": {"fuse_qkv": False},
    "vae-eager": {"compile_vae": False},
    "contiguous": {"channels_last": False},
    "fp8": {"fp8": True},
    "bf16": {"fp8": False},
}
GPU_VARIANTS = ["default", "fp8"]
PROMPTS = [
    "at a rainy street corner, a man looks like Tom Hanks in blue is standing under a lamp",
    "in a small kitchen, a woman looks like Emma Stone in red is holding a cup of tea",
    "on a wooden pier at dusk, a man looks like Tom Hanks in blue is looking at the sea",
    "in a crowded train station, a woman looks like Emma Stone in red is walking fast",
]


# --- models ------------------------------------------------------------------------------------------
def build_pipes(preset: str, device: torch.device, dtype: torch.dtype, cache_dir: Path) -> sdxl.SDXLPipelines:
    settings = get_settings().renderer
    return sdxl.load_sdxl(
        preset, model_paths=settings.model_paths, cache_dir=cache_dir, device=str(device), dtype=dtype
    )


def cast(pipes: sdxl.SDXLPipelines, dtype: torch.dtype) -> sdxl.SDXLPipelines:
    """The same weights in another precision, in place (the refiner shares text_encoder_2 and VAE)."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "modules to keep in float32: []" is noise here
    try:
        pipes.base.to(dtype=dtype)
        if pipes.refiner is not None:
            pipes.refiner.unet.to(dtype=dtype)
    finally:
        diffusers_logging.set_verbosity(level)
    return sdxl.SDXLPipelines(pipes.base, pipes.refiner, pipes.preset, pipes.resolution, pipes.device, dtype)


def note(message: str) -> None:
    """Progress on stderr, so a run cut short still says how far it got."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- (a) the reference loop --------------------------------------------------------------------------
def run_reference(
    pipes: sdxl.SDXLPipelines, *, frames: int, steps: int, size: int, fraction: float, out_dir: Path
) -> dict[str, Any]:
    """The paper's loop: one frame per call, text prompts into both pipelines, PNG saved per frame."""

    def one(i: int) -> None:
        prompt = f"generate an image in Dramatic style: {PROMPTS[i % len(PROMPTS)]}"
        generator = torch.Generator(device=pipes.device).manual_seed(20 + i)
        latents = pipes.base(
            prompt=prompt,
            negative_prompt=DEFAULT_NEGATIVE_PROMPT,
            num_inference_steps=steps,
            denoising_end=fraction,
            height=size,
            width=size,
            output_type="latent",
            generator=generator,
        ).images
        image = pipes.refiner(
            prompt=prompt,
            negative_prompt=DEFAULT_NEGATIVE_PROMPT,
            num_inference_steps=steps,
            denoising_start=fraction,
            image=latents,
            generator=generator,
        ).images[0]
        image.save(out_dir / f"{i}.png")

    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # the fp16 VAE's upcast logs a line per frame
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random fp16 weights overflow to NaN: harmless for timing
        one(0)  # warm-up (kernel selection, allocator)
        synchronize(pipes.device)
        started = time.perf_counter()
        for i in range(1, frames + 1):
            one(i)
        synchronize(pipes.device)
        seconds = time.perf_counter() - started
    diffusers_logging.set_verbosity(level)
    return {"images": frames, "seconds": seconds, "seconds_per_image": seconds / frames, "batch_size": 1}


def set_reference_compiled(pipes: sdxl.SDXLPipelines, mode: str) -> None:
    """torch.compile both pipelines' UNets as diffusers' docs do (``mode=""``: back to eager)."""
    for pipe in (pipes.base, pipes.refiner):
        if pipe is None:
            continue
        if mode:
            pipe.unet.compile(mode=mode, fullgraph=True)
        else:
            pipe.unet._compiled_call_impl = None
    if not mode:
        torch._dynamo.reset()


# --- FLOPs -------------------------------------------------------------------------------------------
def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def bench_modules(engine: SDXLEngine) -> dict[str, torch.nn.Module]:
    base, refiner = engine.base, engine.refiner
    modules = {
        "base_unet": base.unet,
        "refiner_unet": refiner.unet if refiner is not None else None,
        "vae_decode": base.vae.decoder,
        "vae_post_quant_conv": base.vae.post_quant_conv,
        "text_encoder": base.text_encoder,
        "text_encoder_2": base.text_encoder_2,
    }
    return {name: m for name, m in modules.items() if m is not None}


def time_modules(engine: SDXLEngine, params, batch: int) -> dict[str, Any]:
    """Device time per module over one eager batch (CUDA events in forward hooks: no host syncs)."""
    cuda = engine.device.type == "cuda"
    marks: dict[str, list] = {name: [] for name in bench_modules(engine)}
    handles = []
    for name, module in bench_modules(engine).items():

        def pre(_m, _a, name=name):
            if cuda:
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                marks[name].append([event, None])
            else:
                marks[name].append([time.perf_counter(), None])

        def post(_m, _a, _o, name=name):
            if cuda:
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                marks[name][-1][1] = event
            else:
                marks[name][-1][1] = time.perf_counter()

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    try:
        synchronize(engine.device)
        started = time.perf_counter()
        engine.render(prompts, list(range(20, 20 + batch)), params)
        synchronize(engine.device)
        total = time.perf_counter() - started
    finally:
        for handle in handles:
            handle.remove()
    seconds = {
        name: sum((a.elapsed_time(b) / 1e3 if cuda else b - a) for a, b in pairs)
        for name, pairs in marks.items()
    }
    return {"batch_size": batch, "total_seconds": total, "seconds": seconds}


def count_flops(engine: SDXLEngine, params, batch: int) -> dict[str, Any]:
    """FLOPs of one real batch, split by module with forward hooks (calls × FLOPs per call)."""
    from torch.utils.flop_counter import FlopCounterMode

    modules = bench_modules(engine)
    custom = {}
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        # PyTorch's table has the CUDA kernels only; count the CPU flash kernel the same way.
        custom[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
    counter = FlopCounterMode(display=False, custom_mapping=custom)
    stats = {name: {"calls": 0, "flops": 0} for name, m in modules.items() if m is not None}
    handles = []
    starts: dict[str, int] = {}
    for name, module in modules.items():
        if module is None:
            continue

        def pre(_m, _a, name=name):
            starts[name] = counter.get_total_flops()

        def post(_m, _a, _o, name=name):
            stats[name]["calls"] += 1
            stats[name]["flops"] += counter.get_total_flops() - starts[name]

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    try:
        with counter:
            engine.render(prompts, list(range(20, 20 + batch)), params)
    finally:
        for handle in handles:
            handle.remove()
    total = counter.get_total_flops()
    for entry in stats.values():
        entry["flops_per_call"] = entry["flops"] // max(entry["calls"], 1)
    return {"batch_size": batch, "total": total, "per_image": total / batch, "modules": stats}


def fp8_error(engine: SDXLEngine, params, batch: int = 2) -> dict[str, Any]:
    """How far FP8 linears move one base-UNet call from an fp32 copy of the same weights, next to
    how far bf16 itself is (relative L2 error of the noise prediction, first denoising step of a real
    batch). Random weights can't say how images look; this says how much precision FP8 costs."""
    import copy

    from torch.utils._pytree import tree_map

    reason = fp8.unavailable_reason(engine.device)
    if reason or engine.options.fp8:
        return {"skipped": reason or "the engine is already FP8"}
    unet = engine.base.unet
    captured: dict[str, Any] = {}

    def grab(_module, args, kwargs):
        captured.setdefault("inputs", (args, kwargs))

    handle = unet.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        engine.render([PROMPTS[i % len(PROMPTS)] for i in range(batch)], list(range(20, 20 + batch)), params)
    finally:
        handle.remove()
    args, kwargs = captured["inputs"]

    def to32(x):
        return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    with torch.inference_mode():
        bf16 = unet(*args, **kwargs)[0].float()
        fp32_unet = copy.deepcopy(unet).float()
        fp32 = fp32_unet(*tree_map(to32, args), **tree_map(to32, kwargs))[0]
        del fp32_unet
        torch.cuda.empty_cache()
        originals = quantize_unet(unet)
        try:
            quantized = unet(*args, **kwargs)[0].float()
        finally:
            fp8.restore_linears(unet, originals)

    def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
        return float((x - ref).norm() / ref.norm())

    return {
        "layers": len(fp8.linears(unet, fp8_linears(unet))),
        "bf16_vs_fp32": rel(bf16, fp32),
        "fp8_vs_fp32": rel(quantized, fp32),
        "fp8_vs_bf16": rel(quantized, bf16),
    }


def gemm_flops_per_second(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Dense matmul throughput on this device: the practical ceiling for the UNet's GEMMs/convs."""
    n, iters = default_gemm_size(device), 30 if device.type == "cuda" else 5
    return {
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "flops_per_second": matmul_flops_per_second(device, dtype, n, iters),
    }


# --- (b) the service ---------------------------------------------------------------------------------
def bench_story(frames: int) -> Story:
    items = [StoryItem(kind="frame", text=PROMPTS[i % len(PROMPTS)] + f", shot {i}") for i in range(frames)]
    return Story(
        overview="benchmark",
        style_keyword="Dramatic",
        substories=[Substory(tiny_stories=[TinyStory(items=items)])],
    )


def run_service(
    engine: SDXLEngine, *, frames: int, steps: int, size: int, fraction: float, batch_size: int, compile: bool
) -> dict[str, Any]:
    """``Renderer.render`` end to end into a LocalStore: warm-up batch, then ``frames`` timed frames."""
    from dreamframe.storage import LocalStore

    with tempfile.TemporaryDirectory(prefix="render-bench-") as tmp:
        store = LocalStore(Path(tmp), "bench")
        renderer = Renderer(store, RendererSettings(preset=engine.pipes.preset, device=str(engine.device)))
        renderer.engines.put(engine.pipes.preset, engine)
        story = bench_story(frames)
        ref: ObjectRef = store.put_bytes(keys.story_key("bench"), story.to_json().encode())
        options = RenderOptions(
            preset=engine.pipes.preset,
            steps=steps,
            high_noise_fraction=fraction,
            width=size,
            height=size,
            batch_size=batch_size,
            compile=compile,
        )

        def render(job: str, selection: FrameSelection):
            return list(
                renderer.render(RenderRequest(job_id=job, story=ref, frames=selection, options=options))
            )

        started = time.perf_counter()
        warm = render("warmup", FrameSelection("range", start=0, end=min(frames, batch_size or frames)))
        chosen = warm[-1].summary.batch_size
        warmup_seconds = time.perf_counter() - started
        note(f"service warm-up batch of {chosen}: {warmup_seconds:.1f} s")
        if device_is_cuda(engine):
            torch.cuda.reset_peak_memory_stats(engine.device)
            resident = torch.cuda.memory_allocated(engine.device)
        synchronize(engine.device)
        engine.reset_stage_seconds()
        with SyncCounter(engine.device) as syncs:
            started = time.perf_counter()
            events = render("timed", FrameSelection("all"))
            synchronize(engine.device)
            seconds = time.perf_counter() - started
        summary = events[-1].summary
        note(f"service: {seconds / summary.rendered:.3f} s/image over {summary.rendered} frames")
        result: dict[str, Any] = {
            "images": summary.rendered,
            "seconds": seconds,
            "seconds_per_image": seconds / summary.rendered,
            "batch_size": chosen,
            "render_seconds": summary.render_seconds,
            "render_seconds_per_image": summary.render_seconds / summary.rendered,
            "batches": -(-summary.rendered // chosen),
            "warmup_seconds": warmup_seconds,
            "stage_seconds_per_image": {k: v / summary.rendered for k, v in engine.stage_seconds.items()},
        }
        if syncs.enabled:
            result["host_syncs"] = syncs.count
            result["host_syncs_per_batch"] = syncs.count / result["batches"]
            result["host_sync_sites"] = syncs.sites
        if device_is_cuda(engine):
            peak = torch.cuda.max_memory_allocated(engine.device)
            result["peak_memory_bytes"] = peak
            result["peak_bytes_per_image"] = (peak - resident) / chosen
        renderer.close()
        result["_frame0"] = frame_pixels(store, "timed", 0)  # for comparing variants; not saved
        return result


def frame_pixels(store, job: str, index: int) -> np.ndarray:
    from PIL import Image

    data = store.get_bytes(keys.frame_key(job, 0, index))
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def device_is_cuda(engine: SDXLEngine) -> bool:
    return engine.device.type == "cuda"


# --- kernels in isolation ---------------------------------------------------------------------------
def attention_shapes(device: torch.device) -> list[tuple[str, int, int, int, int, int]]:
    """(name, batch, heads, query tokens, key tokens, head dim) as the models run them at 1024² batch 8."""
    if device.type != "cuda":
        return [("tiny self", 4, 2, 64, 64, 16), ("tiny cross", 4, 2, 64, 77, 16)]
    return [
        ("UNet 64x64 self", 16, 10, 4096, 4096, 64),
        ("UNet 64x64 cross", 16, 10, 4096, 77, 64),
        ("UNet 32x32 self", 16, 20, 1024, 1024, 64),
        ("VAE 128x128 self", 8, 1, 16384, 16384, 512),
    ]


def time_attention(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> list[dict[str, Any]]:
    """Each SDPA kernel alone (strictly that kernel) on the models' attention shapes, laid out as the
    fused projections leave them (q, k, v as strided views of one [B, N, 3, H, D] tensor)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    rows = []
    for name, b, h, nq, nk, d in attention_shapes(device):
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(b, nq, 3, h, d, device=device, dtype=dtype, generator=gen)[:, :, 0].transpose(1, 2)
        kv = torch.randn(b, nk, 2, h, d, device=device, dtype=dtype, generator=gen)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        flops = 4 * b * h * nq * nk * d
        row: dict[str, Any] = {"shape": name, "b_h_nq_nk_d": [b, h, nq, nk, d], "flops": flops}
        try:
            row["auto_choice"] = SDPBackend(torch._fused_sdp_choice(q, k, v)).name
        except Exception:  # private API: informative only
            pass
        for label, kernel in [("auto", None), *kernels.items()]:
            context = contextlib.nullcontext() if kernel is None else sdpa_kernel([kernel])
            try:
                with context, warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    seconds = seconds_per_call(
                        partial(F.scaled_dot_product_attention, q, k, v), device, repeats
                    )
                row[label] = flops / seconds
            except RuntimeError:
                row[label] = None  # this kernel can't run the shape
        rows.append(row)
        del q, k, v, kv
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def linear_shapes(batch: int) -> list[tuple[str, int, int, int]]:
    """(name, rows, in, out) of the base UNet's main linear layers at 1024² with guidance (2 × batch)."""
    rows64, rows32 = 2 * batch * 64 * 64, 2 * batch * 32 * 32
    return [
        ("64x64 qkv", rows64, 640, 1920),
        ("64x64 geglu", rows64, 640, 5120),
        ("64x64 ff out", rows64, 2560, 640),
        ("32x32 qkv", rows32, 1280, 3840),
        ("32x32 geglu", rows32, 1280, 10240),
        ("32x32 ff out", rows32, 5120, 1280),
    ]


def time_linears(device: torch.device, batch: int, repeats: int = 10) -> list[dict[str, Any]]:
    """bf16 ``nn.Linear`` vs FP8 on the base UNet's linear-layer shapes: the FP8 GEMM alone (operands
    already quantized: what FP8 can gain at most) and the whole ``Float8Linear`` eager (with its
    activation scaling unfused: what it costs at most; compiled, that work fuses into fewer kernels)."""

    def rate(fn, flops: int) -> float:
        return flops / seconds_per_call(fn, device, repeats)

    rows = []
    for name, m, k, n in linear_shapes(batch):
        linear = torch.nn.Linear(k, n, device=device, dtype=torch.bfloat16)
        layer = fp8.Float8Linear.from_linear(linear)
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        x8, xs = fp8._rowwise(x)
        flops = 2 * m * k * n
        with torch.inference_mode():
            rows.append(
                {
                    "shape": name,
                    "m_k_n": [m, k, n],
                    "bf16": rate(lambda x=x, f=linear: f(x), flops),
                    "fp8": rate(
                        lambda x8=x8, xs=xs, f=layer: fp8.scaled_matmul(
                            x8, xs, f.weight, f.weight_scale, f.bias, f.out_dtype
                        ),
                        flops,
                    ),
                    "fp8_layer_eager": rate(lambda x=x, f=layer: f(x), flops),
                }
            )
        del x, x8, linear, layer
    torch.cuda.empty_cache()
    return rows


def time_vae_layouts(engine: SDXLEngine, batch: int, size: int) -> dict[str, float]:
    """Eager VAE decode of one batch, channels-last vs contiguous (seconds); the engine's layout is kept."""
    vae = engine.base.vae
    latents = torch.randn(batch, vae.config.latent_channels, size // 8, size // 8, device=engine.device)
    latents = latents.to(vae.dtype)
    results = {}
    applied = engine.options.channels_last and engine.device.type == "cuda"
    kept = torch.channels_last if applied else torch.contiguous_format
    try:
        for label, fmt in (("channels_last", torch.channels_last), ("contiguous", torch.contiguous_format)):
            vae.to(memory_format=fmt)
            x = latents.contiguous(memory_format=fmt)
            with torch.inference_mode():  # the untimed first call: cuDNN picks algorithms for the layout
                results[label] = seconds_per_call(
                    lambda x=x: vae.decode(x, return_dict=False), engine.device, repeats=1
                )
    finally:
        vae.to(memory_format=kept)
    return results


# --- variants ----------------------------------------------------------------------------------------
def parse_variant(spec: str, base: EngineOptions) -> tuple[str, EngineOptions]:
    """``NAME`` (one of VARIANTS) or ``NAME=key:value,key:value`` (EngineOptions fields) → options."""
    name, _, changes = spec.partition("=")
    name = name.strip()
    if not name:
        raise ValueError(f"--variant {spec!r}: needs a name")
    if not changes:
        if name not in VARIANTS:
            raise ValueError(
                f"--variant {name!r}: unknown; known: {', '.join(VARIANTS)} (or NAME=key:value,...)"
            )
        return name, dataclasses.replace(base, **VARIANTS[name])
    types = {f.name: f.type for f in dataclasses.fields(EngineOptions)}
    updates: dict[str, Any] = {}
    for item in changes.split(","):
        key, sep, value = (part.strip() for part in item.partition(":"))
        key = key.replace("-", "_")
        if not sep or key not in types:
            raise ValueError(
                f"--variant {spec!r}: {item!r} is not key:value with a key in {', '.join(types)}"
            )
        if types[key] in (bool, "bool"):
            if value.lower() not in ("true", "false", "1", "0", "on", "off", "yes", "no"):
                raise ValueError(f"--variant {spec!r}: {key} must be true or false, got {value!r}")
            updates[key] = value.lower() in ("true", "1", "on", "yes")
        else:
            updates[key] = (
                "" if key == "compile_mode" and value.lower() in ("off", "none", "eager") else value
            )
    return name, dataclasses.replace(base, **updates)


def pixel_difference(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    diff = np.abs(a - b)
    return {"max": float(diff.max()), "mean": float(diff.mean())}


# --- report ------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict[str, Any]:
    import diffusers
    import transformers

    env = {
        "device": str(device),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    else:
        env["torch_threads"] = torch.get_num_threads()
    return env


def si(value: float) -> str:
    """1.23e12 → '1.23 T' (FLOP counts span tiny CPU models to full-size SDXL)."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}"
    return f"{value:.3g} "


def stage_flops_per_image(flops: dict[str, Any]) -> dict[str, float]:
    """FLOPs per image of each engine stage, from the per-module count."""
    m, batch = flops["modules"], flops["batch_size"]

    def total(*names: str) -> float:
        return sum(m[n]["flops"] for n in names if n in m) / batch

    return {
        "encode": total("text_encoder", "text_encoder_2"),
        "base": total("base_unet"),
        "refiner": total("refiner_unet"),
        "decode": total("vae_decode", "vae_post_quant_conv"),
    }


def summarize(report: dict[str, Any]) -> str:
    ref, ref_c, fl = report["reference"], report.get("reference_compiled"), report["flops"]
    peak, gemm = report["peak_flops"], report["gemm"]["flops_per_second"]
    per_image = fl["per_image"]
    floor_peak, floor_gemm = per_image / peak, per_image / gemm
    env = report["env"]
    lines = [
        f"Keyframe renderer benchmark — {env.get('gpu', env['device'])}, "
        f"torch {env['torch']}, diffusers {env['diffusers']}",
        f"model {report['preset']} {report['size']}x{report['size']}, {report['steps']} steps "
        f"(base {report['step_split'][0]} + refiner {report['step_split'][1]}), guidance 5.0",
        "",
        "| setting | batch | dtype | images | s/image | images/s | vs reference | vs compiled ref. | FLOP/s "
        "| MFU (peak) | × GEMM floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    if ref:
        rows.append(("reference (one at a time, eager)", ref, report["reference_dtype"]))
    if ref_c:
        rows.append(
            (f"reference (one at a time, compile {ref_c['compile']})", ref_c, report["reference_dtype"])
        )
    for v in report["variants"]:
        if "result" in v:
            rows.append((f"service: {v['name']}", v["result"], report["dtype"]))
    base_ips = 1 / ref["seconds_per_image"] if ref else None
    compiled_ips = 1 / ref_c["seconds_per_image"] if ref_c else None
    for name, r, dtype in rows:
        ips = 1 / r["seconds_per_image"]
        achieved = per_image * ips
        cells = [
            name,
            r["batch_size"],
            dtype,
            r["images"],
            f"{r['seconds_per_image']:.3f}",
            f"{ips:.3f}",
            f"{ips / base_ips:.2f}×" if base_ips else "–",
            f"{ips / compiled_ips:.2f}×" if compiled_ips else "–",
            si(achieved),
            f"{achieved / peak:.1%}",
            f"{r['seconds_per_image'] / floor_gemm:.2f}",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines.append("")
    stage_flops = stage_flops_per_image(fl)
    for v in report["variants"]:
        if "result" not in v:
            lines.append(f"{v['name']} ({v['options_text']}): {v.get('error') or v.get('skipped')}")
            continue
        r = v["result"]
        stages = ", ".join(
            f"{k} {sec:.3f} s"
            + (f" ({si(stage_flops[k] / sec)}FLOP/s)" if sec > 0 and stage_flops[k] else "")
            for k, sec in r["stage_seconds_per_image"].items()
        )
        diff = (
            f"; frame 0 vs {v['diff_against']}: max {v['diff']['max']:.0f}, mean {v['diff']['mean']:.2f}"
            if ("diff" in v)
            else ""
        )
        lines.append(
            f"{v['name']} ({v['options_text']}): per image {stages}; render only "
            f"{r['render_seconds_per_image']:.3f} s/image; warm-up (compile) {r['warmup_seconds']:.0f} s; "
            f"variant total {v['wall_seconds']:.0f} s{diff}"
        )
    parts = ", ".join(
        f"{name} {si(m['flops_per_call'])}FLOP × {m['calls']}"
        for name, m in fl["modules"].items()
        if m["calls"]
    )
    eager = ", ".join(
        f"{name} {m['seconds']:.2f} s ({si(m['flops_per_second'])}FLOP/s)"
        for name, m in fl["modules"].items()
        if m["calls"] and "seconds" in m
    )
    lines += [
        "",
        f"FLOPs per image: {si(per_image)}FLOP (one batch of {fl['batch_size']} counted: {parts})",
        f"eager batch of {fl['batch_size']} ({report['eager_options']}): "
        f"{fl.get('eager_batch_seconds', 0):.2f} s — {eager}",
        f"peak: {si(peak)}FLOP/s ({report['peak_source']}) → floor {floor_peak:.4f} s/image",
        f"measured GEMM ({report['gemm']['n']}³ {report['gemm']['dtype']}): {si(gemm)}FLOP/s "
        f"→ floor {floor_gemm:.4f} s/image",
    ]
    vae = report.get("vae_layouts")
    if vae:
        lines.append(
            f"eager VAE decode of a batch: channels-last {vae['channels_last']:.3f} s, "
            f"contiguous {vae['contiguous']:.3f} s"
        )
    for row in report.get("attention_kernels", []):
        rates = ", ".join(
            f"{k} {si(row[k])}FLOP/s" if row.get(k) else f"{k} n/a"
            for k in ("auto", *[b for b in SDPA_BACKENDS if b != "auto"])
        )
        lines.append(
            f"SDPA {row['shape']} {row['b_h_nq_nk_d']} (auto picks {row.get('auto_choice', '?')}): {rates}"
        )
    svc = report.get("service")
    if svc:
        if "host_syncs" in svc:
            per_batch = svc["host_syncs_per_batch"]
            lines.append(
                f"host syncs ({report['service_variant']}): {svc['host_syncs']} over {svc['batches']} "
                f"batches ({per_batch:.1f} per batch of {report['steps']} steps): {svc['host_sync_sites']}"
            )
        if "peak_bytes_per_image" in svc:
            lines.append(
                f"peak memory ({report['service_variant']}) {svc['peak_memory_bytes'] / 2**30:.1f} GiB, "
                f"{svc['peak_bytes_per_image'] / 2**30:.2f} GiB per image above the weights"
            )
    for v in report["variants"] if ref else []:
        if "result" in v:
            spi = v["result"]["seconds_per_image"]
            lines.append(
                f"targets ({v['name']}): speedup {ref['seconds_per_image'] / spi:.2f}× the eager "
                f"reference (≥ 2.5×), {spi / floor_gemm:.2f}× the measured-GEMM floor (≤ 1.6×)"
            )
    precision = report.get("fp8_precision") or {}
    if "fp8_vs_fp32" in precision:
        lines.append(
            f"FP8 precision (base UNet, first step, {precision['layers']} linear layers FP8): relative L2 "
            f"error vs fp32 — bf16 {precision['bf16_vs_fp32']:.2e}, FP8 {precision['fp8_vs_fp32']:.2e} "
            f"(FP8 vs bf16 {precision['fp8_vs_bf16']:.2e})"
        )
    elif precision:
        lines.append(f"FP8 precision: {precision.get('skipped')}")
    for row in precision.get("linears", []):
        lines.append(
            f"linear {row['shape']} {row['m_k_n']}: bf16 {si(row['bf16'])}FLOP/s; FP8 GEMM alone "
            f"{si(row['fp8'])}FLOP/s, FP8 layer eager {si(row['fp8_layer_eager'])}FLOP/s"
        )
    lines.append(f"bench wall time {report['elapsed_seconds']:.0f} s")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--preset", default=None, help=f"{sdxl.SDXL_RANDOM} (GPU default), sdxl, or tiny (CPU default)"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--frames", type=int, default=16, help="timed frames per service variant")
    p.add_argument(
        "--reference-frames", type=int, default=3, help="timed frames in the reference run (0: skip)"
    )
    p.add_argument(
        "--reference-compile",
        nargs="?",
        const="default",
        default="",
        choices=[m for m in COMPILE_MODES if m],
        help="also time the reference loop with both UNets under torch.compile (in this mode, "
        "default 'default')",
    )
    p.add_argument("--batch-size", type=int, default=0, help="0 = from free memory, as the service chooses")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--high-noise-fraction", type=float, default=0.75)
    p.add_argument("--resolution", type=int, default=0, help="0 = the preset's (1024 for SDXL)")
    p.add_argument(
        "--compile",
        default=None,
        choices=list(COMPILE_MODES),
        help="torch.compile mode of the service variants ('' = eager; default: 'default' on GPUs, eager on "
        "CPUs)",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=None,
        metavar="NAME[=key:value,...]",
        help=f"a service variant (repeatable), against the renderer settings: {', '.join(VARIANTS)}, or "
        "NAME=key:value,... over compile_mode, compile_vae, compile_tuning, fuse_qkv, sdpa_backend, "
        f"channels_last. Default: {', '.join(GPU_VARIANTS)} on GPUs, default on CPUs. The first one "
        "that runs is the headline 'service' figure.",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=0.0,
        help="seconds for the whole run: a variant that would not finish in time (judged by the last "
        "one's duration) is skipped (0 = no limit)",
    )
    p.add_argument("--skip-kernels", action="store_true", help="skip the SDPA and VAE-layout timings")
    p.add_argument(
        "--peak-flops", type=float, default=None, help="bf16 dense peak (default: H100 SXM 989e12)"
    )
    p.add_argument("--out", type=Path, default=Path("bench"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    began = time.perf_counter()
    args = parse_args(argv)
    device = sdxl.pick_device(args.device)
    preset = args.preset or (sdxl.SDXL_RANDOM if device.type == "cuda" else sdxl.TINY)
    fast_dtype = sdxl.pick_dtype(device)  # bf16 on GPUs
    reference_dtype = torch.float16 if device.type == "cuda" else torch.float32
    cache_dir = get_settings().models.cache_dir
    compile_mode = args.compile if args.compile is not None else ("default" if device.type == "cuda" else "")
    settings_options = dataclasses.replace(
        EngineOptions.from_settings(get_settings().renderer), compile_mode=compile_mode
    )
    specs = args.variant or (GPU_VARIANTS if device.type == "cuda" else ["default"])
    variants = [parse_variant(spec, settings_options) for spec in specs]  # bad specs fail before any work
    args.out.mkdir(parents=True, exist_ok=True)

    pipes = build_pipes(preset, device, reference_dtype, cache_dir)
    note(f"built {preset} in {time.perf_counter() - began:.0f} s")
    size = args.resolution or pipes.resolution
    reference = reference_compiled = None
    if args.reference_frames > 0:
        ref_args = dict(
            frames=args.reference_frames, steps=args.steps, size=size, fraction=args.high_noise_fraction
        )
        with tempfile.TemporaryDirectory(prefix="render-ref-") as tmp:
            reference = run_reference(pipes, out_dir=Path(tmp), **ref_args)
            note(f"reference (eager): {reference['seconds_per_image']:.3f} s/image")
            if args.reference_compile:
                set_reference_compiled(pipes, args.reference_compile)
                try:
                    reference_compiled = run_reference(pipes, out_dir=Path(tmp), **ref_args)
                    reference_compiled["compile"] = args.reference_compile
                    note(f"reference (compiled): {reference_compiled['seconds_per_image']:.3f} s/image")
                finally:
                    set_reference_compiled(pipes, "")
    pipes = cast(pipes, fast_dtype)
    mid = model_id(preset, get_settings().renderer.model_paths, cache_dir)
    # FLOPs are counted (and eager modules timed) in bf16: the floor is the bf16 one.
    eager_options = dataclasses.replace(settings_options, compile_mode="", fp8=False)
    engine = SDXLEngine(pipes, model_id=mid, options=eager_options, reversible=True)
    params = resolve_options(
        RenderOptions(
            steps=args.steps, high_noise_fraction=args.high_noise_fraction, width=size, height=size
        ),
        preset=preset,
        resolution=size,
        default_batch_size=args.batch_size,
        compile_default=False,
    )
    split = engine.step_split(params)
    batch = args.batch_size or engine.auto_batch_size(params, max_batch=8, cpu_batch=4)
    flops = count_flops(engine, params, batch)  # eager, before any compile
    note(f"FLOPs per image {si(flops['per_image'])}FLOP at batch {batch}")
    timing = time_modules(engine, params, batch)  # eager too: hooks would break compiled graphs
    for name, seconds in timing["seconds"].items():
        flops["modules"][name]["seconds"] = seconds
        flops["modules"][name]["flops_per_second"] = (
            flops["modules"][name]["flops"] / seconds if seconds else 0.0
        )
    flops["eager_batch_seconds"] = timing["total_seconds"]
    spent = ", ".join(f"{k} {v:.2f} s" for k, v in timing["seconds"].items())
    note(f"eager batch {timing['total_seconds']:.2f} s: {spent}")
    gemm = gemm_flops_per_second(device, fast_dtype)
    precision = fp8_error(engine, params) if device.type == "cuda" else {"skipped": "not on a CPU"}
    if "skipped" not in precision:
        precision["linears"] = time_linears(device, batch)
    note(f"FP8 precision: {precision}")
    report: dict[str, Any] = {
        "preset": preset,
        "size": size,
        "steps": args.steps,
        "high_noise_fraction": args.high_noise_fraction,
        "step_split": [split.base, split.refiner],
        "compile": compile_mode,
        "dtype": str(fast_dtype).removeprefix("torch."),
        "reference_dtype": str(reference_dtype).removeprefix("torch."),
        "reference": reference,
        "reference_compiled": reference_compiled,
        "eager_options": eager_options.describe(),
        "variants": [],
        "service": None,
        "service_variant": None,
        "flops": flops,
        "gemm": gemm,
        "fp8_precision": precision,
        # On a GPU the datasheet peak; on a CPU the measured GEMM stands in for it.
        "peak_flops": args.peak_flops
        or (H100_SXM_BF16_DENSE if device.type == "cuda" else gemm["flops_per_second"]),
        "peak_source": "--peak-flops"
        if args.peak_flops
        else ("H100 SXM bf16 dense" if device.type == "cuda" else "measured GEMM (CPU)"),
        "env": environment(device),
    }
    per_image = flops["per_image"]
    report["floor_seconds_per_image"] = {
        "peak": per_image / report["peak_flops"],
        "measured_gemm": per_image / gemm["flops_per_second"],
    }
    if not args.skip_kernels:
        report["attention_kernels"] = time_attention(device, fast_dtype)
        report["vae_layouts"] = time_vae_layouts(engine, batch, size)
        note("timed the SDPA kernels and the VAE layouts")

    def write() -> str:
        report["elapsed_seconds"] = time.perf_counter() - began
        table = summarize(report)
        clean = {
            **report,
            "variants": [{k: v for k, v in x.items() if not k.startswith("_")} for x in report["variants"]],
        }
        (args.out / "render-bench.json").write_text(json.dumps(clean, indent=2, default=str) + "\n")
        (args.out / "render-bench.md").write_text(table + "\n")
        return table

    last_seconds = 0.0
    first_pixels: tuple[str, np.ndarray] | None = None
    for name, options in variants:
        entry: dict[str, Any] = {
            "name": name,
            "options": dataclasses.asdict(options),
            "options_text": options.describe(),
        }
        report["variants"].append(entry)
        elapsed = time.perf_counter() - began
        if args.time_budget and last_seconds and elapsed + last_seconds > args.time_budget:
            entry["skipped"] = (
                f"skipped: {elapsed:.0f} s spent, the last variant took {last_seconds:.0f} s, "
                f"budget {args.time_budget:.0f} s"
            )
            note(f"variant {name}: {entry['skipped']}")
            continue
        note(f"variant {name}: {options.describe()}")
        started = time.perf_counter()
        try:
            engine.configure(options)
            entry["options_text"] = engine.options.describe()  # what ran (FP8 is off where unsupported)
            result = run_service(
                engine,
                frames=args.frames,
                steps=args.steps,
                size=size,
                fraction=args.high_noise_fraction,
                batch_size=batch,
                compile=bool(options.compile_mode),
            )
        except Exception as exc:  # one variant failing (a kernel, a compile) must not lose the others
            entry["error"] = f"failed: {type(exc).__name__}: {exc}"[:2000]
            note(f"variant {name} {entry['error']}")
            engine.uncompile()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        else:
            pixels = result.pop("_frame0")
            result["attention"] = engine.attention
            entry["result"] = result
            if first_pixels is None:
                first_pixels = (name, pixels)
            else:
                entry["diff_against"], entry["diff"] = (
                    first_pixels[0],
                    pixel_difference(first_pixels[1], pixels),
                )
            if report["service"] is None:
                report["service"], report["service_variant"] = result, name
                report["attention"] = engine.attention
                report["mfu"] = per_image / result["seconds_per_image"] / report["peak_flops"]
                if reference:
                    report["speedup"] = reference["seconds_per_image"] / result["seconds_per_image"]
                if reference_compiled:
                    report["speedup_vs_compiled_reference"] = (
                        reference_compiled["seconds_per_image"] / result["seconds_per_image"]
                    )
        entry["wall_seconds"] = last_seconds = time.perf_counter() - started
        write()
    engine.uncompile()
    table = write()
    print(table)
    return report


if __name__ == "__main__":
    main()
