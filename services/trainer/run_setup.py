"""Everything a run needs before its first step (on every rank): the base model's path and processor,
the token budget, the data plan (built once and stored, or read back on resume; an indexed dataset is
planned from its manifest alone), this rank's share of the data (its own index shards), the collator,
the schedule, and the model prepared for training with its optimizer and learning-rate scheduler."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreamframe.errors import FailedPrecondition
from dreamframe.keys import run_prefix
from dreamframe.models import video_llm
from dreamframe.storage.base import ObjectStore

from . import disk, modeling
from .contract import Runtime
from .data import (
    Collator,
    DataPlan,
    LoadedDataset,
    RankShare,
    build_plan,
    check_bad_fraction,
    load_dataset,
    micro_batches_per_epoch,
    rank_sample_counts,
    rank_share,
    resolve_max_length,
)
from .distributed import DistContext, on_main
from .rng import seed_everything
from .schedule import Schedule
from .spec import Hyperparameters, RunSpec


def plan_key(run_id: str) -> str:
    return f"{run_prefix(run_id)}data/plan.json"


@dataclass
class PreparedRun:
    """A run ready to train: its inputs, its data and its model."""

    spec: RunSpec
    store: ObjectStore
    runtime: Runtime
    ctx: DistContext
    run_dir: Path
    log: Any
    model_path: str
    processor: Any
    max_length: int
    plan: DataPlan
    datasets: list[LoadedDataset]
    share: RankShare
    collate: Collator
    schedule: Schedule
    precision: modeling.Precision
    model: Any
    params: list
    trainable: int
    total_params: int
    optimizer: Any
    scheduler: Any

    @property
    def hp(self) -> Hyperparameters:
        return self.spec.hyperparameters


def prepare_run(
    spec: RunSpec, store: ObjectStore, runtime: Runtime, ctx: DistContext, run_dir: Path, log
) -> PreparedRun:
    hp = spec.hyperparameters
    model_path = on_main(
        lambda: video_llm.resolve_model_path(spec.base_model, runtime.model_paths, runtime.model_cache_dir),
        ctx,
    )
    processor = video_llm.load_processor(model_path)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    max_length = resolve_max_length(hp.max_length, processor, hp.num_frames, video_llm.max_positions(config))
    plan = on_main(lambda: load_or_build_plan(spec, store, processor, max_length, log), ctx)
    datasets = [load_dataset(store, s, i) for i, s in enumerate(spec.datasets)]
    for i, (loaded, recorded) in enumerate(zip(datasets, plan.datasets, strict=True)):
        if loaded.sha256 != recorded["sha256"]:
            raise FailedPrecondition(
                f"dataset {loaded.conversation_key!r} changed since the run was planned",
                field=f"datasets[{i}]",
            )
    counts = rank_sample_counts(plan, ctx.world_size)
    if min(counts) == 0:
        raise FailedPrecondition(
            f"{plan.num_samples} usable samples cannot be shared by {ctx.world_size} processes "
            f"(samples per process: {counts})",
            field="hyperparameters.num_processes",
        )
    share = rank_share(store, plan, processor, rank=ctx.rank, world=ctx.world_size, num_frames=hp.num_frames)
    pad = runtime.pad_to_multiple_of or (8 if ctx.device.type == "cuda" else 1)
    collate = Collator(
        store,
        processor,
        datasets,
        bucket=spec.datasets[0].bucket or None,
        num_frames=hp.num_frames,
        max_length=max_length,
        pad_to_multiple_of=pad,
    )
    weights = [d["weight"] for d in plan.datasets]
    micro = micro_batches_per_epoch(plan.sizes(), weights, ctx.world_size, hp.per_device_batch_size)
    schedule = Schedule.of(hp, ctx.world_size, plan.num_samples, micro)

    precision = modeling.pick_precision(ctx.device, runtime.precision, spec.method)
    # Seeded right before the model is built: LoRA's initial weights depend on nothing else.
    seed_everything(hp.seed)
    model = modeling.prepare_model(
        model_path,
        spec.method,
        hp,
        device=ctx.device,
        world_size=ctx.world_size,
        precision=precision,
        compile_layers=runtime.compile,
    )
    if runtime.check_free_disk:
        on_main(lambda: check_disk(spec, store, runtime, model, modeling.export_dtype(config), run_dir), ctx)
    params = modeling.trainable_parameters(model)
    trainable, total_params = modeling.count_parameters(model)
    optimizer = modeling.build_optimizer(model, spec.learning_rate, hp.weight_decay)
    scheduler = modeling.build_scheduler(optimizer, schedule.total_steps, hp.warmup_ratio)
    if ctx.is_main:
        log.info(
            "run ready",
            samples=plan.num_samples,
            bad_samples=plan.bad_count,
            total_steps=schedule.total_steps,
            world_size=ctx.world_size,
            trainable_parameters=trainable,
            parameters=total_params,
            max_length=max_length,
        )
    return PreparedRun(
        spec=spec,
        store=store,
        runtime=runtime,
        ctx=ctx,
        run_dir=run_dir,
        log=log,
        model_path=model_path,
        processor=processor,
        max_length=max_length,
        plan=plan,
        datasets=datasets,
        share=share,
        collate=collate,
        schedule=schedule,
        precision=precision,
        model=model,
        params=params,
        trainable=trainable,
        total_params=total_params,
        optimizer=optimizer,
        scheduler=scheduler,
    )


def check_disk(
    spec: RunSpec, store: ObjectStore, runtime: Runtime, model, export_dtype, run_dir: Path
) -> None:
    """Fail now, not after training, when the run's checkpoints and export cannot fit in its work dir."""
    on_disk = store.shares_disk_with(run_dir)
    plan = disk.forecast(
        model,
        spec.method,
        export_dtype,
        keep_checkpoints=runtime.keep_checkpoints,
        store_on_disk=on_disk,
        # Only a store on this disk holds them here; a remote store's listing would be wasted.
        stored_bytes=disk.stored_checkpoint_bytes(store, spec.run_id) if on_disk else 0,
    )
    disk.check_work_dir(run_dir, plan, size_limit=runtime.work_dir_size_limit)


def load_or_build_plan(spec: RunSpec, store: ObjectStore, processor, max_length: int, log) -> DataPlan:
    """The run's stored plan, or a new one built and stored (rank 0)."""
    hp = spec.hyperparameters
    key = plan_key(spec.run_id)
    if store.exists(key):
        plan = DataPlan.from_dict(store.get_json(key))
        check_bad_fraction(plan, hp.max_bad_sample_fraction)
        return plan
    plan = build_plan(
        store,
        spec.datasets,
        processor,
        num_frames=hp.num_frames,
        max_length=max_length,
        max_bad_fraction=hp.max_bad_sample_fraction,
        log=lambda msg: log.warning(msg),
    )
    store.put_json(key, plan.to_dict())
    return plan
