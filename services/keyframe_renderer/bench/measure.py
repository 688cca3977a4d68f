"""What one eager batch of the engine costs: FLOPs per module (``FlopCounterMode``), each module's device
time, how much precision FP8 linears cost, the dense-matmul throughput of this device, and on what it ran."""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch

from dreamframe.benchmarking import default_gemm_size, matmul_flops_per_second, synchronize
from dreamframe.models import fp8

from ..engine import SDXLEngine, fp8_linears, quantize_unet
from .common import note, prompts
from .kernels import time_linears
from .summary import si


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


@contextlib.contextmanager
def module_hooks(modules: dict[str, torch.nn.Module], pre: Callable, post: Callable) -> Iterator[None]:
    """``pre(name, module, args)`` before and ``post(name, module, args, output)`` after every forward of
    each named module, while the context lasts."""
    handles = []
    for name, module in modules.items():
        handles += [
            module.register_forward_pre_hook(partial(pre, name)),
            module.register_forward_hook(partial(post, name)),
        ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def render_batch(engine: SDXLEngine, params, batch: int) -> None:
    engine.render(prompts(batch), list(range(20, 20 + batch)), params)


def time_modules(engine: SDXLEngine, params, batch: int) -> dict[str, Any]:
    """Device time per module over one eager batch (CUDA events in forward hooks: no host syncs)."""
    cuda = engine.device.type == "cuda"
    marks: dict[str, list] = {name: [] for name in bench_modules(engine)}

    def now():
        if not cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def pre(name, _m, _a):
        marks[name].append([now(), None])

    def post(name, _m, _a, _o):
        marks[name][-1][1] = now()

    with module_hooks(bench_modules(engine), pre, post):
        synchronize(engine.device)
        started = time.perf_counter()
        render_batch(engine, params, batch)
        synchronize(engine.device)
        total = time.perf_counter() - started
    seconds = {
        name: sum((a.elapsed_time(b) / 1e3 if cuda else b - a) for a, b in pairs)
        for name, pairs in marks.items()
    }
    return {"batch_size": batch, "total_seconds": total, "seconds": seconds}


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(engine: SDXLEngine, params, batch: int) -> dict[str, Any]:
    """FLOPs of one real batch, split by module with forward hooks (calls × FLOPs per call)."""
    from torch.utils.flop_counter import FlopCounterMode

    modules = bench_modules(engine)
    custom = {}
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        # PyTorch's table has the CUDA kernels only; count the CPU flash kernel the same way.
        custom[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
    counter = FlopCounterMode(display=False, custom_mapping=custom)
    stats = {name: {"calls": 0, "flops": 0} for name in modules}
    starts: dict[str, int] = {}

    def pre(name, _m, _a):
        starts[name] = counter.get_total_flops()

    def post(name, _m, _a, _o):
        stats[name]["calls"] += 1
        stats[name]["flops"] += counter.get_total_flops() - starts[name]

    with module_hooks(modules, pre, post), counter:
        render_batch(engine, params, batch)
    total = counter.get_total_flops()
    for entry in stats.values():
        entry["flops_per_call"] = entry["flops"] // max(entry["calls"], 1)
    return {"batch_size": batch, "total": total, "per_image": total / batch, "modules": stats}


def eager_flops(engine: SDXLEngine, params, batch: int) -> dict[str, Any]:
    """``count_flops`` with each module's eager device time and FLOP/s added (eager, before any compile:
    hooks would break compiled graphs)."""
    flops = count_flops(engine, params, batch)
    note(f"FLOPs per image {si(flops['per_image'])}FLOP at batch {batch}")
    timing = time_modules(engine, params, batch)
    for name, seconds in timing["seconds"].items():
        flops["modules"][name]["seconds"] = seconds
        flops["modules"][name]["flops_per_second"] = (
            flops["modules"][name]["flops"] / seconds if seconds else 0.0
        )
    flops["eager_batch_seconds"] = timing["total_seconds"]
    spent = ", ".join(f"{k} {v:.2f} s" for k, v in timing["seconds"].items())
    note(f"eager batch {timing['total_seconds']:.2f} s: {spent}")
    return flops


def first_unet_call(engine: SDXLEngine, params, batch: int) -> tuple[tuple, dict]:
    """The (args, kwargs) of the base UNet's first call in a real batch."""
    captured: dict[str, Any] = {}

    def grab(_module, args, kwargs):
        captured.setdefault("inputs", (args, kwargs))

    handle = engine.base.unet.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        render_batch(engine, params, batch)
    finally:
        handle.remove()
    return captured["inputs"]


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
    args, kwargs = first_unet_call(engine, params, batch)

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


def fp8_precision(engine: SDXLEngine, params, batch: int) -> dict[str, Any]:
    """``fp8_error`` on a GPU, with the linear layers' bf16 vs FP8 throughput where it ran."""
    precision = fp8_error(engine, params) if engine.device.type == "cuda" else {"skipped": "not on a CPU"}
    if "skipped" not in precision:
        precision["linears"] = time_linears(engine.device, batch)
    note(f"FP8 precision: {precision}")
    return precision


def gemm_flops_per_second(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Dense matmul throughput on this device: the practical ceiling for the UNet's GEMMs/convs."""
    n, iters = default_gemm_size(device), 30 if device.type == "cuda" else 5
    return {
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "flops_per_second": matmul_flops_per_second(device, dtype, n, iters),
    }


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
