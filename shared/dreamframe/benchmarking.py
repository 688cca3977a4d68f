"""What every GPU benchmark needs: waiting for the device, the bf16 GEMM rate the compute floor is
measured against (an n×n×n matmul timed in the same run, the practical ceiling for dense work), and a
count of host synchronisations."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings cover it; nothing to wait for on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_gemm_size(device: torch.device) -> int:
    return 8192 if device.type == "cuda" else 1024


def seconds_per_call(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Wall-clock seconds per call of ``fn`` over ``repeats`` calls, after ``warmup`` untimed ones
    (kernel selection, allocator), with the device's queue drained before and after."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - started) / repeats


def matmul_flops_per_second(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 20) -> float:
    """FLOP/s of ``repeats`` n×n×n matmuls in ``dtype`` after three untimed ones."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / seconds_per_call(lambda: a @ b, device, repeats, warmup=3)


class SyncCounter:
    """Counts host synchronisations (CUDA sync debug mode) and where they come from."""

    def __init__(self, device: torch.device) -> None:
        self.enabled = device.type == "cuda"
        self.sites: dict[str, int] = {}
        self._catch = warnings.catch_warnings(record=True)
        self._records: list = []

    def __enter__(self) -> SyncCounter:
        if self.enabled:
            self._records = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.enabled:
            return
        torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(*exc)
        for record in self._records:
            if "synchroniz" in str(record.message):
                site = f"{Path(record.filename).name}:{record.lineno}"
                self.sites[site] = self.sites.get(site, 0) + 1

    @property
    def count(self) -> int:
        return sum(self.sites.values())
