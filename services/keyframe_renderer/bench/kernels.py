"""Kernels in isolation: each SDPA kernel on the models' attention shapes, bf16 vs FP8 linears on the base
UNet's shapes, and the eager VAE decode channels-last vs contiguous."""

from __future__ import annotations

import contextlib
import warnings
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from dreamframe.benchmarking import seconds_per_call
from dreamframe.models import fp8

from ..engine import SDXLEngine


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


def sdpa_kernels() -> dict[str, Any]:
    from torch.nn.attention import SDPBackend

    return {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }


def sdpa_flops_per_second(q, k, v, kernel, flops: int, device: torch.device, repeats: int) -> float | None:
    """FLOP/s of strictly ``kernel`` (None: PyTorch's choice) on q, k, v; None where it can't run them."""
    from torch.nn.attention import sdpa_kernel

    context = contextlib.nullcontext() if kernel is None else sdpa_kernel([kernel])
    try:
        with context, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            seconds = seconds_per_call(partial(F.scaled_dot_product_attention, q, k, v), device, repeats)
    except RuntimeError:
        return None  # this kernel can't run the shape
    return flops / seconds


def attention_row(
    shape: tuple[str, int, int, int, int, int], device: torch.device, dtype: torch.dtype, repeats: int
) -> dict[str, Any]:
    """One attention shape with every kernel, q, k, v laid out as the fused projections leave them."""
    from torch.nn.attention import SDPBackend

    name, b, h, nq, nk, d = shape
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
    for label, kernel in [("auto", None), *sdpa_kernels().items()]:
        row[label] = sdpa_flops_per_second(q, k, v, kernel, flops, device, repeats)
    return row


def time_attention(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> list[dict[str, Any]]:
    """Each SDPA kernel alone (strictly that kernel) on the models' attention shapes, laid out as the
    fused projections leave them (q, k, v as strided views of one [B, N, 3, H, D] tensor)."""
    rows = [attention_row(shape, device, dtype, repeats) for shape in attention_shapes(device)]
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
