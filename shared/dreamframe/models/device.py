"""Which device and dtype a model runs on (torch only: the LLM and vision models use it without diffusers),
and this process's share of a GPU that several services use at once (``models.gpu_memory_fraction``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from dreamframe.errors import InvalidArgument, ResourceExhausted

log = logging.getLogger(__name__)

BUDGET_SETTING = "models.gpu_memory_fraction"
BUDGET_ENV = "DREAMFRAME_MODELS__GPU_MEMORY_FRACTION"
GIB = 1024**3

# CUDA device index → the fraction applied in this process (the allocator keeps one per device).
_budgets: dict[int, float] = {}


def pick_device(setting: str = "auto") -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def pick_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs (the reference's fp16 without its overflow problems in the VAE); fp32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def apply_memory_budget(
    fraction: float,
    device: torch.device | str = "cuda",
    *,
    setter: Callable[[float, torch.device], None] | None = None,
) -> float | None:
    """Cap this process's CUDA caching allocator at ``fraction`` of ``device``'s memory (0 or 1: no cap).

    Called once at service start when the local runner shares one GPU between services, so one service
    cannot starve the others: an allocation past the cap raises OutOfMemoryError in this process (see
    ``over_budget_errors``), never in a neighbour. Nothing to do on a CPU. Returns the fraction applied.
    ``setter`` stands in for ``torch.cuda.set_per_process_memory_fraction`` (tests on a CPU)."""
    if not 0.0 <= fraction <= 1.0:
        raise InvalidArgument(f"must be within [0, 1], got {fraction!r}", field=BUDGET_SETTING)
    dev = pick_device(device) if isinstance(device, str) else device
    if fraction in (0.0, 1.0) or dev.type != "cuda":
        if fraction not in (0.0, 1.0):
            log.info("%s=%.3f ignored: models run on %s", BUDGET_SETTING, fraction, dev)
        return None
    index = dev.index if dev.index is not None else (torch.cuda.current_device() if setter is None else 0)
    dev = torch.device("cuda", index)
    (setter or torch.cuda.set_per_process_memory_fraction)(fraction, dev)
    _budgets[index] = fraction
    log.info("GPU memory budget: %.3f of cuda:%d (%s)", fraction, index, BUDGET_SETTING)
    return fraction


def apply_configured_budget(device: torch.device | str = "cuda") -> float | None:
    """``apply_memory_budget`` with this process's settings (processes that build models outside a
    service's start, such as a trainer worker, call this once they have their device)."""
    from dreamframe.config import get_settings

    return apply_memory_budget(get_settings().models.gpu_memory_fraction, device)


def memory_budget(device: torch.device) -> float | None:
    """The fraction applied to ``device`` in this process (None: no cap)."""
    if device.type != "cuda":
        return None
    return _budgets.get(device.index if device.index is not None else torch.cuda.current_device())


def free_memory(device: torch.device) -> int:
    """Bytes this process may still allocate on ``device``: the device's free memory plus what this
    process's allocator holds cached (reusable), and no more than what is left of its budget (what
    batch sizing must use on a shared GPU)."""
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    available = int(free) + torch.cuda.memory_reserved(device) - allocated
    fraction = memory_budget(device)
    if fraction is None:
        return available
    return max(0, min(available, int(fraction * total) - allocated))


def describe_budget(device: torch.device | None = None) -> str:
    dev = device or torch.device("cuda", 0)
    fraction = memory_budget(dev)
    if fraction is None:
        return "no per-process budget"
    total = torch.cuda.get_device_properties(dev).total_memory if torch.cuda.is_available() else 0
    size = f" = {fraction * total / GIB:.1f} GiB" if total else ""
    return f"{BUDGET_SETTING}={fraction:.3f}{size}"


@contextmanager
def over_budget_errors(service: str) -> Iterator[None]:
    """Turn a CUDA out-of-memory inside the block into RESOURCE_EXHAUSTED naming the budget setting,
    so the caller learns which service ran out and what to raise (models stay loaded; nothing leaks)."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "CUDA out of memory"
        budgets = ", ".join(f"cuda:{i} {f:.3f}" for i, f in sorted(_budgets.items())) or "none set"
        raise ResourceExhausted(
            f"{service} ran out of GPU memory within its budget ({budgets}): {first[:200]}. Raise "
            f"{BUDGET_SETTING} ({BUDGET_ENV}; `dreamframe up --gpu-budget {service}=F`), lower the batch "
            "size, or give the service a GPU of its own",
            field=BUDGET_SETTING,
        ) from None
