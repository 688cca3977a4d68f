"""The trainer's input path for large datasets: the qa-generator's sharded record index, each rank
reading only its own shards, loader workers, every sample once per epoch across ranks, a mid-epoch
resume in the same order, bad samples counted as they are met, and a run trained from the index."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from test_qa_generator import request, sources_for
from test_trainer_support import ANSWERS, local_store, make_mp4, runtime, tiny_cache, tiny_spec

from dreamframe.errors import FailedPrecondition
from dreamframe.models import video_llm
from dreamframe.storage.base import ObjectRef, sha256_bytes
from services.qa_generator.builder import MANIFEST, build_dataset
from services.qa_generator.index import index_files
from services.trainer.data import (
    Collator,
    StepFeed,
    block,
    build_plan,
    load_dataset,
    micro_batches_per_epoch,
    rank_share,
)
from services.trainer.spec import DatasetSource
from services.trainer.training import plan_key, run_training

pytestmark = pytest.mark.usefixtures("one_thread")
FRAMES = 3


@pytest.fixture(scope="module")
def processor():
    return video_llm.load_processor(video_llm.resolve_model_path("tiny", cache_dir=tiny_cache()))


def make_indexed_dataset(store, prefix: str = "datasets/big/", n: int = 13, shard_records: int = 4) -> str:
    """A qa-generator-shaped dataset with a record index in shards of ``shard_records``; returns the
    manifest key."""
    records, refs = [], {}
    for i in range(n):
        rel = f"videos/v{i}.mp4"
        refs[rel] = store.put_bytes(prefix + rel, make_mp4(i, frames=4, size=32))
        turns = [
            {"from": "human", "value": "<image>\nWhat happens?"},
            {"from": "gpt", "value": ANSWERS[i % 6]},
        ]
        more = [{"from": "human", "value": "And then?"}, {"from": "gpt", "value": "More. " * (i % 5 + 1)}]
        turns += more * (i % 3)  # lengths vary, for the length grouping
        records.append({"id": f"r{i}", "video": rel, "conversations": turns})
    files = {"conversations/train.json": json.dumps(records).encode()}
    shards, index = index_files("train", records, prefix, refs, shard_records=shard_records)
    files.update(shards)
    for rel, data in files.items():
        refs[rel] = store.put_bytes(prefix + rel, data)
    manifest = {
        "format": "dreamframe-dataset",
        "bucket": store.default_bucket,
        "index": {"train": index},
        "files": [{"path": rel, **vars(ref)} for rel, ref in sorted(refs.items())],
    }
    return store.put_json(prefix + MANIFEST, manifest).key


class CountingStore:
    """The store, remembering which keys were streamed and HEAD-ed."""

    def __init__(self, store) -> None:
        self._store = store
        self.streamed: list[str] = []
        self.heads = 0

    def open_stream(self, key, **kwargs):
        self.streamed.append(key)
        return self._store.open_stream(key, **kwargs)

    def exists(self, key, **kwargs):
        self.heads += 1
        return self._store.exists(key, **kwargs)

    def __getattr__(self, name):
        return getattr(self._store, name)


def _plan(store, key, processor, max_bad=0.1):
    return build_plan(
        store,
        [DatasetSource(key=key)],
        processor,
        num_frames=FRAMES,
        max_length=512,
        max_bad_fraction=max_bad,
    )


def _feed(store, key, processor, *, rank=0, world=1, batch=2, accum=1, start=0, steps=None, workers=0):
    plan = _plan(store, key, processor)
    datasets = [load_dataset(store, DatasetSource(key=key), 0)]
    share = rank_share(store, plan, processor, rank=rank, world=world, num_frames=FRAMES)
    collator = Collator(store, processor, datasets, bucket=None, num_frames=FRAMES, max_length=512)
    micro = micro_batches_per_epoch(plan.sizes(), [1.0], world, batch)
    per_epoch = -(-micro // accum)
    return StepFeed(
        share,
        collator,
        sizes=plan.sizes(),
        weights=[1.0],
        seed=3,
        rank=rank,
        world=world,
        batch=batch,
        accumulation=accum,
        micro_per_epoch=micro,
        steps_per_epoch=per_epoch,
        start_step=start,
        stop_step=steps if steps is not None else 2 * per_epoch,
        workers=workers,
    )


def test_qa_generator_writes_a_sharded_index_of_its_records(tmp_path):
    store = local_store(tmp_path)
    build_dataset(store, request(sources_for(store, 2)))
    manifest = store.get_json("datasets/job-qa/" + MANIFEST)
    index = manifest["index"]["train"]
    records = store.get_json("datasets/job-qa/conversations/train.json")
    assert index["records"] == len(records) > 0 and index["conversations"] == "conversations/train.json"
    files = {f["path"]: f for f in manifest["files"]}
    lines = []
    for shard in index["shards"]:
        assert shard["path"] in files  # listed, sized and hashed like every dataset file
        lines += store.get_bytes("datasets/job-qa/" + shard["path"]).decode().splitlines()
    entries = [json.loads(line) for line in lines]
    assert [e["record"] for e in entries] == records
    for entry, record in zip(entries, records, strict=True):
        key, size = entry["media"][0]
        assert key == "datasets/job-qa/" + record["video"] and size == store.stat(key).size
        assert entry["chars"] == sum(len(t["value"]) for t in record["conversations"])


def test_an_indexed_dataset_is_planned_from_its_manifest_alone(tmp_path, processor):
    store = CountingStore(local_store(tmp_path))
    key = make_indexed_dataset(store, n=13, shard_records=4)
    plan = _plan(store, key, processor)
    assert plan.samples == [] and plan.sizes() == [13] and plan.total == 13
    assert [s["records"] for s in plan.datasets[0]["index"]["shards"]] == [4, 4, 4, 1]
    assert store.streamed == [] and store.heads <= 2  # no record, shard or video touched
    # Rank 1 of 3 owns records 4..7: it streams only the shards holding them.
    share = rank_share(store, plan, processor, rank=1, world=3, num_frames=FRAMES)
    assert [s.id for s in share.samples[0]] == [f"r{i}" for i in block(13, 1, 3)] == ["r4", "r5", "r6", "r7"]
    assert store.streamed == [key.replace(MANIFEST, "index/train-00001.jsonl")]
    assert share.samples[0][0].media == ("datasets/big/videos/v4.mp4",) and share.samples[0][0].sizes


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_sample_once_per_epoch_across_ranks(tmp_path, processor, world):
    store = local_store(tmp_path)
    n, batch = 13, 2
    key = make_indexed_dataset(store, n=n)
    feeds = [_feed(store, key, processor, rank=r, world=world, batch=batch) for r in range(world)]
    micro = feeds[0].micro_per_epoch
    for epoch in (0, 1):
        steps = range(epoch * feeds[0].steps_per_epoch, (epoch + 1) * feeds[0].steps_per_epoch)
        seen = Counter()
        for feed in feeds:
            mine = [s.id for step in steps for micro_batch in feed.samples_of_step(step) for s in micro_batch]
            assert len(mine) == micro * batch  # every rank takes the same number of micro-batches
            assert set(mine) <= {f"r{i}" for i in block(n, feed.rank, world)}
            seen.update(mine)
        assert set(seen) == {f"r{i}" for i in range(n)}
        # Beyond one of each, only the wrap that evens out the ranks' last micro-batch repeats.
        assert sum(seen.values()) - n == world * micro * batch - n < world * batch
    if world == 1:  # each epoch its own order
        orders = [[s.id for m in feeds[0].samples_of_step(st) for s in m] for st in range(2 * micro)]
        assert orders[:micro] != orders[micro:]


def test_mid_epoch_resume_continues_in_the_same_order(tmp_path, processor):
    store = local_store(tmp_path)
    key = make_indexed_dataset(store, n=10)
    # Two loader worker processes read the straight run; the resumed one reads in-process.
    straight = [[b.uids for b in step] for step in _feed(store, key, processor, accum=2, workers=2)]
    resumed = [[b.uids for b in step] for step in _feed(store, key, processor, accum=2, start=2)]
    assert len(straight) == 6 and straight[2:] == resumed
    assert len({u for step in straight[:3] for b in step for u in b}) == 10  # epoch 0: every sample


def test_bad_samples_are_counted_as_they_are_met(tmp_path, processor):
    store = local_store(tmp_path)
    key = make_indexed_dataset(store, n=8, shard_records=8)
    prefix = "datasets/big/"
    store.delete(prefix + "videos/v1.mp4")  # gone since the manifest was written
    store.put_bytes(prefix + "videos/v2.mp4", make_mp4(99, frames=5, size=32))  # another size
    store.put_bytes(prefix + "videos/v3.mp4", b"x" * store.stat(prefix + "videos/v3.mp4").size)  # corrupt
    batches = [b for step in _feed(store, key, processor, batch=4, steps=2, workers=1) for b in step]
    assert sum(b.bad for b in batches) == 3
    reasons = " | ".join(r for b in batches for r in b.bad_reasons)
    assert "v1.mp4" in reasons and "NotFound" in reasons
    assert "v2.mp4' is larger than its index entry" in reasons and "v3.mp4" in reasons
    for b in batches:  # a bad sample is a fully masked placeholder of the same shape
        assert b.pixel_values.shape[0] == 4 * FRAMES

    # The run's bad-fraction limit applies to what has been read so far.
    for i in range(4, 8):
        store.delete(prefix + f"videos/v{i}.mp4")
    spec = tiny_spec("bad", [DatasetSource(key=key)], "lora", max_steps=8)
    with pytest.raises(FailedPrecondition) as err:
        run_training(spec, store, runtime(tmp_path))
    assert "could not be used, more than max_bad_sample_fraction=0.1" in err.value.message


def test_a_qa_generator_dataset_trains_from_its_index(tmp_path):
    store = local_store(tmp_path)
    result = build_dataset(store, request(sources_for(store, 2)))
    records = len(store.get_json("datasets/job-qa/conversations/train.json"))
    spec = tiny_spec("indexed", [DatasetSource(key=result.manifest.key)], "lora", max_steps=4, num_frames=2)
    outcome = run_training(spec, store, runtime(tmp_path))
    assert outcome.status == "succeeded" and outcome.progress.bad_samples == 0
    plan = store.get_json(plan_key("indexed"))
    assert plan["samples"] == [] and plan["datasets"][0]["index"]["records"] == records  # no per-sample plan
    metrics = store.get_json(outcome.metrics.key)
    assert metrics["data"]["samples"] == records and metrics["summary"]["samples_seen"] == 8


def test_a_changed_index_shard_fails_clearly(tmp_path, processor):
    store = local_store(tmp_path)
    key = make_indexed_dataset(store, n=5, shard_records=8)
    plan = _plan(store, key, processor)
    store.put_bytes("datasets/big/index/train-00000.jsonl", b"{}\n" * 5)
    with pytest.raises(FailedPrecondition, match="not the one the manifest lists"):
        rank_share(store, plan, processor, rank=0, world=1, num_frames=FRAMES)


def test_index_refs_are_sized(tmp_path):
    store = local_store(tmp_path)
    ref = store.put_bytes("v.mp4", b"abc")
    files, entry = index_files(
        "train", [{"id": "a", "video": "v.mp4", "conversations": []}], "", {"v.mp4": ref}
    )
    assert entry["shards"] == [{"path": "index/train-00000.jsonl", "first": 0, "records": 1}]
    assert json.loads(files["index/train-00000.jsonl"])["media"] == [["v.mp4", 3]]
    assert ref == ObjectRef(ref.bucket, "v.mp4", 3, sha256_bytes(b"abc"))
