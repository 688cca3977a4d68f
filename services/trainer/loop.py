"""The training loop of a prepared run (on every rank): resume from the last checkpoint, take the
optimizer steps, checkpoint every ``save_every`` steps, honour stop requests, stop on divergence or on
too many unreadable samples, and export the final model.

Rank 0 reports ``RunProgress`` after every step (ETA from ``dreamframe.progress.ProgressClock``: the
pace of the steps this process has trained); every decision that changes control flow (stop requests,
bad data, divergence) is agreed through a collective, so ranks never part ways.
"""

from __future__ import annotations

import gc
import math
import os
import time

import torch

from dreamframe.errors import FailedPrecondition
from dreamframe.progress import ProgressClock
from dreamframe.storage.base import ObjectRef

from . import checkpoint as ckpt
from . import modeling
from .contract import Hooks, Outcome, RunProgress, Stop, TrainingDiverged
from .data import Batch, StepFeed, loader_workers
from .distributed import all_sum, barrier, gather, on_main
from .export import export_model, final_prefix, trained_weights
from .metrics import batch_digest, write_metrics
from .run_setup import PreparedRun
from .step import clip_gradients, forward_backward


class TrainingLoop:
    def __init__(self, run: PreparedRun, hooks: Hooks) -> None:
        self.run = run
        self.hp = run.hp
        self.ctx = run.ctx
        self.schedule = run.schedule
        self.hooks = hooks
        self.log = run.log
        self.history: list[dict] = []
        self.progress = RunProgress(total_steps=run.schedule.total_steps, bad_samples=run.plan.bad_count)
        self.clock = ProgressClock(run.schedule.total_steps, "steps")
        self.runtime_bad = 0
        self.bad_reasons: list[str] = []
        self.last_saved_step = -1
        # A step that runs out of GPU memory is retried once with activation checkpointing turned on
        # (one process only: ranks of a sharded run cannot retry apart). Set off by the runtime, by a run
        # that checkpoints already, or once used.
        self.checkpointing_on_oom = run.runtime.checkpointing_on_oom and not self.hp.gradient_checkpointing
        self.checkpointing_on_oom &= self.ctx.world_size == 1
        self.oom_step = 0  # the step that turned it on (0: not turned on here)

    # --- checkpoints -------------------------------------------------------------------------------

    def state(self) -> dict:
        return {
            "step": self.progress.step,
            "progress": self.progress.to_dict() | {"checkpoint": None},
            "runtime_bad": self.runtime_bad,
            "history": self.history,
            "schedule": self.schedule.to_dict(),
        }

    def save(self, step: int) -> None:
        """Checkpoint after ``step`` optimizer steps (collective), once every trained weight is finite."""
        (bad,) = all_sum([sum(int((~torch.isfinite(p.detach())).sum()) for p in self.run.params)], self.ctx)
        if bad:
            raise self.diverged(f"{int(bad)} trained weights are not finite after step {step}")
        run = self.run
        ref = ckpt.save_run(
            run.store,
            run.spec.run_id,
            step,
            model=run.model,
            optimizer=run.optimizer,
            scheduler=run.scheduler,
            state=self.state,
            work_dir=run.run_dir,
            ctx=self.ctx,
            keep=run.runtime.keep_checkpoints,
        )
        self.progress.checkpoint = ref
        self.last_saved_step = step
        if self.ctx.is_main:
            self.write_metrics()
            self.hooks.on_progress(self.progress)

    def resume(self) -> None:
        """Continue from the last committed checkpoint, if any (collective)."""
        run = self.run
        found = ckpt.restore_run(
            run.store,
            run.spec.run_id,
            model=run.model,
            optimizer=run.optimizer,
            scheduler=run.scheduler,
            schedule=self.schedule.to_dict(),
            work_dir=run.run_dir,
            ctx=self.ctx,
        )
        if found is None:
            return
        state = found.state
        self.history = state["history"]
        self.runtime_bad = state["runtime_bad"]
        self.progress = RunProgress(**state["progress"])
        self.progress.checkpoint = found.ref
        self.last_saved_step = found.step
        self.clock.skip(found.step)  # done before: not this process's pace
        if self.ctx.is_main:
            self.log.info("resumed", step=found.step)

    # --- training ----------------------------------------------------------------------------------

    def feed(self, start_step: int) -> StepFeed:
        """This rank's micro-batches from ``start_step`` on, prepared by loader workers ahead of the loop."""
        run, s = self.run, self.schedule
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        return StepFeed(
            run.share,
            run.collate,
            sizes=run.plan.sizes(),
            weights=[d["weight"] for d in run.plan.datasets],
            seed=self.hp.seed,
            rank=self.ctx.rank,
            world=self.ctx.world_size,
            batch=s.per_device_batch_size,
            accumulation=s.gradient_accumulation_steps,
            micro_per_epoch=s.micro_per_epoch,
            steps_per_epoch=s.steps_per_epoch,
            start_step=start_step,
            stop_step=s.total_steps,
            workers=loader_workers(run.runtime.loader_workers, local_world),
            prefetch_factor=run.runtime.loader_prefetch,
        )

    def train(self) -> Outcome:
        self.resume()
        total = self.schedule.total_steps
        steps = iter(self.feed(self.progress.step))
        first = True
        try:
            self.clock.begin_work()
            while self.progress.step < total:
                request = self.stop_requested()
                if request is not Stop.NONE:
                    return self.stop(request)
                started = time.perf_counter()
                batches = next(steps)
                step = self.progress.step
                if first and self.ctx.is_main:  # how long the loader took to start
                    self.log.info("first batch", step=step, seconds=round(time.perf_counter() - started, 3))
                first = False
                stats = self.train_step(batches)
                elapsed = time.perf_counter() - started
                self.record(step + 1, stats, elapsed, [u for b in batches for u in b.uids])
                self.check_runtime_bad(stats["bad"], [r for b in batches for r in b.bad_reasons])
                if self.ctx.is_main:
                    self.hooks.on_progress(self.progress)
                if (step + 1) % self.schedule.save_every == 0 and step + 1 < total:
                    self.save(step + 1)
        finally:
            steps.close()  # stops the loader workers
        if self.last_saved_step != total:
            self.save(total)
        return self.finish(trained_weights(self.run.model))

    def train_step(self, batches: list[Batch]) -> dict:
        run = self.run
        step = self.progress.step + 1
        stats = self.forward_backward(batches, step)
        if not math.isfinite(stats["loss"]):
            raise self.diverged(f"the loss is {stats['loss']} at step {step}")
        grad_norm = clip_gradients(run.params, self.hp.max_grad_norm)
        if not math.isfinite(grad_norm):
            raise self.diverged(f"the gradient norm is {grad_norm} at step {step}")
        lr = run.scheduler.get_last_lr()[0]
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        return stats | {"learning_rate": lr, "grad_norm": grad_norm}

    def forward_backward(self, batches: list[Batch], step: int) -> dict:
        run = self.run
        if not self.checkpointing_on_oom:
            return forward_backward(run.model, batches, self.ctx, run.precision)
        rng = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        try:
            return forward_backward(run.model, batches, self.ctx, run.precision)
        except torch.OutOfMemoryError as exc:
            error = str(exc).split("\n", 1)[0]  # not the exception: its traceback holds the activations
        self.checkpointing_on_oom = False
        run.optimizer.zero_grad(set_to_none=True)  # micro-batches done before the error accumulated some
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        modeling.turn_on_activation_checkpointing(run.model)
        self.oom_step = step
        self.log.warning(
            "out of GPU memory: activation checkpointing turned on, step retried", step=step, error=error
        )
        torch.set_rng_state(rng[0])  # the retry draws the dropout masks the first try drew
        if rng[1] is not None:
            torch.cuda.set_rng_state_all(rng[1])
        return forward_backward(run.model, batches, self.ctx, run.precision)

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

    def record(self, step: int, stats: dict, elapsed: float, uids: list[str]) -> None:
        self.clock.advance()
        p = self.progress
        p.step = step
        p.epoch = step / self.schedule.steps_per_epoch
        p.loss = stats["loss"]
        p.learning_rate = stats["learning_rate"]
        p.tokens_per_second = stats["tokens"] / elapsed if elapsed > 0 else 0.0
        p.eta_seconds = self.clock.eta
        p.samples_seen += stats["samples"]
        p.tokens_seen += stats["tokens"]
        self.runtime_bad += stats["bad"]
        p.bad_samples = self.run.plan.bad_count + self.runtime_bad
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

    # --- endings -----------------------------------------------------------------------------------

    def stop(self, request: Stop) -> Outcome:
        if request is Stop.SHUTDOWN and self.last_saved_step != self.progress.step and self.progress.step > 0:
            self.save(self.progress.step)
        status = "cancelled" if request is Stop.CANCEL else "interrupted"
        metrics = self.write_metrics() if self.ctx.is_main else None
        return Outcome(status, self.progress, metrics=metrics)

    def write_metrics(self) -> ObjectRef:
        return write_metrics(self.run, self.progress, self.history, self.runtime_bad, self.oom_step)

    def finish(self, weights: dict) -> Outcome:
        drop = not self.run.runtime.keep_checkpoints_after_success

        def export() -> tuple[ObjectRef, ObjectRef]:
            manifest = export_model(self.run, weights, self.progress.step)
            metrics = self.write_metrics()
            if drop:  # after the final model and metrics are stored: nothing resumes a finished run
                ckpt.drop_checkpoints(self.run.store, self.run.spec.run_id)
            return manifest, metrics

        manifest, metrics = on_main(export, self.ctx)
        barrier(self.ctx)
        run_id = self.run.spec.run_id
        if drop:
            self.progress.checkpoint = None
        return Outcome(
            "succeeded",
            self.progress,
            final_model=manifest,
            final_model_prefix=final_prefix(run_id),
            metrics=metrics,
            checkpoints_dropped=drop,
        )
