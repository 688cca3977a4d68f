"""What every GPU benchmark needs: waiting for the device, and the bf16 GEMM rate the compute floor is
measured against (an n×n×n matmul timed in the same run, the practical ceiling for dense work)."""

from __future__ import annotations

import time

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings cover it; nothing to wait for on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_gemm_size(device: torch.device) -> int:
    return 8192 if device.type == "cuda" else 1024


def matmul_flops_per_second(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 20) -> float:
    """FLOP/s of ``repeats`` n×n×n matmuls in ``dtype`` after three untimed ones."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - started)
