"""The trainer's data pipeline: plans (bad samples reported, skipped, counted; too many fail early),
dataset mixing and order, and batches whose loss mask covers only the answers."""

from __future__ import annotations

import io
from collections import Counter

import pytest
import torch
from PIL import Image
from test_trainer_support import ANSWERS, local_store, make_dataset, tiny_cache

from dreamframe.errors import FailedPrecondition, InvalidArgument, NotFound
from dreamframe.models import video_llm
from services.trainer.data import (
    Collator,
    DataPlan,
    Sample,
    build_plan,
    candidate_keys,
    epoch_order,
    load_dataset,
    mixture_counts,
    parse_conversation,
    resolve_max_length,
)
from services.trainer.spec import DatasetSource


@pytest.fixture(scope="module")
def processor():
    return video_llm.load_processor(video_llm.resolve_model_path("tiny", cache_dir=tiny_cache()))


def _plan(store, sources, processor, max_bad=0.5, num_frames=3, max_length=512):
    return build_plan(
        store, sources, processor, num_frames=num_frames, max_length=max_length, max_bad_fraction=max_bad
    )


def test_missing_media_is_reported_skipped_and_counted(tmp_path, processor):
    store = local_store(tmp_path)
    ref = make_dataset(store, n=6, missing=(2,))
    plan = _plan(store, [DatasetSource(key=ref.key)], processor, max_bad=0.2)
    assert plan.total == 6 and plan.bad_count == 1 and len(plan.samples) == 5
    assert (
        plan.bad[0].id == "s2"
        and "missing media" in plan.bad[0].reason
        and "videos/v2.mp4" in plan.bad[0].reason
    )
    # Relative video paths resolve against the dataset folder above conversations/.
    assert plan.samples[0].media == ("datasets/toy/videos/v0.mp4",)
    assert DataPlan.from_dict(plan.to_dict()) == plan
    visual = 3 * video_llm.image_token_count(processor)
    assert all(visual < s.length < visual + 120 for s in plan.samples)


def test_too_many_bad_samples_fail_early_with_a_clear_error(tmp_path, processor):
    store = local_store(tmp_path)
    ref = make_dataset(store, n=6, missing=(1, 4))
    with pytest.raises(FailedPrecondition) as err:
        _plan(store, [DatasetSource(key=ref.key)], processor, max_bad=0.1)
    assert err.value.field == "datasets"
    assert "2 of 6 samples (33.3%) are unusable" in err.value.message
    assert "max_bad_sample_fraction=0.1" in err.value.message and "'s1'" in err.value.message


def test_malformed_records_are_bad_samples(tmp_path, processor):
    store = local_store(tmp_path)
    store.put_bytes("data/v.mp4", b"not checked at planning time")
    good = {"from": "human", "value": "<image>\nQ?"}
    records = [
        {"id": "ok", "video": "v.mp4", "conversations": [good, {"from": "gpt", "value": "A."}]},
        {"id": "no-answer", "video": "v.mp4", "conversations": [good]},
        {"id": "gpt-first", "video": "v.mp4", "conversations": [{"from": "gpt", "value": "A."}, good]},
        {"id": "text-only", "conversations": [good, {"from": "gpt", "value": "A."}]},
        "not an object",
    ]
    ref = store.put_json("data/train.json", records)
    plan = _plan(store, [DatasetSource(key=ref.key)], processor, max_bad=0.9)
    assert [s.id for s in plan.samples] == ["ok"]
    reasons = {b.id: b.reason for b in plan.bad}
    assert "no answer" in reasons["no-answer"]
    assert "expected user" in reasons["gpt-first"]
    assert "text-only" in reasons["text-only"]
    assert "not a JSON object" in reasons["4"]


def test_manifest_frames_and_images(tmp_path, processor):
    store = local_store(tmp_path)
    make_dataset(store, prefix="datasets/mix/", n=2)
    for i in range(4):
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), (i * 60, 0, 0)).save(buf, format="PNG")
        store.put_bytes(f"jobs/j/stories/000/frames/{i:06d}.png", buf.getvalue())
    conv = [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]
    records = store.get_json("datasets/mix/conversations/train.json") + [
        {
            "id": "frames",
            "frames": [f"jobs/j/stories/000/frames/{i:06d}.png" for i in range(4)],
            "conversations": conv,
        },
        {"id": "image", "image": "jobs/j/stories/000/frames/000000.png", "conversations": conv},
    ]
    store.put_json("datasets/mix/conversations/train.json", records)
    conversations = store.stat("datasets/mix/conversations/train.json")
    entry = {"path": "conversations/train.json", "key": conversations.key, "sha256": conversations.sha256}
    manifest = store.put_json(
        "datasets/mix/manifest.json", {"format": "dreamframe-dataset", "files": [entry]}
    )
    plan = _plan(store, [DatasetSource(key=manifest.key)], processor)
    assert [s.kind for s in plan.samples] == ["video", "video", "frames", "image"]
    loaded = [load_dataset(store, DatasetSource(key=manifest.key), 0)]
    collate = Collator(store, processor, loaded, bucket=None, num_frames=3, max_length=512)
    batch = collate(plan.samples[2:])
    per_image = video_llm.image_token_count(processor)
    assert batch.pixel_values.shape[0] == 3 + 1  # three sampled keyframes + one image
    assert int((batch.input_ids == processor.image_token_id).sum()) == 4 * per_image
    assert batch.bad == 0


