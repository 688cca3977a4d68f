"""A finished run's outputs: ``runs/<run>/final/`` — a plain Hugging Face Llava checkpoint (LoRA merged
in) + processor, ``manifest.json`` (written last) listing every file with its sha256 — and, for LoRA,
``runs/<run>/adapter/`` (peft)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from dreamframe.keys import run_prefix
from dreamframe.storage.base import ObjectRef, ObjectStore

from . import modeling
from .run_setup import PreparedRun
from .spec import Method

MANIFEST = "manifest.json"


def final_prefix(run_id: str) -> str:
    return f"{run_prefix(run_id)}final/"


def adapter_prefix(run_id: str) -> str:
    return f"{run_prefix(run_id)}adapter/"


def trained_weights(model) -> dict[str, torch.Tensor]:
    """The trained weights, whole, on rank 0's CPU (empty elsewhere; collective): what the final
    export merges into the base model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


def export_model(run: PreparedRun, weights: dict, steps: int) -> ObjectRef:
    """Write the final model (and the LoRA adapter) locally, move them into storage, and return the final
    model's manifest ref (rank 0)."""
    spec = run.spec
    out = run.run_dir / "final"
    adapter = run.run_dir / "adapter"
    for folder in (out, adapter):
        shutil.rmtree(folder, ignore_errors=True)
    modeling.export_final(
        run.model_path,
        spec.method,
        run.hp,
        weights,
        run.processor,
        out,
        adapter_dest=adapter if spec.method is Method.LORA else None,
    )
    if adapter.exists():
        move_folder(run.store, adapter, adapter_prefix(spec.run_id), {"kind": "peft-adapter"})
    manifest = move_folder(
        run.store,
        out,
        final_prefix(spec.run_id),
        {
            "kind": "hf-llava",
            "run_id": spec.run_id,
            "base_model": spec.base_model,
            "method": str(spec.method),
            "steps": steps,
            # What an evaluation of this model should sample per video (the coordinator passes it on).
            "num_frames": run.hp.num_frames,
        },
    )
    for folder in (out, adapter):
        shutil.rmtree(folder, ignore_errors=True)
    return manifest


def move_folder(store: ObjectStore, folder: Path, prefix: str, info: dict) -> ObjectRef:
    """Move every file of ``folder`` into storage under ``prefix`` (a local store on the same disk takes
    each by rename: a merged 7B model never needs 28 GB of disk), then write ``manifest.json`` listing
    them (last: a prefix without it is incomplete). Returns the manifest's ref."""
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        ref = store.move_file(prefix + path.relative_to(folder).as_posix(), path)
        files.append({"key": ref.key, "size": ref.size, "sha256": ref.sha256})
    return store.put_json(prefix + MANIFEST, info | {"files": files})
