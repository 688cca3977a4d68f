"""One training run, on every process of it: ``run_training(spec, store, runtime, hooks)``.

The same code runs in a world of one (in-process, tests, one GPU) and under torchrun (FSDP over the
pod's GPUs). Rank 0 does the storage I/O and reports progress; every decision that changes control flow
(stop requests, bad data, divergence) is agreed through a collective, so ranks never part ways.

Step s of the run always trains on the same samples: epoch ``s // steps_per_epoch`` has a fixed order
(seed, epoch), and within it step s takes the next ``gradient_accumulation_steps`` micro-batches of
``per_device_batch_size × world_size`` samples. A resumed run restores model, optimizer, scheduler and
RNG states from the last checkpoint and continues at the step after it, so it ends with the same
number of optimizer steps, the same data order and (on deterministic hardware) the same weights.
"""

from __future__ import annotations

import hashlib
import math
import random
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from pathlib import Path

import numpy as np
import torch

from dreamframe.errors import FailedPrecondition
from dreamframe.keys import run_prefix
from dreamframe.logging import get_logger
from dreamframe.models import video_llm
from dreamframe.storage.base import ObjectRef, ObjectStore

from . import checkpoint as ckpt
from . import modeling
from .data import (
    Batch,
    Collator,
    DataPlan,
    build_plan,
    check_bad_fraction,
    epoch_order,
    load_dataset,
    resolve_max_length,
)
from .distributed import DistContext, all_sum, barrier, gather, init_distributed, on_main, teardown
from .spec import Method, RunSpec

log = get_logger(__name__)


class Stop(IntEnum):
    NONE = 0
    CANCEL = 1
    # Service shutdown: checkpoint now and leave the run to be resumed.
    SHUTDOWN = 2


class TrainingDiverged(FailedPrecondition):
    """The loss or the gradient norm stopped being finite."""


@dataclass
class Runtime:
    """Process-level settings of the trainer (the same for every run)."""

    work_dir: Path
    model_cache_dir: Path = Path(".dreamframe/models")
    model_paths: dict[str, str] = field(default_factory=dict)
    device: str = "auto"
    precision: str = "auto"
    keep_checkpoints: int = 2
    # Pad sequences to a multiple of this (0: 8 on GPUs, for tensor cores; 1 on CPUs).
    pad_to_multiple_of: int = 0
    # torch.compile each decoder layer (GPU runs; the first steps pay the compilation).
    compile: bool = False


@dataclass
class Progress:
    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    loss: float = 0.0
    learning_rate: float = 0.0
    tokens_per_second: float = 0.0
    eta_seconds: float = -1.0
    samples_seen: int = 0
    bad_samples: int = 0
    tokens_seen: int = 0
    checkpoint: ObjectRef | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _noop(*_args) -> None:
    return None


@dataclass
class Hooks:
    """Rank 0's connection to whoever runs the training (the worker process, a test)."""

    on_progress: Callable[[Progress], None] = _noop
    should_stop: Callable[[], Stop] = lambda: Stop.NONE


@dataclass
class Outcome:
    status: str  # "succeeded" | "cancelled" | "interrupted"
    progress: Progress
    final_model: ObjectRef | None = None
    final_model_prefix: str = ""
    metrics: ObjectRef | None = None


def plan_key(run_id: str) -> str:
    return f"{run_prefix(run_id)}data/plan.json"


def metrics_key(run_id: str) -> str:
    return f"{run_prefix(run_id)}metrics.json"


def final_prefix(run_id: str) -> str:
    return f"{run_prefix(run_id)}final/"


def adapter_prefix(run_id: str) -> str:
    return f"{run_prefix(run_id)}adapter/"


