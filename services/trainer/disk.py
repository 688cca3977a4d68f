"""The disk a run will write in its work directory, forecast once the model is built and checked
before the first step: a run whose final export cannot fit fails at start (RESOURCE_EXHAUSTED naming
``trainer.work_dir``), not with ENOSPC after it has trained. On the H200 box a 7B run trained for minutes,
then its 14 GB merged model hit a full disk.

What lands there:

- a resume checkpoint: the trained weights and AdamW's two moments (same dtype as the weights), written
  into the work directory and then handed to the store;
- the export: the merged model in the base checkpoint's dtype, plus the LoRA adapter (fp32, saved from
  the fp32 model the export merges into).

With a remote store, each leaves the disk (uploaded, then deleted) before the next is written, so the
peak is the larger one. A local store on the same disk keeps what it is handed: ``keep`` checkpoints
stay (one more while the newest is committed and the oldest not yet pruned), and the export arrives
beside them; checkpoints of this run already stored are on the disk already.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dreamframe.disk_space import gib, require_free
from dreamframe.storage.base import ObjectStore

from .checkpoint import checkpoints_root
from .spec import Method

WORK_DIR_FIELD = "trainer.work_dir"
# What a distributed checkpoint adds per saved entry (its own small torch.save record, about 1.6 kB, and
# its line in the JSON index, about 0.6 kB); 4 entries (the weight, AdamW's two moments and its step) per
# trained tensor. Matters only for tiny models.
CHECKPOINT_BYTES_PER_TENSOR = 4 * 2200


@dataclass(frozen=True)
class DiskForecast:
    export_bytes: int  # the merged model and the adapter
    checkpoint_bytes: int  # one resume checkpoint
    kept_checkpoints: int  # checkpoints a store on this disk holds (0: the store is elsewhere)
    stored_bytes: int = 0  # this run's checkpoints already on this disk (a resumed run)

    @property
    def peak_bytes(self) -> int:
        """Bytes still to be written at the fullest moment of the run."""
        if self.kept_checkpoints == 0:
            return max(self.export_bytes, self.checkpoint_bytes)
        rotating = (self.kept_checkpoints + 1) * self.checkpoint_bytes
        exporting = self.kept_checkpoints * self.checkpoint_bytes + self.export_bytes
        return max(rotating, exporting) - self.stored_bytes

    def describe(self) -> str:
        what = f"the exported model, {gib(self.export_bytes)}"
        if self.kept_checkpoints:
            what += (
                f", beside {self.kept_checkpoints} resume checkpoints of {gib(self.checkpoint_bytes)} each"
                " that the local store keeps on the same disk"
            )
        return what


def forecast(
    model,
    method: Method,
    export_dtype: torch.dtype,
    *,
    keep_checkpoints: int,
    store_on_disk: bool,
    stored_bytes: int = 0,
) -> DiskForecast:
    """The run's disk forecast from its built model (global sizes, also when sharded)."""
    trained = frozen = trained_bytes = tensors = 0
    for p in model.parameters():
        if p.requires_grad:
            trained += p.numel()
            trained_bytes += p.numel() * p.element_size()
            tensors += 1
        else:
            frozen += p.numel()
    if method is Method.LORA:  # the merged model has the base's parameters; the adapter is fp32
        export = frozen * export_dtype.itemsize + trained * 4
    else:
        export = (frozen + trained) * export_dtype.itemsize
    return DiskForecast(
        export_bytes=export,
        checkpoint_bytes=3 * trained_bytes + tensors * CHECKPOINT_BYTES_PER_TENSOR,
        kept_checkpoints=keep_checkpoints if store_on_disk else 0,
        stored_bytes=stored_bytes if store_on_disk else 0,
    )


def stored_checkpoint_bytes(store: ObjectStore, run_id: str) -> int:
    return sum(info.size for info in store.list(checkpoints_root(run_id)))


def check_work_dir(work_dir: Path, plan: DiskForecast, *, size_limit: int | None = None) -> None:
    """ResourceExhausted naming ``trainer.work_dir`` unless the forecast fits there."""
    require_free(
        work_dir,
        plan.peak_bytes,
        field=WORK_DIR_FIELD,
        what=f"this run ({plan.describe()})",
        size_limit=size_limit,
    )
