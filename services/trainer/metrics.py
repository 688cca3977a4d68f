"""``runs/<run>/metrics.json``: per step loss, learning rate, grad norm, tokens, tokens/s and a digest of
the step's samples; the run's summary; the data counts. Written at every checkpoint, on stop and at the
end (rank 0)."""

from __future__ import annotations

import hashlib
from dataclasses import asdict

from dreamframe.keys import run_prefix
from dreamframe.storage.base import ObjectRef

from .contract import RunProgress
from .run_setup import PreparedRun


def metrics_key(run_id: str) -> str:
    return f"{run_prefix(run_id)}metrics.json"


def batch_digest(uids: list[str]) -> str:
    """A short fingerprint of the samples a step trained on (metrics compare data order with it)."""
    return hashlib.sha256("\n".join(uids).encode()).hexdigest()[:16]


def run_metrics(
    run: PreparedRun, progress: RunProgress, history: list[dict], runtime_bad: int, oom_step: int = 0
) -> dict:
    losses = [h["loss"] for h in history]
    seconds = sum(h["step_seconds"] for h in history)
    tokens = sum(h["tokens"] for h in history)
    spec, schedule, plan = run.spec, run.schedule, run.plan
    return {
        "run_id": spec.run_id,
        "base_model": spec.base_model,
        "method": str(spec.method),
        "hyperparameters": asdict(run.hp),
        "learning_rate": spec.learning_rate,
        "max_length": run.max_length,
        "schedule": schedule.to_dict()
        | {"steps_per_epoch": schedule.steps_per_epoch, "save_every": schedule.save_every},
        "parameters": {"trainable": run.trainable, "total": run.total_params},
        # Turned on by the run's hyperparameters, or at this step after running out of GPU memory.
        "activation_checkpointing": {
            "requested": run.hp.gradient_checkpointing,
            "after_out_of_memory_at_step": oom_step or None,
        },
        "data": {
            "samples": plan.num_samples,
            "records": plan.total,
            "bad_in_plan": plan.bad_count,
            "bad_when_read": runtime_bad,
            "datasets": plan.datasets,
        },
        "summary": {
            "steps": progress.step,
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "samples_seen": progress.samples_seen,
            "tokens_seen": progress.tokens_seen,
            "train_seconds": round(seconds, 3),
            "tokens_per_second": round(tokens / seconds, 3) if seconds else 0.0,
        },
        "steps": history,
    }


def write_metrics(
    run: PreparedRun, progress: RunProgress, history: list[dict], runtime_bad: int, oom_step: int = 0
) -> ObjectRef:
    metrics = run_metrics(run, progress, history, runtime_bad, oom_step)
    return run.store.put_json(metrics_key(run.spec.run_id), metrics)