def run_training(spec: RunSpec, store: ObjectStore, runtime: Runtime, hooks: Hooks | None = None) -> Outcome:
    """Train ``spec`` to the end (or until stopped), resuming from its last checkpoint if it has one."""
    run_dir = Path(runtime.work_dir) / spec.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = init_distributed(runtime.device, run_dir)
    try:
        return _Run(spec, store, runtime, hooks or Hooks(), ctx, run_dir).train()
    finally:
        teardown(ctx)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def batch_digest(uids: list[str]) -> str:
    """A short fingerprint of the samples a step trained on (metrics compare data order with it)."""
    return hashlib.sha256("\n".join(uids).encode()).hexdigest()[:16]


def forward_backward(model, batches: list[Batch], ctx: DistContext, precision: modeling.Precision) -> dict:
    """Forward and backward over one optimizer step's micro-batches (gradients accumulate in the model).

    The loss is the mean over every answer token of the whole step (all micro-batches, all ranks), so
    batches of any padding and any answer length weigh by their tokens; FSDP averages gradients over
    ranks, hence the world-size factor. Returns the step's loss and token/sample counts (all ranks)."""
    label_tokens, tokens, samples, bad = all_sum(
        [
            sum(b.num_label_tokens for b in batches),
            sum(b.num_tokens for b in batches),
            sum(len(b.uids) for b in batches),
            sum(b.bad for b in batches),
        ],
        ctx,
    )
    n_items = max(int(label_tokens), 1)
    autocast = (
        torch.autocast(ctx.device.type, dtype=precision.compute_dtype)
        if precision.autocast
        else nullcontext()
    )
    loss_sum = torch.zeros((), dtype=torch.float32, device=ctx.device)
    for batch in batches:
        with autocast:
            out = model(**batch.model_inputs(ctx.device, precision.compute_dtype), num_items_in_batch=n_items)
        (out.loss * ctx.world_size).backward()
        loss_sum += out.loss.detach().float()
    (loss,) = all_sum([float(loss_sum)], ctx)
    return {
        "loss": loss,
        "tokens": int(tokens),
        "label_tokens": int(label_tokens),
        "samples": int(samples),
        "bad": int(bad),
    }


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip by global norm (over all ranks' shards); returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


class _Run:
    def __init__(
        self,
        spec: RunSpec,
        store: ObjectStore,
        runtime: Runtime,
        hooks: Hooks,
        ctx: DistContext,
        run_dir: Path,
    ) -> None:
        self.spec = spec
        self.hp = spec.hyperparameters
        self.store = store
        self.runtime = runtime
        self.hooks = hooks
        self.ctx = ctx
        self.run_dir = run_dir
        self.log = log.bind(run_id=spec.run_id, rank=ctx.rank)
        self.history: list[dict] = []
        self.progress = Progress()
        self.runtime_bad = 0
        self.bad_reasons: list[str] = []
        self.last_saved_step = -1
        self._orders: dict[int, list[int]] = {}

    # --- setup -------------------------------------------------------------------------------------

    def setup(self) -> None:
        hp, ctx = self.hp, self.ctx
        self.model_path = on_main(
            lambda: video_llm.resolve_model_path(
                self.spec.base_model, self.runtime.model_paths, self.runtime.model_cache_dir
            ),
            ctx,
        )
        self.processor = video_llm.load_processor(self.model_path)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.model_path)
        max_positions = int(getattr(config.text_config, "max_position_embeddings", 0) or 0)
        self.max_length = resolve_max_length(hp.max_length, self.processor, hp.num_frames, max_positions)
        self.plan = on_main(self._load_or_build_plan, ctx)
        self.datasets = [load_dataset(self.store, s, i) for i, s in enumerate(self.spec.datasets)]
        for i, (loaded, recorded) in enumerate(zip(self.datasets, self.plan.datasets, strict=True)):
            if loaded.sha256 != recorded["sha256"]:
                raise FailedPrecondition(
                    f"dataset {loaded.conversation_key!r} changed since the run was planned",
                    field=f"datasets[{i}]",
                )
        pad = self.runtime.pad_to_multiple_of or (8 if ctx.device.type == "cuda" else 1)
        self.collate = Collator(
            self.store,
            self.processor,
            self.datasets,
            bucket=self.spec.datasets[0].bucket or None,
            num_frames=hp.num_frames,
            max_length=self.max_length,
            pad_to_multiple_of=pad,
        )
        # Schedule: a pure function of the plan size and the batch geometry.
        self.group = hp.per_device_batch_size * ctx.world_size
        self.micro_per_epoch = math.ceil(len(self.plan.samples) / self.group)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / hp.gradient_accumulation_steps)
        self.total_steps = hp.max_steps or hp.epochs * self.steps_per_epoch
        self.save_every = hp.save_every_steps or max(1, math.ceil(self.total_steps / 10))
        self.progress.total_steps = self.total_steps
        self.progress.bad_samples = self.plan.bad_count

        self.precision = modeling.pick_precision(ctx.device, self.runtime.precision, self.spec.method)
        # Seeded right before the model is built: LoRA's initial weights depend on nothing else.
        seed_everything(hp.seed)
        self.model = modeling.prepare_model(
            self.model_path,
            self.spec.method,
            hp,
            device=ctx.device,
            world_size=ctx.world_size,
            precision=self.precision,
            compile_layers=self.runtime.compile,
        )
        self.params = modeling.trainable_parameters(self.model)
        self.trainable, self.total_params = modeling.count_parameters(self.model)
        self.optimizer = modeling.build_optimizer(self.model, self.spec.learning_rate, hp.weight_decay)
        self.scheduler = modeling.build_scheduler(self.optimizer, self.total_steps, hp.warmup_ratio)
        if ctx.is_main:
            self.log.info(
                "run ready",
                samples=len(self.plan.samples),
                bad_samples=self.plan.bad_count,
                total_steps=self.total_steps,
                world_size=ctx.world_size,
                trainable_parameters=self.trainable,
                parameters=self.total_params,
                max_length=self.max_length,
            )

    def _load_or_build_plan(self) -> DataPlan:
        key = plan_key(self.spec.run_id)
        if self.store.exists(key):
            plan = DataPlan.from_dict(self.store.get_json(key))
            check_bad_fraction(plan, self.hp.max_bad_sample_fraction)
            return plan
        plan = build_plan(
            self.store,
            self.spec.datasets,
            self.processor,
            num_frames=self.hp.num_frames,
            max_length=self.max_length,
            max_bad_fraction=self.hp.max_bad_sample_fraction,
            log=lambda msg: self.log.warning(msg),
        )
        self.store.put_json(key, plan.to_dict())
        return plan

    # --- data --------------------------------------------------------------------------------------

    def order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            weights = [d["weight"] for d in self.plan.datasets]
            self._orders = {
                epoch: epoch_order(self.plan, weights, seed=self.hp.seed, epoch=epoch, group_size=self.group)
            }
        return self._orders[epoch]

    def batches(self, step: int) -> list[Batch]:
        """This rank's micro-batches for optimizer step ``step`` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        accum = self.hp.gradient_accumulation_steps
        order = self.order(epoch)
        b, r = self.hp.per_device_batch_size, self.ctx.rank
        out = []
        for m in range(k * accum, min((k + 1) * accum, self.micro_per_epoch)):
            indices = order[m * self.group + r * b : m * self.group + (r + 1) * b]
            out.append(self.collate([self.plan.samples[i] for i in indices]))
        return out

    # --- checkpoints -------------------------------------------------------------------------------

    def state(self) -> dict:
        return {
            "step": self.progress.step,
            "progress": self.progress.to_dict() | {"checkpoint": None},
            "runtime_bad": self.runtime_bad,
            "history": self.history,
            "schedule": self.schedule(),
        }

    def schedule(self) -> dict:
        return {
            "world_size": self.ctx.world_size,
            "per_device_batch_size": self.hp.per_device_batch_size,
            "gradient_accumulation_steps": self.hp.gradient_accumulation_steps,
            "total_steps": self.total_steps,
            "samples": len(self.plan.samples),
        }

    def save(self, step: int) -> None:
        """Checkpoint after ``step`` optimizer steps (collective): every rank writes its shards into the
        shared run directory, then rank 0 uploads the files and commits."""
        (bad,) = all_sum([sum(int((~torch.isfinite(p.detach())).sum()) for p in self.params)], self.ctx)
        if bad:
            raise self.diverged(f"{int(bad)} trained weights are not finite after step {step}")
        tmp = self.run_dir / f"checkpoint-{step}"
        if self.ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(self.ctx)
        ckpt.save_sharded(self.model, self.optimizer, tmp / ckpt.STATE_DIR)
        rngs = gather(rng_state(), self.ctx)
        barrier(self.ctx)  # every rank's shards are on disk

        def write() -> ObjectRef:
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rngs, tmp / "rng.pt")
            ref = ckpt.save_checkpoint(
                self.store,
                self.spec.run_id,
                step,
                ckpt.local_files(tmp),
                self.state(),
                keep=self.runtime.keep_checkpoints,
                remove_uploaded=True,
            )
            shutil.rmtree(tmp, ignore_errors=True)
            return ref

        ref = on_main(write, self.ctx)
        self.progress.checkpoint = ref
        self.last_saved_step = step
        if self.ctx.is_main:
            self.write_metrics()
            self.hooks.on_progress(self.progress)

    def resume(self) -> None:
        """Restore the last committed checkpoint, if any (collective)."""
        resume_dir = self.run_dir / "resume"

        def fetch():
            found = ckpt.load_latest(self.store, self.spec.run_id)
            if found is None:
                return None
            shutil.rmtree(resume_dir, ignore_errors=True)
            ckpt.download(self.store, found, resume_dir)
            return found

        found = on_main(fetch, self.ctx)
        if found is None:
            return
        if found.state["schedule"] != self.schedule():
            raise FailedPrecondition(
                f"checkpoint at step {found.step} was made with {found.state['schedule']}, this run has "
                f"{self.schedule()}: resume with the same processes, batch size and data",
                field="hyperparameters",
            )
        ckpt.load_sharded(self.model, self.optimizer, resume_dir / ckpt.STATE_DIR)
        self.scheduler.load_state_dict(torch.load(resume_dir / "scheduler.pt", weights_only=False))
        rngs = torch.load(resume_dir / "rng.pt", weights_only=False)
        set_rng_state(rngs[self.ctx.rank])
        barrier(self.ctx)  # every rank has read its files
        state = found.state
        self.history = state["history"]
        self.runtime_bad = state["runtime_bad"]
        self.progress = Progress(**state["progress"])
        self.progress.checkpoint = found.ref
        self.last_saved_step = found.step
        if self.ctx.is_main:
            shutil.rmtree(resume_dir, ignore_errors=True)
            self.log.info("resumed", step=found.step)

    def trained_weights(self) -> dict[str, torch.Tensor]:
        """The trained weights, whole, on rank 0's CPU (empty elsewhere; collective): what the final
        export merges into the base model."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return get_model_state_dict(self.model, options=options)

    # --- training ----------------------------------------------------------------------------------

    def train_step(self, batches: list[Batch]) -> dict:
        stats = forward_backward(self.model, batches, self.ctx, self.precision)
        step = self.progress.step + 1
        if not math.isfinite(stats["loss"]):
            raise self.diverged(f"the loss is {stats['loss']} at step {step}")
        grad_norm = clip_gradients(self.params, self.hp.max_grad_norm)
        if not math.isfinite(grad_norm):
            raise self.diverged(f"the gradient norm is {grad_norm} at step {step}")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stats | {"learning_rate": lr, "grad_norm": grad_norm}

    def diverged(self, what: str) -> TrainingDiverged:
        last = (
            f"the last good checkpoint is step {self.last_saved_step} ({self.progress.checkpoint.key})"
            if self.progress.checkpoint is not None
            else "there is no checkpoint yet"
        )
        return TrainingDiverged(
            f"training diverged: {what}; stopped, {last}", field="hyperparameters.learning_rate"
        )

    def stop_requested(self) -> Stop:
        code = int(self.hooks.should_stop()) if self.ctx.is_main else 0
        (agreed,) = all_sum([code], self.ctx)
        return Stop(int(agreed))

    def train(self) -> Outcome:
        self.setup()
        self.resume()
        step_times: list[float] = []
        prefetch = ThreadPoolExecutor(1, thread_name_prefix="batches")
        try:
            upcoming: Future | None = None
            if self.progress.step < self.total_steps:
                upcoming = prefetch.submit(self.batches, self.progress.step)
            while self.progress.step < self.total_steps:
                request = self.stop_requested()
                if request is not Stop.NONE:
                    return self.stop(request)
                started = time.perf_counter()
                batches = upcoming.result()
                step = self.progress.step
                upcoming = prefetch.submit(self.batches, step + 1) if step + 1 < self.total_steps else None
                stats = self.train_step(batches)
                elapsed = time.perf_counter() - started
                step_times = (step_times + [elapsed])[-20:]
                self.record(step + 1, stats, elapsed, step_times, [u for b in batches for u in b.uids])
                self.check_runtime_bad(stats["bad"], [r for b in batches for r in b.bad_reasons])
                if self.ctx.is_main:
                    self.hooks.on_progress(self.progress)
                if (step + 1) % self.save_every == 0 and step + 1 < self.total_steps:
                    self.save(step + 1)
        finally:
            prefetch.shutdown(wait=True, cancel_futures=True)
        if self.last_saved_step != self.total_steps:
            self.save(self.total_steps)
        return self.finish(self.trained_weights())

    def record(
        self, step: int, stats: dict, elapsed: float, step_times: list[float], uids: list[str]
    ) -> None:
        p = self.progress
        p.step = step
        p.epoch = step / self.steps_per_epoch
        p.loss = stats["loss"]
        p.learning_rate = stats["learning_rate"]
        p.tokens_per_second = stats["tokens"] / elapsed if elapsed > 0 else 0.0
        p.eta_seconds = (self.total_steps - step) * (sum(step_times) / len(step_times))
        p.samples_seen += stats["samples"]
        p.tokens_seen += stats["tokens"]
        self.runtime_bad += stats["bad"]
        p.bad_samples = self.plan.bad_count + self.runtime_bad
        digests = gather(batch_digest(uids), self.ctx)
        self.history.append(
            {
                "step": step,
                "epoch": round(p.epoch, 6),
                "loss": stats["loss"],
                "learning_rate": stats["learning_rate"],
                "grad_norm": stats["grad_norm"],
                "tokens": stats["tokens"],
                "label_tokens": stats["label_tokens"],
                "samples": stats["samples"],
                "bad_samples": stats["bad"],
                "step_seconds": round(elapsed, 6),
                "tokens_per_second": round(p.tokens_per_second, 3),
                "batch_digest": batch_digest(digests) if digests else "",
            }
        )

    def check_runtime_bad(self, bad: int, reasons: list[str]) -> None:
        """Media that fail only when read (corrupt video) count like planned bad samples."""
        for reason in reasons:
            self.log.warning("bad sample", reason=reason)
        if bad and len(self.bad_reasons) < 20:
            self.bad_reasons.extend(reasons[: 20 - len(self.bad_reasons)])
        seen = self.progress.samples_seen
        if self.runtime_bad > max(5, self.hp.max_bad_sample_fraction * seen):
            first = self.bad_reasons[0] if self.bad_reasons else "unknown"
            raise FailedPrecondition(
                f"{self.runtime_bad} of the {seen} samples read so far could not be used, more than "
                f"max_bad_sample_fraction={self.hp.max_bad_sample_fraction:g}; first: {first}",
                field="datasets",
            )

    def stop(self, request: Stop) -> Outcome:
        if request is Stop.SHUTDOWN and self.last_saved_step != self.progress.step and self.progress.step > 0:
            self.save(self.progress.step)
        status = "cancelled" if request is Stop.CANCEL else "interrupted"
        metrics = self.write_metrics() if self.ctx.is_main else None
        return Outcome(status, self.progress, metrics=metrics)

    # --- outputs -----------------------------------------------------------------------------------

    def metrics(self) -> dict:
        losses = [h["loss"] for h in self.history]
        seconds = sum(h["step_seconds"] for h in self.history)
        tokens = sum(h["tokens"] for h in self.history)
        return {
            "run_id": self.spec.run_id,
            "base_model": self.spec.base_model,
            "method": str(self.spec.method),
            "hyperparameters": asdict(self.hp),
            "learning_rate": self.spec.learning_rate,
            "max_length": self.max_length,
            "schedule": self.schedule()
            | {"steps_per_epoch": self.steps_per_epoch, "save_every": self.save_every},
            "parameters": {"trainable": self.trainable, "total": self.total_params},
            "data": {
                "samples": len(self.plan.samples),
                "records": self.plan.total,
                "bad_in_plan": self.plan.bad_count,
                "bad_when_read": self.runtime_bad,
                "datasets": self.plan.datasets,
            },
            "summary": {
                "steps": self.progress.step,
                "first_loss": losses[0] if losses else None,
                "final_loss": losses[-1] if losses else None,
                "samples_seen": self.progress.samples_seen,
                "tokens_seen": self.progress.tokens_seen,
                "train_seconds": round(seconds, 3),
                "tokens_per_second": round(tokens / seconds, 3) if seconds else 0.0,
            },
            "steps": self.history,
        }

    def write_metrics(self) -> ObjectRef:
        return self.store.put_json(metrics_key(self.spec.run_id), self.metrics())

    def finish(self, weights: dict) -> Outcome:
        def export() -> tuple[ObjectRef, ObjectRef]:
            out = self.run_dir / "final"
            adapter = self.run_dir / "adapter"
            for folder in (out, adapter):
                shutil.rmtree(folder, ignore_errors=True)
            modeling.export_final(
                self.model_path,
                self.spec.method,
                self.hp,
                weights,
                self.processor,
                out,
                adapter_dest=adapter if self.spec.method is Method.LORA else None,
            )
            if adapter.exists():
                upload_folder(self.store, adapter, adapter_prefix(self.spec.run_id), {"kind": "peft-adapter"})
            manifest = upload_folder(
                self.store,
                out,
                final_prefix(self.spec.run_id),
                {
                    "kind": "hf-llava",
                    "run_id": self.spec.run_id,
                    "base_model": self.spec.base_model,
                    "method": str(self.spec.method),
                    "steps": self.progress.step,
                },
            )
            metrics = self.write_metrics()
            for folder in (out, adapter):
                shutil.rmtree(folder, ignore_errors=True)
            return manifest, metrics

        manifest, metrics = on_main(export, self.ctx)
        barrier(self.ctx)
        return Outcome(
            "succeeded",
            self.progress,
            final_model=manifest,
            final_model_prefix=final_prefix(self.spec.run_id),
            metrics=metrics,
        )


MANIFEST = "manifest.json"


def upload_folder(store: ObjectStore, folder: Path, prefix: str, info: dict) -> ObjectRef:
    """Upload every file of ``folder`` under ``prefix``, then ``manifest.json`` listing them (written
    last: a prefix without it is incomplete). Returns the manifest's ref."""
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        ref = store.put_file(prefix + path.relative_to(folder).as_posix(), path)
        files.append({"key": ref.key, "size": ref.size, "sha256": ref.sha256})
    return store.put_json(prefix + MANIFEST, info | {"files": files})
