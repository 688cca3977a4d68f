"""The trainer's disk forecast: checked against what a tiny run really writes, and a run that cannot fit
its export fails at start with RESOURCE_EXHAUSTED naming trainer.work_dir, before any step."""

from __future__ import annotations

from collections import namedtuple
from dataclasses import replace

import pytest
from test_trainer_support import local_store, make_dataset, runtime, tiny_spec

from dreamframe import disk_space
from dreamframe.errors import ResourceExhausted
from services.trainer import disk
from services.trainer.training import Hooks, run_training

GIB = 1 << 30
Usage = namedtuple("Usage", "total used free")


def sizes(store, prefix: str) -> int:
    return sum(i.size for i in store.list(prefix))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_forecast_covers_what_the_run_writes(tmp_path, monkeypatch, method):
    store = local_store(tmp_path)
    ref = make_dataset(store, n=4)
    seen: list[disk.DiskForecast] = []
    check = disk.check_work_dir
    monkeypatch.setattr(
        disk, "check_work_dir", lambda work_dir, plan, **kw: (seen.append(plan), check(work_dir, plan, **kw))
    )
    rt = replace(runtime(tmp_path), keep_checkpoints_after_success=True)
    outcome = run_training(tiny_spec("r", ref, method, max_steps=2, save_every_steps=1), store, rt)
    assert outcome.status == "succeeded"

    (plan,) = seen
    # The local store shares the disk: it keeps trainer.keep_checkpoints of them beside the export.
    assert plan.kept_checkpoints == rt.keep_checkpoints == 2 and plan.stored_bytes == 0
    steps = {i.key.split("/")[3] for i in store.list("runs/r/checkpoints/") if "/step-" in i.key}
    largest = max(sizes(store, f"runs/r/checkpoints/{s}/") for s in steps)
    weights = sum(
        i.size
        for i in store.list("runs/r/")
        if i.key.endswith(".safetensors") and "/checkpoints/" not in i.key
    )
    # The forecast leaves the small files (configs, tokenizer, the checkpoint's index) to the headroom.
    assert 0.8 * largest <= plan.checkpoint_bytes <= largest
    assert 0.95 * weights <= plan.export_bytes <= weights
    assert largest - plan.checkpoint_bytes < disk_space.HEADROOM_BYTES
    assert sizes(store, "runs/r/final/") - plan.export_bytes < disk_space.HEADROOM_BYTES


def test_a_run_that_cannot_fit_its_export_fails_before_its_first_step(tmp_path, monkeypatch):
    store = local_store(tmp_path)
    ref = make_dataset(store, n=4)
    monkeypatch.setattr(
        disk_space.shutil, "disk_usage", lambda path: Usage(GIB, GIB - (100 << 20), 100 << 20)
    )
    steps: list = []
    with pytest.raises(ResourceExhausted) as err:
        run_training(
            tiny_spec("full", ref, "lora", max_steps=2),
            store,
            runtime(tmp_path),
            Hooks(on_progress=steps.append),
        )
    assert err.value.field == "trainer.work_dir"
    assert "the exported model" in err.value.message and "0.1 GiB is free" in err.value.message
    assert str(tmp_path) not in err.value.message  # the caller sees the setting, not the server's paths
    assert (
        steps == []
        and not list(store.list("runs/full/checkpoints/"))
        and not store.exists("runs/full/final/manifest.json")
    )

    # Off (trainer.check_free_disk: false), the run goes ahead.
    rt = replace(runtime(tmp_path), check_free_disk=False)
    assert run_training(tiny_spec("unchecked", ref, "lora", max_steps=1), store, rt).status == "succeeded"


def test_peak_by_where_the_store_keeps_its_objects():
    remote = disk.DiskForecast(export_bytes=14 * GIB, checkpoint_bytes=4 * GIB, kept_checkpoints=0)
    assert remote.peak_bytes == 14 * GIB  # each file leaves the disk before the next is written
    assert replace(remote, checkpoint_bytes=20 * GIB).peak_bytes == 20 * GIB
    local = replace(remote, kept_checkpoints=2)
    assert local.peak_bytes == 2 * 4 * GIB + 14 * GIB  # the kept checkpoints, then the export beside them
    assert replace(local, export_bytes=GIB).peak_bytes == 3 * 4 * GIB  # one more while the newest commits
    assert replace(local, stored_bytes=8 * GIB).peak_bytes == 14 * GIB  # a resumed run's are on disk already
    assert "2 resume checkpoints of 4.0 GiB" in local.describe() and "resume" not in remote.describe()


def test_the_7b_forecast_on_the_meta_device():
    """The README's figures for a 7B LoRA run at r=128 (bf16 base), built on the meta device (no memory)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from dreamframe.models import video_llm
    from services.trainer import modeling
    from services.trainer.spec import Hyperparameters, Method

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(video_llm.llava_7b_config())
    precision = modeling.Precision(torch.bfloat16, torch.bfloat16)
    model = modeling.make_trainable(
        model, Method.LORA, Hyperparameters(lora_rank=128, lora_alpha=256), precision
    )
    local = disk.forecast(model, Method.LORA, torch.bfloat16, keep_checkpoints=2, store_on_disk=True)
    # 7.06 B parameters in bf16 merged (13.2 GiB) + the fp32 adapter (1.3 GiB); 341 M trained parameters
    # with AdamW's two moments, fp32.
    assert round(local.export_bytes / GIB, 1) == 14.4 and round(local.checkpoint_bytes / GIB, 1) == 3.8
    assert round(local.peak_bytes / GIB, 1) == 22.1
    remote = disk.forecast(model, Method.LORA, torch.bfloat16, keep_checkpoints=2, store_on_disk=False)
    assert remote.peak_bytes == local.export_bytes