def test_batch_loss_mask_covers_only_the_answers(tmp_path, processor):
    store = local_store(tmp_path)
    ref = make_dataset(store, n=3)
    records = store.get_json(ref.key)
    records[1]["conversations"] += [
        {"from": "human", "value": "And then?"},
        {"from": "gpt", "value": "They leave together."},
    ]
    ref = store.put_json(ref.key, records)
    source = DatasetSource(key=ref.key)
    plan = _plan(store, [source], processor)
    collate = Collator(
        store, processor, [load_dataset(store, source, 0)], bucket=None, num_frames=3, max_length=512
    )
    batch = collate(plan.samples[:2])
    tok = processor.tokenizer
    eos = tok.eos_token
    expected = [[ANSWERS[0] + eos], [ANSWERS[1] + eos, "They leave together." + eos]]
    for row in range(2):
        ids, labels, mask = batch.input_ids[row], batch.labels[row], batch.attention_mask[row]
        labelled = (labels != -100).nonzero().flatten().tolist()
        # Contiguous runs of labelled positions are exactly the answers, in order.
        runs, start = [], labelled[0]
        for a, b in zip(labelled, labelled[1:] + [None], strict=True):
            if b != a + 1:
                runs.append(tok.decode(ids[start : a + 1]).strip())
                start = b
        assert runs == expected[row]
        assert torch.equal(labels[labels != -100], ids[labels != -100])
        assert bool((labels[mask == 0] == -100).all()) and bool((ids[mask == 0] == tok.pad_token_id).all())
        assert int((ids == processor.image_token_id).sum()) == 3 * video_llm.image_token_count(processor)
    assert batch.pixel_values.shape == (6, 3, 32, 32)
    assert batch.num_label_tokens == int((batch.labels != -100).sum())
    assert batch.uids == [s.uid for s in plan.samples[:2]]


def test_unreadable_video_becomes_a_masked_counted_placeholder(tmp_path, processor):
    store = local_store(tmp_path)
    ref = make_dataset(store, n=2)
    store.put_bytes("datasets/toy/videos/v1.mp4", b"this is not an mp4")
    source = DatasetSource(key=ref.key)
    plan = _plan(store, [source], processor)
    collate = Collator(
        store, processor, [load_dataset(store, source, 0)], bucket=None, num_frames=3, max_length=512
    )
    batch = collate(plan.samples)
    assert batch.bad == 1 and "unreadable media" in batch.bad_reasons[0]
    assert bool((batch.labels[1] == -100).all()) and bool((batch.labels[0] != -100).any())
    assert batch.pixel_values.shape[0] == 6  # placeholder frames keep every rank's modules in step


def test_missing_dataset_and_changed_sha_name_the_field(tmp_path, processor):
    store = local_store(tmp_path)
    with pytest.raises(NotFound) as err:
        load_dataset(store, DatasetSource(key="nope.json"), 3)
    assert err.value.field == "datasets[3].dataset.key"
    ref = make_dataset(store, n=1)
    with pytest.raises(FailedPrecondition) as err:
        load_dataset(store, DatasetSource(key=ref.key, sha256="0" * 64), 0)
    assert err.value.field == "datasets[0].dataset.sha256"


def test_max_length_must_hold_the_frames(processor):
    assert resolve_max_length(0, processor, 4, 1024) == 1024  # 2048 + 64 visual, capped by the context
    assert resolve_max_length(0, processor, 4, 4096) == 2048 + 64
    with pytest.raises(InvalidArgument) as err:
        resolve_max_length(40, processor, 4, 1024)
    assert err.value.field == "hyperparameters.max_length"


def test_mixture_counts_follow_the_weights():
    assert mixture_counts([100, 10], [1, 1]) == [55, 55]
    assert mixture_counts([6, 6], [3, 1]) == [9, 3]
    assert mixture_counts([5, 0], [1, 1]) == [5, 0]
    assert sum(mixture_counts([7, 3, 5], [0.2, 0.3, 0.5])) == 15


def _toy_plan(sizes: list[int]) -> DataPlan:
    samples = [
        Sample(d, i, f"{d}-{i}", "video", ("k",), 10 + (i % 5)) for d, n in enumerate(sizes) for i in range(n)
    ]
    datasets = [{"key": f"d{d}", "sha256": "", "records": n, "weight": 1.0} for d, n in enumerate(sizes)]
    return DataPlan(samples, [], 0, sum(sizes), datasets, "b", 3, 512)


def test_epoch_order_is_a_deterministic_weighted_mix():
    plan = _toy_plan([8, 4])
    order = epoch_order(plan, [3.0, 1.0], seed=7, epoch=0, group_size=4)
    assert order == epoch_order(plan, [3.0, 1.0], seed=7, epoch=0, group_size=4)
    assert order != epoch_order(plan, [3.0, 1.0], seed=7, epoch=1, group_size=4)
    assert len(order) == 12
    by_dataset = Counter(plan.samples[i].dataset for i in order)
    assert by_dataset == {0: 9, 1: 3}
    # Dataset 0 is drawn without replacement until used up: all 8 appear before any repeats.
    assert len({i for i in order if plan.samples[i].dataset == 0}) == 8
    odd = epoch_order(_toy_plan([5]), [1.0], seed=0, epoch=0, group_size=4)
    assert len(odd) == 8 and sorted(set(odd)) == list(range(5))  # wrapped to whole global batches


def test_conversation_parsing_and_key_candidates():
    conv = parse_conversation(
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "<video>\nWhat?"},
                {"from": "gpt", "value": "This."},
                {"from": "human", "value": "Unanswered?"},
            ]
        }
    )
    assert conv.system == "Be brief." and conv.turns == (("What?", "This."),)
    assert candidate_keys("videos/a.mp4", "datasets/x/conversations") == [
        "datasets/x/conversations/videos/a.mp4",
        "datasets/x/videos/a.mp4",
        "datasets/videos/a.mp4",
        "videos/a.mp4",
    ]
