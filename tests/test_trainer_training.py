"""Training runs in-process (world size 1, gloo, FSDP): the loss drops, the saved model loads and
generates, an interrupted run resumes to the same result, stop requests, divergence guard."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from test_trainer_support import local_store, make_dataset, runtime, tiny_spec

from dreamframe.models import video_llm
from services.trainer import loop as loop_module
from services.trainer import modeling
from services.trainer.checkpoint import load_latest
from services.trainer.spec import DatasetSource
from services.trainer.training import Hooks, Stop, TrainingDiverged, plan_key, run_training

pytestmark = pytest.mark.usefixtures("one_thread")


def _final_weights(store, run_id: str, tmp_path) -> dict[str, torch.Tensor]:
    folder = video_llm.fetch_model(store, f"runs/{run_id}/final/manifest.json", tmp_path / f"final-{run_id}")
    return load_file(folder / "model.safetensors")


def test_full_run_learns_and_saves_a_loadable_model(tmp_path):
    store = local_store(tmp_path)
    ref = make_dataset(store, n=6, missing=(5,))
    spec = tiny_spec("full", ref, "full", max_steps=12, learning_rate=2e-3, max_bad_sample_fraction=0.2)
    seen = []
    outcome = run_training(spec, store, runtime(tmp_path), Hooks(on_progress=seen.append))
    assert outcome.status == "succeeded"
    assert outcome.progress.step == 12 and outcome.progress.bad_samples == 1
    assert store.exists(plan_key("full"))
    metrics = store.get_json(outcome.metrics.key)
    losses = [s["loss"] for s in metrics["steps"]]
    assert len(losses) == 12 and all(s["tokens_per_second"] > 0 for s in metrics["steps"])
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses
    assert metrics["data"]["bad_in_plan"] == 1 and metrics["summary"]["tokens_seen"] > 0
    assert seen[-1].step == 12 and seen[-1].eta_seconds == 0.0

    # The final model is a plain HF checkpoint: download, from_pretrained, generate.
    folder = video_llm.fetch_model(store, outcome.final_model.key, tmp_path / "final")
    model, processor = video_llm.load_video_llm(folder, "cpu")
    base, _ = video_llm.load_video_llm(
        video_llm.resolve_model_path("tiny", cache_dir=runtime(tmp_path).model_cache_dir)
    )
    trained = dict(model.named_parameters())
    changed = [n for n, p in base.named_parameters() if not torch.equal(p, trained[n])]
    assert any("language_model" in n for n in changed) and not any("vision_tower" in n for n in changed)
    answer = video_llm.generate(model, processor, video_llm.random_frames(3), "What happens in the video?")
    assert isinstance(answer, str)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_interrupted_run_resumes_to_the_same_result(tmp_path, method):
    store = local_store(tmp_path)
    ref = make_dataset(store, n=5)
    hp = dict(max_steps=7, gradient_accumulation_steps=2, save_every_steps=2, lora_dropout=0.1)
    straight = run_training(tiny_spec("straight", ref, method, **hp), store, runtime(tmp_path))
    # A finished run's resume checkpoints are deleted once its final model is stored ...
    assert straight.checkpoints_dropped and straight.progress.checkpoint is None
    assert not list(store.list("runs/straight/checkpoints/"))
    # ... unless kept (trainer.keep_checkpoints_after_success), as below, where they are inspected.
    rt = replace(runtime(tmp_path), keep_checkpoints_after_success=True)

    class Killed(Exception):
        pass

    def die_at_step_5(progress):
        if progress.step == 5:
            raise Killed  # as if the process died after step 5, before the step-6 checkpoint

    with pytest.raises(Killed):
        run_training(tiny_spec("resumed", ref, method, **hp), store, rt, Hooks(on_progress=die_at_step_5))
    assert load_latest(store, "resumed").step == 4
    resumed = run_training(tiny_spec("resumed", ref, method, **hp), store, rt)

    assert resumed.status == straight.status == "succeeded"
    a, b = (store.get_json(o.metrics.key)["steps"] for o in (straight, resumed))
    assert [s["step"] for s in b] == list(range(1, 8))
    assert [s["batch_digest"] for s in a] == [s["batch_digest"] for s in b]  # same data order
    assert [s["loss"] for s in b] == pytest.approx([s["loss"] for s in a], rel=1e-5)
    wa, wb = _final_weights(store, "straight", tmp_path), _final_weights(store, "resumed", tmp_path)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6)
    # Only the newest checkpoints are kept.
    steps = {i.key.split("/")[3] for i in store.list("runs/resumed/checkpoints/") if "/step-" in i.key}
    assert steps == {"step-00000006", "step-00000007"}
    if method == "lora":
        assert store.exists("runs/resumed/adapter/adapter_model.safetensors")


def test_shutdown_checkpoints_then_resumes_and_cancel_stops(tmp_path):
    store = local_store(tmp_path)
    ref = make_dataset(store, n=4)
    rt = runtime(tmp_path)
    spec = tiny_spec("stop", ref, "lora", max_steps=5, save_every_steps=100)

    def shutdown_after(step):
        return lambda: Stop.SHUTDOWN if hooks.progress_step >= step else Stop.NONE

    class Tracker(Hooks):
        progress_step = 0

    hooks = Tracker()
    hooks.on_progress = lambda p: setattr(hooks, "progress_step", p.step)
    hooks.should_stop = shutdown_after(3)
    outcome = run_training(spec, store, rt, hooks)
    assert outcome.status == "interrupted" and outcome.progress.step == 3
    assert load_latest(store, "stop").step == 3  # checkpointed on the way out

    outcome = run_training(spec, store, rt, Hooks(should_stop=lambda: Stop.CANCEL))
    assert outcome.status == "cancelled" and outcome.progress.step == 3
    assert load_latest(store, "stop").step == 3

    outcome = run_training(spec, store, rt)
    assert outcome.status == "succeeded" and outcome.progress.step == 5
    assert [s["step"] for s in store.get_json(outcome.metrics.key)["steps"]] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    ("save_every", "message", "kept"),
    [
        (2, "the loss is nan at step 4; stopped, the last good checkpoint is step 2", 2),
        (3, "trained weights are not finite after step 3; stopped, there is no checkpoint yet", None),
    ],
)
def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch, save_every, message, kept
):
    store = local_store(tmp_path)
    ref = make_dataset(store, n=4)
    real = modeling.build_optimizer

    def poisoned_after_three_steps(model, lr, wd):
        optimizer = real(model, lr, wd)
        steps = []

        def poison(opt, args, kwargs):
            steps.append(1)
            if len(steps) == 3:
                with torch.no_grad():
                    next(iter(modeling.trainable_parameters(model))).fill_(float("nan"))

        optimizer.register_step_post_hook(poison)
        return optimizer

    monkeypatch.setattr(modeling, "build_optimizer", poisoned_after_three_steps)
    spec = tiny_spec("nan", ref, "full", max_steps=6, save_every_steps=save_every)
    with pytest.raises(TrainingDiverged) as err:
        run_training(spec, store, runtime(tmp_path))
    assert message in err.value.message
    latest = load_latest(store, "nan")
    assert (latest.step if latest else None) == kept


def test_datasets_mixed_by_weight(tmp_path):
    store = local_store(tmp_path)
    a = make_dataset(store, "datasets/a/", n=4, seed=1)
    b = make_dataset(store, "datasets/b/", n=4, seed=2)
    sources = [DatasetSource(key=a.key, weight=3.0), DatasetSource(key=b.key, weight=1.0)]
    outcome = run_training(tiny_spec("mix", sources, "lora", max_steps=0, epochs=1), store, runtime(tmp_path))
    metrics = store.get_json(outcome.metrics.key)
    assert outcome.progress.step == 4 and outcome.progress.samples_seen == 8  # 8 samples, batch 2
    assert [d["weight"] for d in metrics["data"]["datasets"]] == [3.0, 1.0]


def _checkpointing(model) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    flag = getattr(inner, "is_activation_checkpointing", None)  # the name since transformers 5.x
    return bool(inner.is_gradient_checkpointing if flag is None else flag)


def test_a_step_out_of_gpu_memory_is_retried_with_activation_checkpointing(tmp_path, monkeypatch):
    """Seen on an H200 shared by the whole stack: a 7B LoRA step at batch 4 did not fit the trainer's
    budget. The step is retried with activation checkpointing on (same samples, same dropout masks), and
    the run ends as one that checkpointed from the start."""
    store = local_store(tmp_path)
    ref = make_dataset(store, n=5)
    hp = dict(max_steps=3, gradient_accumulation_steps=2, lora_dropout=0.1)
    rt = runtime(tmp_path)
    planned = run_training(tiny_spec("planned", ref, "lora", gradient_checkpointing=True, **hp), store, rt)

    real = loop_module.forward_backward
    seen = []

    def full_at_step_2(model, batches, ctx, precision):
        seen.append(_checkpointing(model))
        if len(seen) == 2:  # the first micro-batch's backward ran, then the GPU was full
            real(model, batches[:1], ctx, precision)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 MiB.\nmore detail")
        return real(model, batches, ctx, precision)

    monkeypatch.setattr(loop_module, "forward_backward", full_at_step_2)
    retried = run_training(tiny_spec("retried", ref, "lora", **hp), store, rt)
    assert retried.status == planned.status == "succeeded"
    assert seen == [False, False, True, True]  # step 1, step 2, step 2 again, step 3
    metrics = store.get_json(retried.metrics.key)
    assert metrics["activation_checkpointing"] == {"requested": False, "after_out_of_memory_at_step": 2}
    a, b = (store.get_json(o.metrics.key)["steps"] for o in (planned, retried))
    assert [s["batch_digest"] for s in a] == [s["batch_digest"] for s in b]
    assert [s["loss"] for s in b] == pytest.approx([s["loss"] for s in a], rel=1e-5)
    assert [s["grad_norm"] for s in b] == pytest.approx([s["grad_norm"] for s in a], rel=1e-4)

    # Switched off (or used up), running out of memory fails the step as before.
    seen.clear()
    off = runtime(tmp_path)
    off.checkpointing_on_oom = False
    with pytest.raises(torch.OutOfMemoryError):
        run_training(tiny_spec("off", ref, "lora", **hp), store, off)
