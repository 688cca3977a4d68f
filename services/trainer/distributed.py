"""torch.distributed for every run: torchrun's environment when launched by it (one process a GPU),
otherwise a world of one built here. Either way training takes the same path (FSDP over a device mesh,
collectives for counts and stop requests): NCCL on GPUs, gloo on CPUs."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dreamframe.errors import described
from dreamframe.models.device import apply_configured_budget


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    # True when this context created the process group (and so destroys it).
    owns_group: bool
    store_file: Path | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(setting: str, local_rank: int) -> torch.device:
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(setting)


def init_distributed(device_setting: str = "auto", scratch: Path | None = None) -> DistContext:
    """Join (or create) the process group. Under torchrun RANK/WORLD_SIZE/LOCAL_RANK come from the
    environment; otherwise a single-process group over a file store in ``scratch``."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_setting, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # This worker's share of a GPU that other services use too (models.gpu_memory_fraction).
        apply_configured_budget(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, owns_group=False)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, owns_group=True)
    scratch = Path(scratch or tempfile.gettempdir())
    scratch.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".dist-", dir=scratch)
    os.close(fd)
    os.unlink(name)  # the file store creates it; a stale one would hold old state
    dist.init_process_group(backend, init_method=f"file://{name}", rank=0, world_size=1)
    return DistContext(0, 1, local_rank, device, owns_group=True, store_file=Path(name))


def teardown(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()
    if ctx.store_file is not None:
        ctx.store_file.unlink(missing_ok=True)


def broadcast(obj, ctx: DistContext):
    """``obj`` from rank 0 on every rank (pickled)."""
    if ctx.world_size == 1:
        return obj
    holder = [obj if ctx.is_main else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather(obj, ctx: DistContext) -> list | None:
    """Every rank's ``obj`` on rank 0 (None elsewhere)."""
    if ctx.world_size == 1:
        return [obj]
    out = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_sum(values: list[float], ctx: DistContext) -> list[float]:
    """Element-wise sum over ranks (float64 on the collective's device)."""
    device = ctx.device if ctx.device.type == "cuda" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if ctx.world_size > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def barrier(ctx: DistContext) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def on_main(fn, ctx: DistContext):
    """Run ``fn`` on rank 0 and hand its result to every rank; if it raises, every rank raises the same
    domain error (so no rank waits forever at the next collective)."""
    from dreamframe.errors import DreamFrameError

    if ctx.world_size == 1:
        return fn()
    outcome = None
    error: BaseException | None = None
    if ctx.is_main:
        try:
            outcome = ("ok", fn())
        except DreamFrameError as exc:
            outcome, error = ("error", type(exc), exc.message, exc.field), exc
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            outcome, error = ("error", RuntimeError, described(exc), None), exc
    outcome = broadcast(outcome, ctx)
    if outcome[0] == "ok":
        return outcome[1]
    if error is not None:
        raise error
    _, kind, message, field = outcome
    if issubclass(kind, DreamFrameError):
        raise kind(message, field=field)
    raise kind(message)
